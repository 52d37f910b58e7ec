"""Partition ids as identities: which node speaks for which partition, for the whole run.

A partition id is bound to the first node whose reply for it was used; that node keeps it
while it is connected, and a node that replaces a gone one takes it over (a restarted
SuperNode: a new node id, reported as ``partitions-moved``). A node holds one partition. Ids
outside ``0..count - 1`` are refused as ``partition-id``, claims of a live node's partition (or
of a second partition) as ``partition-claim``. A reply naming no partition binds nothing (the
relay refuses it; a weight method uses it). The bindings are checkpointed.
"""

from __future__ import annotations

from logging import INFO
from typing import Any

from flwr.common.logger import log


class Partitions:
    """The run's partition bindings, and this round's replies and moves."""

    def __init__(self, count: int) -> None:
        self.count = count  # replies may claim partition ids 0..count - 1
        self.bound: dict[int, int] = {}  # partition id -> its node, for the run
        self.connected: set[int] = set()  # node ids the grid listed when the round sampled
        self.new_round()

    def new_round(self) -> None:
        """Forget the last round's replies and moves (the bindings stay)."""
        self.replied: dict[int, int] = {}  # partition id -> the node it replied from
        self.moved: dict[int, tuple[int, int]] = {}  # partition id -> (gone node, new node)

    def claim_refusal(self, node: int, partition: Any) -> str | None:
        """Why ``node`` may not speak for ``partition``, or None."""
        if not isinstance(partition, int):
            return None
        if not 0 <= partition < self.count:
            return (
                f"partition-id: partition-id {partition} is outside 0..{self.count - 1}"
                " (federation.num-partitions, else the nodes connected at the start)"
            )
        holder = self.bound.get(partition, node)
        if holder != node and holder in self.connected:
            return (
                f"partition-claim: partition-id {partition} is bound to live node {holder}; "
                f"node {node}'s claim refused"
            )
        if held := sorted(p for p, n in self.bound.items() if n == node and p != partition):
            return (
                f"partition-claim: node {node} is bound to partition-id {held[0]}; its claim of "
                f"partition-id {partition} refused"
            )
        return None

    def bind(self, partition: int, node: int) -> None:
        """Bind ``partition`` to ``node``, whose reply for it was used this round."""
        if (old := self.bound.get(partition, node)) != node:
            self.moved[partition] = (old, node)
        self.bound[partition] = node
        self.replied[partition] = node

    def missing(self, asked: set[int]) -> list[int]:
        """Known partitions without a usable reply whose node was ``asked`` or is gone.

        A partition whose node is connected but was not sampled this round is not missing.
        """
        return sorted(
            partition
            for partition, node in self.bound.items()
            if partition not in self.replied and (node in asked or node not in self.connected)
        )

    def moved_line(self, server_round: int) -> str:
        """``"<partition>:<old node>-><new node>,..."`` for partitions on a new node this round."""
        moved = dict(sorted(self.moved.items()))
        for partition, (old, new) in moved.items():
            log(INFO, "round %d: partition-id %d moved from node %d to node %d (a restarted "
                "SuperNode)", server_round, partition, old, new)  # fmt: skip
        return ",".join(f"{p}:{old}->{new}" for p, (old, new) in moved.items())

    def state(self) -> dict[str, Any]:
        """The bindings and the partition count, JSON-able."""
        bound = {str(p): n for p, n in sorted(self.bound.items())}
        return {"bound": bound, "num-partitions": self.count}

    def restore(self, saved: dict[str, Any], fixed: bool) -> None:
        """Take back :meth:`state`; unless the count is ``fixed``, keep the larger count."""
        self.bound = {int(p): int(n) for p, n in saved.get("bound", {}).items()}
        if not fixed:
            self.count = max(self.count, int(saved.get("num-partitions", 0)))
