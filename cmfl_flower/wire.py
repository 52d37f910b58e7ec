"""The relay's wire format: class-token vectors packed into two arrays, validated on receipt.

Schema (one ArrayRecord per message; this module works on ``{key: ndarray}``). A message
with no vectors is empty; otherwise it holds exactly two arrays:

* ``vectors``: ``(R, D)`` float32 or float16, every entry's token vectors stacked in entry
  order (``R`` the total number of tokens);
* ``index``: int32 (int64 accepted), one row per entry, saying whose vectors the next rows of
  ``vectors`` are:

  * client -> server: ``(E, 2)`` rows ``[class id, n_tokens]``;
  * server -> client: ``(E, 3)`` rows ``[sender, class id, n_tokens]``, ``sender`` the
    partition id of the client the vectors came from.

  The class id is ``-1`` in the unlabelled relay (``tokens.relay = "unlabelled"``): no class
  id travels.

``n_tokens`` is the number of tokens of the class name (a few), ``D`` the backbone's token
width (64 tiny, 768 BK-SDM, 1024 BK-SDM-v2): a class costs ``n_tokens * D * 4`` bytes plus a
row of ``index``. Packing matters: Flower frames every array of a message as its own object
(about 460 bytes), more than half the size of a tiny class's vectors.

Every received message is checked: its keys, dtypes, 2-D shapes, ``D``, ``1 <= n_tokens <=
max_tokens``, rows that add up, finite values, every token's L2 norm within ``max_norm``
(``tokens.max-norm-ratio`` times the backbone's largest pretrained token norm), known and
unrepeated class ids, and its total size. The server refuses a whole reply that breaks a rule
(:func:`parse_reply`); a receiver (:func:`read_relay`) drops only the entries that break one
and counts them by rule, so that no peer's content can fail its round.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

VECTORS_KEY = "vectors"
INDEX_KEY = "index"
NO_CLASS = -1  # class id column of the unlabelled relay
ALLOWED_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
INDEX_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))


class WireError(ValueError):
    """A received message that breaks the schema; the message says which rule and why.

    ``kind`` names the rule broken (``key``, ``dtype``, ``shape``, ``dim``, ``tokens``,
    ``index``, ``non-finite``, ``norm``, ``size``, ``class-id``); the text reads
    ``"<kind>: <detail>"`` so that the server can count refusals per kind.
    """

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


@dataclass(frozen=True)
class WireLimits:
    """What a receiver accepts (``max_norm``: the longest token vector, L2)."""

    token_dim: int
    num_classes: int
    max_tokens: int
    max_bytes: int
    max_norm: float = math.inf


@dataclass(frozen=True)
class TokenEntry:
    """One class's vectors from one sender (``class_id`` None in the unlabelled relay)."""

    sender: int
    class_id: int | None
    vectors: np.ndarray  # (n_tokens, D) float32


def reply_arrays(bank: Mapping[int, np.ndarray], labelled: bool) -> dict[str, np.ndarray]:
    """A client's vectors (class id -> ``(n_tokens, D)``) as a reply, in class order."""
    entries = [TokenEntry(-1, c if labelled else None, bank[c]) for c in sorted(bank)]
    return _pack(entries, with_sender=False)


def relay_arrays(entries: list[TokenEntry]) -> dict[str, np.ndarray]:
    """Vectors of several senders as one message for one receiver, in the entries' order."""
    return _pack(entries, with_sender=True)


def parse_reply(
    arrays: Mapping[str, np.ndarray], limits: WireLimits, labelled: bool
) -> list[TokenEntry]:
    """Validate a client's reply; its entries with ``sender`` left as -1."""
    entries = _unpack(arrays, limits, with_sender=False)
    for entry in entries:
        if (entry.class_id is not None) != labelled:
            rule = "labelled relay every entry names its class"
            if not labelled:
                rule = "unlabelled relay no class id travels"
            raise WireError("class-id", f"index: in the {rule}")
    _refuse_repeats(entries)
    return entries


def parse_relay(arrays: Mapping[str, np.ndarray], limits: WireLimits) -> list[TokenEntry]:
    """Validate what the server relayed to this client, ordered by sender, then class id."""
    entries = _unpack(arrays, limits, with_sender=True)
    if any(entry.sender < 0 for entry in entries):
        raise WireError("index", "index: a sender id is negative")
    _refuse_repeats(entries)
    return sorted(entries, key=lambda e: (e.sender, _class_column(e)))


def read_relay(
    arrays: Mapping[str, np.ndarray], limits: WireLimits
) -> tuple[list[TokenEntry], Counter[str]]:
    """What the server relayed, without the entries that break a rule, and why each went.

    Never raises on content: a message whose frame does not read (keys, dtypes, shapes, rows)
    drops every entry it names (at least one); an entry breaking a per-entry rule (tokens,
    class id, non-finite, norm, a repeated (sender, class), a negative sender) is dropped
    alone. The counter maps each rule's kind to the entries dropped for it.
    """
    dropped: Counter[str] = Counter()
    if not arrays:
        return [], dropped
    try:
        vectors, index = _frame(arrays, limits, with_sender=True)
    except WireError as err:
        shape: tuple[int, ...] = tuple(getattr(arrays.get(INDEX_KEY), "shape", ()))
        dropped[err.kind] += max(1, shape[0]) if len(shape) == 2 else 1
        return [], dropped
    kept: list[TokenEntry] = []
    seen: set[tuple[int, int]] = set()
    for sender, column, rows in _rows(vectors, index, with_sender=True):
        problem = _entry_problem(sender, column, rows, limits, seen)
        if problem is not None:
            dropped[problem.kind] += 1
            continue
        kept.append(TokenEntry(sender, _class_id(column, limits), rows))
    return sorted(kept, key=lambda e: (e.sender, _class_column(e))), dropped


def _pack(entries: list[TokenEntry], with_sender: bool) -> dict[str, np.ndarray]:
    if not entries:
        return {}
    rows = [
        [*([e.sender] if with_sender else []), _class_column(e), len(e.vectors)] for e in entries
    ]
    vectors = np.concatenate([np.asarray(e.vectors, dtype=np.float32) for e in entries])  # (R, D)
    return {VECTORS_KEY: vectors, INDEX_KEY: np.asarray(rows, dtype=np.int32)}  # index (E, 2|3)


def _class_column(entry: TokenEntry) -> int:
    return NO_CLASS if entry.class_id is None else entry.class_id


def _unpack(
    arrays: Mapping[str, np.ndarray], limits: WireLimits, with_sender: bool
) -> list[TokenEntry]:
    """Every entry of a message, or :class:`WireError` at the first rule broken."""
    if not arrays:
        return []
    vectors, index = _frame(arrays, limits, with_sender)
    entries = []
    for sender, column, rows in _rows(vectors, index, with_sender):
        if (problem := _entry_problem(sender, column, rows, limits, None)) is not None:
            raise problem
        entries.append(TokenEntry(sender, _class_id(column, limits), rows))
    return entries


def _frame(
    arrays: Mapping[str, np.ndarray], limits: WireLimits, with_sender: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The message's (R, D) float32 vectors and (E, 2|3) int64 index, its frame checked.

    The frame: keys, total size, dtypes, shapes, ``D``, and token counts that are positive
    and add up to ``R`` (so that every entry's rows can be found).
    """
    if set(arrays) != {VECTORS_KEY, INDEX_KEY}:
        raise WireError(
            "key", f"arrays {sorted(arrays)}: expected exactly {[INDEX_KEY, VECTORS_KEY]}"
        )
    total = sum(int(getattr(value, "nbytes", 0)) for value in arrays.values())
    if total > limits.max_bytes:
        raise WireError(
            "size", f"{total} bytes of arrays exceed tokens.max-bytes = {limits.max_bytes}"
        )
    vectors = _check_vectors(arrays[VECTORS_KEY], limits)
    index = _check_index(arrays[INDEX_KEY], 3 if with_sender else 2)
    counts = index[:, -1]  # (E,)
    if (counts < 1).any():
        raise WireError(
            "tokens",
            f"index: {int(counts[counts < 1][0])} tokens, allowed 1..{limits.max_tokens}"
            " (tokens.max-tokens)",
        )
    if int(counts.sum()) != len(vectors):
        raise WireError(
            "index", f"index: {int(counts.sum())} rows named, vectors has {len(vectors)}"
        )
    return vectors, index


def _rows(
    vectors: np.ndarray, index: np.ndarray, with_sender: bool
) -> list[tuple[int, int, np.ndarray]]:
    """(sender, class column, (n_tokens, D) vectors) per index row; sender -1 in a reply."""
    counts = index[:, -1]  # (E,)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return [
        (int(row[0]) if with_sender else -1, int(row[-2]), vectors[start : start + count])
        for row, start, count in zip(index, starts, counts, strict=True)
    ]


def _entry_problem(
    sender: int,
    column: int,
    rows: np.ndarray,
    limits: WireLimits,
    seen: set[tuple[int, int]] | None,
) -> WireError | None:
    """The first per-entry rule that one entry breaks, or None.

    ``seen``: the labelled (sender, class) pairs of a relay message kept so far, to which a
    kept pair is added (None: a reply, whose repeats :func:`_refuse_repeats` checks).
    """
    if len(rows) > limits.max_tokens:
        return WireError(
            "tokens",
            f"index: {len(rows)} tokens, allowed 1..{limits.max_tokens} (tokens.max-tokens)",
        )
    if column != NO_CLASS and not 0 <= column < limits.num_classes:
        return WireError(
            "class-id", f"index: class id {column} unknown ({limits.num_classes} classes)"
        )
    if seen is not None and sender < 0:
        return WireError("index", "index: a sender id is negative")
    if not np.isfinite(rows).all():
        return WireError("non-finite", "vectors: hold NaN or Inf")
    if (longest := float(np.linalg.norm(rows.astype(np.float64), axis=1).max())) > limits.max_norm:
        return WireError(
            "norm",
            f"vectors: a token of norm {longest:.4g} exceeds {limits.max_norm:.4g} "
            "(tokens.max-norm-ratio times the backbone's largest pretrained token norm)",
        )
    if seen is not None and column != NO_CLASS:
        if (sender, column) in seen:
            return WireError("class-id", f"index: class id {column} of sender {sender} twice")
        seen.add((sender, column))
    return None


def _check_vectors(value: np.ndarray, limits: WireLimits) -> np.ndarray:
    if not isinstance(value, np.ndarray) or value.dtype not in ALLOWED_DTYPES:
        kind = getattr(value, "dtype", type(value).__name__)
        raise WireError("dtype", f"vectors: dtype {kind} not allowed (float32, float16)")
    if value.ndim != 2:
        raise WireError("shape", f"vectors: shape {value.shape} is not (n_tokens, D)")
    if value.shape[1] != limits.token_dim:
        raise WireError(
            "dim", f"vectors: embedding dim {value.shape[1]}, backbone expects {limits.token_dim}"
        )
    return np.ascontiguousarray(value, dtype=np.float32)


def _check_index(value: np.ndarray, columns: int) -> np.ndarray:
    if not isinstance(value, np.ndarray) or value.dtype not in INDEX_DTYPES:
        kind = getattr(value, "dtype", type(value).__name__)
        raise WireError("dtype", f"index: dtype {kind} not allowed (int32, int64)")
    if value.ndim != 2 or value.shape[1] != columns or not len(value):
        raise WireError("shape", f"index: shape {value.shape} is not (entries >= 1, {columns})")
    return value.astype(np.int64)


def _class_id(value: int, limits: WireLimits) -> int | None:
    """The class id of an index row's class column (checked by :func:`_entry_problem`)."""
    return None if value == NO_CLASS else value


def _refuse_repeats(entries: list[TokenEntry]) -> None:
    """A labelled (sender, class) pair appears once in a message."""
    seen: set[tuple[int, int]] = set()
    for entry in entries:
        if entry.class_id is None:
            continue
        pair = (entry.sender, entry.class_id)
        if pair in seen:
            who = "" if entry.sender < 0 else f" of sender {entry.sender}"
            raise WireError("class-id", f"index: class id {entry.class_id}{who} twice")
        seen.add(pair)
