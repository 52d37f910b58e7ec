"""Are the relay's defaults the best on validation? Each default against its alternatives.

Some of the app's defaults (``encoder.distill``, ``encoder.distill-on``, the relay cap, the token
settings) were once chosen by global-test accuracy. ``python -m benchmarks.method_defaults
--check encoder.distill=0,0.5,1`` runs the method benchmark's ``cmfl-relay`` arm of
``--protocol`` (P1 by default) with its tuned setting (``--tuning``, the stored
``method-details.json``) for the full ``ROUNDS`` with a pooled validation split held out of
training (:data:`benchmarks.method.VALIDATION`), once per value and seed, and prints the mean
validation accuracy of each value. The global test set chooses nothing: no test figure is
printed or kept. A default stays unless another value beats it on validation by more than the
seeds' spread (the larger of the two values' max - min); with one seed the spread is unknown
and any lead counts. The rule is deliberately unpaired: each seed also draws its own data split,
and a default should hold across the splits users bring, so a lead must exceed the variation
between splits, not only be consistent on the splits measured (a paired rule would move
``generation.held-classes`` in P2 on a lead of 0.14 point, about one validation image).
``--check`` takes several keys. Results go to ``benchmarks/results/method-defaults.json`` (per
protocol and key: the default, each value's per-seed validation accuracy, the verdict, command,
commit and date); ``--show`` prints them.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import command, commit, stored_results, versions
from benchmarks.method import (
    PROTOCOLS,
    RESULTS,
    ROUNDS,
    VALIDATION,
    Job,
    check_fresh,
    reused_settings,
    run_all,
)
from benchmarks.tokens import parse_override
from cmfl_flower.config import AppConfig

ARM = "cmfl-relay"
FILE = "method-defaults.json"


def parse_check(item: str) -> tuple[str, list[Any]]:
    """``KEY=V1,V2,...`` as the key and its values (each read as JSON when it parses)."""
    key, sep, text = item.partition("=")
    if not sep or not text:
        raise SystemExit(f"--check: expected KEY=V1,V2,..., got {item!r}")
    if key not in AppConfig.from_run_config({}).to_run_config():
        raise SystemExit(f"--check: unknown run-config key {key!r}")
    values = [parse_override(f"{key}={value}")[1] for value in text.split(",")]
    try:  # each value as the config reads it (1 -> 1.0 for a float key): the default matches
        read = [AppConfig.from_run_config({key: v}).to_run_config()[key] for v in values]
    except ValueError as err:
        raise SystemExit(f"--check {key}: {err}") from err
    if len({json.dumps(value) for value in read}) < len(read):
        raise SystemExit(f"--check {key}: a value is named twice ({text})")
    return key, read


def jobs(
    protocol: str, key: str, values: list[Any], seeds: int, fixed: dict[str, Any]
) -> list[Job]:
    """One validation run of the relay per value and seed, the full number of rounds.

    A key's default value is the run with no override, the same :class:`Job` for every key,
    so checking several keys runs the default once per seed.
    """
    default = AppConfig.from_run_config({}).to_run_config()[key]
    return [
        Job(ARM, protocol, seed, tuple((fixed | VALIDATION).items()), "-default")
        if value == default
        else Job(
            ARM, protocol, seed, tuple((fixed | {key: value} | VALIDATION).items()), f"-{key}-{i}"
        )
        for i, value in enumerate(values)
        for seed in range(seeds)
    ]


def _means(scores: dict[str, list[float]]) -> dict[str, float]:
    """Each value's mean validation accuracy over its seeds."""
    return {value: float(np.mean(vals)) for value, vals in scores.items()}


def verdict(default: Any, scores: dict[str, list[float]]) -> dict[str, Any]:
    """The best value on validation, and whether it displaces the default (see the module)."""
    means = _means(scores)
    best = max(means, key=lambda value: means[value])
    here = json.dumps(default)
    spread = max(max(scores[v]) - min(scores[v]) for v in (best, here)) if here in scores else 0.0
    lead = means[best] - means.get(here, float("-inf"))
    change = best != here and lead > spread
    return {"best": best, "lead": lead, "spread": spread, "change": change}


def render(protocol: str, key: str, entry: dict[str, Any]) -> list[str]:
    """A key's table and verdict line, as a run prints them."""
    lines = [
        f"**{protocol}, {key}** (mean validation accuracy of {ARM} after round {ROUNDS})",
        "",
        "| value | seeds | validation | min | max |",
        "| --- | --- | --- | --- | --- |",
    ]
    for value, vals in entry["validation"].items():
        mark = " (default)" if value == json.dumps(entry["default"]) else ""
        lines.append(
            f"| {value}{mark} | {len(vals)} | {np.mean(vals):.3f} | {min(vals):.3f} | "
            f"{max(vals):.3f} |"
        )
    result = entry["verdict"]
    action = f"change the default to {result['best']}" if result["change"] else "keep the default"
    spread = f"seeds' spread {100 * result['spread']:.1f}"
    return [
        *lines,
        "",
        f"- {_standing(entry)} ({spread}): {action}",
        f"- `{entry['command']}` at {entry['commit'][:12]} on {entry['date']}",
    ]


def _standing(entry: dict[str, Any]) -> str:
    """How the best value on validation stands against the default, or the default's lead."""
    best, here = entry["verdict"]["best"], json.dumps(entry["default"])
    if best != here:
        lead = 100 * entry["verdict"]["lead"]
        return f"best on validation {best}, {lead:+.1f} points over the default"
    means = _means(entry["validation"])
    runner = max((v for v in means if v != here), key=lambda v: means[v])
    lead = 100 * (means[here] - means[runner])
    return f"the default is best on validation, {lead:.1f} points over {runner}"


def show(path: Path) -> None:
    """Print every stored key's table and verdict."""
    for protocol, keys in stored_results(path).items():
        for key, entry in keys.items():
            print("\n".join(render(protocol, key, entry)) + "\n")


def main(argv: list[str] | None = None) -> None:
    """Run every ``--check`` key's values on validation; print and keep the verdicts."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default="P1")
    parser.add_argument("--check", nargs="+", default=[], metavar="KEY=V1,V2,...")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--tuning", type=Path, default=RESULTS / "method-details.json")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel (processes)")
    parser.add_argument("--out", type=Path, default=None, help="keep run directories here")
    parser.add_argument("--results", type=Path, default=RESULTS / FILE)
    parser.add_argument("--show", action="store_true", help="instead: print what --results holds")
    args = parser.parse_args(argv)
    if args.show:
        show(args.results)
        return
    if not args.check:
        parser.error("--check: name at least one KEY=V1,V2,...")
    checks = dict(map(parse_check, args.check))
    code, fixed = commit(), reused_settings(args.tuning, args.protocol, (ARM,))[ARM]
    torch.set_num_threads(args.threads)
    root = args.out or Path(tempfile.mkdtemp(prefix="cmfl-defaults-"))
    defaults = AppConfig.from_run_config({}).to_run_config()
    stored = json.loads(args.results.read_text()) if args.results.is_file() else {}
    planned = {
        key: jobs(args.protocol, key, values, args.seeds, fixed) for key, values in checks.items()
    }
    check_fresh([job for runs in planned.values() for job in runs], root)
    done: dict[Job, float] = {}  # validation accuracy of each run so far (the default's is shared)
    for key, values in checks.items():
        todo = [job for job in planned[key] if job not in done]  # a key's own jobs differ
        ran = run_all(todo, root, args.workers, args.threads)
        done |= {job: float(r["val"]) for job, r in zip(todo, ran, strict=True)}
        results = iter(done[job] for job in planned[key])
        scores = {json.dumps(v): [next(results) for _ in range(args.seeds)] for v in values}
        entry = {"default": defaults[key], "validation": scores, "tuned": fixed}
        entry |= {"verdict": verdict(defaults[key], scores), "command": command()}
        entry |= {"commit": code, "versions": versions(), "date": time.strftime("%Y-%m-%d")}
        print("\n".join(render(args.protocol, key, entry)) + "\n", flush=True)
        stored.setdefault(args.protocol, {})[key] = entry
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(stored, indent=2) + "\n")  # each key as it ends


if __name__ == "__main__":
    main()
