"""``diffusion-unet`` and ``diffusion-lora``: federated training of a diffusion model.

``diffusion-unet`` (FedAvg pre-training, as in the federated-diffusion paper): the global
weights are the whole UNet (a pixel DDPM, or the preset's text-conditional UNet with
``diffusion.model = "conditional"``); each client trains them for ``diffusion.local-steps``
steps on its images and replies with them and ``num-examples``.

Both keep each client's AdamW state between rounds on its node's disk (the client state, so it
survives restarts; ``diffusion.keep-optimizer``) and train at the round's learning rate
(``diffusion.lr-schedule``). A server-side optimiser is the ``strategy`` key's (``fedadam``,
``fedavgm``).

``diffusion-lora`` (federated LoRA fine-tuning): only a LoRA on the attention projections of the
preset's UNet travels; round 1 sends the seeded adapter (its B matrices are zero).

The ``strategy`` key (FedAvg by default) combines the replies. After each round the server
saves the global model for diffusers and, every ``diffusion.eval-every`` rounds and after the
last, renders a sample grid and measures its Fréchet distance
(:class:`~cmfl_flower.fed_diffusion_server.DiffusionPublisher`); ``model-bytes`` is the full UNet's
size beside the bytes on the wire.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from cmfl_flower.aliases import Arrays, Metrics
from cmfl_flower.client.task import ClientState, ClientTask, RoundOutput, client_seed
from cmfl_flower.client.workspace import client_data
from cmfl_flower.config import AppConfig
from cmfl_flower.fed_diffusion import (
    LocalData,
    LocalStep,
    captions_for,
    fedavg_round,
    fedlora_round,
    limit_images,
    round_lr,
)
from cmfl_flower.methods.base import Method

if TYPE_CHECKING:  # the server's side, which clients do not import
    from cmfl_flower.fed_diffusion_server import DiffusionPublisher, ModelKind

_PUBLISHERS: dict[tuple[str, ModelKind], DiffusionPublisher] = {}


def _kind(cfg: AppConfig, lora: bool) -> ModelKind:
    return "lora" if lora else cfg.diffusion.model


def publisher(cfg: AppConfig, run_dir: Path, lora: bool) -> DiffusionPublisher:
    """The run's publisher (one per run directory: it caches models and reference features)."""
    from cmfl_flower.fed_diffusion_server import DiffusionPublisher

    key = (str(run_dir), _kind(cfg, lora))
    if key not in _PUBLISHERS:
        _PUBLISHERS[key] = DiffusionPublisher(cfg, run_dir, key[1])
    return _PUBLISHERS[key]


def _diffusion_data(cfg: AppConfig, task: ClientTask) -> LocalData:
    """The client's training images (at most ``diffusion.images-per-client``), captioned."""
    train = client_data(cfg.data, task)[0].train
    keep = limit_images(
        len(train), cfg.diffusion.images_per_client, cfg.data.seed + task.partition_id
    )
    template = cfg.diffusion.caption_template
    return LocalData(
        train.images[keep], captions_for(train.labels[keep], train.class_names, template)
    )


def _round(
    cfg: AppConfig, task: ClientTask, state: ClientState, received: Arrays, lora: bool
) -> RoundOutput:
    if not received:
        raise ValueError(f"{cfg.method}: the server sent no global weights")
    data = _diffusion_data(cfg, task)
    start = time.perf_counter()
    d = cfg.diffusion
    step = LocalStep(
        round_lr(d, task.server_round, cfg.federation.rounds),
        state.optimizer if d.keep_optimizer else None,
    )
    train = fedlora_round if lora else fedavg_round
    arrays, loss, optimizer = train(cfg, data, received, client_seed(cfg, task), step)
    metrics: Metrics = {
        "partition-id": task.partition_id,
        "num-train": len(data.images),
        "num-examples": len(data.images),
        "train-loss": loss,
        "seconds-diffusion": time.perf_counter() - start,
    }
    kept = ClientState(optimizer=optimizer if d.keep_optimizer else None)
    return RoundOutput(metrics, kept, arrays)


def unet_round(
    cfg: AppConfig, task: ClientTask, state: ClientState, received: Arrays
) -> RoundOutput:
    """Train the global diffusion UNet for E local steps on local images; send it back."""
    return _round(cfg, task, state, received, lora=False)


def lora_round(
    cfg: AppConfig, task: ClientTask, state: ClientState, received: Arrays
) -> RoundOutput:
    """Fine-tune the global UNet LoRA on local image-caption pairs; send the LoRA back."""
    return _round(cfg, task, state, received, lora=True)


def _initial(lora: bool) -> Callable[[AppConfig, Path], Arrays]:
    def initial(cfg: AppConfig, run_dir: Path) -> Arrays:
        """Round 1's global weights; a bad evaluation setup fails here, before any client."""
        pub = publisher(cfg, run_dir, lora)
        pub.check()
        return pub.initial_arrays()

    return initial


def _publish(lora: bool) -> Callable[[AppConfig, Path, int, Arrays], Metrics]:
    def publish(cfg: AppConfig, run_dir: Path, server_round: int, arrays: Arrays) -> Metrics:
        """Save the global model; render and measure it every ``diffusion.eval-every`` rounds.

        ``model-bytes``: the full UNet's size.
        """
        from cmfl_flower.fed_diffusion_server import measured

        pub = publisher(cfg, run_dir, lora)
        measure = measured(cfg, server_round)
        if lora:
            scores = pub.publish_adapter(server_round, arrays, measure)
        else:
            scores = pub.publish_unet(server_round, arrays, measure)
        return scores | {"model-bytes": pub.model_bytes()}

    return publish


DIFFUSION_UNET = Method(
    "diffusion-unet",
    unet_round,
    initial_arrays=_initial(lora=False),
    server_evaluate=_publish(lora=False),
    learning_rate=lambda cfg: cfg.diffusion.lr,
)
DIFFUSION_LORA = Method(
    "diffusion-lora",
    lora_round,
    initial_arrays=_initial(lora=True),
    server_evaluate=_publish(lora=True),
    learning_rate=lambda cfg: cfg.diffusion.lr,
)
