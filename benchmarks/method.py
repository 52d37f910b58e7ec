"""Does relaying class tokens help? The method against honest baselines, where there is room.

``python -m benchmarks.method`` runs, offline, on the ``tiny-fewshot`` backbone (the tiny text
tower and generator with a vision tower pretrained on 2 public images per class, so zero-shot
accuracy leaves room below the centralised one), three protocols:

* ``P1``: pathological partitioning, 2 classes per client, 10 clients;
* ``P2``: Dirichlet alpha = 0.1, 10 clients;
* ``P3``: P1's data with opaque class ids (``data.class-names = "opaque"``): names carry no
  meaning, so only relayed tokens can tell a client what a class it lacks looks like.

Every protocol runs 10 rounds with every client every round, for each seed (the split and the
training), and these arms, side by side: ``zero-shot``, ``centralised`` (the vision LoRA on
pooled client data), ``centralised-tokens`` (the pooled data as one client that learns its
class tokens and the vision LoRA together: the ceiling where names mean nothing, P3),
``local-only``, ``local-only-tokens``, ``names-generation``, ``fedavg-encoder``,
``cmfl-relay``, ``cmfl-relay-lacking-only`` (the relay generating only for the classes a client
lacks, ``generation.held-classes = false``) and ``cmfl-relay-no-generation``. Two more run only
when ``--arms`` names them: ``cmfl-relay-no-cap`` (every sender's vectors relayed) measures
what the cap costs, and ``fedprox-encoder`` (mu 0.01) equalled ``fedavg-encoder`` to five
decimals on every P1 seed, while a grid over mu would give it a larger tuning budget than any
other arm. Every generating arm draws the same :data:`BUDGET` of images per client per round
(``generation.images-per-round``), spread over its requests. Federated arms go through the
real ServerApp strategies and ClientApp code, in process.

Tuning: every trained arm gets the same budget: each setting of :data:`TUNING_GRID` (encoder
learning rate and epochs) is run once, with seed 0, for :data:`TUNE_ROUNDS` rounds and
``data.validation-fraction`` = :data:`VALIDATION_FRACTION` of every client's training images
held out and pooled (``data.validation-scope = "pooled"``: every client is scored on all
clients' held-out images); the setting with the best mean validation accuracy after the last
round is kept (never the global test set) and printed. The measured runs then train on all
training images. ``--reuse-tuning DETAILS`` skips the tuning runs and takes each arm's setting
from an earlier run's ``method-details.json`` (more seeds of a tuned protocol, or some of its
arms again). Runs go to ``--workers`` processes, each pinned to ``--threads`` torch threads.

It prints one Markdown table per protocol (mean client accuracy on the global test set after
the last round, min and max over seeds, bytes per round per client), which runs measured its
rows, the held-classes decision (the two relay arms' best validation) and the targets' checks,
and writes ``benchmarks/results/method.json`` (``{protocol: {arm: {"seeds", "mean", "min", "max",
"bytes_per_round", "commit", "command", "date"}}}``), ``method-details.json`` (per-seed
figures with their seed, run config, packages' versions, commit and date; the chosen settings
and the tuning's validation scores) and per protocol the overlaid accuracy curves of seed 0
(``<out>/comparison-<P>/``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import command, commit, pinned_worker, versions
from benchmarks.loopback import LoopbackGrid
from benchmarks.tokens import parse_override
from client_app import app as client_app
from cmfl_flower import report
from cmfl_flower.backbones import largest_token_norm
from cmfl_flower.client.store import load_state
from cmfl_flower.client.task import ClientTask
from cmfl_flower.client.workspace import data_dir, open_workspace
from cmfl_flower.config import AppConfig, PrivacyConfig
from cmfl_flower.data import LabeledImages
from cmfl_flower.data.sources import load_source
from cmfl_flower.encoder import TrainingSet, accuracy, train_encoder
from cmfl_flower.judge import JUDGED, fit
from cmfl_flower.paths import STATE_DIR, client_dir
from cmfl_flower.privacy import epsilon
from cmfl_flower.server.rounds import run_federation

CLIENTS = 10
ROUNDS = 10
RESULTS = Path(__file__).resolve().parent / "results"
JUDGE_FILE = "judge.safetensors"  # the independent judge every arm's clients load
JUDGES = ("generated-recognised", "judge-recognised")  # a seed's shares: CLIP's, the judge's
VALIDATION_FRACTION = 0.2
# tuning scores every client on all clients' held-out images: a client's own split holds only
# its own classes (2 in P1) and rewards forgetting the rest, unlike the global test set
VALIDATION = {"data.validation-fraction": VALIDATION_FRACTION, "data.validation-scope": "pooled"}
TUNE_ROUNDS = 3  # tuning runs are shorter than the measured ones, the same for every arm
PROTOCOLS: dict[str, dict[str, Any]] = {
    "P1": {"data.partitioner": "pathological", "data.classes-per-client": 2},
    "P2": {"data.partitioner": "dirichlet", "data.alpha": 0.1},
    "P3": {
        "data.partitioner": "pathological",
        "data.classes-per-client": 2,
        "data.class-names": "opaque",
    },
}
# every generating arm draws the same number of images per client per round: the relay's
# budget in P1 (63 to 69 images at 4 per received set), spread over each arm's requests
BUDGET = 64
FEDERATED: dict[str, dict[str, Any]] = {
    "centralised-tokens": {"method": "local-only-tokens", "data.partitioner": "iid"},
    "local-only": {"method": "local-only"},
    "local-only-tokens": {"method": "local-only-tokens"},
    "names-generation": {"method": "names-generation"},
    "fedavg-encoder": {"method": "encoder-lora", "strategy": "fedavg"},
    "fedprox-encoder": {
        "method": "encoder-lora",
        "strategy": "fedprox",
        "strategy-args": "proximal_mu=0.01",
    },
    "cmfl-relay": {"method": "cmfl-relay"},
    "cmfl-relay-lacking-only": {"method": "cmfl-relay", "generation.held-classes": False},
    "cmfl-relay-no-generation": {
        "method": "cmfl-relay",
        "generation.images-per-class": 0,
        "generation.images-per-round": 0,
    },
    "cmfl-relay-no-cap": {"method": "cmfl-relay", "relay.max-senders-per-class": 0},
}
# the arms the relay must lead: every other way to learn, with or without communication
RIVALS = (
    "zero-shot",
    "local-only",
    "local-only-tokens",
    "names-generation",
    "fedavg-encoder",
    "fedprox-encoder",
)
RELAY_GENERATES = ("cmfl-relay", "cmfl-relay-lacking-only")  # with and without held classes
NODES = {"centralised-tokens": 1}  # the pooled data as one client: tokens and LoRA together
ARMS = ("zero-shot", "centralised", *FEDERATED)
# fedprox-encoder: with mu = 0.01 it equalled fedavg-encoder to five decimals on every P1 seed,
# and a grid over mu would give it a larger tuning budget than any other arm; runs when named
OPTIONAL_ARMS = ("cmfl-relay-no-cap", "fedprox-encoder")
DEFAULT_ARMS = tuple(arm for arm in ARMS if arm not in OPTIONAL_ARMS)
TUNING_GRID: tuple[dict[str, Any], ...] = (
    {"encoder.lr": 1e-3, "encoder.epochs": 2},
    {"encoder.lr": 3e-3, "encoder.epochs": 1},
    {"encoder.lr": 1e-2, "encoder.epochs": 1},
)


def config(
    protocol: str,
    seed: int,
    root: Path,
    name: str,
    extra: dict[str, Any],
    rounds: int = ROUNDS,
    nodes: int = CLIENTS,
) -> AppConfig:
    """The fixed settings of ``protocol`` and ``seed`` with an arm's overrides."""
    return AppConfig.from_run_config(
        {
            "method": "local-only",
            "seed": seed,
            "backbone.preset": "tiny-fewshot",
            "data.seed": seed,
            "data.dir": str(root / "data"),
            "federation.rounds": rounds,
            "federation.fraction": 1.0,
            "federation.min-nodes": nodes,
            "generation.images-per-round": BUDGET,
            "output.dir": str(root / "runs"),
            "output.run-name": name,
            "output.progress": False,
        }
        | PROTOCOLS[protocol]
        | extra
    )


def federated(cfg: AppConfig, nodes: int = CLIENTS) -> dict[str, Any]:
    """Run one federated arm; its last round's figures and bytes per round per client.

    ``generated-recognised`` (the pretrained CLIP's verdict) and ``judge-recognised`` (the
    independent judge's, :mod:`cmfl_flower.judge`) are means over the rounds that generated.
    """
    run_dir = run_federation(LoopbackGrid(client_app, cfg, nodes), cfg)
    rows = json.loads((run_dir / "rounds.json").read_text())
    last = rows[-1]
    traffic = sum(row.get("bytes-sent", 0) + row.get("bytes-received", 0) for row in rows)
    return {
        "acc": float(last["global-acc-mean"]),
        "val": float(last.get("val-acc-mean", np.nan)),
        "bytes_per_round": traffic / (len(rows) * nodes),
        "generated-recognised": _mean_recognised(rows),
        "judge-recognised": _mean_recognised(rows, JUDGED),
        "run-dir": str(run_dir),
    }


def _mean_recognised(rows: list[dict[str, Any]], name: str = report.RECOGNISED) -> float | None:
    values = [row[f"{name}-mean"] for row in rows if f"{name}-mean" in row]
    return float(np.mean(values)) if values else None


def pooled(cfg: AppConfig, zero_shot: bool) -> dict[str, Any]:
    """Zero-shot, or the vision LoRA trained on all clients' training images pooled.

    Centralised training runs ``encoder.epochs`` x rounds epochs; with a validation split
    (tuning: ``data.validation-scope = "pooled"``) the pooled held-out images score it.
    """
    ws = open_workspace(cfg, ClientTask(0, CLIENTS, 1), None)
    text = ws.name_features()
    glob, batch = ws.global_test, cfg.encoder.eval_batch_size
    assert glob is not None  # a prepared dataset always has its global test set
    val = None
    if not zero_shot:
        parts = [_client_train(cfg, pid) for pid in range(CLIENTS)]
        images = np.concatenate([t.images for t in parts])  # (N, H, W, 3)
        labels = np.concatenate([t.labels for t in parts])  # (N,)
        data = TrainingSet.mix(ws.encoder.bundle.image_size, (images, labels))
        rounds = cfg.federation.rounds
        epochs = cfg.encoder.model_copy(update={"epochs": cfg.encoder.epochs * rounds})
        train_encoder(ws.encoder, data, text, epochs, cfg.seed)
        if ws.validation is not None and len(ws.validation):
            val = accuracy(ws.encoder, ws.validation.images, ws.validation.labels, text, batch)
    acc = accuracy(ws.encoder, glob.images, glob.labels, text, batch)
    ws.encoder.load_lora_state(ws.encoder.init_state)  # the process-wide encoder, untouched
    return {"acc": acc, "val": np.nan if val is None else val, "bytes_per_round": 0.0}


def _client_train(cfg: AppConfig, pid: int) -> LabeledImages:
    """A client's training images, without its held-out split."""
    return open_workspace(cfg, ClientTask(pid, CLIENTS, 1), None).data.train


@dataclass(frozen=True)
class Job:
    """One run: an arm of a protocol with a seed and overrides (tuned values, validation)."""

    arm: str
    protocol: str
    seed: int
    extra: tuple[tuple[str, Any], ...] = ()
    tag: str = ""
    rounds: int = ROUNDS


def run_name(job: Job) -> str:
    """The run directory name of ``job`` under ``<out>/runs/``."""
    return f"{job.protocol}-{job.arm}-s{job.seed}{job.tag}"


def check_fresh(jobs: list[Job], root: Path) -> None:
    """Refuse, before any run, an ``--out`` that already holds a run directory of ``jobs``."""
    taken = [run_name(job) for job in jobs if (root / "runs" / run_name(job)).exists()]
    if taken:
        raise SystemExit(
            f"--out {root} already holds run directories of this run ({', '.join(taken[:3])}"
            f"{', ...' if len(taken) > 3 else ''}): choose a fresh --out"
        )


def job_config(job: Job, root: Path) -> AppConfig:
    """The run config of ``job``: protocol, seed, the arm's keys, then the job's overrides."""
    name = run_name(job)
    # the worker's pinned thread count in every message: left to the app, it is chosen from
    # the CPUs idle as a message starts, and results then depend on the machine's load
    extra: dict[str, Any] = {"backbone.threads": torch.get_num_threads()}
    if (root / JUDGE_FILE).is_file():  # written by main before any run
        extra["generation.judge"] = str(root / JUDGE_FILE)
    extra |= dict(job.extra)
    arm = FEDERATED.get(job.arm, {})
    nodes = NODES.get(job.arm, CLIENTS)
    return config(job.protocol, job.seed, root, name, arm | extra, job.rounds, nodes)


def run_arm(job: Job, root: Path) -> dict[str, Any]:
    """Run ``job``: its accuracy, validation accuracy, bytes per round per client, provenance.

    Provenance: the seed, the whole run config, the packages' versions and the date the run
    ended.
    """
    cfg = job_config(job, root)
    if job.arm in ("zero-shot", "centralised"):
        result = pooled(cfg, job.arm == "zero-shot")
    else:
        result = federated(cfg, NODES.get(job.arm, CLIENTS))
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    provenance = {"seed": job.seed, "config": cfg.to_run_config(), "versions": versions()}
    return result | provenance | {"date": stamp}


def run_all(jobs: list[Job], root: Path, workers: int, threads: int) -> list[dict[str, Any]]:
    """Run ``jobs`` in ``workers`` processes (each pinned to ``threads`` torch threads)."""
    for job in jobs:  # prepare each partitioning once, before workers race for it
        data_dir(job_config(job, root).data, NODES.get(job.arm, CLIENTS))
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, context, pinned_worker, (threads,)) as pool:
        return list(pool.map(run_arm, jobs, [root] * len(jobs)))


def tuning_jobs(arm: str, protocol: str, fixed: dict[str, Any]) -> list[Job]:
    """Every :data:`TUNING_GRID` setting of ``arm`` on seed 0 with a validation split."""
    if arm == "zero-shot":
        return []
    return [
        Job(
            arm,
            protocol,
            0,
            tuple((fixed | setting | VALIDATION).items()),
            f"-tune{index}",
            TUNE_ROUNDS,
        )
        for index, setting in enumerate(TUNING_GRID)
    ]


def reused_settings(path: Path, protocol: str, arms: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """The settings an earlier tuned run chose, from its ``method-details.json``."""
    details = json.loads(path.read_text()).get(protocol, {})
    missing = [arm for arm in arms if "chosen" not in details.get(arm, {})]
    if missing:
        raise ValueError(f"--reuse-tuning {path}: no {protocol} setting for arms {missing}")
    return {arm: dict(details[arm]["chosen"]) for arm in arms}


def best_setting(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The :data:`TUNING_GRID` setting whose run had the best validation accuracy."""
    return TUNING_GRID[int(np.nanargmax([r["val"] for r in results]))] if results else {}


def summarise(per_seed: list[dict[str, Any]]) -> dict[str, float | None]:
    """Mean, min and max over seeds of the accuracy; means of bytes and of both judges' shares.

    A judge's mean is None where no seed's run generated.
    """
    accs = [r["acc"] for r in per_seed]
    return {
        "seeds": len(accs),
        "rounds": max(r["config"]["federation.rounds"] for r in per_seed),
        "mean": float(np.mean(accs)),
        "min": float(np.min(accs)),
        "max": float(np.max(accs)),
        "bytes_per_round": float(np.mean([r["bytes_per_round"] for r in per_seed])),
    } | judged_means(per_seed)


def judged_means(per_seed: list[dict[str, Any]]) -> dict[str, float | None]:
    """Each judge's share, mean over the seeds whose runs generated (None: none did)."""
    judged = {key: [r[key] for r in per_seed if r.get(key) is not None] for key in JUDGES}
    return {key: float(np.mean(values)) if values else None for key, values in judged.items()}


def table(protocol: str, rows: dict[str, dict[str, Any]], chosen: dict[str, Any]) -> str:
    """One protocol's results as a Markdown table.

    Rows stored before rows kept their number of rounds ran :data:`ROUNDS`.
    """
    rounds = {arm: row.get("rounds", ROUNDS) for arm, row in rows.items()}
    mixed = len(set(rounds.values())) > 1
    last = "each row's last round" if mixed else f"round {next(iter(rounds.values()), ROUNDS)}"
    lines = [
        f"**{protocol}** (mean client accuracy on the global test set after {last})",
        "",
        "| arm | seeds | mean | min | max | bytes / round / client | tuned setting "
        "| recognised: CLIP | recognised: judge |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for arm, row in rows.items():
        setting = ", ".join(f"{k.split('.')[-1]} {v:g}" for k, v in chosen.get(arm, {}).items())
        shares = " | ".join(
            _share(row.get(key)) for key in ("generated-recognised", "judge-recognised")
        )
        name = f"{arm} ({rounds[arm]} rounds)" if mixed else arm
        lines.append(
            f"| {name} | {row['seeds']} | {row['mean']:.3f} | {row['min']:.3f} | "
            f"{row['max']:.3f} | {report.human_bytes(row['bytes_per_round'])} | "
            f"{setting or '-'} | {shares} |"
        )
    return "\n".join(lines)


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def write_judge(root: Path) -> dict[str, Any]:
    """Train the independent judge on the public digits into ``root``; what the rows record."""
    public, test = load_source("digits", "public"), load_source("digits", "test")
    judge = fit(public.images, public.labels, public.class_names, (test.images, test.labels))
    judge.save(root / JUDGE_FILE)
    return {"judge-public-images": len(public), "judge-test-accuracy": judge.test_accuracy}


def checks(protocol: str, rows: dict[str, dict[str, Any]]) -> list[str]:
    """The targets for ``protocol``, each with its measured margin.

    The relay ahead of the best rival (by 3 points in P1 and P2, at all in P3), within 3 points
    of ``centralised`` (P1, P2) or 5 of ``centralised-tokens`` (P3), and at most a fifth of
    FedAvg's bytes.
    """
    out: list[str] = []
    relay = rows.get("cmfl-relay")
    if relay is None:
        return out
    rivals = {arm: row["mean"] for arm, row in rows.items() if arm in RIVALS}
    if rivals:
        best = max(rivals, key=lambda arm: rivals[arm])
        gain = 100 * (relay["mean"] - rivals[best])
        met, target = (gain > 0, "> 0") if protocol == "P3" else (gain >= 3.0, ">= +3")
        verdict = "met" if met else "missed"
        out.append(
            f"cmfl-relay - best rival ({best}): {gain:+.1f} points (target {target}): {verdict}"
        )
    ceiling, room = ("centralised-tokens", 5.0) if protocol == "P3" else ("centralised", 3.0)
    if ceiling in rows:
        gap = 100 * (rows[ceiling]["mean"] - relay["mean"])
        verdict = "met" if gap <= room else "missed"
        out.append(f"{ceiling} - cmfl-relay: {gap:+.1f} points (target <= {room:.0f}): {verdict}")
    if "fedavg-encoder" in rows and rows["fedavg-encoder"]["bytes_per_round"] > 0:
        ratio = relay["bytes_per_round"] / rows["fedavg-encoder"]["bytes_per_round"]
        verdict = "met" if ratio <= 0.2 else "missed"
        out.append(f"relay bytes / fedavg-encoder bytes: {ratio:.3f} (target <= 0.2): {verdict}")
    return out


def planned(protocol: str, arms: tuple[str, ...], args: argparse.Namespace) -> list[Job]:
    """Every run ``protocol`` will make, by name: the tuning runs (when tuning), then the seeds."""
    tuning = not (args.no_tune or args.reuse_tuning)
    jobs = [job for arm in arms for job in tuning_jobs(arm, protocol, {})] if tuning else []
    return jobs + [Job(arm, protocol, seed) for arm in arms for seed in range(args.seeds)]


def run_protocol(
    protocol: str, seeds: int, arms: tuple[str, ...], root: Path, args: argparse.Namespace
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Tune (unless ``--no-tune`` or ``--reuse-tuning``); run every arm over ``seeds`` seeds."""
    start = time.perf_counter()
    chosen: dict[str, dict[str, Any]] = {arm: {} for arm in arms}
    validation: dict[str, list[float]] = {}
    if args.reuse_tuning:
        chosen = reused_settings(args.reuse_tuning, protocol, arms)
        print(f"{protocol}: settings chosen by the earlier tuning: {chosen}", flush=True)
    elif not args.no_tune:
        tuning = {arm: tuning_jobs(arm, protocol, args.set) for arm in arms}
        flat = [job for jobs in tuning.values() for job in jobs]
        results = iter(run_all(flat, root, args.workers, args.threads))
        for arm, jobs in tuning.items():
            scores = [next(results) for _ in jobs]
            chosen[arm] = best_setting(scores)
            validation[arm] = [float(r["val"]) for r in scores]
            listed = ", ".join(f"{r['val']:.3f}" for r in scores)
            print(f"{protocol} {arm}: validation [{listed}] -> {chosen[arm] or '-'}", flush=True)
    jobs = [
        Job(arm, protocol, s, tuple((args.set | chosen[arm]).items()))
        for arm in arms
        for s in range(seeds)
    ]
    results = iter(run_all(jobs, root, args.workers, args.threads))
    rows: dict[str, dict[str, Any]] = {}
    details: dict[str, Any] = {}
    stamp = {"commit": args.commit, "command": command(), "date": time.strftime("%Y-%m-%d")}
    stamp |= args.judge
    for arm in arms:
        per_seed = [next(results) | {"commit": args.commit} for _ in range(seeds)]
        rows[arm] = summarise(per_seed) | stamp
        details[arm] = {"chosen": chosen[arm], "per_seed": per_seed}
        if arm in validation:
            details[arm]["validation"] = validation[arm]
        print(f"{protocol} {arm}: {rows[arm]['mean']:.3f}", flush=True)
    print(f"{protocol}: {time.perf_counter() - start:.0f} s", flush=True)
    runs = [
        report.load_run(Path(details[arm]["per_seed"][0]["run-dir"]))
        for arm in arms
        if arm in FEDERATED
    ]
    if runs:
        page, _ = report.write_comparison(runs, root / f"comparison-{protocol}")
        print(f"{protocol} accuracy per round, overlaid (seed 0): {page}")
    return rows, details


def drift_norms(run_dir: Path, cfg: AppConfig) -> list[float]:
    """Each class vector's drift from its name's embedding, at the end of ``run_dir``.

    Frobenius norms over every client's classes: what the DP release clips.
    """
    ws = open_workspace(cfg, ClientTask(0, CLIENTS, 1), None)
    norms = []
    for pid in range(CLIENTS):
        directory = client_dir(run_dir, pid) / STATE_DIR
        state = load_state(directory, ROUNDS + 1)
        for key, vectors in (state.tokens or {}).items():
            anchor = ws.text.name_vectors(ws.class_names[int(key[1:])]).cpu()
            norms.append(float((vectors - anchor).norm()))
    return norms


def public_clip_norm(cfg: AppConfig) -> float:
    """The DP clip norm from public information: the backbone's longest pretrained token.

    Every party holds the backbone's weights; a class vector may then drift from its name by at
    most the length of the longest token the text tower was trained with.
    """
    ws = open_workspace(cfg, ClientTask(0, CLIENTS, 1), None)
    return largest_token_norm(ws.text.bundle)


def noise_for(target: float, clip_norm: float) -> float:
    """The ``privacy.noise-multiplier`` giving total epsilon ``target`` per vector after the run."""
    low, high = 0.05, 200.0
    for _ in range(40):  # epsilon falls as the noise grows: bisect on a log scale
        mid = (low * high) ** 0.5
        cfg = PrivacyConfig(enabled=True, clip_norm=clip_norm, noise_multiplier=mid)
        low, high = (mid, high) if epsilon(cfg, ROUNDS) > target else (low, mid)
    return high


def privacy_sweep(
    protocol: str, root: Path, targets: list[float], workers: int, threads: int, control: bool
) -> list[dict[str, Any]]:
    """cmfl-relay (seed 0) without DP, then under DP at each total epsilon in ``targets``.

    Receivers denoise (the default) unless ``control``: then one more run at the largest
    epsilon without denoising shows what the denoising does.

    The clip norm comes from public information only (:func:`public_clip_norm`); the rows
    record how much of the run without DP it would clip (``clipped-share``, ``largest-drift``),
    which no party learns from the release.
    """
    cfg = config(protocol, 0, root, "drift", FEDERATED["cmfl-relay"])
    clip_norm = public_clip_norm(cfg)
    settings = [(target, True) for target in targets] + [(max(targets), False)] * control
    jobs = [Job("cmfl-relay", protocol, 0, tag="-dp-off")]  # the run without DP, beside the rest
    for target, denoised in settings:
        extra = {
            "privacy.enabled": True,
            "privacy.clip-norm": clip_norm,
            "privacy.noise-multiplier": noise_for(target, clip_norm),
            "privacy.denoise": denoised,
        }
        tag = f"-dp-eps{target:g}" + ("" if denoised else "-raw")
        jobs.append(Job("cmfl-relay", protocol, 0, tuple(extra.items()), tag))
    plain, *results = run_all(jobs, root, workers, threads)
    drifts = drift_norms(Path(plain["run-dir"]), cfg)
    seen = {
        "largest-drift": max(drifts),
        "clipped-share": float(np.mean([d > clip_norm for d in drifts])),
    }
    rows = [
        {
            "epsilon": None,
            "noise-multiplier": 0.0,
            "clip-norm": clip_norm,
            "acc": plain["acc"],
            "generated-recognised": plain["generated-recognised"],
            "judge-recognised": plain.get("judge-recognised"),
            **seen,
        }
    ]
    for job, result in zip(jobs[1:], results, strict=True):
        reached = json.loads((Path(result["run-dir"]) / "rounds.json").read_text())[-1]
        extra = dict(job.extra)
        rows.append(
            {
                "epsilon": reached["dp-epsilon-total"],
                "client-epsilon": reached.get("dp-epsilon-client-total"),
                "noise-multiplier": extra["privacy.noise-multiplier"],
                "clip-norm": clip_norm,
                "denoise": extra["privacy.denoise"],
                "acc": result["acc"],
                "generated-recognised": result["generated-recognised"],
                "judge-recognised": result.get("judge-recognised"),
            }
        )
    return rows


def privacy_table(protocol: str, rows: list[dict[str, Any]]) -> str:
    """The privacy sweep as a Markdown table."""
    lines = [
        f"**{protocol}, cmfl-relay under DP** (seed 0, mean client accuracy, global test set)",
        "",
        "| total epsilon per vector | epsilon of a client's vectors together | noise multiplier | "
        "clip norm | receivers denoise | accuracy | recognised: CLIP | recognised: judge |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        eps = "no DP" if row["epsilon"] is None else f"{row['epsilon']:.2f}"
        client = row.get("client-epsilon")
        denoised = {None: "-", True: "yes", False: "no"}[row.get("denoise")]
        shares = " | ".join(_share(row.get(key)) for key in JUDGES)
        lines.append(
            f"| {eps} | {'-' if client is None else f'{client:.2f}'} | "
            f"{row['noise-multiplier']:.3f} | {row['clip-norm']:.3f} | {denoised} | "
            f"{row['acc']:.3f} | {shares} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run the protocols; print the tables and checks; write the results files."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocol", nargs="+", choices=sorted(PROTOCOLS), default=list(PROTOCOLS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--arms",
        nargs="+",
        choices=ARMS,
        default=list(DEFAULT_ARMS),
        help="arms to run (default: every arm but cmfl-relay-no-cap)",
    )
    parser.add_argument("--no-tune", action="store_true", help="use the app's defaults")
    parser.add_argument(
        "--reuse-tuning",
        type=Path,
        default=None,
        help="a method-details.json whose chosen settings the arms use (no tuning runs)",
    )
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="run-config overrides for every arm's runs (the tuned keys still win)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel (processes)")
    parser.add_argument("--out", type=Path, default=None, help="keep run directories here")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the JSON goes")
    parser.add_argument(
        "--privacy",
        nargs="+",
        type=float,
        metavar="EPSILON",
        help="instead: cmfl-relay on the first --protocol without DP and at these total epsilons",
    )
    parser.add_argument(
        "--privacy-control",
        action="store_true",
        help="with --privacy: one more run at the largest epsilon, receivers not denoising",
    )
    parser.add_argument(
        "--show",
        action="store_true",
        help="instead: print the tables and checks of what --results holds, running nothing",
    )
    args = parser.parse_args(argv)
    args.set = dict(map(parse_override, args.set))
    args.commit = commit()
    if args.show:
        show(args.results, args.protocol)
        return
    if args.privacy:
        torch.set_num_threads(args.threads)
        root = args.out or Path(tempfile.mkdtemp(prefix="cmfl-privacy-"))
        root.mkdir(parents=True, exist_ok=True)
        judge = write_judge(root)
        rows = privacy_sweep(
            args.protocol[0], root, args.privacy, args.workers, args.threads, args.privacy_control
        )
        args.results.mkdir(parents=True, exist_ok=True)
        stamp = {"command": command(), "commit": args.commit, "date": time.strftime("%Y-%m-%d")}
        sweep = stamp | judge | {"protocol": args.protocol[0], "rows": rows}
        (args.results / "method-privacy.json").write_text(json.dumps(sweep, indent=2))
        print("\n".join(privacy_lines(sweep)))
        return
    torch.set_num_threads(args.threads)
    root = args.out or Path(tempfile.mkdtemp(prefix="cmfl-method-"))
    root.mkdir(parents=True, exist_ok=True)
    args.judge = write_judge(root)
    print(
        f"clients={CLIENTS} rounds={ROUNDS} seeds={args.seeds} workers={args.workers} "
        f"threads={args.threads} "
        f"tuned={not args.no_tune}, reused tuning={args.reuse_tuning}, overrides={args.set}; "
        f"runs in {root}",
        flush=True,
    )
    results: dict[str, Any] = {}
    details: dict[str, Any] = {}
    check_fresh([job for p in args.protocol for job in planned(p, tuple(args.arms), args)], root)
    for protocol in args.protocol:
        arms = tuple(args.arms)
        results[protocol], details[protocol] = run_protocol(protocol, args.seeds, arms, root, args)
    for protocol, rows in results.items():
        print_protocol(protocol, rows, details[protocol])
    args.results.mkdir(parents=True, exist_ok=True)
    write_merged(args.results / "method.json", results)
    write_merged(args.results / "method-details.json", details)
    print(f"wrote {args.results / 'method.json'}")


def print_protocol(protocol: str, rows: dict[str, Any], details: dict[str, Any]) -> None:
    """A protocol's table, where its rows come from, then its targets' checks."""
    print()
    print(table(protocol, rows, {arm: d["chosen"] for arm, d in details.items()}))
    print()
    for line in provenance(rows) + judges(rows) + held_classes(details):
        print(f"- {line}")
    for line in checks(protocol, rows):
        print(f"- {line}")


def judges(rows: dict[str, Any]) -> list[str]:
    """Who judged the generated images: the pretrained CLIP and, where recorded, the judge."""
    recorded = {
        (row["judge-public-images"], row["judge-test-accuracy"])
        for row in rows.values()
        if "judge-test-accuracy" in row
    }
    return [
        "recognised: the share of generated images the pretrained CLIP (CLIP) or the independent "
        f"judge (judge: pixel regression on {count} public digits, {accuracy:.3f} on the test "
        "digits) labels as their class, mean over the rounds that generated and the seeds"
        for count, accuracy in sorted(recorded)
    ]


def held_classes(details: dict[str, Any]) -> list[str]:
    """Whether the relay should generate for classes a client holds, on tuning validation."""
    scores = {arm: details.get(arm, {}).get("validation") for arm in RELAY_GENERATES}
    if not all(scores.values()):
        return []
    best = {arm: max(v for v in values if v == v) for arm, values in scores.items() if values}
    held, lacking = best["cmfl-relay"], best["cmfl-relay-lacking-only"]
    keep = "true" if held >= lacking else "false"
    return [
        f"held classes: best validation {held:.3f} generating for them, {lacking:.3f} for "
        f"lacking classes only: generation.held-classes = {keep}"
    ]


def provenance(rows: dict[str, Any]) -> list[str]:
    """One line per (commit, command) that measured rows of a table, naming its arms."""
    runs: dict[tuple[str, str, str], list[str]] = {}
    for arm, row in rows.items():
        key = (row.get("commit", ""), row.get("command", ""), row.get("date", ""))
        runs.setdefault(key, []).append(arm)
    lines = []
    for (code, cmd, date), arms in runs.items():
        if not code:
            lines.append(f"{', '.join(arms)}: measured before rows recorded their provenance")
        else:
            lines.append(f"{', '.join(arms)}: `{cmd}` at {code[:12]} on {date}")
    return lines


def show(results: Path, protocols: list[str]) -> None:
    """Print what ``results`` holds for ``protocols``, the arms in their usual order."""
    paths = [results / "method.json", results / "method-details.json"]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise SystemExit(f"--show: no {' or '.join(missing)}; run the benchmark first")
    stored, details = (json.loads(path.read_text()) for path in paths)
    for protocol in (p for p in protocols if p in stored):
        own = details.get(protocol, {})
        rows = {
            arm: judged_means(own.get(arm, {}).get("per_seed", [])) | stored[protocol][arm]
            for arm in ARMS
            if arm in stored[protocol]
        }  # rows summarised before they kept the judges' shares take them from the seeds
        print_protocol(protocol, rows, own)
    privacy = results / "method-privacy.json"
    if privacy.is_file():
        sweep = json.loads(privacy.read_text())
        if isinstance(sweep, list):  # written before the sweep recorded its provenance
            sweep = {"protocol": "P1", "rows": sweep}
        print("\n" + "\n".join(privacy_lines(sweep)))


def privacy_lines(sweep: dict[str, Any]) -> list[str]:
    """The privacy sweep's table, where its clip norm came from, and its provenance."""
    lines = [privacy_table(sweep["protocol"], sweep["rows"]), ""]
    plain = sweep["rows"][0]
    if "clipped-share" in plain:
        lines.append(
            f"- clip norm {plain['clip-norm']:.3f} from public information (the backbone's "
            f"longest pretrained token): it would clip {plain['clipped-share']:.0%} of the "
            f"vectors of the run without DP (their largest drift from the name: "
            f"{plain['largest-drift']:.3f})"
        )
    if "commit" in sweep:
        lines.append(f"- `{sweep['command']}` at {sweep['commit'][:12]} on {sweep['date']}")
    else:
        lines.append("- measured before the sweep recorded its provenance")
    return lines


def write_merged(path: Path, by_protocol: dict[str, Any]) -> None:
    """Write ``by_protocol`` into the JSON file ``path``, keeping what was not run now.

    Protocols and arms not in ``by_protocol`` stay as they were (``--arms`` re-runs a few).
    """
    merged = json.loads(path.read_text()) if path.is_file() else {}
    for protocol, arms in by_protocol.items():
        merged.setdefault(protocol, {}).update(arms)
    path.write_text(json.dumps(merged, indent=2, default=str).replace("NaN", "null"))  # strict


if __name__ == "__main__":
    main()
