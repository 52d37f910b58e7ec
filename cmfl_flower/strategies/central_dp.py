"""Central DP for the weight-averaging baselines, through Flower's own DP wrapper.

With ``privacy.enabled = true``, ``fedavg-encoder`` and ``fedprox-encoder`` average each round
through Flower's :class:`~flwr.serverapp.strategy.DifferentialPrivacyServerSideFixedClipping`
(server-side fixed clipping): every accepted client's adapter *update* (its reply minus the
global adapter the round started from) is clipped to L2 norm ``C = privacy.update-clip-norm``,
the clipped adapters are averaged with **equal** weights, and Gaussian noise of std
``sigma * C / n`` is added to the mean (``sigma = privacy.noise-multiplier``, ``n`` = clients
averaged). So that round 1 has a reference to clip against, the server then sends the seeded
initial adapter in round 1 (the clients would start from it anyway).

Adjacency and accounting: replacing one client's update moves the clipped mean by at most
``2C / n``; the noise std ``sigma * C / n`` makes each round a unit-sensitivity Gaussian
mechanism with multiplier ``sigma / 2``, as for the relayed vectors, and rounds compose:
``(epsilon, delta)`` comes from :func:`cmfl_flower.privacy.round_report` (Opacus' RDP
accountant, sampling rate 1). The adapter is protected; the scalar metrics a client reports
(accuracies, ``num-train``) are not.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg

from cmfl_flower.aggregate import weighted_mean
from cmfl_flower.config import PrivacyConfig
from cmfl_flower.protocol import ARRAYS_KEY
from cmfl_flower.strategies.base import Arrays, from_record, to_record


class _EqualWeightMean(FedAvg):
    """The inner strategy the wrapper aggregates with: the plain mean of the replies' arrays."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Equal-weight mean of the (already clipped) adapters."""
        items = [(from_record(r.content.array_records[ARRAYS_KEY]), 1.0) for r in replies]
        return to_record(weighted_mean(items)), None


def private_mean(
    cfg: PrivacyConfig, server_round: int, reference: Arrays, replies: list[Message]
) -> Arrays:
    """Clip each reply's update against ``reference``, average, add noise (Flower's wrapper).

    ``replies`` are accepted replies (validated against ``reference``'s layout); their
    ``arrays`` records are clipped in place by the wrapper.
    """
    wrapper = DifferentialPrivacyServerSideFixedClipping(
        _EqualWeightMean(),
        noise_multiplier=cfg.noise_multiplier,
        clipping_norm=cfg.update_clip_norm,
        num_sampled_clients=len(replies),
    )
    order = list(replies[0].content.array_records[ARRAYS_KEY])  # the wrapper pairs by position
    wrapper.current_arrays = to_record({key: reference[key] for key in order})
    arrays, _ = wrapper.aggregate_train(server_round, replies)
    if arrays is None:
        raise RuntimeError(f"round {server_round}: Flower's DP wrapper refused to aggregate")
    return from_record(arrays)
