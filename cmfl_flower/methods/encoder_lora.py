"""``encoder-lora``: federated training of the vision LoRA, combined by a Flower strategy.

The standard baseline the method is compared with. Every round the server's strategy
(``strategy``: FedAvg by default, or FedAdam, Krum, ...) sends the global adapter; each client
trains it on its local images (with FedProx's proximal term when the strategy sends
``proximal-mu``) and replies with its adapter and ``num-examples``. Round 1 sends the seeded
initial adapter every client would start from. After each round the server scores the global
adapter on the global test set (``server-global-acc``). A client also answers Flower's
``evaluate`` message (``federation.fraction-evaluate``): the global adapter on its test split.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import torch

from cmfl_flower.aliases import Arrays, Metrics
from cmfl_flower.backbones import resolve_device, resolve_preset
from cmfl_flower.client.task import ClientState, ClientTask, RoundOutput
from cmfl_flower.client.workspace import base_metrics, evaluate, open_workspace
from cmfl_flower.config import AppConfig
from cmfl_flower.data import LabeledImages, load_source, opaque_names
from cmfl_flower.encoder import ClipEncoder, LoraSpec, accuracy, load_encoder, train_encoder
from cmfl_flower.methods.base import Method
from cmfl_flower.tokens import TextSide


def _encoder(cfg: AppConfig) -> ClipEncoder:
    """The process-wide encoder of the preset, with the seeded initial adapter available."""
    device = str(resolve_device(cfg.backbone.device))
    spec = LoraSpec.from_config(cfg.encoder)
    return load_encoder(resolve_preset(cfg.backbone), device, cfg.seed, spec)


def initial_adapter(cfg: AppConfig, run_dir: Path | None = None) -> Arrays:
    """The seeded initial vision adapter every client starts from."""
    return {k: v.detach().cpu().numpy().copy() for k, v in _encoder(cfg).init_state.items()}


def load_adapter(encoder: ClipEncoder, arrays: Arrays) -> None:
    """Activate the global adapter ``arrays``; refuse one that does not fit."""
    expected = encoder.init_state
    if missing := sorted(set(expected) - set(arrays)):
        raise ValueError(f"global adapter lacks {missing[:3]} ({len(missing)} in all)")
    for key, value in arrays.items():
        if key in expected and value.shape != tuple(expected[key].shape):
            raise ValueError(
                f"global adapter {key!r}: shape {value.shape}, expected "
                f"{tuple(expected[key].shape)}"
            )
        if not np.isfinite(value).all():
            raise ValueError(f"global adapter {key!r} holds NaN or Inf")
    encoder.load_lora_state({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()})


def encoder_round(
    cfg: AppConfig, task: ClientTask, state: ClientState, received: Arrays
) -> RoundOutput:
    """Start from the global vision LoRA, train locally, send the adapter back."""
    ws = open_workspace(cfg, task, None)
    load_adapter(ws.encoder, received)
    mu = float(task.server_config.get("proximal-mu", 0.0))  # sent by Flower's FedProx
    names = ws.name_features()  # (C, E)
    with ws.phase("encoder"):
        loss = train_encoder(
            ws.encoder, ws.local_set(), names, cfg.encoder, ws.seed, mu, ws.progress
        )
    ws.save_artifacts()
    metrics = evaluate(ws, names) | base_metrics(ws)
    metrics |= {"train-loss": loss, "num-examples": len(ws.data.train)}
    arrays = {k: v.numpy() for k, v in ws.encoder.lora_state().items()}
    return RoundOutput(metrics | ws.timings, ClientState(), arrays)


def encoder_evaluate(cfg: AppConfig, task: ClientTask, received: Arrays) -> Metrics:
    """Flower's ``evaluate``: the global adapter on the client's test split."""
    ws = open_workspace(cfg, task, None)
    load_adapter(ws.encoder, received)
    names = ws.name_features()  # (C, E)
    batch = cfg.encoder.eval_batch_size
    test = ws.data.test
    return {
        "local-acc": accuracy(ws.encoder, test.images, test.labels, names, batch),
        "num-examples": len(test),
    }


@cache
def _global_test(dataset: str, path: str) -> LabeledImages:
    return load_source(dataset, "test", path)


def server_accuracy(cfg: AppConfig, run_dir: Path, server_round: int, arrays: Arrays) -> Metrics:
    """The global adapter's accuracy on the global test set (``server-global-acc``)."""
    test = _global_test(cfg.data.dataset, cfg.data.path)
    encoder = _encoder(cfg)
    load_adapter(encoder, arrays)
    text = TextSide.build(encoder.bundle, cfg.tokens.template)
    real = test.class_names
    names = opaque_names(len(real)) if cfg.data.class_names == "opaque" else real
    with torch.no_grad():
        features = text.encode([text.name_vectors(n) for n in names])  # (C, E)
    batch = cfg.encoder.eval_batch_size
    return {"server-global-acc": accuracy(encoder, test.images, test.labels, features, batch)}


ENCODER_LORA = Method(
    "encoder-lora",
    encoder_round,
    initial_arrays=initial_adapter,
    server_evaluate=server_accuracy,
    evaluate=encoder_evaluate,
    learning_rate=lambda cfg: cfg.encoder.lr,
)
