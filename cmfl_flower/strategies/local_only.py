"""``local-only``: every client trains its vision LoRA on its own images; nothing is shared.

The baseline the method is measured against. Clients send back scalar metrics only.
"""

from __future__ import annotations

from cmfl_flower.strategies.base import CmflStrategy


class LocalOnly(CmflStrategy):
    """Local training only; the server just collects every client's metrics."""

    task = "local-only"
