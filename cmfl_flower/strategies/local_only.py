"""Baselines that share nothing: clients send back scalar metrics only.

* ``local-only``: every client trains its vision LoRA on its own images, text side = names;
* ``local-only-tokens``: the same, plus the relay's learned class tokens (no relay), so
  that "relay - local-only" does not mix token learning with relaying;
* ``names-generation``: learned tokens, and images of the classes a client lacks generated
  from their names: synthetic data at zero communication.
"""

from __future__ import annotations

from cmfl_flower.strategies.base import CmflStrategy


class LocalOnly(CmflStrategy):
    """Local training only; the server just collects every client's metrics."""

    task = "local-only"


class LocalOnlyTokens(CmflStrategy):
    """Local training with learned class tokens; nothing is relayed."""

    task = "local-only-tokens"


class NamesGeneration(CmflStrategy):
    """Each client generates the classes it lacks from their names; nothing is relayed."""

    task = "names-generation"
