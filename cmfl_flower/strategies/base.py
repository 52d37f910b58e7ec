"""The contract every cmfl-flower strategy follows (built in or plugged in).

A strategy is a Flower :class:`~flwr.serverapp.strategy.Strategy` constructed as
``MyStrategy(cfg, recorder)`` with the run's :class:`~cmfl_flower.config.AppConfig` and a
:class:`~cmfl_flower.results.RunRecorder`. :class:`CmflStrategy` supplies what they share:

* ``task``: the client routine (a key of :data:`cmfl_flower.client.TASKS`) named in every
  message, so one ClientApp serves every strategy;
* seeded sampling of ``federation.fraction`` of the nodes *every* round, waiting up to
  ``federation.wait-for-nodes`` seconds for ``federation.min-nodes`` to connect;
* messages that carry the whole flat run config (clients parse it with the same model);
* recording of every client's metrics and the round's mean/min/max, error replies counted.

Subclasses override :meth:`train_content` to add records for a node and
:meth:`aggregate_train` to combine replies (call :meth:`record_round` to keep results).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any, ClassVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from cmfl_flower.config import AppConfig
from cmfl_flower.protocol import CONFIG_KEY, METRICS_KEY, ROUND_KEY, TASK_KEY
from cmfl_flower.results import Row, RunRecorder

SUMMARY_METRICS = ("local-acc", "global-acc")


class CmflStrategy(Strategy):
    """Base class of cmfl-flower strategies: sampling, messaging, metric recording."""

    task: ClassVar[str]

    def __init__(self, cfg: AppConfig, recorder: RunRecorder) -> None:
        self.cfg = cfg
        self.recorder = recorder

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
        """The records sent to ``node_id``: task name, round and the run config."""
        config = ConfigRecord({**self.cfg.to_run_config(), ROUND_KEY: server_round})
        return RecordDict({CONFIG_KEY: config, TASK_KEY: ConfigRecord({"name": self.task})})

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One message per sampled node."""
        nodes = self.sample(grid, server_round)
        log(INFO, "round %d: sampled %d node(s)", server_round, len(nodes))
        return [
            Message(self.train_content(server_round, node), node, MessageType.TRAIN)
            for node in nodes
        ]

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

    # ----- results ---------------------------------------------------------------------
    def client_rows(self, server_round: int, replies: Iterable[Message]) -> list[Row]:
        """Every reply as a row of metrics; error replies are logged and flagged."""
        rows: list[Row] = []
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                log(WARNING, "round %d: node %d failed: %s", server_round, node, reply.error)
                rows.append({"node-id": node, "error": str(reply.error.reason)})
                continue
            metrics = reply.content.metric_records.get(METRICS_KEY, MetricRecord())
            rows.append({"node-id": node, **dict(metrics)})
        return rows

    def record_round(self, server_round: int, rows: list[Row], **extra: Any) -> MetricRecord:
        """Store the client rows and the round summary; return the summary."""
        ok = [row for row in rows if "error" not in row]
        summary: dict[str, Any] = {"replies": len(ok), "errors": len(rows) - len(ok)}
        for name in SUMMARY_METRICS:
            values = [float(row[name]) for row in ok if name in row]
            if values:
                summary |= {
                    f"{name}-mean": float(np.mean(values)),
                    f"{name}-min": min(values),
                    f"{name}-max": max(values),
                }
        summary |= extra
        self.recorder.add_clients(server_round, rows)
        self.recorder.add_round(server_round, summary)
        for row in sorted(ok, key=lambda r: r.get("partition-id", -1)):
            log(INFO, "round %d: %s", server_round, _format_row(row))
        return MetricRecord(summary)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Record the replies; no weights are aggregated by default."""
        return None, self.record_round(server_round, self.client_rows(server_round, replies))

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


def _format_row(row: Row) -> str:
    parts = []
    for key, value in row.items():
        parts.append(f"{key}={value:.4f}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)
