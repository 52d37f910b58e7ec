"""Server strategies: a registry of built-ins, plug-ins by import path, and the run driver.

``strategy = "local-only"`` picks a built-in by name; ``strategy = "pkg.module:MyStrategy"``
imports a plug-in, which must subclass :class:`CmflStrategy` (see ``base.py``).
"""

from __future__ import annotations

import importlib
from logging import INFO
from pathlib import Path

from flwr.common.logger import log
from flwr.serverapp import Grid

from cmfl_flower.config import AppConfig
from cmfl_flower.results import RunRecorder
from cmfl_flower.strategies.averaging import FedAvgEncoder, FedProxEncoder
from cmfl_flower.strategies.base import CmflStrategy
from cmfl_flower.strategies.diffusion import FedAvgDiffusion, FedLoraDiffusion
from cmfl_flower.strategies.local_only import LocalOnly, LocalOnlyTokens, NamesGeneration
from cmfl_flower.strategies.relay import CmflRelay

STRATEGIES: dict[str, type[CmflStrategy]] = {
    "cmfl-relay": CmflRelay,
    "local-only": LocalOnly,
    "local-only-tokens": LocalOnlyTokens,
    "names-generation": NamesGeneration,
    "fedavg-encoder": FedAvgEncoder,
    "fedprox-encoder": FedProxEncoder,
    "fedavg-diffusion": FedAvgDiffusion,
    "fedlora-diffusion": FedLoraDiffusion,
}

__all__ = ["STRATEGIES", "CmflStrategy", "build_strategy", "run_federation"]


def _import_strategy(path: str) -> type[CmflStrategy]:
    module_name, _, class_name = path.partition(":")
    try:
        found = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"strategy = {path!r} cannot be imported: {err}") from None
    if not (isinstance(found, type) and issubclass(found, CmflStrategy)):
        raise ValueError(f"strategy = {path!r} is not a subclass of CmflStrategy")
    return found


def build_strategy(cfg: AppConfig, recorder: RunRecorder) -> CmflStrategy:
    """The strategy the config names: a registry name or ``package.module:Class``."""
    if ":" in cfg.strategy:
        return _import_strategy(cfg.strategy)(cfg, recorder)
    if cfg.strategy not in STRATEGIES:
        raise ValueError(
            f"strategy = {cfg.strategy!r} is unknown; built in: {', '.join(sorted(STRATEGIES))}"
            " (or give 'package.module:Class')"
        )
    return STRATEGIES[cfg.strategy](cfg, recorder)


def run_federation(grid: Grid, cfg: AppConfig) -> Path:
    """Run the configured strategy to the end, recording into its run directory.

    The directory is fresh, or with ``output.resume`` the named run's, continued after its
    last checkpoint.
    """
    recorder = RunRecorder.open(cfg)
    cfg = recorder.cfg  # with the resolved output.run-name, which the clients need
    log(INFO, "==> cmfl-flower run directory: %s", recorder.run_dir)
    try:
        strategy = build_strategy(cfg, recorder)
        strategy.run(grid, strategy.restore() if cfg.output.resume else 1)
    except BaseException as err:
        recorder.finish(err)
        log(INFO, "==> cmfl-flower run failed; what it had is in: %s", recorder.run_dir)
        raise
    recorder.finish()
    log(INFO, "==> cmfl-flower results written to: %s", recorder.run_dir)
    log(INFO, "==> open %s", recorder.run_dir / "report.html")
    return recorder.run_dir
