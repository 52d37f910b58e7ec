"""Cold start of a ClientApp message: imports, model loads and work, in a fresh process each.

In a Flower deployment every message starts a fresh ClientApp process, which pays its imports
and its model loads before it does any work. ``python -m benchmarks.cold_start`` runs every
built-in method for ``--rounds`` rounds with ``--clients`` clients through the real server
strategy on a loopback grid (:mod:`benchmarks.loopback`) whose every message goes to a fresh
``python -m benchmarks.cold_start_child``, as in a deployment (state stays on disk between
them). Each child times ``import client_app``, the method's own imports, its model loads and the
message itself (see :mod:`benchmarks.cold_start_child`). The table gives, per method and round,
each step's median over the clients; the reference is ``import torch`` alone in a fresh process,
measured in the same run (before each method).

``--baseline-rev REV`` measures the client code of git revision ``REV`` too, the same way, in
turns with this tree, method by method: a worktree of it in a temporary directory with the child
module copied in (the server side is this tree's). The table then reads ``before -> after``.
``--full-size NAME`` measures imports and loads only (no message: its work takes minutes on a
CPU) of a full-size architecture (:mod:`training.archs`) with random weights, written once in
safetensors to ``--weights-dir``, the pipeline in the run's dtype (the CLIP stays float32).
"""

from __future__ import annotations

import argparse
import json
import logging
import pickle
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import open_clip
import torch
from flwr.app import Context, Message
from open_clip.transform import PreprocessCfg

from benchmarks import ROOT, commit, show_records, store
from benchmarks.cold_start_child import LOADERS, dumps
from benchmarks.loopback import LoopbackGrid
from cmfl_flower.aliases import Row
from cmfl_flower.backbones import resolve_device, resolve_dtype
from cmfl_flower.client.workspace import data_dir
from cmfl_flower.config import AppConfig
from cmfl_flower.methods.base import CONFIG_KEY, ROUND_KEY
from cmfl_flower.server.rounds import run_federation
from training.archs import build_clip, build_pipeline, clip_config
from training.builders import save_clip

CHILD = Path(__file__).with_name("cold_start_child.py")
RESULTS = Path(__file__).with_name("results") / "cold_start.json"
STEPS = ("import", "method-imports", "loads", "work")
HEADINGS = {
    "import": "import client_app s",
    "method-imports": "method imports s",
    "loads": "loads s",
    "work": "work s",
    "total": "total s",
}
TORCH_REPEATS = 3
TORCH_PROBE = "import time; s = time.perf_counter(); import torch; print(time.perf_counter() - s)"


def _spawn(tree: Path, job: Path) -> Row:
    """Run the child on ``job`` with the client code of ``tree``; its timings."""
    command = [sys.executable, "-m", "benchmarks.cold_start_child", str(job)]
    done = subprocess.run(command, cwd=tree, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"child in {tree} failed:\n{done.stderr[-3000:]}")
    row: Row = json.loads((job / "timings.json").read_text())
    if not Path(row["source"]).is_relative_to(tree):
        raise RuntimeError(f"the child imported {row['source']}, not the code of {tree}")
    return row


class FreshProcess:
    """A ClientApp that answers each message in a fresh child process (a deployment's way)."""

    def __init__(self, tree: Path, jobs: Path, threads: int) -> None:
        self.tree, self.jobs, self.threads = tree, jobs, threads
        self.rows: list[Row] = []
        self.failures: list[str] = []  # the grid turns a failure into an error reply

    def __call__(self, message: Message, context: Context) -> Message:
        """Pickle the message for the child, run it, return its reply."""
        job = self.jobs / f"message-{len(self.rows)}"
        job.mkdir(parents=True)
        request = {
            "run_config": dict(context.run_config),
            "threads": self.threads,
            "message": message,
            "context": context,
        }
        (job / "request.pkl").write_bytes(dumps(request))
        try:
            row = _spawn(self.tree, job)
        except RuntimeError as err:
            self.failures.append(str(err))
            raise
        server_round = message.content.config_records[CONFIG_KEY][ROUND_KEY]
        self.rows.append({"round": server_round, "node": context.node_id, **row})
        reply: Message = pickle.loads((job / "reply.pkl").read_bytes())
        return reply


def _overrides(method: str, args: argparse.Namespace, root: Path, name: str) -> dict[str, Any]:
    return {
        "method": method,
        "backbone.preset": args.preset,
        "backbone.threads": args.threads,
        "federation.rounds": args.rounds,
        "federation.min-nodes": args.clients,
        "federation.fraction-evaluate": 0.0,
        "data.dir": str(root / "data"),
        "output.dir": str(root / "runs"),
        "output.run-name": f"{name.split()[0]}-{method}",  # before / after
        "output.progress": False,
    }


def measure_method(
    method: str, tree: Path, name: str, args: argparse.Namespace, root: Path
) -> list[Row]:
    """``method``'s messages, each answered by a fresh process of ``tree``; one row each."""
    overrides = _overrides(method, args, root, name)
    cfg = AppConfig.from_run_config(overrides)
    data_dir(cfg.data, args.clients)  # prepared here, not in a measured message
    fresh = FreshProcess(tree, root / "jobs" / name / method, args.threads)
    # overrides: any revision
    grid = LoopbackGrid(fresh, overrides, args.clients)
    run_federation(grid, cfg)
    if fresh.failures:
        raise RuntimeError(fresh.failures[0])
    for row in fresh.rows:
        steps = ", ".join(f"{step} {row['timings'][step]:.2f} s" for step in STEPS)
        print(f"{name}, {method}, round {row['round']}, node {row['node']}: {steps}", flush=True)
    return [{"method": method, **row} for row in fresh.rows]


def measure_loads(
    sides: dict[str, Path], run_config: dict[str, Any], repeats: int, jobs: Path
) -> dict[str, list[Row]]:
    """Imports and loads of ``run_config``'s method, no message, ``repeats`` times per tree."""
    request = {"run_config": run_config, "threads": run_config["backbone.threads"]}
    runs: dict[str, list[Row]] = {name: [] for name in sides}
    for index in range(repeats):
        for side, (name, tree) in enumerate(sides.items()):
            job = jobs / f"loads-{index}-{side}"
            job.mkdir(parents=True)
            (job / "request.pkl").write_bytes(dumps({**request, "message": None, "context": None}))
            row = {"method": run_config["method"], "round": "-"} | _spawn(tree, job)
            print(f"{name}: " + ", ".join(f"{k} {v:.2f} s" for k, v in row["timings"].items()))
            runs[name].append(row)
    return runs


def import_torch_seconds(repeats: int) -> list[float]:
    """``import torch`` in ``repeats`` fresh processes."""
    runs = [
        subprocess.run([sys.executable, "-c", TORCH_PROBE], capture_output=True, text=True)
        for _ in range(repeats)
    ]
    return [float(run.stdout.strip()) for run in runs]


def _describe_head() -> str:
    """The commit of the tree measured, ``+ changes`` when tracked files differ from it."""
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run([*git, "diff", "--quiet", "HEAD"], check=False).returncode != 0
    return head.stdout.strip() + (" + changes" if dirty else "")


@contextmanager
def trees(rev: str) -> Iterator[dict[str, Path]]:
    """The code measured: a worktree of ``rev`` (if given; child module copied in), then ours."""
    after = {f"after ({_describe_head()})": ROOT}
    if not rev:
        yield after
        return
    with tempfile.TemporaryDirectory(prefix="cmfl-cold-start-rev-") as tmp:
        tree = Path(tmp) / "tree"
        git = ["git", "-C", str(ROOT)]
        subprocess.run([*git, "worktree", "add", "--detach", str(tree), rev], check=True)
        try:
            shutil.copy(CHILD, tree / "benchmarks" / CHILD.name)
            yield {f"before ({rev})": tree, **after}
        finally:
            subprocess.run([*git, "worktree", "remove", "--force", str(tree)], check=True)


def full_size_weights(name: str, dtype: torch.dtype, directory: Path) -> dict[str, Any]:
    """Random full-size weights of ``name`` in ``directory`` (written once); run config keys."""
    target = directory / f"{name}-{str(dtype).removeprefix('torch.')}"
    keys = {"backbone.clip": str(target / "clip"), "backbone.diffusion": str(target / "diffusion")}
    if not (target / "complete").is_file():
        print(f"writing random {name} weights to {target} (once)", flush=True)
        torch.manual_seed(0)
        clip = build_clip(name)
        open_clip.set_model_preprocess_cfg(clip, asdict(PreprocessCfg()))  # OpenAI's mean, std
        save_clip(clip, clip_config(name), target / "clip")
        pipeline = build_pipeline(name, target / "tokenizer").to(dtype=dtype)
        pipeline.save_pretrained(target / "diffusion", safe_serialization=True)
        (target / "complete").touch()
    return keys


def _median(rows: list[Row], step: str) -> float:
    return statistics.median(float(row["timings"][step]) for row in rows)


def _medians(rows: list[Row], steps: tuple[str, ...]) -> dict[tuple[str, Any], dict[str, float]]:
    """Per (method, round): the median of each step over the runs, and their sum."""
    keys = dict.fromkeys((row["method"], row["round"]) for row in rows)
    out = {}
    for key in keys:
        own = [row for row in rows if (row["method"], row["round"]) == key]
        medians = {step: _median(own, step) for step in steps}
        out[key] = medians | {"total": sum(medians.values())}
    return out


def table(results: dict[str, list[Row]], steps: tuple[str, ...] = STEPS) -> str:
    """Per method and round, each step's median over the runs: ``before -> after``."""
    sides = [_medians(rows, steps) for rows in results.values()]
    heads = [HEADINGS[step] for step in (*steps, "total")]
    lines = [
        "| method | round | " + " | ".join(heads) + " |",
        "| --- | --- |" + " --- |" * len(heads),
    ]
    for method, server_round in sides[-1]:
        cells = [
            " -> ".join(f"{side[(method, server_round)][step]:.2f}" for side in sides)
            for step in (*steps, "total")
        ]
        lines.append(f"| {method} | {server_round} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def import_lines(results: dict[str, list[Row]], torch_seconds: float) -> list[str]:
    """Median ``import client_app`` of each tree against ``import torch``."""
    lines = []
    for name, rows in results.items():
        seconds = _median(rows, "import")
        ratio = seconds / torch_seconds
        lines.append(
            f"import client_app, {name}: {seconds:.2f} s (median of {len(rows)} processes), "
            f"{ratio:.1f}x import torch"
        )
    return lines


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(LOADERS), choices=list(LOADERS))
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, every process")
    parser.add_argument("--baseline-rev", default="", help="also measure this git revision")
    parser.add_argument("--full-size", default="", help="imports and loads of this arch")
    parser.add_argument("--dtype", default="auto", help="--full-size: backbone.dtype")
    parser.add_argument("--weights-dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--repeats", type=int, default=2, help="--full-size: runs per tree")
    parser.add_argument("--json", type=Path, default=RESULTS, help="where results go")
    parser.add_argument(
        "--show", action="store_true", help="instead: print what --json holds, running nothing"
    )
    return parser


def full_size_backbone(name: str, dtype: torch.dtype, directory: Path) -> dict[str, Any]:
    """The run config keys of ``name``'s preset on random weights in ``directory``."""
    return {
        "backbone.preset": name,
        "backbone.clip-pretrained": "",
        "backbone.dtype": str(dtype).removeprefix("torch."),
        **full_size_weights(name, dtype, directory),
    }


def _full_size_config(args: argparse.Namespace) -> dict[str, Any]:
    dtype = resolve_dtype(args.dtype, resolve_device("auto"))
    backbone = full_size_backbone(args.full_size, dtype, args.weights_dir)
    return {"method": "cmfl-relay", "backbone.threads": args.threads} | backbone


def render(entry: dict[str, Any]) -> list[str]:
    """What a run prints of ``entry``: the reference, the table, ``import client_app``."""
    torch_seconds = statistics.median(entry["import-torch-s"])
    lines = [
        f"torch threads {entry['threads']} in every process",
        f"import torch: {torch_seconds:.2f} s (median of {len(entry['import-torch-s'])} fresh "
        "processes)",
    ]
    results, steps = (entry["runs"], STEPS[:-1]) if "runs" in entry else (entry["messages"], STEPS)
    return [*lines, table(results, steps), *import_lines(results, torch_seconds)]


def main(argv: list[str] | None = None) -> None:
    """Measure, print the table and the ratios, keep them in ``--json``.

    The trees take turns method by method, and ``import torch`` is measured before each
    method, so that a busy spell on the machine does not fall on one side only.
    """
    args = _parser().parse_args(argv)
    if args.show:
        show_records(args.json, lambda _, entry: render(entry))
        return
    torch.set_num_threads(args.threads)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    code = commit()  # the code that runs
    entry: dict[str, Any] = {"threads": args.threads, "import-torch-s": []}
    with trees(args.baseline_rev) as sides, tempfile.TemporaryDirectory() as tmp:
        if args.full_size:
            entry["config"] = run_config = _full_size_config(args)
            entry["import-torch-s"] = import_torch_seconds(TORCH_REPEATS)
            entry["runs"] = measure_loads(sides, run_config, args.repeats, Path(tmp))
        else:
            results: dict[str, list[Row]] = {name: [] for name in sides}
            for method in args.methods:
                entry["import-torch-s"] += import_torch_seconds(1)
                for name, tree in sides.items():
                    results[name] += measure_method(method, tree, name, args, Path(tmp))
            entry |= {"clients": args.clients, "rounds": args.rounds, "messages": results}
    print("\n".join(render(entry)))
    tag = f"{args.full_size} imports and loads" if args.full_size else args.preset
    store(args.json, tag, entry, code)


if __name__ == "__main__":
    main()
