"""Benchmarks: each prints its figures next to a reference measured in the same run."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def settings_record(args: argparse.Namespace) -> dict[str, Any]:
    """A run's arguments as its results file keeps them: paths inside the repository relative."""

    def portable(value: Any) -> Any:
        if not isinstance(value, Path):
            return value
        return str(value.relative_to(ROOT)) if value.is_relative_to(ROOT) else str(value)

    return {key: portable(value) for key, value in vars(args).items()}
