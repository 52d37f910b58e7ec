"""Differential privacy for the relayed class vectors: clip, add Gaussian noise, account.

The mechanism (``privacy.enabled = true``), applied by a client to each class's vectors
``v`` of shape ``(n_tokens, D)`` just before they leave it::

    release(v) = v * min(1, C / ||v||_F) + N(0, (sigma * C)^2 I)

with ``C = privacy.clip-norm`` and ``sigma = privacy.noise-multiplier``. The noise comes from
the operating system's entropy, never from the run seed (which the server knows).

Adjacency and sensitivity. Two inputs are neighbours when one class vector ``v`` of one client
is replaced by any other ``v'`` (replace-one-vector). After clipping ``||clip(v) - clip(v')||
<= 2C``, so one release is the Gaussian mechanism with sensitivity ``2C`` and std ``sigma*C``,
i.e. a unit-sensitivity Gaussian mechanism with noise multiplier ``sigma / 2``. A client
releasing ``k`` vectors at once (all of its classes, which its training couples) has joint
sensitivity ``2C*sqrt(k)``: noise multiplier ``sigma / (2*sqrt(k))``. Releases in successive
rounds compose; ``(epsilon, delta)`` comes from Opacus' RDP accountant with sampling rate 1
(the server knows who was sampled, so sampling amplifies nothing) and one step per round.
Only the server accounts: Opacus is imported there, not by the clients that :func:`privatise`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from cmfl_flower.config import PrivacyConfig


def clip(vectors: np.ndarray, clip_norm: float) -> np.ndarray:
    """``vectors`` scaled down to Frobenius norm ``clip_norm`` when longer."""
    norm = float(np.linalg.norm(vectors))
    return vectors * min(1.0, clip_norm / norm) if norm > 0 else vectors


def privatise(
    bank: Mapping[int, np.ndarray], cfg: PrivacyConfig, rng: np.random.Generator
) -> dict[int, np.ndarray]:
    """Each class's (n_tokens, D) vectors clipped and noised, as float32."""
    std = cfg.noise_multiplier * cfg.clip_norm
    out = {}
    for class_id in sorted(bank):
        clipped = clip(np.asarray(bank[class_id], np.float64), cfg.clip_norm)
        out[class_id] = (clipped + rng.normal(0.0, std, clipped.shape)).astype(np.float32)
    return out


def accountant_multiplier(cfg: PrivacyConfig, vectors: int = 1) -> float:
    """The unit-sensitivity noise multiplier of releasing ``vectors`` class vectors at once."""
    return cfg.noise_multiplier / (2.0 * math.sqrt(vectors))


def epsilon(cfg: PrivacyConfig, releases: int, vectors: int = 1) -> float:
    """Epsilon at ``privacy.delta`` after ``releases`` rounds of ``vectors`` vectors each."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    for _ in range(releases):
        accountant.step(noise_multiplier=accountant_multiplier(cfg, vectors), sample_rate=1.0)
    return float(accountant.get_epsilon(cfg.delta))


def round_report(cfg: PrivacyConfig, server_round: int, max_vectors: int) -> dict[str, float]:
    """Round metrics: epsilon of one vector (this round, all rounds so far) and of a client.

    ``dp-epsilon-client-total`` is for the client that sent the most vectors this round
    (``max_vectors``), over rounds 1..``server_round`` (a client releases at most once a round).
    """
    report = {
        "dp-delta": cfg.delta,
        "dp-epsilon-round": epsilon(cfg, 1),
        "dp-epsilon-total": epsilon(cfg, server_round),
    }
    if max_vectors > 0:
        report["dp-epsilon-client-total"] = epsilon(cfg, server_round, max_vectors)
    return report
