"""Cluster sets (``tokens.clusters``): per class, vectors learned on clusters of a client's
images, relayed beside the class's vectors, drawn from in turn at the same image budget."""

import numpy as np
import pytest
import torch

from cmfl_flower.client.task import ClientState, ClientTask
from cmfl_flower.client.workspace import open_workspace
from cmfl_flower.config import AppConfig
from cmfl_flower.generation import GenerationRequest, load_generator
from cmfl_flower.knowledge import relayed_knowledge
from cmfl_flower.methods.relay import CmflRelay, relay_round
from cmfl_flower.prompts import DEFAULT_TEMPLATE
from cmfl_flower.tokens import ClassTokenBank, ClusterSets, cluster_numbers
from cmfl_flower.wire import TokenEntry, WireLimits, parse_relay, parse_reply, relay_arrays
from tests.test_generation import TINY, fast, name_vectors
from tests.test_strategies import TOKEN_DIM

SETS = WireLimits(token_dim=TOKEN_DIM, num_classes=10, max_tokens=16, max_bytes=2**40, max_sets=2)


def test_each_class_is_split_into_its_own_clusters_and_other_classes_get_none():
    rng = np.random.default_rng(0)
    centres = np.array([[5.0, 0.0], [-5.0, 0.0], [0.0, 5.0], [0.0, -5.0]])
    groups = [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]  # classes 4: groups 0, 1; 6: 2, 3
    features = torch.tensor(centres[groups] + rng.normal(0, 0.1, (12, 2)), dtype=torch.float32)
    labels = np.array([4] * 6 + [6] * 6 + [9, 9])
    features = torch.cat([features, torch.zeros(2, 2)])
    numbers = cluster_numbers(features, labels, [4, 6], k=2, seed=0)
    assert numbers[12:].tolist() == [0, 0]  # class 9 learns no sets
    for start in (0, 3, 6, 9):  # a group's images share one set, the class's two groups differ
        assert len(set(numbers[start : start + 3].tolist())) == 1
    assert numbers[0] != numbers[3] and numbers[6] != numbers[9]
    assert set(numbers[:12].tolist()) == {1, 2}
    assert np.array_equal(numbers, cluster_numbers(features, labels, [4, 6], k=2, seed=0))
    few = cluster_numbers(features[:1], labels[:1], [4], k=3, seed=0)
    assert few.tolist() == [1]  # one image fills one set


def test_sets_start_from_the_class_vectors_and_come_back_from_state():
    bank = ClassTokenBank({2: torch.ones(1, 4), 5: torch.zeros(2, 4)})
    sets = ClusterSets.for_bank(bank, None, k=2)
    assert sets.keys == [(2, 1), (2, 2), (5, 1), (5, 2)]
    assert torch.equal(sets.get(5, 2), torch.zeros(2, 4))
    with torch.no_grad():
        sets.get(2, 1).add_(3.0)
    state = bank.state() | sets.state()
    assert sorted(state) == ["c2", "c2.1", "c2.2", "c5", "c5.1", "c5.2"]
    assert ClassTokenBank.from_state(state).class_ids == [2, 5]  # sets are not classes
    back = ClusterSets.for_bank(bank, state, k=2)
    assert torch.equal(back.get(2, 1), torch.full((1, 4), 4.0))
    assert set(sets.arrays()) == set(sets.keys)


def test_a_request_draws_its_images_from_its_sets_in_turn_at_the_same_budget():
    generator = load_generator(TINY, "cpu", DEFAULT_TEMPLATE)
    seven, three = name_vectors(generator, "seven"), name_vectors(generator, "three")
    cfg = fast(images_per_class=4)
    mixed = GenerationRequest(1, 7, seven, variants=(seven, three))
    out = generator.generate([mixed], cfg, run_seed=0, server_round=1)
    only_seven = generator.generate([GenerationRequest(1, 7, seven)], cfg, 0, 1).images
    only_three = generator.generate([GenerationRequest(1, 7, three)], cfg, 0, 1).images
    assert len(out.images) == 4 and out.labels.tolist() == [7] * 4  # the budget is unchanged
    for i, source in enumerate([only_seven, only_three, only_seven, only_three]):
        gap = np.abs(out.images[i].astype(np.int16) - source[i].astype(np.int16)).max()
        assert gap <= 1, i  # image i from set i % 2, with image i's own seed
    assert np.abs(only_seven[1].astype(np.int16) - only_three[1].astype(np.int16)).mean() > 1


def test_the_config_names_what_cluster_sets_need():
    with pytest.raises(ValueError, match=r"tokens.clusters = 2 needs tokens.objective"):
        AppConfig.from_run_config({"tokens.clusters": 2, "tokens.objective": "clip"})
    with pytest.raises(ValueError, match=r"relay.combine = 'select', privacy.enabled = false"):
        AppConfig.from_run_config(
            {"tokens.clusters": 3, "relay.combine": "mean", "privacy.enabled": True}
        )
    with pytest.raises(ValueError, match="tokens.clusters"):
        AppConfig.from_run_config({"tokens.clusters": 9})


def _cfg(tmp_path, clusters: int) -> AppConfig:
    return AppConfig.from_run_config(
        {
            "data.dir": str(tmp_path.parent / "data"),
            "generation.images-per-round": 6,
            "generation.steps": 2,
            "tokens.epochs": 1,
            "tokens.clusters": clusters,
        }
    )


def test_a_relay_round_learns_sends_and_generates_from_cluster_sets(tmp_path):
    cfg = _cfg(tmp_path, clusters=2)
    out0 = relay_round(cfg, ClientTask(0, 2, 1), ClientState(), {})
    sent = parse_reply(out0.arrays, SETS, labelled=True)
    classes = sorted({e.class_id for e in sent})
    assert [(e.class_id, e.set) for e in sent] == [(c, n) for c in classes for n in (0, 1, 2)]
    assert np.isfinite(out0.metrics["cluster-loss"])
    vectors = {(e.class_id, e.set): e.vectors for e in sent}
    for c in classes:  # each set moved away from the class's vectors, and from the other set
        assert not np.allclose(vectors[c, 1], vectors[c, 0])
        assert not np.allclose(vectors[c, 1], vectors[c, 2])
    assert sorted(out0.state.tokens) == sorted(
        [f"c{c}" for c in classes] + [f"c{c}.{n}" for c in classes for n in (1, 2)]
    )

    relayed = relay_arrays([TokenEntry(0, e.class_id, e.vectors, e.set) for e in sent])
    plain = relay_arrays([TokenEntry(0, e.class_id, e.vectors) for e in sent if not e.set])
    with_sets = relay_round(cfg, ClientTask(1, 2, 2), ClientState(), relayed)
    without = relay_round(_cfg(tmp_path, 1), ClientTask(1, 2, 2), ClientState(), plain)
    assert with_sets.metrics["num-generated"] == without.metrics["num-generated"] == 6
    assert with_sets.metrics["num-received-classes"] == len(classes)
    assert with_sets.metrics["dropped"] == 0
    knowledge = relayed_knowledge(open_workspace(cfg, ClientTask(1, 2, 2), None), relayed)
    assert [len(r.variants) for r in knowledge.requests] == [2] * len(classes)
    assert [e.set for e in knowledge.entries] == [0] * len(classes)  # text side, screening
    request = knowledge.requests[0]
    assert np.array_equal(request.variants[1].numpy(), vectors[request.class_id, 2])


def test_the_server_relays_a_chosen_class_with_its_sets_only(tmp_path):
    cfg = AppConfig.from_run_config(
        {"tokens.clusters": 2, "relay.max-senders-per-class": 1, "output.dir": str(tmp_path)}
    )
    strategy = CmflRelay(cfg, tmp_path)
    vector = np.zeros((1, TOKEN_DIM), np.float32)
    for sender in (1, 2):
        strategy.latest[sender] = [TokenEntry(sender, 3, vector, n) for n in (0, 1, 2)]
        strategy.updated[sender] = sender  # sender 2 is the more recent
    received = parse_relay(strategy.arrays_for(server_round=3, node_id=99), SETS)
    assert [(e.sender, e.class_id, e.set) for e in received] == [(2, 3, 0), (2, 3, 1), (2, 3, 2)]
