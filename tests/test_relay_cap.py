"""The relay's cap: at most ``relay.max-senders-per-class`` senders per class reach a client,
the most recent first, rotating so that every sender travels; ``relay.combine = 'mean'``."""

import numpy as np
import pytest

import client_app as client_module
from benchmarks.loopback import LoopbackGrid
from cmfl_flower.config import AppConfig
from cmfl_flower.methods.relay import cap_senders, class_means
from cmfl_flower.server.rounds import run_federation
from cmfl_flower.wire import TokenEntry
from tests.test_strategies import make_cfg, relayed

client_app = client_module.app


def _entries(senders: range, classes: tuple[int, ...] = (0,)) -> list[TokenEntry]:
    return [
        TokenEntry(s, c, np.full((1, 4), 10.0 * s + c, np.float32))
        for s in senders
        for c in classes
    ]


def test_no_class_gets_more_than_the_cap_and_every_sender_travels():
    entries = _entries(range(7), classes=(0, 1))
    updated = dict.fromkeys(range(7), 1)
    seen: set[int] = set()
    for server_round in range(1, 5):
        chosen = cap_senders(entries, updated, server_round, cap=2, seed=0)
        for class_id in (0, 1):
            assert sum(e.class_id == class_id for e in chosen) == 2
        seen |= {e.sender for e in chosen}
    assert seen == set(range(7))  # ceil(7 / 2) = 4 rounds carry every sender


def test_the_most_recently_updated_senders_come_first():
    entries = _entries(range(5))
    updated = {0: 3, 1: 1, 2: 1, 3: 3, 4: 2}
    for server_round in (4, 5, 6):
        chosen = cap_senders(entries, updated, server_round, cap=2, seed=1)
        assert {e.sender for e in chosen} == {0, 3}


def test_cap_zero_relays_everything_and_the_order_is_kept():
    entries = _entries(range(4), classes=(0, 1))
    assert cap_senders(entries, {}, 3, cap=0, seed=0) == entries
    chosen = cap_senders(entries, {}, 3, cap=1, seed=0)
    assert chosen == [e for e in entries if e in chosen]  # a subsequence: wire order unchanged


def test_unlabelled_vectors_are_capped_per_message():
    entries = [TokenEntry(s, None, np.zeros((1, 4), np.float32)) for s in range(6) for _ in (0, 1)]
    assert len(cap_senders(entries, {}, 1, cap=2, seed=0)) == 4  # 2 senders x 2 vectors


def test_class_means_average_each_class_under_its_lowest_sender():
    means = class_means(_entries(range(1, 4), classes=(0, 5)))
    assert [(e.sender, e.class_id) for e in means] == [(1, 0), (1, 5)]
    np.testing.assert_allclose(means[0].vectors, np.full((1, 4), 20.0))
    np.testing.assert_allclose(means[1].vectors, np.full((1, 4), 25.0))


def test_mean_needs_class_ids():
    with pytest.raises(ValueError, match="relay.combine = 'mean' needs class ids"):
        AppConfig.from_run_config({"relay.combine": "mean", "tokens.relay": "unlabelled"})


@pytest.mark.parametrize("combine", ["select", "mean"])
def test_a_relay_round_sends_each_client_at_most_the_cap(tmp_path, combine):
    settings = {"relay.max-senders-per-class": 1, "relay.combine": combine}
    cfg = make_cfg(tmp_path, "cmfl-relay", 2, **settings, **{"data.partitioner": "iid"})
    grid = LoopbackGrid(client_app, cfg, 5, keep_messages=True)
    run_federation(grid, cfg)
    second = [m for m in grid.sent if m.content["config"]["server-round"] == 2]
    assert len(second) == 5
    for message in second:
        classes = [entry.class_id for entry in relayed(message)]
        assert classes and len(classes) == len(set(classes))  # one sender per class at most
