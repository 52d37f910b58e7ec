"""Does relaying class tokens help? The method against its baselines, on the offline data.

``python -m benchmarks.method`` runs, on one fixed partition (digits, Dirichlet alpha = 0.1,
10 clients, every client sampled every round) and fixed seeds, the strategies ``local-only``,
``cmfl-relay`` and ``fedavg-encoder`` through the real ServerApp strategy and ClientApp code
(in process), plus centralised training on the pooled client data as an upper bound. It prints
one table of mean client accuracy on the global test set after the last round, and
``cmfl-relay - local-only`` in points. The federated runs' figures are read back from their run
directories with :mod:`cmfl_flower.report` (what ``cmfl-report`` prints), which also writes
``comparison/compare.html`` and ``compare.png`` (accuracy per round, overlaid) under the root.

The settings below were fixed before the first run; they are the app's defaults except the
number of clients and rounds.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from client_app import app as client_app
from cmfl_flower import report
from cmfl_flower.client import ClientTask, data_dir, open_workspace
from cmfl_flower.config import AppConfig
from cmfl_flower.data import load_partition
from cmfl_flower.encoder import TrainingSet, accuracy, train_encoder
from cmfl_flower.strategies import run_federation
from cmfl_flower.strategies.loopback import LoopbackGrid

CLIENTS = 10
ROUNDS = 5
SEED = 0
STRATEGIES = ("local-only", "cmfl-relay", "fedavg-encoder")


def config(
    strategy: str, root: Path, rounds: int, extra: dict[str, Any] | None = None
) -> AppConfig:
    """The fixed benchmark settings for ``strategy`` (plus ablation overrides)."""
    return AppConfig.from_run_config(
        (extra or {})
        | {
            "strategy": strategy,
            "seed": SEED,
            "data.partitioner": "dirichlet",
            "data.alpha": 0.1,
            "data.seed": SEED,
            "data.dir": str(root / "data"),
            "federation.rounds": rounds,
            "federation.fraction": 1.0,
            "federation.min-nodes": CLIENTS,
            "output.dir": str(root / "runs"),
            "output.run-name": strategy,
        }
    )


def federated(
    strategy: str, root: Path, rounds: int, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run ``strategy``; return the last round's summary and the wall time."""
    start = time.perf_counter()
    cfg = config(strategy, root, rounds, extra)
    run_dir = run_federation(LoopbackGrid(client_app, CLIENTS), cfg)
    final = report.comparison_rows([report.load_run(run_dir)])[0]
    return final | {"seconds": time.perf_counter() - start, "run-dir": str(run_dir)}


def centralised(root: Path, rounds: int) -> dict[str, Any]:
    """Upper bound: the vision LoRA trained on all clients' training data pooled."""
    start = time.perf_counter()
    cfg = config("local-only", root, rounds)
    ws = open_workspace(cfg, ClientTask(0, CLIENTS, 1), None)
    parts = [load_partition(data_dir(cfg.data, CLIENTS), pid).train for pid in range(CLIENTS)]
    pooled = TrainingSet.mix(
        ws.encoder.bundle.image_size, *((p.images, p.labels, 1.0) for p in parts)
    )
    text = ws.name_features()
    epochs = cfg.encoder.model_copy(update={"epochs": cfg.encoder.epochs * rounds})
    train_encoder(ws.encoder, pooled, text, epochs, SEED)
    glob = ws.global_test
    acc = accuracy(ws.encoder, glob.images, glob.labels, text, cfg.encoder.eval_batch_size)
    return {"global-acc-mean": acc, "seconds": time.perf_counter() - start}


def table(results: dict[str, dict[str, Any]]) -> str:
    """The results as a Markdown table plus the headline difference."""
    lines = [
        "| strategy | mean client accuracy, global test | min | max | seconds |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, row in results.items():
        low, high = row.get("global-acc-min"), row.get("global-acc-max")
        span = (f"{low:.3f}", f"{high:.3f}") if low is not None and high is not None else ("", "")
        lines.append(
            f"| {name} | {row['global-acc-mean']:.3f} | {span[0]} | {span[1]} | "
            f"{row['seconds']:.0f} |"
        )
    gain = results["cmfl-relay"]["global-acc-mean"] - results["local-only"]["global-acc-mean"]
    lines.append("")
    lines.append(f"cmfl-relay - local-only: {100 * gain:+.1f} points")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run every strategy and the upper bound; print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--out", type=Path, default=None, help="keep run directories here")
    parser.add_argument(
        "--ablate",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="run only cmfl-relay with this run-config override (diagnosis, not the benchmark)",
    )
    args = parser.parse_args(argv)
    root = args.out or Path(tempfile.mkdtemp(prefix="cmfl-method-"))
    if args.ablate:
        extra = dict(_parse_override(item) for item in args.ablate)
        row = federated("cmfl-relay", root, args.rounds, extra)
        print(f"cmfl-relay with {extra}: {row['global-acc-mean']:.3f} ({row['seconds']:.0f} s)")
        return
    print(f"clients={CLIENTS} rounds={args.rounds} seed={SEED} alpha=0.1; results in {root}")
    results: dict[str, dict[str, Any]] = {
        "centralised (pooled data)": centralised(root, args.rounds)
    }
    for strategy in STRATEGIES:
        results[strategy] = federated(strategy, root, args.rounds)
        print(f"{strategy}: {results[strategy]['global-acc-mean']:.3f}", flush=True)
    print(table(results))
    (root / "method.json").write_text(json.dumps(results, indent=2, default=float))
    runs = [report.load_run(Path(results[name]["run-dir"])) for name in STRATEGIES]
    page, _ = report.write_comparison(runs, root / "comparison")
    print(f"accuracy per round, overlaid: {page}")
    print(f"mean per-client label share of the largest class: {_skew(root):.2f}")


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    if not sep:
        raise SystemExit(f"--ablate expects KEY=VALUE, got {item!r}")
    value = json.loads(text) if text[:1] in '-0123456789tf[{"' else text
    return key, value


def _skew(root: Path) -> float:
    cfg = config("local-only", root, 1)
    directory = data_dir(cfg.data, CLIENTS)
    shares = []
    for pid in range(CLIENTS):
        labels = load_partition(directory, pid).train.labels
        shares.append(np.bincount(labels).max() / len(labels))
    return float(np.mean(shares))


if __name__ == "__main__":
    main()
