"""Flower's own strategies for the weight methods: short names, arguments, the DP wrapper.

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
from typing import Any

from flwr.serverapp import strategy as flower
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, Strategy

from cmfl_flower.config import AppConfig

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
