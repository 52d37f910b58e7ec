"""A custom Flower strategy for the weight methods: FedAvg that leaves out outsized updates.

    flwr run . --run-config "method='encoder-lora' \
        strategy='examples.norm_screened:NormScreenedFedAvg' strategy-args='max_ratio=3.0'"

Any :class:`~flwr.serverapp.strategy.Strategy` subclass can be named this way; the app passes
it the ``federation`` sampling settings its ``__init__`` takes and ``strategy-args`` as keyword
arguments. This one remembers the global arrays it sends each round and, before averaging,
drops every reply whose update (its arrays minus the global ones) is longer than ``max_ratio``
times the median update of the round: one client scaling its adapter up can no longer drag the
average away, at the price of one ``sort`` per round.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg


class NormScreenedFedAvg(FedAvg):
    """FedAvg over the replies whose update is at most ``max_ratio`` times the round's median."""

    def __init__(
        self,
        max_ratio: float = 3.0,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        weighted_by_key: str = "num-examples",
    ) -> None:
        if max_ratio < 1:
            raise ValueError(f"max_ratio must be >= 1 (the median update passes), got {max_ratio}")
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            weighted_by_key=weighted_by_key,
        )
        self.max_ratio = max_ratio
        self.sent: list[np.ndarray] = []  # the global arrays of the round in progress

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's messages; the global arrays are kept to measure the updates against."""
        self.sent = arrays.to_numpy_ndarrays()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg over the replies left after screening."""
        replies = list(replies)
        norms = {id(m): self._update_norm(m) for m in replies if not m.has_error()}
        if not norms:
            return super().aggregate_train(server_round, replies)
        bound = self.max_ratio * float(np.median(list(norms.values())))
        kept = [m for m in replies if m.has_error() or norms[id(m)] <= bound]
        for message in replies:
            norm = norms.get(id(message), 0.0)
            if norm > bound:
                node = message.metadata.src_node_id
                log(WARNING, "round %d: left out node %d's update (norm %.3g > %.3g)",
                    server_round, node, norm, bound)  # fmt: skip
        return super().aggregate_train(server_round, kept)

    def _update_norm(self, message: Message) -> float:
        """L2 norm of a reply's arrays minus the round's global arrays, over all arrays."""
        arrays = message.content.array_records[self.arrayrecord_key].to_numpy_ndarrays()
        squares = sum(
            float(np.sum((a.astype(np.float64) - g) ** 2))
            for a, g in zip(arrays, self.sent, strict=True)
        )
        return float(squares**0.5)
