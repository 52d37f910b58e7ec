"""An example plug-in strategy, loaded by import path: ``tests.example_plugin:BestPeerRelay``.

It follows the :class:`~cmfl_flower.strategies.CmflStrategy` contract by subclassing the
built-in relay and overriding one hook: each client receives only the vectors of the peer that
had the best local accuracy in the previous round.
"""

from __future__ import annotations

from cmfl_flower.results import Row
from cmfl_flower.strategies.base import Arrays
from cmfl_flower.strategies.relay import CmflRelay
from cmfl_flower.wire import relay_arrays


class BestPeerRelay(CmflRelay):
    """Relay only the best peer's class tokens (by last round's local accuracy)."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.local_acc: dict[int, float] = {}  # partition id -> last local accuracy

    def absorb(self, server_round: int, node_id: int, row: Row, arrays: Arrays) -> str | None:
        reason = super().absorb(server_round, node_id, row, arrays)
        if reason is None:
            self.local_acc[row["partition-id"]] = float(row["local-acc"])
        return reason

    def arrays_for(self, server_round: int, node_id: int) -> Arrays:
        own = self.partitions.get(node_id)
        peers = {p: acc for p, acc in self.local_acc.items() if p != own and p in self.latest}
        if not peers:
            return {}
        best = max(sorted(peers), key=lambda p: peers[p])
        return relay_arrays(self.latest[best])
