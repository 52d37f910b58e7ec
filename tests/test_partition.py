"""Partitioning: coverage, determinism, skew, pathological classes and spec validation."""

import numpy as np
import pytest

from cmfl_flower.data import PartitionSpec, load_source, partition_indices


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    return load_source("digits", "train").labels  # (719,) int64


def _assert_each_sample_once(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == n
    assert np.array_equal(np.sort(joined), np.arange(n))


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
def test_every_sample_assigned_exactly_once(labels: np.ndarray, partitioner: str) -> None:
    spec = PartitionSpec(num_partitions=10, partitioner=partitioner)
    parts = partition_indices(labels, spec)
    assert len(parts) == 10
    assert all(p.dtype == np.int64 for p in parts)
    assert min(len(p) for p in parts) >= spec.min_partition_size
    _assert_each_sample_once(parts, len(labels))


def test_default_spec_partitions_digits(labels: np.ndarray) -> None:
    parts = partition_indices(labels, PartitionSpec())  # 20 clients, alpha 0.1, min 10
    assert min(len(p) for p in parts) >= 10
    _assert_each_sample_once(parts, len(labels))


@pytest.mark.parametrize("partitioner", ["dirichlet", "pathological", "iid"])
def test_same_seed_same_partitions(labels: np.ndarray, partitioner: str) -> None:
    spec = PartitionSpec(num_partitions=10, partitioner=partitioner, seed=3)
    first, second = partition_indices(labels, spec), partition_indices(labels, spec)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("partitioner", ["dirichlet", "pathological"])
def test_other_seed_other_partitions(labels: np.ndarray, partitioner: str) -> None:
    a = partition_indices(labels, PartitionSpec(num_partitions=10, partitioner=partitioner))
    b = partition_indices(labels, PartitionSpec(num_partitions=10, partitioner=partitioner, seed=1))
    assert not all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def _mean_largest_class_share(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    return float(np.mean([np.bincount(labels[p]).max() / len(p) for p in parts]))


def test_small_alpha_is_much_more_skewed(labels: np.ndarray) -> None:
    def share(alpha: float) -> float:
        spec = PartitionSpec(num_partitions=10, alpha=alpha)
        return _mean_largest_class_share(labels, partition_indices(labels, spec))

    skewed, uniform = share(0.1), share(100.0)
    assert uniform < 0.25  # ~0.1 plus sampling noise: near the global distribution
    assert skewed > 0.4
    assert skewed - uniform > 0.3


@pytest.mark.parametrize("k", [1, 2, 3])
def test_pathological_exactly_k_classes(labels: np.ndarray, k: int) -> None:
    spec = PartitionSpec(num_partitions=10, partitioner="pathological", classes_per_client=k)
    parts = partition_indices(labels, spec)
    assert [len(np.unique(labels[p])) for p in parts] == [k] * 10
    _assert_each_sample_once(parts, len(labels))  # num_partitions >= num classes


def test_pathological_k_above_num_classes_refused(labels: np.ndarray) -> None:
    spec = PartitionSpec(num_partitions=10, partitioner="pathological", classes_per_client=11)
    with pytest.raises(ValueError, match=r"classes_per_client"):
        partition_indices(labels, spec)


def test_impossible_min_size_refused_with_advice(labels: np.ndarray) -> None:
    spec = PartitionSpec(num_partitions=10, min_partition_size=100)
    with pytest.raises(ValueError, match=r"min_partition_size=100.*fewer partitions"):
        partition_indices(labels, spec)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("alpha", 0.0),
        ("alpha", -1.0),
        ("alpha", float("nan")),
        ("num_partitions", 0),
        ("partitioner", "random"),
        ("dataset", "mnist"),
        ("test_fraction", 0.0),
        ("test_fraction", 1.0),
        ("classes_per_client", 0),
        ("min_partition_size", -1),
        ("seed", -1),
    ],
)
def test_bad_spec_values_refused(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"PartitionSpec\.{field} must be"):
        PartitionSpec(**{field: value})  # type: ignore[arg-type]


def test_path_rules() -> None:
    with pytest.raises(ValueError, match=r"PartitionSpec.path"):
        PartitionSpec(dataset="folder")
    with pytest.raises(ValueError, match=r"PartitionSpec.path"):
        PartitionSpec(dataset="digits", path="/tmp/x")


def test_slug() -> None:
    assert PartitionSpec().slug() == "digits-dirichlet-a0.1-n20-m10-t0.25-s0"
    patho = PartitionSpec(partitioner="pathological", classes_per_client=3, seed=2)
    assert patho.slug() == "digits-pathological-k3-n20-m10-t0.25-s2"
    assert PartitionSpec(partitioner="iid", alpha=5.0).slug() == "digits-iid-n20-m10-t0.25-s0"
    a = PartitionSpec(dataset="folder", path="/data/a").slug()
    b = PartitionSpec(dataset="folder", path="/data/b").slug()
    assert a.startswith("folder-dirichlet-a0.1-n20-m10-t0.25-s0-p")
    assert a != b
