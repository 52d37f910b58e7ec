"""Benchmarks: each prints its figures next to a reference measured in the same run."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def settings_record(args: argparse.Namespace) -> dict[str, Any]:
    """A run's arguments as its results file keeps them: paths inside the repository relative."""

    def portable(value: Any) -> Any:
        if not isinstance(value, Path):
            return value
        return str(value.relative_to(ROOT)) if value.is_relative_to(ROOT) else str(value)

    return {key: portable(value) for key, value in vars(args).items()}


def commit() -> str:
    """The checkout's commit (with ``+dirty`` when files differ from it)."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True)
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


# the packages whose versions move a figure: a fresh install may resolve newer ones
PACKAGES = (
    "torch",
    "numpy",
    "diffusers",
    "transformers",
    "open_clip_torch",
    "peft",
    "flwr",
    "scikit-learn",
)


def versions() -> dict[str, str]:
    """Python's and :data:`PACKAGES`' versions in this environment ("missing" if absent)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "missing"
    return found


def machine() -> dict[str, Any]:
    """What a figure was measured on: processor, CPUs this process may use, load, GPU."""
    import torch

    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return {
        "cpu": names[0] if names else platform.processor() or platform.machine(),
        "cpus": len(os.sched_getaffinity(0)),
        "torch-threads": torch.get_num_threads(),
        "load-average": [round(x, 2) for x in os.getloadavg()],
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def command() -> str:
    """The command line that runs this process, as a user would type it (``python -m ...``)."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    if spec is not None:
        return shlex.join(["python", "-m", spec.name, *sys.argv[1:]])
    return shlex.join(sys.argv)


def store(path: Path, tag: str, figures: dict[str, Any], code: str) -> None:
    """Keep ``figures`` under ``tag`` in the JSON results file ``path``.

    With the command as it ran, the commit ``code`` (taken when the run started) and the machine.
    """
    stored = json.loads(path.read_text()) if path.exists() else {}
    stored[tag] = {
        "command": command(),
        "commit": code,
        "machine": machine(),
        "versions": versions(),
        **figures,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stored, indent=1) + "\n")


def stored_results(path: Path) -> dict[str, Any]:
    """The records a results file holds, for ``--show``; exits naming the file if it is missing."""
    if not path.is_file():
        raise SystemExit(f"--show: no {path}; run the benchmark first")
    records: dict[str, Any] = json.loads(path.read_text())
    return records


def record_line(tag: str, record: dict[str, Any]) -> str:
    """One line naming a stored record: its tag, the command that measured it and its commit."""
    if "command" not in record:
        return f"{tag}: recorded before results kept their command and commit"
    code = str(record["commit"])
    short = code[:12] + ("+dirty" if code.endswith("+dirty") else "")
    return f"{tag}: `{record['command']}` at {short}"


def show_records(path: Path, render: Callable[[str, dict[str, Any]], list[str]]) -> None:
    """``--show``: each record of the results file ``path``, named, then as ``render`` prints it."""
    for tag, record in stored_results(path).items():
        print(record_line(tag, record))
        print("\n".join(render(tag, record)))


def pinned_worker(threads: int) -> None:
    """Set up a benchmark's pool worker: ``threads`` torch threads, and gone with its parent.

    A pool's workers outlive a benchmark process that is killed (they are reparented and run
    their queued jobs on); this one checks its parent every few seconds and exits once it is
    gone, so that stopping a benchmark stops its runs.
    """
    import torch

    torch.set_num_threads(threads)
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(5)
        os._exit(1)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()
