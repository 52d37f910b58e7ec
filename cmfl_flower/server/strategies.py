"""A method's server side: Flower's own strategies for the weight methods, or the method's own.

:func:`server_side` builds the strategy Flower's ``Strategy.start`` runs and the
:class:`~cmfl_flower.methods.base.ServerHooks` the round loop talks to: for a weight method,
:class:`WeightHooks` around the Flower strategy; for any other, its own
:class:`~cmfl_flower.methods.base.RoundStrategy`.

``strategy = "fedadam"`` picks one of Flower's built-ins by short name, ``"pkg.module:Class"``
any :class:`~flwr.serverapp.strategy.Strategy` subclass. Its keyword arguments are the
sampling settings of ``federation`` (where the class takes them) and ``strategy-args``
(``"eta=0.01 beta_1=0.9"``), checked against the class's signature. With ``privacy.enabled``
the strategy runs inside Flower's ``DifferentialPrivacyServerSideFixedClipping``.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp import strategy as flower
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, Strategy

from cmfl_flower.aliases import Arrays, Metrics
from cmfl_flower.config import AppConfig
from cmfl_flower.methods.base import Method, RoundStrategy, ServerHooks, from_record
from cmfl_flower.privacy import round_report
from cmfl_flower.weights import weights_problem

FLOWER_STRATEGIES: dict[str, type[Strategy]] = {
    "fedavg": flower.FedAvg,
    "fedavgm": flower.FedAvgM,
    "fedadagrad": flower.FedAdagrad,
    "fedadam": flower.FedAdam,
    "fedyogi": flower.FedYogi,
    "fedprox": flower.FedProx,
    "fedmedian": flower.FedMedian,
    "fedtrimmedavg": flower.FedTrimmedAvg,
    "krum": flower.Krum,
    "multikrum": flower.MultiKrum,
    "bulyan": flower.Bulyan,
    "qfedavg": flower.QFedAvg,
}
EQUAL_WEIGHT_KEY = "unit-weight"  # under DP the round loop weighs every usable reply 1


def strategy_class(name: str) -> type[Strategy]:
    """The class ``strategy`` names: a short name or ``package.module:Class``."""
    if ":" not in name:
        if name not in FLOWER_STRATEGIES:
            raise ValueError(
                f"strategy = {name!r} is unknown; Flower's built-ins: "
                f"{', '.join(FLOWER_STRATEGIES)} (or give 'package.module:Class')"
            )
        return FLOWER_STRATEGIES[name]
    module_name, _, class_name = name.partition(":")
    try:
        found = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"strategy = {name!r} cannot be imported: {err}") from None
    if not (isinstance(found, type) and issubclass(found, Strategy)):
        raise ValueError(f"strategy = {name!r} is not a flwr.serverapp.strategy.Strategy")
    return found


def parse_args(text: str) -> dict[str, Any]:
    """``"eta=0.01 beta_1=0.9 name=x"`` as keyword arguments (Python literals, else strings)."""
    args: dict[str, Any] = {}
    for item in text.split():
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"strategy-args: {item!r} is not name=value")
        try:
            args[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            args[key] = value
    return args


def _parameters(cls: type[Strategy]) -> dict[str, inspect.Parameter]:
    params = dict(inspect.signature(cls.__init__).parameters)
    params.pop("self", None)
    return params


def build_strategy(cfg: AppConfig, num_nodes: int, client_lr: float) -> Strategy:
    """The configured Flower strategy for a federation of ``num_nodes`` connected nodes.

    ``client_lr``: the clients' learning rate, which q-FedAvg needs to know.
    """
    cls = strategy_class(cfg.strategy)
    params = _parameters(cls)
    user = parse_args(cfg.strategy_args)
    if unknown := sorted(set(user) - set(params)):
        raise ValueError(
            f"strategy-args: {', '.join(unknown)} not accepted by {cls.__name__}; "
            f"it takes: {', '.join(params) or 'nothing'}"
        )
    fed = cfg.federation
    defaults: dict[str, Any] = {
        "fraction_train": fed.fraction,
        "fraction_evaluate": fed.fraction_evaluate,
        "min_train_nodes": fed.min_live_nodes,
        "min_evaluate_nodes": 1 if fed.fraction_evaluate else 0,
        "min_available_nodes": fed.min_live_nodes,
        "client_learning_rate": client_lr,
        "train_loss_key": "train-loss",
    }
    if cfg.privacy.enabled:
        if "weighted_by_key" not in params:
            raise ValueError(
                f"privacy.enabled needs a strategy that weighs clients by a metric "
                f"(weighted_by_key); {cls.__name__} does not"
            )
        defaults["weighted_by_key"] = EQUAL_WEIGHT_KEY
    kwargs = {k: v for k, v in defaults.items() if k in params} | user
    try:
        strategy = cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"strategy = {cfg.strategy!r} with {kwargs}: {err}") from None
    if not cfg.privacy.enabled:
        return strategy
    sampled = min(num_nodes, max(fed.min_live_nodes, round(fed.fraction * num_nodes)))
    return DifferentialPrivacyServerSideFixedClipping(
        strategy,
        noise_multiplier=cfg.privacy.noise_multiplier,
        clipping_norm=cfg.privacy.update_clip_norm,
        num_sampled_clients=sampled,
    )


class WeightHooks(ServerHooks):
    """A weight method's hooks around the Flower strategy that combines its clients' weights.

    A reply must say how many examples it weighs (``num-examples``), send arrays shaped as the
    round's global arrays (the first ``train`` message's) and name the same metrics as the
    round's other replies (Flower averages equal key sets only). Under ``privacy.enabled``
    every usable reply weighs 1 (:data:`EQUAL_WEIGHT_KEY`), as the accounting assumes. After
    each round it scores the global arrays (the method's ``server_evaluate``) and checkpoints
    them.
    """

    def __init__(self, cfg: AppConfig, method: Method, run_dir: Path) -> None:
        assert method.initial_arrays is not None  # a weight method (Method checks it)
        self.cfg, self.method, self.run_dir = cfg, method, run_dir
        self.weights: Arrays | None = None  # the global arrays after the last round
        self._new_round()

    def _new_round(self) -> None:
        self.reference: Arrays | None = None  # the weights sent this round
        self.metric_keys: set[str] | None = None
        self.averaged = 0

    def sent(self, node_id: int, record: ArrayRecord | None) -> None:
        """The round's global arrays, decoded from its first ``train`` message only."""
        if self.reference is None and record is not None:
            self.reference = from_record(record)

    def check_reply(self, server_round: int, metrics: Metrics, arrays: Arrays) -> str | None:
        """Refuse a reply without a positive ``num-examples``, off-shape arrays or other keys."""
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

    def accepted(self, metrics: MetricRecord) -> None:
        """Count the reply; under DP weigh it 1."""
        self.averaged += 1
        if self.cfg.privacy.enabled:
            metrics[EQUAL_WEIGHT_KEY] = 1

    def end_round(self, server_round: int, arrays: ArrayRecord) -> None:
        """Keep the strategy's global arrays (the checkpoint's and the score's)."""
        if len(arrays):
            self.weights = from_record(arrays)

    def round_metrics(self, server_round: int) -> dict[str, Any]:
        """``averaged`` replies, the DP report and the method's scores of the global arrays."""
        extra: dict[str, Any] = {"averaged": self.averaged}
        if self.cfg.privacy.enabled:
            extra |= round_report(self.cfg.privacy, server_round, 0)
        if self.method.server_evaluate is not None and self.weights is not None:
            extra |= self.method.server_evaluate(self.cfg, self.run_dir, server_round, self.weights)
        self._new_round()
        return extra

    def state(self) -> tuple[Arrays, dict[str, Any]]:
        """The global arrays."""
        return dict(self.weights or {}), {}

    def load_state(self, arrays: Arrays, meta: dict[str, Any]) -> None:
        """Start from the checkpoint's global arrays."""
        self.weights = arrays

    def initial_arrays(self) -> Arrays:
        """The checkpoint's global arrays, else the method's round-1 arrays."""
        if self.weights is None:
            assert self.method.initial_arrays is not None
            self.weights = self.method.initial_arrays(self.cfg, self.run_dir)
        return self.weights


def server_side(
    cfg: AppConfig, method: Method, run_dir: Path, num_nodes: int
) -> tuple[Strategy, ServerHooks]:
    """The strategy Flower runs for ``method`` and the hooks the round loop calls."""
    if method.strategy is None:
        lr = method.learning_rate(cfg) if method.learning_rate else 0.0
        return build_strategy(cfg, num_nodes, lr), WeightHooks(cfg, method, run_dir)
    if cfg.strategy != "fedavg" or cfg.strategy_args:
        raise ValueError(
            f"strategy = {cfg.strategy!r} has no use with method = {cfg.method!r}: its server "
            "side is its own (the strategy key picks how weight methods are combined)"
        )
    own = method.strategy(cfg, run_dir)
    if not isinstance(own, RoundStrategy):
        raise ValueError(
            f"method {cfg.method!r}: its strategy {type(own).__name__} must subclass "
            "cmfl_flower.methods.base.RoundStrategy (the round loop calls its hooks)"
        )
    return own, own
