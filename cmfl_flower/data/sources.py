"""Image sources: each dataset as RGB ``uint8`` arrays with integer labels and class names.

``digits`` (scikit-learn's bundled handwritten digits) works offline and has three fixed,
stratified, disjoint splits: ``public`` (40 %, reserved for pre-training the project's own tiny
backbone, never given to clients), ``train`` (40 %, the pool partitioned over clients) and
``test`` (20 %, the global test set). The hub datasets and ``folder`` have ``train`` and ``test``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, get_args

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps

from cmfl_flower.config import DatasetName

# `datasets` and scikit-learn are imported in the functions that use them: a ClientApp process
# starts for every message, and most messages only read prepared partitions.

DATASETS: tuple[str, ...] = get_args(DatasetName)
# Number of classes of each fixed dataset (a local folder has as many as it has sub-folders).
CLASS_COUNTS: dict[str, int] = {"digits": 10, "cifar10": 10, "cifar100": 100, "tiny-imagenet": 200}
DIGITS_SPLITS: tuple[str, ...] = ("public", "train", "test")
SPLITS: tuple[str, ...] = ("train", "test")
DIGIT_NAMES: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
)  # fmt: skip
FOLDER_IMAGE_SIZE = 64  # `folder` images: centre-cropped and resized to 64x64 by default
FOLDER_TEST_FRACTION = 0.2  # `folder` without train/test sub-folders: stratified 80/20
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
TINY_IMAGENET_CLASSES = Path(__file__).with_name("tiny_imagenet_classes.tsv")
SPLIT_SEED = 0


@dataclass(frozen=True)
class LabeledImages:
    """Images with labels; ``labels`` index into ``class_names``."""

    images: npt.NDArray[np.uint8]  # (N, H, W, 3) uint8
    labels: npt.NDArray[np.int64]  # (N,) int64
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        """Refuse arrays of the wrong shape, dtype or label range."""
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[3] != 3:
            raise ValueError(
                f"images must be (N, H, W, 3) uint8, got {self.images.shape} {self.images.dtype}"
            )
        if self.labels.dtype != np.int64 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(
                f"labels must be ({len(self.images)},) int64, "
                f"got {self.labels.shape} {self.labels.dtype}"
            )
        if len(self.labels) and not 0 <= self.labels.min() <= self.labels.max() < len(
            self.class_names
        ):
            raise ValueError(
                f"labels must lie in [0, {len(self.class_names)}), "
                f"got [{self.labels.min()}, {self.labels.max()}]"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: npt.NDArray[np.int64]) -> LabeledImages:
        """The samples at positions ``idx`` (same class names)."""
        return LabeledImages(self.images[idx], self.labels[idx], self.class_names)


def opaque_names(count: int) -> tuple[str, ...]:
    """``count`` class ids no backbone was trained on: ``zqaa``, ``zqab``, ...

    Such names carry no meaning, so only learned tokens can say what a class looks like.
    """
    letters = "abcdefghijklmnopqrstuvwxyz"
    if count > len(letters) ** 2:
        raise ValueError(f"at most {len(letters) ** 2} opaque class names, asked for {count}")
    return tuple(f"zq{letters[i // len(letters)]}{letters[i % len(letters)]}" for i in range(count))


def holdout(data: LabeledImages, fraction: float, seed: int) -> tuple[LabeledImages, LabeledImages]:
    """Split off a seeded ``fraction`` of ``data`` (at least one image when > 0): (rest, held)."""
    held = round(fraction * len(data))
    held = min(len(data) - 1, max(1, held)) if fraction > 0 and len(data) > 1 else 0
    order = np.random.default_rng(seed).permutation(len(data))
    return data.subset(np.sort(order[held:])), data.subset(np.sort(order[:held]))


def load_source(
    dataset: str, split: str, path: str = "", image_size: int = FOLDER_IMAGE_SIZE
) -> LabeledImages:
    """One split of a dataset; ``path`` is a local source (folder or ``save_to_disk`` dir).

    ``image_size``: the side ``folder`` images are resized to (other datasets keep theirs).
    """
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    allowed = DIGITS_SPLITS if dataset == "digits" else SPLITS
    if split not in allowed:
        raise ValueError(f"split of {dataset!r} must be one of {allowed}, got {split!r}")
    if dataset == "digits":
        if path:
            raise ValueError(f"path must be empty for dataset 'digits', got {path!r}")
        return _load_digits(split)
    if dataset == "folder":
        return _load_folder(path, split, image_size)
    return _load_hub(dataset, split, path)


def split_indices(
    labels: npt.NDArray[np.int64], test_fraction: float, seed: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Seeded (train, test) positions, stratified where every class allows it.

    The test part holds ``ceil(test_fraction * N)`` samples, at least one and at most N - 1
    (none when N < 2).
    """
    idx = np.arange(len(labels), dtype=np.int64)  # (N,)
    if len(idx) < 2:
        return idx, idx[:0]
    n_test = min(max(math.ceil(test_fraction * len(idx)), 1), len(idx) - 1)
    counts = np.unique(labels, return_counts=True)[1]  # (C,)
    can_stratify = counts.min() >= 2 and min(n_test, len(idx) - n_test) >= len(counts)
    from sklearn.model_selection import train_test_split

    train, test = train_test_split(
        idx, test_size=n_test, random_state=seed, stratify=labels if can_stratify else None
    )
    return np.sort(train), np.sort(test)


def _load_digits(split: str) -> LabeledImages:
    """scikit-learn's 8x8 digits as RGB 0..255, one of the fixed 40/40/20 splits."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    gray = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8) uint8
    images = np.repeat(gray[..., None], 3, axis=3)  # (1797, 8, 8, 3) uint8
    labels = bunch.target.astype(np.int64)  # (1797,)
    idx = np.arange(len(labels))
    public, rest = train_test_split(idx, train_size=0.4, stratify=labels, random_state=SPLIT_SEED)
    train, test = train_test_split(
        rest, test_size=1 / 3, stratify=labels[rest], random_state=SPLIT_SEED
    )
    chosen = np.sort({"public": public, "train": train, "test": test}[split])
    return LabeledImages(images[chosen], labels[chosen], DIGIT_NAMES)


@dataclass(frozen=True)
class _HubSource:
    """Where a hub dataset lives and which of its columns and splits to read."""

    hub_id: str
    image_column: str
    label_column: str
    test_split: str
    wordnet_ids: bool


_HUB: dict[str, _HubSource] = {
    "cifar10": _HubSource("uoft-cs/cifar10", "img", "label", "test", False),
    "cifar100": _HubSource("uoft-cs/cifar100", "img", "fine_label", "test", False),
    "tiny-imagenet": _HubSource("zh-plus/tiny-imagenet", "image", "label", "valid", True),
}


def _load_hub(dataset: str, split: str, path: str) -> LabeledImages:
    """A ``datasets`` split, from the hub or from a local ``save_to_disk`` directory."""
    import datasets

    source = _HUB[dataset]
    name = source.test_split if split == "test" else split
    table = (
        _local_split(path, name, split)
        if path
        else datasets.load_dataset(source.hub_id, split=name)
    )
    _check_columns(table, source, path or source.hub_id)
    names = tuple(table.features[source.label_column].names)
    if source.wordnet_ids:
        names = _wordnet_to_names(names)
    labels = np.asarray(table[source.label_column], dtype=np.int64)  # (N,)
    images = _decode_images(table[source.image_column], len(labels))  # (N, H, W, 3)
    return LabeledImages(images, labels, tuple(n.replace("_", " ") for n in names))


def _local_split(path: str, name: str, split: str) -> Any:
    """Split ``name`` (else ``split``) of the ``DatasetDict`` saved at ``path``."""
    import datasets

    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise ValueError(f"path {str(directory)!r} is not a directory (save_to_disk output)")
    loaded = datasets.load_from_disk(str(directory))
    if not isinstance(loaded, datasets.DatasetDict):
        raise ValueError(f"path {str(directory)!r} holds a Dataset, expected a DatasetDict")
    for candidate in (name, split):
        if candidate in loaded:
            return loaded[candidate]
    raise ValueError(
        f"split {name!r} not found in {str(directory)!r}; it has {sorted(loaded.keys())}"
    )


def _check_columns(table: Any, source: _HubSource, where: str) -> None:
    """Refuse a table that lacks the expected image column or ClassLabel label column."""
    import datasets

    for column in (source.image_column, source.label_column):
        if column not in table.column_names:
            raise ValueError(
                f"column {column!r} missing in {where!r}; columns are {table.column_names}: "
                f"save the dataset with an Image column {source.image_column!r} and a "
                f"ClassLabel column {source.label_column!r}"
            )
    if not isinstance(table.features[source.label_column], datasets.ClassLabel):
        raise ValueError(
            f"column {source.label_column!r} in {where!r} must be a ClassLabel, "
            f"got {table.features[source.label_column]}"
        )
    if not isinstance(table.features[source.image_column], datasets.Image):
        raise ValueError(
            f"column {source.image_column!r} in {where!r} must be an Image, "
            f"got {table.features[source.image_column]}"
        )


def _decode_images(column: Any, count: int) -> npt.NDArray[np.uint8]:
    """Decode PIL images into one RGB array; all images must share one size."""
    images: npt.NDArray[np.uint8] | None = None
    for i, image in enumerate(column):
        rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
        if images is None:
            images = np.empty((count, *rgb.shape), dtype=np.uint8)  # (N, H, W, 3)
        if rgb.shape != images.shape[1:]:
            raise ValueError(
                f"image {i} has shape {rgb.shape}, expected {images.shape[1:]} like image 0"
            )
        images[i] = rgb
    if images is None:
        raise ValueError("the dataset split has no images")
    return images


@cache
def read_wordnet_names(tsv: Path) -> dict[str, str]:
    """``wnid -> human-readable name`` from a ``wnid<TAB>name`` file."""
    names: dict[str, str] = {}
    for number, line in enumerate(tsv.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split("\t")
        if len(fields) != 2:
            raise ValueError(f"{tsv}:{number}: expected 'wnid<TAB>name', got {line!r}")
        names[fields[0]] = fields[1]
    return names


def _wordnet_to_names(wnids: tuple[str, ...]) -> tuple[str, ...]:
    """Map Tiny-ImageNet's WordNet ids to the names in :data:`TINY_IMAGENET_CLASSES`."""
    table = read_wordnet_names(TINY_IMAGENET_CLASSES)
    unknown = [w for w in wnids if w not in table]
    if unknown:
        raise ValueError(f"WordNet ids {unknown[:5]} not in {TINY_IMAGENET_CLASSES}")
    return tuple(table[w] for w in wnids)


def _load_folder(path: str, split: str, image_size: int) -> LabeledImages:
    """Class sub-folders under ``path`` (or under ``path/train`` and ``path/test``).

    Read through ``datasets``' own ``imagefolder`` builder, which names the classes by their
    folders (sorted, over every split); the images are decoded here, one at a time, so that a
    corrupt file is named.
    """
    root = _existing_dir(Path(path).expanduser(), "path")
    has_splits = (root / "train").is_dir() and (root / "test").is_dir()
    for directory in (root / "train", root / "test") if has_splits else (root,):
        _check_class_folders(directory)
    if has_splits:
        _check_subset(root / "test", root / "train")
    table = _imagefolder(root, split if has_splits else "train")
    names = tuple(table.features["label"].names)
    labels = np.asarray(table["label"], dtype=np.int64)  # (N,)
    images = np.stack([read_image(Path(item["path"]), image_size) for item in table["image"]])
    whole = LabeledImages(images, labels, names)
    if has_splits:
        return whole
    train_idx, test_idx = split_indices(whole.labels, FOLDER_TEST_FRACTION, SPLIT_SEED)
    return whole.subset(train_idx if split == "train" else test_idx)


def _imagefolder(root: Path, split: str) -> Any:
    """Split ``split`` of ``datasets``' ``imagefolder`` over ``root``, images not decoded."""
    import datasets

    datasets.disable_progress_bars()
    table = datasets.load_dataset("imagefolder", data_dir=str(root), split=split)
    return table.cast_column("image", datasets.Image(decode=False))


def _existing_dir(directory: Path, argument: str) -> Path:
    """``directory`` if it exists, else a ValueError naming ``argument``."""
    if not directory.is_dir():
        raise ValueError(f"{argument} {str(directory)!r} is not a directory")
    return directory


def _class_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _check_class_folders(root: Path) -> None:
    """Refuse a root without class sub-folders, or a class folder without images."""
    folders = _class_folders(root)
    if not folders:
        raise ValueError(f"no class sub-folders in {str(root)!r}")
    for folder in folders:
        if not any(f.suffix.lower() in IMAGE_SUFFIXES for f in folder.iterdir()):
            raise ValueError(
                f"class folder {str(folder)!r} has no images ({sorted(IMAGE_SUFFIXES)})"
            )


def _check_subset(test: Path, train: Path) -> None:
    """Refuse test classes the training split does not have."""
    known = {p.name for p in _class_folders(train)}
    if unknown := [p.name for p in _class_folders(test) if p.name not in known]:
        raise ValueError(f"class folders {unknown} in {str(test)!r} are not in {sorted(known)}")


def read_image(file: Path, side: int) -> npt.NDArray[np.uint8]:
    """One image, centre-cropped and resized to ``side`` pixels, as (side, side, 3) uint8."""
    size = (side, side)
    try:
        with Image.open(file) as image:
            fitted = ImageOps.fit(image.convert("RGB"), size, Image.Resampling.BICUBIC)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(
            f"cannot read image {str(file)!r} ({err}): remove or replace the file"
        ) from err
    return np.asarray(fitted, dtype=np.uint8)
