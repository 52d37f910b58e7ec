"""Runs any method's server strategy with Flower's ``Strategy.start``, and records the run.

The strategy (one of Flower's for a weight method, else the method's own) drives the rounds.
Between it and Flower's Grid sits a :class:`RecordingGrid`, which for every message

* routes it to the method's client routine (``train`` becomes ``train.<action>``) and stamps
  the run's round number and run name into its config (Flower counts from 1 after a resume);
* counts its bytes, and the bytes of each reply, as Flower ships them;
* checks each reply and refuses a malformed one before the strategy sees it (the reason,
  ``"<kind>: <detail>"``, is logged and counted as ``refused-<kind>``).

Every reply names the round it answers (the metric ``server-round``): a train reply naming
another round, or none, is refused (``stale``); a usable reply's ``server-round`` is removed
before the strategy sees its metrics. Partition ids are identities: one is bound, for the
run, to the first node whose reply for it was used, and the binding is checkpointed. Another
node's claim is refused while that node is connected (``partition-claim``, naming both) and
taken over once it is gone (a restarted SuperNode: ``partitions-moved``); an id outside
``0..N-1`` is refused (``partition-id``), N being ``federation.num-partitions`` or else the
nodes connected when the run started.

Before each round it seeds Python's ``random`` from the run's seed and the round, and it lists
the node ids in order, so that Flower's node sampling repeats (as the method strategies' own
does). After each round (Flower's ``evaluate_fn``) :class:`Session` scores the global arrays of a
weight method, writes the round's rows and summary (with ``accepted-share``, the accepted
replies over the sampled nodes), saves the checkpoint, and stops the run (``RuntimeError``)
when fewer than ``federation.min-replies`` replies were usable (its default, 0: half the
sampled nodes, rounded up).
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Iterable
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

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
    Method,
    RoundStrategy,
    from_record,
    sampling_seed,
    to_record,
)
from cmfl_flower.privacy import round_report
from cmfl_flower.report import accepted_share, round_line
from cmfl_flower.results import RunRecorder
from cmfl_flower.server.flower_api import message_bytes, with_message_type
from cmfl_flower.server.strategies import EQUAL_WEIGHT_KEY, build_strategy
from cmfl_flower.weights import weights_problem

SPREAD_METRICS = ("local-acc", "global-acc", "val-acc", "generated-recognised")  # mean/min/max
# reported as sums; screened-out and dropped: received sets and entries a client left out
TOTAL_METRICS = ("num-generated", "bytes-sent", "bytes-received", "screened-out", "dropped")
POLL_SECONDS = 0.5  # how often the server asks the SuperLink for replies
RESERVED = frozenset({"node-id", "bytes-sent", "bytes-received", "error", "refused"})
SESSION_META = "session"  # the checkpoint meta's key for the partition bindings


class Session:
    """One run of a method: its strategy, what each round sent and received, the recorder."""

    def __init__(
        self, cfg: AppConfig, recorder: RunRecorder, method: Method, num_partitions: int
    ) -> None:
        self.cfg = cfg
        self.recorder = recorder
        self.method = method
        self.num_partitions = num_partitions  # replies may claim partition ids 0..this - 1
        self.strategy: Strategy | None = None
        self.first_round = 1
        self.train_exchanges = 0  # train rounds sent so far by this session
        self.bound: dict[int, int] = {}  # partition id -> its node, for the run (checkpointed)
        self.connected: set[int] = set()  # node ids the grid listed when the round sampled
        self._new_round()

    def _new_round(self) -> None:
        self.rows: dict[int, Row] = {}  # node id -> its row this round
        self.sent_bytes: dict[int, int] = {}
        self.content_bytes: dict[int, int] = {}  # shared records, measured once per round
        self.reference: Arrays | None = None  # the weights sent this round (weight methods)
        self.metric_keys: set[str] | None = None  # Flower averages only equal key sets
        self.partition_nodes: dict[int, int] = {}  # partition id -> the node it replied from
        self.moved: dict[int, tuple[int, int]] = {}  # partition id -> (gone node, new node)
        self.round_start = time.perf_counter()

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
            if self.method.exchanges_weights and self.reference is None and record is not None:
                self.reference = from_record(record)
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
        names is bound to its node (:meth:`_claim_refusal`).
        """
        if reason := _records_problem(content):
            return reason
        metrics = dict(content.metric_records[METRICS_KEY])
        if reason := _metrics_problem(metrics) or self._stale(metrics):
            return reason
        del metrics[ROUND_KEY]
        partition = metrics.get("partition-id")
        if reason := self._claim_refusal(node, partition):
            return reason
        record = content.array_records.get(ARRAYS_KEY)
        try:
            arrays = from_record(record) if record is not None else {}
        except Exception as err:  # a malformed Array: its bytes do not decode
            return f"unreadable: arrays do not decode ({type(err).__name__}: {err})"
        if self.method.exchanges_weights:
            reason = self._weights_refusal(metrics, arrays)
        else:
            assert isinstance(self.strategy, RoundStrategy)
            reason = self.strategy.check_reply(self.round_number, metrics, arrays)
        if reason is None:
            row |= metrics
            del content.metric_records[METRICS_KEY][ROUND_KEY]
            if isinstance(partition, int):
                self._bind(partition, node)
            if self.method.exchanges_weights and self.cfg.privacy.enabled:
                content.metric_records[METRICS_KEY][EQUAL_WEIGHT_KEY] = 1  # the accounting's
        return reason

    def _stale(self, metrics: dict[str, Any]) -> str | None:
        """Why a reply does not answer the round in progress (its ``server-round``), or None."""
        named = metrics.get(ROUND_KEY)
        if isinstance(named, int) and named == self.round_number:
            return None
        said = f"names {ROUND_KEY} {named}" if named is not None else f"names no {ROUND_KEY}"
        return f"stale: the reply {said}; round {self.round_number} is in progress"

    def _claim_refusal(self, node: int, partition: Any) -> str | None:
        """Why ``node`` may not speak for ``partition``, or None.

        A partition id is bound, for the run, to the first node whose reply for it was used;
        that node keeps it while it is connected, and a node that replaces a gone one takes it
        over (a restarted SuperNode: a new node id). A node holds one partition. Ids outside
        ``0..num_partitions - 1`` are refused as ``partition-id``, claims of a live node's
        partition (or of a second partition) as ``partition-claim``. A reply naming no
        partition binds nothing (the relay refuses it; a weight method uses it).
        """
        if not isinstance(partition, int):
            return None
        if not 0 <= partition < self.num_partitions:
            return (
                f"partition-id: partition-id {partition} is outside 0..{self.num_partitions - 1}"
                " (federation.num-partitions, else the nodes connected at the start)"
            )
        holder = self.bound.get(partition, node)
        if holder != node and holder in self.connected:
            return (
                f"partition-claim: partition-id {partition} is bound to live node {holder}; "
                f"node {node}'s claim refused"
            )
        if held := sorted(p for p, n in self.bound.items() if n == node and p != partition):
            return (
                f"partition-claim: node {node} is bound to partition-id {held[0]}; its claim of "
                f"partition-id {partition} refused"
            )
        return None

    def _bind(self, partition: int, node: int) -> None:
        """Bind ``partition`` to ``node``, whose reply for it was used this round."""
        if (old := self.bound.get(partition, node)) != node:
            self.moved[partition] = (old, node)
        self.bound[partition] = node
        self.partition_nodes[partition] = node

    def _weights_refusal(self, metrics: dict[str, Any], arrays: Arrays) -> str | None:
        weight = metrics.get("num-examples")
        if not isinstance(weight, int) or isinstance(weight, bool) or weight <= 0:
            return f"metrics: 'num-examples' missing or not positive: {weight!r}"
        if self.reference is None:
            return "records: no weights were sent to compare with"
        if reason := weights_problem(arrays, self.reference, exact_dtype=False):
            return reason
        if self.metric_keys is not None and set(metrics) != self.metric_keys:
            return f"metrics: names differ from the other replies' ({sorted(metrics)})"
        self.metric_keys = set(metrics)
        return None

    @property
    def round_number(self) -> int:
        """The run's number of the round in progress."""
        return self.first_round + max(self.train_exchanges, 1) - 1

    # ----- after the round ---------------------------------------------------------------
    def start(self, strategy: Strategy, first_round: int) -> None:
        """Attach ``strategy``; the next round is ``first_round``."""
        self.strategy, self.first_round = strategy, first_round
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
        extra = self._round_figures(server_round, arrays, rows)
        summary = self.record(server_round, rows, extra)
        state, meta = self._state(arrays)
        save_checkpoint(self.recorder.run_dir, Checkpoint(server_round, state, meta))
        self._check_replies(server_round, rows, summary)
        self._new_round()
        self._seed_sampling(server_round + 1)
        return MetricRecord({k: v for k, v in summary.items() if isinstance(v, (int, float))})

    def _round_figures(self, server_round: int, arrays: ArrayRecord, rows: list[Row]) -> Row:
        extra: Row = {"no-reply": len(self.sent_bytes) - len(rows)}
        if missing := self._missing_partitions():
            log(WARNING, "round %d: no usable reply from partition(s) %s", server_round, missing)
            extra["partitions-missing"] = ",".join(map(str, missing))
        if moved := self._moved_partitions(server_round):
            extra["partitions-moved"] = moved
        if not self.method.exchanges_weights:
            assert isinstance(self.strategy, RoundStrategy)
            return extra | self.strategy.round_metrics(server_round)
        extra["averaged"] = sum(not _failed(row) for row in rows)
        if self.cfg.privacy.enabled:
            extra |= round_report(self.cfg.privacy, server_round, 0)
        if self.method.server_evaluate is not None and len(arrays):
            run_dir, weights = self.recorder.run_dir, from_record(arrays)
            extra |= self.method.server_evaluate(self.cfg, run_dir, server_round, weights)
        return extra

    def _missing_partitions(self) -> list[int]:
        """Known partitions without a usable reply whose node was asked or is gone.

        A partition whose node is connected but was not sampled this round is not missing.
        """
        return sorted(
            partition
            for partition, node in self.bound.items()
            if partition not in self.partition_nodes
            and (node in self.sent_bytes or node not in self.connected)
        )

    def _moved_partitions(self, server_round: int) -> str:
        """``"<partition>:<old node>-><new node>,..."`` for partitions on a new node this round."""
        moved = dict(sorted(self.moved.items()))
        for partition, (old, new) in moved.items():
            log(INFO, "round %d: partition-id %d moved from node %d to node %d (a restarted "
                "SuperNode)", server_round, partition, old, new)  # fmt: skip
        return ",".join(f"{p}:{old}->{new}" for p, (old, new) in moved.items())

    def _state(self, arrays: ArrayRecord) -> tuple[Arrays, dict[str, Any]]:
        """The checkpoint: the strategy's state, the bindings under :data:`SESSION_META`."""
        if isinstance(self.strategy, RoundStrategy):
            state, meta = self.strategy.state()
        else:
            state, meta = from_record(arrays), {}
        own = {"bound": {str(p): n for p, n in sorted(self.bound.items())}}
        return state, meta | {SESSION_META: own | {"num-partitions": self.num_partitions}}

    def restore(self, meta: dict[str, Any]) -> dict[str, Any]:
        """Take back what :meth:`_state` saved in ``meta``; return the strategy's own meta.

        Without ``federation.num-partitions`` the run keeps the larger of its saved partition
        count and the nodes connected now.
        """
        own = meta.get(SESSION_META, {})
        self.bound = {int(p): int(n) for p, n in own.get("bound", {}).items()}
        if not self.cfg.federation.num_partitions:
            self.num_partitions = max(self.num_partitions, int(own.get("num-partitions", 0)))
        return {k: v for k, v in meta.items() if k != SESSION_META}

    def record(self, server_round: int, rows: list[Row], extra: Row) -> Row:
        """Store the client rows and the round summary; return the summary."""
        ok = [row for row in rows if not _failed(row)]
        summary: Row = {
            "replies": len(ok),
            "errors": sum("error" in row for row in rows),
            "refused": sum("refused" in row for row in rows),
        }
        summary |= _refusal_kinds(rows) | _spread(ok) | _totals(rows) | _mean_seconds(ok) | extra
        sampled = max(len(self.sent_bytes), len(rows))
        summary |= {"sampled": sampled, "accepted-share": accepted_share(len(ok), sampled)}
        summary["round-seconds"] = time.perf_counter() - self.round_start
        self.recorder.add_clients(server_round, rows)
        self.recorder.add_round(server_round, summary)
        for row in ok:
            log(INFO, "round %d: %s", server_round, _format_row(row))
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
        reasons = [str(row.get("error") or row["refused"]) for row in rows if _failed(row)]
        raise RuntimeError(
            f"round {server_round}: {summary['replies']} usable replies, {rule}; "
            f"{summary['errors']} errors, {summary['refused']} refused, "
            f"{summary['no-reply']} without reply"
            + (f"; first problem: {reasons[0]}" if reasons else "")
        )


class RecordingGrid(Grid):
    """Flower's Grid with a :class:`Session` on the way out and on the way back."""

    def __init__(self, grid: Grid, session: Session) -> None:
        self.grid = grid
        self.session = session

    def set_run(self, run: Any) -> None:
        """Flower's."""
        self.grid.set_run(run)

    @property
    def run(self) -> Any:
        """Flower's."""
        return self.grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Flower's."""
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """Flower's, in id order (for seeded sampling); the session remembers who was connected."""
        nodes = sorted(self.grid.get_node_ids())
        self.session.connected = set(nodes)
        return nodes

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Not used by ``Strategy.start``: refused, so no message escapes the recording."""
        raise NotImplementedError("cmfl-flower strategies exchange through send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Not used by ``Strategy.start`` (see :meth:`push_messages`)."""
        raise NotImplementedError("cmfl-flower strategies exchange through send_and_receive")

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Stamp and measure the messages; record and check the replies."""
        batch = list(messages)
        if not batch:
            return []
        if any(m.metadata.message_type.startswith("train") for m in batch):
            self.session.train_exchanges += 1  # one per round: Strategy.start's loop
        sent = [self.session.outgoing(m) for m in batch]
        ids = list(self.grid.push_messages(sent))
        recipients = {mid: m.metadata.dst_node_id for mid, m in zip(ids, sent, strict=True)}
        return self.session.incoming(self._pull(set(ids), timeout), recipients)

    def _pull(self, pending: set[str], timeout: float | None) -> list[Message]:
        """Flower's ``send_and_receive`` loop, polling every :data:`POLL_SECONDS` (not 3 s)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending and (deadline is None or time.monotonic() < deadline):
            pulled = list(self.grid.pull_messages(pending))
            replies += pulled
            pending -= {m.metadata.reply_to_message_id for m in pulled}
            if pending:
                time.sleep(POLL_SECONDS)
        return replies


def wait_for_nodes(grid: Grid, cfg: AppConfig) -> int:
    """Wait up to ``federation.wait-for-nodes`` s for ``min-nodes`` nodes; return how many."""
    fed = cfg.federation
    deadline = time.monotonic() + fed.wait_for_nodes
    while len(nodes := list(grid.get_node_ids())) < fed.min_nodes:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"only {len(nodes)} node(s) connected after {fed.wait_for_nodes:.0f} s; "
                f"federation.min-nodes = {fed.min_nodes}"
            )
        time.sleep(1.0)
    return len(nodes)


def _strategy(cfg: AppConfig, method: Method, run_dir: Path, num_nodes: int) -> Strategy:
    if method.strategy is not None:
        if cfg.strategy != "fedavg" or cfg.strategy_args:
            raise ValueError(
                f"strategy = {cfg.strategy!r} has no use with method = {cfg.method!r}: its server "
                "side is its own (the strategy key picks how weight methods are combined)"
            )
        return method.strategy(cfg, run_dir)
    lr = method.learning_rate(cfg) if method.learning_rate else 0.0
    return build_strategy(cfg, num_nodes, lr)


def _restore(session: Session, strategy: Strategy, method: Method) -> tuple[int, ArrayRecord]:
    """The first round to run and the arrays to start from (``output.resume``: the checkpoint's)."""
    cfg, run_dir = session.cfg, session.recorder.run_dir
    checkpoint = load_checkpoint(run_dir) if cfg.output.resume else None
    done = checkpoint.round if checkpoint is not None else 0
    if cfg.output.resume:
        session.recorder.truncate(done)
        log(INFO, "resuming %s after round %d", run_dir, done)
    meta = session.restore(checkpoint.meta) if checkpoint is not None else {}
    if isinstance(strategy, RoundStrategy):
        strategy.first_round = done + 1  # its hooks and sampling see the run's rounds
        if checkpoint is not None:
            strategy.load_state(checkpoint.arrays, meta)
        return done + 1, ArrayRecord()
    assert method.initial_arrays is not None
    arrays = checkpoint.arrays if checkpoint is not None else method.initial_arrays(cfg, run_dir)
    return done + 1, to_record(arrays)


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
        strategy = _strategy(cfg, method, recorder.run_dir, num_nodes)
        session = Session(cfg, recorder, method, cfg.federation.num_partitions or num_nodes)
        first_round, initial = _restore(session, strategy, method)
        session.start(strategy, first_round)
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


def _failed(row: Row) -> bool:
    return "error" in row or "refused" in row


def _records_problem(content: RecordDict) -> str | None:
    """Why a reply's records are not one MetricRecord and at most one ArrayRecord, or None."""
    if extra := sorted(set(content) - {METRICS_KEY, ARRAYS_KEY}):
        return f"records: unexpected record(s) {extra}"
    if METRICS_KEY not in content.metric_records:
        return f"records: no MetricRecord {METRICS_KEY!r}"
    if ARRAYS_KEY in content and ARRAYS_KEY not in content.array_records:
        return f"records: {ARRAYS_KEY!r} is not an ArrayRecord"
    return None


def _metrics_problem(metrics: dict[str, Any]) -> str | None:
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


def _refusal_kinds(rows: list[Row]) -> dict[str, int]:
    """``refused-<kind>``: how many replies were refused for each kind of reason."""
    kinds = [refusal_kind(str(row["refused"])) for row in rows if "refused" in row]
    return {f"refused-{kind}": kinds.count(kind) for kind in sorted(set(kinds))}


def _spread(rows: list[Row]) -> dict[str, float]:
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
