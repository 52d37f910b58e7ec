"""What a client does in one round, free of Flower.

It loads its partition, updates its image encoder and evaluates. The ClientApp only unpacks
the message and calls :func:`run_task`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from cmfl_flower.backbones import resolve_device, resolve_preset
from cmfl_flower.config import AppConfig, DataConfig
from cmfl_flower.data import (
    ClientData,
    LabeledImages,
    PartitionSpec,
    default_data_root,
    ensure_partitions,
    load_global_test,
    load_partition,
)
from cmfl_flower.encoder import (
    ClipEncoder,
    LoraSpec,
    LoraState,
    accuracy,
    class_text_features,
    load_encoder,
    train_encoder,
)
from cmfl_flower.protocol import ROUND_KEY

Metrics = dict[str, Any]  # scalar values: int | float


@dataclass(frozen=True)
class ClientTask:
    """Who runs this round, and which round it is."""

    partition_id: int
    num_partitions: int
    server_round: int


@dataclass
class ClientState:
    """What a client keeps between rounds (small; the backbone is shared)."""

    lora: LoraState | None = None


@dataclass
class RoundOutput:
    """A round's metrics and the client's updated state."""

    metrics: Metrics
    state: ClientState = field(default_factory=ClientState)


def parse_task(
    node_config: Mapping[str, Any], config: Mapping[str, Any]
) -> tuple[AppConfig, ClientTask]:
    """Read the node's partition and the message's run config and round."""
    missing = [key for key in ("partition-id", "num-partitions") if key not in node_config]
    if missing:
        raise ValueError(
            f"node config lacks {', '.join(missing)}: start the SuperNode with "
            "--node-config 'partition-id=<i> num-partitions=<n>'"
        )
    flat = dict(config)
    server_round = flat.pop(ROUND_KEY, None)
    task = ClientTask(
        partition_id=_as_int("partition-id", node_config["partition-id"]),
        num_partitions=_as_int("num-partitions", node_config["num-partitions"]),
        server_round=_as_int(ROUND_KEY, server_round),
    )
    if not 0 <= task.partition_id < task.num_partitions:
        raise ValueError(
            f"partition-id = {task.partition_id} is outside 0..{task.num_partitions - 1}"
        )
    return AppConfig.from_run_config(flat), task


def _as_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be an integer, got {value!r}")
    return value


def partition_spec(cfg: DataConfig, num_partitions: int) -> PartitionSpec:
    """The partitioning the data config asks for, over ``num_partitions`` clients."""
    return PartitionSpec(
        dataset=cfg.dataset,
        path=cfg.path,
        num_partitions=num_partitions,
        partitioner=cfg.partitioner,
        alpha=cfg.alpha,
        classes_per_client=cfg.classes_per_client,
        min_partition_size=cfg.min_partition_size,
        test_fraction=cfg.test_fraction,
        seed=cfg.seed,
    )


def data_dir(cfg: DataConfig, num_partitions: int) -> Path:
    """The prepared partition directory (prepared on first use for the offline default)."""
    root = Path(cfg.dir).expanduser() if cfg.dir else default_data_root()
    return ensure_partitions(partition_spec(cfg, num_partitions), root)


@cache
def _global_test(directory: Path) -> LabeledImages:
    """The global test set, read once per process (it is the same for every client)."""
    return load_global_test(directory)


def client_seed(cfg: AppConfig, task: ClientTask) -> int:
    """A seed unique to (run seed, round, client)."""
    return (cfg.seed * 1_000_003 + task.server_round * 10_007 + task.partition_id) % 2**31


def encoder_for(cfg: AppConfig, state: ClientState) -> ClipEncoder:
    """The process-wide encoder with this client's adapter active."""
    device = resolve_device(cfg.backbone.device)
    spec = LoraSpec.from_config(cfg.encoder)
    encoder = load_encoder(resolve_preset(cfg.backbone), str(device), cfg.seed, spec)
    encoder.load_lora_state(state.lora if state.lora is not None else encoder.init_state)
    return encoder


def evaluate_client(
    cfg: AppConfig, encoder: ClipEncoder, data: ClientData, global_test: LabeledImages
) -> Metrics:
    """Accuracy on the client's own test split and on the global test set."""
    text = class_text_features(encoder.bundle, global_test.class_names)  # (C, D)
    batch = cfg.encoder.eval_batch_size
    return {
        "local-acc": accuracy(encoder, data.test.images, data.test.labels, text, batch),
        "global-acc": accuracy(encoder, global_test.images, global_test.labels, text, batch),
    }


def local_only_round(cfg: AppConfig, task: ClientTask, state: ClientState) -> RoundOutput:
    """Train the vision LoRA on local images only, then evaluate."""
    directory = data_dir(cfg.data, task.num_partitions)
    data = load_partition(directory, task.partition_id)
    global_test = _global_test(directory)
    encoder = encoder_for(cfg, state)
    text = class_text_features(encoder.bundle, global_test.class_names)  # (C, D)
    start = time.perf_counter()
    loss = train_encoder(
        encoder, data.train.images, data.train.labels, text, cfg.encoder, client_seed(cfg, task)
    )
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    metrics = evaluate_client(cfg, encoder, data, global_test)
    metrics |= {
        "partition-id": task.partition_id,
        "num-train": len(data.train),
        "num-test": len(data.test),
        "train-loss": loss,
        "seconds-encoder": train_seconds,
        "seconds-eval": time.perf_counter() - start,
    }
    return RoundOutput(metrics, ClientState(lora=encoder.lora_state()))


TASKS: dict[str, Callable[[AppConfig, ClientTask, ClientState], RoundOutput]] = {
    "local-only": local_only_round,
}


def run_task(name: str, cfg: AppConfig, task: ClientTask, state: ClientState) -> RoundOutput:
    """Run the named client routine (the server names it in every message)."""
    if name not in TASKS:
        raise ValueError(f"unknown client task {name!r}; known: {', '.join(sorted(TASKS))}")
    return TASKS[name](cfg, task, state)
