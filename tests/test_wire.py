"""Wire format of relayed class tokens: round trip and refusal of every kind of bad array."""

import numpy as np
import pytest

from cmfl_flower.wire import (
    TokenEntry,
    WireError,
    WireLimits,
    parse_relay,
    parse_reply,
    relay_arrays,
    reply_arrays,
)

LIMITS = WireLimits(token_dim=4, num_classes=10, max_tokens=3, max_bytes=400)


def vectors(n=2, dim=4, dtype=np.float32):
    return np.arange(n * dim, dtype=dtype).reshape(n, dim) / 10


def test_labelled_round_trip_keeps_class_ids_and_values():
    sent = reply_arrays({7: vectors(1), 2: vectors(2)}, labelled=True)
    assert list(sent) == ["c2", "c7"]
    parsed = parse_reply(sent, LIMITS, labelled=True)
    assert [e.class_id for e in parsed.values()] == [2, 7]
    relayed = relay_arrays([TokenEntry(3, e.class_id, e.vectors) for e in parsed.values()])
    assert list(relayed) == ["s3.c2", "s3.c7"]
    received = parse_relay(relayed, LIMITS)
    assert [(e.sender, e.class_id) for e in received] == [(3, 2), (3, 7)]
    assert np.array_equal(received[1].vectors, vectors(1))


def test_unlabelled_relay_carries_no_class_id():
    sent = reply_arrays({7: vectors(1), 2: vectors(2)}, labelled=False)
    assert list(sent) == ["v0", "v1"]
    parsed = parse_reply(sent, LIMITS, labelled=False)
    relayed = relay_arrays([TokenEntry(1, e.class_id, e.vectors) for e in parsed.values()])
    assert list(relayed) == ["s1.v0", "s1.v1"]
    assert all(e.class_id is None for e in parse_relay(relayed, LIMITS))
    with pytest.raises(WireError, match="does not match"):
        parse_reply({"c2": vectors()}, LIMITS, labelled=False)


def test_float16_is_accepted_and_widened():
    parsed = parse_reply({"c1": vectors(dtype=np.float16)}, LIMITS, labelled=True)
    assert parsed["c1"].vectors.dtype == np.float32


@pytest.mark.parametrize(
    ("arrays", "reason"),
    [
        ({"c1": vectors(dim=5)}, "embedding dim 5, backbone expects 4"),
        ({"c1": vectors(n=4)}, "4 tokens, allowed 1..3"),
        ({"c1": np.zeros((0, 4), np.float32)}, "0 tokens"),
        ({"c1": np.full((1, 4), np.nan, np.float32)}, "NaN or Inf"),
        ({"c1": np.full((1, 4), np.inf, np.float32)}, "NaN or Inf"),
        ({"c1": vectors().astype(np.float64)}, "dtype float64 not allowed"),
        ({"c1": vectors().astype(np.int32)}, "dtype int32 not allowed"),
        ({"c1": np.zeros(4, np.float32)}, "is not (n_tokens, D)"),
        ({"c12": vectors()}, "class id 12 unknown"),
        ({"x1": vectors()}, "does not match"),
        ({f"c{i}": vectors(3) for i in range(10)}, "exceed tokens.max-bytes"),
    ],
)
def test_bad_arrays_are_refused_with_the_reason(arrays, reason):
    with pytest.raises(WireError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        parse_reply(arrays, LIMITS, labelled=True)


def test_relay_keys_are_checked_on_receipt():
    with pytest.raises(WireError, match="does not match"):
        parse_relay({"c1": vectors()}, LIMITS)
    with pytest.raises(WireError, match="class id 11 unknown"):
        parse_relay({"s0.c11": vectors()}, LIMITS)
