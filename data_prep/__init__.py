"""``cmfl-data-prep``: partition a dataset over clients and write it to disk.

Usage: ``cmfl-data-prep --dataset digits --num-partitions 20 --partitioner dirichlet
--alpha 0.1`` (also ``python -m data_prep``). The output directory defaults to
``$CMFL_FLOWER_DATA/<slug>`` (else ``~/.cache/cmfl-flower/data/<slug>``, honouring
``XDG_CACHE_HOME``), where ``<slug>`` names the settings, e.g.
``digits-dirichlet-a0.1-n20-m10-t0.25-s0``. The run reads partitions from the same place, so
preparing once serves every method. ``digits`` is prepared on first use; hub datasets and
folders must be prepared with this command first.

On-disk format (``FORMAT_VERSION = 1``), written to a temporary sibling directory and renamed
into place, so a directory is either complete or absent:

- ``meta.json``: ``format_version``, ``spec`` (every partitioning setting), ``class_names``
  (index = label id), ``image_shape`` ``[H, W, 3]``, ``num_pool`` (training-pool size),
  ``num_assigned`` (samples given to clients), ``num_global_test``.
- ``summary.json``: ``clients``: per client ``partition_id``, ``num_train``, ``num_test``,
  ``train`` and ``test`` as ``{class_name: count}`` (classes present only); ``totals``.
- ``partition_NNNN/train.npz`` and ``partition_NNNN/test.npz`` (``NNNN`` = zero-padded client
  id): ``images`` (N, H, W, 3) uint8 RGB and ``labels`` (N,) int64. Each client's samples are
  split ``test_fraction`` (default 25 %) into its test set, stratified where possible.
- ``global_test.npz``: the dataset's official test split, same arrays.
- ``label_distribution.png``: stacked bars of train samples per client, coloured by class.

``cmfl-data-prep --site /srv/images --classes "cat,dog,bird"`` instead checks one site's own
image folder (a SuperNode's ``data-path``, :mod:`cmfl_flower.data.sites`): its class
sub-folders must be named from the list, which fixes the class ids for the whole federation. It
prints the classes the site holds and reads the images into the cache under the data root
(``--output``, else the default root: the SuperNode's ``data.dir``), so the first round does
not decode them.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import get_args

from cmfl_flower.config import DataConfig, class_list
from cmfl_flower.data import PartitionSpec, default_data_root, prepare_partitions
from cmfl_flower.data.partition import SETTINGS
from cmfl_flower.data.sites import SITES_DIR, describe, load_site
from cmfl_flower.data.store import PLOT, SUMMARY


def build_parser() -> argparse.ArgumentParser:
    """The command-line options (the run-config ones as :class:`DataConfig` declares them)."""
    parser = argparse.ArgumentParser(
        prog="cmfl-data-prep", description="Partition a dataset over federated clients."
    )
    # the partitioning settings are run-config keys (`data.<key>`): type, choices, default and
    # help come from the config model, so the command and the run read a setting the same way
    for name in SETTINGS:
        info = DataConfig.model_fields[name]
        choices = get_args(info.annotation) or None  # a Literal's values
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=str if choices else type(info.default),
            choices=choices,
            default=info.default,
            help=f"{info.description} (run config: data.{name.replace('_', '-')})",
        )
    parser.add_argument("--num-partitions", type=int, default=20, help="clients (default 20)")
    parser.add_argument(
        "--site",
        type=Path,
        default=None,
        help="check one site's own image folder (node config data-path) against --classes, "
        "print the classes it holds and read it into the cache its SuperNode will use, instead "
        "of partitioning a dataset",
    )
    parser.add_argument(
        "--classes",
        default="",
        help="with --site: the federation's class list, names separated by commas "
        "(run config: data.classes)",
    )
    parser.add_argument("--output", type=Path, default=None, help="default: data root / slug")
    parser.add_argument("--force", action="store_true", help="replace an existing output")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Prepare the partitions and print where they are; exit code 2 on bad arguments."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.site is not None:
        return _site(parser, args)
    try:
        spec = PartitionSpec.from_settings(args, args.num_partitions)
        output = (args.output or default_data_root() / spec.slug()).expanduser().resolve()
        prepare_partitions(spec, output, show_progress=True, replace=args.force)
    except ValueError as err:
        parser.error(_as_option(str(err)))
    print(f"output: {output}")
    print(_table(output))
    print(f"label distribution: {output / PLOT}")
    return 0


def _site(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Check a site's folder, fill its cache, print its classes; exit code 2 on a bad folder."""
    root = (args.output or default_data_root()).expanduser().resolve()
    try:
        classes = class_list(args.classes) if args.classes else ()
        if not classes:
            raise ValueError("--site needs --classes: the federation's class names, in order")
        data = load_site(args.site, classes, args.image_size, root)
    except ValueError as err:
        parser.error(str(err))
    print(f"site: {args.site} ({len(data.train)} training, {len(data.test)} test images)")
    print(describe(data))
    print(f"cached under: {root / SITES_DIR}")
    return 0


def _as_option(message: str) -> str:
    """Name command-line options rather than PartitionSpec fields in ``message``."""
    return re.sub(r"^PartitionSpec\.(\w+)", lambda m: "--" + m[1].replace("_", "-"), message)


def _table(output: Path) -> str:
    """Per-client train/test counts and number of classes, from ``summary.json``."""
    summary = json.loads((output / SUMMARY).read_text(encoding="utf-8"))
    lines = [f"{'client':>6} {'train':>7} {'test':>6} {'classes':>7}"]
    for row in summary["clients"]:
        classes = len(set(row["train"]) | set(row["test"]))
        lines.append(
            f"{row['partition_id']:>6} {row['num_train']:>7} {row['num_test']:>6} {classes:>7}"
        )
    return "\n".join(lines)
