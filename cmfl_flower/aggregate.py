"""Example-weighted averaging of named arrays (FedAvg's server step), and its input check."""

from __future__ import annotations

import numpy as np

Arrays = dict[str, np.ndarray]


def weighted_mean(items: list[tuple[Arrays, float]]) -> Arrays:
    """``sum_k w_k * a_k / sum_k w_k`` per key; every item must have the same keys and shapes."""
    if not items:
        raise ValueError("nothing to average")
    keys = set(items[0][0])
    total = float(sum(weight for _, weight in items))
    if total <= 0:
        raise ValueError(f"weights must sum to a positive number, got {total}")
    for arrays, _ in items:
        if set(arrays) != keys:
            raise ValueError(f"arrays differ in keys: {sorted(set(arrays) ^ keys)}")
    out: Arrays = {}
    for key in sorted(keys):
        shapes = {arrays[key].shape for arrays, _ in items}
        if len(shapes) != 1:
            raise ValueError(f"array {key!r} differs in shape across clients: {sorted(shapes)}")
        stacked = np.stack([arrays[key].astype(np.float64) * weight for arrays, weight in items])
        out[key] = (stacked.sum(axis=0) / total).astype(items[0][0][key].dtype)
    return out


def weights_problem(arrays: Arrays, expected: Arrays) -> str | None:
    """Why ``arrays`` cannot stand in for weights laid out as ``expected``, or None.

    The reason reads ``"<kind>: <detail>"`` with kind ``keys``, ``dtype``, ``shape`` or
    ``non-finite`` (the server counts refusals per kind).
    """
    if not arrays or set(arrays) != set(expected):
        diff = sorted(set(arrays) ^ set(expected))
        return f"keys: weight keys differ from the global ones: {diff[:3]} ({len(diff)} in all)"
    for key, value in arrays.items():
        if value.dtype.kind != "f" or value.dtype != expected[key].dtype:
            return f"dtype: {key!r} is {value.dtype}, expected {expected[key].dtype}"
        if value.shape != expected[key].shape:
            return f"shape: {key!r} is {value.shape}, expected {expected[key].shape}"
        if not np.isfinite(value).all():
            return f"non-finite: {key!r} holds NaN or Inf"
    return None
