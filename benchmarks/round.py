"""Wall time per round and per phase, and bytes on the wire per round, method by method.

``python -m benchmarks.round`` runs every method in :data:`METHODS` with the app's default
config (same backbone, data, seed and clients) through the real server strategy and
ClientApp code on an in-process grid, where the clients are served one after another by one
process (as one simulation worker serves them). Per round it prints the wall time of the
round's message exchange, the mean seconds per client of each phase (the ``seconds-*``
metrics the clients report) and the bytes sent and received (the round metrics), then each
method's bytes and time per round relative to the first method. ``--results`` keeps them
(default ``benchmarks/results/round.json``) with the command, commit and machine; ``--show``
prints what it holds.

A new method is measured by adding its name to :data:`METHODS`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from flwr.app import Message

from benchmarks import commit, show_records, store
from benchmarks.loopback import LoopbackGrid
from client_app import app as client_app
from cmfl_flower.config import AppConfig
from cmfl_flower.server.rounds import run_federation

# method names; the first is the reference
METHODS = ["cmfl-relay", "diffusion-lora", "encoder-lora"]
CLIENTS = 4
ROUNDS = 3
PHASES = ("generation", "encoder", "tokens", "eval")
# what a stored row keeps of its round summary: what the table and the ratios read
KEPT = (
    "method",
    "round",
    "wall",
    "bytes-sent",
    "bytes-received",
    *(f"seconds-{p}" for p in PHASES),
)
RESULTS = Path(__file__).resolve().parent / "results" / "round.json"


class TimedGrid(LoopbackGrid):
    """A loopback grid that records the wall time of every training exchange."""

    def __init__(self, cfg: AppConfig, num_nodes: int) -> None:
        super().__init__(client_app, cfg, num_nodes)
        self.train_seconds: list[float] = []

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver the messages (the clients work here); time it when it is a training round."""
        batch = list(messages)
        start = time.perf_counter()
        ids = super().push_messages(batch)
        if batch and batch[0].metadata.message_type.startswith("train"):
            self.train_seconds.append(time.perf_counter() - start)
        return ids


def measure(method: str, root: Path, clients: int, rounds: int) -> list[dict[str, Any]]:
    """Run ``method``; one row per round with wall time, phase means and bytes."""
    cfg = AppConfig.from_run_config(
        {
            "method": method,
            "federation.rounds": rounds,
            "federation.min-nodes": clients,
            "data.dir": str(root / "data"),
            "output.dir": str(root / "runs"),
            "output.run-name": method,
        }
    )
    grid = TimedGrid(cfg, clients)
    run_dir = run_federation(grid, cfg)
    summaries = json.loads((run_dir / "rounds.json").read_text())
    return [
        {"method": method, "round": index + 1, "wall": seconds} | summary
        for index, (seconds, summary) in enumerate(zip(grid.train_seconds, summaries, strict=True))
    ]


def table(rows: list[dict[str, Any]]) -> str:
    """The per-round rows as a Markdown table."""
    phases = " | ".join(f"{phase} s" for phase in PHASES)
    lines = [
        f"| method | round | wall s | {phases} | bytes sent | bytes received |",
        "| --- | --- " + "| --- " * (len(PHASES) + 3) + "|",
    ]
    for row in rows:
        seconds = " | ".join(_seconds(row.get(f"seconds-{phase}")) for phase in PHASES)
        lines.append(
            f"| {row['method']} | {row['round']} | {row['wall']:.1f} | {seconds} | "
            f"{row['bytes-sent']:,} | {row['bytes-received']:,} |"
        )
    return "\n".join(lines)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def ratios(rows: list[dict[str, Any]]) -> list[str]:
    """Per method: mean bytes and wall time per round relative to the first method run."""

    def means(name: str) -> tuple[float, float]:
        own = [row for row in rows if row["method"] == name]
        wire = sum(row["bytes-sent"] + row["bytes-received"] for row in own) / len(own)
        return wire, sum(row["wall"] for row in own) / len(own)

    methods = list(dict.fromkeys(row["method"] for row in rows))
    base_wire, base_wall = means(methods[0])
    lines = []
    for name in methods:
        wire, wall = means(name)
        lines.append(
            f"{name}: {wire:,.0f} bytes/round ({wire / base_wire:.2f}x {methods[0]}), "
            f"{wall:.1f} s/round ({wall / base_wall:.2f}x)"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    """Run every method on the default config; print the table and the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=CLIENTS)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="keep the rows here")
    parser.add_argument(
        "--show", action="store_true", help="instead: print what --results holds, running nothing"
    )
    args = parser.parse_args(argv)
    if args.show:
        show_records(args.results, lambda _, figures: render(figures))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    code = commit()  # the code that runs
    figures: dict[str, Any] = {"clients": args.clients, "rounds": args.rounds}
    figures["threads"] = torch.get_num_threads()
    print(render(figures)[0], flush=True)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cmfl-round-") as tmp:
        for method in METHODS:
            rows += measure(method, Path(tmp), args.clients, args.rounds)
    figures["rows"] = [{key: row[key] for key in KEPT if key in row} for row in rows]
    print("\n".join(render(figures)[1:]))
    store(args.results, "default config", figures, code)


def render(figures: dict[str, Any]) -> list[str]:
    """The settings line, then (with the rows) the table and the ratios."""
    lines = [
        f"clients={figures['clients']} rounds={figures['rounds']} default config, torch threads "
        f"{figures['threads']}"
    ]
    if "rows" in figures:
        lines += [table(figures["rows"]), *ratios(figures["rows"])]
    return lines


if __name__ == "__main__":
    main()
