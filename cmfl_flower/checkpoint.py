"""Server checkpoints: the strategy's state after every round, written atomically.

Layout inside a run directory::

    checkpoint/
        round-<k>.safetensors   the strategy's arrays after round k (only the latest is kept)
        latest.json             {"round": k, "file": "round-<k>.safetensors", "meta": {...}}

``latest.json`` is replaced only after its safetensors file is complete, so a run killed at
any moment leaves either the previous checkpoint or the new one, never a torn one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from cmfl_flower.paths import CHECKPOINT_DIR

LATEST = "latest.json"


@dataclass(frozen=True)
class Checkpoint:
    """A strategy's state after ``round``: named arrays plus JSON-able metadata."""

    round: int
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(run_dir: Path, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` under ``run_dir/checkpoint``; return the safetensors path."""
    directory = run_dir / CHECKPOINT_DIR
    directory.mkdir(exist_ok=True)
    name = f"round-{checkpoint.round}.safetensors"
    tmp = directory / f".{name}.tmp"
    arrays = {key: np.ascontiguousarray(value) for key, value in checkpoint.arrays.items()}
    save_file(arrays, str(tmp))
    tmp.replace(directory / name)
    latest = {"round": checkpoint.round, "file": name, "meta": checkpoint.meta}
    tmp_json = directory / f".{LATEST}.tmp"
    tmp_json.write_text(json.dumps(latest, indent=2))
    tmp_json.replace(directory / LATEST)
    for old in directory.glob("round-*.safetensors"):
        if old.name != name:
            old.unlink()
    return directory / name


def load_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The latest checkpoint of ``run_dir`` (None when it has none)."""
    latest = run_dir / CHECKPOINT_DIR / LATEST
    if not latest.is_file():
        return None
    info = json.loads(latest.read_text())
    arrays = load_file(str(run_dir / CHECKPOINT_DIR / info["file"]))
    return Checkpoint(int(info["round"]), arrays, dict(info.get("meta", {})))
