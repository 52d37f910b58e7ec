"""What a token round generates from: peers' relayed vectors, or the names of lacking classes.

Relayed vectors are peers' content: :func:`relayed_knowledge` never fails on it. An entry that
breaks a wire rule (:func:`relay_limits`, the same the server checks), or whose denoised
vectors or received mean are not finite, is dropped and counted per rule.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from cmfl_flower.aliases import Arrays
from cmfl_flower.backbones import largest_token_norm
from cmfl_flower.client.workspace import Workspace
from cmfl_flower.config import AppConfig
from cmfl_flower.generation import GenerationRequest
from cmfl_flower.privacy import denoise, norm_allowance
from cmfl_flower.screening import Verdict
from cmfl_flower.tokens import ClassTokenBank
from cmfl_flower.wire import TokenEntry, WireLimits, read_relay


def _received_means(entries: list[TokenEntry], dropped: Counter[str]) -> dict[int, torch.Tensor]:
    """Per class, the mean of the received vectors (over senders with equal token counts).

    A mean that is not finite (float32 overflow) is dropped and counted as ``non-finite-mean``.
    """
    by_class: dict[int, list[np.ndarray]] = {}
    for entry in entries:
        if entry.class_id is not None:
            by_class.setdefault(entry.class_id, []).append(entry.vectors)
    means = {}
    for class_id, arrays in by_class.items():
        same = [a for a in arrays if a.shape == arrays[0].shape]
        mean = np.mean(same, axis=0)  # (n_tokens, D)
        if not np.isfinite(mean).all():
            dropped["non-finite-mean"] += 1
            continue
        means[class_id] = torch.from_numpy(mean)
    return means


def _requests(
    ws: Workspace, entries: list[TokenEntry], sets: list[TokenEntry]
) -> list[GenerationRequest]:
    """Generation requests; unlabelled vectors get the label of their nearest class.

    The nearest class is judged against the pretrained name features, not the client's own
    learned tokens, which would pull received vectors towards its own classes. A (sender,
    class) with cluster ``sets`` draws its images from them.
    """
    device = ws.encoder.bundle.device
    variants: dict[tuple[int, int | None], list[torch.Tensor]] = {}
    for entry in sorted(sets, key=lambda e: e.set):
        variants.setdefault(entry.pair, []).append(torch.from_numpy(entry.vectors).to(device))
    vectors = [torch.from_numpy(entry.vectors).to(device) for entry in entries]
    unlabelled = [i for i, entry in enumerate(entries) if entry.class_id is None]
    nearest: dict[int, int] = {}
    if unlabelled:
        with torch.no_grad():
            features = ws.text.encode([vectors[i] for i in unlabelled])  # (U, E), one batch
        names = ws.name_features()  # (C, E)
        nearest = dict(zip(unlabelled, (features @ names.T).argmax(1).tolist(), strict=True))
    return [
        GenerationRequest(
            entry.sender,
            entry.class_id if entry.class_id is not None else nearest[i],
            vectors[i],
            tuple(variants.get(entry.pair, ())),
        )
        for i, entry in enumerate(entries)
    ]


@dataclass(frozen=True)
class Knowledge:
    """What a token round generates from, and the text side of classes the client lacks."""

    requests: list[GenerationRequest] = field(default_factory=list)
    fallback: dict[int, torch.Tensor] | None = None
    received: int = 0  # received class-vector sets
    entries: list[TokenEntry] = field(default_factory=list)  # the usable received entries
    dropped: Counter[str] = field(default_factory=Counter)  # unusable entries per rule

    def without(self, verdicts: list[Verdict], ws: Workspace) -> Knowledge:
        """The knowledge less the (sender, class) sets that screening left out.

        The received-mean text side of the classes the client lacks is recomputed from the
        accepted entries only (``tokens.unseen = received-mean``).
        """
        out = {(v.sender, v.class_id) for v in verdicts if not v.accepted}
        if not out:
            return self
        kept = [e for e in self.entries if (e.sender, e.class_id) not in out]
        return replace(self, entries=kept, fallback=_fallback(ws, kept, Counter()))


def norm_bound(cfg: AppConfig, pretrained_norm: float, token_dim: int) -> float:
    """The longest token vector accepted from a peer, by the server and by every receiver.

    ``tokens.max-norm-ratio`` times ``pretrained_norm`` (the backbone's largest pretrained
    token norm), plus the room a DP release needs (:func:`cmfl_flower.privacy.norm_allowance`).
    """
    return cfg.tokens.max_norm_ratio * pretrained_norm + norm_allowance(cfg.privacy, token_dim)


def max_sets(cfg: AppConfig) -> int:
    """The highest cluster set number a message may carry (0: none, ``tokens.clusters = 1``)."""
    return cfg.tokens.clusters if cfg.tokens.clusters > 1 else 0


def relay_limits(ws: Workspace) -> WireLimits:
    """What this client accepts from peers (the server checks replies against the same)."""
    cfg, dim = ws.cfg, ws.text.token_dim
    return WireLimits(
        dim,
        len(ws.class_names),
        cfg.tokens.max_tokens,
        cfg.tokens.max_bytes,
        norm_bound(cfg, largest_token_norm(ws.text.bundle), dim),
        max_sets(cfg),
    )


def relayed_knowledge(ws: Workspace, received: Arrays) -> Knowledge:
    """Peers' usable vectors from the server's relay message (``cmfl-relay``).

    Never fails on their content: entries that break a wire rule, or whose denoised vectors are
    not finite, are dropped and counted per rule in :attr:`Knowledge.dropped`. Cluster sets
    (``tokens.clusters``) only shape the generation requests; every other use (the text side,
    screening) takes each (sender, class)'s own vectors.
    """
    cfg = ws.cfg
    received_entries, dropped = read_relay(received, relay_limits(ws))
    # a client the server cannot place yet (e.g. after a restart) also gets its own vectors
    others = [e for e in received_entries if e.sender != ws.task.partition_id]
    entries, sets = [e for e in others if not e.set], [e for e in others if e.set]
    if cfg.privacy.enabled and cfg.privacy.denoise:  # never with sets (tokens.clusters)
        entries = _denoised(ws, entries, dropped)
    fallback = _fallback(ws, entries, dropped)
    return Knowledge(_requests(ws, entries, sets), fallback, len(entries), entries, dropped)


def _fallback(
    ws: Workspace, entries: list[TokenEntry], dropped: Counter[str]
) -> dict[int, torch.Tensor] | None:
    """The text side of classes the client lacks, per ``tokens.unseen``."""
    return _received_means(entries, dropped) if ws.cfg.tokens.unseen == "received-mean" else None


def _denoised(ws: Workspace, entries: list[TokenEntry], dropped: Counter[str]) -> list[TokenEntry]:
    """Labelled entries' vectors replaced by their posterior mean; unlabelled ones as they are.

    An entry whose estimate is not finite is dropped (``non-finite-denoised``).
    """
    out = []
    for entry in entries:
        if entry.class_id is not None:
            centre = anchor(ws, entry.class_id)
            vectors = denoise(entry.vectors, centre, ws.cfg.privacy)
            if not np.isfinite(vectors).all():
                dropped["non-finite-denoised"] += 1
                continue
            entry = TokenEntry(entry.sender, entry.class_id, vectors)
        out.append(entry)
    return out


def anchor(ws: Workspace, class_id: int) -> np.ndarray:
    """(n, D) pretrained embedding of the class's name, on the CPU: the DP release's centre."""
    return ws.text.name_vectors(ws.class_names[class_id]).float().cpu().numpy()


def name_requests(ws: Workspace, classes: list[int]) -> list[GenerationRequest]:
    """One request per class in ``classes``, from its pretrained name, sent by the client itself."""
    pid = ws.task.partition_id
    return [GenerationRequest(pid, c, ws.text.name_vectors(ws.class_names[c])) for c in classes]


def name_knowledge(ws: Workspace, bank: ClassTokenBank) -> Knowledge:
    """The classes the client lacks, from their pretrained names: no communication."""
    return Knowledge(name_requests(ws, lacking(ws, bank)))


def lacking(ws: Workspace, bank: ClassTokenBank) -> list[int]:
    """The classes the client learns no vectors of."""
    return [c for c in range(len(ws.class_names)) if c not in bank.class_ids]


def uncovered(
    ws: Workspace, bank: ClassTokenBank, knowledge: Knowledge, covered: set[int]
) -> list[GenerationRequest]:
    """Name requests for lacking classes that no accepted relayed set ``covered``.

    Only in a round that received peers' vectors (``generation.uncovered = names``), so a
    federation's first round, which relays nothing, stays as it was; never for opaque names.
    """
    cfg = ws.cfg
    if cfg.generation.uncovered != "names" or cfg.data.class_names != "real":
        return []
    if not knowledge.received:
        return []
    return name_requests(ws, [c for c in lacking(ws, bank) if c not in covered])
