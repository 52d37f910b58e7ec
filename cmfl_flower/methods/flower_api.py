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


def message_bytes(message: Message) -> int:
    """Bytes of ``message`` as Flower ships it: every serialised object of its tree."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


def with_message_type(message: Message, message_type: str) -> Message:
    """``message`` routed to ``message_type`` (e.g. ``train.cmfl_relay``)."""
    message.metadata.message_type = message_type
    return message
