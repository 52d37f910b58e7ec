"""What every config section shares: strict, frozen pydantic models, vocabularies, patterns."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

Scalar = bool | int | float | str

DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
# vocabularies: declared once here; other modules derive their tuples with typing.get_args
DatasetName = Literal["digits", "cifar10", "cifar100", "tiny-imagenet", "folder"]
PartitionerName = Literal["dirichlet", "pathological", "iid"]
SchedulerName = Literal["dpm-solver++", "pndm", "ddim"]

NAME_PATTERN = re.compile(r"^([a-z0-9][a-z0-9-]*|[A-Za-z_][\w.]*:[A-Za-z_]\w*)$")
MODULE_NAME_PATTERN = re.compile(r"^[A-Za-z_][\w.]*$")


class Section(BaseModel):
    """Base of every config section: strict types, no unknown fields, immutable."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def absolute_or_empty(value: str) -> str:
    """A validator: ``value`` is an absolute path (``~`` expanded) or empty."""
    if value and not Path(value).expanduser().is_absolute():
        raise ValueError(f"must be an absolute path or empty, got {value!r}")
    return value
