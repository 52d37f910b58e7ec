"""Wire format of relayed class tokens: round trip, packing, and refusal of every bad message."""

import re

import numpy as np
import pytest

from cmfl_flower.wire import (
    TokenEntry,
    WireError,
    WireLimits,
    parse_relay,
    parse_reply,
    read_relay,
    relay_arrays,
    reply_arrays,
)

LIMITS = WireLimits(token_dim=4, num_classes=10, max_tokens=3, max_bytes=400)


def vectors(n=2, dim=4, dtype=np.float32, start=0):
    return (np.arange(n * dim, dtype=np.float64).reshape(n, dim) / 10 + start).astype(dtype)


def packed(rows, n_vectors=None, dim=4, vector_dtype=np.float32, index_dtype=np.int32):
    """A hand-built message: ``rows`` of the index, vectors for the rows they name."""
    total = sum(row[-1] for row in rows) if n_vectors is None else n_vectors
    return {
        "vectors": vectors(total, dim, vector_dtype),
        "index": np.asarray(rows, dtype=index_dtype).reshape(len(rows), -1),
    }


def test_labelled_round_trip_keeps_class_ids_and_values():
    sent = reply_arrays({7: vectors(1, start=7), 2: vectors(2, start=2)}, labelled=True)
    assert set(sent) == {"vectors", "index"}
    assert sent["index"].tolist() == [[2, 2], [7, 1]]  # class order, n_tokens
    parsed = parse_reply(sent, LIMITS, labelled=True)
    assert [(e.class_id, len(e.vectors)) for e in parsed] == [(2, 2), (7, 1)]
    relayed = relay_arrays([TokenEntry(3, e.class_id, e.vectors) for e in parsed])
    assert relayed["index"].tolist() == [[3, 2, 2], [3, 7, 1]]
    received = parse_relay(relayed, LIMITS)
    assert [(e.sender, e.class_id) for e in received] == [(3, 2), (3, 7)]
    assert np.array_equal(received[0].vectors, vectors(2, start=2))
    assert np.array_equal(received[1].vectors, vectors(1, start=7))


def test_relay_is_read_in_sender_then_class_order():
    entries = [TokenEntry(s, c, vectors(1, start=10 * s + c)) for s, c in ((5, 1), (0, 4), (5, 0))]
    received = parse_relay(relay_arrays(entries), LIMITS)
    assert [(e.sender, e.class_id) for e in received] == [(0, 4), (5, 0), (5, 1)]
    assert [float(e.vectors[0, 0]) for e in received] == [4.0, 50.0, 51.0]


def test_packing_costs_two_arrays_whatever_the_number_of_classes():
    entries = [TokenEntry(s, c, vectors(1)) for s in range(3) for c in range(3)]
    relayed = relay_arrays(entries)
    assert [(k, v.shape) for k, v in sorted(relayed.items())] == [
        ("index", (9, 3)),
        ("vectors", (9, 4)),
    ]
    assert relay_arrays([]) == {} and parse_relay({}, LIMITS) == []


def test_unlabelled_relay_carries_no_class_id():
    sent = reply_arrays({7: vectors(1), 2: vectors(2)}, labelled=False)
    assert sent["index"][:, 0].tolist() == [-1, -1]
    parsed = parse_reply(sent, LIMITS, labelled=False)
    relayed = relay_arrays([TokenEntry(1, e.class_id, e.vectors) for e in parsed])
    received = parse_relay(relayed, LIMITS)
    assert [(e.class_id, len(e.vectors)) for e in received] == [(None, 2), (None, 1)]
    with pytest.raises(WireError, match="class-id: .* no class id travels"):
        parse_reply(packed([[2, 2]]), LIMITS, labelled=False)
    with pytest.raises(WireError, match="class-id: .* every entry names its class"):
        parse_reply(packed([[-1, 2]]), LIMITS, labelled=True)


def test_float16_and_int64_are_accepted_and_widened():
    message = packed([[1, 2]], vector_dtype=np.float16, index_dtype=np.int64)
    (entry,) = parse_reply(message, LIMITS, labelled=True)
    assert entry.vectors.dtype == np.float32 and entry.class_id == 1


@pytest.mark.parametrize(
    ("arrays", "reason"),
    [
        (packed([[1, 2]], dim=5), "dim: vectors: embedding dim 5, backbone expects 4"),
        (packed([[1, 4]]), "tokens: index: 4 tokens, allowed 1..3"),
        (packed([[1, 0], [2, 1]]), "tokens: index: 0 tokens"),
        (packed([[1, 2]], n_vectors=3), "index: index: 2 rows named, vectors has 3"),
        (packed([[1, 1], [1, 1]]), "class-id: index: class id 1 twice"),
        (packed([[12, 1]]), "class-id: index: class id 12 unknown"),
        (packed([[1, 2]], vector_dtype=np.float64), "dtype: vectors: dtype float64 not allowed"),
        (packed([[1, 2]], vector_dtype=np.int32), "dtype: vectors: dtype int32 not allowed"),
        (packed([[1, 2]], index_dtype=np.float32), "dtype: index: dtype float32 not allowed"),
        (packed([[1, 1, 2]]), "shape: index: shape (1, 3) is not (entries >= 1, 2)"),
        (
            {"vectors": np.zeros(4, np.float32), "index": np.array([[1, 1]], np.int32)},
            "shape: vectors: shape (4,) is not (n_tokens, D)",
        ),
        (
            {"vectors": np.full((1, 4), np.nan, np.float32), "index": np.array([[1, 1]], np.int32)},
            "non-finite: vectors: hold NaN or Inf",
        ),
        (
            {"vectors": np.full((1, 4), np.inf, np.float32), "index": np.array([[1, 1]], np.int32)},
            "non-finite",
        ),
        ({"vectors": vectors(1)}, "key: arrays ['vectors']: expected ['index', 'vectors']"),
        ({"c1": vectors(1)}, "key: arrays ['c1']"),
        (packed([[c, 3] for c in range(10)]), "size: 560 bytes of arrays exceed tokens.max-bytes"),
    ],
)
def test_bad_replies_are_refused_with_the_reason(arrays, reason):
    with pytest.raises(WireError, match=re.escape(reason)):
        parse_reply(arrays, LIMITS, labelled=True)


def test_relay_index_is_checked_on_receipt():
    with pytest.raises(WireError, match=r"shape: index: shape \(1, 2\) is not"):
        parse_relay(packed([[1, 1]]), LIMITS)
    with pytest.raises(WireError, match="class id 11 unknown"):
        parse_relay(packed([[0, 11, 1]]), LIMITS)
    with pytest.raises(WireError, match="sender id is negative"):
        parse_relay(packed([[-2, 1, 1]]), LIMITS)
    with pytest.raises(WireError, match="class id 1 of sender 4 twice"):
        parse_relay(packed([[4, 1, 1], [4, 1, 1]]), LIMITS)


NORM_LIMITS = WireLimits(token_dim=4, num_classes=10, max_tokens=3, max_bytes=10_000, max_norm=5.0)


def test_a_reply_with_a_token_beyond_the_norm_bound_is_refused():
    long = vectors(2)
    long[1] *= 100  # one token of norm ~100 beside one of ~0.4
    with pytest.raises(WireError, match=r"norm: vectors: a token of norm .* exceeds 5"):
        parse_reply({"vectors": long, "index": np.array([[3, 2]], np.int32)}, NORM_LIMITS, True)
    assert parse_reply(packed([[3, 2]]), NORM_LIMITS, labelled=True)  # within the bound


def test_a_receiver_drops_only_the_unusable_entries_and_counts_them_by_rule():
    rows = np.concatenate([vectors(1), vectors(1) * 100, np.full((1, 4), np.nan), vectors(1)])
    index = np.array([[0, 1, 1], [1, 2, 1], [2, 3, 1], [0, 1, 1]], np.int32)  # last: a repeat
    extra = {"vectors": rows.astype(np.float32), "index": index}
    kept, dropped = read_relay(extra, NORM_LIMITS)
    assert [(e.sender, e.class_id) for e in kept] == [(0, 1)]
    assert dropped == {"norm": 1, "non-finite": 1, "class-id": 1}
    unknown = {"vectors": vectors(2), "index": np.array([[5, 12, 1], [6, 2, 1]], np.int32)}
    kept, dropped = read_relay(unknown, NORM_LIMITS)
    assert [(e.sender, e.class_id) for e in kept] == [(6, 2)] and dropped == {"class-id": 1}


def test_a_relay_message_whose_frame_does_not_read_drops_every_entry_it_names():
    kept, dropped = read_relay(packed([[0, 1, 2], [1, 2, 1]], n_vectors=4), NORM_LIMITS)
    assert kept == [] and dropped == {"index": 2}
    kept, dropped = read_relay({"weights": vectors(1)}, NORM_LIMITS)
    assert kept == [] and dropped == {"key": 1}
    assert read_relay({}, NORM_LIMITS) == ([], {})


SET_LIMITS = WireLimits(token_dim=4, num_classes=10, max_tokens=3, max_bytes=4000, max_sets=2)


def test_cluster_sets_travel_beside_their_class_and_are_read_back():
    sent = reply_arrays(
        {2: vectors(1, start=2)}, labelled=True, sets={(2, 1): vectors(1, start=21)}
    )
    assert sent["sets"].tolist() == [0, 1]
    parsed = parse_reply(sent, SET_LIMITS, labelled=True)
    assert [(e.class_id, e.set) for e in parsed] == [(2, 0), (2, 1)]
    relayed = relay_arrays([TokenEntry(4, e.class_id, e.vectors, e.set) for e in parsed])
    received, dropped = read_relay(relayed, SET_LIMITS)
    assert [(e.sender, e.class_id, e.set) for e in received] == [(4, 2, 0), (4, 2, 1)]
    assert float(received[1].vectors[0, 0]) == 21.0 and not dropped
    assert "sets" not in reply_arrays({2: vectors(1)}, labelled=True)  # no sets: two arrays


@pytest.mark.parametrize(
    ("sets", "reason"),
    [
        ([0, 3], "set: sets: set 3"),  # beyond tokens.clusters
        ([0, -1], "set: sets: set -1"),
        ([1, 1], "set: index: class id 2's set 1 without the class's own vectors"),
        ([0, 0], "class-id: index: class id 2 twice"),
    ],
)
def test_a_reply_with_bad_sets_is_refused(sets, reason):
    message = packed([[2, 1], [2, 1]], dim=4) | {"sets": np.asarray(sets, np.int32)}
    with pytest.raises(WireError, match=re.escape(reason)):
        parse_reply(message, SET_LIMITS, labelled=True)


def test_a_receiver_drops_sets_out_of_range_and_those_whose_class_was_dropped():
    entries = [
        TokenEntry(1, 2, vectors(1)),
        TokenEntry(1, 2, vectors(1), 1),
        TokenEntry(1, 2, vectors(1), 5),  # beyond max_sets
        TokenEntry(3, 4, np.full((1, 4), np.nan, np.float32)),  # its class's vectors go...
        TokenEntry(3, 4, vectors(1), 1),  # ...and so does its set
    ]
    received, dropped = read_relay(relay_arrays(entries), SET_LIMITS)
    assert [(e.sender, e.class_id, e.set) for e in received] == [(1, 2, 0), (1, 2, 1)]
    assert dropped == {"set": 2, "non-finite": 1}


def test_sets_are_refused_when_the_receiver_accepts_none():
    message = relay_arrays([TokenEntry(1, 2, vectors(1)), TokenEntry(1, 2, vectors(1), 1)])
    received, dropped = read_relay(message, LIMITS)  # max_sets 0: tokens.clusters = 1
    assert [e.set for e in received] == [0] and dropped == {"set": 1}
    with pytest.raises(WireError, match="sets: shape"):
        parse_relay(message | {"sets": np.zeros(3, np.int32)}, SET_LIMITS)
