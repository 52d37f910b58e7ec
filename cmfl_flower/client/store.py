"""A client's state between rounds, on the node's disk, so that it survives a restarted run.

A restarted ``flwr run`` is a new Flower run with an empty ``context.state``; what a client
learned (vision LoRA, class tokens) is therefore kept in files, in the client's folder of the
run directory on its own node (where its pictures go, :func:`cmfl_flower.paths.client_dir`)::

    <output root>/<run name>/clients/partition-<i>/state/node-<id>/round-<r>.safetensors

``<output root>`` is the node's ``output.dir`` (as for run directories) and ``<run name>`` the
resolved ``output.run-name`` the server sends with every message. Each file holds the state
*after* round ``r`` (``lora/<key>``, ``tokens/<key>``, ``optimizer/<key>`` and
``screening/<key>`` tensors: a diffusion client's AdamW state, and the text features of the
relayed sets a receiver accepted, its screening history), written to a temporary file and
renamed into place.
Every node writes only its own ``node-<id>`` folder, so two SuperNodes on one host started
with the same partition id never overwrite each other's state (the server refuses the second
one's replies). Round ``r`` starts from the newest file of a
round before ``r`` in any of the partition's folders, the node's own on a tie: a node restarted
under a new node id rejoins from what it saved, and a round repeated after a resume starts
where it first started. The two newest rounds of a folder are kept, and saving round ``r``
removes files of later rounds (left by a run of the same name that got further).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cmfl_flower.aliases import Arrays
from cmfl_flower.client.task import ClientRoutine, ClientState, ClientTask, RoundOutput
from cmfl_flower.config import AppConfig
from cmfl_flower.paths import STATE_DIR, client_dir, output_root

FIELDS = ("lora", "tokens", "optimizer", "screening", "replay")
NODE_PREFIX = "node-"
KEEP_ROUNDS = 2
_FILE = re.compile(r"^round-(\d+)\.safetensors$")


def state_dir(cfg: AppConfig, partition_id: int) -> Path:
    """Where the state of ``partition_id`` in this cmfl run lives on this node."""
    if not cfg.output.run_name:
        raise ValueError("output.run-name is empty: the server sends the resolved run name")
    return client_dir(output_root(cfg.output) / cfg.output.run_name, partition_id) / STATE_DIR


def _saved(directory: Path) -> list[tuple[int, Path]]:
    """(round, file) of every saved state of the partition, over all its nodes' folders."""
    if not directory.is_dir():
        return []
    found = []
    for node_dir in directory.glob(f"{NODE_PREFIX}*"):
        for path in node_dir.iterdir():
            if match := _FILE.match(path.name):
                found.append((int(match[1]), path))
    return found


def newest_saved(directory: Path, server_round: int, node_id: int | None = None) -> Path | None:
    """The file of the newest round before ``server_round``; ``node_id``'s own wins a tie.

    Another node's file is taken when it is newer: the same partition restarted under a new
    node id rejoins from what it saved before.
    """
    own = directory / f"{NODE_PREFIX}{node_id}"
    earlier = [(r, path.parent == own, path) for r, path in _saved(directory) if r < server_round]
    return max(earlier, key=lambda item: item[:2])[2] if earlier else None


def saved_round(path: Path | None) -> int:
    """The round a state file was saved after (0: no file, a fresh start)."""
    match = _FILE.match(path.name) if path is not None else None
    return int(match[1]) if match else 0


def load_state(directory: Path, server_round: int, node_id: int | None = None) -> ClientState:
    """The partition's state after the newest saved round before ``server_round`` (or empty)."""
    return read_state(newest_saved(directory, server_round, node_id))


def read_state(path: Path | None) -> ClientState:
    """The state saved in ``path`` (empty for ``None``)."""
    if path is None:
        return ClientState()
    flat = load_file(str(path))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        field, _, name = key.partition("/")
        parts.setdefault(field, {})[name] = tensor
    return ClientState(**{field: parts[field] for field in FIELDS if field in parts})


def save_state(directory: Path, state: ClientState, server_round: int, node_id: int) -> Path:
    """Write the state after ``server_round`` into ``node_id``'s own folder, atomically.

    Older rounds of that folder beyond :data:`KEEP_ROUNDS` go, and so do later rounds in every
    folder of the partition (left by a run of the same name that got further).
    """
    own = directory / f"{NODE_PREFIX}{node_id}"
    own.mkdir(parents=True, exist_ok=True)
    flat = {
        f"{field}/{name}": tensor.detach().cpu().contiguous()
        for field in FIELDS
        for name, tensor in (getattr(state, field) or {}).items()
    }
    target = own / f"round-{server_round}.safetensors"
    tmp = own / f".{target.name}.tmp"
    save_file(flat, str(tmp))
    tmp.replace(target)
    saved = _saved(directory)
    stale = [path for r, path in saved if r > server_round]
    mine = sorted((r, path) for r, path in saved if path.parent == own and r <= server_round)
    stale += [path for _, path in mine[:-KEEP_ROUNDS]]
    for path in stale:
        path.unlink(missing_ok=True)
    return target


def train_with_state(
    routine: ClientRoutine, cfg: AppConfig, task: ClientTask, node_id: int, received: Arrays
) -> RoundOutput:
    """One round of ``routine`` from the partition's saved state; save what it returns.

    The reply's ``state-round`` says which round's state it started from (0: none).
    """
    directory = state_dir(cfg, task.partition_id)
    start = newest_saved(directory, task.server_round, node_id)
    output = routine(cfg, task, read_state(start), received)
    save_state(directory, output.state, task.server_round, node_id)
    output.metrics["state-round"] = saved_round(start)
    return output
