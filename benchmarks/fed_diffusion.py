"""Federated diffusion against the paper: convergence, the C and E sweeps, a LoRA that adapts.

``python -m benchmarks.fed_diffusion`` runs three parts on the offline digits, every federated
run through the real strategy and ClientApp code (in process, :class:`LoopbackGrid`), two jobs
at a time in worker processes pinned to one torch thread each:

* **convergence**: the tiny pixel DDPM trained by FedAvg (``diffusion-unet``; C = 4 clients on
  an iid split, all sampled every round, E = 4 local AdamW steps of batch 16, each client's
  optimiser state kept from round to round, cosine learning rate over the rounds) and trained
  centrally on the pooled images of the same 4 clients, from the same seeded initialisation,
  with C x E steps per round-equivalent at the same learning rate, both to the same large
  sample budget (``--rounds`` round-equivalents for the centralised arm, ``--fedavg-rounds``
  rounds for FedAvg, equal by default): FedAvg takes a quarter of the optimiser steps per
  sample (each round averages four 4-step drifts from one start), so it needs a budget far
  beyond where the centralised arm is nearly done. Both are rendered with the same seeds
  (DDIM) and measured by the same Fréchet distance in the tiny CLIP's image features to the
  digits test split at ``--checkpoints`` evenly spaced rounds. The figure at
  convergence is the mean over an arm's last :data:`PLATEAU` checkpoints (one 200-sample FD is
  noisy); the table also says whether each arm was still improving.
* **sweep**: the paper's Figures 2 and 3 as a table: the ``conf/fedavg-diffusion-*.toml``
  experiments as they are (8 clients, C in {2, 4, 8} sampled per round at E = 2, E in
  {1, 2, 4} at C = 4), with ``--sweep-rounds`` rounds and the benchmark's learning rate; FD
  after the last round and bytes on the wire per round. Each round's clients are drawn with
  the run's seed, so a row repeats; ``--sweep-seeds K`` runs each experiment with seeds 0 to
  K - 1 (initialisation, split and draws) and gives the mean FD and its range.
* **lora**: clients whose images the tiny text-to-image pipeline never saw (``--style``: the
  digits turned a quarter turn, or with their intensities inverted), ``diffusion-lora`` over 4
  clients. FD to the clients' (styled) test images of the base pipeline and of the federated
  LoRA.

``--parts`` picks some of the three (the results file then holds only theirs). It prints
the tables and writes ``benchmarks/results/fed_diffusion.json``,
``docs/fed-diffusion.png`` (FD against samples seen, both arms) and the LoRA's sample grids
before and after (``docs/fed-lora-base.png``, ``docs/fed-lora-tuned.png``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import tempfile
import time
import tomllib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image

from benchmarks import ROOT, pinned_worker, settings_record, stored_results
from benchmarks.loopback import LoopbackGrid
from client_app import app as client_app
from cmfl_flower.client.workspace import data_dir
from cmfl_flower.config import AppConfig
from cmfl_flower.data import PartitionSpec, load_partition, load_source
from cmfl_flower.data.store import prepare_partitions
from cmfl_flower.fed_diffusion import LocalData, round_lr, train_steps
from cmfl_flower.fed_diffusion_models import build_ddpm_unet, ddpm_unet_name, module_arrays
from cmfl_flower.fed_diffusion_server import DiffusionPublisher, measured
from cmfl_flower.report.run import latest_server_samples
from cmfl_flower.server.rounds import run_federation

SEED = 0
PARTS = ("convergence", "sweep", "lora")
STORED = {  # the results files docs/fed-diffusion.md shows, and the parts it shows of each
    ROOT / "benchmarks/results/fed_diffusion.json": PARTS,
    ROOT / "benchmarks/results/fed_diffusion-2x.json": ("convergence",),
    ROOT / "benchmarks/results/fed_diffusion-sweep3.json": ("sweep",),
}
BATCH = 16
CONVERGENCE_C, CONVERGENCE_E = 4, 4
PLATEAU = 3  # checkpoints averaged for the FD at convergence
# The paper's sweeps as the conf/ experiments run them: C of 8 clients sampled per round at
# E = 2, and E at C = 4 (fedavg-diffusion-e2 is the same setup as -c4, so it is run once).
SWEEP = [f"fedavg-diffusion-{s}" for s in ("c2", "c4", "c8", "e1", "e4")]
SWEEP_NODES = 8
LORA_CLIENTS = 4
PARTS = ("convergence", "sweep", "lora")


@dataclass(frozen=True)
class Job:
    """One training run of the benchmark: ``settings`` are its run-config entries."""

    kind: str  # "fedavg", "centralised" or "lora"
    part: str  # a name in PARTS
    name: str
    nodes: int
    settings: dict[str, Any] = field(default_factory=dict)
    style: str = ""  # lora: the clients' style (a key of STYLES)


def ddpm_config(job: Job, root: Path) -> AppConfig:
    """The run config of a pixel-DDPM job (the centralised arm reads the same one)."""
    return AppConfig.from_run_config(
        {
            "method": "diffusion-unet",
            "seed": SEED,
            "data.partitioner": "iid",
            "data.dir": str(root / "data"),
            "federation.min-nodes": job.nodes,
            "diffusion.batch-size": BATCH,
            "diffusion.lr-schedule": "cosine",
            "backbone.threads": torch.get_num_threads(),  # the worker's, not re-measured
            "output.dir": str(root / "runs"),
            "output.run-name": job.name,
        }
        | job.settings
    )


def per_round(cfg: AppConfig, nodes: int) -> tuple[int, int]:
    """(clients sampled per round C, training samples seen per round C x E x batch)."""
    sampled = max(1, round(cfg.federation.fraction * nodes))
    return sampled, sampled * cfg.diffusion.local_steps * cfg.diffusion.batch_size


def _curve(rounds: list[dict[str, Any]], samples_per_round: int) -> list[list[float]]:
    """[samples seen, FD] of every measured round."""
    return [[r["round"] * samples_per_round, float(r["fd-clip"])] for r in rounds if "fd-clip" in r]


def fedavg(job: Job, root: Path) -> dict[str, Any]:
    """A FedAvg run: its FD curve and the bytes on the wire per round."""
    cfg = ddpm_config(job, root)
    run_dir = run_federation(LoopbackGrid(client_app, cfg, job.nodes), cfg)
    rounds = json.loads((run_dir / "rounds.json").read_text())
    sampled, samples = per_round(cfg, job.nodes)
    return {
        "C": sampled,
        "E": cfg.diffusion.local_steps,
        "rounds": cfg.federation.rounds,
        "curve": _curve(rounds, samples),
        "bytes_per_round": _wire(rounds),
        "model_bytes": int(rounds[-1]["model-bytes"]),
    }


def centralised(job: Job, root: Path) -> dict[str, Any]:
    """One model on the pooled client images, C x E steps per round-equivalent, one optimiser."""
    cfg = ddpm_config(job, root)
    directory = data_dir(cfg.data, job.nodes)
    pool = np.concatenate([load_partition(directory, i).train.images for i in range(job.nodes)])
    unet = build_ddpm_unet(ddpm_unet_name(cfg.diffusion, cfg.backbone.preset), cfg.seed)
    sampled, samples = per_round(cfg, job.nodes)
    d = cfg.diffusion.model_copy(update={"local_steps": sampled * cfg.diffusion.local_steps})
    publisher = DiffusionPublisher(cfg, root / "runs" / job.name, "ddpm")
    params, state, rounds, total = list(unet.parameters()), None, [], cfg.federation.rounds
    for server_round in range(1, total + 1):
        lr = round_lr(d, server_round, total)
        seed = cfg.seed * 1_000_003 + server_round
        data = LocalData(pool, None)
        _, state = train_steps(unet, params, data, d, seed, lr=lr, state=state)
        measure = measured(cfg, server_round)
        scores = publisher.publish_unet(server_round, module_arrays(unet), measure)
        rounds.append({"round": server_round} | scores)
    return {"curve": _curve(rounds, samples)}


STYLES = {
    "inverted": lambda image: 255 - image,  # dark strokes on white
    "rotated": lambda image: np.ascontiguousarray(np.rot90(image)),  # a quarter turn left
}


def styled_digits(root: Path, style: str) -> Path:
    """The digits as an image folder (``train/``, ``test/``) in ``style``."""
    folder = root / f"{style}-digits"
    if folder.is_dir():
        return folder
    tmp = root / f".{style}-digits.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for split in ("train", "test"):
        data = load_source("digits", split)
        for index, (image, label) in enumerate(zip(data.images, data.labels, strict=True)):
            target = tmp / split / data.class_names[int(label)] / f"{index:04d}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(STYLES[style](image)).save(target)
    tmp.rename(folder)
    return folder


def lora(job: Job, root: Path) -> dict[str, Any]:
    """The base pipeline's FD on the styled digits, then federated LoRA's; both grids."""
    cfg = AppConfig.from_run_config(
        {
            "method": "diffusion-lora",
            "seed": SEED,
            "data.dataset": "folder",
            "data.path": str(styled_digits(root, job.style)),
            "data.partitioner": "iid",
            "data.dir": str(root / f"data-{job.style}"),
            "backbone.threads": torch.get_num_threads(),
            "federation.min-nodes": job.nodes,
            "diffusion.batch-size": BATCH,
            "output.dir": str(root / "runs"),
            "output.run-name": job.name,
        }
        | job.settings
    )
    spec = PartitionSpec.from_settings(cfg.data, job.nodes)
    prepare_partitions(spec, Path(cfg.data.dir) / spec.slug())
    base_dir = root / "runs" / "lora-base"
    base = DiffusionPublisher(cfg, base_dir, "lora")
    base_fd = base.publish_adapter(0, base.initial_arrays())["fd-clip"]
    run_dir = run_federation(LoopbackGrid(client_app, cfg, job.nodes), cfg)
    rounds = json.loads((run_dir / "rounds.json").read_text())
    return {
        "base_fd": base_fd,
        "curve": _curve(rounds, per_round(cfg, job.nodes)[1]),
        "bytes_per_round": _wire(rounds),
        "model_bytes": int(rounds[-1]["model-bytes"]),
        "grids": [str(base_dir / "samples" / "round-0.png"), str(_latest_grid(run_dir))],
    }


def _latest_grid(run_dir: Path) -> Path:
    latest = latest_server_samples(run_dir)
    if latest is None:
        raise RuntimeError(f"{run_dir} holds no sample grid")
    return latest[1]


def _wire(rounds: list[dict[str, Any]]) -> float:
    """Mean bytes on the wire per round, both directions."""
    return float(np.mean([int(r["bytes-sent"]) + int(r["bytes-received"]) for r in rounds]))


def run_job(job: Job, root: Path) -> dict[str, Any]:
    """Run ``job`` and time it."""
    start = time.perf_counter()
    result = {"fedavg": fedavg, "centralised": centralised, "lora": lora}[job.kind](job, root)
    return result | {"seconds": time.perf_counter() - start}


def training_samples(job: Job, root: Path) -> int:
    """Training samples the job draws in all (rounds x C x E x batch).

    Jobs start in this order, the longest first, so that the workers finish close together.
    """
    cfg = ddpm_config(job, root)
    return cfg.federation.rounds * per_round(cfg, job.nodes)[1]


def run_all(jobs: list[Job], root: Path, workers: int, threads: int) -> list[dict[str, Any]]:
    """Run ``jobs`` in ``workers`` processes pinned to ``threads`` torch threads each.

    The results come back in the order of ``jobs``.
    """
    for job in jobs:  # prepare each partitioning once, before workers race for it
        if job.kind != "lora":
            data_dir(ddpm_config(job, root).data, job.nodes)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, context, pinned_worker, (threads,)) as pool:
        longest_first = sorted(range(len(jobs)), key=lambda i: -training_samples(jobs[i], root))
        futures = {i: pool.submit(run_job, jobs[i], root) for i in longest_first}
        return [futures[i].result() for i in range(len(jobs))]


def plateau(curve: list[list[float]]) -> tuple[float, float]:
    """An arm's FD at convergence and how much it still moved.

    (mean FD over the last :data:`PLATEAU` checkpoints, its change from the mean over the
    :data:`PLATEAU` before them as a fraction: negative while the arm is still improving)
    """
    fds = [c[1] for c in curve]
    last = float(np.mean(fds[-PLATEAU:]))
    before = float(np.mean(fds[-2 * PLATEAU : -PLATEAU]))
    return last, last / before - 1


def draw(fed: list[list[float]], central: list[list[float]], path: Path, title: str) -> None:
    """FD against training samples seen, both arms on one chart.

    Each arm's FD at convergence (the mean over its last :data:`PLATEAU` checkpoints) is a
    dashed line over those checkpoints.
    """
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for curve, label in ((central, "centralised"), (fed, "FedAvg C=4 E=4")):
        x = [c[0] for c in curve]
        (line,) = ax.plot(x, [c[1] for c in curve], "o-", label=label, markersize=3)
        level = plateau(curve)[0]
        ax.hlines(level, x[-PLATEAU], x[-1], colors=line.get_color(), linestyles="--")
        ax.annotate(f"{level:.1f}", (x[-1], level), textcoords="offset points", xytext=(4, -3),
                    fontsize=8, color=line.get_color())  # fmt: skip
    ax.set_xlabel("training samples seen")
    ax.set_ylabel("Fréchet distance (tiny CLIP features)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def sweep_table(rows: list[dict[str, Any]]) -> str:
    """The C/E table in markdown (FD: the mean, and its range over several seeds)."""
    seeds = len(rows[0]["fds"])
    fd_title = "FD" if seeds == 1 else f"FD: mean (range over {seeds} seeds)"
    lines = [
        "| experiment | C (clients per round) | E (local steps) | rounds | samples seen | "
        f"{fd_title} | bytes / round |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        fd = f"{r['fd']:.2f}"
        if seeds > 1:
            fd += f" ({min(r['fds']):.2f} to {max(r['fds']):.2f})"
        lines.append(
            f"| `conf/{r['conf']}.toml` | {r['C']} | {r['E']} | {r['rounds']} | "
            f"{r['samples']:,} | {fd} | {r['bytes_per_round'] / 1e6:.1f} MB |"
        )
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rounds", type=int, default=900, help="convergence: centralised round-equivalents"
    )
    parser.add_argument("--fedavg-rounds", type=int, default=900, help="convergence: FedAvg")
    parser.add_argument(
        "--checkpoints", type=int, default=12, help="convergence: FD checkpoints per arm"
    )
    parser.add_argument(
        "--parts", nargs="+", choices=PARTS, default=list(PARTS), help="the parts to run"
    )
    parser.add_argument("--sweep-rounds", type=int, default=100)
    parser.add_argument(
        "--sweep-seeds", type=int, default=1, help="sweep: runs per experiment, seeds 0, 1, ..."
    )
    parser.add_argument("--lora-rounds", type=int, default=40)
    parser.add_argument("--lr", type=float, default=2e-3, help="DDPM AdamW learning rate")
    parser.add_argument("--lora-lr", type=float, default=3e-3)
    parser.add_argument("--lora-steps", type=int, default=4, help="LoRA: local steps (E)")
    parser.add_argument("--style", choices=sorted(STYLES), default="rotated", help="LoRA")
    parser.add_argument("--eval-samples", type=int, default=200)
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/fed_diffusion.json")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs")
    parser.add_argument(
        "--show",
        type=Path,
        nargs="*",
        default=None,
        metavar="RESULTS",
        help="instead: print the tables of these results files (default: the stored ones)",
    )
    args = parser.parse_args(argv)
    for name in ("rounds", "fedavg_rounds"):
        if getattr(args, name) % args.checkpoints:
            parser.error(f"--{name.replace('_', '-')} must be a multiple of --checkpoints")
    if args.checkpoints < 2 * PLATEAU:
        parser.error(f"--checkpoints must be at least {2 * PLATEAU}")
    if args.sweep_seeds < 1:
        parser.error(f"--sweep-seeds must be at least 1, got {args.sweep_seeds}")
    return args


def sweep_settings(name: str) -> dict[str, Any]:
    """A ``conf/`` experiment's run-config entries."""
    return dict(tomllib.loads((ROOT / "conf" / f"{name}.toml").read_text()))


def sweep_name(conf: str, seed: int, seeds: int) -> str:
    """A sweep job's name: the experiment's, with the seed when there are several."""
    return conf if seeds == 1 else f"{conf}-seed{seed}"


def jobs_for(args: argparse.Namespace) -> list[Job]:
    """The jobs of the parts ``args`` names."""
    shared = {
        "diffusion.lr": args.lr,
        "diffusion.lr-schedule": "cosine",
        "diffusion.eval-samples": args.eval_samples,
        "diffusion.sample-steps": args.sample_steps,
    }

    def convergence(rounds: int) -> dict[str, Any]:
        return shared | {
            "federation.rounds": rounds,
            "diffusion.local-steps": CONVERGENCE_E,
            "diffusion.eval-every": rounds // args.checkpoints,
        }

    sweep_rounds = {
        "federation.rounds": args.sweep_rounds,
        "diffusion.eval-every": args.sweep_rounds,
    }
    lora_settings = {
        "federation.rounds": args.lora_rounds,
        "diffusion.lr": args.lora_lr,
        "diffusion.local-steps": args.lora_steps,
        "diffusion.eval-every": args.lora_rounds,
        "diffusion.eval-samples": args.eval_samples,
        "diffusion.sample-steps": args.sample_steps,
    }
    jobs = [
        Job(
            "fedavg", "convergence", "fedavg-c4-e4", CONVERGENCE_C, convergence(args.fedavg_rounds)
        ),
        Job("centralised", "convergence", "centralised", CONVERGENCE_C, convergence(args.rounds)),
        Job("lora", "lora", "lora", LORA_CLIENTS, lora_settings, args.style),
        *(
            Job(
                "fedavg",
                "sweep",
                sweep_name(conf, seed, args.sweep_seeds),
                SWEEP_NODES,
                sweep_settings(conf) | shared | sweep_rounds | {"seed": seed},
            )
            for conf in SWEEP
            for seed in range(args.sweep_seeds)
        ),
    ]
    return [job for job in jobs if job.part in args.parts]


def convergence_table(curves: dict[str, list[list[float]]]) -> str:
    """The convergence table of the ``fedavg`` and ``centralised`` curves, and their ratio."""
    lines = [
        f"| arm | samples seen | FD, mean of last {PLATEAU} checkpoints | change from the "
        f"{PLATEAU} before | last FD | best FD |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for label, key in (("centralised", "centralised"), ("FedAvg C=4 E=4", "fedavg")):
        curve = curves[key]
        fd, change = plateau(curve)
        lines.append(
            f"| {label} | {int(curve[-1][0]):,} | {fd:.2f} | {100 * change:+.0f} % | "
            f"{curve[-1][1]:.2f} | {min(c[1] for c in curve):.2f} |"
        )
    ratio = plateau(curves["fedavg"])[0] / plateau(curves["centralised"])[0]
    return "\n".join(lines) + f"\nratio FedAvg / centralised at convergence = {ratio:.3f}"


def convergence_report(fed: dict[str, Any], central: dict[str, Any], lr: float) -> dict[str, Any]:
    """Print the convergence table; return its part of the results file."""
    (fed_fd, fed_change), (central_fd, central_change) = (
        plateau(fed["curve"]),
        plateau(central["curve"]),
    )
    curves = {"fedavg": fed["curve"], "centralised": central["curve"]}
    print(f"convergence: tiny pixel DDPM, lr {lr:g} cosine over each arm's rounds")
    print(convergence_table(curves))
    return {
        "fedavg_fd": fed_fd,
        "centralised_fd": central_fd,
        "fedavg_centralised_ratio": fed_fd / central_fd,
        "plateau_checkpoints": PLATEAU,
        "plateau_change": {"fedavg": fed_change, "centralised": central_change},
        "curves": curves,
    }


def lora_line(style: str, base: float, tuned: float) -> str:
    """The LoRA part's one line: the base pipeline's FD and the tuned one's."""
    return (
        f"lora on {style} digits: base FD {base:.2f}, tuned FD {tuned:.2f} "
        f"({100 * (1 - tuned / base):.0f} % lower)"
    )


def show(files: dict[Path, tuple[str, ...]]) -> None:
    """Print the ``parts`` of stored results files, as the runs that wrote them printed them."""
    for path, parts in files.items():
        stored = stored_results(path)
        print(f"From `{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}`:")
        if "convergence" in parts and "curves" in stored:
            print(convergence_table(stored["curves"]))
        if "sweep" in parts and "sweep" in stored:
            print(sweep_table(stored["sweep"]))
        if "lora" in parts and "lora_fd_base" in stored:
            print(lora_line(stored["lora_style"], stored["lora_fd_base"], stored["lora_fd_tuned"]))


def sweep_rows(results: dict[str, dict[str, Any]], seeds: int) -> list[dict[str, Any]]:
    """One row per ``conf/`` experiment: FD after the last round, the mean over the seeds."""
    rows = []
    for conf in SWEEP:
        runs = [results[sweep_name(conf, seed, seeds)] for seed in range(seeds)]
        fds = [r["curve"][-1][1] for r in runs]
        first = runs[0]
        rows.append(
            {
                "conf": conf,
                "C": first["C"],
                "E": first["E"],
                "rounds": first["rounds"],
                "samples": int(first["curve"][-1][0]),
                "fd": float(np.mean(fds)),
                "fds": fds,
                "bytes_per_round": first["bytes_per_round"],
            }
        )
    return rows


def report(
    jobs: list[Job], results: list[dict[str, Any]], args: argparse.Namespace
) -> dict[str, Any]:
    """Print the figures of the parts that ran; return the results file's content."""
    by_name = {job.name: r for job, r in zip(jobs, results, strict=True)}
    out: dict[str, Any] = {}
    sizes: dict[str, float] = {}
    if "convergence" in args.parts:
        fed = by_name["fedavg-c4-e4"]
        out |= convergence_report(fed, by_name["centralised"], args.lr)
        sizes |= {"fedavg_per_round": fed["bytes_per_round"], "ddpm_model": fed["model_bytes"]}
    if "sweep" in args.parts:
        out["sweep"] = sweep_rows(by_name, args.sweep_seeds)
        print("\nsweep:\n" + sweep_table(out["sweep"]))
    if "lora" in args.parts:
        lora_result = by_name["lora"]
        base, tuned = lora_result["base_fd"], lora_result["curve"][-1][1]
        print("\n" + lora_line(args.style, base, tuned))
        out |= {
            "lora_style": args.style,
            "lora_fd_base": base,
            "lora_fd_tuned": tuned,
            "lora_curve": lora_result["curve"],
        }
        sizes |= {
            "lora_per_round": lora_result["bytes_per_round"],
            "lora_full_unet": lora_result["model_bytes"],
        }
    return out | {
        "bytes": sizes,
        "seconds": {job.name: r["seconds"] for job, r in zip(jobs, results, strict=True)},
        "settings": settings_record(args),
    }


def main(argv: list[str] | None = None) -> None:
    """Run the parts; print the tables; save the JSON, the chart and the grids."""
    args = parse(argv)
    if args.show is not None:
        show({path.resolve(): PARTS for path in args.show} if args.show else STORED)
        return
    jobs = jobs_for(args)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        results = run_all(jobs, Path(tmp), args.workers, args.threads)
        out = report(jobs, results, args)
        args.docs.mkdir(parents=True, exist_ok=True)
        if "lora" in args.parts:
            lora_job = next(i for i, job in enumerate(jobs) if job.kind == "lora")
            for source, name in zip(results[lora_job]["grids"], ("base", "tuned"), strict=True):
                shutil.copy(source, args.docs / f"fed-lora-{name}.png")
    out["wall_seconds"] = time.perf_counter() - start
    print(
        f"\nwall time {out['wall_seconds'] / 60:.1f} min "
        f"({args.workers} workers x {args.threads} torch thread)"
    )
    if "convergence" in args.parts:
        title = (
            f"tiny pixel DDPM, digits, iid, same seeds; lr {args.lr:g} cosine; "
            f"FD of {args.eval_samples} DDIM-{args.sample_steps} samples"
        )
        curves = out["curves"]
        draw(curves["fedavg"], curves["centralised"], args.docs / "fed-diffusion.png", title)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
