"""Example-weighted averaging of named arrays (FedAvg's server step)."""

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
