"""A plug-in method, loaded by import path: ``method = "examples.best_peer:BEST_PEER"``.

    flwr run . --run-config "method='examples.best_peer:BEST_PEER'"

A plug-in is a :class:`~cmfl_flower.methods.Method`: its client routine and its server strategy
in one object, importable wherever the ServerApp and the ClientApps run. This one keeps the
relay's client routine and changes the server: each client receives only the vectors of the
peer that had the best local accuracy in the previous round.
"""

from __future__ import annotations

from cmfl_flower.aliases import Arrays, Metrics
from cmfl_flower.methods import Method
from cmfl_flower.methods.relay import CmflRelay, relay_round
from cmfl_flower.wire import relay_arrays


class BestPeerRelay(CmflRelay):
    """Relay only the best peer's class tokens (by last round's local accuracy)."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.local_acc: dict[int, float] = {}  # partition id -> last local accuracy

    def absorb(self, server_round: int, node_id: int, metrics: Metrics, arrays: Arrays) -> None:
        """The relay's bookkeeping, and the sender's local accuracy."""
        super().absorb(server_round, node_id, metrics, arrays)
        self.local_acc[int(metrics["partition-id"])] = float(metrics["local-acc"])

    def arrays_for(self, server_round: int, node_id: int) -> Arrays:
        """The vectors of the peer with the best last local accuracy (none in round 1)."""
        own = self.partitions.get(node_id)
        peers = {p: acc for p, acc in self.local_acc.items() if p != own and p in self.latest}
        if not peers:
            return {}
        best = max(sorted(peers), key=lambda p: peers[p])
        return relay_arrays(self.latest[best])


BEST_PEER = Method("best-peer-relay", relay_round, strategy=BestPeerRelay)
