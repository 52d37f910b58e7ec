"""Every use of a Flower API that is not public, wrapped here and nowhere else.

``tests/test_flower_api.py`` exercises each one, so a Flower upgrade that moves or changes one
fails there, by name, instead of somewhere deep in a run.

* :func:`message_bytes`: Flower ships a message as its serialised ("deflated") objects; the
  public API offers no size, so the bytes on the wire are summed from
  ``flwr.supercore.inflatable``.
"""

from __future__ import annotations

from flwr.app import Message
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects


def message_bytes(message: Message, content_bytes: dict[int, int] | None = None) -> int:
    """Bytes of ``message`` as Flower ships it: every serialised object of its tree.

    ``content_bytes`` remembers, by object identity, the bytes of record trees that several
    live messages share (Flower's FedAvg sends one ``RecordDict`` to every node), so a
    round serialises a shared model once, not once per node.
    """
    if not message.has_content():  # an error reply
        return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())
    cache = {} if content_bytes is None else content_bytes
    key = id(message.content)
    if key not in cache:
        objects = get_all_nested_objects(message.content).values()
        cache[key] = sum(len(obj.deflate()) for obj in objects)
    return cache[key] + len(message.deflate())


def with_message_type(message: Message, message_type: str) -> Message:
    """``message`` routed to ``message_type`` (e.g. ``train.cmfl_relay``)."""
    message.metadata.message_type = message_type
    return message
