"""The deployment benchmark prepares, before the nodes start, the partitions the run reads."""

import json
from pathlib import Path
from unittest import mock

from benchmarks import deployment
from cmfl_flower.client.workspace import data_dir
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


def test_model_loads_count_as_overhead_not_work(tmp_path: Path) -> None:
    rounds = [{"round": 1, "round-seconds": 12.0}]
    clients = [
        {"round": 1, "seconds-load": 4.0, "seconds-generation": 2.0, "seconds-tokens": 1.0},
        {"round": 1, "seconds-load": 2.0, "seconds-encoder": 3.0, "seconds-eval": 3.0},
        {"round": 1, "error": "lost"},
    ]
    (tmp_path / "rounds.json").write_text(json.dumps(rounds))
    (tmp_path / "clients.json").write_text(json.dumps(clients))
    (row,) = deployment.per_round(tmp_path)
    assert row == {"round": 1, "wall-s": 12.0, "work-s": 4.5, "load-s": 3.0, "ratio": 12.0 / 4.5}
