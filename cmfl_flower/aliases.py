"""The type aliases the package shares, each defined once."""

from __future__ import annotations

from typing import Any

import numpy as np

Arrays = dict[str, np.ndarray]  # named arrays: a message's array record, a model's weights
Metrics = dict[str, Any]  # scalar values: int | float
Row = dict[str, Any]  # one row of a results table (rounds.json, clients.json)
