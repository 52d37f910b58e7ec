"""``fedavg-encoder`` and ``fedprox-encoder``: FedAvg / FedProx over the vision LoRA.

The standard baselines the method is compared with. Clients start each round from the global
adapter (record ``arrays``: the LoRA weights; round 1 sends none and every client starts from
the same seeded initialisation), train on local images, and send their adapter back with
``num-train``; the server takes the example-weighted mean. With ``privacy.enabled`` the mean
goes through Flower's DP wrapper instead (:mod:`cmfl_flower.strategies.central_dp`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

from flwr.app import ArrayRecord, Message, MetricRecord

from cmfl_flower.aggregate import weighted_mean, weights_problem
from cmfl_flower.client import initial_adapter
from cmfl_flower.config import AppConfig
from cmfl_flower.privacy import round_report
from cmfl_flower.results import Row, RunRecorder
from cmfl_flower.strategies.base import Arrays, CmflStrategy
from cmfl_flower.strategies.central_dp import private_mean


class WeightAveraging(CmflStrategy):
    """FedAvg's server side: keep global weights, send them, take the example-weighted mean.

    Subclasses name the client ``task``; :meth:`initial_arrays` is what round 1 sends. Those
    with ``central_dp`` average through Flower's DP wrapper when ``privacy.enabled``.
    """

    central_dp: ClassVar[bool] = False

    def __init__(self, cfg: AppConfig, recorder: RunRecorder) -> None:
        super().__init__(cfg, recorder)
        if cfg.privacy.enabled and not self.central_dp:
            raise ValueError(
                f"privacy.enabled = true has no mechanism for strategy = {cfg.strategy!r}; "
                "it applies to cmfl-relay, fedavg-encoder and fedprox-encoder"
            )
        self.global_arrays: Arrays | None = None
        self._collected: list[tuple[Arrays, float]] = []
        self._accepted: list[int] = []  # node ids, in the order of _collected
        self._replies: dict[int, Message] = {}

    def initial_arrays(self) -> Arrays | None:
        """What round 1 sends (None: clients start from their shared seeded weights)."""
        return None

    def arrays_for(self, server_round: int, node_id: int) -> Arrays | None:
        """The global weights (round 1: :meth:`initial_arrays`)."""
        if self.global_arrays is None and server_round == 1:
            self.global_arrays = self.initial_arrays()
        return self.global_arrays

    def absorb(self, server_round: int, node_id: int, row: Row, arrays: Arrays) -> str | None:
        """Keep the reply's weights and example count for this round's average."""
        weight = row.get("num-train")
        if not isinstance(weight, int) or weight <= 0:
            return f"metrics: 'num-train' missing or not positive: {weight!r}"
        # the layout to match: the global weights; in round 1 the first accepted reply's
        expected = self.global_arrays or (self._collected[0][0] if self._collected else arrays)
        if reason := weights_problem(arrays, expected):
            return reason
        self._collected.append((arrays, float(weight)))
        self._accepted.append(node_id)
        return None

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Keep the replies (the DP wrapper takes messages), then record and combine them."""
        replies = list(replies)
        self._replies = {reply.metadata.src_node_id: reply for reply in replies}
        return super().aggregate_train(server_round, replies)

    def end_round(self, server_round: int) -> dict[str, Any]:
        """Average this round's weights into the global ones (privately when configured)."""
        out: dict[str, Any] = {"averaged": len(self._collected)}
        if self._collected and self.cfg.privacy.enabled and self.global_arrays is not None:
            accepted = [self._replies[node] for node in self._accepted]
            self.global_arrays = private_mean(
                self.cfg.privacy, server_round, self.global_arrays, accepted
            )
            out |= round_report(self.cfg.privacy, server_round, 0)
        elif self._collected:
            self.global_arrays = weighted_mean(self._collected)
        self._collected, self._accepted, self._replies = [], [], {}
        return out

    def state(self) -> tuple[Arrays, dict[str, Any]]:
        """The global weights (empty before the first average)."""
        return dict(self.global_arrays or {}), {}

    def load_state(self, arrays: Arrays, meta: dict[str, Any]) -> None:
        """Restore the global weights."""
        self.global_arrays = dict(arrays) or None


class FedAvgEncoder(WeightAveraging):
    """FedAvg over the vision LoRA, weighted by the number of training examples."""

    task = "encoder-fedavg"
    central_dp = True

    def initial_arrays(self) -> Arrays | None:
        """Private runs send the seeded initial adapter: round 1's clipping reference."""
        return initial_adapter(self.cfg) if self.cfg.privacy.enabled else None


class FedProxEncoder(FedAvgEncoder):
    """FedAvg with FedProx's proximal term on the clients (``federation.proximal-mu``)."""

    task = "encoder-fedprox"
