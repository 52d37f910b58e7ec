"""A loopback grid whose nodes each run in a worker process of their own, all at once.

For benchmarks where Flower's simulation engine cannot run (its Ray wheel is too large to carry
to the GPU machine). As a simulation with ``client-resources-num-gpus = 1 / N`` does, every node
gets its own long-lived worker process: the process keeps the node's ``Context`` and whatever
the app keeps per process (one backbone per worker), and all N share the machine's GPU. A
round's messages go to every worker at once; ``push_messages`` returns when all have replied.

With every reply a worker reports the message's wall seconds and its process's peak memory:
``torch.cuda.max_memory_allocated`` on a GPU, and the peak resident set size.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import resource
import time
import traceback
import uuid
from collections.abc import Iterable, Mapping
from multiprocessing.connection import Connection
from typing import Any

from flwr.app import ArrayRecord, Context, Error, Message

from benchmarks.loopback import LoopbackGrid
from cmfl_flower.config import AppConfig


def _peaks() -> dict[str, int]:
    """The process's peak GPU memory allocated by torch (0 without CUDA) and peak RSS."""
    import torch

    gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    return {"peak-gpu-bytes": int(gpu), "peak-rss-bytes": _rss_bytes()}


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def _serve(conn: Connection, context: Context) -> None:
    """A worker: answer each message with the ClientApp's reply, until ``None`` arrives."""
    from flwr.supercore.task_identity import TaskIdentity

    from client_app import app

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, context.node_id, 1
    while (message := conn.recv()) is not None:
        start = time.perf_counter()
        try:
            reply = app(message, context)
        except Exception as err:  # a client that raises answers with an error, as in Flower
            traceback.print_exc()
            reply = Message(Error(code=1, reason=repr(err)), reply_to=message)
        stats = {"seconds": time.perf_counter() - start, **_peaks()}
        conn.send((reply, stats))


class PoolGrid(LoopbackGrid):
    """Each node's ClientApp in a spawned worker process; a round's messages run at once.

    Use it as a context manager: leaving it stops the workers. ``stats[node]`` lists, per
    message, the worker's seconds and peaks; ``round_seconds`` the wall time of every push of
    training messages.
    """

    def __init__(self, run_config: AppConfig | Mapping[str, Any], num_nodes: int) -> None:
        super().__init__(_unused_app, run_config, num_nodes)
        spawn = multiprocessing.get_context("spawn")
        self.conns: dict[int, Connection] = {}
        self.workers: dict[int, Any] = {}
        for node, context in self.contexts.items():
            parent, child = spawn.Pipe()
            worker = spawn.Process(target=_serve, args=(child, context), daemon=True)
            worker.start()
            self.conns[node], self.workers[node] = parent, worker
        self.stats: dict[int, list[dict[str, float]]] = {node: [] for node in self.contexts}
        self.round_seconds: list[float] = []

    def __enter__(self) -> PoolGrid:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop every worker (each finishes the message in hand first)."""
        for node, conn in self.conns.items():
            with contextlib.suppress(BrokenPipeError, OSError):
                conn.send(None)
            self.workers[node].join(timeout=60)
            if self.workers[node].is_alive():
                self.workers[node].kill()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Send every message to its node's worker, then wait for all the replies."""
        batch = list(messages)
        start = time.perf_counter()
        for message in batch:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self.conns[message.metadata.dst_node_id].send(_picklable(message))
        for message in batch:
            node = message.metadata.dst_node_id
            reply, stats = self._receive(node, message)
            reply.metadata.__dict__["_src_node_id"] = node
            self.stats[node].append(stats)
            _print_stats(node, message.metadata.message_type, stats)
            self.waiting[message.metadata.message_id] = reply
        if batch and batch[0].metadata.message_type.startswith("train"):
            self.round_seconds.append(time.perf_counter() - start)
        return [message.metadata.message_id for message in batch]

    def _receive(self, node: int, message: Message) -> tuple[Message, dict[str, float]]:
        """The worker's reply, or an error reply when the worker died."""
        try:
            reply, stats = self.conns[node].recv()
        except EOFError:
            reason = f"worker of node {node} exited with {self.workers[node].exitcode}"
            return Message(Error(code=1, reason=reason), reply_to=message), {}
        return reply, stats


def _print_stats(node: int, message_type: str, stats: dict[str, float]) -> None:
    if stats:
        print(
            f"node {node}: {message_type} in {stats['seconds']:.1f} s, peak GPU "
            f"{stats['peak-gpu-bytes'] / 1024**3:.2f} GiB, peak RSS "
            f"{stats['peak-rss-bytes'] / 1024**3:.2f} GiB",
            flush=True,
        )


def _picklable(message: Message) -> Message:
    """Drop the chunk views Flower caches on an ``Array`` once it was sized (a cache).

    Counting a message's bytes slices every array into ``memoryview`` chunks and keeps them
    in the array's ``__dict__`` (``_chunks``); a memoryview cannot be pickled.
    """
    if message.has_content():
        for record in message.content.values():
            if isinstance(record, ArrayRecord):
                for array in record.values():
                    array.__dict__.pop("_chunks", None)
    return message


def _unused_app(message: Message, context: Context) -> Message:
    """The parent never runs a ClientApp itself; the workers do."""
    raise RuntimeError("PoolGrid delivers messages to its workers")
