"""Datasets, client partitions and their on-disk store (free of Flower imports)."""

from cmfl_flower.data.partition import PARTITIONERS, PartitionSpec, partition_indices
from cmfl_flower.data.sources import DATASETS, LabeledImages, holdout, load_source, opaque_names
from cmfl_flower.data.store import (
    FORMAT_VERSION,
    ClientData,
    default_data_root,
    ensure_partitions,
    load_global_test,
    load_partition,
    prep_command,
    prepare_partitions,
    read_meta,
)

__all__ = [
    "DATASETS",
    "FORMAT_VERSION",
    "PARTITIONERS",
    "ClientData",
    "LabeledImages",
    "PartitionSpec",
    "default_data_root",
    "ensure_partitions",
    "holdout",
    "load_global_test",
    "load_partition",
    "load_source",
    "opaque_names",
    "partition_indices",
    "prep_command",
    "prepare_partitions",
    "read_meta",
]
