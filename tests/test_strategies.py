"""Strategies driven through the real ServerApp/ClientApp code on an in-process grid."""

import json
import re

import numpy as np
import pytest
from flwr.app import Message, MetricRecord, RecordDict

from client_app import app as client_app
from cmfl_flower.weights import weighted_mean
from cmfl_flower.client_state import load_state
from cmfl_flower.config import AppConfig
from cmfl_flower.protocol import ARRAYS_KEY, METRICS_KEY
from cmfl_flower.results import RunRecorder
from cmfl_flower.strategies import build_strategy, run_federation
from cmfl_flower.strategies.base import from_record, to_record
from cmfl_flower.strategies.loopback import LoopbackGrid

TOKEN_DIM = 64


def make_cfg(tmp_path, strategy, rounds=2, **extra):
    flat = {
        "strategy": strategy,
        "federation.rounds": rounds,
        "federation.min-nodes": 2,
        "data.dir": str(tmp_path / "data"),
        "output.dir": str(tmp_path / "runs"),
        "output.run-name": strategy.replace(":", "-"),
        "generation.images-per-class": 2,
        "generation.steps": 2,
        "tokens.epochs": 1,
    }
    return AppConfig.from_run_config(flat | extra)


def run(tmp_path, strategy, num_nodes=4, rounds=2, overrides=None, **extra):
    cfg = make_cfg(tmp_path, strategy, rounds, **extra)
    grid = LoopbackGrid(client_app, num_nodes)
    grid.overrides.update(overrides or {})
    run_dir = run_federation(grid, cfg)
    rows = json.loads((run_dir / "clients.json").read_text())
    rounds_ = json.loads((run_dir / "rounds.json").read_text())
    return grid, rows, rounds_


def test_relay_messages_carry_only_token_vectors_and_scalars(tmp_path):
    grid, rows, rounds = run(tmp_path, "cmfl-relay", num_nodes=4, rounds=3)
    assert [r["replies"] for r in rounds] == [4, 4, 4]
    for reply in grid.replies:
        content = reply.content
        assert set(content.metric_records) == {METRICS_KEY}
        assert not content.config_records
        assert set(content.array_records) == {ARRAYS_KEY}
        for value in content.metric_records[METRICS_KEY].values():
            assert isinstance(value, (int, float))
        arrays = from_record(content.array_records[ARRAYS_KEY])
        assert arrays, "a relay reply carries the client's class tokens"
        for key, array in arrays.items():
            assert re.fullmatch(r"c\d+", key)
            # token-sized: (n_tokens <= 16, D); an image (32*32*3), a feature or a weight
            # matrix would not fit this shape
            assert array.dtype == np.float32 and array.ndim == 2
            assert array.shape[1] == TOKEN_DIM and 1 <= array.shape[0] <= 16
    by_round = {}
    for row in rows:
        by_round.setdefault(row["round"], []).append(row)
    assert all(row["num-generated"] == 0 for row in by_round[1])
    for server_round in (2, 3):
        assert all(row["num-generated"] > 0 for row in by_round[server_round])
    for row in rows:
        assert row["bytes-sent"] > 0 and row["bytes-received"] > 0
        for phase in ("tokens", "generation", "encoder", "eval"):
            assert row[f"seconds-{phase}"] >= 0
    assert rounds[1]["num-generated"] == sum(r["num-generated"] for r in by_round[2])


def test_relay_never_returns_a_client_its_own_vectors(tmp_path):
    grid, _, _ = run(tmp_path, "cmfl-relay", num_nodes=3, rounds=2)
    partition = {node: ctx.node_config["partition-id"] for node, ctx in grid.contexts.items()}
    later = [m for m in grid.sent if m.content.config_records["config"]["server-round"] == 2]
    assert len(later) == 3
    for message in later:
        senders = {int(k.split(".")[0][1:]) for k in from_record(message.content["arrays"])}
        own = partition[message.metadata.dst_node_id]
        assert senders and own not in senders
        assert senders == set(partition.values()) - {own}


def test_client_state_persists_between_rounds(tmp_path):
    run(tmp_path, "cmfl-relay", num_nodes=2, rounds=1)
    for pid in range(2):
        state = load_state(
            tmp_path / "runs" / "cmfl-relay" / "clients" / f"partition-{pid}" / "state", 2
        )
        assert state.lora and state.tokens


def test_unlabelled_relay_sends_no_class_ids_and_still_generates(tmp_path):
    grid, rows, _ = run(
        tmp_path, "cmfl-relay", num_nodes=3, rounds=2, **{"tokens.relay": "unlabelled"}
    )
    for message in grid.sent:
        record = message.content.array_records.get("arrays")
        keys = list(from_record(record)) if record else []
        assert all(re.fullmatch(r"s\d+\.v\d+", key) for key in keys)
    for reply in grid.replies:
        assert all(re.fullmatch(r"v\d+", k) for k in from_record(reply.content["arrays"]))
    assert all(row["num-generated"] > 0 for row in rows if row["round"] == 2)


def _raising(message, context):
    raise RuntimeError("client exploded")


def _nan_tokens(message, context):
    reply = client_app(message, context)
    arrays = {k: np.full_like(v, np.nan) for k, v in from_record(reply.content["arrays"]).items()}
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
    senders = {int(k.split(".")[0][1:]) for m in later for k in from_record(m.content["arrays"])}
    assert senders == {2, 3}


def test_weighted_mean_is_the_exact_example_weighted_mean():
    a = {"w": np.array([[1.0, 2.0]], np.float32), "b": np.array([0.0], np.float32)}
    b = {"w": np.array([[3.0, 6.0]], np.float32), "b": np.array([4.0], np.float32)}
    out = weighted_mean([(a, 1.0), (b, 3.0)])
    assert np.allclose(out["w"], [[(1 + 9) / 4, (2 + 18) / 4]]) and np.allclose(out["b"], [3.0])
    with pytest.raises(ValueError, match="differ in keys"):
        weighted_mean([(a, 1.0), ({"w": a["w"]}, 1.0)])


@pytest.mark.parametrize("strategy", ["fedavg-encoder", "fedprox-encoder"])
def test_encoder_averaging_sends_the_weighted_mean_back(tmp_path, strategy):
    grid, _, rounds = run(tmp_path, strategy, num_nodes=3, rounds=2)
    first = [r for r in grid.replies[:3]]
    items = [
        (from_record(r.content["arrays"]), float(r.content[METRICS_KEY]["num-train"]))
        for r in first
    ]
    expected = weighted_mean(items)
    second_round = grid.sent[3:]
    assert len(second_round) == 3
    for message in second_round:
        received = from_record(message.content["arrays"])
        assert set(received) == set(expected)
        for key in expected:
            assert np.allclose(received[key], expected[key])
    assert [r["averaged"] for r in rounds] == [3, 3]
    assert all(k.startswith("transformer.") for k in items[0][0])  # LoRA weights only


def test_plugin_strategy_by_import_path(tmp_path):
    grid, _, _ = run(tmp_path, "tests.example_plugin:BestPeerRelay", num_nodes=3, rounds=2)
    later = [m for m in grid.sent if m.content.config_records["config"]["server-round"] == 2]
    for message in later:  # one peer's vectors, never the client's own
        senders = {int(k.split(".")[0][1:]) for k in from_record(message.content["arrays"])}
        assert len(senders) == 1


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("no-such-strategy", "unknown; built in: cmfl-relay"),
        ("no_such_pkg.mod:Thing", "cannot be imported"),
        ("cmfl_flower.config:AppConfig", "not a subclass of CmflStrategy"),
    ],
)
def test_bad_strategy_names_are_refused(tmp_path, name, error):
    cfg = make_cfg(tmp_path, name)
    with pytest.raises(ValueError, match=error):
        build_strategy(cfg, RunRecorder.create(cfg))


def test_failed_run_is_recorded_as_failed(tmp_path):
    cfg = make_cfg(
        tmp_path, "local-only", **{"federation.min-nodes": 5, "federation.wait-for-nodes": 1.0}
    )
    grid = LoopbackGrid(client_app, 2)
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
    from cmfl_flower.token_round import _received_means
    from cmfl_flower.wire import TokenEntry

    a = np.ones((1, 4), np.float32)
    entries = [
        TokenEntry(0, 3, a),
        TokenEntry(1, 3, 3 * a),
        TokenEntry(2, 3, np.ones((2, 4), np.float32)),  # another token count: left out
        TokenEntry(1, None, a),  # unlabelled: no class to average into
    ]
    means = _received_means(entries)
    assert set(means) == {3} and np.allclose(means[3].numpy(), 2 * a)


def test_unseen_classes_can_use_their_pretrained_names(tmp_path):
    _, rows, rounds = run(
        tmp_path, "cmfl-relay", num_nodes=3, rounds=2, **{"tokens.unseen": "pretrained"}
    )
    assert [r["replies"] for r in rounds] == [3, 3]
    assert all(0.0 <= row["global-acc"] <= 1.0 for row in rows)


def _reply_classes(reply):
    record = reply.content.array_records.get(ARRAYS_KEY)
    return sorted(int(k[1:]) for k in from_record(record)) if record else []


@pytest.mark.parametrize("strategy", ["local-only-tokens", "names-generation"])
def test_baselines_with_tokens_send_nothing(tmp_path, strategy):
    grid, rows, rounds = run(tmp_path, strategy, num_nodes=2, rounds=1)
    assert [r["replies"] for r in rounds] == [2]
    assert all(_reply_classes(reply) == [] for reply in grid.replies)
    for row in rows:
        missing = 10 - row["num-token-classes"]
        if strategy == "names-generation":  # 2 images of every class it has no tokens for
            assert row["num-generated"] == 2 * missing > 0
            assert 0.0 <= row["generated-recognised"] <= 1.0
        else:
            assert row["num-generated"] == 0 and "generated-recognised" not in row
    if strategy == "names-generation":
        assert 0.0 <= rounds[0]["generated-recognised-mean"] <= 1.0


def test_classes_with_too_few_images_are_neither_learned_nor_relayed(tmp_path):
    from cmfl_flower.workspace import data_dir
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
