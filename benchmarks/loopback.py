"""An in-process Grid: a strategy talks to a ClientApp in the same process, without Ray.

For tests and benchmarks (it is not part of the installed app). With ``keep_messages=True``
every message and reply is kept for a test to read (``sent``, ``replies``); by default none is,
so that a long run does not hold every model it shipped. Each node has its own ``Context``
whose ``run_config`` is the run's flat config, as ``flwr run`` gives it (its ``context.state``
persists across rounds, as on a SuperNode). A client that raises produces an error reply, as
Flower does.

It stands in for Flower's runtime, so it uses three Flower internals, each once, and
``tests/test_flower_api.py`` checks them: the process's ``TaskIdentity`` (a ServerApp process
has one before it builds messages), a delivered message's id and a reply's source node.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=no-name-in-module
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from cmfl_flower.config import AppConfig

ClientCall = Callable[[Message, Context], Message]


class LoopbackGrid(Grid):
    """Deliver each message to an in-process ClientApp and return its reply."""

    def __init__(
        self,
        client_app: ClientCall,
        run_config: AppConfig | Mapping[str, Any],
        num_nodes: int,
        first_node_id: int = 1000,
        keep_messages: bool = False,
    ) -> None:
        self.client_app = client_app
        # off by default: a FedAvg run of 900 rounds would hold every 2.8 MB model it shipped
        self.keep_messages = keep_messages
        if isinstance(run_config, AppConfig):
            run_config = run_config.to_run_config()
        self.contexts = {
            first_node_id + pid: Context(
                run_id=1,
                node_id=first_node_id + pid,
                node_config={"partition-id": pid, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for pid in range(num_nodes)
        }
        self._sent: list[Message] = []
        self._replies: list[Message] = []
        self.overrides: dict[int, ClientCall] = {}  # node id -> another ClientApp
        self.waiting: dict[str, Message] = {}  # message id -> its reply, not pulled yet
        # what a ServerApp process has set before it builds messages
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1

    @property
    def sent(self) -> list[Message]:
        """Every message delivered, in order (only with ``keep_messages=True``)."""
        return self._kept(self._sent)

    @property
    def replies(self) -> list[Message]:
        """Every reply, in the order of ``sent`` (only with ``keep_messages=True``)."""
        return self._kept(self._replies)

    def _kept(self, messages: list[Message]) -> list[Message]:
        if not self.keep_messages:
            raise RuntimeError(
                "this LoopbackGrid keeps no messages: build it with keep_messages=True"
            )
        return messages

    # --- the Grid API; strategies use get_node_ids and send_and_receive ---
    def set_run(self, run: Run) -> None:
        """Not needed in-process."""
        raise NotImplementedError

    @property
    def run(self) -> Run:
        """Not needed in-process."""
        raise NotImplementedError

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Build a message (deprecated in Flower; kept for the interface)."""
        return Message(content, dst_node_id, message_type, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """Every node of the loopback federation."""
        return list(self.contexts)

    def get_nodes(self) -> Iterable[NodeInfo]:
        """Not needed in-process."""
        raise NotImplementedError

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver each message to its node's ClientApp at once; keep its reply to pull."""
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            if self.keep_messages:
                self._sent.append(message)
            node = message.metadata.dst_node_id
            app = self.overrides.get(node, self.client_app)
            try:
                reply = app(message, self.contexts[node])
            except Exception as err:
                reply = Message(Error(code=1, reason=repr(err)), reply_to=message)
            reply.metadata.__dict__["_src_node_id"] = node
            if self.keep_messages:
                self._replies.append(reply)
            self.waiting[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies to ``message_ids`` that were not pulled yet."""
        return [self.waiting.pop(mid) for mid in message_ids if mid in self.waiting]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Deliver each message to its node's ClientApp; return the replies."""
        return self.pull_messages(list(self.push_messages(messages)))
