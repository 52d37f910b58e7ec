"""Prepared partitions on disk: write them once (atomically), load one client's data.

Layout of a prepared directory (see :mod:`data_prep` for the full description)::

    meta.json  summary.json  global_test.npz  label_distribution.png
    partition_0000/train.npz  partition_0000/test.npz  ...
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from cmfl_flower.data.partition import PartitionSpec, partition_indices
from cmfl_flower.data.sources import LabeledImages, load_source, split_indices
from cmfl_flower.paths import cache_root

FORMAT_VERSION = 1
META = "meta.json"
SUMMARY = "summary.json"
GLOBAL_TEST = "global_test.npz"
PLOT = "label_distribution.png"
MAX_LEGEND_CLASSES = 20
T = TypeVar("T")


@dataclass(frozen=True)
class ClientData:
    """One client's local train and test splits."""

    train: LabeledImages
    test: LabeledImages


def partition_dir_name(partition_id: int) -> str:
    """``partition_0007`` for partition 7."""
    return f"partition_{partition_id:04d}"


def default_data_root() -> Path:
    """``$CMFL_FLOWER_DATA``, else ``$XDG_CACHE_HOME/cmfl-flower/data`` (``~/.cache``)."""
    if os.environ.get("CMFL_FLOWER_DATA"):
        return Path(os.environ["CMFL_FLOWER_DATA"]).expanduser()
    return cache_root() / "data"


def prep_command(spec: PartitionSpec, out_dir: Path) -> str:
    """The ``cmfl-data-prep`` command line that prepares ``spec`` into ``out_dir``."""
    args = [
        "cmfl-data-prep",
        f"--dataset={spec.dataset}",
        *([f"--path={spec.path}"] if spec.path else []),
        f"--num-partitions={spec.num_partitions}",
        f"--partitioner={spec.partitioner}",
        f"--alpha={spec.alpha:g}",
        f"--classes-per-client={spec.classes_per_client}",
        f"--min-partition-size={spec.min_partition_size}",
        f"--test-fraction={spec.test_fraction:g}",
        f"--seed={spec.seed}",
        *([f"--image-size={spec.image_size}"] if spec.dataset == "folder" else []),
        f"--output={out_dir}",
    ]
    return shlex.join(args)


def prepare_partitions(
    spec: PartitionSpec, out_dir: Path, *, show_progress: bool = False, replace: bool = False
) -> Path:
    """Partition ``spec``'s dataset and write it to ``out_dir``; returns ``out_dir``.

    Everything is written to a temporary sibling directory that is renamed into place, so
    ``out_dir`` is either absent or complete. An existing prepared ``out_dir`` is refused
    unless ``replace`` (then it is swapped out and deleted after the new one is in place).
    """
    out_dir = Path(out_dir)
    if (out_dir / META).exists() and not replace:
        raise ValueError(
            f"out_dir {str(out_dir)!r} already holds prepared partitions; reuse it with "
            "ensure_partitions, or replace it (cmfl-data-prep --force)"
        )
    if out_dir.exists() and not (out_dir / META).exists() and any(out_dir.iterdir()):
        raise ValueError(f"out_dir {str(out_dir)!r} exists, is not empty and holds no {META}")
    return _build(spec, out_dir, show_progress=show_progress, replace=replace)


def ensure_partitions(spec: PartitionSpec, root: Path) -> Path:
    """``root / spec.slug()``, checked against ``spec``; prepared here only for ``digits``."""
    out_dir = Path(root) / spec.slug()
    if not (out_dir / META).exists():
        if spec.dataset != "digits":
            raise ValueError(
                f"no prepared partitions at {str(out_dir)!r}; prepare them with:\n  "
                + prep_command(spec, out_dir)
            )
        _build(spec, out_dir, show_progress=False, replace=False)
    _check_matches(read_meta(out_dir), spec, out_dir)
    return out_dir


def read_meta(data_dir: Path) -> dict[str, object]:
    """The ``meta.json`` of a prepared directory, after checking it exists and its version."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ValueError(
            f"no prepared partitions at {str(data_dir)!r}; make them with "
            f"`cmfl-data-prep --output {shlex.quote(str(data_dir))}` plus your run's data options"
        )
    meta_file = data_dir / META
    if not meta_file.is_file():
        raise ValueError(f"{str(meta_file)!r} is missing; {str(data_dir)!r} is not prepared")
    meta: dict[str, object] = json.loads(meta_file.read_text(encoding="utf-8"))
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{str(meta_file)!r} has format_version {meta.get('format_version')!r}, "
            f"expected {FORMAT_VERSION}; prepare the data again with cmfl-data-prep --force"
        )
    return meta


def load_partition(data_dir: Path, partition_id: int) -> ClientData:
    """Client ``partition_id``'s train and test splits."""
    meta = read_meta(data_dir)
    spec = _meta_field(meta, "spec", dict)
    if not 0 <= partition_id < spec["num_partitions"]:
        raise ValueError(
            f"partition_id must be in [0, {spec['num_partitions']}) for {str(data_dir)!r}, "
            f"got {partition_id}"
        )
    names = _class_names(meta)
    client_dir = Path(data_dir) / partition_dir_name(partition_id)
    return ClientData(
        _read_npz(client_dir / "train.npz", names), _read_npz(client_dir / "test.npz", names)
    )


def load_global_test(data_dir: Path) -> LabeledImages:
    """The global test set (the source's official test split)."""
    meta = read_meta(data_dir)
    return _read_npz(Path(data_dir) / GLOBAL_TEST, _class_names(meta))


def _class_names(meta: dict[str, object]) -> tuple[str, ...]:
    """The class names stored in ``meta``."""
    names = _meta_field(meta, "class_names", list)
    return tuple(str(n) for n in names)


def _meta_field(meta: dict[str, object], key: str, kind: type[T]) -> T:
    """``meta[key]``, refused unless it is a ``kind``."""
    value = meta.get(key)
    if not isinstance(value, kind):
        raise ValueError(f"{META} field {key!r} must be a {kind.__name__}, got {value!r}")
    return value


def _read_npz(file: Path, class_names: tuple[str, ...]) -> LabeledImages:
    """One ``images``/``labels`` archive."""
    if not file.is_file():
        raise ValueError(f"{str(file)!r} is missing; prepare the data again")
    with np.load(file) as archive:
        return LabeledImages(archive["images"], archive["labels"], class_names)


def _check_matches(meta: dict[str, object], spec: PartitionSpec, out_dir: Path) -> None:
    """Refuse a prepared directory whose settings differ from ``spec``."""
    stored = _meta_field(meta, "spec", dict)
    wanted = asdict(spec)
    defaults = asdict(PartitionSpec())  # a field added later: its default, as it was
    differing = [
        f"{k}: {stored.get(k, defaults[k])!r} != {v!r}"
        for k, v in wanted.items()
        if stored.get(k, defaults[k]) != v
    ]
    if differing:
        raise ValueError(
            f"{str(out_dir / META)!r} was prepared with other settings (stored != wanted): "
            + "; ".join(differing)
        )


@dataclass(frozen=True)
class _Prepared:
    """Everything that gets written, computed before anything touches the disk."""

    spec: PartitionSpec
    pool: LabeledImages
    global_test: LabeledImages
    clients: list[ClientData]


def _build(spec: PartitionSpec, out_dir: Path, *, show_progress: bool, replace: bool) -> Path:
    """Compute, write into a temporary sibling of ``out_dir`` and rename it into place."""
    prepared = _compute(spec, show_progress)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the published directory should not be
    try:
        _write_all(prepared, tmp, show_progress)
        _publish(tmp, out_dir, replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after a rename, else discarded
    return out_dir


def _publish(tmp: Path, out_dir: Path, replace: bool) -> None:
    """Rename ``tmp`` to ``out_dir``; if another process won the race, keep its result."""
    if replace and out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        out_dir.replace(old / "data")
        try:
            tmp.replace(out_dir)
        except OSError:
            (old / "data").replace(out_dir)  # put the previous data back
            raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
        return
    try:
        tmp.replace(out_dir)  # replaces an empty directory, fails on a non-empty one
    except OSError:
        if not (out_dir / META).exists():
            raise


def _compute(spec: PartitionSpec, show_progress: bool) -> _Prepared:
    """Load the source, partition its train split and split each client into train/test."""
    _progress(show_progress, f"loading {spec.dataset} ...")
    pool = load_source(spec.dataset, "train", spec.path, spec.image_size)
    global_test = load_source(spec.dataset, "test", spec.path, spec.image_size)
    if global_test.images.shape[1:] != pool.images.shape[1:]:
        raise ValueError(
            f"test images are {global_test.images.shape[1:]}, train images "
            f"{pool.images.shape[1:]}; one dataset needs one image size"
        )
    _progress(show_progress, f"partitioning {len(pool)} samples ({spec.slug()}) ...")
    clients = [
        _client_split(pool.subset(idx), spec, i)
        for i, idx in enumerate(partition_indices(pool.labels, spec))
    ]
    return _Prepared(spec, pool, global_test, clients)


def _write_all(prepared: _Prepared, dst: Path, show_progress: bool) -> None:
    """Write every file of the layout into ``dst`` (``meta.json`` last)."""
    clients = prepared.clients
    for i, client in enumerate(clients):
        _progress(show_progress, f"writing {partition_dir_name(i)} ({i + 1}/{len(clients)})")
        (dst / partition_dir_name(i)).mkdir()
        _write_npz(dst / partition_dir_name(i) / "train.npz", client.train)
        _write_npz(dst / partition_dir_name(i) / "test.npz", client.test)
    _write_npz(dst / GLOBAL_TEST, prepared.global_test)
    _write_json(dst / SUMMARY, _summary(clients, prepared.global_test))
    _plot(clients, prepared.spec, dst / PLOT)
    _write_json(dst / META, _meta(prepared))


def _client_split(data: LabeledImages, spec: PartitionSpec, partition_id: int) -> ClientData:
    """Seeded per-client train/test split (stratified where possible)."""
    seed = int(np.random.SeedSequence([spec.seed, partition_id]).generate_state(1)[0])
    train, test = split_indices(data.labels, spec.test_fraction, seed)
    return ClientData(data.subset(train), data.subset(test))


def _write_npz(file: Path, data: LabeledImages) -> None:
    """``images`` (N, H, W, 3) uint8 and ``labels`` (N,) int64."""
    np.savez(file, images=data.images, labels=data.labels)


def _write_json(file: Path, payload: dict[str, object]) -> None:
    """Pretty JSON with a trailing newline."""
    file.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def _counts(data: LabeledImages) -> dict[str, int]:
    """``{class_name: count}`` of the classes present, in label order."""
    labels, counts = np.unique(data.labels, return_counts=True)
    return {data.class_names[int(k)]: int(c) for k, c in zip(labels, counts, strict=True)}


def _summary(clients: list[ClientData], global_test: LabeledImages) -> dict[str, object]:
    """Per-client class counts and totals."""
    rows = [
        {
            "partition_id": i,
            "num_train": len(c.train),
            "num_test": len(c.test),
            "train": _counts(c.train),
            "test": _counts(c.test),
        }
        for i, c in enumerate(clients)
    ]
    totals = {
        "train": sum(len(c.train) for c in clients),
        "test": sum(len(c.test) for c in clients),
        "global_test": len(global_test),
    }
    return {"clients": rows, "totals": totals}


def _meta(prepared: _Prepared) -> dict[str, object]:
    """What was prepared, from what, and how big it is."""
    return {
        "format_version": FORMAT_VERSION,
        "spec": asdict(prepared.spec),
        "class_names": list(prepared.pool.class_names),
        "image_shape": list(prepared.pool.images.shape[1:]),
        "num_pool": len(prepared.pool),
        "num_assigned": sum(len(c.train) + len(c.test) for c in prepared.clients),
        "num_global_test": len(prepared.global_test),
    }


def _train_counts(clients: list[ClientData], num_classes: int) -> npt.NDArray[np.int64]:
    """(clients, classes) train sample counts."""
    return np.stack([np.bincount(c.train.labels, minlength=num_classes) for c in clients])


def _plot(clients: list[ClientData], spec: PartitionSpec, file: Path) -> None:
    """Stacked bars: x = client, y = train samples, colour = class."""
    from matplotlib.figure import Figure  # only where partitions are prepared, not per message

    names = clients[0].train.class_names
    counts = _train_counts(clients, len(names))  # (P, C)
    colours = _colours(len(names))  # (C, 4)
    fig = Figure(figsize=(max(6.0, 0.35 * len(clients) + 3), 4.5), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(clients))
    bottom = np.zeros(len(clients), dtype=np.int64)  # (P,)
    for k, name in enumerate(names):
        ax.bar(x, counts[:, k], bottom=bottom, color=colours[k], label=name, width=0.8)
        bottom += counts[:, k]
    ax.set(xlabel="client", ylabel="train samples", xticks=x, title=_plot_title(spec))
    ax.tick_params(axis="x", labelsize=7)
    if len(names) <= MAX_LEGEND_CLASSES:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), title="class")
    else:
        ax.set_title(f"{_plot_title(spec)}\n({len(names)} classes, legend omitted)")
    fig.savefig(file, dpi=120)


def _colours(num_classes: int) -> npt.NDArray[np.float64]:
    """One RGBA colour per class: tab10 / tab20, else evenly spaced on turbo."""
    from matplotlib import colormaps

    if num_classes <= 20:
        palette = colormaps["tab10" if num_classes <= 10 else "tab20"]
        return np.asarray(palette(np.arange(num_classes)))  # integer inputs pick entries
    return np.asarray(colormaps["turbo"](np.linspace(0.0, 1.0, num_classes)))


def _plot_title(spec: PartitionSpec) -> str:
    """The partitioner settings in a line."""
    setting = {
        "dirichlet": f" (α={spec.alpha:g})",
        "pathological": f" (k={spec.classes_per_client})",
        "iid": "",
    }[spec.partitioner]
    return f"{spec.dataset}: {spec.partitioner}{setting}, {spec.num_partitions} clients"


def _progress(show: bool, message: str) -> None:
    """Print ``message`` to stderr when ``show``."""
    if show:
        print(message, file=sys.stderr, flush=True)
