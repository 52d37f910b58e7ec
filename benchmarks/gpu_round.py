"""Federated rounds of one method on a full-size architecture, every client its own worker.

``python -m benchmarks.gpu_round --arch bk-sdm-v2-small --method cmfl-relay`` writes random
full-size weights of the architecture once (the CLIP in float32, the pipeline in the
``backbone.dtype`` it will run in, as safetensors), then runs ``--rounds`` rounds with
``--clients`` clients through the real strategy and ClientApp code. Each client runs in a
worker process of its own (:class:`benchmarks.pool.PoolGrid`), all sharing the one GPU, as a
simulation with ``client-resources-num-gpus = 1 / clients`` shares it.

It prints, per round, the wall time, the clients' mean seconds per phase and the bytes on the
wire; per worker, its peak GPU memory (``torch.cuda.max_memory_allocated``) and peak RSS; and
the highest GPU memory ``nvidia-smi`` showed in use while the rounds ran. ``--json`` writes it
all. ``--dry-run`` runs the same code on the ``tiny`` preset (for CI: no GPU, no big weights).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

from benchmarks.pool import PoolGrid
from benchmarks.tokens import parse_override
from cmfl_flower.backbones import resolve_device, resolve_dtype
from cmfl_flower.config import AppConfig
from cmfl_flower.server.rounds import run_federation
from training.archs import ARCHS

PHASES = ("tokens", "generation", "encoder", "eval", "train")
GIB = 1024**3


class GpuMemoryPoller:
    """The most GPU memory in use that ``nvidia-smi`` reports, polled every ``period`` s."""

    def __init__(self, period: float = 0.5) -> None:
        self.period = period
        self.peak_mib: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> GpuMemoryPoller:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        query = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
        while not self._stop.wait(self.period):
            try:
                out = subprocess.run(query, capture_output=True, text=True, check=True).stdout
            except (OSError, subprocess.CalledProcessError):
                return  # no nvidia-smi here: the peak stays unknown
            used = max(int(line) for line in out.split())
            self.peak_mib = max(self.peak_mib or 0, used)


def run_config(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """The flat run config of the measured federation."""
    config: dict[str, Any] = {
        "method": args.method,
        "federation.rounds": args.rounds,
        "federation.min-nodes": args.clients,
        "data.dir": str(root / "data"),
        "output.dir": str(root / "runs"),
        "output.run-name": args.method,
    }
    if not args.dry_run:
        from benchmarks.cold_start import full_size_backbone

        dtype = resolve_dtype("auto", resolve_device("auto"))
        config |= full_size_backbone(args.arch, dtype, args.weights_dir)
    return config | dict(map(parse_override, args.set))


def measure(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Run the federation; per round and per worker figures."""
    config = run_config(args, root)
    cfg = AppConfig.from_run_config(config)
    with GpuMemoryPoller() as poller, PoolGrid(cfg, args.clients) as grid:
        run_dir = run_federation(grid, cfg)
    summaries = json.loads((run_dir / "rounds.json").read_text())
    rounds = [
        {"round": index + 1, "wall": seconds}
        | {key: value for key, value in summary.items() if _kept(key)}
        for index, (seconds, summary) in enumerate(zip(grid.round_seconds, summaries, strict=True))
    ]
    workers = {
        str(node): {
            "peak-gpu-bytes": max((s.get("peak-gpu-bytes", 0) for s in stats), default=0),
            "peak-rss-bytes": max((s.get("peak-rss-bytes", 0) for s in stats), default=0),
            "message-seconds": [s.get("seconds", 0.0) for s in stats],
        }
        for node, stats in grid.stats.items()
    }
    return {
        "arch": "tiny" if args.dry_run else args.arch,
        "method": args.method,
        "clients": args.clients,
        "config": config,
        "rounds": rounds,
        "workers": workers,
        "nvidia-smi-peak-mib": poller.peak_mib,
    }


def _kept(key: str) -> bool:
    return key.startswith(("seconds-", "bytes-", "accuracy", "num-generated")) or key in (
        "round-seconds",
        "generated-recognised-mean",
    )


def report(result: dict[str, Any]) -> str:
    """The figures as printed lines: a round table, then the workers' peaks."""
    phases = [p for p in PHASES if any(f"seconds-{p}" in row for row in result["rounds"])]
    heads = ["round", "wall s", *(f"{p} s" for p in phases), "bytes sent", "bytes received"]
    lines = [
        f"{result['method']} on {result['arch']}, {result['clients']} clients, one worker each "
        "(round 1 includes the workers' imports and model loads)",
        "| " + " | ".join(heads) + " |",
        "|" + " --- |" * len(heads),
    ]
    for row in result["rounds"]:
        cells = [
            str(row["round"]),
            f"{row['wall']:.1f}",
            *(f"{row.get(f'seconds-{p}', float('nan')):.2f}" for p in phases),
            f"{row.get('bytes-sent', 0):,}",
            f"{row.get('bytes-received', 0):,}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    for node, worker in result["workers"].items():
        lines.append(
            f"worker {node}: peak GPU {worker['peak-gpu-bytes'] / GIB:.2f} GiB allocated, "
            f"peak RSS {worker['peak-rss-bytes'] / GIB:.2f} GiB"
        )
    peak = result["nvidia-smi-peak-mib"]
    lines.append(f"nvidia-smi peak in use: {'n/a' if peak is None else f'{peak:,} MiB'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Measure and print; write ``--json`` when given."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=ARCHS, default="bk-sdm-v2-small")
    parser.add_argument("--method", default="cmfl-relay")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--set", nargs="*", default=[], help="run config KEY=VALUE overrides")
    parser.add_argument("--weights-dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--dry-run", action="store_true", help="the tiny preset, for CI")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cmfl-gpu-round-") as tmp:
        result = measure(args, Path(tmp))
    print(report(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
