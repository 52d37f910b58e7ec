"""Lacking classes no accepted relayed set covers are generated from their names.

``generation.uncovered = names``: what a client can still learn of a class whose only holders
were screened out, quarantined or silent.
"""

from pathlib import Path

import numpy as np

from cmfl_flower.client.task import ClientState, ClientTask, RoundOutput
from cmfl_flower.config import AppConfig
from cmfl_flower.methods.relay import relay_round
from cmfl_flower.wire import TokenEntry, parse_reply, relay_arrays
from tests.test_strategies import ANY_SIZE

BUDGET = 4  # images per round: the one relayed set gets them all


def _cfg(tmp_path: Path, uncovered: str, **extra: object) -> AppConfig:
    return AppConfig.from_run_config(
        {
            "data.dir": str(tmp_path.parent / "data"),
            "generation.images-per-round": BUDGET,
            "generation.steps": 2,
            "generation.replay-rounds": 0,
            "generation.uncovered": uncovered,
            "tokens.epochs": 1,
            "tokens.objective": "clip",
        }
        | extra
    )


def _held(out: RoundOutput) -> set[int]:
    return {int(key[1:]) for key in out.state.tokens or {} if key.startswith("c")}


def test_a_lacking_class_nobody_relays_is_generated_from_its_name(tmp_path):
    cfg = _cfg(tmp_path, "names")
    sender = relay_round(cfg, ClientTask(0, 2, 1), ClientState(), {})
    first = parse_reply(sender.arrays, ANY_SIZE, labelled=True)[0]
    received = relay_arrays([TokenEntry(0, first.class_id, first.vectors)])  # one class only
    out = relay_round(cfg, ClientTask(1, 2, 2), ClientState(), received)
    metrics, held = out.metrics, _held(out)
    covered = {first.class_id} - held if metrics.get("kept-s0") else set()
    uncovered = set(range(10)) - held - covered
    assert uncovered  # the receiver lacks classes the sender did not send
    assert metrics["num-generated-from-names"] == BUDGET * len(uncovered)
    assert metrics["num-generated"] == BUDGET + BUDGET * len(uncovered)

    off = relay_round(_cfg(tmp_path, "none"), ClientTask(1, 2, 2), ClientState(), received)
    assert off.metrics["num-generated-from-names"] == 0
    assert off.metrics["num-generated"] == BUDGET
    assert np.isfinite(off.metrics["global-acc"]) and np.isfinite(metrics["global-acc"])


def test_nothing_is_generated_from_names_before_anything_is_relayed_or_for_opaque_names(tmp_path):
    first = relay_round(_cfg(tmp_path, "names"), ClientTask(1, 2, 1), ClientState(), {})
    assert first.metrics["num-generated-from-names"] == 0  # round 1 relays nothing
    opaque = _cfg(tmp_path, "names", **{"data.class-names": "opaque"})
    sender = relay_round(opaque, ClientTask(0, 2, 1), ClientState(), {})
    sent = parse_reply(sender.arrays, ANY_SIZE, labelled=True)[:1]
    received = relay_arrays([TokenEntry(0, e.class_id, e.vectors) for e in sent])
    out = relay_round(opaque, ClientTask(1, 2, 2), ClientState(), received)
    assert out.metrics["num-generated-from-names"] == 0  # an opaque name means nothing
