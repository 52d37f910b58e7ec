"""``fedavg-encoder`` and ``fedprox-encoder``: FedAvg / FedProx over the vision LoRA.

The standard baselines the method is compared with. Clients start each round from the global
adapter (record ``arrays``: the LoRA weights; round 1 sends none and every client starts from
the same seeded initialisation), train on local images, and send their adapter back with
``num-train``; the server takes the example-weighted mean.
"""

from __future__ import annotations

from typing import Any

from cmfl_flower.aggregate import weighted_mean, weights_problem
from cmfl_flower.config import AppConfig
from cmfl_flower.results import Row, RunRecorder
from cmfl_flower.strategies.base import Arrays, CmflStrategy


class WeightAveraging(CmflStrategy):
    """FedAvg's server side: keep global weights, send them, take the example-weighted mean.

    Subclasses name the client ``task``; :meth:`initial_arrays` is what round 1 sends.
    """

    def __init__(self, cfg: AppConfig, recorder: RunRecorder) -> None:
        super().__init__(cfg, recorder)
        self.global_arrays: Arrays | None = None
        self._collected: list[tuple[Arrays, float]] = []

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
        return None

    def end_round(self, server_round: int) -> dict[str, Any]:
        """Average this round's weights into the global ones."""
        if self._collected:
            self.global_arrays = weighted_mean(self._collected)
        averaged = len(self._collected)
        self._collected = []
        return {"averaged": averaged}

    def state(self) -> tuple[Arrays, dict[str, Any]]:
        """The global weights (empty before the first average)."""
        return dict(self.global_arrays or {}), {}

    def load_state(self, arrays: Arrays, meta: dict[str, Any]) -> None:
        """Restore the global weights."""
        self.global_arrays = dict(arrays) or None


class FedAvgEncoder(WeightAveraging):
    """FedAvg over the vision LoRA, weighted by the number of training examples."""

    task = "encoder-fedavg"


class FedProxEncoder(FedAvgEncoder):
    """FedAvg with FedProx's proximal term on the clients (``federation.proximal-mu``)."""

    task = "encoder-fedprox"
