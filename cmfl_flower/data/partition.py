"""Split a training pool over clients with flwr-datasets partitioners.

- ``dirichlet``: ``DirichletPartitioner`` with ``self_balancing=True`` (the NIID-Bench recipe:
  a client already above the average size gets no more samples of later classes). Draws that
  leave a client below ``min_partition_size`` are rejected and redrawn, up to
  ``DIRICHLET_RESTARTS`` partitioners of 11 draws each, seeded from ``spec.seed``. Every sample
  is assigned exactly once.
- ``pathological``: ``PathologicalPartitioner`` in ``first-deterministic`` mode (the paper's):
  client ``i`` gets class ``i % C`` plus ``k - 1`` other random classes, exactly ``k`` distinct
  classes each, and each class's samples are divided among the clients that have it. Every
  sample is assigned exactly once when ``num_partitions >= C``; with fewer clients some classes
  (and their samples) may be left out.
- ``iid``: ``IidPartitioner``; every sample exactly once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

import numpy as np
import numpy.typing as npt

from cmfl_flower.config import PartitionerName
from cmfl_flower.data.sources import DATASETS, FOLDER_IMAGE_SIZE

if TYPE_CHECKING:  # imported where used: a ClientApp process pays its imports every message
    import datasets

PARTITIONERS: tuple[str, ...] = get_args(PartitionerName)
DIRICHLET_RESTARTS = 20


@dataclass(frozen=True)
class PartitionSpec:
    """Which dataset, and how its training pool is split over clients.

    A non-empty ``path`` is stored absolute, so equal sources give equal specs.
    """

    dataset: str = "digits"
    path: str = ""
    num_partitions: int = 20
    partitioner: str = "dirichlet"
    alpha: float = 0.1
    classes_per_client: int = 2
    min_partition_size: int = 10
    test_fraction: float = 0.25
    seed: int = 0
    image_size: int = FOLDER_IMAGE_SIZE  # side of stored ``folder`` images

    @classmethod
    def from_settings(cls, settings: Any, num_partitions: int) -> PartitionSpec:
        """The spec over ``num_partitions`` clients, its other fields read from ``settings``.

        ``settings`` has them as attributes of the same names: a ``DataConfig``, or the parsed
        options of ``cmfl-data-prep``.
        """
        values = {name: getattr(settings, name) for name in SETTINGS}
        return cls(num_partitions=num_partitions, **values)

    def __post_init__(self) -> None:
        """Refuse any field outside its allowed values, naming it."""
        _check(self.dataset in DATASETS, "dataset", self.dataset, f"one of {DATASETS}")
        _check(
            self.partitioner in PARTITIONERS,
            "partitioner",
            self.partitioner,
            f"one of {PARTITIONERS}",
        )
        _check(self.num_partitions >= 1, "num_partitions", self.num_partitions, ">= 1")
        _check(math.isfinite(self.alpha) and self.alpha > 0, "alpha", self.alpha, "> 0")
        _check(self.classes_per_client >= 1, "classes_per_client", self.classes_per_client, ">= 1")
        _check(self.min_partition_size >= 0, "min_partition_size", self.min_partition_size, ">= 0")
        _check(0 < self.test_fraction < 1, "test_fraction", self.test_fraction, "in (0, 1)")
        _check(self.seed >= 0, "seed", self.seed, ">= 0")
        _check(8 <= self.image_size <= 1024, "image_size", self.image_size, "in [8, 1024]")
        if self.dataset != "folder":
            default = FOLDER_IMAGE_SIZE
            _check(self.image_size == default, "image_size", self.image_size,
                   f"{default} (the default) for dataset {self.dataset!r}, which keeps its own "
                   "image size: only 'folder' images are resized")  # fmt: skip
        if self.dataset == "folder":
            _check(bool(self.path), "path", self.path, "a directory for dataset 'folder'")
        if self.dataset == "digits":
            _check(not self.path, "path", self.path, "empty for dataset 'digits'")
        if self.path:
            object.__setattr__(self, "path", str(Path(self.path).expanduser().resolve()))

    def slug(self) -> str:
        """A directory name unique to these settings."""
        parts = [self.dataset, self.partitioner]
        if self.partitioner == "dirichlet":
            parts.append(f"a{self.alpha:g}")
        elif self.partitioner == "pathological":
            parts.append(f"k{self.classes_per_client}")
        parts += [
            f"n{self.num_partitions}",
            f"m{self.min_partition_size}",
            f"t{self.test_fraction:g}",
            f"s{self.seed}",
        ]
        if self.path:
            parts.append("p" + hashlib.sha256(self.path.encode()).hexdigest()[:8])
        if self.image_size != FOLDER_IMAGE_SIZE:
            parts.append(f"i{self.image_size}")
        return "-".join(parts)


SETTINGS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(PartitionSpec) if f.name != "num_partitions"
)  # the fields that are ``data.*`` run-config keys too


def _check(ok: bool, field: str, value: object, allowed: str) -> None:
    """Raise a ValueError naming ``field`` unless ``ok``."""
    if not ok:
        raise ValueError(f"PartitionSpec.{field} must be {allowed}, got {value!r}")


def partition_indices(
    labels: npt.NDArray[np.int64], spec: PartitionSpec
) -> list[npt.NDArray[np.int64]]:
    """Sorted sample positions of each client, one array per partition."""
    _check_feasible(labels, spec)
    import datasets  # imported here: see the module's imports

    table = datasets.Dataset.from_dict(
        {"label": labels, "idx": np.arange(len(labels), dtype=np.int64)}
    )
    if spec.partitioner == "dirichlet":
        parts = _dirichlet(table, spec)
    else:
        parts = _run_partitioner(table, spec, 0)
    _check_sizes(parts, spec)
    return parts


def _dirichlet(table: datasets.Dataset, spec: PartitionSpec) -> list[npt.NDArray[np.int64]]:
    """Dirichlet partitions, restarting with a new seed when a partitioner gives up."""
    error: ValueError | None = None
    for attempt in range(DIRICHLET_RESTARTS):
        try:
            return _run_partitioner(table, spec, attempt)
        except ValueError as err:  # no draw of this partitioner met min_partition_size
            error = err
    reason = f"{DIRICHLET_RESTARTS} Dirichlet partitioners all failed ({error})"
    raise ValueError(_too_small(spec, reason))


def _run_partitioner(
    table: datasets.Dataset, spec: PartitionSpec, attempt: int
) -> list[npt.NDArray[np.int64]]:
    """The ``idx`` column of each partition of one partitioner run."""
    partitioner = _make_partitioner(spec, attempt)
    partitioner.dataset = table
    with warnings.catch_warnings():  # our checks and meta.json cover these
        warnings.simplefilter("ignore", UserWarning)
        return [
            np.sort(np.asarray(partitioner.load_partition(i)["idx"], dtype=np.int64))
            for i in range(spec.num_partitions)
        ]


def _make_partitioner(spec: PartitionSpec, attempt: int) -> Any:
    from flwr_datasets.partitioner import (  # imported here: see the module's imports
        DirichletPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
    )

    """The flwr-datasets partitioner for ``spec``; ``attempt`` varies the Dirichlet seed."""
    if spec.partitioner == "dirichlet":
        seed = int(np.random.SeedSequence([spec.seed, attempt]).generate_state(1)[0])
        return DirichletPartitioner(
            spec.num_partitions,
            "label",
            spec.alpha,
            spec.min_partition_size,
            self_balancing=True,
            seed=seed,
        )
    if spec.partitioner == "pathological":
        return PathologicalPartitioner(
            spec.num_partitions,
            "label",
            spec.classes_per_client,
            class_assignment_mode="first-deterministic",
            seed=spec.seed,
        )
    return IidPartitioner(spec.num_partitions)


def _check_feasible(labels: npt.NDArray[np.int64], spec: PartitionSpec) -> None:
    """Refuse settings that cannot work before running a partitioner."""
    if spec.num_partitions * max(spec.min_partition_size, 1) > len(labels):
        raise ValueError(_too_small(spec, f"the pool has only {len(labels)} samples"))
    num_classes = len(np.unique(labels))
    if spec.partitioner == "pathological" and spec.classes_per_client > num_classes:
        raise ValueError(
            f"PartitionSpec.classes_per_client must be <= {num_classes} (the classes in the "
            f"pool), got {spec.classes_per_client}"
        )


def _check_sizes(parts: list[npt.NDArray[np.int64]], spec: PartitionSpec) -> None:
    """Refuse partitions below ``min_partition_size``."""
    smallest = min(len(p) for p in parts)
    if smallest < spec.min_partition_size:
        raise ValueError(_too_small(spec, f"the smallest partition has {smallest} samples"))


def _too_small(spec: PartitionSpec, reason: str) -> str:
    """Why min_partition_size cannot be met, and what to change."""
    return (
        f"cannot give each of {spec.num_partitions} partitions at least min_partition_size="
        f"{spec.min_partition_size} samples: {reason}. Use fewer partitions, a larger alpha "
        f"(dirichlet), more classes_per_client (pathological) or a smaller min_partition_size."
    )
