"""Baselines that share nothing: clients send back scalar metrics only.

* ``local-only``: every client trains its vision LoRA on its own images, text side = names;
* ``local-only-tokens``: the same, plus the relay's learned class tokens (no relay), so
  that "relay - local-only" does not mix token learning with relaying;
* ``names-generation``: learned tokens, and images of the classes a client lacks generated
  from their names: synthetic data at zero communication.

The server side only collects every client's metrics (:class:`CollectMetrics`). The token
baselines import :mod:`cmfl_flower.token_round` (and with it diffusers) when they run, so a
``local-only`` client does not.
"""

from __future__ import annotations

from cmfl_flower.aliases import Arrays
from cmfl_flower.client.task import ClientState, ClientTask, RoundOutput
from cmfl_flower.client.workspace import base_metrics, evaluate, open_workspace
from cmfl_flower.config import AppConfig
from cmfl_flower.encoder import train_encoder
from cmfl_flower.methods.base import Method, RoundStrategy


class CollectMetrics(RoundStrategy):
    """Send nothing but the round; record what the clients report."""


def local_only_round(
    cfg: AppConfig, task: ClientTask, state: ClientState, received: Arrays
) -> RoundOutput:
    """Train the vision LoRA on local images only (pretrained class names), then evaluate."""
    ws = open_workspace(cfg, task, state.lora)
    names = ws.name_features()  # (C, E)
    with ws.phase("encoder"):
        loss = train_encoder(
            ws.encoder, ws.local_set(), names, cfg.encoder, ws.seed, progress=ws.progress
        )
    ws.save_artifacts()
    metrics = evaluate(ws, names) | base_metrics(ws) | {"train-loss": loss}
    return RoundOutput(metrics | ws.timings, ClientState(lora=ws.encoder.lora_state()))


def local_tokens_round(
    cfg: AppConfig, task: ClientTask, state: ClientState, received: Arrays
) -> RoundOutput:
    """Learned tokens and the vision LoRA on local images only; nothing is sent."""
    from cmfl_flower.token_round import token_round

    return token_round(cfg, task, state, received, "none")


def names_generation_round(
    cfg: AppConfig, task: ClientTask, state: ClientState, received: Arrays
) -> RoundOutput:
    """Generate the classes the client lacks from their names; nothing is sent."""
    from cmfl_flower.token_round import token_round

    return token_round(cfg, task, state, received, "names")


LOCAL_ONLY = Method("local-only", local_only_round, strategy=CollectMetrics)
LOCAL_ONLY_TOKENS = Method("local-only-tokens", local_tokens_round, strategy=CollectMetrics)
NAMES_GENERATION = Method("names-generation", names_generation_round, strategy=CollectMetrics)
