"""A client's torch threads: the CPUs it was given (node, simulation, mask), capped by idle."""

import os
import time
from pathlib import Path

import pytest
import torch

from cmfl_flower import threads
from cmfl_flower.threads import client_threads, given_cpus, idle_cpus, pin_threads

NODE = {"partition-id": 0, "num-partitions": 2}


def test_node_config_num_cpus_wins_over_the_simulation_and_the_mask(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert given_cpus({**NODE, "num-cpus": 5}) == 5
    assert given_cpus(NODE) == 3  # what Ray sets from client-resources-num-cpus
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert given_cpus(NODE) == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("bad", [0, -1, "2", 1.5, True])
def test_a_bad_num_cpus_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="num-cpus must be a positive integer"):
        given_cpus({**NODE, "num-cpus": bad})


def _fake_stat(tmp_path: Path, monkeypatch, snapshots: list[str]) -> None:
    """``/proc/stat`` reads ``snapshots`` in turn; the sampling sleep advances to the next."""
    stat = tmp_path / "stat"
    stat.write_text(snapshots[0])
    monkeypatch.setattr(threads, "_PROC_STAT", stat)
    monkeypatch.setattr(time, "sleep", lambda _: stat.write_text(snapshots[1]))
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1})


# user nice system idle iowait irq softirq steal: cpu0 busy for all 20 ticks, cpu1 idle
BEFORE = "cpu  0 0 0 0 0 0 0 0\ncpu0 100 0 0 50 0 0 0 0\ncpu1 10 0 0 200 0 0 0 0\n"
ONE_BUSY = "cpu  0 0 0 0 0 0 0 0\ncpu0 118 0 2 50 0 0 0 0\ncpu1 10 0 0 218 2 0 0 0\n"
QUIET = "cpu  0 0 0 0 0 0 0 0\ncpu0 101 0 0 69 0 0 0 0\ncpu1 10 0 0 220 0 0 0 0\n"


def test_a_busy_neighbour_leaves_one_of_two_cpus_idle(tmp_path, monkeypatch):
    _fake_stat(tmp_path, monkeypatch, [BEFORE, ONE_BUSY])
    assert idle_cpus({0, 1}) == pytest.approx(1.0)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    _fake_stat(tmp_path, monkeypatch, [BEFORE, ONE_BUSY])
    assert client_threads(0, {**NODE, "num-cpus": 2}) == 1


def test_a_quiet_machine_gives_every_cpu_given_and_no_more(tmp_path, monkeypatch):
    _fake_stat(tmp_path, monkeypatch, [BEFORE, QUIET])
    assert client_threads(0, {**NODE, "num-cpus": 2}) == 2
    _fake_stat(tmp_path, monkeypatch, [BEFORE, QUIET])
    assert client_threads(0, {**NODE, "num-cpus": 1}) == 1


def test_a_client_given_one_cpu_does_not_wait_to_sample_the_idle_ones(monkeypatch):
    monkeypatch.setattr(threads, "idle_cpus", lambda *_: pytest.fail("sampled"))
    assert client_threads(0, {**NODE, "num-cpus": 1}) == 1


def test_backbone_threads_is_taken_as_is(tmp_path, monkeypatch):
    _fake_stat(tmp_path, monkeypatch, [BEFORE, ONE_BUSY])
    assert client_threads(4, NODE) == 4


def test_without_proc_stat_the_given_cpus_are_used(tmp_path, monkeypatch):
    monkeypatch.setattr(threads, "_PROC_STAT", tmp_path / "missing")
    monkeypatch.setattr(time, "sleep", lambda _: None)
    assert client_threads(0, {**NODE, "num-cpus": 3}) == 3


def test_the_real_machine_reports_between_none_and_all_its_cpus_idle():
    cpus = set(os.sched_getaffinity(0))
    idle = idle_cpus(cpus, seconds=0.05)
    assert idle is None or 0.0 <= idle <= len(cpus) + 1e-9


def test_pin_threads_sets_torch(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert pin_threads(1, NODE) == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
