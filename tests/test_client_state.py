"""Client state files: newest earlier round is loaded, old and later rounds are pruned, and
two nodes holding one partition never write the same file."""

import pytest
import torch

from cmfl_flower.client.store import load_state, newest_saved, save_state, state_dir
from cmfl_flower.client.task import ClientState
from cmfl_flower.config import AppConfig

NODE = 7


def _state(value):
    return ClientState(lora={"w": torch.full((2, 3), value)}, tokens={"c1": torch.ones(1, 4)})


def test_a_round_starts_from_the_newest_earlier_round(tmp_path):
    for r in (1, 2, 3):
        save_state(tmp_path, _state(float(r)), r, NODE)
    own = tmp_path / f"node-{NODE}"
    assert sorted(p.name for p in own.iterdir()) == ["round-2.safetensors", "round-3.safetensors"]
    assert load_state(tmp_path, 4).lora["w"][0, 0] == 3.0
    assert load_state(tmp_path, 3).lora["w"][0, 0] == 2.0  # a repeated round 3
    assert load_state(tmp_path, 1) == ClientState()
    save_state(tmp_path, _state(9.0), 1, NODE)  # a fresh run of the same name: later rounds go
    assert [p.name for p in own.iterdir()] == ["round-1.safetensors"]
    assert torch.equal(load_state(tmp_path, 2).tokens["c1"], torch.ones(1, 4))


def test_an_empty_state_round_trips(tmp_path):
    save_state(tmp_path, ClientState(), 1, NODE)
    assert load_state(tmp_path, 2) == ClientState()


def test_a_restarted_node_takes_the_newest_state_of_its_partition(tmp_path):
    save_state(tmp_path, _state(1.0), 1, node_id=1)  # the node that went down after round 1
    assert newest_saved(tmp_path, 3, node_id=2) == tmp_path / "node-1" / "round-1.safetensors"
    assert load_state(tmp_path, 3, node_id=2).lora["w"][0, 0] == 1.0
    save_state(tmp_path, _state(3.0), 3, node_id=2)
    assert load_state(tmp_path, 4, node_id=1).lora["w"][0, 0] == 3.0  # newer wins


def test_two_nodes_with_one_partition_write_apart_and_each_prefers_its_own(tmp_path):
    save_state(tmp_path, _state(1.0), 2, node_id=1)
    save_state(tmp_path, _state(5.0), 2, node_id=5)  # a duplicate SuperNode on the same host
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node-1", "node-5"]
    assert load_state(tmp_path, 3, node_id=1).lora["w"][0, 0] == 1.0
    assert load_state(tmp_path, 3, node_id=5).lora["w"][0, 0] == 5.0


def test_state_is_keyed_by_run_name_and_partition(tmp_path):
    cfg = AppConfig.from_run_config({"output.dir": str(tmp_path), "output.run-name": "x"})
    assert state_dir(cfg, 3) == tmp_path / "x" / "clients" / "partition-3" / "state"
    unnamed = AppConfig.from_run_config({"output.dir": str(tmp_path)})
    with pytest.raises(ValueError, match="output.run-name"):
        state_dir(unnamed, 0)
