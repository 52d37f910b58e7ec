"""Centralised vs FedAvg training of the pixel DDPM on the offline digits, equal sample-steps.

``python -m benchmarks.fed_diffusion`` trains the tiny pixel DDPM two ways from the same seeded
initialisation:

* **FedAvg** (C = 4, E = 4): ``diffusion-unet`` (FedAvg), via the real strategy and ClientApp
  (in process), 4 clients on an iid split of the digits training pool, all sampled every
  round, 4 local steps of batch 16 each; ``rounds x 4 x 4 x 16`` training samples in all.
* **Centralised**: one model trained on the pooled images of the same 4 clients for
  ``rounds x 4 x 4`` steps of batch 16 (the same number of sample-steps), one optimiser.

Both final models render ``--eval-samples`` images with the same seeds (DDIM) and are measured
by the same Fréchet distance in the tiny CLIP's image features to the digits test split. It
prints both distances and their ratio (FedAvg / centralised; 1 = no loss from federation).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.loopback import LoopbackGrid
from client_app import app as client_app
from cmfl_flower.client_round import data_dir
from cmfl_flower.config import AppConfig
from cmfl_flower.data import load_partition
from cmfl_flower.diffusion import (
    LocalData,
    build_ddpm_unet,
    ddpm_unet_name,
    module_arrays,
    train_steps,
)
from cmfl_flower.diffusion_server import DiffusionPublisher
from cmfl_flower.methods.harness import run_federation

CLIENTS = 4
LOCAL_STEPS = 4
BATCH = 16
SEED = 0


def config(root: Path, args: argparse.Namespace) -> AppConfig:
    """The fixed benchmark settings."""
    return AppConfig.from_run_config(
        {
            "method": "diffusion-unet",
            "seed": SEED,
            "data.partitioner": "iid",
            "data.dir": str(root / "data"),
            "federation.rounds": args.rounds,
            "federation.min-nodes": CLIENTS,
            "diffusion.local-steps": LOCAL_STEPS,
            "diffusion.batch-size": BATCH,
            "diffusion.lr": args.lr,
            "diffusion.eval-samples": args.eval_samples,
            "diffusion.sample-steps": args.sample_steps,
            "output.dir": str(root / "runs"),
            "output.run-name": "fedavg",
        }
    )


def fedavg(cfg: AppConfig) -> tuple[float, int]:
    """Run FedAvg; return the final Fréchet distance and the bytes on the wire."""
    run_dir = run_federation(LoopbackGrid(client_app, cfg, CLIENTS), cfg)
    rounds = json.loads((run_dir / "rounds.json").read_text())
    wire = sum(int(r["bytes-sent"]) + int(r["bytes-received"]) for r in rounds)
    return float(rounds[-1]["fd-clip"]), wire


def centralised(cfg: AppConfig, root: Path) -> float:
    """Train on the pooled client images for the same sample-steps; return its distance."""
    directory = data_dir(cfg.data, CLIENTS)
    pool = np.concatenate([load_partition(directory, i).train.images for i in range(CLIENTS)])
    unet = build_ddpm_unet(ddpm_unet_name(cfg.diffusion, cfg.backbone.preset), cfg.seed)
    steps = cfg.federation.rounds * CLIENTS * LOCAL_STEPS
    settings = cfg.diffusion.model_copy(update={"local_steps": steps})
    train_steps(unet, list(unet.parameters()), LocalData(pool, None), settings, cfg.seed)
    publisher = DiffusionPublisher(cfg, root, "ddpm")
    return publisher.publish_unet(cfg.federation.rounds, module_arrays(unet))["fd-clip"]


def main(argv: list[str] | None = None) -> None:
    """Run both trainings and print the distances and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-samples", type=int, default=200)
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg = config(root, args)
        start = time.perf_counter()
        fed, wire = fedavg(cfg)
        fed_s = time.perf_counter() - start
        start = time.perf_counter()
        central = centralised(cfg, root / "central")
        central_s = time.perf_counter() - start
    samples = cfg.federation.rounds * CLIENTS * LOCAL_STEPS * BATCH
    print(
        f"tiny pixel DDPM, digits iid over {CLIENTS} clients, {samples} training samples each "
        f"way, lr {args.lr:g}, FD on {args.eval_samples} DDIM-{args.sample_steps} samples"
    )
    print(f"centralised   FD(CLIP) = {central:8.3f}   ({central_s:.0f} s)")
    print(f"FedAvg C=4 E=4 FD(CLIP) = {fed:8.3f}   ({fed_s:.0f} s, {wire:,} bytes on the wire)")
    print(f"ratio FedAvg / centralised = {fed / central:.3f}")


if __name__ == "__main__":
    main()
