"""Start and stop Flower processes for end-to-end tests, each with its own ports and home.

Every process is started in its own session and stopped by PID (its whole process group),
also when the test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class SuperLink:
    address: str  # host:port of the SuperLink's HTTP API (Control, Fleet and runtime)
    env: dict[str, str]  # environment for `flwr` commands against this SuperLink
    connection: str  # name of the SuperLink connection in FLWR_HOME/config.toml
    log: Path


def flower_env(home: Path) -> dict[str, str]:
    return {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def stop(process: subprocess.Popen[bytes]) -> None:
    """Stop ``process``, its process group and every descendant, by PID."""
    try:
        descendants = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)
    with contextlib.suppress(ProcessLookupError):  # children that outlived the leader
        os.killpg(process.pid, signal.SIGKILL)
    for child in descendants:  # e.g. simulation runtimes started in sessions of their own
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(descendants, timeout=15)


def _wait_for_port(address: str, process: subprocess.Popen[bytes], log: Path) -> None:
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"SuperLink exited early:\n{log.read_text()[-3000:]}")
        with socket.socket() as sock:
            if sock.connect_ex((host, int(port))) == 0:
                return
        time.sleep(0.3)
    raise RuntimeError(f"SuperLink did not open {address}:\n{log.read_text()[-3000:]}")


@contextmanager
def simulation_superlink(tmp: Path) -> Iterator[SuperLink]:
    """A SuperLink in simulation mode on free loopback ports, with a Flower config for it."""
    home = tmp / "flwr-home"
    home.mkdir(parents=True)
    env = flower_env(home)
    port = free_port()
    address = f"127.0.0.1:{port}"
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "e2e"\n\n[superlink.e2e]\naddress = "{address}"\ninsecure = true\n'
    )
    log = tmp / "superlink.log"
    command = [
        str(BIN / "flower-superlink"),
        "--insecure",
        "--simulation",
        "--isolation", "subprocess",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--database", str(tmp / "state.db"),
        "--disable-runtime-dependency-installation",
    ]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        _wait_for_port(address, process, log)
        yield SuperLink(address, env, "e2e", log)
    finally:
        stop(process)


def flwr(link: SuperLink, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run the `flwr` CLI against ``link``."""
    return subprocess.run(
        [str(BIN / "flwr"), *args],
        env=link.env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_status(link: SuperLink, run_id: int) -> str:
    """The status of ``run_id`` as `flwr ls --format json` reports it."""
    listing = flwr(link, "ls", link.connection, "--run-id", str(run_id), "--format", "json")
    payload = json.loads(listing.stdout)
    runs = payload.get("runs", [])
    if not runs:
        raise AssertionError(f"run {run_id} not listed: {listing.stdout} {listing.stderr}")
    return str(runs[0]["status"])
