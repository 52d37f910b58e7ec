"""What every method is made of: a client routine, a server side, and the records between them.

A :class:`Method` names its client routine (what a client does with one ``train`` message)
and how its server side is built:

* a method that exchanges **weights** (``encoder-lora``, ``diffusion-unet``, ``diffusion-lora``)
  gives the server's initial arrays and its per-round scoring of the global arrays; the
  ``strategy`` key picks the Flower strategy that combines them (FedAvg, FedAdam, Krum, ...);
* any other method brings its own Flower :class:`~flwr.serverapp.strategy.Strategy`, usually a
  :class:`RoundStrategy` (the relay forwards vectors, the local baselines only collect metrics).

Messages, both ways, hold at most one ``ArrayRecord`` (``arrays``) beside one ``ConfigRecord``
(``config``: ``server-round``, ``run-name`` and what a strategy adds, such as FedProx's
``proximal-mu``) or one ``MetricRecord`` (``metrics``, which names the ``server-round`` it
answers). Clients read the run config from ``context.run_config``; nothing else travels.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from logging import INFO
from pathlib import Path
from typing import Any

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

from cmfl_flower.aliases import Arrays, Metrics
from cmfl_flower.client.task import ClientRoutine, ClientTask, RoundOutput
from cmfl_flower.config import AppConfig

ARRAYS_KEY = "arrays"  # ArrayRecord: token vectors or weights, per method
CONFIG_KEY = "config"  # ConfigRecord: ROUND_KEY, RUN_NAME_KEY and what a strategy adds
METRICS_KEY = "metrics"  # MetricRecord: the client's scalar metrics for the round
ROUND_KEY = "server-round"
RUN_NAME_KEY = "run-name"  # the run directory's name, resolved by the server

EvaluateRoutine = Callable[[AppConfig, ClientTask, Arrays], Metrics]
StrategyFactory = Callable[[AppConfig, Path], Strategy]


@dataclass(frozen=True)
class Method:
    """One method: its client routine and its server side, registered once.

    ``strategy``: builds the method's own server strategy (``(cfg, run_dir) -> Strategy``);
    None for a weight method, whose strategy the ``strategy`` key names. A weight method gives
    ``initial_arrays`` (round 1's global arrays: ``(cfg, run_dir) -> arrays``) and may give
    ``server_evaluate`` (scores of the global arrays after each round:
    ``(cfg, run_dir, round, arrays) -> metrics``), ``evaluate`` (its answer to Flower's
    ``evaluate`` message) and ``learning_rate`` (the clients', which q-FedAvg needs).
    """

    name: str
    train: ClientRoutine
    strategy: StrategyFactory | None = None
    initial_arrays: Callable[[AppConfig, Path], Arrays] | None = None
    server_evaluate: Callable[[AppConfig, Path, int, Arrays], Metrics] | None = None
    evaluate: EvaluateRoutine | None = None
    learning_rate: Callable[[AppConfig], float] | None = None  # the clients' (q-FedAvg needs it)

    def __post_init__(self) -> None:
        if (self.strategy is None) == (self.initial_arrays is None):
            raise ValueError(
                f"method {self.name!r}: give either its own strategy or, for a weight method, "
                "initial_arrays (and let the `strategy` key pick the Flower strategy)"
            )

    @property
    def exchanges_weights(self) -> bool:
        """Whether the ``strategy`` key (a Flower strategy) combines what clients send."""
        return self.strategy is None


def to_record(arrays: Arrays) -> ArrayRecord:
    """Numpy arrays as an ArrayRecord (Flower wants ``Array`` values)."""
    return ArrayRecord({key: Array(np.ascontiguousarray(v)) for key, v in arrays.items()})


def from_record(record: ArrayRecord) -> Arrays:
    """An ArrayRecord as numpy arrays."""
    return {key: array.numpy() for key, array in record.items()}


def sampling_seed(seed: int, server_round: int) -> str:
    """The seed of round ``server_round``'s node sampling, for every method.

    A function of the run's seed and round alone, so that a resumed run samples as the
    uninterrupted one did, and the relay and Flower's strategies pick the same nodes.
    """
    return f"{seed}/{server_round}"


def reply(output: RoundOutput, message: Message, server_round: int) -> Message:
    """The reply to ``message`` carrying a routine's metrics and arrays.

    Its metrics name the round it answers (``server-round``): the server refuses a reply to
    any other round and removes the name before its strategy sees the metrics.
    """
    content = RecordDict({METRICS_KEY: MetricRecord({**output.metrics, ROUND_KEY: server_round})})
    if output.arrays:
        content[ARRAYS_KEY] = to_record(output.arrays)
    return Message(content, reply_to=message)


class ServerHooks:
    """What the run's round loop asks of a method's server side, whatever its kind.

    A weight method's hooks wrap a Flower strategy
    (:class:`cmfl_flower.server.strategies.WeightHooks`); a :class:`RoundStrategy` is its own.
    Per round the loop calls :meth:`sent` for every ``train`` message, :meth:`check_reply` for
    every reply that passed the common checks and :meth:`accepted` for every usable one; after
    the round :meth:`end_round` with the strategy's arrays, then :meth:`round_metrics` and
    :meth:`state` (the checkpoint). On a start or resume it sets :attr:`first_round`, calls
    :meth:`load_state` with a checkpoint and sends round 1 :meth:`initial_arrays`.
    """

    first_round = 1  # set by the round loop: after a resume Flower still counts from 1

    def sent(self, node_id: int, record: ArrayRecord | None) -> None:
        """A ``train`` message for ``node_id`` carries ``record`` (None: no ArrayRecord).

        Left encoded: a hook that needs the arrays decodes them, once.
        """

    def check_reply(self, server_round: int, metrics: Metrics, arrays: Arrays) -> str | None:
        """Why a reply cannot be used (``"<kind>: <detail>"``), or None."""
        return None

    def accepted(self, metrics: MetricRecord) -> None:
        """A usable reply's metrics, before the strategy sees them (may add keys)."""

    def end_round(self, server_round: int, arrays: ArrayRecord) -> None:
        """The round is over; ``arrays``: what the strategy holds after it."""

    def round_metrics(self, server_round: int) -> dict[str, Any]:
        """Extra figures for the round's summary (called once, after :meth:`end_round`)."""
        return {}

    def state(self) -> tuple[Arrays, dict[str, Any]]:
        """What to checkpoint after each round: arrays and JSON-able metadata."""
        return {}, {}

    def load_state(self, arrays: Arrays, meta: dict[str, Any]) -> None:
        """Restore what :meth:`state` returned."""

    def initial_arrays(self) -> Arrays:
        """The arrays the strategy starts from (after :meth:`load_state` on a resume)."""
        return {}


class RoundStrategy(Strategy, ServerHooks):
    """A method's own server side, run by Flower's ``Strategy.start`` like any strategy.

    Every round it samples ``federation.fraction`` of the connected nodes (seeded, at least
    ``federation.min-nodes``), sends each a ``train`` message with :meth:`arrays_for`, and
    passes each usable reply to :meth:`absorb`. Replies were checked before (the run's
    round loop refuses malformed ones and those :meth:`check_reply` rejects). It is its own
    :class:`ServerHooks`: :meth:`state` and :meth:`load_state` are checkpointed after each round
    and restored on ``output.resume``; :meth:`round_metrics` adds to the round's summary.
    """

    def __init__(self, cfg: AppConfig, run_dir: Path) -> None:
        self.cfg = cfg
        self.run_dir = run_dir

    # ----- hooks -------------------------------------------------------------------------
    def arrays_for(self, server_round: int, node_id: int) -> Arrays | None:
        """Arrays to send to ``node_id`` this round (None: none)."""
        return None

    def absorb(self, server_round: int, node_id: int, metrics: Metrics, arrays: Arrays) -> None:
        """Take one usable reply."""

    # ----- Flower's Strategy -------------------------------------------------------------
    def round(self, flower_round: int) -> int:
        """The run's round number of Flower's ``flower_round`` (they differ after a resume)."""
        return self.first_round + flower_round - 1

    def sample(self, grid: Grid, server_round: int) -> list[int]:
        """Seeded sample of ``fraction`` of the connected nodes (at least ``min-live-nodes``)."""
        fed = self.cfg.federation
        nodes = sorted(grid.get_node_ids())
        size = min(len(nodes), max(fed.min_live_nodes, round(fed.fraction * len(nodes))))
        return sorted(random.Random(sampling_seed(self.cfg.seed, server_round)).sample(nodes, size))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One ``train`` message per sampled node, with that node's arrays."""
        server_round = self.round(server_round)
        messages = []
        for node in self.sample(grid, server_round):
            content = RecordDict({CONFIG_KEY: ConfigRecord({**config, ROUND_KEY: server_round})})
            if (sent := self.arrays_for(server_round, node)) is not None:
                content[ARRAYS_KEY] = to_record(sent)
            messages.append(Message(content, node, MessageType.TRAIN))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Pass every reply without an error to :meth:`absorb`."""
        server_round = self.round(server_round)
        for message in replies:
            if message.has_error():
                continue
            content = message.content
            record = content.array_records.get(ARRAYS_KEY)
            arrays = from_record(record) if record is not None else {}
            metrics = dict(content.metric_records[METRICS_KEY])
            self.absorb(server_round, message.metadata.src_node_id, metrics, arrays)
        return None, None

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Clients evaluate inside their train round: no ``evaluate`` messages."""
        return []

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Nothing to aggregate (see :meth:`configure_evaluate`)."""
        return None

    def summary(self) -> None:
        """Log the sampling settings."""
        fed = self.cfg.federation
        log(
            INFO,
            "%s: method=%s fraction=%.2f min-nodes=%d",
            type(self).__name__,
            self.cfg.method,
            fed.fraction,
            fed.min_nodes,
        )
