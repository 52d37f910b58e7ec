"""Sources (digits, save_to_disk hub datasets, folders) and the prepared-partition store."""

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from cmfl_flower.data import (
    FORMAT_VERSION,
    LabeledImages,
    PartitionSpec,
    default_data_root,
    ensure_partitions,
    load_global_test,
    load_partition,
    load_source,
    prepare_partitions,
    read_meta,
    sources,
    store,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --- digits -----------------------------------------------------------------------------------


def _rows(data: LabeledImages) -> list[bytes]:
    pairs = zip(data.images, data.labels, strict=True)
    return sorted(img.tobytes() + bytes([lab]) for img, lab in pairs)


def test_digits_splits_disjoint_and_cover_all() -> None:
    splits = {s: load_source("digits", s) for s in ("public", "train", "test")}
    sizes = {s: len(d) for s, d in splits.items()}
    assert sum(sizes.values()) == 1797
    assert abs(sizes["public"] - 0.4 * 1797) <= 1
    assert abs(sizes["train"] - 0.4 * 1797) <= 1
    assert abs(sizes["test"] - 0.2 * 1797) <= 1
    bunch = load_digits()
    gray = np.rint(bunch.images * (255 / 16)).astype(np.uint8)
    full = LabeledImages(
        np.repeat(gray[..., None], 3, axis=3), bunch.target.astype(np.int64), sources.DIGIT_NAMES
    )
    union = sorted(row for d in splits.values() for row in _rows(d))
    assert union == _rows(full)  # as multisets: every image in exactly one split


def test_digits_arrays_and_class_names() -> None:
    test = load_source("digits", "test")
    assert test.images.shape[1:] == (8, 8, 3)
    assert test.images.dtype == np.uint8 and test.labels.dtype == np.int64
    assert test.images.max() == 255
    assert test.class_names[:3] == ("zero", "one", "two") and len(test.class_names) == 10
    assert set(test.labels.tolist()) == set(range(10))  # stratified
    assert np.array_equal(test.labels, load_source("digits", "test").labels)  # deterministic


def test_unknown_dataset_and_split_refused() -> None:
    with pytest.raises(ValueError, match=r"dataset must be one of .*'digits'"):
        load_source("mnist", "train")
    with pytest.raises(ValueError, match=r"split of 'cifar10' must be one of \('train', 'test'\)"):
        load_source("cifar10", "public")


def test_labeled_images_validation() -> None:
    with pytest.raises(ValueError, match=r"uint8"):
        LabeledImages(np.zeros((2, 4, 4, 3)), np.zeros(2, np.int64), ("a",))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"labels must lie in"):
        LabeledImages(np.zeros((2, 4, 4, 3), np.uint8), np.array([0, 1]), ("a",))
    data = LabeledImages(np.zeros((3, 4, 4, 3), np.uint8), np.array([0, 1, 0]), ("a", "b"))
    assert len(data.subset(np.array([0, 2]))) == 2


# --- hub datasets via save_to_disk ------------------------------------------------------------


def _images(n: int, size: int, mode: str = "RGB") -> list[Image.Image]:
    rng = np.random.default_rng(0)
    arrays = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return [Image.fromarray(a).convert(mode) for a in arrays]


def _save_dict(
    tmp: Path, splits: dict[str, int], image: str, label: str, names: list[str], size: int = 6
) -> str:
    features = datasets.Features({image: datasets.Image(), label: datasets.ClassLabel(names=names)})
    dd = datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict(
                {image: _images(n, size), label: [i % len(names) for i in range(n)]},
                features=features,
            )
            for split, n in splits.items()
        }
    )
    dd.save_to_disk(str(tmp))
    return str(tmp)


def test_cifar10_like_from_disk(tmp_path: Path) -> None:
    path = _save_dict(
        tmp_path / "c10",
        {"train": 12, "test": 5},
        "img",
        "label",
        ["airplane", "pickup_truck", "cat"],
    )
    train = load_source("cifar10", "train", path=path)
    assert train.images.shape == (12, 6, 6, 3) and train.images.dtype == np.uint8
    assert train.labels.tolist() == [i % 3 for i in range(12)]
    assert train.class_names == ("airplane", "pickup truck", "cat")
    assert len(load_source("cifar10", "test", path=path)) == 5


def test_grayscale_images_become_rgb(tmp_path: Path) -> None:
    features = datasets.Features(
        {"img": datasets.Image(), "label": datasets.ClassLabel(names=["a"])}
    )
    gray = datasets.Dataset.from_dict(
        {"img": _images(2, 5, "L"), "label": [0, 0]}, features=features
    )
    datasets.DatasetDict({"train": gray, "test": gray}).save_to_disk(str(tmp_path))
    data = load_source("cifar10", "train", path=str(tmp_path))
    assert data.images.shape == (2, 5, 5, 3)
    assert np.array_equal(data.images[..., 0], data.images[..., 2])


def test_tiny_imagenet_like_maps_wordnet_ids(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not sources.TINY_IMAGENET_CLASSES.is_file():  # the shipped table; else a stand-in
        tsv = tmp_path / "classes.tsv"
        tsv.write_text("n01443537\tgoldfish\nn01629819\tEuropean fire salamander\n")
        monkeypatch.setattr(sources, "TINY_IMAGENET_CLASSES", tsv)
    path = _save_dict(
        tmp_path / "tin",
        {"train": 4, "valid": 2},
        "image",
        "label",
        ["n01443537", "n01629819"],
        size=8,
    )
    test = load_source("tiny-imagenet", "test", path=path)  # hub split "valid"
    assert len(test) == 2 and test.images.shape[1:] == (8, 8, 3)
    assert test.class_names == ("goldfish", "European fire salamander")


def test_shipped_tiny_imagenet_table() -> None:
    if not sources.TINY_IMAGENET_CLASSES.is_file():
        pytest.skip("tiny_imagenet_classes.tsv not written yet")
    table = sources.read_wordnet_names(sources.TINY_IMAGENET_CLASSES)
    assert len(table) == 200 and list(table) == sorted(table)
    assert all(k.startswith("n") and v for k, v in table.items())


def test_missing_label_column_refused(tmp_path: Path) -> None:
    path = _save_dict(tmp_path / "c100", {"train": 3, "test": 3}, "img", "coarse_label", ["a", "b"])
    with pytest.raises(ValueError, match=r"'fine_label' missing .*'img', 'coarse_label'"):
        load_source("cifar100", "train", path=path)


def test_missing_split_refused(tmp_path: Path) -> None:
    path = _save_dict(tmp_path / "c10", {"train": 3}, "img", "label", ["a"])
    with pytest.raises(ValueError, match=r"split 'test' not found .*\['train'\]"):
        load_source("cifar10", "test", path=path)


# --- folder -----------------------------------------------------------------------------------


def _folder(root: Path, per_class: int = 5) -> Path:
    for c, name in enumerate(["cat", "dog", "emu"]):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            size = (20 + 3 * i, 16 + c)  # varied sizes, all resized to 64x64
            Image.new("RGB", size, (40 * c, 10 * i, 0)).save(root / name / f"{i}.png")
    (root / "cat" / "notes.txt").write_text("not an image")  # ignored
    return root


def test_folder_stratified_split(tmp_path: Path) -> None:
    root = str(_folder(tmp_path / "imgs"))
    train, test = load_source("folder", "train", root), load_source("folder", "test", root)
    assert train.class_names == ("cat", "dog", "emu")
    assert train.images.shape == (12, 64, 64, 3) and test.images.shape == (3, 64, 64, 3)
    assert sorted(test.labels.tolist()) == [0, 1, 2]
    assert np.bincount(train.labels).tolist() == [4, 4, 4]


def test_folder_train_test_subfolders(tmp_path: Path) -> None:
    _folder(tmp_path / "train", per_class=3)
    (tmp_path / "test" / "dog").mkdir(parents=True)
    Image.new("RGB", (9, 9)).save(tmp_path / "test" / "dog" / "a.jpg")
    test = load_source("folder", "test", str(tmp_path))
    assert test.class_names == ("cat", "dog", "emu") and test.labels.tolist() == [1]
    assert len(load_source("folder", "train", str(tmp_path))) == 9


def test_folder_corrupt_image_refused(tmp_path: Path) -> None:
    root = _folder(tmp_path / "imgs")
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match=r"cannot read image .*broken.png"):
        load_source("folder", "train", str(root))


def test_folder_empty_class_and_missing_dir_refused(tmp_path: Path) -> None:
    root = _folder(tmp_path / "imgs")
    (root / "fox").mkdir()
    with pytest.raises(ValueError, match=r"class folder .*fox.* has no images"):
        load_source("folder", "train", str(root))
    with pytest.raises(ValueError, match=r"path .*nowhere.* is not a directory"):
        load_source("folder", "train", str(tmp_path / "nowhere"))


# --- store ------------------------------------------------------------------------------------

SPEC = PartitionSpec(num_partitions=4, seed=1)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_partitions(SPEC, tmp_path_factory.mktemp("store") / "out")


def test_round_trip(prepared: Path) -> None:
    meta = read_meta(prepared)
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["spec"]["num_partitions"] == 4  # type: ignore[index]
    assert meta["image_shape"] == [8, 8, 3]
    total = 0
    for pid in range(4):
        data = load_partition(prepared, pid)
        for part in (data.train, data.test):
            assert part.images.dtype == np.uint8 and part.images.shape[1:] == (8, 8, 3)
            assert part.labels.dtype == np.int64 and part.labels.shape == (len(part),)
        assert len(data.test) == pytest.approx(0.25 * (len(data.train) + len(data.test)), abs=1)
        total += len(data.train) + len(data.test)
    assert total == meta["num_pool"] == meta["num_assigned"] == 719  # dirichlet: all assigned
    global_test = load_global_test(prepared)
    assert len(global_test) == meta["num_global_test"] == 360
    assert global_test.class_names == load_source("digits", "test").class_names


def test_summary_matches_arrays(prepared: Path) -> None:
    summary = json.loads((prepared / "summary.json").read_text())
    assert [r["partition_id"] for r in summary["clients"]] == [0, 1, 2, 3]
    for row in summary["clients"]:
        data = load_partition(prepared, row["partition_id"])
        for name, part in (("train", data.train), ("test", data.test)):
            counts = {
                part.class_names[k]: int(c) for k, c in enumerate(np.bincount(part.labels)) if c
            }
            assert row[name] == counts
            assert row[f"num_{name}"] == len(part)
    assert summary["totals"]["global_test"] == 360


def test_plot_is_a_png(prepared: Path) -> None:
    png = prepared / "label_distribution.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > 300


def test_same_spec_same_files(prepared: Path, tmp_path: Path) -> None:
    again = prepare_partitions(SPEC, tmp_path / "again")
    for pid in range(4):
        a, b = load_partition(prepared, pid), load_partition(again, pid)
        assert np.array_equal(a.train.labels, b.train.labels)
        assert np.array_equal(a.test.images, b.test.images)


def test_failed_prepare_leaves_nothing(tmp_path: Path) -> None:
    spec = PartitionSpec(num_partitions=4, min_partition_size=500)
    with pytest.raises(ValueError, match=r"min_partition_size"):
        prepare_partitions(spec, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_failed_write_removes_temp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_plot(*args: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(store, "_plot", broken_plot)
    with pytest.raises(RuntimeError, match=r"disk full"):
        prepare_partitions(SPEC, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_refused_then_replaced(prepared: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"already holds prepared partitions"):
        prepare_partitions(SPEC, prepared)
    out = prepare_partitions(SPEC, tmp_path / "out")
    other = PartitionSpec(num_partitions=3, seed=1)
    prepare_partitions(other, out, replace=True)
    assert read_meta(out)["spec"]["num_partitions"] == 3  # type: ignore[index]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_loser_of_a_race_keeps_the_winner(tmp_path: Path) -> None:
    out = prepare_partitions(SPEC, tmp_path / "out")
    stamp = (out / "meta.json").stat().st_mtime_ns
    assert store._build(SPEC, out, show_progress=False, replace=False) == out  # lost the rename
    assert (out / "meta.json").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_load_errors(prepared: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no prepared partitions at .*cmfl-data-prep --output"):
        load_partition(tmp_path / "missing", 0)
    with pytest.raises(ValueError, match=r"partition_id must be in \[0, 4\).*got 4"):
        load_partition(prepared, 4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"meta.json.* is missing"):
        load_partition(tmp_path / "empty", 0)


def test_wrong_format_version_refused(tmp_path: Path) -> None:
    out = prepare_partitions(PartitionSpec(num_partitions=2), tmp_path / "out")
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ValueError, match=r"format_version 99, expected 1"):
        load_partition(out, 0)


def test_ensure_partitions(tmp_path: Path) -> None:
    spec = PartitionSpec(num_partitions=2, partitioner="iid")
    out = ensure_partitions(spec, tmp_path)  # digits: prepared on first use
    assert out == tmp_path / spec.slug() and (out / "meta.json").is_file()
    assert ensure_partitions(spec, tmp_path) == out  # reused
    meta = json.loads((out / "meta.json").read_text())
    meta["spec"]["seed"] = 7
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"other settings .*seed: 7 != 0"):
        ensure_partitions(spec, tmp_path)


def test_ensure_partitions_hub_dataset_needs_prep(tmp_path: Path) -> None:
    spec = PartitionSpec(dataset="cifar10", num_partitions=5)
    with pytest.raises(ValueError, match=r"cmfl-data-prep --dataset=cifar10 .*--num-partitions=5"):
        ensure_partitions(spec, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_prepare_from_folder(tmp_path: Path) -> None:
    root = _folder(tmp_path / "imgs", per_class=10)
    spec = PartitionSpec(
        dataset="folder", path=str(root), num_partitions=2, partitioner="iid", min_partition_size=5
    )
    out = prepare_partitions(spec, tmp_path / "data" / spec.slug())
    assert read_meta(out)["class_names"] == ["cat", "dog", "emu"]
    assert load_global_test(out).images.shape == (6, 64, 64, 3)
    assert ensure_partitions(spec, tmp_path / "data") == out


def test_folder_images_are_stored_at_the_configured_size(tmp_path: Path) -> None:
    root = _folder(tmp_path / "imgs", per_class=10)
    spec = PartitionSpec(
        dataset="folder", path=str(root), num_partitions=2, partitioner="iid", image_size=96
    )
    assert spec.slug().endswith("-i96")  # apart from the 64-px preparation of the same folder
    out = prepare_partitions(spec, tmp_path / "data" / spec.slug())
    assert load_global_test(out).images.shape == (6, 96, 96, 3)
    assert load_partition(out, 1).train.images.shape[1:] == (96, 96, 3)
    assert "--image-size=96" in store.prep_command(spec, out)
    with pytest.raises(ValueError, match="image_size must be 64 .* for dataset 'cifar10'"):
        PartitionSpec(dataset="cifar10", image_size=96)
    with pytest.raises(ValueError, match=r"data.image-size|image_size"):
        PartitionSpec(dataset="folder", path=str(root), image_size=4)


def test_a_folder_prepared_before_image_size_existed_still_matches(tmp_path: Path) -> None:
    root = _folder(tmp_path / "imgs", per_class=10)
    spec = PartitionSpec(dataset="folder", path=str(root), num_partitions=2, partitioner="iid")
    out = prepare_partitions(spec, tmp_path / "data" / spec.slug())
    meta = json.loads((out / "meta.json").read_text())
    del meta["spec"]["image_size"]  # as an earlier version wrote it
    (out / "meta.json").write_text(json.dumps(meta))
    assert ensure_partitions(spec, tmp_path / "data") == out


def test_default_data_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CMFL_FLOWER_DATA", str(tmp_path / "d"))
    assert default_data_root() == tmp_path / "d"
    monkeypatch.delenv("CMFL_FLOWER_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "c"))
    assert default_data_root() == tmp_path / "c" / "cmfl-flower" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_data_root() == Path.home() / ".cache" / "cmfl-flower" / "data"
