"""A site's own image folder: class ids fixed by the federation's class list, read once.

In a deployment each SuperNode may bring its own images (node config ``data-path``) instead of
a slice of one prepared dataset. The federation agrees on the classes through the run config
(``data.classes``: names in order, index = class id), so class 3 means the same thing at every
site whichever subset of the classes a site holds. A site's folder holds one sub-folder per
class it has, named from that list (or ``train/`` and ``test/`` with such sub-folders; without
them a stratified 20 % of each class is its test split, seeded). A folder named outside the list
is refused, naming it and the list; a folder with no image in any class is refused too.

Decoding every image on every message would cost a deployment (a fresh process per message)
the whole folder each round, so the decoded arrays are cached under the data root
(``<data root>/sites/<fingerprint>/{train,test}.npz``): the fingerprint covers the folder's
path, every image file's name, size and modification time, the class list and the image size,
so any change to the folder reads it again. An evaluation folder (node config ``eval-path``:
class sub-folders, every image a test image) is read and cached the same way.
``cmfl-data-prep --site PATH --classes ...`` checks a folder and fills the cache before round 1.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt

from cmfl_flower.data.sources import (
    FOLDER_TEST_FRACTION,
    IMAGE_SUFFIXES,
    SPLIT_SEED,
    LabeledImages,
    read_image,
    split_indices,
)
from cmfl_flower.data.store import ClientData

SITES_DIR = "sites"
SPLITS = ("train", "test")


def _split_dirs(root: Path) -> dict[str, Path]:
    """The folders holding class sub-folders: ``train``/``test`` when both exist, else root."""
    if (root / "train").is_dir() and (root / "test").is_dir():
        return {split: root / split for split in SPLITS}
    return {"all": root}


def _files(directory: Path, classes: tuple[str, ...]) -> dict[int, list[Path]]:
    """Class id -> its image files (sorted) in ``directory``'s class sub-folders."""
    folders = sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    if unknown := [p.name for p in folders if p.name not in classes]:
        raise ValueError(
            f"class folder(s) {unknown} in {str(directory)!r} are not in data.classes "
            f"({', '.join(classes)})"
        )
    found = {}
    for folder in folders:
        images = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if images:
            found[classes.index(folder.name)] = images
    return found


def site_files(path: Path, classes: tuple[str, ...]) -> dict[str, dict[int, list[Path]]]:
    """Split (``train``/``test``, or ``all``) -> class id -> image files; checked."""
    if not path.is_dir():
        raise ValueError(f"data-path {str(path)!r} is not a directory")
    files = {split: _files(directory, classes) for split, directory in _split_dirs(path).items()}
    held = files.get("train", files.get("all", {}))
    if not held:
        raise ValueError(
            f"data-path {str(path)!r} holds no image of any class in data.classes: give it one "
            f"sub-folder per class it has, named from ({', '.join(classes)})"
        )
    if extra := sorted(set(files.get("test", {})) - set(held)):
        raise ValueError(
            f"test classes {[classes[c] for c in extra]} in {str(path)!r} have no training images"
        )
    return files


def fingerprint(path: Path, files: dict[str, dict[int, list[Path]]], key: object) -> str:
    """A hash of the folder's path, its image files (name, size, mtime) and ``key``."""
    listing = [
        [split, c, str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns]
        for split, by_class in sorted(files.items())
        for c, names in sorted(by_class.items())
        for f in names
    ]
    text = json.dumps([str(path.resolve()), listing, key])
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _read(by_class: dict[int, list[Path]], classes: tuple[str, ...], side: int) -> LabeledImages:
    """The images of ``by_class`` decoded at ``side`` pixels, labelled by class id."""
    pairs = [(c, f) for c, names in sorted(by_class.items()) for f in names]
    images = np.stack([read_image(f, side) for _, f in pairs])  # (N, side, side, 3)
    labels: npt.NDArray[np.int64] = np.array([c for c, _ in pairs], np.int64)  # (N,)
    return LabeledImages(images, labels, classes)


def _decode(
    files: dict[str, dict[int, list[Path]]], classes: tuple[str, ...], side: int
) -> dict[str, LabeledImages]:
    """``train`` and ``test``: the folder's own splits, else a stratified 20 % held out."""
    if "all" not in files:
        return {split: _read(files[split], classes, side) for split in SPLITS}
    whole = _read(files["all"], classes, side)
    train, test = split_indices(whole.labels, FOLDER_TEST_FRACTION, SPLIT_SEED)
    return {"train": whole.subset(train), "test": whole.subset(test)}


def load_site(path: Path, classes: tuple[str, ...], image_size: int, root: Path) -> ClientData:
    """A site's train and test splits from its folder ``path``, cached under ``root``.

    ``classes``: the federation's class list (``data.classes``); ``image_size``: the side at
    which images are kept (``data.image-size``); ``root``: the data root.
    """
    path = path.expanduser()
    files = site_files(path, classes)
    data = _cached(
        path,
        files,
        [list(classes), image_size],
        root,
        SPLITS,
        classes,
        decode=lambda: _decode(files, classes, image_size),
    )
    return ClientData(data["train"], data["test"])


def load_eval_folder(
    path: Path, classes: tuple[str, ...], image_size: int, root: Path
) -> LabeledImages:
    """Every image under ``path``'s class sub-folders (node config ``eval-path``), cached."""
    path = path.expanduser()
    if not path.is_dir():
        raise ValueError(f"eval-path {str(path)!r} is not a directory")
    files = {"eval": _files(path, classes)}
    if not files["eval"]:
        raise ValueError(f"eval-path {str(path)!r} holds no image of any class in data.classes")
    key = [list(classes), image_size]
    data = _cached(
        path,
        files,
        key,
        root,
        ("eval",),
        classes,
        decode=lambda: ({"eval": _read(files["eval"], classes, image_size)}),
    )
    return data["eval"]


def _cached(
    path: Path,
    files: dict[str, dict[int, list[Path]]],
    key: object,
    root: Path,
    names: tuple[str, ...],
    classes: tuple[str, ...],
    decode: Callable[[], dict[str, LabeledImages]],
) -> dict[str, LabeledImages]:
    """The sets ``names`` of folder ``path``: from the cache under ``root``, else ``decode()``.

    The cache is keyed by the folder's :func:`fingerprint` with ``key`` (class list, image size).
    """
    cache = root / SITES_DIR / fingerprint(path, files, key)
    if all((cache / f"{name}.npz").is_file() for name in names):
        return {name: _load(cache / f"{name}.npz", classes) for name in names}
    data = decode()
    cache.mkdir(parents=True, exist_ok=True)
    for name in names:
        _save(cache / f"{name}.npz", data[name])
    return data


def _load(file: Path, classes: tuple[str, ...]) -> LabeledImages:
    with np.load(file) as archive:
        return LabeledImages(archive["images"], archive["labels"], classes)


def _save(file: Path, data: LabeledImages) -> None:
    """Write ``file`` atomically: a temporary sibling renamed into place."""
    handle, tmp = tempfile.mkstemp(dir=file.parent, suffix=".npz")
    os.close(handle)
    np.savez(tmp, images=data.images, labels=data.labels)
    Path(tmp).replace(file)


def describe(data: ClientData) -> str:
    """One line per class the site holds: ``id name train test``."""
    names = data.train.class_names
    train = np.bincount(data.train.labels, minlength=len(names))
    test = np.bincount(data.test.labels, minlength=len(names))
    lines = [f"{'id':>4} {'class':<24} {'train':>6} {'test':>5}"]
    lines += [
        f"{c:>4} {names[c]:<24} {train[c]:>6} {test[c]:>5}"
        for c in range(len(names))
        if train[c] or test[c]
    ]
    return "\n".join(lines)
