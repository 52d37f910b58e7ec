"""The deployment benchmark prepares, before the nodes start, the partitions the run reads."""

from pathlib import Path
from unittest import mock

from benchmarks import deployment
from cmfl_flower.client_round import data_dir
from cmfl_flower.config import AppConfig
from cmfl_flower.data import store


def test_cmfl_data_prep_writes_the_partitions_the_default_run_reads(tmp_path: Path) -> None:
    deployment.prepare(tmp_path / "data", 3)
    written = sorted(p.name for p in (tmp_path / "data").iterdir())
    cfg = AppConfig.from_run_config({"data.dir": str(tmp_path / "data")})
    with mock.patch.object(store, "_build", side_effect=AssertionError("re-partitioned")):
        found = data_dir(cfg.data, 3)  # would partition on first use if the slug differed
    assert written == [found.name]
    assert sorted(p.name for p in found.glob("partition_*")) == [
        f"partition_{i:04d}" for i in range(3)
    ]
