"""Can these arrays stand in for those weights? The check behind every refused weight reply.

Averaging itself is Flower's (its strategies); this only says why a reply does not fit.
"""

from __future__ import annotations

import numpy as np

from cmfl_flower.aliases import Arrays


def weights_problem(arrays: Arrays, expected: Arrays, exact_dtype: bool = True) -> str | None:
    """Why ``arrays`` cannot stand in for weights laid out as ``expected``, or None.

    ``exact_dtype=False`` accepts any float dtype (a server optimiser may hold float64).

    The reason reads ``"<kind>: <detail>"`` with kind ``keys``, ``dtype``, ``shape`` or
    ``non-finite`` (the server counts refusals per kind).
    """
    if not arrays or set(arrays) != set(expected):
        diff = sorted(set(arrays) ^ set(expected))
        return f"keys: weight keys differ from the global ones: {diff[:3]} ({len(diff)} in all)"
    for key, value in arrays.items():
        if value.dtype.kind != "f" or (exact_dtype and value.dtype != expected[key].dtype):
            return f"dtype: {key!r} is {value.dtype}, expected {expected[key].dtype}"
        if value.shape != expected[key].shape:
            return f"shape: {key!r} is {value.shape}, expected {expected[key].shape}"
        if not np.isfinite(value).all():
            return f"non-finite: {key!r} holds NaN or Inf"
    return None
