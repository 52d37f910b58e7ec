"""Strategies driven through the real ServerApp/ClientApp code on an in-process grid."""

import json
from collections import Counter

import numpy as np
import pytest
import torch
from flwr.app import Message, MetricRecord, RecordDict

from benchmarks.loopback import LoopbackGrid
from client_app import app as client_app
from cmfl_flower.client.store import load_state
from cmfl_flower.config import AppConfig
from cmfl_flower.methods import resolve_method
from cmfl_flower.methods.base import ARRAYS_KEY, METRICS_KEY, from_record, to_record
from cmfl_flower.server.rounds import run_federation
from cmfl_flower.server.strategies import FLOWER_STRATEGIES, strategy_class
from cmfl_flower.wire import TokenEntry, WireLimits, parse_relay, parse_reply, relay_arrays

TOKEN_DIM = 64
ANY_SIZE = WireLimits(token_dim=TOKEN_DIM, num_classes=10, max_tokens=16, max_bytes=2**40)


def relayed(message) -> list[TokenEntry]:
    """The entries of a server -> client relay message (none when it carries no arrays)."""
    record = message.content.array_records.get(ARRAYS_KEY)
    return parse_relay(from_record(record), ANY_SIZE) if record else []


def replied(reply, labelled=True) -> list[TokenEntry]:
    """The entries of a client's relay reply."""
    return parse_reply(from_record(reply.content[ARRAYS_KEY]), ANY_SIZE, labelled)


def make_cfg(tmp_path, method, rounds=2, **extra):
    flat = {
        "method": method,
        "federation.rounds": rounds,
        "federation.min-nodes": 2,
        # one prepared-data root per test session and worker (the base temp dir): preparing
        # the digits partitions takes about 3 s, and the tests use a handful of specs
        "data.dir": str(tmp_path.parent / "data"),
        "output.dir": str(tmp_path / "runs"),
        "output.run-name": method.replace(":", "-"),
        "generation.images-per-class": 2,
        "generation.steps": 2,
        "tokens.epochs": 1,
        # CLIP's loss alone: the default (`both`) also runs the UNet per token batch, which
        # would make most of these federations' time; one relay test keeps the default
        "tokens.objective": "clip",
    }
    return AppConfig.from_run_config(flat | extra)


BOTH = {"tokens.objective": "both"}  # the app's default token objective


def run(tmp_path, method, num_nodes=4, rounds=2, overrides=None, **extra):
    cfg = make_cfg(tmp_path, method, rounds, **extra)
    grid = LoopbackGrid(client_app, cfg, num_nodes, keep_messages=True)
    grid.overrides.update(overrides or {})
    run_dir = run_federation(grid, cfg)
    rows = json.loads((run_dir / "clients.json").read_text())
    rounds_ = json.loads((run_dir / "rounds.json").read_text())
    return grid, rows, rounds_


# the tests marked RELAY_RUN share one 2-round relay federation of 3 clients at the app's
# default token objective: one xdist worker runs them, and the fixture is session-scoped
# (a module-scoped one is torn down whenever the worker turns to another module)
RELAY_RUN = pytest.mark.xdist_group("relay-run")


@pytest.fixture(scope="session")
def relay_federation(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("relay-run")
    return (tmp_path, *run(tmp_path, "cmfl-relay", num_nodes=3, rounds=2, **BOTH))


@RELAY_RUN
def test_relay_messages_carry_only_token_vectors_and_scalars(relay_federation):
    _, grid, rows, rounds = relay_federation
    assert [r["replies"] for r in rounds] == [3, 3]
    for reply in grid.replies:
        content = reply.content
        assert set(content.metric_records) == {METRICS_KEY}
        assert not content.config_records
        assert set(content.array_records) == {ARRAYS_KEY}
        for value in content.metric_records[METRICS_KEY].values():
            assert isinstance(value, (int, float))
        arrays = from_record(content.array_records[ARRAYS_KEY])
        assert set(arrays) == {"vectors", "index"}, "a relay reply carries class tokens"
        # token-sized: (n_tokens <= 16, D) per class; an image (32*32*3), a feature or a
        # weight matrix would not fit this shape
        assert arrays["vectors"].dtype == np.float32 and arrays["vectors"].shape[1] == TOKEN_DIM
        for entry in replied(reply):
            assert entry.class_id is not None and 1 <= len(entry.vectors) <= 16
    by_round = {}
    for row in rows:
        by_round.setdefault(row["round"], []).append(row)
    assert all(row["num-generated"] == 0 for row in by_round[1])
    assert all(row["num-generated"] > 0 for row in by_round[2])
    assert all(row["token-loss"] > 0 for row in rows)
    for row in rows:
        assert row["bytes-sent"] > 0 and row["bytes-received"] > 0
        for phase in ("tokens", "generation", "encoder", "eval"):
            assert row[f"seconds-{phase}"] >= 0
    assert rounds[1]["num-generated"] == sum(r["num-generated"] for r in by_round[2])


@RELAY_RUN
def test_relay_never_returns_a_client_its_own_vectors(relay_federation):
    _, grid, _, _ = relay_federation
    partition = {node: ctx.node_config["partition-id"] for node, ctx in grid.contexts.items()}
    later = [m for m in grid.sent if m.content.config_records["config"]["server-round"] == 2]
    assert len(later) == 3
    for message in later:
        senders = {entry.sender for entry in relayed(message)}
        own = partition[message.metadata.dst_node_id]
        assert senders and own not in senders
        assert senders == set(partition.values()) - {own}


@RELAY_RUN
def test_client_state_persists_between_rounds(relay_federation):
    tmp_path = relay_federation[0]
    for pid in range(3):
        directory = tmp_path / "runs" / "cmfl-relay" / "clients" / f"partition-{pid}" / "state"
        first, second = load_state(directory, 2), load_state(directory, 3)
        assert first.lora and first.tokens and second.lora and second.tokens
        assert any(not torch.equal(first.tokens[k], second.tokens[k]) for k in first.tokens)
        # the denoising objective's latents, computed once per run on the client's node
        assert any((directory.parent / "cache").iterdir())


def test_unlabelled_relay_sends_no_class_ids_and_still_generates(tmp_path):
    grid, rows, _ = run(
        tmp_path, "cmfl-relay", num_nodes=3, rounds=2, **{"tokens.relay": "unlabelled"}
    )
    assert any(relayed(message) for message in grid.sent)
    for message in grid.sent:
        assert all(entry.class_id is None for entry in relayed(message))
    for reply in grid.replies:
        assert replied(reply, labelled=False)  # refuses any class id
    assert all(row["num-generated"] > 0 for row in rows if row["round"] == 2)


def _raising(message, context):
    raise RuntimeError("client exploded")


def _nan_tokens(message, context):
    reply = client_app(message, context)
    arrays = from_record(reply.content["arrays"])
    arrays["vectors"] = np.full_like(arrays["vectors"], np.nan)
    content = RecordDict({METRICS_KEY: reply.content[METRICS_KEY], ARRAYS_KEY: to_record(arrays)})
    return Message(content, reply_to=message)


def test_error_and_invalid_replies_are_counted_and_survived(tmp_path):
    overrides = {1000: _raising, 1001: _nan_tokens}
    grid, rows, rounds = run(tmp_path, "cmfl-relay", num_nodes=4, rounds=2, overrides=overrides)
    assert [(r["replies"], r["errors"], r["refused"]) for r in rounds] == [(2, 1, 1), (2, 1, 1)]
    refused = [row for row in rows if "refused" in row]
    assert refused and all("NaN or Inf" in row["refused"] for row in refused)
    # the refused client's vectors are never relayed: only partitions 2 and 3 send
    later = [m for m in grid.sent if m.content.config_records["config"]["server-round"] == 2]
    senders = {entry.sender for message in later for entry in relayed(message)}
    assert senders == {2, 3}


@pytest.mark.parametrize(("strategy", "args"), [("fedavg", ""), ("fedprox", "proximal_mu=0.5")])
def test_flowers_fedavg_sends_the_example_weighted_mean_back(tmp_path, strategy, args):
    extra = {"strategy": strategy, "strategy-args": args}
    grid, _, rounds = run(tmp_path, "encoder-lora", num_nodes=3, rounds=2, **extra)
    first = grid.replies[:3]
    weights = [float(r.content[METRICS_KEY]["num-examples"]) for r in first]
    adapters = [from_record(r.content["arrays"]) for r in first]
    # Flower's strategies reuse one config record, so select round 2 by position
    second_round = grid.sent[3:]
    assert len(second_round) == 3
    for message in second_round:
        assert message.metadata.message_type == "train.encoder_lora"
        received = from_record(message.content["arrays"])
        for key in adapters[0]:
            expected = sum(w * a[key] for w, a in zip(weights, adapters, strict=True))
            assert np.allclose(received[key], expected / sum(weights), atol=1e-6)
        mu = message.content["config"].get("proximal-mu")
        assert mu == (0.5 if strategy == "fedprox" else None)
    assert [r["averaged"] for r in rounds] == [3, 3]
    assert all(k.startswith("transformer.") for k in adapters[0])  # LoRA weights only
    assert all(0.0 <= r["server-global-acc"] <= 1.0 for r in rounds)


@pytest.mark.parametrize("name", sorted(FLOWER_STRATEGIES))
def test_every_flower_strategy_runs_encoder_lora(tmp_path, name):
    args = {"bulyan": "num_malicious_nodes=0", "fedtrimmedavg": "beta=0.2"}.get(name, "")
    extra = {"strategy": name, "strategy-args": args, "encoder.epochs": 1}
    # 3 nodes: the fewest Krum (n > 2f + 2) and Bulyan (n >= 4f + 3) accept with f = 0
    grid, _, rounds = run(tmp_path, "encoder-lora", num_nodes=3, rounds=2, **extra)
    assert [(r["replies"], r["refused"], r["errors"]) for r in rounds] == [(3, 0, 0)] * 2
    assert all(0.0 <= r["server-global-acc"] <= 1.0 for r in rounds)
    sent = [from_record(m.content["arrays"]) for m in grid.sent]
    moved = [not np.allclose(sent[0][k], sent[-1][k]) for k in sent[0]]
    assert any(moved), "the global adapter changed between round 1 and round 2"


def test_strategy_by_import_path_and_flowers_evaluate_message(tmp_path):
    extra = {
        "strategy": "flwr.serverapp.strategy:FedAdam",
        "strategy-args": "eta=0.01 beta_1=0.9",
        "federation.fraction-evaluate": 1.0,
    }
    grid, rows, rounds = run(tmp_path, "encoder-lora", num_nodes=2, rounds=2, **extra)
    types = {m.metadata.message_type for m in grid.sent}
    assert types == {"train.encoder_lora", "evaluate.encoder_lora"}
    assert all(0.0 <= row["eval-local-acc"] <= 1.0 for row in rows)
    assert all(0.0 <= r["eval-local-acc-mean"] <= 1.0 for r in rounds)


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        ({"strategy": "fedadam", "strategy-args": "etaa=0.1"}, "etaa not accepted by FedAdam"),
        ({"strategy": "fedadam", "strategy-args": "eta"}, "'eta' is not name=value"),
        ({"strategy": "no-such"}, "unknown; Flower's built-ins: fedavg"),
        ({"strategy": "cmfl_flower.config:AppConfig"}, "not a flwr.serverapp.strategy.Strategy"),
    ],
)
def test_bad_strategies_and_arguments_are_refused(tmp_path, extra, error):
    cfg = make_cfg(tmp_path, "encoder-lora", **extra)
    with pytest.raises(ValueError, match=error):
        run_federation(LoopbackGrid(client_app, cfg, 2), cfg)


def test_a_strategy_is_refused_for_a_method_with_its_own_server_side(tmp_path):
    cfg = make_cfg(tmp_path, "cmfl-relay", **{"strategy": "krum"})
    with pytest.raises(ValueError, match="strategy = 'krum' has no use with method"):
        run_federation(LoopbackGrid(client_app, cfg, 2), cfg)


def test_plugin_method_by_import_path(tmp_path):
    grid, _, _ = run(tmp_path, "examples.best_peer:BEST_PEER", num_nodes=3, rounds=2)
    assert {m.metadata.message_type for m in grid.sent} == {"train"}  # the default handler
    later = [m for m in grid.sent if m.content.config_records["config"]["server-round"] == 2]
    for message in later:  # one peer's vectors, never the client's own
        assert len({entry.sender for entry in relayed(message)}) == 1


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("no-such-method", "unknown; built in: cmfl-relay"),
        ("no_such_pkg.mod:Thing", "cannot be imported"),
        ("cmfl_flower.config:AppConfig", "not a cmfl_flower.methods.Method"),
    ],
)
def test_bad_method_names_are_refused(name, error):
    with pytest.raises(ValueError, match=error):
        resolve_method(name)


def test_strategy_class_resolves_short_names():
    assert strategy_class("krum").__name__ == "Krum"


def test_failed_run_is_recorded_as_failed(tmp_path):
    cfg = make_cfg(
        tmp_path, "local-only", **{"federation.min-nodes": 5, "federation.wait-for-nodes": 1.0}
    )
    grid = LoopbackGrid(client_app, cfg, 2)
    with pytest.raises(RuntimeError, match="min-nodes = 5"):
        run_federation(grid, cfg)
    status = json.loads((tmp_path / "runs" / "local-only" / "status.json").read_text())
    assert status["status"] == "failed" and "min-nodes" in status["error"]


def test_metric_record_summary_is_returned(tmp_path):
    _, _, rounds = run(tmp_path, "local-only", num_nodes=2, rounds=1)
    assert rounds[0]["replies"] == 2
    assert 0 <= rounds[0]["global-acc-mean"] <= 1
    assert isinstance(MetricRecord({"x": 1}), MetricRecord)


def test_received_mean_fallback_averages_vectors_of_equal_shape():
    from cmfl_flower.knowledge import _received_means
    from cmfl_flower.wire import TokenEntry

    a = np.ones((1, 4), np.float32)
    entries = [
        TokenEntry(0, 3, a),
        TokenEntry(1, 3, 3 * a),
        TokenEntry(2, 3, np.ones((2, 4), np.float32)),  # another token count: left out
        TokenEntry(1, None, a),  # unlabelled: no class to average into
    ]
    dropped = Counter()
    means = _received_means(entries, dropped)
    assert set(means) == {3} and np.allclose(means[3].numpy(), 2 * a) and not dropped
    huge = [TokenEntry(0, 5, np.full((1, 4), 3e38, np.float32)), TokenEntry(1, 5, 3e38 * a)]
    assert _received_means(huge, dropped) == {} and dropped == {"non-finite-mean": 1}


def test_unseen_classes_can_use_their_pretrained_names(tmp_path):
    _, rows, rounds = run(
        tmp_path, "cmfl-relay", num_nodes=3, rounds=2, **{"tokens.unseen": "pretrained"}
    )
    assert [r["replies"] for r in rounds] == [3, 3]
    assert all(0.0 <= row["global-acc"] <= 1.0 for row in rows)


def _reply_classes(reply):
    if ARRAYS_KEY not in reply.content.array_records:
        return []
    return sorted(entry.class_id for entry in replied(reply))


@pytest.mark.parametrize("method", ["local-only-tokens", "names-generation"])
def test_baselines_with_tokens_send_nothing(tmp_path, method):
    grid, rows, rounds = run(tmp_path, method, num_nodes=2, rounds=1)
    assert [r["replies"] for r in rounds] == [2]
    assert all(_reply_classes(reply) == [] for reply in grid.replies)
    for row in rows:
        missing = 10 - row["num-token-classes"]
        if method == "names-generation":  # 2 images of every class it has no tokens for
            assert row["num-generated"] == 2 * missing > 0
            assert 0.0 <= row["generated-recognised"] <= 1.0
        else:
            assert row["num-generated"] == 0 and "generated-recognised" not in row
    if method == "names-generation":
        assert 0.0 <= rounds[0]["generated-recognised-mean"] <= 1.0


def test_classes_with_too_few_images_are_neither_learned_nor_relayed(tmp_path):
    from cmfl_flower.client.workspace import data_dir
    from cmfl_flower.data import load_partition

    extra = {"tokens.min-images": 20}
    grid, rows, rounds = run(tmp_path, "cmfl-relay", num_nodes=3, rounds=2, **extra)
    directory = data_dir(make_cfg(tmp_path, "cmfl-relay").data, 3)
    dropped = 0
    for reply in grid.replies:
        pid = int(reply.content[METRICS_KEY]["partition-id"])
        counts = np.bincount(load_partition(directory, pid).train.labels, minlength=10)
        assert _reply_classes(reply) == [c for c in range(10) if counts[c] >= 20]
        dropped += int(((counts > 0) & (counts < 20)).sum())
    assert dropped > 0  # the rule had something to drop
    later = [row for row in rows if row["round"] == 2]
    assert all(0.0 <= row["generated-recognised"] <= 1.0 for row in later)
    assert "generated-recognised-min" in rounds[1]


def test_opaque_names_and_a_validation_split(tmp_path):
    extra = {"data.class-names": "opaque", "data.validation-fraction": 0.25}
    _, rows, rounds = run(tmp_path, "local-only-tokens", num_nodes=2, rounds=1, **extra)
    _, plain, _ = run(tmp_path / "plain", "local-only-tokens", num_nodes=2, rounds=1)
    for held, full in zip(rows, plain, strict=True):
        assert held["num-train"] == full["num-train"] - round(0.25 * full["num-train"])
        assert 0.0 <= held["val-acc"] <= 1.0 and "val-acc" not in full
    assert 0.0 <= rounds[0]["val-acc-mean"] <= 1.0
    client = tmp_path / "runs" / "local-only-tokens" / "clients" / "partition-0"
    labels = json.loads((client / "labels.json").read_text())
    assert labels["class-names"][:2] == ["zqaa", "zqab"]


def test_a_checkpoint_in_the_old_wire_format_is_refused_by_name(tmp_path):
    from cmfl_flower.methods.relay import CmflRelay

    server = CmflRelay(make_cfg(tmp_path, "cmfl-relay"), tmp_path)
    old_layout = {"s0.c1": np.zeros((1, TOKEN_DIM), np.float32)}  # one array per class
    with pytest.raises(ValueError, match=r"server checkpoint: .*key: .*start a new run"):
        server.load_state(old_layout, {})
    server.load_state(relay_arrays([TokenEntry(0, 1, np.ones((1, TOKEN_DIM), np.float32))]), {})
    assert list(server.latest) == [0] and server.latest[0][0].class_id == 1


def test_pooled_validation_measures_every_partitions_held_out_images(tmp_path):
    from cmfl_flower.client.task import ClientTask
    from cmfl_flower.client.workspace import open_workspace

    split = {"data.validation-fraction": 0.25}
    own = make_cfg(tmp_path, "local-only", **split)
    pooled = make_cfg(tmp_path, "local-only", **split, **{"data.validation-scope": "pooled"})
    held = [open_workspace(own, ClientTask(p, 3, 1), None).validation for p in range(3)]
    ws = open_workspace(pooled, ClientTask(1, 3, 1), None)
    assert ws.validation is not None and all(h is not None for h in held)
    assert np.array_equal(ws.validation.labels, np.concatenate([h.labels for h in held]))
    assert np.array_equal(ws.validation.images, np.concatenate([h.images for h in held]))
    # the client still trains on its own images only, without its held-out split
    assert len(ws.data.train) == len(open_workspace(own, ClientTask(1, 3, 1), None).data.train)
    with pytest.raises(ValueError, match="validation-scope = 'pooled' needs data.validation-fr"):
        make_cfg(tmp_path, "local-only", **{"data.validation-scope": "pooled"})
