"""The contract every cmfl-flower strategy follows (built in or plugged in).

A strategy is a Flower :class:`~flwr.serverapp.strategy.Strategy` constructed as
``MyStrategy(cfg, recorder)`` with the run's :class:`~cmfl_flower.config.AppConfig` and a
:class:`~cmfl_flower.results.RunRecorder`. :class:`CmflStrategy` supplies what they share:

* ``task``: the client routine (a key of :data:`cmfl_flower.client.TASKS`) named in every
  message, so one ClientApp serves every strategy;
* seeded sampling of ``federation.fraction`` of the nodes *every* round, waiting up to
  ``federation.wait-for-nodes`` seconds for ``federation.min-nodes`` to connect;
* messages that carry the whole flat run config (clients parse it with the same model);
* recording of every client's metrics, the bytes of every message sent and received, and
  the round's summary; error replies and refused replies are logged and counted.

Subclasses override :meth:`arrays_for` (what a node receives besides the config),
:meth:`absorb` (take one reply's arrays; return a reason to refuse them),
:meth:`end_round` (combine what was absorbed), and, when they keep state between rounds,
:meth:`state` / :meth:`load_state` (checkpointed after every round; restored on
``output.resume``).
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any, ClassVar

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from cmfl_flower.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from cmfl_flower.config import AppConfig
from cmfl_flower.protocol import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, ROUND_KEY, TASK_KEY
from cmfl_flower.report import round_line
from cmfl_flower.results import Row, RunRecorder

Arrays = dict[str, np.ndarray]
SPREAD_METRICS = ("local-acc", "global-acc", "val-acc", "generated-recognised")  # mean/min/max
TOTAL_METRICS = ("num-generated", "bytes-sent", "bytes-received")  # reported as sums


def message_bytes(message: Message) -> int:
    """Bytes of ``message`` as Flower ships it: every serialised object of its tree."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


def to_record(arrays: Arrays) -> ArrayRecord:
    """Numpy arrays as an ArrayRecord (Flower wants ``Array`` values)."""
    return ArrayRecord({key: Array(np.ascontiguousarray(v)) for key, v in arrays.items()})


def from_record(record: ArrayRecord) -> Arrays:
    """An ArrayRecord as numpy arrays."""
    return {key: array.numpy() for key, array in record.items()}


class CmflStrategy(Strategy):
    """Base class of cmfl-flower strategies: sampling, messaging, metric recording."""

    task: ClassVar[str]

    def __init__(self, cfg: AppConfig, recorder: RunRecorder) -> None:
        self.cfg = cfg
        self.recorder = recorder
        self._sent_bytes: dict[int, int] = {}
        self._round_start = time.perf_counter()

    # ----- hooks for subclasses ----------------------------------------------------------
    def arrays_for(self, server_round: int, node_id: int) -> Arrays | None:
        """Arrays to send to ``node_id`` this round (None: none)."""
        return None

    def absorb(self, server_round: int, node_id: int, row: Row, arrays: Arrays) -> str | None:
        """Take one reply's arrays; return why they are refused (``"<kind>: <detail>"``)."""
        return None

    def end_round(self, server_round: int) -> dict[str, Any]:
        """Combine the absorbed replies; return extra summary metrics."""
        return {}

    def state(self) -> tuple[Arrays, dict[str, Any]]:
        """What to checkpoint after each round: arrays and JSON-able metadata."""
        return {}, {}

    def load_state(self, arrays: Arrays, meta: dict[str, Any]) -> None:
        """Restore what :meth:`state` returned (stateless strategies have nothing to do)."""

    # ----- the round loop --------------------------------------------------------------
    def restore(self) -> int:
        """Load the run's checkpoint, drop rows recorded after it; return the next round."""
        checkpoint = load_checkpoint(self.recorder.run_dir)
        done = checkpoint.round if checkpoint else 0
        if checkpoint is not None:
            self.load_state(checkpoint.arrays, checkpoint.meta)
        self.recorder.truncate(done)
        log(INFO, "resuming %s after round %d", self.recorder.run_dir, done)
        return done + 1

    def run(self, grid: Grid, first_round: int = 1) -> None:
        """Rounds ``first_round`` to ``federation.rounds``, checkpointing after each."""
        self.summary()
        fed = self.cfg.federation
        for server_round in range(first_round, fed.rounds + 1):
            log(INFO, "[ROUND %d/%d]", server_round, fed.rounds)
            messages = self.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid)
            replies = grid.send_and_receive(messages, timeout=fed.round_timeout)
            self.aggregate_train(server_round, replies)
            arrays, meta = self.state()
            save_checkpoint(self.recorder.run_dir, Checkpoint(server_round, arrays, meta))

    # ----- sampling and messages -------------------------------------------------------
    def sample(self, grid: Grid, server_round: int) -> list[int]:
        """Seeded sample of ``fraction`` of the connected nodes (at least ``min-nodes``)."""
        fed = self.cfg.federation
        deadline = time.monotonic() + fed.wait_for_nodes
        while len(nodes := sorted(grid.get_node_ids())) < fed.min_nodes:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {len(nodes)} node(s) connected after {fed.wait_for_nodes:.0f} s; "
                    f"federation.min-nodes = {fed.min_nodes}"
                )
            time.sleep(1.0)
        size = min(len(nodes), max(fed.min_nodes, round(fed.fraction * len(nodes))))
        return sorted(random.Random(f"{self.cfg.seed}/{server_round}").sample(nodes, size))

    def train_content(self, server_round: int, node_id: int) -> RecordDict:
        """The records sent to ``node_id``: run config and round, task, optional arrays."""
        config = ConfigRecord({**self.cfg.to_run_config(), ROUND_KEY: server_round})
        content = RecordDict({CONFIG_KEY: config, TASK_KEY: ConfigRecord({"name": self.task})})
        arrays = self.arrays_for(server_round, node_id)
        if arrays is not None:
            content[ARRAYS_KEY] = to_record(arrays)
        return content

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One message per sampled node; remembers how many bytes each carries."""
        self._round_start = time.perf_counter()
        nodes = self.sample(grid, server_round)
        log(INFO, "round %d: sampled %d node(s)", server_round, len(nodes))
        messages = [
            Message(self.train_content(server_round, node), node, MessageType.TRAIN)
            for node in nodes
        ]
        self._sent_bytes = {m.metadata.dst_node_id: message_bytes(m) for m in messages}
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Clients evaluate inside their train round: no separate evaluate messages."""
        return []

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Nothing to aggregate (see :meth:`configure_evaluate`)."""
        return None

    # ----- replies and results ---------------------------------------------------------
    def _row(self, server_round: int, reply: Message) -> Row:
        node = reply.metadata.src_node_id
        row: Row = {"node-id": node, "bytes-sent": self._sent_bytes.get(node, 0)}
        row["bytes-received"] = message_bytes(reply)
        if reply.has_error():
            log(WARNING, "round %d: node %d failed: %s", server_round, node, reply.error.reason)
            return row | {"error": str(reply.error.reason)}
        reason = self._take(server_round, node, row, reply.content)
        if reason is not None:
            log(WARNING, "round %d: refused reply of node %d: %s", server_round, node, reason)
            return row | {"refused": reason}
        return row

    def _take(self, server_round: int, node: int, row: Row, content: RecordDict) -> str | None:
        """Check a reply's layout and metrics, fill ``row``, pass its arrays to :meth:`absorb`."""
        if extra := sorted(set(content) - {METRICS_KEY, ARRAYS_KEY}):
            return f"records: unexpected record(s) {extra}"
        if METRICS_KEY not in content.metric_records:
            return f"records: no MetricRecord {METRICS_KEY!r}"
        if ARRAYS_KEY in content and ARRAYS_KEY not in content.array_records:
            return f"records: {ARRAYS_KEY!r} is not an ArrayRecord"
        metrics = dict(content.metric_records[METRICS_KEY])
        if clash := sorted(set(metrics) & (set(row) | {"error", "refused"})):
            return f"metrics: reserved name(s) {clash}"
        if lists := sorted(k for k, v in metrics.items() if not isinstance(v, (int, float))):
            return f"metrics: non-scalar value(s) {lists}"
        row |= metrics
        record = content.array_records.get(ARRAYS_KEY)
        try:
            arrays = from_record(record) if record is not None else {}
        except Exception as err:  # a malformed Array: its bytes do not decode
            return f"unreadable: arrays do not decode ({type(err).__name__}: {err})"
        return self.absorb(server_round, node, row, arrays)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Record every reply, let the subclass combine them, store the round summary.

        Raises ``RuntimeError`` (the run fails) when fewer than ``federation.min-replies``
        replies are usable.
        """
        rows = [self._row(server_round, reply) for reply in replies]
        extra = self.end_round(server_round) | {"no-reply": len(self._sent_bytes) - len(rows)}
        summary = self.record_round(server_round, rows, **extra)
        needed = self.cfg.federation.min_replies
        if sum(not _failed(row) for row in rows) < needed:
            reasons = [str(row.get("error") or row["refused"]) for row in rows if _failed(row)]
            raise RuntimeError(
                f"round {server_round}: {summary['replies']} usable replies, "
                f"federation.min-replies = {needed} ({summary['errors']} errors, "
                f"{summary['refused']} refused, {extra['no-reply']} without reply)"
                + (f"; first problem: {reasons[0]}" if reasons else "")
            )
        return None, summary

    def record_round(self, server_round: int, rows: list[Row], **extra: Any) -> MetricRecord:
        """Store the client rows and the round summary; return the summary."""
        ok = [row for row in rows if not _failed(row)]
        summary: dict[str, Any] = {
            "replies": len(ok),
            "errors": sum("error" in row for row in rows),
            "refused": sum("refused" in row for row in rows),
        }
        summary |= _refusal_kinds(rows)
        summary |= _spread(ok) | _totals(rows) | _mean_seconds(ok) | extra
        sampled = max(len(self._sent_bytes), len(rows))
        summary |= {"sampled": sampled, "round-seconds": time.perf_counter() - self._round_start}
        self.recorder.add_clients(server_round, rows)
        self.recorder.add_round(server_round, summary)
        for row in sorted(ok, key=lambda r: r.get("partition-id", -1)):
            log(INFO, "round %d: %s", server_round, _format_row(row))
        log(INFO, "%s", round_line(server_round, self.cfg.federation.rounds, sampled, summary))
        return MetricRecord(summary)

    def summary(self) -> None:
        """Log the strategy's settings."""
        fed = self.cfg.federation
        log(
            INFO,
            "%s: task=%s rounds=%d fraction=%.2f min-nodes=%d",
            type(self).__name__,
            self.task,
            fed.rounds,
            fed.fraction,
            fed.min_nodes,
        )


def _failed(row: Row) -> bool:
    return "error" in row or "refused" in row


def refusal_kind(reason: str) -> str:
    """The kind of a refusal reason written ``"<kind>: <detail>"`` (else ``other``)."""
    kind, sep, _ = reason.partition(": ")
    return kind if sep and re.fullmatch(r"[a-z][a-z-]*", kind) else "other"


def _refusal_kinds(rows: list[Row]) -> dict[str, int]:
    """``refused-<kind>``: how many replies were refused for each kind of reason."""
    kinds = [refusal_kind(str(row["refused"])) for row in rows if "refused" in row]
    return {f"refused-{kind}": kinds.count(kind) for kind in sorted(set(kinds))}


def _spread(rows: list[Row]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name in SPREAD_METRICS:
        values = [float(row[name]) for row in rows if name in row]
        if values:
            out |= {
                f"{name}-mean": float(np.mean(values)),
                f"{name}-min": min(values),
                f"{name}-max": max(values),
            }
    return out


def _totals(rows: list[Row]) -> dict[str, int]:
    return {name: int(sum(row.get(name, 0) for row in rows)) for name in TOTAL_METRICS}


def _mean_seconds(rows: list[Row]) -> dict[str, float]:
    keys = sorted({key for row in rows for key in row if key.startswith("seconds-")})
    return {key: float(np.mean([row[key] for row in rows if key in row])) for key in keys}


def _format_row(row: Row) -> str:
    parts = []
    for key, value in row.items():
        parts.append(f"{key}={value:.4f}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)
