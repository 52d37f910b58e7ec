"""Where should the screening thresholds sit? Scores of honest, label-flipped and noise sets.

``python -m benchmarks.screening_scores RUN_DIR --round R --receivers 0,3`` takes a finished
relay run without attackers and with screening off (one that ``benchmarks.robustness --out``
kept, e.g. ``<out>/runs/P1-none-k0-off-s0``), reads every client's saved class vectors and
vision LoRA after round ``R``, and lets each named receiver judge, as round ``R + 1`` would,
every other client's vectors three ways: honestly labelled, label-flipped (class ``c`` sent as
``c + 1``, as the robustness benchmark's attacker does) and replaced by noise of the same
norms (its ``noise`` attack). Both judgements are scored apart: the images generated from the
vectors (``screening.min-score``) and the vectors' text features (``screening.min-token-score``).
It prints the sorted scores per judge for each kind, and for candidate thresholds the share of
honest sets screened out and of flipped and noise sets let through; ``--results`` stores them
with the command and commit. No test image is used: the judges see generated images, the
receivers' training images and vectors only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from benchmarks import commit
from benchmarks.robustness import noise_like
from cmfl_flower.client.store import read_state
from cmfl_flower.client.task import ClientTask
from cmfl_flower.client.workspace import open_workspace
from cmfl_flower.config import AppConfig
from cmfl_flower.knowledge import relayed_knowledge
from cmfl_flower.screening import NONE, TOKEN, Verdict, judge_sets
from cmfl_flower.token_round import (
    _generate,
    image_evidence,
    judge_features,
    own_bank,
    token_evidence,
)
from cmfl_flower.wire import TokenEntry, relay_arrays

THRESHOLDS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
KINDS = {"honest": 0, "flipped": 1000, "noise": 2000}  # kind -> offset added to sender ids
RESULTS = Path(__file__).resolve().parent / "results" / "screening-scores.json"


def state_path(run_dir: Path, pid: int, after: int) -> Path:
    """The file of partition ``pid``'s state saved after round ``after``."""
    found = sorted((run_dir / "clients" / f"partition-{pid}" / "state").glob(f"*/round-{after}.*"))
    if not found:
        raise ValueError(f"{run_dir}: partition {pid} saved no state after round {after}")
    return found[0]


def banks(run_dir: Path, clients: int, after: int) -> dict[int, dict[int, torch.Tensor]]:
    """Every client's class vectors (class id -> (n, D)) saved after round ``after``."""
    out = {}
    for pid in range(clients):
        tokens = read_state(state_path(run_dir, pid, after)).tokens or {}
        out[pid] = {int(key[1:]): vectors for key, vectors in tokens.items()}
    return out


def kind_of(sender: int) -> str:
    """The kind of a judged set from its sender id (:data:`KINDS`)."""
    return max((k for k in KINDS if sender >= KINDS[k]), key=KINDS.__getitem__)


def copies(vectors: dict[int, dict[int, torch.Tensor]], receiver: int) -> list[TokenEntry]:
    """Every other client's vectors: honest, label-flipped and noise (sender ids per KINDS)."""
    entries = []
    for sender, bank in vectors.items():
        if sender == receiver:
            continue
        rng = np.random.default_rng(sender)
        for class_id, rows in sorted(bank.items()):
            honest = rows.numpy()
            entries.append(TokenEntry(sender, class_id, honest))
            flipped = (class_id + 1) % 10
            entries.append(TokenEntry(KINDS["flipped"] + sender, flipped, honest))
            entries.append(TokenEntry(KINDS["noise"] + sender, class_id, noise_like(honest, rng)))
    return entries


def judge(cfg: AppConfig, run_dir: Path, clients: int, after: int, receiver: int) -> list[Verdict]:
    """Receiver ``receiver``'s image and token verdicts on every other client's copies."""
    vectors = banks(run_dir, clients, after)
    state = read_state(state_path(run_dir, receiver, after))
    ws = open_workspace(cfg, ClientTask(receiver, clients, after + 1), state.lora)
    knowledge = relayed_knowledge(ws, relay_arrays(copies(vectors, receiver)))
    generated = _generate(ws, knowledge.requests)
    bank = own_bank(ws, state)
    with ws.encoder.pretrained(), torch.no_grad():
        names = ws.name_features() if cfg.data.class_names == "real" else None
    scale = float(ws.encoder.bundle.model.logit_scale.exp())
    features = judge_features(ws, generated)
    images = image_evidence(ws, generated, features, names, scale)
    past = {int(key[1:]): feature for key, feature in (state.screening or {}).items()}
    tokens = token_evidence(ws, bank, knowledge.entries, names, scale, past)
    return [
        *(judge_sets(images, cfg.screening, 0.0) if images else []),
        *(judge_sets(tokens, cfg.screening, 0.0, TOKEN) if tokens else []),
    ]


def summary(verdicts: list[Verdict]) -> dict[str, object]:
    """Sorted scores per (kind, judge) and, per space, the shares at each threshold."""
    out: dict[str, object] = {}
    for kind in KINDS:
        mine = [v for v in verdicts if kind_of(v.sender) == kind]
        for name in sorted({v.judge for v in mine}):
            out[f"{kind}-{name}"] = sorted(round(v.score, 4) for v in mine if v.judge == name)
        for space, tokens in (("images", False), ("tokens", True)):
            scores = [
                v.score for v in mine if v.judge != NONE and v.judge.startswith(TOKEN) == tokens
            ]
            below = {t: sum(s < t for s in scores) / max(len(scores), 1) for t in THRESHOLDS}
            if kind == "honest":
                shares = {str(t): round(share, 4) for t, share in below.items()}
                out[f"honest {space} screened-out share"] = shares
            else:
                shares = {str(t): round(1 - share, 4) for t, share in below.items()}
                out[f"{kind} {space} let-through share"] = shares
    return out


def main(argv: list[str] | None = None) -> None:
    """Judge, print, store."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--round", type=int, required=True, help="saved round to start from")
    parser.add_argument("--receivers", default="0", help="comma-separated partition ids")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--tag", default="", help="key in the results file (default: run name)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    code = commit()  # the code that runs
    config = json.loads((args.run_dir / "config.json").read_text())
    flat = config["run_config"]
    cfg = AppConfig.from_run_config(flat | {"output.run-name": ""})
    clients = len(list((args.run_dir / "clients").glob("partition-*")))
    verdicts = [
        verdict
        for receiver in (int(r) for r in args.receivers.split(","))
        for verdict in judge(cfg, args.run_dir, clients, args.round, receiver)
    ]
    found = summary(verdicts)
    print(json.dumps(found, indent=1))
    stored = json.loads(args.results.read_text()) if args.results.exists() else {}
    stored[args.tag or args.run_dir.name] = {
        "command": "python -m benchmarks.screening_scores " + " ".join(argv or sys.argv[1:]),
        "commit": code,
        "min-score": cfg.screening.min_score,
        "min-token-score": cfg.screening.min_token_score,
        **found,
    }
    args.results.write_text(json.dumps(stored, indent=1) + "\n")


if __name__ == "__main__":
    main()
