"""Can one hostile client wreck the relay? Attacks with the defences off and on, same seeds.

``python -m benchmarks.robustness`` runs, offline and in process (the real ServerApp strategy
and ClientApp code through :class:`~benchmarks.loopback.LoopbackGrid`), two settings:

* ``default``: the app's defaults (``tiny`` backbone, digits, Dirichlet 0.1), 4 clients, 4
  rounds;
* ``P1``: the method benchmark's P1 (``tiny-fewshot``, 10 clients with 2 classes each, 10
  rounds, the relay's tuned setting, which is the app's default; :mod:`benchmarks.method`).

``--hostile 2,3`` runs every attack with 2 and with 3 hostile clients (default 1).

A hostile client runs the honest client routine and then changes its reply (:data:`ATTACKS`):

* ``label-flip``: every class's vectors sent under the next class's id (``c -> c + 1 mod C``);
* ``targeted-flip``: its first class's vectors sent under the next class's id, the rest honest;
* ``huge-norm``: its vectors times 1e30 (finite in float32);
* ``noise``: random vectors with the honest vectors' per-token norms (within the norm bound);
* ``claimed-partition``: its replies claim honest partition 0's id;
* ``set-flip`` (with ``tokens.clusters`` >= 2, ``--set tokens.clusters=K``): its classes' own
  vectors honest, each cluster set sent under the next of its classes, so that only the images
  drawn from the sets show the wrong class (without cluster sets the reply is unchanged, and the
  default ``--attacks`` leave it out);
* ``silent``: it sends no vectors at all. Not an attack but its ceiling: what the honest
  clients keep when the hostile clients' lies cost nothing beyond the knowledge only they hold,
  the best any defence can do.

The hostile clients are the last ``k`` partitions. Each attack runs with the defences off
(``screening.enabled = false``, no quarantine, no norm bound, no generation from names for
lacking classes nobody covers: the relay before them) and on
(the app's defaults), and a run without attackers gives the reference, both ways. For every run
it reports the honest clients' mean global-test accuracy after the last round, the honest sets
screened out (false positives: of the sets honest senders' vectors made at honest receivers),
the attackers' sets that trained an honest receiver, the refused replies, the quarantines, and
the share of an honest client's round that screening took. ``--out`` keeps the run directories;
results go to ``benchmarks/results/robustness.json`` under ``--tag`` (default: the setting's
name) with the command, commit and settings, and the chart to ``docs/robustness.png``;
``--show`` prints the stored tables and redraws the chart without running.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from flwr.app import Context, Message

from benchmarks import commit, versions
from benchmarks.loopback import LoopbackGrid
from benchmarks.method import CLIENTS as P1_CLIENTS
from benchmarks.method import ROUNDS as P1_ROUNDS
from benchmarks.method import config as p1_config
from client_app import app as client_app
from cmfl_flower.aliases import Arrays
from cmfl_flower.config import AppConfig
from cmfl_flower.methods.base import ARRAYS_KEY, METRICS_KEY, from_record, to_record
from cmfl_flower.paths import output_root
from cmfl_flower.server.rounds import run_federation

RESULTS = Path(__file__).resolve().parent / "results" / "robustness.json"
CHART = Path(__file__).resolve().parents[1] / "docs" / "robustness.png"
FIRST_NODE = 1000  # LoopbackGrid's first node id
DEFENCES_OFF = {
    "screening.enabled": False,
    "screening.quarantine-rounds": 0,
    "tokens.max-norm-ratio": 1e38,
    "generation.uncovered": "none",
}
SETTINGS: dict[str, dict[str, Any]] = {
    "default": {"clients": 4, "rounds": 4},
    "P1": {"clients": P1_CLIENTS, "rounds": P1_ROUNDS},
}


def _relabelled(arrays: Arrays, new_class: Callable[[int, int], int]) -> Arrays:
    """A reply whose index row ``i`` of class ``c`` names class ``new_class(i, c)`` instead."""
    index = arrays["index"].copy()  # (E, 2): class id, n_tokens
    index[:, 0] = [new_class(i, int(c)) for i, c in enumerate(index[:, 0])]
    return arrays | {"index": index}


def _set_flip(arrays: Arrays) -> Arrays:
    """A reply whose cluster sets name the next of the client's classes; set 0 unchanged."""
    if "sets" not in arrays:
        return arrays
    index, sets = arrays["index"].copy(), arrays["sets"]  # (E, 2), (E,)
    own = sorted({int(c) for c, n in zip(index[:, 0], sets, strict=True) if n == 0})
    following = {c: own[(i + 1) % len(own)] for i, c in enumerate(own)}
    index[sets > 0, 0] = [following[int(c)] for c in index[sets > 0, 0]]
    return arrays | {"index": index}


def noise_like(vectors: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(R, D) random vectors with the per-row norms of ``vectors`` (R, D)."""
    noise = rng.standard_normal(vectors.shape).astype(np.float32)
    noise *= np.linalg.norm(vectors, axis=1, keepdims=True) / np.linalg.norm(noise, axis=1)[:, None]
    return noise


def _noise(arrays: Arrays) -> Arrays:
    noise = noise_like(arrays["vectors"], np.random.default_rng(0))  # (R, D)
    return arrays | {"vectors": noise}


def attack(name: str, num_classes: int) -> Callable[[Arrays], Arrays]:
    """What attack ``name`` does to a hostile client's reply arrays."""
    if name == "label-flip":
        return lambda a: _relabelled(a, lambda i, c: (c + 1) % num_classes)
    if name == "targeted-flip":

        def targeted(arrays: Arrays) -> Arrays:
            index = arrays["index"]
            first, target = int(index[0, 0]), (int(index[0, 0]) + 1) % num_classes
            keep = [i for i, c in enumerate(index[:, 0]) if i == 0 or c != target]
            counts = index[:, 1]
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
            rows = np.concatenate([np.arange(starts[i], starts[i] + counts[i]) for i in keep])
            out = {"vectors": arrays["vectors"][rows], "index": index[keep].copy()}
            out["index"][0, 0] = target if first != target else first
            if "sets" in arrays:  # the sets of the first class follow it to the target
                out["sets"] = arrays["sets"][keep]
                out["index"][out["sets"] > 0, 0] = [
                    target if c == first else c for c in out["index"][out["sets"] > 0, 0]
                ]
            return out

        return targeted
    if name == "huge-norm":
        return lambda a: a | {"vectors": a["vectors"] * np.float32(1e30)}
    if name == "noise":
        return _noise
    if name == "claimed-partition":
        return lambda a: a
    if name == "silent":
        return lambda a: {}
    if name == "set-flip":
        return _set_flip
    raise ValueError(f"unknown attack {name!r}; choose from {', '.join(ATTACKS)}")


ATTACKS = (
    "label-flip",
    "targeted-flip",
    "huge-norm",
    "noise",
    "claimed-partition",
    "silent",
    "set-flip",
)
DEFAULT_ATTACKS = ATTACKS[:-1]  # set-flip changes nothing unless tokens.clusters >= 2


def hostile_app(name: str, num_classes: int) -> Callable[[Message, Context], Message]:
    """A ClientApp that runs the honest routine, then attacks with its reply."""
    change = attack(name, num_classes)

    def app(message: Message, context: Context) -> Message:
        reply = client_app(message, context)
        if reply.has_error():
            return reply
        content = reply.content
        if name == "claimed-partition":
            content.metric_records[METRICS_KEY]["partition-id"] = 0
        elif ARRAYS_KEY in content.array_records:
            arrays = from_record(content.array_records[ARRAYS_KEY])
            content[ARRAYS_KEY] = to_record(change(arrays))
        return reply

    return app


def run_config(setting: str, seed: int, root: Path, name: str, extra: dict[str, Any]) -> AppConfig:
    """The setting's configuration for one run."""
    threads = {"backbone.threads": torch.get_num_threads()}
    if setting == "P1":
        return p1_config("P1", seed, root, name, {"method": "cmfl-relay"} | threads | extra)
    spec = SETTINGS[setting]
    return AppConfig.from_run_config(
        {
            "seed": seed,
            "data.seed": seed,
            "data.dir": str(root / "data"),
            "federation.rounds": spec["rounds"],
            "federation.min-nodes": spec["clients"],
            "output.dir": str(root / "runs"),
            "output.run-name": name,
            "output.progress": False,
        }
        | threads
        | extra
    )


def run_one(
    setting: str,
    attack_name: str | None,
    hostile: int,
    defended: bool,
    seed: int,
    root: Path,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One federation; the figures of :func:`figures`, and ``failed`` (why) if it stopped.

    A run stops (``RuntimeError``) when a round keeps fewer than ``federation.min-replies``
    replies: what it recorded until then is scored, and the honest accuracy is NaN.
    ``overrides``: run-config keys set in every run (``--set``), after the defences' switches.
    """
    clients = SETTINGS[setting]["clients"]
    name = f"{setting}-{attack_name or 'none'}-k{hostile}-{'on' if defended else 'off'}-s{seed}"
    switches = {} if defended else DEFENCES_OFF
    cfg = run_config(setting, seed, root, name, switches | (overrides or {}))
    grid = LoopbackGrid(client_app, cfg, clients)
    attackers = list(range(clients - hostile, clients)) if attack_name else []
    num_classes = 10  # digits
    for pid in attackers:
        grid.overrides[FIRST_NODE + pid] = hostile_app(attack_name or "", num_classes)
    start = time.perf_counter()
    failed = {}
    try:
        run_federation(grid, cfg)
    except RuntimeError as err:
        failed = {"failed": str(err)}
    run_dir = output_root(cfg.output) / name
    out = figures(run_dir, set(range(clients)) - set(attackers), set(attackers), bool(failed))
    return out | failed | {"run": name, "seconds": time.perf_counter() - start}


def figures(
    run_dir: Path, honest: set[int], attackers: set[int], failed: bool = False
) -> dict[str, Any]:
    """Honest accuracy, false positives, attackers' sets through, refusals, screening time.

    ``failed``: the run stopped early, so it has no last-round accuracy.
    """
    rows = json.loads((run_dir / "clients.json").read_text())
    rounds = json.loads((run_dir / "rounds.json").read_text())
    last = -1 if failed else max(row["round"] for row in rows)
    mine = [r for r in rows if r.get("partition-id") in honest and "refused" not in r]
    final = {
        str(r["partition-id"]): r["global-acc"]
        for r in mine
        if r["round"] == last and "global-acc" in r
    }

    def total(prefix: str, senders: set[int]) -> int:
        return int(sum(r.get(f"{prefix}-s{s}", 0) for r in mine for s in senders))

    honest_sets = total("kept", honest) + total("rejected", honest)
    phases = [sum(v for k, v in r.items() if k.startswith("seconds-")) for r in mine]
    screening = [r.get("seconds-screening", 0.0) for r in mine]
    return {
        "honest-acc": float(np.mean(list(final.values()))) if final else float("nan"),
        "honest-acc-min": float(min(final.values())) if final else float("nan"),
        "final-acc": final,  # partition id -> its global-test accuracy after the last round
        "honest-sets": honest_sets,
        "honest-screened-out": total("rejected", honest),
        "attacker-sets-through": total("kept", attackers),
        "attacker-sets-screened-out": total("rejected", attackers),
        "refused": int(sum(r.get("refused", 0) for r in rounds)),
        "refusal-kinds": sorted({k for r in rounds for k in r if k.startswith("refused-")}),
        "quarantined": [r.get("quarantined", "") for r in rounds],
        "screening-share": float(np.sum(screening) / np.sum(phases)) if phases else 0.0,
        "accepted-share": [r.get("accepted-share") for r in rounds],
    }


def reference(results: list[dict[str, Any]], run: dict[str, Any]) -> float:
    """The run without attackers' mean accuracy over ``run``'s honest clients.

    Same setting, seed and defences (on or off) as ``run``.
    """
    if not run["final-acc"]:  # the run stopped early
        return float("nan")
    for other in results:
        same = other["setting"] == run["setting"] and other["seed"] == run["seed"]
        if same and other["attack"] is None and other["defended"] == run["defended"]:
            return float(np.mean([other["final-acc"][pid] for pid in run["final-acc"]]))
    return float("nan")


def table(results: list[dict[str, Any]]) -> str:
    """Markdown: one row per (setting, attack, hostile, defences)."""
    lines = [
        "| setting | seed | attack | hostile | defences | honest acc | vs no attack | honest sets "
        "screened out | attacker sets through | refused | screening share |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        ref = reference(results, r)
        fp = f"{r['honest-screened-out']}/{r['honest-sets']}"
        acc, delta = f"{r['honest-acc']:.3f}", f"{100 * (r['honest-acc'] - ref):+.1f} pt"
        if "failed" in r:
            acc, delta = "run failed", r["failed"].split(":")[0]  # "round N"
        lines.append(
            f"| {r['setting']} | {r['seed']} | {r['attack'] or 'none'} | {r['hostile']} | "
            f"{'on' if r['defended'] else 'off'} | {acc} | {delta} | {fp} | "
            f"{r['attacker-sets-through']} | "
            f"{r['refused']} | {100 * r['screening-share']:.1f} % |"
        )
    return "\n".join(lines)


def drawn(stored: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Per setting, the seed-0 runs the chart draws: those of every record of the app's defaults.

    The defences off and on may come from two records; records with ``--set`` overrides (a
    baseline under the same hostile clients, a lever switched off) and records a later one
    replaced (``superseded-by``, kept for the page's history) are in the tables only.
    """
    by_setting: dict[str, list[dict[str, Any]]] = {}
    for key in sorted(stored):
        if stored[key].get("overrides") or stored[key].get("superseded-by"):
            continue
        for r in stored[key]["results"]:
            if r["seed"] == 0:
                by_setting.setdefault(r["setting"], []).append(r)
    return by_setting


def draw(stored: dict[str, Any], path: Path) -> None:
    """One panel per setting with attacks: honest accuracy per attack, defences off and on."""
    by_setting = drawn(stored)
    keys = [key for key in sorted(by_setting) if any(r["attack"] for r in by_setting[key])]
    if not keys:  # runs without attackers only: nothing to draw
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        results = by_setting[key]
        attacks = sorted(
            {(r["attack"], r["hostile"]) for r in results if r["attack"]},
            key=lambda a: (a[1], ATTACKS.index(a[0])),
        )
        for offset, (defended, colour) in enumerate(((False, "0.6"), (True, "tab:blue"))):
            bars = {
                (r["attack"], r["hostile"]): r["honest-acc"]
                for r in results
                if r["defended"] == defended
            }
            xs = [i + (offset - 0.5) * 0.38 for i, a in enumerate(attacks) if a in bars]
            heights = [bars[a] for a in attacks if a in bars]
            label = "defences on (defaults)" if defended else "defences off"
            ax.bar(xs, np.nan_to_num(heights), 0.36, color=colour, label=label)
            for x, height in zip(xs, heights, strict=True):
                if np.isnan(height):  # the run stopped: too few replies were usable
                    ax.text(
                        x, 0.02, "run failed", rotation=90, ha="center", va="bottom", fontsize=7
                    )
        none = [r for r in results if r["attack"] is None and r["defended"]]
        if none:
            ax.axhline(none[0]["honest-acc"], color="black", ls="--", lw=1, label="no attacker")
        ax.set_xticks(range(len(attacks)), [f"{a}\n{k} hostile" for a, k in attacks], fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_ylabel("honest clients' global accuracy")
        ax.set_title(f"{key}: last round, seed 0")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def show(path: Path, chart: Path) -> None:
    """Print the stored tables and redraw the chart, without running."""
    stored = json.loads(path.read_text())
    for key, record in sorted(stored.items()):
        print(f"### {key}\n\n`{record['command']}` at {record['commit']}\n")
        print(table(record["results"]) + "\n")
    draw(stored, chart)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs (VALUE in TOML) as run-config entries; a bad pair fails naming it."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        try:
            if not sep or not key.strip():
                raise ValueError("expected KEY=VALUE")
            out[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except (ValueError, tomllib.TOMLDecodeError) as err:
            raise SystemExit(f"--set {pair!r}: {err}") from err
    AppConfig.from_run_config(out)  # an unknown key or a bad value fails before any run
    return out


def main(argv: list[str] | None = None) -> None:
    """Run the chosen settings and attacks, print the table, write the results file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="default")
    parser.add_argument("--attacks", default=",".join(DEFAULT_ATTACKS), help="comma-separated")
    parser.add_argument(
        "--hostile", default="1", help="hostile clients (the last ids); comma-separated counts"
    )
    parser.add_argument("--tag", default="", help="key of the stored record (default: setting)")
    parser.add_argument("--seeds", type=int, default=1, help="how many seeds")
    parser.add_argument("--first-seed", type=int, default=0, help="the first of the seeds")
    parser.add_argument("--defences", choices=("both", "on", "off"), default="both")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (pinned)")
    parser.add_argument("--out", type=Path, default=None, help="keep run directories here")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--chart", type=Path, default=CHART)
    parser.add_argument("--show", action="store_true", help="print stored tables, redraw chart")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a run-config key for every run, as a TOML value (repeatable)",
    )
    args = parser.parse_args(argv)
    if args.show:
        show(args.results, args.chart)
        return
    torch.set_num_threads(args.threads)
    code = commit()  # the code that runs: later edits to the checkout do not change it
    attacks = [a for a in args.attacks.split(",") if a]
    for name in attacks:
        attack(name, 10)  # unknown names fail before any run
    overrides = parse_overrides(args.set)
    modes = {"both": (False, True), "on": (True,), "off": (False,)}[args.defences]
    root = args.out or Path(tempfile.mkdtemp(prefix="robustness-"))
    counts = [int(k) for k in args.hostile.split(",")]
    runs = [(None, 0)] + [(name, k) for k in counts for name in attacks]
    results = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for (attack_name, hostile), defended in itertools.product(runs, modes):
            if attack_name == "claimed-partition" and not defended:
                continue  # identity binding has no off switch
            out = run_one(args.setting, attack_name, hostile, defended, seed, root, overrides)
            where = {"setting": args.setting, "attack": attack_name, "hostile": hostile}
            results.append(where | {"defended": defended, "seed": seed} | out)
            print(json.dumps(results[-1]), flush=True)
    print(table(results))
    record = {
        "command": "python -m benchmarks.robustness "
        + shlex.join(sys.argv[1:] if argv is None else argv),
        "commit": code,
        "versions": versions(),
        "threads": args.threads,
        "settings": SETTINGS[args.setting],
        "overrides": overrides,
        "results": results,
    }
    stored = json.loads(args.results.read_text()) if args.results.exists() else {}
    stored[args.tag or args.setting] = record
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(stored, indent=1) + "\n")
    draw(stored, args.chart)


if __name__ == "__main__":
    main()
