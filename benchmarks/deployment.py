"""A deployment round's wall time against the work its clients report.

``python -m benchmarks.deployment`` starts a SuperLink and ``--nodes`` SuperNodes as processes on
loopback (as ``docs/deployment.md``'s bare-metal section does; the process helpers of the
end-to-end tests), runs the default ``cmfl-relay`` for ``--rounds`` rounds and prints, per round,
the round's wall time (the server's ``round-seconds``), the clients' mean work (their summed
phase seconds ``seconds-tokens + -generation + -encoder + -eval``), their mean model loads
(``seconds-load``) and the ratio of wall time to work. In a deployment every message starts a
fresh ClientApp process that imports the app and loads its models again, so the ratio shows
what imports, loads, start-up, polling and the shared CPUs add to the work itself: loads are
overhead, not work. Each SuperNode gets ``num-cpus`` in its node config, and with
``--worker-idle S`` also ``worker-idle-seconds=S``, as the deployment guide asks: one worker
process per node then serves its rounds with the models loaded (:mod:`cmfl_flower.client.worker`),
and only round 1 pays the imports and loads. ``--task-poll S`` sets the nodes'
``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` (how often a SuperNode's SuperExec looks for a message to
start a ClientApp process for; Flower's default 1 s), as the guide does. ``--results`` keeps the
table (default ``benchmarks/results/deployment.json``, under ``--tag``) with the command, commit
and machine.

Before the nodes start, the host's partitions are written with ``cmfl-data-prep``, as
``docs/deployment.md`` asks of an operator; ``--first-use`` leaves that to the clients' first
message instead (the digits are partitioned on first use), which round 1 then pays.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from benchmarks import ROOT, commit, show_records, store
from benchmarks.flower_procs import (
    BIN,
    SuperLink,
    deployment_superlink,
    free_port,
    interrupt,
    node_workers,
    start_run,
    supernode,
    wait_finished,
)

PHASES = ("tokens", "generation", "encoder", "eval")  # work; seconds-load is overhead
TASK_POLL = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"  # Flower's SuperExec: seconds between looks
RESULTS = Path(__file__).resolve().parent / "results" / "deployment.json"


def run(link: SuperLink, root: Path, rounds: int, nodes: int, extra: str) -> Path:
    """`flwr run` the default relay; wait for it to finish; return its run directory."""
    overrides = (
        f"federation.rounds={rounds} federation.min-nodes={nodes} output.dir='{root / 'runs'}' "
        f"output.run-name='deployment' data.dir='{root / 'data'}' {extra}"
    )
    run_id = start_run(link, ROOT, overrides)
    status = wait_finished(link, run_id, timeout=3600)
    if status != "finished:completed":
        raise RuntimeError(f"run {run_id} ended {status}")
    return root / "runs" / "deployment"


def prepare(data_root: Path, nodes: int) -> None:
    """``cmfl-data-prep`` of the default run's partitions into ``data_root``, as the guide says."""
    command = [str(BIN / "cmfl-data-prep"), "--dataset", "digits", "--num-partitions", str(nodes)]
    env = os.environ | {"CMFL_FLOWER_DATA": str(data_root)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr}")


def per_round(run_dir: Path) -> list[dict[str, Any]]:
    """Round wall time, the clients' mean work and model loads, and wall / work."""
    rounds = json.loads((run_dir / "rounds.json").read_text())
    clients = json.loads((run_dir / "clients.json").read_text())
    out = []
    for summary in rounds:
        rows = [r for r in clients if r["round"] == summary["round"] and "error" not in r]
        work = sum(sum(r.get(f"seconds-{p}", 0.0) for p in PHASES) for r in rows) / len(rows)
        load = sum(r.get("seconds-load", 0.0) for r in rows) / len(rows)
        wall = summary["round-seconds"]
        out.append(
            {
                "round": summary["round"],
                "wall-s": wall,
                "work-s": work,
                "load-s": load,
                "ratio": wall / work,
            }
        )
    return out


def main(argv: list[str] | None = None) -> None:
    """Start the deployment, run the relay, print the per-round table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-cpus", type=int, default=1, help="node config num-cpus")
    parser.add_argument(
        "--worker-idle", type=int, default=0, help="node config worker-idle-seconds (0: none)"
    )
    parser.add_argument(
        "--task-poll",
        type=float,
        default=None,
        help="the nodes' FLWR_SUPEREXEC_TASK_POLL_INTERVAL in seconds (default: Flower's, 1 s)",
    )
    parser.add_argument("--run-config", default="", help="extra run config overrides")
    parser.add_argument("--results", type=Path, default=RESULTS, help="keep the table here")
    parser.add_argument("--tag", default="", help="key in --results (default: the settings)")
    parser.add_argument(
        "--first-use",
        action="store_true",
        help="no cmfl-data-prep before the run: round 1's clients partition the digits",
    )
    parser.add_argument(
        "--show", action="store_true", help="instead: print what --results holds, running nothing"
    )
    args = parser.parse_args(argv)
    if args.show:
        show_records(args.results, lambda _, figures: render(figures))
        return
    code = commit()  # the code that runs
    with tempfile.TemporaryDirectory(prefix="cmfl-deploy-") as tmp, ExitStack() as stack:
        root = Path(tmp)
        if not args.first_use:
            prepare(root / "data", args.nodes)
        link = stack.enter_context(deployment_superlink(root))
        env = {"XDG_CACHE_HOME": str(stack.enter_context(node_workers()))}
        if args.task_poll is not None:
            env[TASK_POLL] = str(args.task_poll)
        processes = []
        for partition in range(args.nodes):
            config = (
                f"partition-id={partition} num-partitions={args.nodes} num-cpus={args.num_cpus} "
                f"worker-idle-seconds={args.worker_idle}"
            )
            node = supernode(
                root, f"node-{partition}", link.address, config, port=free_port(), extra_env=env
            )
            processes.append(stack.enter_context(node).process)
        stack.callback(interrupt, processes)
        rows = per_round(run(link, root, args.rounds, args.nodes, args.run_config))
    data = "partitioned on first use" if args.first_use else "prepared by cmfl-data-prep"
    worker = f"worker-idle-seconds {args.worker_idle}" if args.worker_idle else "no worker"
    poll = f", task poll {args.task_poll:g} s" if args.task_poll is not None else ""
    print(
        f"{args.nodes} SuperNodes (num-cpus={args.num_cpus}, {worker}{poll}), default cmfl-relay, "
        f"data {data}"
    )
    figures = {"rounds": rows, "mean-ratio": sum(r["ratio"] for r in rows) / len(rows)}
    print("\n".join(render(figures)))
    tag = args.tag or f"{args.nodes} nodes, num-cpus {args.num_cpus}, {data}"
    tag += f", {worker}" if args.worker_idle else ""
    tag += poll
    store(args.results, tag, figures, code)


def render(figures: dict[str, Any]) -> list[str]:
    """The per-round table and the mean ratio, as a run prints them."""
    lines = [
        "| round | wall s | clients' mean work s | their mean model loads s | wall / work |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in figures["rounds"]:
        lines.append(
            f"| {row['round']} | {row['wall-s']:.1f} | {row['work-s']:.1f} | "
            f"{row['load-s']:.1f} | {row['ratio']:.2f} |"
        )
    return [*lines, f"mean wall / work: {figures['mean-ratio']:.2f}"]


if __name__ == "__main__":
    main()
