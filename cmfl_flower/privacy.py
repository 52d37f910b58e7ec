"""Differential privacy for the relayed class vectors: clip, add Gaussian noise, account.

The mechanism (``privacy.enabled = true``), applied by a client to each class's vectors
``v`` of shape ``(n_tokens, D)`` just before they leave it, centred on ``a``, the pretrained
embedding of the class's name (public: every party has the CLIP and the class names)::

    release(v) = a + clip(v - a) + N(0, (sigma * C)^2 I),  clip(d) = d * min(1, C / ||d||_F)

with ``C = privacy.clip-norm`` and ``sigma = privacy.noise-multiplier``. Learned vectors stay
near their names, so ``C`` bounds the small drift ``v - a`` rather than the whole vector, and
the same noise is smaller beside the signal. The noise comes from the operating system's
entropy, never from the run seed (which the server knows).

A receiver that knows the mechanism (``privacy.denoise``) replaces a release ``y`` by the
posterior mean of ``v`` under the prior ``v - a ~ N(0, C^2 / m * I)`` (``m = n_tokens * D``
numbers; the clip bound spread evenly): ``a + (y - a) / (1 + sigma^2 * m)``. Post-processing
costs no privacy; with strong noise it returns the name, so the relay falls back to generating
from names instead of from noise.

Adjacency and sensitivity. Two inputs are neighbours when one class vector ``v`` of one client
is replaced by any other ``v'`` (replace-one-vector). After clipping
``||clip(v - a) - clip(v' - a)|| <= 2C``, so one release is the Gaussian mechanism with
sensitivity ``2C`` and std ``sigma*C``, i.e. a unit-sensitivity Gaussian mechanism with
noise multiplier ``sigma / 2``. A client releasing ``k`` vectors at once (all of its
classes, which its training couples) has joint sensitivity ``2C*sqrt(k)``: noise multiplier
``sigma / (2*sqrt(k))``. Releases in successive rounds compose; ``(epsilon, delta)`` comes
from Opacus' RDP accountant with sampling rate 1 (the server knows who was sampled, so
sampling amplifies nothing) and one step per round. Only the server accounts: Opacus is
imported there, not by the clients that :func:`privatise`.
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
    bank: Mapping[int, np.ndarray],
    anchors: Mapping[int, np.ndarray],
    cfg: PrivacyConfig,
    rng: np.random.Generator,
) -> dict[int, np.ndarray]:
    """Each class's (n_tokens, D) vectors released around its anchor, as float32."""
    std = cfg.noise_multiplier * cfg.clip_norm
    out = {}
    for class_id in sorted(bank):
        anchor = np.asarray(anchors[class_id], np.float64)  # (n_tokens, D)
        drift = clip(np.asarray(bank[class_id], np.float64) - anchor, cfg.clip_norm)
        noised = anchor + drift + rng.normal(0.0, std, drift.shape)
        out[class_id] = noised.astype(np.float32)
    return out


def norm_allowance(cfg: PrivacyConfig, token_dim: int) -> float:
    """How much longer a released token may be than the vector it releases (0 without DP).

    The clipped drift adds at most ``C`` to a token's norm and the noise about
    ``sigma * C * sqrt(D)``; three times that leaves a token's noise norm room of many standard
    deviations (it concentrates tightly around its mean).
    """
    if not cfg.enabled:
        return 0.0
    return cfg.clip_norm * (1.0 + 3.0 * cfg.noise_multiplier * math.sqrt(token_dim))


def shrinkage(cfg: PrivacyConfig, size: int) -> float:
    """The posterior-mean factor ``1 / (1 + sigma^2 * size)`` for a release of ``size`` numbers."""
    return 1.0 / (1.0 + cfg.noise_multiplier**2 * size)


def denoise(release: np.ndarray, anchor: np.ndarray, cfg: PrivacyConfig) -> np.ndarray:
    """The posterior mean of a class's vectors given their (n_tokens, D) ``release``."""
    if release.shape != anchor.shape:
        raise ValueError(
            f"a released class vector of shape {release.shape} cannot be denoised towards its "
            f"name's embedding of shape {anchor.shape}"
        )
    factor = shrinkage(cfg, release.size)
    estimate: np.ndarray = (anchor + factor * (release - anchor)).astype(np.float32)
    return estimate


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
