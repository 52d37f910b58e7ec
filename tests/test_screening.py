"""Screening of relayed knowledge: each judge leaves out a lying set and keeps honest ones."""

import json
import math

import numpy as np
import pytest
import torch

from cmfl_flower.config import ScreeningConfig
from cmfl_flower.screening import (
    CONSENSUS,
    NAMES,
    NONE,
    OWN,
    TOKEN,
    Evidence,
    Verdict,
    combine,
    history,
    judge_sets,
    references,
    screening_metrics,
    unscreened,
)

E = 8  # feature width: class j's images point along axis j
SCALE = 100.0  # CLIP's logit scale
CFG = ScreeningConfig()


def _images(class_ids, per_set=4, seed=0):
    """(N, E) unit features: per_set noisy images around each class's axis."""
    rng = np.random.default_rng(seed)
    rows = [np.eye(E)[c] + 0.2 * rng.standard_normal(E) for c in class_ids for _ in range(per_set)]
    return torch.nn.functional.normalize(torch.tensor(np.array(rows), dtype=torch.float32), dim=1)


def _evidence(sets, own=(), names=True, per_set=4):
    """``sets``: (sender, claimed class, class its images really show)."""
    features = _images([shown for _, _, shown in sets], per_set)
    labels = np.repeat([claimed for _, claimed, _ in sets], per_set).astype(np.int64)
    senders = np.repeat([sender for sender, _, _ in sets], per_set).astype(np.int64)
    axes = torch.eye(E)
    return Evidence(
        features=features,
        labels=labels,
        senders=senders,
        own={c: axes[c] for c in own},
        names=axes if names else None,  # a perfect name judge: class j's text feature is axis j
        scale=SCALE,
    )


def _verdicts(evidence, cfg=CFG):
    return {(v.sender, v.class_id): v for v in judge_sets(evidence, cfg, cfg.min_score)}


def test_the_names_judge_leaves_out_a_flipped_set_and_keeps_the_honest_ones():
    verdicts = _verdicts(_evidence([(1, 2, 2), (1, 3, 3), (2, 2, 3), (2, 3, 4)]))
    assert {key: v.judge for key, v in verdicts.items()} == dict.fromkeys(verdicts, NAMES)
    assert verdicts[(1, 2)].accepted and verdicts[(1, 3)].accepted
    assert not verdicts[(2, 2)].accepted and not verdicts[(2, 3)].accepted
    assert verdicts[(1, 2)].score == pytest.approx(1.0) and verdicts[(2, 2)].score < 0.01


def test_the_own_judge_uses_the_receivers_images_of_a_class_it_holds():
    # opaque names: only the receiver's own images of class 2 (and 5) say what 2 looks like
    evidence = _evidence([(1, 2, 2), (3, 2, 5)], own=(2, 5), names=False)
    verdicts = _verdicts(evidence)
    assert verdicts[(1, 2)].judge == OWN and verdicts[(1, 2)].accepted
    assert verdicts[(3, 2)].judge == OWN and not verdicts[(3, 2)].accepted


def test_consensus_finds_the_outlier_among_three_senders_of_a_class_the_receiver_lacks():
    evidence = _evidence([(1, 6, 6), (2, 6, 6), (3, 6, 1), (3, 1, 1)], names=False)
    verdicts = _verdicts(evidence)
    assert verdicts[(1, 6)].judge == CONSENSUS and verdicts[(1, 6)].accepted
    assert verdicts[(2, 6)].accepted
    assert not verdicts[(3, 6)].accepted  # its "6" looks like the 1s it also sent


def test_two_senders_and_opaque_names_are_reported_unjudged_and_kept():
    verdicts = _verdicts(_evidence([(1, 6, 6), (2, 6, 1)], names=False))
    assert all(v.judge == NONE and v.accepted and math.isnan(v.score) for v in verdicts.values())
    metrics = screening_metrics(list(verdicts.values()))
    assert metrics == {"screened-out": 0, "judged": 0, "unjudged": 2, "kept-s1": 1, "kept-s2": 1}


def test_the_threshold_is_the_documented_key():
    evidence = _evidence([(1, 2, 2), (2, 2, 3)])
    assert not _verdicts(evidence)[(2, 2)].accepted
    assert _verdicts(evidence, ScreeningConfig(min_score=0.0))[(2, 2)].accepted


def test_metrics_name_the_senders_screened_out():
    verdicts = judge_sets(_evidence([(1, 2, 2), (2, 2, 3), (2, 4, 4)]), CFG, CFG.min_score)
    assert screening_metrics(verdicts) == {
        "screened-out": 1,
        "judged": 3,
        "unjudged": 0,
        "kept-s1": 1,
        "judged-s1": 1,
        "rejected-s1": 0,
        "kept-s2": 1,
        "judged-s2": 2,
        "rejected-s2": 1,
    }
    labels, senders = np.array([2, 2, 4]), np.array([1, 2, 2])
    assert [v.accepted for v in unscreened(labels, senders)] == [True, True, True]


def test_a_set_either_judgement_rejects_is_left_out():
    images = [Verdict(1, 2, NAMES, 0.9, True), Verdict(2, 2, NAMES, 0.8, True)]
    tokens = [Verdict(1, 2, TOKEN + NAMES, 1.0, True), Verdict(2, 2, TOKEN + NAMES, 0.01, False)]
    combined = {(v.sender, v.class_id): v for v in combine(images, tokens)}
    assert combined[(1, 2)] == images[0]  # both accept: the images' verdict
    assert combined[(2, 2)] == tokens[1]  # the tokens reject it, though its images look right
    unjudged = Verdict(3, 4, NONE, math.nan, True)
    assert combine([unjudged], [Verdict(3, 4, TOKEN + OWN, 0.5, True)])[0].judge == TOKEN + OWN


def test_noise_vectors_with_honest_looking_images_are_caught_by_the_token_judge():
    # one text feature per set: sender 2's "2" points nowhere near class 2's name
    features = _images([2, 3, 2, 3], per_set=1)
    features[2] = torch.nn.functional.normalize(torch.ones(E) - 2 * torch.eye(E)[2], dim=0)
    tokens = Evidence(
        features=features,
        labels=np.array([2, 3, 2, 3]),
        senders=np.array([1, 1, 2, 2]),
        own={},
        names=torch.eye(E),
        scale=SCALE,
    )
    verdicts = judge_sets(tokens, CFG, CFG.min_token_score, TOKEN)
    assert [v.accepted for v in verdicts] == [True, True, False, True]
    assert verdicts[2].judge == TOKEN + NAMES


def _drifted_tokens():
    """Sender 1's "2" has drifted from class 2's name (axis 2) nearer to class 4's (axis 4)."""
    drifted = torch.nn.functional.normalize(torch.eye(E)[2] + 2.0 * torch.eye(E)[4], dim=0)
    features = torch.stack([drifted, drifted, torch.eye(E)[3]])  # (3, E): 1's "2", 2's "2" (a flip)
    return features, np.array([2, 2, 2]), np.array([1, 2, 3])


def test_the_token_name_judge_follows_honest_drift_through_the_receivers_history():
    features, _, _ = _drifted_tokens()
    names = torch.eye(E)  # a perfect name judge, as above
    past = {2: torch.nn.functional.normalize(0.9 * features[0] + 0.1 * names[2], dim=0)}
    # sender 1's drifted "2", sender 3's class-3 vectors sent as "2", sender 9's honest sets of
    # every class (so that the judge's per-class mean probabilities are even)
    received = torch.cat([features[[0, 2]], names])  # (2 + E, E)
    labels, senders = np.array([2, 2, *range(E)]), np.array([1, 3, *[9] * E])

    def judged(references_):
        evidence = Evidence(received, labels, senders, {}, references_, SCALE)
        return {(v.sender, v.class_id): v for v in judge_sets(evidence, CFG, 0.3, TOKEN)}

    without, with_history = judged(names), judged(references(names, past))
    assert not without[(1, 2)].accepted  # names alone: the drifted honest set is screened out
    assert with_history[(1, 2)].accepted and with_history[(1, 2)].score == pytest.approx(1.0)
    assert not without[(3, 2)].accepted and not with_history[(3, 2)].accepted  # the flip: out
    assert all(with_history[(9, c)].accepted for c in range(E))


def test_history_is_the_unit_mean_of_the_accepted_sets_and_keeps_older_classes():
    features, labels, senders = _drifted_tokens()
    evidence = Evidence(features, labels, senders, {}, torch.eye(E), SCALE)
    verdicts = [
        Verdict(1, 2, TOKEN + NAMES, 1.0, True),
        Verdict(2, 2, TOKEN + NAMES, 0.9, True),
        Verdict(3, 2, TOKEN + NAMES, 0.0, False),  # left out: never part of the history
    ]
    before = {5: torch.eye(E)[5]}
    after = history(evidence, verdicts, before)
    assert set(after) == {2, 5} and torch.equal(after[5], before[5])
    assert torch.allclose(after[2], features[0]) and after[2].norm() == pytest.approx(1.0)
    assert references(torch.eye(E), after).shape == (2, E, E)


# ----- the server's quarantine -------------------------------------------------------------


def _relay_server(tmp_path, **extra):
    from cmfl_flower.methods.relay import CmflRelay
    from tests.test_strategies import make_cfg

    every_sender = {"relay.max-senders-per-class": 0}
    return CmflRelay(make_cfg(tmp_path, "cmfl-relay", **every_sender, **extra), tmp_path)


def _report(server, server_round, receiver, votes):
    """Receiver ``receiver`` replies, having judged ``votes``: sender -> (judged, rejected)."""
    metrics = {"partition-id": receiver}
    for sender, (judged, rejected) in votes.items():
        metrics |= {f"judged-s{sender}": judged, f"rejected-s{sender}": rejected}
    vectors = {"vectors": np.zeros((1, 64), np.float32), "index": np.array([[0, 1]], np.int32)}
    assert server.check_reply(server_round, metrics, vectors) is None
    server.absorb(server_round, 100 + receiver, metrics, vectors)


def _senders_relayed(server, server_round, node):
    from cmfl_flower.wire import parse_relay

    return {e.sender for e in parse_relay(server.arrays_for(server_round, node), server.limits)}


def test_a_sender_most_receivers_reject_is_quarantined_for_the_configured_rounds(tmp_path):
    server = _relay_server(tmp_path, **{"screening.quarantine-rounds": 2})
    for receiver in (0, 1, 2):
        _report(server, 1, receiver, {3: (2, 2)} if receiver else {3: (2, 0)})
    _report(server, 1, 3, {0: (2, 2), 1: (2, 2)})  # the liar's word on others counts once
    assert server.round_metrics(1)["quarantined"] == "3"
    assert _senders_relayed(server, 2, 100) == {1, 2}  # 3's vectors held back
    assert _senders_relayed(server, 3, 100) == {1, 2}
    assert server.round_metrics(2)["quarantined"] == "3"  # held in round 3 too
    assert "quarantined" not in server.round_metrics(3)
    assert _senders_relayed(server, 4, 100) == {1, 2, 3}
    arrays, meta = server.state()
    fresh = _relay_server(tmp_path)
    fresh.load_state(arrays, meta)
    assert fresh.quarantine == server.quarantine


def test_one_liar_cannot_quarantine_and_nobody_judges_itself(tmp_path):
    server = _relay_server(tmp_path)
    _report(server, 1, 3, {0: (2, 2)})  # one receiver rejects 0
    _report(server, 1, 0, {0: (2, 2), 1: (2, 0)})  # 0's verdict on itself is ignored
    _report(server, 1, 1, {0: (2, 0)})
    assert "quarantined" not in server.round_metrics(1)
    _report(server, 2, 3, {0: (2, 2)})
    _report(server, 2, 2, {0: (2, 2)})  # two of three judges reject: a majority
    _report(server, 2, 1, {0: (2, 0)})
    assert server.round_metrics(2)["quarantined"] == "0"


def test_no_quarantine_when_switched_off(tmp_path):
    server = _relay_server(tmp_path, **{"screening.quarantine-rounds": 0})
    for receiver in (0, 1, 2):
        _report(server, 1, receiver, {3: (1, 1)})
    assert "quarantined" not in server.round_metrics(1)


def test_the_norm_bound_scales_the_tiny_vocabularys_longest_token(tmp_path):
    from cmfl_flower.backbones import pretrained_token_norm, resolve_preset
    from cmfl_flower.config import BackboneConfig

    longest = pretrained_token_norm(resolve_preset(BackboneConfig()))
    assert round(longest, 2) == 0.46  # the README's figure
    server = _relay_server(tmp_path)
    assert server.limits.max_norm == pytest.approx(4.0 * longest)
    private = _relay_server(tmp_path, **{"privacy.enabled": True})
    assert private.limits.max_norm > server.limits.max_norm  # room for the DP noise


def test_a_sender_quarantined_again_is_held_twice_as_long(tmp_path):
    server = _relay_server(tmp_path, **{"screening.quarantine-rounds": 2})

    def everyone_rejects_3(server_round):
        for receiver in (0, 1, 2):
            _report(server, server_round, receiver, {3: (2, 2)})
        return server.round_metrics(server_round).get("quarantined")

    assert everyone_rejects_3(1) == "3"
    assert server.quarantine[3] == 3  # held in rounds 2 and 3
    assert everyone_rejects_3(4) == "3"  # released in round 4, it lied again
    assert server.quarantine[3] == 8  # held in rounds 5 to 8
    arrays, meta = server.state()
    fresh = _relay_server(tmp_path, **{"screening.quarantine-rounds": 2})
    fresh.load_state(arrays, meta)
    assert fresh.offences == {3: 2}


def test_one_misjudged_set_of_two_does_not_count_as_a_rejection(tmp_path):
    server = _relay_server(tmp_path)
    for receiver in (0, 1, 2):
        _report(server, 1, receiver, {3: (2, 1)})  # every receiver left out one of 3's two sets
    assert "quarantined" not in server.round_metrics(1)


def test_a_receiver_holding_no_class_with_min_images_screens_and_trains(tmp_path):
    """A Dirichlet split can leave a client no class with ``tokens.min-images`` images.

    Here partition 0's largest class has 46 training images and the others' at least 54: with
    ``tokens.min-images = 50`` it learns no vectors, yet receives, screens (without an own
    image judge) and trains on its peers' in round 2, as the others do.
    """
    from benchmarks.loopback import LoopbackGrid
    from client_app import app as client_app
    from cmfl_flower.server.rounds import run_federation
    from tests.test_strategies import make_cfg

    data = {"data.partitioner": "dirichlet", "data.alpha": 0.1, "data.seed": 0}
    cfg = make_cfg(tmp_path, "cmfl-relay", 2, **data, **{"tokens.min-images": 50})
    run_dir = run_federation(LoopbackGrid(client_app, cfg, 3), cfg)
    last = json.loads((run_dir / "rounds.json").read_text())[-1]
    assert (last["replies"], last["errors"], last["accepted-share"]) == (3, 0, 1.0)
    clients = json.loads((run_dir / "clients.json").read_text())
    first = [row for row in clients if row["round"] == 2 and row["partition-id"] == 0]
    assert first[0]["num-token-classes"] == 0 and first[0]["num-generated"] > 0
