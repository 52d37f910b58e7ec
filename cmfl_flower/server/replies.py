"""What a reply must be to be used, and how the used replies add up to a round's summary.

A reply holds one MetricRecord (``metrics``) of scalars under names the server does not
reserve, and at most one ArrayRecord (``arrays``); a refusal reason reads ``"<kind>: <detail>"``
and is counted as ``refused-<kind>``. A round's summary gives the mean, min and max of
:data:`SPREAD_METRICS`, the sums of :data:`TOTAL_METRICS` and the mean of every ``seconds-*``.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from flwr.app import RecordDict

from cmfl_flower.aliases import Row
from cmfl_flower.methods.base import ARRAYS_KEY, METRICS_KEY

# mean/min/max in a round's summary
SPREAD_METRICS = (
    "local-acc",
    "global-acc",
    "val-acc",
    "generated-recognised",
    "generated-recognised-judge",
)
# reported as sums; screened-out and dropped: received sets and entries a client left out
TOTAL_METRICS = ("num-generated", "bytes-sent", "bytes-received", "screened-out", "dropped")
RESERVED = frozenset({"node-id", "bytes-sent", "bytes-received", "error", "refused"})


def failed(row: Row) -> bool:
    """Whether a client row records an error or a refusal."""
    return "error" in row or "refused" in row


def records_problem(content: RecordDict) -> str | None:
    """Why a reply's records are not one MetricRecord and at most one ArrayRecord, or None."""
    if extra := sorted(set(content) - {METRICS_KEY, ARRAYS_KEY}):
        return f"records: unexpected record(s) {extra}"
    if METRICS_KEY not in content.metric_records:
        return f"records: no MetricRecord {METRICS_KEY!r}"
    if ARRAYS_KEY in content and ARRAYS_KEY not in content.array_records:
        return f"records: {ARRAYS_KEY!r} is not an ArrayRecord"
    return None


def metrics_problem(metrics: dict[str, Any]) -> str | None:
    """Why a reply's metrics cannot be recorded (a reserved name, a list), or None."""
    if clash := sorted(set(metrics) & RESERVED):
        return f"metrics: reserved name(s) {clash}"
    if lists := sorted(k for k, v in metrics.items() if not isinstance(v, (int, float))):
        return f"metrics: non-scalar value(s) {lists}"
    return None


def refusal_kind(reason: str) -> str:
    """The kind of a refusal reason written ``"<kind>: <detail>"`` (else ``other``)."""
    kind, sep, _ = reason.partition(": ")
    return kind if sep and re.fullmatch(r"[a-z][a-z-]*", kind) else "other"


def refusal_kinds(rows: list[Row]) -> dict[str, int]:
    """``refused-<kind>``: how many replies were refused for each kind of reason."""
    kinds = [refusal_kind(str(row["refused"])) for row in rows if "refused" in row]
    return {f"refused-{kind}": kinds.count(kind) for kind in sorted(set(kinds))}


def spread(rows: list[Row]) -> dict[str, float]:
    """``<name>-mean``, ``-min`` and ``-max`` of every :data:`SPREAD_METRICS` the rows hold."""
    out: dict[str, float] = {}
    for name in (*SPREAD_METRICS, *(f"eval-{n}" for n in SPREAD_METRICS)):
        values = [float(row[name]) for row in rows if name in row]
        if values:
            out |= {
                f"{name}-mean": float(np.mean(values)),
                f"{name}-min": min(values),
                f"{name}-max": max(values),
            }
    return out


def totals(rows: list[Row]) -> dict[str, int]:
    """The sum of every :data:`TOTAL_METRICS` over the rows."""
    return {name: int(sum(row.get(name, 0) for row in rows)) for name in TOTAL_METRICS}


def mean_seconds(rows: list[Row]) -> dict[str, float]:
    """The mean of every ``seconds-*`` phase over the rows that report it."""
    keys = sorted({key for row in rows for key in row if key.startswith("seconds-")})
    return {key: float(np.mean([row[key] for row in rows if key in row])) for key in keys}


def format_row(row: Row) -> str:
    """A client row as ``key=value`` pairs for the log."""
    parts = []
    for key, value in row.items():
        parts.append(f"{key}={value:.4f}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)
