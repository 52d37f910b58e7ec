"""A run stopped after a round and resumed ends like an uninterrupted run (server and clients)."""

import json

import numpy as np
import pytest

from benchmarks.loopback import LoopbackGrid
from client_app import app as client_app
from cmfl_flower import checkpoint
from cmfl_flower.config import AppConfig
from cmfl_flower.server.rounds import run_federation
from tests.test_strategies import BOTH, make_cfg


def _rows(run_dir, name):
    return json.loads((run_dir / f"{name}.json").read_text())


def _final_accuracies(run_dir):
    rows = [r for r in _rows(run_dir, "clients") if r["round"] == 2]
    return {r["partition-id"]: (r["local-acc"], r["global-acc"]) for r in rows}


@pytest.mark.parametrize("method", ["cmfl-relay", "encoder-lora"])
def test_a_crashed_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch, method):
    settings = BOTH if method == "cmfl-relay" else {}  # the relay at its default token objective
    first = make_cfg(tmp_path, method, 2, **settings, **{"output.run-name": "a"})
    whole = run_federation(LoopbackGrid(client_app, first, 2), first)

    # crash right after round 2 was recorded, before its checkpoint was written
    save = checkpoint.save_checkpoint

    def crash_in_round_2(run_dir, state):
        if state.round == 2:
            raise KeyboardInterrupt
        return save(run_dir, state)

    monkeypatch.setattr("cmfl_flower.server.rounds.save_checkpoint", crash_in_round_2)
    cfg = make_cfg(tmp_path, method, 2, **settings, **{"output.run-name": "b"})
    grid = LoopbackGrid(client_app, cfg, 2)
    with pytest.raises(KeyboardInterrupt):
        run_federation(grid, cfg)
    cut = tmp_path / "runs" / "b"
    assert json.loads((cut / "status.json").read_text())["status"] == "failed"
    assert [r["round"] for r in _rows(cut, "rounds")] == [1, 2]
    assert json.loads((cut / "checkpoint" / "latest.json").read_text())["round"] == 1

    monkeypatch.setattr("cmfl_flower.server.rounds.save_checkpoint", save)
    resumed = AppConfig.from_run_config(cfg.to_run_config() | {"output.resume": True})
    # a restarted run is a new Flower run: fresh contexts (client state comes from disk) and
    # new node ids (the server must not rely on its old node -> partition map)
    assert run_federation(LoopbackGrid(client_app, resumed, 2, first_node_id=5000), resumed) == cut

    assert [r["round"] for r in _rows(cut, "rounds")] == [1, 2]  # round 2 redone once
    assert _final_accuracies(cut) == _final_accuracies(whole)
    expected, got = checkpoint.load_checkpoint(whole), checkpoint.load_checkpoint(cut)
    assert expected is not None and got is not None and got.round == 2
    assert expected.arrays and set(got.arrays) == set(expected.arrays)
    for key, value in expected.arrays.items():
        np.testing.assert_array_equal(got.arrays[key], value)


def test_resume_refuses_a_changed_config_and_a_missing_run(tmp_path):
    cfg = make_cfg(tmp_path, "local-only", 1, **{"output.run-name": "r"})
    run_federation(LoopbackGrid(client_app, cfg, 2), cfg)
    changed = cfg.to_run_config() | {"output.resume": True, "seed": 7}
    with pytest.raises(ValueError, match="differs .* in seed"):
        run_federation(LoopbackGrid(client_app, cfg, 2), AppConfig.from_run_config(changed))
    missing = changed | {"seed": 0, "output.run-name": "nope"}
    with pytest.raises(ValueError, match="holds no run"):
        run_federation(LoopbackGrid(client_app, cfg, 2), AppConfig.from_run_config(missing))
    with pytest.raises(ValueError, match="output.run-name"):
        AppConfig.from_run_config({"output.resume": True})


def test_more_rounds_can_be_added_to_a_finished_run(tmp_path):
    cfg = make_cfg(tmp_path, "encoder-lora", 1, **{"output.run-name": "grow"})
    grid = LoopbackGrid(client_app, cfg, 2, keep_messages=True)
    run_dir = run_federation(grid, cfg)
    more = cfg.to_run_config() | {"output.resume": True, "federation.rounds": 2}
    run_federation(grid, AppConfig.from_run_config(more))
    assert [r["round"] for r in _rows(run_dir, "rounds")] == [1, 2]
    sent_round_2 = grid.sent[-1].content.array_records  # the restored global adapter
    assert sent_round_2, "round 2 starts from the checkpointed global adapter"


def _sampled(run_dir):
    """Round -> the sorted partition ids that replied."""
    out: dict[int, list[int]] = {}
    for row in _rows(run_dir, "clients"):
        out.setdefault(row["round"], []).append(row["partition-id"])
    return {k: sorted(v) for k, v in out.items()}


# local-only samples with its own strategy, encoder-lora with Flower's FedAvg
@pytest.mark.parametrize("method", ["local-only", "encoder-lora"])
def test_a_resumed_run_samples_as_the_uninterrupted_one(tmp_path, method):
    # seed 1 samples other nodes in round 2 than in round 1
    half = {"federation.fraction": 0.5, "federation.min-nodes": 4, "seed": 1}
    whole_cfg = make_cfg(tmp_path, method, 2, **half, **{"output.run-name": "whole"})
    whole = run_federation(LoopbackGrid(client_app, whole_cfg, 4), whole_cfg)
    cfg = make_cfg(tmp_path, method, 1, **half, **{"output.run-name": "grown"})
    grown = run_federation(LoopbackGrid(client_app, cfg, 4), cfg)
    more = AppConfig.from_run_config(
        cfg.to_run_config() | {"output.resume": True, "federation.rounds": 2}
    )
    # the resumed run is a new Flower run, with new node ids (in the same order)
    run_federation(LoopbackGrid(client_app, more, 4, first_node_id=5000), more)
    expected = {1: [0, 3], 2: [0, 1]}  # random.Random("1/<round>").sample of 4 sorted ids
    assert _sampled(whole) == expected
    assert _sampled(grown) == expected  # seeded by the run's seed and round
