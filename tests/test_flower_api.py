"""The Flower APIs that are not public, one test each: an upgrade that breaks one fails here."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Error, Message, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.task_identity import TaskIdentity

from benchmarks.loopback import LoopbackGrid
from cmfl_flower.config import AppConfig
from cmfl_flower.server.flower_api import message_bytes, with_message_type


def _message(size: int) -> Message:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    record = ArrayRecord({"a": Array(np.zeros(size, np.float32))})
    return Message(RecordDict({"arrays": record}), 7, "train")


def test_message_bytes_counts_the_serialised_arrays():
    small, large = message_bytes(_message(10)), message_bytes(_message(10_010))
    assert small > 40  # the array's 40 bytes, plus the records around it
    assert 40_000 <= large - small <= 40_016  # 10,000 more float32 values (and a longer shape)


def test_a_shared_content_is_measured_once_and_counted_for_every_message():
    first = _message(1000)
    second = Message(first.content, 8, "train")  # FedAvg sends one RecordDict to every node
    whole = sum(len(o.deflate()) for o in get_all_nested_objects(first).values())
    shared: dict[int, int] = {}
    assert message_bytes(first, shared) == whole == message_bytes(first)
    assert len(shared) == 1 and message_bytes(second, shared) == whole  # same size of header
    assert len(shared) == 1


def test_a_message_can_be_routed_to_an_action():
    message = with_message_type(_message(1), "train.cmfl_relay")
    assert message.metadata.message_type == "train.cmfl_relay"
    assert message.metadata.dst_node_id == 7


def test_the_loopback_grid_delivers_like_flowers_runtime():
    def echo(message: Message, context) -> Message:  # type: ignore[no-untyped-def]
        return Message(RecordDict(), reply_to=message)

    grid = LoopbackGrid(echo, AppConfig(), 2, keep_messages=True)
    (reply,) = grid.send_and_receive([Message(RecordDict(), 1001, "train")])
    assert grid.sent[0].metadata.message_id  # an id, as the SuperLink gives it
    assert reply.metadata.src_node_id == 1001
    assert reply.metadata.reply_to_message_id == grid.sent[0].metadata.message_id
    # by default nothing is kept, and reading what was sent says so instead of an empty list
    quiet = LoopbackGrid(echo, AppConfig(), 2)
    assert len(quiet.send_and_receive([Message(RecordDict(), 1000, "train")])) == 1
    with pytest.raises(RuntimeError, match="keep_messages=True"):
        _ = quiet.sent


def test_an_error_reply_has_bytes_too():
    reply = Message(Error(code=1, reason="client exploded"), reply_to=_message(1))
    assert message_bytes(reply) > len("client exploded")
