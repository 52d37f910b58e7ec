"""``cmfl-relay``, the method: the server relays learned class-token vectors between clients.

Server: every round the sampled clients receive the latest vectors of every *other* client
(record ``arrays``, packed as :mod:`cmfl_flower.wire` says); replies are validated against the
wire limits (the norm bound included) and kept as their sender's latest. From the receivers'
screening reports (``judged-s<id>``, ``rejected-s<id>``) it quarantines a sender that most of
the receivers that judged it (at least two, never the sender itself) rejected, a receiver
rejecting a sender when it screened out more than half of that sender's sets: its vectors are
not relayed for ``screening.quarantine-rounds`` rounds, twice as long at each repeat. Client
(:func:`relay_round`): generate images from the received vectors, screen them, update the
vision LoRA, train its own vectors and send those back.
Only vectors and scalar metrics leave a client: no image, image feature or weight.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import replace
from logging import WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common.logger import log

from cmfl_flower.aliases import Arrays, Metrics
from cmfl_flower.backbones import pretrained_token_norm, resolve_preset
from cmfl_flower.client.task import ClientState, ClientTask, RoundOutput
from cmfl_flower.config import AppConfig
from cmfl_flower.data.sources import CLASS_COUNTS
from cmfl_flower.knowledge import max_sets, norm_bound
from cmfl_flower.methods.base import Method, RoundStrategy
from cmfl_flower.privacy import round_report
from cmfl_flower.token_round import token_round
from cmfl_flower.wire import (
    TokenEntry,
    WireError,
    WireLimits,
    parse_relay,
    parse_reply,
    relay_arrays,
)

UNKNOWN = 2**31 - 1  # class count of a local folder without data.classes: clients check ids
_VOTE = re.compile(r"^(judged|rejected)-s(\d+)$")  # a receiver's screening report on one sender


class CmflRelay(RoundStrategy):
    """Relay each client's latest class tokens to the other sampled clients."""

    def __init__(self, cfg: AppConfig, run_dir: Path) -> None:
        super().__init__(cfg, run_dir)
        self.latest: dict[int, list[TokenEntry]] = {}  # sender partition id -> its vectors
        self.updated: dict[int, int] = {}  # sender partition id -> round of its latest vectors
        self.partitions: dict[int, int] = {}  # node id -> partition id
        self._max_vectors = 0  # most class vectors in one accepted reply this round
        self._checked: dict[int, list[TokenEntry]] = {}  # partition -> its vectors, parsed once
        self.labelled = cfg.tokens.relay == "labelled"
        preset = resolve_preset(cfg.backbone)
        self.limits = WireLimits(
            token_dim=preset.token_dim,
            num_classes=len(cfg.data.class_list) or CLASS_COUNTS.get(cfg.data.dataset, UNKNOWN),
            max_tokens=cfg.tokens.max_tokens,
            max_bytes=cfg.tokens.max_bytes,
            max_norm=norm_bound(cfg, pretrained_token_norm(preset), preset.token_dim),
            max_sets=max_sets(cfg),
        )
        self.quarantine: dict[int, int] = {}  # sender partition id -> last round it is held
        self.offences: dict[int, int] = {}  # sender partition id -> times it was quarantined
        self._votes: dict[int, tuple[set[int], set[int]]] = {}  # sender -> (judges, rejecters)

    def arrays_for(self, server_round: int, node_id: int) -> Arrays:
        """Other senders' latest vectors: at most ``relay.max-senders-per-class`` per class.

        A chosen (sender, class) travels with its cluster sets (``tokens.clusters``).
        """
        own = self.partitions.get(node_id)
        entries = [
            entry
            for sender, sent in sorted(self.latest.items())
            if sender != own and self.quarantine.get(sender, 0) < server_round
            for entry in sent
        ]
        relay = self.cfg.relay
        chosen = cap_senders(
            [entry for entry in entries if entry.set == 0],
            self.updated,
            server_round,
            relay.max_senders_per_class,
            self.cfg.seed,
        )
        pairs = {entry.pair for entry in chosen}
        sets = [entry for entry in entries if entry.set and entry.pair in pairs]
        return relay_arrays((class_means(chosen) if relay.combine == "mean" else chosen) + sets)

    def check_reply(self, server_round: int, metrics: Metrics, arrays: Arrays) -> str | None:
        """A reply must name its partition and carry vectors within the wire limits."""
        partition = metrics.get("partition-id")
        if not isinstance(partition, int) or partition < 0:
            return f"metrics: 'partition-id' missing or invalid: {partition!r}"
        try:
            entries = parse_reply(arrays, self.limits, self.labelled)
        except WireError as err:
            return str(err)
        self._checked[partition] = [
            TokenEntry(partition, entry.class_id, entry.vectors, entry.set) for entry in entries
        ]
        return None

    def absorb(self, server_round: int, node_id: int, metrics: Metrics, arrays: Arrays) -> None:
        """Keep the reply's vectors (parsed by :meth:`check_reply`) as the sender's latest."""
        partition = int(metrics["partition-id"])
        self.partitions[node_id] = partition
        self.latest[partition] = self._checked.pop(partition)
        self.updated[partition] = server_round
        self._max_vectors = max(self._max_vectors, len(self.latest[partition]))
        self._count_votes(partition, metrics)

    def _count_votes(self, receiver: int, metrics: Metrics) -> None:
        """Note whom ``receiver`` judged and whom it rejected (more than half of its sets).

        More than half, so that one misjudged set of an honest sender's two does not count
        against the sender's other classes.
        """
        counts: dict[int, dict[str, float]] = {}
        for key, value in metrics.items():
            if (match := _VOTE.match(key)) and int(match[2]) != receiver:  # never its own
                counts.setdefault(int(match[2]), {})[match[1]] = float(value)
        for sender, count in counts.items():
            judges, rejecters = self._votes.setdefault(sender, (set(), set()))
            if count.get("judged", 0) > 0:
                judges.add(receiver)
                if count.get("rejected", 0) * 2 > count["judged"]:
                    rejecters.add(receiver)

    def _update_quarantine(self, server_round: int) -> list[int]:
        """Quarantine the senders most of their judges rejected (at least two); the new ones.

        The ``n``-th quarantine of a sender lasts ``screening.quarantine-rounds`` times
        ``2 ** (n - 1)`` rounds: a sender that lies again after its release is held longer.
        """
        rounds, new = self.cfg.screening.quarantine_rounds, []
        for sender, (judges, rejecters) in sorted(self._votes.items()):
            if rounds and len(rejecters) >= 2 and 2 * len(rejecters) > len(judges):
                if self.quarantine.get(sender, 0) <= server_round:
                    new.append(sender)
                    self.offences[sender] = self.offences.get(sender, 0) + 1
                term = rounds * 2 ** (self.offences[sender] - 1)
                self.quarantine[sender] = server_round + term
                log(WARNING, "round %d: sender %d quarantined until round %d (quarantine %d): "
                    "screened out by %d of the %d receivers that judged it", server_round,
                    sender, server_round + term, self.offences[sender], len(rejecters),
                    len(judges))  # fmt: skip
        self._votes = {}
        return new

    def round_metrics(self, server_round: int) -> dict[str, Any]:
        """Senders' vectors held, senders quarantined for the next round, (epsilon, delta) under DP.

        ``quarantined``: comma-separated partition ids whose vectors the next round does not
        relay (absent when none).
        """
        self._update_quarantine(server_round)
        report: dict[str, Any] = {"senders-known": len(self.latest)}
        held = sorted(s for s, until in self.quarantine.items() if until > server_round)
        if held:
            report["quarantined"] = ",".join(map(str, held))
        if self.cfg.privacy.enabled:
            report |= round_report(self.cfg.privacy, server_round, self._max_vectors)
        self._max_vectors = 0
        return report

    def state(self) -> tuple[Arrays, dict[str, Any]]:
        """Every sender's latest vectors (relay layout).

        Not the node -> partition map: node ids change when a run restarts. Until a node
        replies again it receives every sender's vectors, and drops its own.
        """
        entries = [entry for _, sent in sorted(self.latest.items()) for entry in sent]
        return relay_arrays(entries), {
            "quarantine": {str(s): r for s, r in self.quarantine.items()},
            "offences": {str(s): n for s, n in self.offences.items()},
        }

    def load_state(self, arrays: Arrays, meta: dict[str, Any]) -> None:
        """Restore the vectors that :meth:`state` saved."""
        self.latest = {}
        self.quarantine = {int(s): int(r) for s, r in meta.get("quarantine", {}).items()}
        self.offences = {int(s): int(n) for s, n in meta.get("offences", {}).items()}
        # the size cap is per message; the norm bound was checked when the vectors arrived
        every_sender = replace(self.limits, max_bytes=sys.maxsize, max_norm=math.inf)
        try:
            entries = parse_relay(arrays, every_sender)
        except WireError as err:
            raise ValueError(
                f"server checkpoint: the saved relay vectors do not read ({err}); a checkpoint "
                "from before the packed wire format cannot resume: start a new run"
            ) from err
        for entry in entries:
            self.latest.setdefault(entry.sender, []).append(entry)


def cap_senders(
    entries: list[TokenEntry], updated: dict[int, int], server_round: int, cap: int, seed: int
) -> list[TokenEntry]:
    """At most ``cap`` senders' vectors per class (``cap`` 0: all of them).

    The senders updated most recently come first; among equals a seeded order rotates by
    ``cap`` places every round, so every sender's vectors travel within ``ceil(n / cap)``
    rounds. Unlabelled entries (no class id) form one group capped at ``cap`` times the most
    vectors one sender sent. The result keeps the entries' order.
    """
    if cap == 0:
        return entries
    groups: dict[int | None, list[int]] = {}  # class id -> indices into entries
    for index, entry in enumerate(entries):
        groups.setdefault(entry.class_id, []).append(index)
    keep: set[int] = set()
    for class_id, indices in groups.items():
        senders = sorted({entries[i].sender for i in indices}, key=lambda s: _mix(s, seed))
        turn = {sender: (place - server_round * cap) % len(senders)
                for place, sender in enumerate(senders)}  # fmt: skip
        ranked = sorted(indices, key=lambda i: (-updated.get(entries[i].sender, 0),
                                                turn[entries[i].sender], i))  # fmt: skip
        keep.update(ranked[: cap * _vectors_per_sender(entries, indices, class_id)])
    return [entry for index, entry in enumerate(entries) if index in keep]


def _mix(sender: int, seed: int) -> int:
    """A seeded, process-independent order of sender ids (Knuth's multiplicative hash)."""
    return ((sender + 1) * 2654435761 + seed * 40503) % 2**32


def _vectors_per_sender(entries: list[TokenEntry], indices: list[int], class_id: int | None) -> int:
    """1 for a class; for the unlabelled group, the most entries one sender has in it."""
    if class_id is not None:
        return 1
    counts: dict[int, int] = {}
    for i in indices:
        counts[entries[i].sender] = counts.get(entries[i].sender, 0) + 1
    return max(counts.values())


def class_means(entries: list[TokenEntry]) -> list[TokenEntry]:
    """One entry per class: the mean of its senders' vectors, under the lowest sender id.

    Vectors of one class share their shape (the tokens of the class name); a class whose
    senders disagree on it keeps its entries as they are.
    """
    groups: dict[int | None, list[TokenEntry]] = {}
    for entry in entries:
        groups.setdefault(entry.class_id, []).append(entry)
    out = []
    for class_id, group in groups.items():
        shapes = {entry.vectors.shape for entry in group}
        if class_id is None or len(group) == 1 or len(shapes) > 1:
            out += group
            continue
        mean = np.mean([entry.vectors for entry in group], axis=0).astype(np.float32)
        out.append(TokenEntry(min(entry.sender for entry in group), class_id, mean))
    return out


def relay_round(
    cfg: AppConfig, task: ClientTask, state: ClientState, received: Arrays
) -> RoundOutput:
    """One CMFL round: generate from peers' tokens, update the encoder, train own tokens."""
    return token_round(cfg, task, state, received, "relay")


RELAY = Method("cmfl-relay", relay_round, strategy=CmflRelay)
