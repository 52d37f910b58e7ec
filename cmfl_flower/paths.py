"""Where cmfl-flower keeps things: the cache root and the layout of a run directory, in one place.

A run directory, ``<output root>/<run name>/``::

    config.json        CONFIG_JSON: resolved AppConfig (nested) and the flat run config
    rounds.json/csv    ROUNDS: one row per round: aggregated metrics
    clients.json/csv   CLIENT_ROWS: one row per (round, client): that client's metrics
    status.json        STATUS_JSON: running | completed | failed, with the error
    accuracy.png       ACCURACY_PNG; report.html: REPORT_HTML
    labels.json/png    LABELS_FILE / LABELS_PNG: label counts per client and class
    clients/partition-<i>/    client_dir(): what client i wrote (labels.json, sample grids)
        state/node-<id>/      STATE_DIR: its vision LoRA and class tokens, per SuperNode
        cache/                CACHE_DIR: what it computes once per run (its images' latents)
    checkpoint/        CHECKPOINT_DIR: the server's state after the latest round
    model/, adapter/, samples/   MODEL_DIR, ADAPTER_DIR, SAMPLES_DIR: the diffusion methods'
    tensorboard/       TENSORBOARD_DIR (``output.tensorboard = true``)
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cmfl_flower.config import OutputConfig

CONFIG_JSON = "config.json"
ROUNDS = "rounds"  # rounds.json and rounds.csv
CLIENT_ROWS = "clients"  # clients.json and clients.csv
STATUS_JSON = "status.json"
ACCURACY_PNG = "accuracy.png"
REPORT_HTML = "report.html"
LABELS_FILE = "labels.json"
LABELS_PNG = "labels.png"
CLIENTS_DIR = "clients"
STATE_DIR = "state"
CACHE_DIR = "cache"
CHECKPOINT_DIR = "checkpoint"
MODEL_DIR = "model"
ADAPTER_DIR = "adapter"
SAMPLES_DIR = "samples"
TENSORBOARD_DIR = "tensorboard"
GRID_NAME = re.compile(r"^samples-round-(\d+)\.png$")


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/cmfl-flower`` (default ``~/.cache/cmfl-flower``), absolute."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser().resolve() / "cmfl-flower"


def output_root(cfg: OutputConfig) -> Path:
    """The absolute root of run directories (``output.dir``, default in the cache)."""
    return (Path(cfg.dir).expanduser() if cfg.dir else cache_root() / "runs").resolve()


def client_dir(run_dir: Path, partition_id: int) -> Path:
    """Where partition ``partition_id`` keeps its artifacts of the run."""
    return run_dir / CLIENTS_DIR / f"partition-{partition_id}"


def grid_name(server_round: int) -> str:
    """File name of a client's sample grid of ``server_round`` (matches :data:`GRID_NAME`)."""
    return f"samples-round-{server_round:03d}.png"
