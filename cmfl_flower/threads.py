"""How many torch threads a client process uses: the CPUs it was given, never more than are idle.

The CPUs a client is *given*, first match wins:

1. ``backbone.threads`` in the run config, when it is not 0 (taken as is, nothing is capped);
2. ``num-cpus`` in the node config (a deployment: ``--node-config "... num-cpus=2"``);
3. ``OMP_NUM_THREADS``, which Ray sets in every simulated ClientApp's actor to the
   simulation's ``client-resources-num-cpus`` (``flwr run ... --federation-config
   "client-resources-num-cpus=1"``);
4. the CPUs this process may run on (its affinity mask).

Of those, a client uses no more than are idle when its message starts (measured from
``/proc/stat`` over :data:`SAMPLE_SECONDS`, Linux only; not measured for a client given one).
Torch's intra-op threads wait for each other at every operator; one of them descheduled by a
busy neighbour process stalls them all, which made tiny convolutions about 4x slower on the
shared 2-core machine (``benchmarks/``).
"""

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

NODE_KEY = "num-cpus"
SAMPLE_SECONDS = 0.2
_PROC_STAT = Path("/proc/stat")


def given_cpus(node_config: Mapping[str, Any]) -> int:
    """The CPUs this client was given by its node config, its simulation actor or its mask."""
    if NODE_KEY in node_config:
        value = node_config[NODE_KEY]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"node config {NODE_KEY} must be a positive integer, got {value!r}")
        return value
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    return len(os.sched_getaffinity(0))


def _busy_and_total(cpus: set[int]) -> tuple[int, int] | None:
    """Summed non-idle and total jiffies of ``cpus`` so far (``None`` without ``/proc/stat``)."""
    try:
        lines = _PROC_STAT.read_text().splitlines()
    except OSError:
        return None
    busy = total = 0
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        ticks = [int(field) for field in fields[:8]]  # user nice system idle iowait irq soft steal
        total += sum(ticks)
        busy += sum(ticks) - ticks[3] - ticks[4]
    return busy, total


def idle_cpus(cpus: set[int], seconds: float = SAMPLE_SECONDS) -> float | None:
    """How many of ``cpus`` were idle over the next ``seconds`` (``None`` where unknown)."""
    before = _busy_and_total(cpus)
    time.sleep(seconds)
    after = _busy_and_total(cpus)
    if before is None or after is None or after[1] <= before[1]:
        return None
    busy = (after[0] - before[0]) / (after[1] - before[1])  # share of the CPUs' time
    return (1.0 - busy) * len(cpus)


def client_threads(configured: int, node_config: Mapping[str, Any]) -> int:
    """Torch threads for this message: ``configured`` if set, else given CPUs capped by idle."""
    if configured:
        return configured
    given = given_cpus(node_config)
    if given == 1:  # nothing to cap: spare the message the sampling
        return 1
    idle = idle_cpus(set(os.sched_getaffinity(0)))
    if idle is None:
        return given
    return max(1, min(given, round(idle)))


def pin_threads(configured: int, node_config: Mapping[str, Any]) -> int:
    """Set torch's intra-op threads for this message; return the number set."""
    threads = client_threads(configured, node_config)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads
