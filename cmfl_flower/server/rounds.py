"""Runs any method's server strategy with Flower's ``Strategy.start``, and records the run.

The strategy (one of Flower's for a weight method, else the method's own) drives the rounds;
the loop speaks to the method's server side only through its
:class:`~cmfl_flower.methods.base.ServerHooks` (:func:`cmfl_flower.server.strategies.server_side`)
and never asks which kind of method it runs. Between the strategy and Flower's Grid sits a
:class:`~cmfl_flower.server.grid.RecordingGrid`, which hands every message to :class:`Session`:

* routes it to the method's client routine (``train`` becomes ``train.<action>``) and stamps
  the run's round number and run name into its config (Flower counts from 1 after a resume);
* counts its bytes, and the bytes of each reply, as Flower ships them;
* checks each reply (:mod:`cmfl_flower.server.replies`, then the hooks) and refuses a
  malformed one before the strategy sees it (the reason, ``"<kind>: <detail>"``, is logged
  and counted as ``refused-<kind>``).

Every reply names the round it answers (the metric ``server-round``): a train reply naming
another round, or none, is refused (``stale``); a usable reply's ``server-round`` is removed
before the strategy sees its metrics. Partition ids are identities, bound to nodes for the run
(:mod:`cmfl_flower.server.partitions`).

Before each round it seeds Python's ``random`` from the run's seed and the round, and it lists
the node ids in order, so that Flower's node sampling repeats (as the method strategies' own
does). After each round (Flower's ``evaluate_fn``) :class:`Session` adds the hooks' figures (a
weight method's: its scores of the global arrays), writes the round's rows and summary (with
``accepted-share``, the accepted replies over the sampled nodes), saves the checkpoint, and
stops the run (``RuntimeError``) when fewer than ``federation.min-replies`` replies were usable
(its default, 0: half the sampled nodes, rounded up).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from cmfl_flower.aliases import Arrays, Row
from cmfl_flower.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from cmfl_flower.config import AppConfig
from cmfl_flower.methods import action, resolve_method
from cmfl_flower.methods.base import (
    ARRAYS_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    ROUND_KEY,
    RUN_NAME_KEY,
    ServerHooks,
    from_record,
    sampling_seed,
    to_record,
)
from cmfl_flower.report import accepted_share, round_line
from cmfl_flower.results import RunRecorder
from cmfl_flower.server.flower_api import message_bytes, with_message_type
from cmfl_flower.server.grid import RecordingGrid, wait_for_nodes
from cmfl_flower.server.partitions import Partitions
from cmfl_flower.server.replies import (
    failed,
    format_row,
    mean_seconds,
    metrics_problem,
    records_problem,
    refusal_kinds,
    spread,
    totals,
)
from cmfl_flower.server.strategies import server_side

SESSION_META = "session"  # the checkpoint meta's key for the partition bindings


class Session:
    """One run of a method: its strategy, what each round sent and received, the recorder."""

    def __init__(
        self, cfg: AppConfig, recorder: RunRecorder, hooks: ServerHooks, num_partitions: int
    ) -> None:
        self.cfg = cfg
        self.recorder = recorder
        self.hooks = hooks  # the method's server side, whatever its kind
        self.partitions = Partitions(num_partitions)
        self.first_round = 1
        self.train_exchanges = 0  # train rounds sent so far by this session
        self._new_round()

    def _new_round(self) -> None:
        self.rows: dict[int, Row] = {}  # node id -> its row this round
        self.sent_bytes: dict[int, int] = {}
        self.content_bytes: dict[int, int] = {}  # shared records, measured once per round
        self.partitions.new_round()
        self.round_start = time.perf_counter()

    def listed(self, nodes: set[int]) -> None:
        """The node ids the grid listed: who is connected as the round samples."""
        self.partitions.connected = nodes

    # ----- messages out ----------------------------------------------------------------
    def outgoing(self, message: Message) -> Message:
        """Route, stamp and measure one message before it leaves."""
        category = message.metadata.message_type.partition(".")[0]
        config = message.content.config_records.get(CONFIG_KEY)
        if config is not None:  # Flower's round count restarts at 1 after a resume
            config[ROUND_KEY] = self.round_number
            config[RUN_NAME_KEY] = self.cfg.output.run_name
        if ":" not in self.cfg.method and message.metadata.message_type == category:
            message = with_message_type(message, f"{category}.{action(self.cfg.method)}")
        node = message.metadata.dst_node_id
        if category == "train":
            self.sent_bytes[node] = message_bytes(message, self.content_bytes)
            record = message.content.array_records.get(ARRAYS_KEY)
            self.hooks.sent(node, record)
        return message

    # ----- replies in ------------------------------------------------------------------
    def incoming(self, replies: Iterable[Message], recipients: dict[str, int]) -> list[Message]:
        """Record every reply; return those the strategy may use (and the errors).

        ``recipients`` maps a sent message's id to its node: the SuperLink's own error reply
        for a node that stopped answering comes from the SuperLink, not from that node. In node
        order: Flower samples in random order, and the order of a float sum matters (a resumed
        run must reach the uninterrupted run's weights exactly).
        """
        usable = []
        by_node = {recipients.get(m.metadata.reply_to_message_id, m.metadata.src_node_id): m
                   for m in replies}  # fmt: skip
        for node, message in sorted(by_node.items()):
            if message.metadata.message_type.startswith("evaluate"):
                if self._evaluation(node, message):
                    usable.append(message)
            elif self._train_reply(node, message):
                usable.append(message)
        return usable

    def _evaluation(self, node: int, message: Message) -> bool:
        """Record an evaluate reply's metrics; False (dropped, logged) when it is stale."""
        row = self.rows.setdefault(node, {})
        if message.has_error() or METRICS_KEY not in message.content.metric_records:
            return True
        metrics = message.content.metric_records[METRICS_KEY]
        if reason := self._stale(dict(metrics)):
            log(WARNING, "round %d: dropped evaluation of node %d: %s", self.round_number,
                node, reason)  # fmt: skip
            return False
        del metrics[ROUND_KEY]
        row |= {f"eval-{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
        return True

    def _train_reply(self, node: int, message: Message) -> bool:
        row: Row = {"node-id": node, "bytes-sent": self.sent_bytes.get(node, 0)}
        row["bytes-received"] = message_bytes(message)
        self.rows[node] = row
        if message.has_error():
            error = str(message.error.reason)
            log(WARNING, "round %d: node %d failed: %s", self.round_number, node, error)
            row["error"] = error
            return True  # Flower's strategies skip errors themselves
        reason = self._refusal(node, row, message.content)
        if reason is not None:
            log(WARNING, "round %d: refused reply of node %d: %s", self.round_number, node, reason)
            row["refused"] = reason
            return False
        return True

    def _refusal(self, node: int, row: Row, content: RecordDict) -> str | None:
        """Why a reply cannot be used (``"<kind>: <detail>"``); else fill ``row``.

        A usable reply's ``server-round`` is removed before the strategy sees it (Flower's
        strategies average every metric key; the row has its ``round``), and the partition it
        names is bound to its node (:class:`~cmfl_flower.server.partitions.Partitions`).
        """
        if reason := records_problem(content):
            return reason
        metrics = dict(content.metric_records[METRICS_KEY])
        if reason := metrics_problem(metrics) or self._stale(metrics):
            return reason
        del metrics[ROUND_KEY]
        partition = metrics.get("partition-id")
        if reason := self.partitions.claim_refusal(node, partition):
            return reason
        record = content.array_records.get(ARRAYS_KEY)
        try:
            arrays = from_record(record) if record is not None else {}
        except Exception as err:  # a malformed Array: its bytes do not decode
            return f"unreadable: arrays do not decode ({type(err).__name__}: {err})"
        reason = self.hooks.check_reply(self.round_number, metrics, arrays)
        if reason is None:
            row |= metrics
            del content.metric_records[METRICS_KEY][ROUND_KEY]
            if isinstance(partition, int):
                self.partitions.bind(partition, node)
            self.hooks.accepted(content.metric_records[METRICS_KEY])
        return reason

    def _stale(self, metrics: dict[str, Any]) -> str | None:
        """Why a reply does not answer the round in progress (its ``server-round``), or None."""
        named = metrics.get(ROUND_KEY)
        if isinstance(named, int) and named == self.round_number:
            return None
        said = f"names {ROUND_KEY} {named}" if named is not None else f"names no {ROUND_KEY}"
        return f"stale: the reply {said}; round {self.round_number} is in progress"

    @property
    def round_number(self) -> int:
        """The run's number of the round in progress."""
        return self.first_round + max(self.train_exchanges, 1) - 1

    # ----- after the round ---------------------------------------------------------------
    def start(self, first_round: int) -> None:
        """The next round is ``first_round``."""
        self.first_round = first_round
        self._seed_sampling(first_round)

    def _seed_sampling(self, server_round: int) -> None:
        """Seed Python's ``random`` for the round about to start.

        Flower's strategies sample nodes with the module-level ``random.sample`` over the
        node ids the grid lists (which :class:`RecordingGrid` sorts), so this makes their
        sampling repeat for the same seed, round and node ids.
        """
        random.seed(sampling_seed(self.cfg.seed, server_round))

    def end_round(self, flower_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower's ``evaluate_fn``: score, record, checkpoint; stop on too few replies."""
        if flower_round == 0:
            return None  # before round 1: nothing happened yet
        server_round = self.first_round + flower_round - 1
        rows = sorted(self.rows.values(), key=lambda r: r.get("partition-id", -1))
        rows = [row for row in rows if "node-id" in row]
        self.hooks.end_round(server_round, arrays)
        extra = self._round_figures(server_round, rows)
        summary = self.record(server_round, rows, extra)
        state, meta = self._state()
        save_checkpoint(self.recorder.run_dir, Checkpoint(server_round, state, meta))
        self._check_replies(server_round, rows, summary)
        self._new_round()
        self._seed_sampling(server_round + 1)
        return MetricRecord({k: v for k, v in summary.items() if isinstance(v, (int, float))})

    def _round_figures(self, server_round: int, rows: list[Row]) -> Row:
        extra: Row = {"no-reply": len(self.sent_bytes) - len(rows)}
        if missing := self.partitions.missing(set(self.sent_bytes)):
            log(WARNING, "round %d: no usable reply from partition(s) %s", server_round, missing)
            extra["partitions-missing"] = ",".join(map(str, missing))
        if moved := self.partitions.moved_line(server_round):
            extra["partitions-moved"] = moved
        return extra | self.hooks.round_metrics(server_round)

    def _state(self) -> tuple[Arrays, dict[str, Any]]:
        """The checkpoint: the hooks' state, the bindings under :data:`SESSION_META`."""
        state, meta = self.hooks.state()
        return state, meta | {SESSION_META: self.partitions.state()}

    def restore(self, meta: dict[str, Any]) -> dict[str, Any]:
        """Take back what :meth:`_state` saved in ``meta``; return the strategy's own meta.

        Without ``federation.num-partitions`` the run keeps the larger of its saved partition
        count and the nodes connected now.
        """
        fixed = bool(self.cfg.federation.num_partitions)
        self.partitions.restore(meta.get(SESSION_META, {}), fixed)
        return {k: v for k, v in meta.items() if k != SESSION_META}

    def record(self, server_round: int, rows: list[Row], extra: Row) -> Row:
        """Store the client rows and the round summary; return the summary."""
        ok = [row for row in rows if not failed(row)]
        summary: Row = {
            "replies": len(ok),
            "errors": sum("error" in row for row in rows),
            "refused": sum("refused" in row for row in rows),
        }
        summary |= refusal_kinds(rows) | spread(ok) | totals(rows) | mean_seconds(ok) | extra
        sampled = max(len(self.sent_bytes), len(rows))
        summary |= {"sampled": sampled, "accepted-share": accepted_share(len(ok), sampled)}
        summary["round-seconds"] = time.perf_counter() - self.round_start
        self.recorder.add_clients(server_round, rows)
        self.recorder.add_round(server_round, summary)
        for row in ok:
            log(INFO, "round %d: %s", server_round, format_row(row))
        log(INFO, "%s", round_line(server_round, self.cfg.federation.rounds, sampled, summary))
        return summary

    def _check_replies(self, server_round: int, rows: list[Row], summary: Row) -> None:
        """Stop the run when fewer than ``federation.min-replies`` replies were usable.

        Its default, 0, asks for half the sampled nodes, rounded up.
        """
        needed, sampled = self.cfg.federation.min_replies, summary["sampled"]
        rule = f"federation.min-replies = {needed}"
        if not needed:
            needed = -(-sampled // 2)
            rule = (f"{needed} needed: half of the {sampled} sampled nodes, rounded up (the "
                    "default, federation.min-replies = 0)")  # fmt: skip
        if summary["replies"] >= needed:
            return
        reasons = [str(row.get("error") or row["refused"]) for row in rows if failed(row)]
        raise RuntimeError(
            f"round {server_round}: {summary['replies']} usable replies, {rule}; "
            f"{summary['errors']} errors, {summary['refused']} refused, "
            f"{summary['no-reply']} without reply"
            + (f"; first problem: {reasons[0]}" if reasons else "")
        )


def _restore(session: Session) -> tuple[int, ArrayRecord]:
    """The first round to run and the arrays to start from (``output.resume``: the checkpoint's)."""
    cfg, run_dir, hooks = session.cfg, session.recorder.run_dir, session.hooks
    checkpoint = load_checkpoint(run_dir) if cfg.output.resume else None
    done = checkpoint.round if checkpoint is not None else 0
    if cfg.output.resume:
        session.recorder.truncate(done)
        log(INFO, "resuming %s after round %d", run_dir, done)
    hooks.first_round = done + 1  # its sampling and figures see the run's rounds
    if checkpoint is not None:
        hooks.load_state(checkpoint.arrays, session.restore(checkpoint.meta))
    return done + 1, to_record(hooks.initial_arrays())


def run_federation(grid: Grid, cfg: AppConfig) -> Path:
    """Run the configured method to the end, recording into its run directory.

    The directory is fresh, or with ``output.resume`` the named run's, continued after its
    last checkpoint.
    """
    recorder = RunRecorder.open(cfg)
    cfg = recorder.cfg  # with the resolved output.run-name, which the clients need
    log(INFO, "==> cmfl-flower run directory: %s", recorder.run_dir)
    try:
        method = resolve_method(cfg.method)
        num_nodes = wait_for_nodes(grid, cfg)
        strategy, hooks = server_side(cfg, method, recorder.run_dir, num_nodes)
        session = Session(cfg, recorder, hooks, cfg.federation.num_partitions or num_nodes)
        first_round, initial = _restore(session)
        session.start(first_round)
        if (rounds := cfg.federation.rounds - first_round + 1) > 0:
            strategy.start(
                RecordingGrid(grid, session),
                initial,
                num_rounds=rounds,
                timeout=cfg.federation.round_timeout,
                train_config=ConfigRecord({RUN_NAME_KEY: cfg.output.run_name}),
                evaluate_config=ConfigRecord({RUN_NAME_KEY: cfg.output.run_name}),
                evaluate_fn=session.end_round,
            )
    except BaseException as err:
        recorder.finish(err)
        log(INFO, "==> cmfl-flower run failed; what it had is in: %s", recorder.run_dir)
        raise
    recorder.finish()
    log(INFO, "==> cmfl-flower results written to: %s", recorder.run_dir)
    log(INFO, "==> open %s", recorder.run_dir / "report.html")
    return recorder.run_dir
