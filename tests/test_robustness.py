"""Bad replies are refused, counted and survived; too few replies stop a run with a clear error."""

import json

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)

from benchmarks.loopback import LoopbackGrid
from client_app import app as client_app
from cmfl_flower.config import AppConfig
from cmfl_flower.methods.base import ARRAYS_KEY, METRICS_KEY, from_record, to_record
from cmfl_flower.server.replies import refusal_kind
from cmfl_flower.server.rounds import run_federation
from cmfl_flower.weights import weights_problem
from tests.test_strategies import make_cfg, relayed

D = 64  # token width of the tiny backbone
GOOD = np.zeros((1, D), np.float32)


def _reply(message, metrics=None, arrays=None, **records):
    content = RecordDict(records)
    if metrics is not None:
        content[METRICS_KEY] = MetricRecord(metrics)
    if arrays is not None:
        content[ARRAYS_KEY] = arrays
    return Message(content, reply_to=message)


def _packed(vectors, index=None):
    """A relay reply: ``vectors`` and an index naming class 0 with all their rows."""
    rows = [[0, len(vectors)]] if index is None else index
    return {"vectors": vectors, "index": np.asarray(rows, np.int32)}


GOOD_REPLY = _packed(GOOD)


def _garbled():
    """An Array whose bytes do not decode as the dtype and shape it claims."""
    garbled = Array(dtype="float32", shape=(1, D), stype="numpy.ndarray", data=b"\x00\x01")
    return ArrayRecord({"vectors": garbled, "index": Array(GOOD_REPLY["index"])})


# kind of refusal expected -> what a hostile client sends instead of its class tokens
HOSTILE = {
    "shape": lambda pid: _packed(np.zeros((1, D, 1), np.float32)),
    "dim": lambda pid: _packed(np.zeros((1, D // 2), np.float32)),
    "nan": lambda pid: _packed(np.full((1, D), np.nan, np.float32)),
    "inf": lambda pid: _packed(np.full((1, D), np.inf, np.float32)),
    "size": lambda pid: _packed(np.zeros((20_000, D), np.float32)),  # 5.1 MB > max-bytes
    "tokens": lambda pid: _packed(np.zeros((17, D), np.float32)),  # > tokens.max-tokens
    "index": lambda pid: _packed(GOOD, [[0, 2]]),  # names 2 rows, sends 1
    "class-id": lambda pid: _packed(GOOD, [[99, 1]]),
    "dtype": lambda pid: _packed(GOOD.astype(np.float64)),
    "int-dtype": lambda pid: _packed(np.zeros((1, D), np.int32)),
    "key": lambda pid: {"weights": GOOD},
}
EXPECTED_KIND = {"nan": "non-finite", "inf": "non-finite", "int-dtype": "dtype"}


def _round(message):
    """The round a server message names (what an honest reply names back)."""
    return message.content["config"]["server-round"]


def _hostile_app(kind):
    def app(message, context):
        pid = context.node_config["partition-id"]
        metrics = {"partition-id": pid, "num-train": 10, "server-round": _round(message)}
        if kind == "error":
            return Message(Error(code=7, reason="hostile error reply"), reply_to=message)
        if kind == "missing-metrics":
            return _reply(message, arrays=to_record(GOOD_REPLY))
        if kind == "extra-record":
            return _reply(message, metrics, to_record(GOOD_REPLY), debug=ConfigRecord({"x": 1}))
        if kind == "unreadable":
            return _reply(message, metrics, _garbled())
        if kind == "list-metric":
            return _reply(message, metrics | {"local-acc": [1.0, 1.0]}, to_record(GOOD_REPLY))
        if kind == "forged-node-id":
            return _reply(message, metrics | {"node-id": 1}, to_record(GOOD_REPLY))
        return _reply(message, metrics, to_record(HOSTILE[kind](pid)))

    return app


KINDS = [
    *HOSTILE,
    "error",
    "missing-metrics",
    "extra-record",
    "unreadable",
    "list-metric",
    "forged-node-id",
]
REFUSAL = EXPECTED_KIND | {
    "missing-metrics": "records",
    "extra-record": "records",
    "list-metric": "metrics",
    "forged-node-id": "metrics",
}
HONEST = 2


def _raising(message, context):
    raise RuntimeError("silent node")


def _run(tmp_path, name, hostile):
    cfg = make_cfg(
        tmp_path,
        "cmfl-relay",
        2,
        **{
            "output.run-name": name,
            "data.partitioner": "pathological",  # one class per client: little to generate
            "data.classes-per-client": 1,
            "data.min-partition-size": 1,
            "federation.min-replies": HONEST,  # the default asks for half of the nodes
        },
    )
    grid = LoopbackGrid(client_app, cfg, HONEST + len(KINDS), keep_messages=True)
    for offset, kind in enumerate(KINDS):
        grid.overrides[1000 + HONEST + offset] = _hostile_app(kind) if hostile else _raising
    run_dir = run_federation(grid, cfg)
    return grid, run_dir


def _honest_view(grid, run_dir, honest=range(HONEST)):
    """Honest clients' rows (timings aside) and everything the server sent them."""
    rows = [
        {k: v for k, v in row.items() if not k.startswith("seconds-")}
        for row in json.loads((run_dir / "clients.json").read_text())
        if row.get("partition-id", -1) in honest and "error" not in row and "refused" not in row
    ]
    sent = [
        {k: v.numpy() for k, v in m.content.array_records.get(ARRAYS_KEY, {}).items()}
        for m in grid.sent
        if m.metadata.dst_node_id - 1000 in honest
    ]
    return rows, sent


def test_hostile_replies_are_refused_and_do_not_change_honest_results(tmp_path):
    grid, run_dir = _run(tmp_path, "hostile", hostile=True)
    rounds = json.loads((run_dir / "rounds.json").read_text())
    for summary in rounds:
        assert summary["replies"] == HONEST
        assert summary["errors"] == 1
        assert summary["refused"] == len(KINDS) - 1
        for kind in {REFUSAL.get(k, k) for k in KINDS} - {"error"}:
            expected = sum(REFUSAL.get(k, k) == kind for k in KINDS)
            assert summary[f"refused-{kind}"] == expected, kind
    refused = [r for r in json.loads((run_dir / "clients.json").read_text()) if "refused" in r]
    assert all(r["node-id"] >= 1000 + HONEST for r in refused)  # forged node-id not taken
    # only honest vectors are ever relayed
    senders = {entry.sender for message in grid.sent for entry in relayed(message)}
    assert senders and senders <= set(range(HONEST))

    silent_grid, silent_dir = _run(tmp_path, "silence", hostile=False)  # same name length
    hostile_rows, hostile_sent = _honest_view(grid, run_dir)
    silent_rows, silent_sent = _honest_view(silent_grid, silent_dir)
    assert len(hostile_rows) == 2 * HONEST
    for a, b in zip(hostile_rows, silent_rows, strict=True):
        assert a == b
    for a, b in zip(hostile_sent, silent_sent, strict=True):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_refusal_kinds_are_read_from_the_reason():
    assert refusal_kind("dim: vectors: embedding dim 32") == "dim"
    assert refusal_kind("something odd happened") == "other"


def test_averaging_refuses_adapters_it_cannot_average():
    ref = {"a": np.zeros((2, 3), np.float32)}
    assert weights_problem({"a": np.zeros((2, 3), np.float32)}, ref) is None
    assert refusal_kind(weights_problem({"b": ref["a"]}, ref) or "") == "keys"
    assert refusal_kind(weights_problem({"a": np.zeros((2, 4), np.float32)}, ref) or "") == "shape"
    assert refusal_kind(weights_problem({"a": np.zeros((2, 3), np.int64)}, ref) or "") == "dtype"
    bad = np.full((2, 3), np.nan, np.float32)
    assert refusal_kind(weights_problem({"a": bad}, ref) or "") == "non-finite"


def test_a_client_raising_every_round_is_survived(tmp_path):
    cfg = make_cfg(tmp_path, "local-only", 2)
    grid = LoopbackGrid(client_app, cfg, 2)
    grid.overrides[1000] = _raising
    run_dir = run_federation(grid, cfg)
    rounds = json.loads((run_dir / "rounds.json").read_text())
    assert [(r["replies"], r["errors"]) for r in rounds] == [(1, 1), (1, 1)]
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"


def test_too_few_replies_stop_the_run_as_failed(tmp_path):
    cfg = make_cfg(tmp_path, "local-only", 2, **{"federation.min-replies": 2})
    grid = LoopbackGrid(client_app, cfg, 2)
    grid.overrides[1000] = _raising
    with pytest.raises(
        RuntimeError, match=r"round 1: 1 usable replies, federation.min-replies = 2"
    ):
        run_federation(grid, cfg)
    run_dir = tmp_path / "runs" / "local-only"
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "failed" and "silent node" in status["error"]
    assert [r["round"] for r in json.loads((run_dir / "rounds.json").read_text())] == [1]


def _sign_flipping(message, context):
    """An attacker: trains honestly, then sends its adapter flipped and scaled by 50."""
    reply = client_app(message, context)
    arrays = {k: -50.0 * v for k, v in from_record(reply.content[ARRAYS_KEY]).items()}
    content = RecordDict({METRICS_KEY: reply.content[METRICS_KEY], ARRAYS_KEY: to_record(arrays)})
    return Message(content, reply_to=message)


ROBUST_NODES = 5  # 4 honest clients and 1 attacker: Krum needs n > 2f + 2
NORM_SCREENED = "examples.norm_screened:NormScreenedFedAvg"  # the custom-strategy example
STRATEGY_ARGS = {"krum": "num_malicious_nodes=1", NORM_SCREENED: "max_ratio=3.0"}


def robust_accuracy(tmp_path, strategy: str, attacked: bool = True) -> float:
    """``server-global-acc`` after 1 round of encoder-lora beside one sign-flipping client."""
    cfg = make_cfg(
        tmp_path,
        "encoder-lora",
        1,
        **{
            "strategy": strategy,
            "strategy-args": STRATEGY_ARGS.get(strategy, ""),
            "output.run-name": f"robust-{strategy.rpartition(':')[2]}-{attacked}",
            "data.partitioner": "iid",
            "backbone.preset": "tiny-fewshot",  # zero-shot 0.69: the adapter matters
        },
    )
    grid = LoopbackGrid(client_app, cfg, ROBUST_NODES)
    if attacked:
        grid.overrides[1000 + ROBUST_NODES - 1] = _sign_flipping
    run_dir = run_federation(grid, cfg)
    return float(json.loads((run_dir / "rounds.json").read_text())[-1]["server-global-acc"])


def test_robust_aggregation_holds_where_fedavg_loses_it(tmp_path):
    honest = robust_accuracy(tmp_path, "fedavg", attacked=False)
    robust = ("krum", "fedmedian", "fedtrimmedavg", NORM_SCREENED)
    scores = {s: robust_accuracy(tmp_path, s) for s in ("fedavg", *robust)}
    print(f"server-global-acc: no attacker {honest:.3f}; beside a sign-flipping client {scores}")
    assert scores["fedavg"] <= honest - 0.3
    assert all(scores[s] >= honest - 0.05 for s in robust)


def test_a_second_node_claiming_a_partition_is_refused(tmp_path):
    cfg = make_cfg(tmp_path, "cmfl-relay", 1, **{"output.run-name": "twins"})
    grid = LoopbackGrid(client_app, cfg, 3, keep_messages=True)
    grid.contexts[1002].node_config["partition-id"] = 1  # an operator slip: two nodes say 1
    run_dir = run_federation(grid, cfg)
    (summary,) = json.loads((run_dir / "rounds.json").read_text())
    assert summary["replies"] == 2 and summary["refused-partition-claim"] == 1
    (refused,) = [r for r in json.loads((run_dir / "clients.json").read_text()) if "refused" in r]
    assert refused["node-id"] == 1002
    assert "partition-id 1 is bound to live node 1001; node 1002's claim" in refused["refused"]
    assert {entry.sender for message in grid.sent for entry in relayed(message)} <= {0, 1}


def _claiming(grid, partition):
    """Node 1000's ClientApp: silent in round 1, then it claims ``partition`` (bound by then)."""
    claimed = Context(
        run_id=1, node_id=1000, state=RecordDict(), run_config=dict(grid.contexts[1000].run_config),
        node_config={"partition-id": partition, "num-partitions": len(grid.contexts)},
    )  # fmt: skip

    def app(message, context):
        if _round(message) == 1:
            raise RuntimeError("not yet")
        return client_app(message, claimed)

    return app


def test_a_claim_of_a_live_nodes_partition_never_displaces_its_holder(tmp_path):
    """Node 1000 claims partition 1 from round 2 on; node 1001 holds it since round 1.

    Replies are checked in node order, so a rule that only refused the second of two claims
    in one round would take 1000's and refuse the honest 1001.
    """
    runs = {}
    for name, app in (("claim", _claiming), ("quiet", lambda grid, _: _raising)):
        cfg = make_cfg(tmp_path, "cmfl-relay", 2, **{"output.run-name": name})
        grid = LoopbackGrid(client_app, cfg, 3, keep_messages=True)
        grid.overrides[1000] = app(grid, 1)
        runs[name] = grid, run_federation(grid, cfg)
    grid, run_dir = runs["claim"]
    rounds = json.loads((run_dir / "rounds.json").read_text())
    assert [(r["replies"], r.get("refused-partition-claim")) for r in rounds] == [
        (2, None),
        (2, 1),
    ]
    (refused,) = [r for r in json.loads((run_dir / "clients.json").read_text()) if "refused" in r]
    assert refused["node-id"] == 1000 and refused["refused"] == (
        "partition-claim: partition-id 1 is bound to live node 1001; node 1000's claim refused"
    )
    assert not any("partitions-moved" in r for r in rounds)
    # the holder's rows, and everything the server sent the honest nodes, as without the claim
    quiet_rows, quiet_sent = _honest_view(*runs["quiet"], honest=range(1, 3))
    claim_rows, claim_sent = _honest_view(grid, run_dir, honest=range(1, 3))
    assert len(claim_rows) == 4 and claim_rows == quiet_rows
    for a, b in zip(claim_sent, quiet_sent, strict=True):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _claims(partition):
    """A ClientApp that trains honestly and names ``partition`` in its reply."""

    def app(message, context):
        reply = client_app(message, context)
        metrics = dict(reply.content[METRICS_KEY]) | {"partition-id": partition}
        return _reply(message, metrics)

    return app


def test_partition_ids_outside_the_partitions_are_refused(tmp_path):
    cfg = make_cfg(tmp_path, "local-only", 1, **{"federation.num-partitions": 3})
    grid = LoopbackGrid(client_app, cfg, 4)  # node 1003's own config names partition 3
    grid.overrides[1002] = _claims(7)
    run_dir = run_federation(grid, cfg)
    (summary,) = json.loads((run_dir / "rounds.json").read_text())
    assert summary["replies"] == 2 and summary["refused-partition-id"] == 2
    rows = json.loads((run_dir / "clients.json").read_text())
    refused = {r["node-id"]: r["refused"] for r in rows if "refused" in r}
    assert refused == {
        1002: "partition-id: partition-id 7 is outside 0..2 (federation.num-partitions, else "
        "the nodes connected at the start)",
        1003: "partition-id: partition-id 3 is outside 0..2 (federation.num-partitions, else "
        "the nodes connected at the start)",
    }


def test_a_node_keeps_the_one_partition_it_is_bound_to(tmp_path):
    """Node 1002, bound to partition 2 in round 1, claims the unclaimed partition 3 in round 2."""

    def moving(message, context):
        return (_claims(3) if _round(message) == 2 else client_app)(message, context)

    cfg = make_cfg(tmp_path, "local-only", 2, **{"federation.num-partitions": 4})
    grid = LoopbackGrid(client_app, cfg, 3)
    grid.overrides[1002] = moving
    run_dir = run_federation(grid, cfg)
    rounds = json.loads((run_dir / "rounds.json").read_text())
    assert [r.get("refused-partition-claim") for r in rounds] == [None, 1]
    (refused,) = [r for r in json.loads((run_dir / "clients.json").read_text()) if "refused" in r]
    assert refused["refused"] == (
        "partition-claim: node 1002 is bound to partition-id 2; its claim of partition-id 3 refused"
    )
    assert rounds[1].get("partitions-missing") == "2"


def test_partition_bindings_survive_a_resume(tmp_path):
    """After a server restart, node 999 (checked first) claims partition 1, bound to 1001."""
    cfg = make_cfg(tmp_path, "local-only", 1, **{"output.run-name": "bound"})
    grid = LoopbackGrid(client_app, cfg, 2)
    run_dir = run_federation(grid, cfg)
    meta = json.loads((run_dir / "checkpoint" / "latest.json").read_text())["meta"]
    assert meta["session"] == {"bound": {"0": 1000, "1": 1001}, "num-partitions": 2}
    resumed = AppConfig.from_run_config(
        cfg.to_run_config() | {"output.resume": True, "federation.rounds": 2}
    )
    grid = LoopbackGrid(client_app, resumed, 2)  # the same SuperNodes, and a new one
    grid.contexts[999] = Context(
        run_id=1, node_id=999, state=RecordDict(), run_config=resumed.to_run_config(),
        node_config={"partition-id": 1, "num-partitions": 2},
    )  # fmt: skip
    assert run_federation(grid, resumed) == run_dir
    rows = [r for r in json.loads((run_dir / "clients.json").read_text()) if r["round"] == 2]
    assert {r["node-id"]: r.get("refused", "").split(":")[0] for r in rows} == {
        999: "partition-claim",
        1000: "",
        1001: "",
    }


@pytest.mark.parametrize("method", ["local-only", "encoder-lora"])
def test_replies_naming_another_round_or_none_are_refused_as_stale(tmp_path, method):
    def stale(message, context):
        reply = client_app(message, context)
        metrics = dict(reply.content[METRICS_KEY]) | {"server-round": _round(message) - 1}
        return _reply(message, metrics, reply.content.array_records.get(ARRAYS_KEY))

    def undated(message, context):
        reply = client_app(message, context)
        metrics = {k: v for k, v in reply.content[METRICS_KEY].items() if k != "server-round"}
        return _reply(message, metrics, reply.content.array_records.get(ARRAYS_KEY))

    evaluate = {"federation.fraction-evaluate": 1.0} if method == "encoder-lora" else {}
    cfg = make_cfg(tmp_path, method, 1, **{"encoder.epochs": 1}, **evaluate)
    grid = LoopbackGrid(client_app, cfg, 4, keep_messages=True)
    grid.overrides |= {1002: stale, 1003: undated}
    run_dir = run_federation(grid, cfg)
    (summary,) = json.loads((run_dir / "rounds.json").read_text())
    assert (summary["replies"], summary["refused"], summary["refused-stale"]) == (2, 2, 2)
    assert summary["accepted-share"] == 0.5
    rows = {r["node-id"]: r for r in json.loads((run_dir / "clients.json").read_text())}
    assert rows[1002]["refused"] == "stale: the reply names server-round 0; round 1 is in progress"
    assert rows[1003]["refused"] == "stale: the reply names no server-round; round 1 is in progress"
    # the honest replies' server-round is gone before the strategy and the rows see them
    honest = [r for r in grid.replies if r.metadata.src_node_id < 1002]  # train, evaluate
    assert honest and not any("server-round" in r.content[METRICS_KEY] for r in honest)
    assert not any("server-round" in row for row in rows.values())
    if method == "encoder-lora":  # a stale evaluation is dropped too
        assert summary["averaged"] == 2
        evaluated = {node for node, row in rows.items() if "eval-local-acc" in row}
        assert evaluated == {1000, 1001} and summary["eval-local-acc-mean"] >= 0.0


def test_one_reply_of_four_fails_the_run_at_the_default_min_replies(tmp_path):
    cfg = make_cfg(tmp_path, "local-only", 2)
    grid = LoopbackGrid(client_app, cfg, 4)
    grid.overrides |= dict.fromkeys((1001, 1002, 1003), _raising)
    message = (
        "round 1: 1 usable replies, 2 needed: half of the 4 sampled nodes, rounded up (the "
        "default, federation.min-replies = 0); 3 errors, 0 refused, 0 without reply; first "
        "problem: RuntimeError('silent node')"
    )
    with pytest.raises(RuntimeError) as raised:
        run_federation(grid, cfg)
    assert str(raised.value) == message
    run_dir = tmp_path / "runs" / "local-only"
    (summary,) = json.loads((run_dir / "rounds.json").read_text())
    assert summary["accepted-share"] == 0.25
    assert json.loads((run_dir / "status.json").read_text())["status"] == "failed"
    assert "<li>round 1: accepted-share 0.25: 1 of 4" in (run_dir / "report.html").read_text()


def test_partitions_not_sampled_are_not_missing(tmp_path):
    cfg = make_cfg(tmp_path, "local-only", 4, **{"federation.fraction": 0.5})
    run_dir = run_federation(LoopbackGrid(client_app, cfg, 4), cfg)
    rounds = json.loads((run_dir / "rounds.json").read_text())
    assert [r["sampled"] for r in rounds] == [2, 2, 2, 2]
    assert not any("partitions-missing" in r for r in rounds)


def test_a_lost_node_does_not_end_a_run_of_flowers_strategy(tmp_path):
    cfg = make_cfg(tmp_path, "encoder-lora", 3, **{"federation.min-nodes": 3})
    grid = LoopbackGrid(client_app, cfg, 3)

    def lost_in_round_2(message, context):
        del grid.contexts[1002]  # gone for good: no longer among the connected nodes
        raise RuntimeError("node lost")

    def flaky(message, context):
        if message.content["config"]["server-round"] >= 2:
            return lost_in_round_2(message, context)
        return client_app(message, context)

    grid.overrides[1002] = flaky
    run_dir = run_federation(grid, cfg)
    rounds = json.loads((run_dir / "rounds.json").read_text())
    assert [(r["sampled"], r["replies"]) for r in rounds] == [(3, 3), (3, 2), (2, 2)]
    assert [r.get("partitions-missing") for r in rounds] == [None, "2", "2"]
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"


def test_a_restarted_node_rejoins_from_its_state_on_disk(tmp_path):
    cfg = make_cfg(tmp_path, "cmfl-relay", 3, **{"federation.min-nodes": 3})
    grid = LoopbackGrid(client_app, cfg, 3)

    def lost_then_restarted(message, context):
        old = grid.contexts.pop(1002)  # the machine goes down ...
        grid.contexts[2002] = Context(  # ... and comes back as a new node, same partition
            run_id=1, node_id=2002, node_config=dict(old.node_config), state=RecordDict(),
            run_config=dict(old.run_config),
        )  # fmt: skip
        raise RuntimeError("node lost")

    def flaky(message, context):
        if message.content["config"]["server-round"] == 2:
            return lost_then_restarted(message, context)
        return client_app(message, context)

    grid.overrides[1002] = flaky
    run_dir = run_federation(grid, cfg)
    rounds = json.loads((run_dir / "rounds.json").read_text())
    assert [(r["replies"], r.get("partitions-missing")) for r in rounds] == [
        (3, None),
        (2, "2"),
        (3, None),
    ]
    assert [r.get("partitions-moved") for r in rounds] == [None, None, "2:1002->2002"]
    rows = json.loads((run_dir / "clients.json").read_text())
    assert {r["node-id"] for r in rows if r["round"] == 3} == {1000, 1001, 2002}
    rejoined = next(r for r in rows if r["round"] == 3 and r["node-id"] == 2002)
    assert rejoined["state-round"] == 1  # round 3 began from what node 1002 saved after round 1
    trained = [r for r in rows if "error" not in r and r["node-id"] != 2002]
    assert all(r["state-round"] == r["round"] - 1 for r in trained)
