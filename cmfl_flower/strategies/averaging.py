"""``fedavg-encoder`` and ``fedprox-encoder``: FedAvg / FedProx over the vision LoRA.

The standard baselines the method is compared with. Clients start each round from the global
adapter (record ``arrays``: the LoRA weights; round 1 sends none and every client starts from
the same seeded initialisation), train on local images, and send their adapter back with
``num-train``; the server takes the example-weighted mean.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cmfl_flower.aggregate import weighted_mean
from cmfl_flower.config import AppConfig
from cmfl_flower.results import Row, RunRecorder
from cmfl_flower.strategies.base import Arrays, CmflStrategy


def adapter_problem(arrays: Arrays, expected: Arrays) -> str | None:
    """Why ``arrays`` cannot be averaged with adapters laid out as ``expected`` (or None)."""
    if not arrays or set(arrays) != set(expected):
        return "keys: adapter keys differ from the global adapter's"
    for key, value in arrays.items():
        if value.dtype.kind != "f" or value.dtype != expected[key].dtype:
            return f"dtype: {key!r} is {value.dtype}, expected {expected[key].dtype}"
        if value.shape != expected[key].shape:
            return f"shape: {key!r} is {value.shape}, expected {expected[key].shape}"
        if not np.isfinite(value).all():
            return f"non-finite: {key!r} holds NaN or Inf"
    return None


class FedAvgEncoder(CmflStrategy):
    """FedAvg over the vision LoRA, weighted by the number of training examples."""

    task = "encoder-fedavg"

    def __init__(self, cfg: AppConfig, recorder: RunRecorder) -> None:
        super().__init__(cfg, recorder)
        self.global_arrays: Arrays | None = None
        self._collected: list[tuple[Arrays, float]] = []

    def arrays_for(self, server_round: int, node_id: int) -> Arrays | None:
        """The global adapter (None before the first average)."""
        return self.global_arrays

    def absorb(self, server_round: int, node_id: int, row: Row, arrays: Arrays) -> str | None:
        """Keep the adapter and its weight for this round's average."""
        weight = row.get("num-train")
        if not isinstance(weight, int) or weight <= 0:
            return f"metrics: 'num-train' missing or not positive: {weight!r}"
        # the layout to match: the global adapter; in round 1 the first accepted reply's
        expected = self.global_arrays or (self._collected[0][0] if self._collected else arrays)
        if reason := adapter_problem(arrays, expected):
            return reason
        self._collected.append((arrays, float(weight)))
        return None

    def end_round(self, server_round: int) -> dict[str, Any]:
        """Average this round's adapters into the global one."""
        if self._collected:
            self.global_arrays = weighted_mean(self._collected)
        averaged = len(self._collected)
        self._collected = []
        return {"averaged": averaged}

    def state(self) -> tuple[Arrays, dict[str, Any]]:
        """The global adapter (empty before the first average)."""
        return dict(self.global_arrays or {}), {}

    def load_state(self, arrays: Arrays, meta: dict[str, Any]) -> None:
        """Restore the global adapter."""
        self.global_arrays = dict(arrays) or None


class FedProxEncoder(FedAvgEncoder):
    """FedAvg with FedProx's proximal term on the clients (``federation.proximal-mu``)."""

    task = "encoder-fedprox"
