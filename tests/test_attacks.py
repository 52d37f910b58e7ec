"""One hostile client of four, at toy size: each attack is stopped by the defence named for it.

The hostile client (the last partition) runs the honest routine and then changes its reply
(:mod:`benchmarks.robustness`). Each test asserts what its defence did, so it fails when that
defence is switched off; the label flip also runs with every defence off, to show the attack
does harm there.
"""

import json
from collections import Counter

import numpy as np
import pytest

from benchmarks.loopback import LoopbackGrid
from benchmarks.robustness import DEFENCES_OFF, FIRST_NODE, hostile_app
from client_app import app as client_app
from cmfl_flower.client.task import ClientState, ClientTask
from cmfl_flower.methods.relay import relay_round
from cmfl_flower.server.rounds import run_federation
from tests.test_strategies import make_cfg

CLIENTS = 4
HOSTILE = CLIENTS - 1  # partition id of the attacker
# generation at the default 20 steps: the judges need images that show something
TOY = {"generation.steps": 20, "relay.max-senders-per-class": 0}


def _federation(tmp_path, attack, **extra):
    cfg = make_cfg(tmp_path, "cmfl-relay", 2, **(TOY | {"output.run-name": attack} | extra))
    grid = LoopbackGrid(client_app, cfg, CLIENTS)
    grid.overrides[FIRST_NODE + HOSTILE] = hostile_app(attack, 10)
    run_dir = run_federation(grid, cfg)
    rows = json.loads((run_dir / "clients.json").read_text())
    rounds = json.loads((run_dir / "rounds.json").read_text())
    honest = [r for r in rows if r.get("partition-id") != HOSTILE and "refused" not in r]
    return honest, rounds


def _total(rows, key):
    return sum(row.get(key, 0) for row in rows)


def test_label_flip_is_screened_out_and_does_harm_without_screening(tmp_path):
    honest, rounds = _federation(tmp_path, "label-flip")
    assert _total(honest, f"rejected-s{HOSTILE}") > 0
    assert _total(honest, f"kept-s{HOSTILE}") == 0  # none of its sets trained anyone
    assert rounds[-1]["screened-out"] > 0
    assert all(_total(honest, f"rejected-s{s}") == 0 for s in range(HOSTILE))  # no honest loss
    open_, _ = _federation(tmp_path, "label-flip", **DEFENCES_OFF, **{"output.run-name": "off"})
    assert _total(open_, f"kept-s{HOSTILE}") > 0  # without screening its sets train them


def test_a_targeted_flip_of_one_class_is_screened_out(tmp_path):
    honest, _ = _federation(tmp_path, "targeted-flip")
    assert _total(honest, f"rejected-s{HOSTILE}") > 0


def test_cluster_sets_under_the_wrong_class_are_screened_out_by_their_images(tmp_path):
    sets = {"tokens.clusters": 2, "tokens.objective": "both"}  # honest class vectors, lying sets
    honest, _ = _federation(tmp_path, "set-flip", **sets)
    assert _total(honest, f"rejected-s{HOSTILE}") > 0
    assert all(_total(honest, f"rejected-s{s}") == 0 for s in range(HOSTILE))
    open_, _ = _federation(tmp_path, "set-flip", **sets, **DEFENCES_OFF, **{"output.run-name": "o"})
    assert _total(open_, f"kept-s{HOSTILE}") > 0  # without screening its sets train them


def test_huge_vectors_are_refused_by_the_server_and_no_honest_reply_is_lost(tmp_path):
    honest, rounds = _federation(tmp_path, "huge-norm")
    assert [r["refused-norm"] for r in rounds] == [1, 1]
    assert [r["replies"] for r in rounds] == [HOSTILE, HOSTILE]
    assert all(np.isfinite(r["global-acc"]) for r in honest)


def test_noise_vectors_are_screened_out(tmp_path):
    honest, _ = _federation(tmp_path, "noise")
    assert _total(honest, f"rejected-s{HOSTILE}") > 0
    assert all(_total(honest, f"rejected-s{s}") == 0 for s in range(HOSTILE))


def test_a_silent_client_is_the_ceiling_reference_nothing_of_it_reaches_anyone(tmp_path):
    honest, rounds = _federation(tmp_path, "silent", **DEFENCES_OFF)
    assert _total(honest, f"kept-s{HOSTILE}") == 0 and _total(honest, "dropped") == 0
    assert _total(honest, "num-received-classes") > 0  # the honest ones still relay
    assert all(r["refused"] == 0 for r in rounds)


@pytest.fixture(scope="module")
def relayed_round(tmp_path_factory):
    """A receiver's round on a relay message with unusable entries among usable ones."""
    tmp_path = tmp_path_factory.mktemp("receiver")
    cfg = make_cfg(tmp_path, "cmfl-relay", 1, **{"privacy.enabled": True})
    good = np.full((1, 64), 0.01, np.float32)
    vectors = np.concatenate(
        [good, good * 1e6, np.full((1, 64), np.nan, np.float32), good, good]
    )  # (5, 64)
    index = np.array([[1, 3, 1], [1, 4, 1], [2, 5, 1], [2, 99, 1], [2, 6, 1]], np.int32)
    received = {"vectors": vectors, "index": index}
    return relay_round(cfg, ClientTask(0, CLIENTS, 2), ClientState(), received)


def test_a_receiver_drops_unusable_entries_by_name_and_keeps_the_rest(relayed_round):
    metrics = relayed_round.metrics
    assert metrics["num-received-classes"] == 2  # classes 3 and 6
    dropped = Counter({k: v for k, v in metrics.items() if k.startswith("dropped-")})
    assert dropped == {"dropped-norm": 1, "dropped-non-finite": 1, "dropped-class-id": 1}
    assert metrics["dropped"] == 3
    assert np.isfinite(metrics["global-acc"])
    assert metrics["seconds-load"] >= 0 and metrics["seconds-generation"] > 0  # loads apart


def test_a_receiver_keeps_what_it_accepted_as_the_next_rounds_screening_history(relayed_round):
    history, metrics = relayed_round.state.screening or {}, relayed_round.metrics
    kept = {f"c{c}" for sender, c in ((1, 3), (2, 6)) if metrics[f"kept-s{sender}"]}
    assert kept and set(history) == kept  # the accepted sets' classes, nothing dropped
    for feature in history.values():
        assert feature.dim() == 1 and feature.norm().item() == pytest.approx(1.0, abs=1e-5)
