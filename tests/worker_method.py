"""A plug-in method for the node worker's tests: it reports which process ran it, and how often.

``method = "tests.worker_method:WHO_RAN"``. A file named in ``CMFL_TEST_STOP_WORKER`` makes a
worker process (not the test's own) exit in the middle of a round, as a crashed worker would;
``fail = "value"`` or ``"runtime"`` in the server config makes the round raise.
"""

from __future__ import annotations

import os
from pathlib import Path

from cmfl_flower.client.task import Arrays, ClientState, ClientTask, RoundOutput
from cmfl_flower.config import AppConfig
from cmfl_flower.methods.base import Method

STOP = "CMFL_TEST_STOP_WORKER"
TEST_PID = "CMFL_TEST_PID"  # the test process, which never stops itself
_calls = 0


def _train(cfg: AppConfig, task: ClientTask, state: ClientState, received: Arrays) -> RoundOutput:
    global _calls
    _calls += 1
    stop = Path(os.environ.get(STOP, "/nonexistent"))
    if stop.exists() and str(os.getpid()) != os.environ.get(TEST_PID):
        stop.unlink()
        os._exit(3)
    fail = task.server_config.get("fail")
    if fail == "value":
        raise ValueError("data.bogus is not a key")
    if fail == "runtime":
        raise RuntimeError("out of memory")
    metrics = {"pid": os.getpid(), "calls": _calls, "round": task.server_round}
    return RoundOutput(metrics, arrays={key: 2 * value for key, value in received.items()})


WHO_RAN = Method(name="who-ran", train=_train, initial_arrays=lambda cfg, run_dir: {})
