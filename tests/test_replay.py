"""Generated images kept across rounds (``generation.replay-rounds``)."""

import numpy as np

from cmfl_flower.client.store import load_state, save_state
from cmfl_flower.client.task import ClientState, ClientTask
from cmfl_flower.config import AppConfig
from cmfl_flower.methods.relay import relay_round
from cmfl_flower.replay import Replay
from cmfl_flower.wire import TokenEntry, parse_reply, relay_arrays
from tests.test_strategies import ANY_SIZE


def _replay(senders: list[int], server_round: int) -> Replay:
    n = len(senders)
    images = np.full((n, 2, 2, 3), server_round, np.uint8)
    labels = np.arange(n, dtype=np.int64)
    rounds = np.full(n, server_round, np.int64)
    return Replay(images, labels, np.array(senders, np.int64), np.ones(n, np.float32), rounds)


def test_images_stay_for_their_rounds_and_a_screened_out_sender_goes():
    kept = Replay.empty().then(_replay([1, 2], 1), server_round=1, keep_rounds=2)
    kept = kept.then(_replay([3], 2), server_round=2, keep_rounds=2)
    assert kept.rounds.tolist() == [1, 1, 2] and kept.images.shape == (3, 2, 2, 3)
    kept = kept.then(_replay([1], 3), server_round=3, keep_rounds=2)
    assert kept.rounds.tolist() == [2, 3]  # round 1's images are two rounds old
    assert kept.without({3}).senders.tolist() == [1]
    assert Replay.empty().then(_replay([1], 4), 4, keep_rounds=0).state() is None
    back = Replay.from_state(kept.state())
    assert np.array_equal(back.images, kept.images) and back.senders.tolist() == [3, 1]


def _cfg(tmp_path, replay_rounds: int) -> AppConfig:
    return AppConfig.from_run_config(
        {
            "data.dir": str(tmp_path.parent / "data"),
            "generation.images-per-round": 4,
            "generation.steps": 2,
            "generation.replay-rounds": replay_rounds,
            "generation.uncovered": "none",  # only relayed images: counts below are theirs
            "tokens.epochs": 1,
            "tokens.objective": "clip",
        }
    )


def test_a_client_trains_again_on_its_last_rounds_images_and_saves_them(tmp_path):
    cfg = _cfg(tmp_path, replay_rounds=1)
    sender = relay_round(cfg, ClientTask(0, 2, 1), ClientState(), {})
    sent = parse_reply(sender.arrays, ANY_SIZE, labelled=True)
    received = relay_arrays([TokenEntry(0, e.class_id, e.vectors) for e in sent])
    second = relay_round(cfg, ClientTask(1, 2, 2), ClientState(), received)
    assert second.metrics["num-generated"] == 4 and second.metrics["num-replayed"] == 0
    assert second.state.replay is not None and len(second.state.replay["labels"]) == 4
    save_state(tmp_path / "state", second.state, 2, node_id=7)  # kept on disk like the rest
    saved = load_state(tmp_path / "state", 3)
    assert saved.replay is not None
    assert saved.replay["images"].equal(second.state.replay["images"])
    third = relay_round(cfg, ClientTask(1, 2, 3), saved, received)
    assert third.metrics["num-replayed"] == 4  # round 2's images trained round 3 again
    rounds = third.state.replay["rounds"].tolist()  # type: ignore[index]
    assert rounds == [3] * 4  # round 2's left: one round kept

    plain = relay_round(_cfg(tmp_path, 0), ClientTask(1, 2, 3), saved, received)
    assert plain.metrics["num-replayed"] == 0 and plain.state.replay is None
    assert third.metrics["encoder-loss"] != plain.metrics["encoder-loss"]
