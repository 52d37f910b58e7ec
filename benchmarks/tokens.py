"""How well do relayed tokens survive? One in-process run, its accuracy and judge per round.

``python -m benchmarks.tokens [--clients N] KEY=VALUE ...`` runs the app (real strategy and
ClientApp code, in process, one torch thread) with run-config overrides and prints, per round,
the mean client accuracy on the global test set (with the worst client) and the share of
generated images the judge recognises (mean, min, max over clients). The token defaults
(``tokens.objective``, ``tokens.anchor``, ``tokens.unseen``, ``tokens.min-images``) were chosen
from these lines; the README lists the commands and what they printed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.loopback import LoopbackGrid
from client_app import app as client_app
from cmfl_flower.config import AppConfig
from cmfl_flower.server.rounds import run_federation


def parse_override(item: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as JSON when it parses, else as a string."""
    key, sep, text = item.partition("=")
    if not sep:
        raise SystemExit(f"expected KEY=VALUE, got {item!r}")
    try:
        return key, json.loads(text)
    except json.JSONDecodeError:
        return key, text


def round_line(row: dict[str, Any]) -> str:
    """One round's accuracy and judge figures."""
    line = (
        f"round {row['round']}: acc {row['global-acc-mean']:.3f} (min {row['global-acc-min']:.3f})"
    )
    if "generated-recognised-mean" in row:
        line += (
            f", recognised {row['generated-recognised-mean']:.3f} "
            f"[{row['generated-recognised-min']:.3f}, {row['generated-recognised-max']:.3f}]"
        )
    return line


def main(argv: list[str] | None = None) -> None:
    """Run once with the overrides; print one line per round."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="cmfl-tokens-"))
    # one thread in every message, whatever the machine's load (the app would choose by it)
    flat = {"output.dir": str(root), "output.progress": False, "backbone.threads": 1}
    flat |= {"federation.min-nodes": args.clients} | dict(map(parse_override, args.overrides))
    start = time.perf_counter()
    cfg = AppConfig.from_run_config(flat)
    run_dir = run_federation(LoopbackGrid(client_app, cfg, args.clients), cfg)
    for row in json.loads((run_dir / "rounds.json").read_text()):
        print(round_line(row))
    print(f"{time.perf_counter() - start:.0f} s, run directory {run_dir}")


if __name__ == "__main__":
    main()
