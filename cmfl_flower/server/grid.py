"""Flower's Grid as the round loop sees it.

Every message out and every reply in goes through a :class:`Listener` (the run's
:class:`~cmfl_flower.server.rounds.Session`), and node ids come in order.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, Protocol

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from cmfl_flower.config import AppConfig

POLL_SECONDS = 0.5  # how often the server asks the SuperLink for replies


class Listener(Protocol):
    """What :class:`RecordingGrid` tells, and asks of, the round loop."""

    train_exchanges: int  # train rounds sent so far

    def listed(self, nodes: set[int]) -> None:
        """The node ids the grid listed (connected now)."""

    def outgoing(self, message: Message) -> Message:
        """The message to send in place of ``message``."""
        ...

    def incoming(self, replies: Iterable[Message], recipients: dict[str, int]) -> list[Message]:
        """The replies the strategy may use."""
        ...


class RecordingGrid(Grid):
    """Flower's Grid with a :class:`Listener` on the way out and on the way back."""

    def __init__(self, grid: Grid, session: Listener) -> None:
        self.grid = grid
        self.session = session

    def set_run(self, run: Any) -> None:
        """Flower's."""
        self.grid.set_run(run)

    @property
    def run(self) -> Any:
        """Flower's."""
        return self.grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Flower's."""
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """Flower's, in id order (for seeded sampling); the session remembers who was connected."""
        nodes = sorted(self.grid.get_node_ids())
        self.session.listed(set(nodes))
        return nodes

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Not used by ``Strategy.start``: refused, so no message escapes the recording."""
        raise NotImplementedError("cmfl-flower strategies exchange through send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Not used by ``Strategy.start`` (see :meth:`push_messages`)."""
        raise NotImplementedError("cmfl-flower strategies exchange through send_and_receive")

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Stamp and measure the messages; record and check the replies."""
        batch = list(messages)
        if not batch:
            return []
        if any(m.metadata.message_type.startswith("train") for m in batch):
            self.session.train_exchanges += 1  # one per round: Strategy.start's loop
        sent = [self.session.outgoing(m) for m in batch]
        ids = list(self.grid.push_messages(sent))
        recipients = {mid: m.metadata.dst_node_id for mid, m in zip(ids, sent, strict=True)}
        return self.session.incoming(self._pull(set(ids), timeout), recipients)

    def _pull(self, pending: set[str], timeout: float | None) -> list[Message]:
        """Flower's ``send_and_receive`` loop, polling every :data:`POLL_SECONDS` (not 3 s)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending and (deadline is None or time.monotonic() < deadline):
            pulled = list(self.grid.pull_messages(pending))
            replies += pulled
            pending -= {m.metadata.reply_to_message_id for m in pulled}
            if pending:
                time.sleep(POLL_SECONDS)
        return replies


def wait_for_nodes(grid: Grid, cfg: AppConfig) -> int:
    """Wait up to ``federation.wait-for-nodes`` s for ``min-nodes`` nodes; return how many."""
    fed = cfg.federation
    deadline = time.monotonic() + fed.wait_for_nodes
    while len(nodes := list(grid.get_node_ids())) < fed.min_nodes:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"only {len(nodes)} node(s) connected after {fed.wait_for_nodes:.0f} s; "
                f"federation.min-nodes = {fed.min_nodes}"
            )
        time.sleep(1.0)
    return len(nodes)
