"""The relay's wire format: class-token vectors packed into two arrays, validated on receipt.

Schema (one ArrayRecord per message; this module works on ``{key: ndarray}``). A message
with no vectors is empty; otherwise it holds two arrays, or three:

* ``vectors``: ``(R, D)`` float32 or float16, every entry's token vectors stacked in entry
  order (``R`` the total number of tokens);
* ``index``: int32 (int64 accepted), one row per entry, saying whose vectors the next rows of
  ``vectors`` are:

  * client -> server: ``(E, 2)`` rows ``[class id, n_tokens]``;
  * server -> client: ``(E, 3)`` rows ``[sender, class id, n_tokens]``, ``sender`` the
    partition id of the client the vectors came from.

  The class id is ``-1`` in the unlabelled relay (``tokens.relay = "unlabelled"``): no class
  id travels.
* ``sets`` (only with ``tokens.clusters`` >= 2): int32 ``(E,)``, each entry's set: 0 for the
  class's own vectors, ``1..K`` for the vectors learned on one cluster of the sender's images
  of that class. A set ``k >= 1`` of a (sender, class) travels only beside its set 0.

``n_tokens`` is the number of tokens of the class name (a few), ``D`` the backbone's token
width (64 tiny, 768 BK-SDM, 1024 BK-SDM-v2): a class costs ``n_tokens * D * 4`` bytes plus a
row of ``index``. Packing matters: Flower frames every array of a message as its own object
(about 460 bytes), more than half the size of a tiny class's vectors.

Every received message is checked: its keys, dtypes, 2-D shapes, ``D``, ``1 <= n_tokens <=
max_tokens``, rows that add up, finite values, every token's L2 norm within ``max_norm``
(``tokens.max-norm-ratio`` times the backbone's largest pretrained token norm), known and
unrepeated class ids, set numbers within ``0..max_sets`` with their class's set 0 present,
and its total size. The server refuses a whole reply that breaks a rule
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
SETS_KEY = "sets"
NO_CLASS = -1  # class id column of the unlabelled relay
ALLOWED_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
INDEX_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))


class WireError(ValueError):
    """A received message that breaks the schema; the message says which rule and why.

    ``kind`` names the rule broken (``key``, ``dtype``, ``shape``, ``dim``, ``tokens``,
    ``index``, ``non-finite``, ``norm``, ``size``, ``class-id``, ``set``); the text reads
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
    max_sets: int = 0  # highest set number accepted (``tokens.clusters`` when it is >= 2)


@dataclass(frozen=True)
class TokenEntry:
    """One class's vectors from one sender (``class_id`` None in the unlabelled relay).

    ``set``: 0 for the class's own vectors, ``k >= 1`` for those of the sender's ``k``-th
    cluster of its images of the class (``tokens.clusters``).
    """

    sender: int
    class_id: int | None
    vectors: np.ndarray  # (n_tokens, D) float32
    set: int = 0

    @property
    def pair(self) -> tuple[int, int | None]:
        """(sender, class id): the (sender, class) set this entry belongs to."""
        return self.sender, self.class_id


def reply_arrays(
    bank: Mapping[int, np.ndarray],
    labelled: bool,
    sets: Mapping[tuple[int, int], np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """A client's vectors (class id -> ``(n_tokens, D)``) as a reply, in class, then set order.

    ``sets``: its cluster sets, (class id, set >= 1) -> ``(n_tokens, D)`` (labelled only).
    """
    entries = [TokenEntry(-1, c if labelled else None, bank[c]) for c in sorted(bank)]
    entries += [TokenEntry(-1, c, v, k) for (c, k), v in sorted((sets or {}).items())]
    return _pack(sorted(entries, key=_order), with_sender=False)  # stable: unlabelled keep order


def relay_arrays(entries: list[TokenEntry]) -> dict[str, np.ndarray]:
    """Vectors of several senders as one message for one receiver, in the entries' order."""
    return _pack(entries, with_sender=True)


def parse_reply(
    arrays: Mapping[str, np.ndarray], limits: WireLimits, labelled: bool
) -> list[TokenEntry]:
    """Validate a client's reply; its entries with ``sender`` left as -1."""
    entries = _unpack(arrays, limits, with_sender=False)
    if orphans := _orphans(entries):
        raise WireError("set", f"index: class id {orphans[0].class_id}'s set {orphans[0].set} "
                        "without the class's own vectors (set 0)")  # fmt: skip
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
    if orphans := _orphans(entries):
        raise WireError("set", f"index: a set of sender {orphans[0].sender}'s class "
                        f"{orphans[0].class_id} without the class's own vectors")  # fmt: skip
    return sorted(entries, key=_order)


def read_relay(
    arrays: Mapping[str, np.ndarray], limits: WireLimits
) -> tuple[list[TokenEntry], Counter[str]]:
    """What the server relayed, without the entries that break a rule, and why each went.

    Never raises on content: a message whose frame does not read (keys, dtypes, shapes, rows)
    drops every entry it names (at least one); an entry breaking a per-entry rule (tokens,
    class id, non-finite, norm, a repeated (sender, class, set), a negative sender, a set
    number out of range) is dropped alone, and so is a cluster set whose class's own vectors
    were not kept (``set``). The counter maps each rule's kind to the entries dropped for it.
    """
    dropped: Counter[str] = Counter()
    if not arrays:
        return [], dropped
    try:
        vectors, index, sets = _frame(arrays, limits, with_sender=True)
    except WireError as err:
        shape: tuple[int, ...] = tuple(getattr(arrays.get(INDEX_KEY), "shape", ()))
        dropped[err.kind] += max(1, shape[0]) if len(shape) == 2 else 1
        return [], dropped
    kept: list[TokenEntry] = []
    seen: set[tuple[int, int, int]] = set()
    for sender, column, number, rows in _rows(vectors, index, sets, with_sender=True):
        problem = _entry_problem(sender, column, number, rows, limits, seen)
        if problem is not None:
            dropped[problem.kind] += 1
            continue
        kept.append(TokenEntry(sender, _class_id(column), rows, number))
    if orphans := _orphans(kept):
        dropped["set"] += len(orphans)
        kept = [entry for entry in kept if entry not in orphans]
    return sorted(kept, key=_order), dropped


def _pack(entries: list[TokenEntry], with_sender: bool) -> dict[str, np.ndarray]:
    if not entries:
        return {}
    rows = [
        [*([e.sender] if with_sender else []), _class_column(e), len(e.vectors)] for e in entries
    ]
    vectors = np.concatenate([np.asarray(e.vectors, dtype=np.float32) for e in entries])  # (R, D)
    out = {VECTORS_KEY: vectors, INDEX_KEY: np.asarray(rows, dtype=np.int32)}  # index (E, 2|3)
    if any(e.set for e in entries):
        out[SETS_KEY] = np.asarray([e.set for e in entries], dtype=np.int32)  # (E,)
    return out


def _class_column(entry: TokenEntry) -> int:
    return NO_CLASS if entry.class_id is None else entry.class_id


def _order(entry: TokenEntry) -> tuple[int, int, int]:
    return entry.sender, _class_column(entry), entry.set


def _orphans(entries: list[TokenEntry]) -> list[TokenEntry]:
    """The cluster sets (set >= 1) whose (sender, class) has no set 0 among ``entries``."""
    classes = {entry.pair for entry in entries if entry.set == 0}
    return [entry for entry in entries if entry.set and entry.pair not in classes]


def _unpack(
    arrays: Mapping[str, np.ndarray], limits: WireLimits, with_sender: bool
) -> list[TokenEntry]:
    """Every entry of a message, or :class:`WireError` at the first rule broken."""
    if not arrays:
        return []
    vectors, index, sets = _frame(arrays, limits, with_sender)
    entries = []
    for sender, column, number, rows in _rows(vectors, index, sets, with_sender):
        if (problem := _entry_problem(sender, column, number, rows, limits, None)) is not None:
            raise problem
        entries.append(TokenEntry(sender, _class_id(column), rows, number))
    return entries


def _frame(
    arrays: Mapping[str, np.ndarray], limits: WireLimits, with_sender: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The message's (R, D) float32 vectors, (E, 2|3) int64 index and (E,) int64 sets.

    The frame: keys, total size, dtypes, shapes, ``D``, and token counts that are positive
    and add up to ``R`` (so that every entry's rows can be found); ``sets`` absent reads as
    every entry's set 0.
    """
    if set(arrays) - {SETS_KEY} != {VECTORS_KEY, INDEX_KEY}:
        raise WireError(
            "key",
            f"arrays {sorted(arrays)}: expected {[INDEX_KEY, VECTORS_KEY]} (and {SETS_KEY!r})",
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
    if SETS_KEY not in arrays:
        return vectors, index, np.zeros(len(index), np.int64)
    return vectors, index, _check_sets(arrays[SETS_KEY], len(index))


def _rows(
    vectors: np.ndarray, index: np.ndarray, sets: np.ndarray, with_sender: bool
) -> list[tuple[int, int, int, np.ndarray]]:
    """(sender, class column, set, (n_tokens, D) vectors) per index row; sender -1 in a reply."""
    counts = index[:, -1]  # (E,)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return [
        (
            int(row[0]) if with_sender else -1,
            int(row[-2]),
            int(number),
            vectors[start : start + count],
        )
        for row, number, start, count in zip(index, sets, starts, counts, strict=True)
    ]


def _entry_problem(
    sender: int,
    column: int,
    number: int,
    rows: np.ndarray,
    limits: WireLimits,
    seen: set[tuple[int, int, int]] | None,
) -> WireError | None:
    """The first per-entry rule that one entry breaks, or None.

    ``number``: the entry's set. ``seen``: the labelled (sender, class, set) triples of a
    relay message kept so far, to which a kept one is added (None: a reply, whose repeats
    :func:`_refuse_repeats` checks).
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
    if not 0 <= number <= limits.max_sets or (number and column == NO_CLASS):
        return WireError(
            "set", f"sets: set {number} of class column {column}, allowed 0..{limits.max_sets} "
            "(tokens.clusters), and only for a labelled class",
        )  # fmt: skip
    if not np.isfinite(rows).all():
        return WireError("non-finite", "vectors: hold NaN or Inf")
    if (longest := float(np.linalg.norm(rows.astype(np.float64), axis=1).max())) > limits.max_norm:
        return WireError(
            "norm",
            f"vectors: a token of norm {longest:.4g} exceeds {limits.max_norm:.4g} "
            "(tokens.max-norm-ratio times the backbone's largest pretrained token norm)",
        )
    if seen is not None and column != NO_CLASS:
        if (sender, column, number) in seen:
            return WireError(
                "class-id", f"index: class id {column} (set {number}) of sender {sender} twice"
            )
        seen.add((sender, column, number))
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


def _check_integers(value: np.ndarray, name: str) -> None:
    """Refuse an integer array of the wire (``name``) that is not int32 or int64."""
    if not isinstance(value, np.ndarray) or value.dtype not in INDEX_DTYPES:
        kind = getattr(value, "dtype", type(value).__name__)
        raise WireError("dtype", f"{name}: dtype {kind} not allowed (int32, int64)")


def _check_index(value: np.ndarray, columns: int) -> np.ndarray:
    _check_integers(value, "index")
    if value.ndim != 2 or value.shape[1] != columns or not len(value):
        raise WireError("shape", f"index: shape {value.shape} is not (entries >= 1, {columns})")
    return value.astype(np.int64)


def _check_sets(value: np.ndarray, entries: int) -> np.ndarray:
    _check_integers(value, "sets")
    if value.shape != (entries,):
        raise WireError("shape", f"sets: shape {value.shape} is not ({entries},), one per entry")
    return value.astype(np.int64)


def _class_id(value: int) -> int | None:
    """The class id of an index row's class column (checked by :func:`_entry_problem`)."""
    return None if value == NO_CLASS else value


def _refuse_repeats(entries: list[TokenEntry]) -> None:
    """A labelled (sender, class, set) appears once in a message."""
    seen: set[tuple[int, int, int]] = set()
    for entry in entries:
        if entry.class_id is None:
            continue
        key = (entry.sender, entry.class_id, entry.set)
        if key in seen:
            who = "" if entry.sender < 0 else f" of sender {entry.sender}"
            which = f" (set {entry.set})" if entry.set else ""
            raise WireError("class-id", f"index: class id {entry.class_id}{which}{who} twice")
        seen.add(key)
