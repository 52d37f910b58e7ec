"""What every client routine receives and returns, free of Flower and of models.

A client routine (one per method, in :mod:`cmfl_flower.methods`) takes the run config, a
:class:`ClientTask` (partition, round, what the server decided for this round), the client's
saved :class:`ClientState` and the arrays the server sent, and returns a :class:`RoundOutput`.
The ClientApp imports this module before it knows the method, so it imports no model library:
what a round loads and works with is :mod:`cmfl_flower.client.workspace`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cmfl_flower.aliases import Arrays as Arrays  # re-exported: plug-ins import them here
from cmfl_flower.aliases import Metrics as Metrics
from cmfl_flower.config import AppConfig

if TYPE_CHECKING:
    import torch

    from cmfl_flower.encoder import LoraState
    from cmfl_flower.tokens import TokenState

Scalar = int | float | str | bool


@dataclass(frozen=True)
class ClientTask:
    """Who runs this round, which round it is, and what the server decided for it."""

    partition_id: int
    num_partitions: int
    server_round: int
    server_config: Mapping[str, Scalar] = field(default_factory=dict)  # e.g. Flower's proximal-mu
    data_path: str = ""  # node config data-path: the site's own image folder ("" = a partition)
    eval_path: str = ""  # node config eval-path: the folder global-acc is measured on


@dataclass
class ClientState:
    """What a client keeps between rounds (the backbone is shared, and nothing of it is kept)."""

    lora: LoraState | None = None
    tokens: TokenState | None = None
    optimizer: dict[str, torch.Tensor] | None = None  # flat optimiser state, see fed_diffusion.py
    screening: dict[str, torch.Tensor] | None = None  # c<id> -> (E,) accepted text feature
    replay: dict[str, torch.Tensor] | None = None  # kept generated images, see replay.py


@dataclass
class RoundOutput:
    """A round's metrics, the client's updated state and the arrays it sends back."""

    metrics: Metrics
    state: ClientState = field(default_factory=ClientState)
    arrays: Arrays = field(default_factory=dict)


ClientRoutine = Callable[[AppConfig, ClientTask, ClientState, Arrays], RoundOutput]


def client_task(
    node_config: Mapping[str, Any], server_round: Any, server_config: Mapping[str, Scalar]
) -> ClientTask:
    """Read the node's partition and the round the server names."""
    missing = [key for key in ("partition-id", "num-partitions") if key not in node_config]
    if missing:
        raise ValueError(
            f"node config lacks {', '.join(missing)}: start the SuperNode with "
            "--node-config 'partition-id=<i> num-partitions=<n>'"
        )
    task = ClientTask(
        partition_id=_as_int("partition-id", node_config["partition-id"]),
        num_partitions=_as_int("num-partitions", node_config["num-partitions"]),
        server_round=_as_int("server-round", server_round),
        server_config=dict(server_config),
        data_path=_as_str("data-path", node_config.get("data-path", "")),
        eval_path=_as_str("eval-path", node_config.get("eval-path", "")),
    )
    if not 0 <= task.partition_id < task.num_partitions:
        raise ValueError(
            f"partition-id = {task.partition_id} is outside 0..{task.num_partitions - 1}"
        )
    return task


def _as_str(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"node config {key} must be a path in quotes, got {value!r}")
    return value


def _as_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be an integer, got {value!r}")
    return value


def client_seed(cfg: AppConfig, task: ClientTask) -> int:
    """A seed unique to (run seed, round, client)."""
    return (cfg.seed * 1_000_003 + task.server_round * 10_007 + task.partition_id) % 2**31
