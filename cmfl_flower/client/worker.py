"""A node's long-lived worker: one process runs the node's rounds and keeps its models loaded.

In a deployment every message starts a fresh ClientApp process, which imports torch and the
method's libraries and loads its models again before it does any work (``benchmarks/
deployment.py`` measures what that adds to a round). With ``worker-idle-seconds = S`` (S > 0)
in the SuperNode's node config, the ClientApp hands each round to a worker process on the same
node instead, and imports nothing heavy itself:

- the first message starts the worker (``python -m cmfl_flower.client.worker``, detached from
  the ClientApp's session) and later ones reach it over a Unix socket in
  ``<cache>/workers/`` (:func:`cmfl_flower.paths.cache_root`), a folder only its user may open;
- a worker serves one node and one code version: the socket's name carries the node id and a
  hash of the package's sources, the plug-in method's file, the interpreter and the
  environment variables that steer loading (``CMFL_``, ``HF_``, ``CUDA_``, ...), so a new app
  version starts a new worker and the old one idles out;
- it runs one round at a time (:func:`run_here`, the same routine as in process) and exits
  after ``S`` seconds without a message, holding its models (and GPU memory) until then;
- what crosses the socket is JSON and numpy's ``npz`` read with ``allow_pickle=False``: no
  pickled object is ever loaded;
- a worker that cannot be started or reached, or that dies before it answers, costs a warning
  naming its log (``<cache>/workers/<name>.log``), and the round runs in the ClientApp process;
- the log is bounded: once it passes :data:`LOG_BYTES`, the worker moves it to ``<name>.log.1``
  (replacing the one before) before its next round and writes a fresh one.

An error in the round itself is not retried: a ``ValueError`` (a user mistake) comes back as a
``ValueError`` with the same message, anything else as a ``RuntimeError`` naming the log.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import hashlib
import importlib.util
import io
import json
import logging
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cmfl_flower.aliases import Arrays, Metrics
from cmfl_flower.client.task import ClientTask, RoundOutput
from cmfl_flower.config import AppConfig
from cmfl_flower.paths import cache_root

NODE_KEY = "worker-idle-seconds"
Kind = Literal["train", "evaluate"]
START_SECONDS = 60.0  # how long a new worker may take to open its socket
MAX_SOCKET_PATH = 107  # bytes of a Unix socket's path (Linux: 108 with the final NUL)
_HEADER = "header"  # the npz entry holding a frame's JSON
_ARRAY = "array."  # prefix of a frame's arrays
_LENGTH = struct.Struct(">Q")
LOG_BYTES = 8 << 20  # a worker's log past this size moves to <name>.log.1 before the next round
LOGGER = logging.getLogger(__name__)
_ENV_PREFIXES = ("CMFL_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "DIFFUSERS_", "CUDA_", "XDG_")


class WorkerUnavailableError(Exception):
    """The worker could not be started or reached, or it died before it answered."""


@dataclasses.dataclass(frozen=True)
class Request:
    """One message's round, as the worker needs it: plain values and arrays only."""

    kind: Kind
    method: str
    cfg: AppConfig
    task: ClientTask
    node_id: int
    node_config: Mapping[str, Any]
    received: Arrays


def idle_seconds(node_config: Mapping[str, Any]) -> int:
    """The node config's ``worker-idle-seconds`` (0, the default: no worker)."""
    value = node_config.get(NODE_KEY, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(
            f"node config {NODE_KEY} must be a whole number of seconds >= 0 (0: no worker), "
            f"got {value!r}"
        )
    return value


def run(request: Request) -> RoundOutput:
    """The round, in the node's worker when its node config asks for one, else here."""
    idle = idle_seconds(request.node_config)
    if not idle:
        return run_here(request)
    try:
        return _ask(socket_path(request.method, request.node_id), idle, request)
    except WorkerUnavailableError as err:
        LOGGER.warning("node worker: %s; this round runs in the ClientApp process", err)
        return run_here(request)


def run_here(request: Request) -> RoundOutput:
    """The round in this process: pin torch's threads, then the method's routine."""
    from cmfl_flower.client.store import train_with_state  # torch: only where the work runs
    from cmfl_flower.methods import resolve_method
    from cmfl_flower.threads import pin_threads

    method = resolve_method(request.method)
    pin_threads(request.cfg.backbone.threads, request.node_config)
    if request.kind == "train":
        return train_with_state(
            method.train, request.cfg, request.task, request.node_id, request.received
        )
    if method.evaluate is None:
        raise ValueError(
            f"method {method.name!r} does not answer evaluate messages: "
            "set federation.fraction-evaluate = 0"
        )
    return RoundOutput(method.evaluate(request.cfg, request.task, request.received))


def socket_path(method: str, node_id: int) -> Path:
    """The socket of the worker for this node and code version, in a folder only we can open."""
    folder = cache_root() / "workers"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = folder.stat()
    if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
        raise WorkerUnavailableError(
            f"{folder} must belong to this user and be closed to others (chmod 700)"
        )
    path = folder / f"{node_id % 10**8}-{code_version(method)}.sock"
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise WorkerUnavailableError(f"the socket path {path} is longer than a Unix socket allows")
    return path


def code_version(method: str) -> str:
    """12 hex digits of a hash of what the worker runs (see the module)."""
    digest = hashlib.sha256(sys.executable.encode())
    package = Path(__file__).resolve().parents[1]
    files = sorted(package.rglob("*.py"))
    module = method.partition(":")[0] if ":" in method else ""
    spec = importlib.util.find_spec(module) if module else None
    if spec is not None and spec.origin:
        files.append(Path(spec.origin))
    for path in files:
        digest.update(str(path).encode() + b"\0" + path.read_bytes())
    for key in sorted(os.environ):
        if key.startswith(_ENV_PREFIXES):
            digest.update(f"{key}={os.environ[key]}\0".encode())
    return digest.hexdigest()[:12]


def _ask(path: Path, idle: int, request: Request) -> RoundOutput:
    """Send ``request`` to the worker at ``path`` (started if absent); its answer."""
    with _spawn_lock(path):
        connection = _connect(path) or _start(path, idle)
    with connection:
        try:
            _send(connection, encode_request(request))
            answer = _receive(connection)
        except OSError as err:
            raise WorkerUnavailableError(f"{path.name}: {err}; its log: {_log(path)}") from None
    if answer is None:
        raise WorkerUnavailableError(f"{path.name} ended before it answered: {_log(path)}")
    return _decode_answer(answer, path)


@contextmanager
def _spawn_lock(path: Path) -> Iterator[None]:
    """Hold the node's lock file while finding or starting its worker (one start at a time)."""
    with path.with_suffix(".lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _connect(path: Path, remove_stale: bool = True) -> socket.socket | None:
    """A connection to a live worker at ``path``, or ``None``.

    With ``remove_stale``, a socket nobody listens on (its worker died) is removed; a worker
    being started may have bound its socket before it listens, so its starter keeps it.
    """
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        client.close()
        if remove_stale:
            path.unlink(missing_ok=True)
        return None
    return client


def _start(path: Path, idle: int) -> socket.socket:
    """Start a worker for ``path`` and connect to it, or raise :class:`WorkerUnavailableError`."""
    # the ClientApp's import path (the installed app bundle first), from a folder of no modules
    env = os.environ | {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    command = [sys.executable, "-m", __name__, "--socket", str(path), "--idle", str(idle)]
    with _log(path).open("ab") as log_file:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            env=env, cwd=path.parent, start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise WorkerUnavailableError(f"{path.name} exited at start; its log: {_log(path)}")
        if path.exists() and (connection := _connect(path, remove_stale=False)) is not None:
            return connection
        time.sleep(0.05)
    process.kill()
    raise WorkerUnavailableError(f"{path.name} did not open its socket in {START_SECONDS:.0f} s")


def _log(path: Path) -> Path:
    return path.with_suffix(".log")


def rotate_log(log: Path, limit: int = LOG_BYTES, fds: tuple[int, ...] = (1, 2)) -> bool:
    """Move ``log`` to ``<log>.1`` once it passes ``limit`` bytes; ``fds`` then write a new one.

    ``fds``: the descriptors that write the log (the worker's stdout and stderr). True if moved.
    """
    try:
        if log.stat().st_size <= limit:
            return False
    except FileNotFoundError:
        return False
    sys.stdout.flush()
    sys.stderr.flush()
    log.replace(log.with_name(log.name + ".1"))
    fresh = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    for fd in fds:
        os.dup2(fresh, fd)
    os.close(fresh)
    return True


def pid_file(path: Path) -> Path:
    """Where the worker of socket ``path`` writes its process id while it serves."""
    return path.with_suffix(".pid")


def _send(connection: socket.socket, payload: bytes) -> None:
    connection.sendall(_LENGTH.pack(len(payload)) + payload)


def _receive(connection: socket.socket) -> bytes | None:
    """One length-prefixed frame, or ``None`` if the peer closed before sending it whole."""
    head = _read_exactly(connection, _LENGTH.size)
    return None if head is None else _read_exactly(connection, _LENGTH.unpack(head)[0])


def _read_exactly(connection: socket.socket, size: int) -> bytes | None:
    chunks, left = [], size
    while left:
        chunk = connection.recv(min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def pack(header: Mapping[str, Any], arrays: Arrays) -> bytes:
    """A frame: ``header`` as JSON and ``arrays`` in one npz (no pickled objects)."""
    buffer = io.BytesIO()
    text = np.frombuffer(json.dumps(header, default=_plain).encode(), dtype=np.uint8)
    entries: dict[str, Any] = {_HEADER: text} | {_ARRAY + k: v for k, v in arrays.items()}
    np.savez(buffer, **entries)
    return buffer.getvalue()


def _plain(value: Any) -> Any:
    """A numpy scalar in a header (a metric) as the Python number it holds."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} cannot be sent to or from a node worker")


def unpack(payload: bytes) -> tuple[dict[str, Any], Arrays]:
    """A frame's header and arrays; a pickled array raises ``ValueError``."""
    with np.load(io.BytesIO(payload), allow_pickle=False) as frame:
        header = json.loads(frame[_HEADER].tobytes().decode())
        arrays = {k[len(_ARRAY) :]: frame[k] for k in frame.files if k.startswith(_ARRAY)}
    return header, arrays


def encode_request(request: Request) -> bytes:
    """The frame of ``request`` (:func:`decode_request` reads it back)."""
    header = {
        "kind": request.kind,
        "method": request.method,
        "run_config": request.cfg.to_run_config(),
        "task": dataclasses.asdict(request.task),
        "node_id": request.node_id,
        "node_config": dict(request.node_config),
    }
    return pack(header, request.received)


def decode_request(payload: bytes) -> Request:
    """The :class:`Request` a frame holds."""
    header, arrays = unpack(payload)
    return Request(
        kind=header["kind"],
        method=header["method"],
        cfg=AppConfig.from_run_config(header["run_config"]),
        task=ClientTask(**header["task"]),
        node_id=header["node_id"],
        node_config=header["node_config"],
        received=arrays,
    )


def encode_answer(output: RoundOutput) -> bytes:
    """The worker's answer: the round's metrics and arrays."""
    return pack({"metrics": output.metrics}, output.arrays)


def encode_error(error: Exception) -> bytes:
    """The worker's answer when the round raised: the error's type and message."""
    kind = "ValueError" if isinstance(error, ValueError) else type(error).__name__
    return pack({"error": kind, "message": str(error)}, {})


def _decode_answer(payload: bytes, path: Path) -> RoundOutput:
    header, arrays = unpack(payload)
    if "error" in header:
        if header["error"] == "ValueError":
            raise ValueError(header["message"])
        raise RuntimeError(f"node worker: {header['error']}: {header['message']} ({_log(path)})")
    metrics: Metrics = header["metrics"]
    return RoundOutput(metrics=metrics, arrays=arrays)


def serve(path: Path, idle: float) -> None:
    """Answer requests at ``path`` one at a time until ``idle`` seconds pass without one."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    path.chmod(0o600)
    server.listen(16)
    server.settimeout(idle)
    pid_file(path).write_text(f"{os.getpid()}\n")
    try:
        while True:
            try:
                connection, _ = server.accept()
            except TimeoutError:
                break
            rotate_log(_log(path))
            _answer(connection)
        path.unlink(missing_ok=True)  # no new client can connect from here on
        server.setblocking(False)
        while True:  # those that connected before the socket went
            try:
                connection, _ = server.accept()
            except BlockingIOError:
                break
            _answer(connection)
    finally:
        server.close()
        path.unlink(missing_ok=True)
        pid_file(path).unlink(missing_ok=True)


def _answer(connection: socket.socket) -> None:
    """Read one request from ``connection``, run it, send the answer (or the error)."""
    with connection:
        connection.setblocking(True)
        payload = _receive(connection)
        if payload is None:
            return
        started = time.monotonic()
        try:
            request = decode_request(payload)
            answer = encode_answer(run_here(request))
            print(f"{request.kind} round {request.task.server_round}: "
                  f"{time.monotonic() - started:.1f} s", flush=True)  # fmt: skip
        except Exception as err:  # every error goes back to the ClientApp that asked
            print(f"error: {type(err).__name__}: {err}", flush=True)
            answer = encode_error(err)
        try:
            _send(connection, answer)
        except OSError as err:  # the ClientApp went away: it ran the round itself
            print(f"answer not delivered: {err}", flush=True)


def main(argv: list[str] | None = None) -> None:
    """``python -m cmfl_flower.client.worker --socket PATH --idle SECONDS``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--idle", type=float, required=True)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stopped: remove the socket first
    print(f"worker {os.getpid()} serving {args.socket}, idle limit {args.idle:g} s", flush=True)
    serve(args.socket, args.idle)


if __name__ == "__main__":
    main()
