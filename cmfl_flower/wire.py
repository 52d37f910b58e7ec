"""The relay's wire format: class-token vectors as named float arrays, validated on receipt.

Schema (one ArrayRecord per message; this module works on ``{key: ndarray}``):

* client -> server, record ``tokens``: key ``c<class id>`` (labelled relay) or ``v<k>``
  (unlabelled relay: no class id travels), value ``(n_tokens, D)`` float32 or float16;
* server -> client, record ``peer-tokens``: key ``s<sender>.c<class id>`` or ``s<sender>.v<k>``,
  same values; ``sender`` is the partition id of the client the vectors came from.

``n_tokens`` is the number of tokens of the class name (a few), ``D`` the backbone's token
width (64 tiny, 768 BK-SDM, 1024 BK-SDM-v2): a class costs ``n_tokens * D * 4`` bytes.
Every received array is checked: key format, dtype, 2-D shape, ``D``, ``1 <= n_tokens <=
max_tokens``, finite values, known class id, and the message's total size.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

ALLOWED_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
_REPLY_KEY = re.compile(r"^(?:c(?P<cls>\d+)|v(?P<idx>\d+))$")
_RELAY_KEY = re.compile(r"^s(?P<sender>\d+)\.(?:c(?P<cls>\d+)|v(?P<idx>\d+))$")


class WireError(ValueError):
    """A received array that breaks the schema; the message says which and why.

    ``kind`` names the rule broken (``dtype``, ``shape``, ``dim``, ``tokens``, ``non-finite``,
    ``size``, ``key``, ``class-id``); the text reads ``"<kind>: <detail>"`` so that the server
    can count refusals per kind.
    """

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


@dataclass(frozen=True)
class WireLimits:
    """What a receiver accepts."""

    token_dim: int
    num_classes: int
    max_tokens: int
    max_bytes: int


@dataclass(frozen=True)
class TokenEntry:
    """One class's vectors from one sender (``class_id`` None in the unlabelled relay)."""

    sender: int
    class_id: int | None
    vectors: np.ndarray  # (n_tokens, D) float32


def reply_arrays(bank: Mapping[int, np.ndarray], labelled: bool) -> dict[str, np.ndarray]:
    """A client's vectors as wire arrays: ``c<id>`` keys, or ``v<k>`` without class ids."""
    order = sorted(bank)
    if labelled:
        return {f"c{c}": _as_float32(bank[c]) for c in order}
    return {f"v{k}": _as_float32(bank[c]) for k, c in enumerate(order)}


def relay_arrays(entries: list[TokenEntry]) -> dict[str, np.ndarray]:
    """Vectors of several senders as wire arrays for one receiver."""
    out: dict[str, np.ndarray] = {}
    counts: dict[int, int] = {}
    for entry in entries:
        if entry.class_id is None:
            index = counts.get(entry.sender, 0)
            counts[entry.sender] = index + 1
            out[f"s{entry.sender}.v{index}"] = entry.vectors
        else:
            out[f"s{entry.sender}.c{entry.class_id}"] = entry.vectors
    return out


def _as_float32(vectors: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(vectors, dtype=np.float32)


def _check_array(key: str, value: np.ndarray, limits: WireLimits) -> np.ndarray:
    if not isinstance(value, np.ndarray) or value.dtype not in ALLOWED_DTYPES:
        kind = getattr(value, "dtype", type(value).__name__)
        raise WireError("dtype", f"array {key!r}: dtype {kind} not allowed (float32, float16)")
    if value.ndim != 2:
        raise WireError("shape", f"array {key!r}: shape {value.shape} is not (n_tokens, D)")
    n_tokens, dim = value.shape
    if dim != limits.token_dim:
        raise WireError(
            "dim", f"array {key!r}: embedding dim {dim}, backbone expects {limits.token_dim}"
        )
    if not 1 <= n_tokens <= limits.max_tokens:
        raise WireError(
            "tokens",
            f"array {key!r}: {n_tokens} tokens, allowed 1..{limits.max_tokens} (tokens.max-tokens)",
        )
    if not np.isfinite(value).all():
        raise WireError("non-finite", f"array {key!r}: holds NaN or Inf")
    return _as_float32(value)


def _check_total(arrays: Mapping[str, np.ndarray], limits: WireLimits) -> None:
    total = sum(int(getattr(v, "nbytes", 0)) for v in arrays.values())
    if total > limits.max_bytes:
        raise WireError(
            "size", f"{total} bytes of vectors exceed tokens.max-bytes = {limits.max_bytes}"
        )


def _class_id(key: str, match: re.Match[str], limits: WireLimits) -> int | None:
    if match.group("cls") is None:
        return None
    class_id = int(match.group("cls"))
    if class_id >= limits.num_classes:
        raise WireError(
            "class-id", f"array {key!r}: class id {class_id} unknown ({limits.num_classes} classes)"
        )
    return class_id


def parse_reply(
    arrays: Mapping[str, np.ndarray], limits: WireLimits, labelled: bool
) -> dict[str, TokenEntry]:
    """Validate a client's reply; entries keyed by wire key, ``sender`` left as -1."""
    _check_total(arrays, limits)
    entries: dict[str, TokenEntry] = {}
    for key, value in arrays.items():
        match = _REPLY_KEY.match(key)
        if match is None or (match.group("cls") is not None) != labelled:
            expected = "c<class id>" if labelled else "v<index>"
            raise WireError("key", f"array key {key!r} does not match {expected!r}")
        vectors = _check_array(key, value, limits)
        entries[key] = TokenEntry(-1, _class_id(key, match, limits), vectors)
    return entries


def parse_relay(arrays: Mapping[str, np.ndarray], limits: WireLimits) -> list[TokenEntry]:
    """Validate what the server relayed to this client, in sorted key order."""
    _check_total(arrays, limits)
    entries = []
    for key in sorted(arrays):
        match = _RELAY_KEY.match(key)
        if match is None:
            raise WireError(
                "key", f"array key {key!r} does not match 's<sender>.c<id>' or 's<sender>.v<k>'"
            )
        vectors = _check_array(key, arrays[key], limits)
        entries.append(
            TokenEntry(int(match.group("sender")), _class_id(key, match, limits), vectors)
        )
    return entries
