"""The node worker: one process serves a node's rounds, safely, and never loses a round."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from benchmarks.flower_procs import node_workers
from cmfl_flower.aliases import Arrays
from cmfl_flower.client import worker
from cmfl_flower.client.task import ClientTask
from cmfl_flower.config import AppConfig
from tests.worker_method import STOP, TEST_PID

METHOD = "tests.worker_method:WHO_RAN"


@pytest.fixture
def cache(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The cache root of this process and the workers it starts; stops them afterwards."""
    with node_workers() as root:
        monkeypatch.setenv("XDG_CACHE_HOME", str(root))
        monkeypatch.setenv(TEST_PID, str(os.getpid()))
        yield root


def request(tmp: Path, idle: int, server_round: int = 1, **server: str) -> worker.Request:
    cfg = AppConfig.from_run_config({"output.dir": str(tmp), "output.run-name": "w"})
    task = ClientTask(0, 2, server_round, server_config=server)
    arrays = {"v": np.arange(6, dtype=np.float32).reshape(2, 3)}
    node_config = {"partition-id": 0, "num-partitions": 2, worker.NODE_KEY: idle}
    return worker.Request("train", METHOD, cfg, task, 7, node_config, arrays)


def test_frames_carry_json_and_arrays_and_never_unpickle() -> None:
    arrays: Arrays = {"c3": np.ones((2, 4), np.float32), "ids": np.array([1, 2], np.int64)}
    header, back = worker.unpack(worker.pack({"acc": np.float32(0.5), "n": 3}, arrays))
    assert header == {"acc": 0.5, "n": 3}
    assert set(back) == set(arrays) and all(np.array_equal(back[k], arrays[k]) for k in arrays)
    assert back["ids"].dtype == np.int64
    hostile = np.array([{"x": 1}], dtype=object)
    with pytest.raises(ValueError, match="pickle"):
        worker.unpack(worker.pack({}, {"evil": hostile}))


def test_a_request_survives_the_socket_unchanged(tmp_path: Path) -> None:
    sent = request(tmp_path, 30, server_round=4, mu="0.1")
    back = worker.decode_request(worker.encode_request(sent))
    assert back.cfg == sent.cfg and back.task == sent.task and back.node_id == 7
    assert np.array_equal(back.received["v"], sent.received["v"])


@pytest.mark.parametrize("value", [-1, True, "60", 1.5])
def test_worker_idle_seconds_must_be_whole_seconds(value: object) -> None:
    with pytest.raises(ValueError, match="worker-idle-seconds"):
        worker.idle_seconds({worker.NODE_KEY: value})
    assert worker.idle_seconds({}) == 0


def test_one_worker_process_serves_every_round_of_a_node(tmp_path: Path, cache: Path) -> None:
    first = worker.run(request(tmp_path, 30, 1))
    second = worker.run(request(tmp_path, 30, 2))
    assert first.metrics["pid"] == second.metrics["pid"] != os.getpid()
    assert (first.metrics["calls"], second.metrics["calls"]) == (1, 2)  # one process, kept
    assert np.array_equal(second.arrays["v"], 2 * np.arange(6, dtype=np.float32).reshape(2, 3))
    here = worker.run(request(tmp_path, 0, 3))  # 0: no worker
    assert here.metrics["pid"] == os.getpid()
    folder = cache / "cmfl-flower" / "workers"
    assert oct(folder.stat().st_mode & 0o777) == "0o700"
    (sock,) = folder.glob("*.sock")
    assert oct(sock.stat().st_mode & 0o777) == "0o600"


def test_an_idle_worker_exits_and_removes_its_socket(tmp_path: Path, cache: Path) -> None:
    pid = worker.run(request(tmp_path, 1)).metrics["pid"]
    folder = cache / "cmfl-flower" / "workers"
    deadline = time.monotonic() + 20
    while list(folder.glob("*.sock")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not list(folder.glob("*.sock")) and not list(folder.glob("*.pid"))
    while not os.waitpid(pid, os.WNOHANG)[0] and time.monotonic() < deadline:  # our child
        time.sleep(0.1)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert worker.run(request(tmp_path, 1)).metrics["pid"] not in (pid, os.getpid())  # a new one


def test_errors_of_the_round_come_back_as_they_were_raised(tmp_path: Path, cache: Path) -> None:
    with pytest.raises(ValueError, match="data.bogus is not a key"):
        worker.run(request(tmp_path, 30, fail="value"))
    with pytest.raises(RuntimeError, match=r"RuntimeError: out of memory .*\.log"):
        worker.run(request(tmp_path, 30, fail="runtime"))


def test_a_worker_that_dies_mid_round_costs_a_warning_not_the_round(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    stop = tmp_path / "stop"
    monkeypatch.setenv(STOP, str(stop))
    before = worker.run(request(tmp_path, 30, 1)).metrics["pid"]
    stop.touch()
    with caplog.at_level(logging.WARNING):
        output = worker.run(request(tmp_path, 30, 2))
    assert output.metrics["pid"] == os.getpid() and output.metrics["round"] == 2
    assert "ended before it answered" in caplog.text
    os.waitpid(before, 0)  # our child: gone, its sockets closed
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        after = worker.run(request(tmp_path, 30, 3)).metrics["pid"]  # a fresh worker takes over
    assert not caplog.text and after not in (before, os.getpid())


def test_a_folder_others_can_open_is_not_used(
    tmp_path: Path, cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = cache / "cmfl-flower" / "workers"
    folder.mkdir(parents=True)
    folder.chmod(0o755)
    with caplog.at_level(logging.WARNING):
        output = worker.run(request(tmp_path, 30))
    assert output.metrics["pid"] == os.getpid()
    assert "chmod 700" in caplog.text and not list(folder.glob("*.sock"))


def test_a_log_past_its_bound_moves_aside_and_writing_goes_on_in_a_fresh_one(
    tmp_path: Path,
) -> None:
    log = tmp_path / "w.log"
    log.write_bytes(b"x" * 100)
    writer = os.open(log, os.O_WRONLY | os.O_APPEND)
    try:
        assert not worker.rotate_log(log, limit=100, fds=(writer,))  # at the bound: kept
        os.write(writer, b"y")
        assert worker.rotate_log(log, limit=100, fds=(writer,))
        os.write(writer, b"after")
    finally:
        os.close(writer)
    assert (tmp_path / "w.log.1").read_bytes() == b"x" * 100 + b"y"
    assert log.read_bytes() == b"after"
    assert not worker.rotate_log(tmp_path / "missing.log", limit=0, fds=())


def test_a_new_plugin_version_gets_its_own_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plugin = tmp_path / "my_plugin.py"
    plugin.write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = worker.code_version("my_plugin:X")
    assert worker.code_version("my_plugin:X") == before
    plugin.write_text("X = 2\n")
    assert worker.code_version("my_plugin:X") != before
    assert worker.code_version("cmfl-relay") != before


def test_a_relay_round_in_the_worker_equals_the_round_in_process(
    tmp_path: Path, cache: Path
) -> None:
    from cmfl_flower.wire import TokenEntry, parse_reply, relay_arrays
    from tests.test_strategies import ANY_SIZE

    flat = {"data.dir": str(tmp_path / "data"), "generation.images-per-class": 1}
    flat |= {"generation.steps": 2, "tokens.epochs": 1, "output.run-name": "w"}

    def relay(out: str, partition: int, server_round: int, received, idle: int):
        cfg = AppConfig.from_run_config(flat | {"output.dir": str(tmp_path / out)})
        node = {"partition-id": partition, "num-partitions": 2, worker.NODE_KEY: idle}
        task = ClientTask(partition, 2, server_round)
        return worker.run(worker.Request("train", "cmfl-relay", cfg, task, 5, node, received))

    sent = parse_reply(relay("first", 0, 1, {}, 0).arrays, ANY_SIZE, labelled=True)
    received = relay_arrays([TokenEntry(0, e.class_id, e.vectors) for e in sent])
    here = relay("here", 1, 2, received, 0)
    there = relay("there", 1, 2, received, 60)
    assert here.metrics["num-generated"] > 0
    timings = {k for k in here.metrics if k.startswith("seconds-")}
    assert {k: v for k, v in here.metrics.items() if k not in timings} == {
        k: v for k, v in there.metrics.items() if k not in timings
    }
    assert here.arrays.keys() == there.arrays.keys()
    assert all(np.array_equal(here.arrays[k], there.arrays[k]) for k in here.arrays)
    saved = sorted((tmp_path / "there").rglob("round-2.safetensors"))
    assert len(saved) == 1  # the worker kept the client's state where the ClientApp would
