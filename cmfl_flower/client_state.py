"""A client's state between rounds, on the node's disk, so that it survives a restarted run.

A restarted ``flwr run`` is a new Flower run with an empty ``context.state``; what a client
learned (vision LoRA, class tokens) is therefore kept in files, in the client's folder of the
run directory on its own node (where its pictures go, :func:`cmfl_flower.paths.client_dir`)::

    <output root>/<run name>/clients/partition-<i>/state/round-<r>.safetensors

``<output root>`` is the node's ``output.dir`` (as for run directories) and ``<run name>`` the
resolved ``output.run-name`` the server sends with every message. Each file holds the state
*after* round ``r`` (``lora/<key>`` and ``tokens/<key>`` tensors), written to a temporary file
and renamed into place. Round ``r`` starts from the newest file of a round before ``r``, so a
round repeated after a resume starts where it first started; the two newest rounds are kept,
and saving round ``r`` removes files of later rounds (left by a run of the same name that got
further).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cmfl_flower.config import AppConfig
from cmfl_flower.paths import STATE_DIR, client_dir
from cmfl_flower.results import output_root
from cmfl_flower.workspace import ClientState

FIELDS = ("lora", "tokens")
KEEP_ROUNDS = 2
_FILE = re.compile(r"^round-(\d+)\.safetensors$")


def state_dir(cfg: AppConfig, partition_id: int) -> Path:
    """Where the state of ``partition_id`` in this cmfl run lives on this node."""
    if not cfg.output.run_name:
        raise ValueError("output.run-name is empty: the server sends the resolved run name")
    return client_dir(output_root(cfg.output) / cfg.output.run_name, partition_id) / STATE_DIR


def _saved_rounds(directory: Path) -> list[int]:
    if not directory.is_dir():
        return []
    found = (_FILE.match(path.name) for path in directory.iterdir())
    return sorted(int(match[1]) for match in found if match)


def _file(directory: Path, server_round: int) -> Path:
    return directory / f"round-{server_round}.safetensors"


def load_state(directory: Path, server_round: int) -> ClientState:
    """The state after the newest saved round before ``server_round`` (empty when none)."""
    earlier = [r for r in _saved_rounds(directory) if r < server_round]
    if not earlier:
        return ClientState()
    flat = load_file(str(_file(directory, earlier[-1])))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        field, _, name = key.partition("/")
        parts.setdefault(field, {})[name] = tensor
    return ClientState(**{field: parts[field] for field in FIELDS if field in parts})


def save_state(directory: Path, state: ClientState, server_round: int) -> Path:
    """Write the state after ``server_round`` atomically; prune older and later rounds."""
    directory.mkdir(parents=True, exist_ok=True)
    flat = {
        f"{field}/{name}": tensor.detach().cpu().contiguous()
        for field in FIELDS
        for name, tensor in (getattr(state, field) or {}).items()
    }
    target = _file(directory, server_round)
    tmp = directory / f".{target.name}.tmp"
    save_file(flat, str(tmp))
    tmp.replace(target)
    rounds = _saved_rounds(directory)
    stale = [r for r in rounds if r > server_round]
    stale += [r for r in rounds if r <= server_round][:-KEEP_ROUNDS]
    for old in stale:
        _file(directory, old).unlink(missing_ok=True)
    return target
