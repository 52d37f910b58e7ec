"""Peak memory of one process serving 1 client against the same process serving 10.

``python -m benchmarks.memory`` runs, in two fresh child processes, the default
``cmfl-relay`` method for two rounds (round 2 generates from the peers' tokens) through the
real ServerApp strategy and ClientApp code on an in-process grid, with 1 and with 10 clients.
Each child reports its peak resident set size; the parent prints both and their ratio and
keeps them (``--results``, default ``benchmarks/results/memory.json``) with the command,
commit and machine; ``--show`` prints what it holds. The
clients of one process share one CLIP and one pipeline; what grows with the number of clients
is their small state (LoRA adapter, class tokens) and their data.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks import commit, show_records, store
from benchmarks.loopback import LoopbackGrid
from client_app import app as client_app
from cmfl_flower.config import AppConfig
from cmfl_flower.server.rounds import run_federation

ROUNDS = 2
MARKER = "peak-rss-bytes="
MIB = 2**20
RESULTS = Path(__file__).resolve().parent / "results" / "memory.json"


def child(clients: int, root: Path) -> None:
    """Run the federation in this process; print the peak RSS."""
    cfg = AppConfig.from_run_config(
        {
            "federation.rounds": ROUNDS,
            "federation.min-nodes": clients,
            "data.dir": str(root / "data"),
            "output.dir": str(root / "runs"),
            "output.run-name": f"memory-{clients}",
        }
    )
    run_dir = run_federation(LoopbackGrid(client_app, cfg, clients), cfg)
    last = json.loads((run_dir / "rounds.json").read_text())[-1]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(f"clients={clients} replies={last['replies']} generated={last['num-generated']}")
    print(f"{MARKER}{peak}")


def measure(clients: int, root: Path, threads: int) -> int:
    """Peak RSS in bytes of a fresh process serving ``clients`` clients."""
    command = [sys.executable, "-m", "benchmarks.memory", "--child", str(clients)]
    command += ["--root", str(root), "--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    lines = done.stdout.splitlines()
    print(next(line for line in lines if line.startswith("clients=")), flush=True)
    return int(next(line for line in lines if line.startswith(MARKER)).removeprefix(MARKER))


def main(argv: list[str] | None = None) -> None:
    """Measure 1 and ``--clients`` clients in fresh processes; print the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--results", type=Path, default=RESULTS, help="keep the figures here")
    parser.add_argument(
        "--show", action="store_true", help="instead: print what --results holds, running nothing"
    )
    args = parser.parse_args(argv)
    if args.show:
        show_records(args.results, lambda _, figures: render(figures))
        return
    torch.set_num_threads(args.threads)
    if args.child:
        child(args.child, args.root)
        return
    code = commit()  # the code that runs
    with tempfile.TemporaryDirectory(prefix="cmfl-memory-") as tmp:
        one = measure(1, Path(tmp), args.threads)
        many = measure(args.clients, Path(tmp), args.threads)
    figures = {"clients": args.clients, "one-client-bytes": one, "clients-bytes": many}
    print("\n".join(render(figures)))
    store(args.results, f"cmfl-relay, {ROUNDS} rounds", figures, code)


def render(figures: dict[str, Any]) -> list[str]:
    """Both peaks and their ratio, as a run prints them."""
    one, many = figures["one-client-bytes"], figures["clients-bytes"]
    return [
        f"peak RSS, 1 client: {one / MIB:.0f} MiB",
        f"peak RSS, {figures['clients']} clients: {many / MIB:.0f} MiB",
        f"ratio: {many / one:.2f}x",
    ]


if __name__ == "__main__":
    main()
