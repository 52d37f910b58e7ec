"""diffusion-unet and diffusion-lora on the tiny preset, through an in-process grid."""

import copy
import json
import re

import numpy as np
import pytest
import torch

from benchmarks.loopback import LoopbackGrid
from client_app import app as client_app
from cmfl_flower import checkpoint
from cmfl_flower.backbones import load_pipeline, resolve_preset
from cmfl_flower.client.store import read_state
from cmfl_flower.config import AppConfig, BackboneConfig, DiffusionConfig
from cmfl_flower.data import load_source
from cmfl_flower.fed_diffusion import load_optimizer_state, optimizer_state, round_lr
from cmfl_flower.fid import FrechetDistance, build_fd_metric
from cmfl_flower.methods.base import METRICS_KEY, from_record
from cmfl_flower.server.rounds import run_federation
from tests.test_strategies import make_cfg

FAST = {
    "diffusion.eval-samples": 8,
    "diffusion.sample-steps": 2,
    "diffusion.local-steps": 2,
    "diffusion.batch-size": 8,
}
LORA_KEY = re.compile(r".*\.(to_q|to_k|to_v|to_out\.0)\.lora_[AB]\.weight")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on the shared 2-core machine two threads make tiny convs 30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(tmp_path, method, nodes=3, rounds=2, **extra):
    cfg = make_cfg(tmp_path, method, rounds, **(FAST | extra))
    grid = LoopbackGrid(client_app, cfg, nodes, keep_messages=True)
    run_dir = run_federation(grid, cfg)
    return grid, run_dir, json.loads((run_dir / "rounds.json").read_text())


def of_round(messages, server_round, nodes):
    """Round ``server_round``'s messages (Flower's strategies reuse one config record)."""
    return messages[(server_round - 1) * nodes : server_round * nodes]


def test_diffusion_unet_trains_averages_and_publishes(tmp_path):
    grid, run_dir, rounds = run(tmp_path, "diffusion-unet", nodes=3, rounds=2)
    first = of_round(grid.replies, 1, 3)
    items = [
        (from_record(r.content["arrays"]), r.content[METRICS_KEY]["num-examples"]) for r in first
    ]
    total = sum(n for _, n in items)
    sent_2 = of_round(grid.sent, 2, 3)
    start = from_record(grid.sent[0].content["arrays"])
    for key in ("conv_in.weight", "time_embedding.linear_1.bias"):
        expected = sum(arrays[key].astype(np.float64) * n for arrays, n in items) / total
        assert not np.allclose(items[0][0][key], start[key])  # clients did train
        for message in sent_2:
            np.testing.assert_allclose(from_record(message.content["arrays"])[key], expected, 1e-6)
    assert [r["averaged"] for r in rounds] == [3, 3]
    for row in rounds:  # the whole UNet travels both ways
        assert row["bytes-sent"] > 3 * row["model-bytes"] * 0.99
        assert row["fd-clip"] > 0
    assert (run_dir / "samples" / "round-2.png").is_file()
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(run_dir / "model")
    final = checkpoint.load_checkpoint(run_dir)
    np.testing.assert_array_equal(
        pipe.unet.state_dict()["conv_in.weight"].numpy(), final.arrays["conv_in.weight"]
    )


def test_diffusion_lora_only_lora_weights_travel_and_the_adapter_loads(tmp_path):
    grid, run_dir, rounds = run(
        tmp_path, "diffusion-lora", nodes=2, rounds=2, **{"diffusion.images-per-client": 4}
    )
    seeded = from_record(grid.sent[0].content["arrays"])  # round 1: the seeded adapter
    assert all(not v.any() for k, v in seeded.items() if "lora_B" in k)
    messages = [*grid.replies, *grid.sent]
    for message in messages:
        arrays = from_record(message.content["arrays"])
        assert arrays and all(LORA_KEY.fullmatch(key) for key in arrays)
    assert all(r.content[METRICS_KEY]["num-train"] == 4 for r in grid.replies)
    for row in rounds:
        assert 0 < row["bytes-received"] < row["model-bytes"] / 10
        assert row["fd-clip"] > 0
    assert (run_dir / "samples" / "round-2.png").is_file()

    final = checkpoint.load_checkpoint(run_dir).arrays
    assert any(np.abs(v).max() > 0 for k, v in final.items() if "lora_B" in k)
    pipe = load_pipeline(resolve_preset(BackboneConfig()).diffusion, torch.device("cpu"))
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = pipe.unet(x, 10, encoder_hidden_states=text).sample
        pipe.load_lora_weights(str(run_dir / "adapter"))
        tuned = pipe.unet(x, 10, encoder_hidden_states=text).sample
    loaded = {n: p for n, p in pipe.unet.named_parameters() if "lora_" in n}
    assert len(loaded) == len(final)
    for key, value in final.items():  # same weights under the adapter name diffusers chose
        match = [p for n, p in loaded.items() if n.replace(".default_0", "") == key]
        assert len(match) == 1
        np.testing.assert_array_equal(match[0].detach().numpy(), value)
    assert not torch.allclose(base, tuned)


@pytest.mark.parametrize("method", ["diffusion-unet", "diffusion-lora"])
def test_resumed_run_gives_the_uninterrupted_next_round_weights(tmp_path, monkeypatch, method):
    extra = {"diffusion.images-per-client": 8, "output.run-name": "whole"}
    whole_cfg = make_cfg(tmp_path, method, 2, **(FAST | extra))
    whole = run_federation(LoopbackGrid(client_app, whole_cfg, 2), whole_cfg)

    save = checkpoint.save_checkpoint

    def stop_in_round_2(run_dir, state):  # stopped after round 1's checkpoint
        if state.round == 2:
            raise KeyboardInterrupt
        return save(run_dir, state)

    monkeypatch.setattr("cmfl_flower.server.rounds.save_checkpoint", stop_in_round_2)
    cfg = make_cfg(tmp_path, method, 2, **(FAST | extra | {"output.run-name": "cut"}))
    with pytest.raises(KeyboardInterrupt):
        run_federation(LoopbackGrid(client_app, cfg, 2), cfg)
    monkeypatch.setattr("cmfl_flower.server.rounds.save_checkpoint", save)
    resumed = AppConfig.from_run_config(cfg.to_run_config() | {"output.resume": True})
    cut = run_federation(
        LoopbackGrid(client_app, resumed, 2), resumed
    )  # a fresh server and clients

    expected, got = checkpoint.load_checkpoint(whole), checkpoint.load_checkpoint(cut)
    assert expected.round == got.round == 2 and set(got.arrays) == set(expected.arrays)
    for key, value in expected.arrays.items():
        np.testing.assert_array_equal(got.arrays[key], value)


@pytest.mark.parametrize("keep", [True, False])
def test_a_client_keeps_its_optimiser_state_from_round_to_round(tmp_path, keep):
    extra = {"diffusion.images-per-client": 8, "diffusion.keep-optimizer": keep}
    extra["federation.min-nodes"] = 1
    grid, run_dir, _ = run(tmp_path, "diffusion-unet", nodes=1, rounds=2, **extra)
    assert [r.content[METRICS_KEY]["state-round"] for r in grid.replies] == [0, 1]
    (saved,) = run_dir.glob("clients/partition-0/state/node-*/round-2.safetensors")
    optimizer = read_state(saved).optimizer
    if not keep:
        assert optimizer is None
        return
    assert optimizer is not None
    steps = {float(v) for k, v in optimizer.items() if k.endswith(".step")}
    assert steps == {4.0}  # 2 rounds x 2 local steps: round 2 went on from round 1's state
    assert any(k.endswith(".exp_avg_sq") and v.abs().sum() > 0 for k, v in optimizer.items())


def test_a_server_optimiser_fedavgm_carries_momentum_into_the_global_unet(tmp_path):
    extra = {"strategy": "fedavgm", "strategy-args": "server_momentum=0.9"}
    extra |= {"diffusion.images-per-client": 8, "diffusion.eval-every": 3}
    grid, _, rounds = run(tmp_path, "diffusion-unet", nodes=2, rounds=3, **extra)
    assert [r["averaged"] for r in rounds] == [2, 2, 2]
    key = "conv_in.weight"

    def mean_reply(server_round):
        replies = [
            from_record(r.content["arrays"])[key] for r in of_round(grid.replies, server_round, 2)
        ]
        return np.mean(replies, axis=0)  # equal num-examples: 8 images each

    def global_sent(server_round):
        return from_record(of_round(grid.sent, server_round, 2)[0].content["arrays"])[key]

    np.testing.assert_allclose(global_sent(2), mean_reply(1), atol=1e-6)  # first step: the mean
    assert not np.allclose(global_sent(3), mean_reply(2), atol=1e-6)  # then momentum adds to it


def test_the_global_model_is_measured_every_eval_every_rounds_and_after_the_last(tmp_path):
    extra = {"diffusion.images-per-client": 8, "diffusion.eval-every": 2}
    extra["federation.min-nodes"] = 1
    _, run_dir, rounds = run(tmp_path, "diffusion-unet", nodes=1, rounds=3, **extra)
    assert ["fd-clip" in row for row in rounds] == [False, True, True]
    grids = sorted(p.name for p in (run_dir / "samples").iterdir())
    assert grids == ["round-2.png", "round-3.png"]
    assert (run_dir / "model" / "unet").is_dir()  # saved every round


def _linear_steps(model, optimizer, count):
    x = torch.linspace(-1, 1, 12).reshape(4, 3)
    for _ in range(count):
        optimizer.zero_grad()
        model(x).pow(2).sum().backward()
        optimizer.step()


def test_a_restored_optimiser_continues_exactly_where_the_saved_one_stopped():
    torch.manual_seed(0)
    whole, cut = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    cut.load_state_dict(whole.state_dict())
    _linear_steps(whole, torch.optim.AdamW(whole.parameters(), lr=0.1), 3)
    first = torch.optim.AdamW(cut.parameters(), lr=0.1)
    _linear_steps(cut, first, 2)
    flat = optimizer_state(first)
    fresh = copy.deepcopy(cut)
    _linear_steps(fresh, torch.optim.AdamW(fresh.parameters(), lr=0.1), 1)
    restored = torch.optim.AdamW(cut.parameters(), lr=0.1)
    load_optimizer_state(restored, list(cut.parameters()), flat)
    _linear_steps(cut, restored, 1)
    assert torch.equal(cut.weight, whole.weight)
    assert not torch.allclose(fresh.weight, whole.weight)  # a fresh AdamW would not
    later = torch.optim.AdamW(cut.parameters(), lr=0.02)  # the schedule's next rate
    load_optimizer_state(later, list(cut.parameters()), flat)
    assert later.param_groups[0]["lr"] == 0.02 and later.state[cut.weight]["step"] == 2


def test_optimiser_state_saved_by_another_model_is_refused():
    small, large = torch.nn.Linear(3, 2), torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(small.parameters())
    _linear_steps(small, optimizer, 1)
    flat = optimizer_state(optimizer)
    target = torch.optim.AdamW(large.parameters())
    with pytest.raises(ValueError, match=r"0\.exp_avg has shape \(2, 3\), its parameter \(2, 4\)"):
        load_optimizer_state(target, list(large.parameters()), flat)
    with pytest.raises(ValueError, match="covers 2 parameters, the model has 1"):
        load_optimizer_state(target, [large.weight], flat)


def test_the_cosine_schedule_runs_from_the_rate_to_its_final_share():
    cosine = DiffusionConfig(lr=1e-3, lr_schedule="cosine", lr_final=0.1)
    assert round_lr(cosine, 1, 5) == pytest.approx(1e-3)
    assert round_lr(cosine, 3, 5) == pytest.approx(5.5e-4)
    assert round_lr(cosine, 5, 5) == pytest.approx(1e-4)
    assert round_lr(cosine, 8, 5) == pytest.approx(1e-4)  # a run that goes on stays at the end
    assert round_lr(DiffusionConfig(lr=1e-3), 4, 5) == 1e-3


def test_missing_inception_weights_file_is_a_clear_error(tmp_path):
    preset = resolve_preset(BackboneConfig())
    cfg = DiffusionConfig(fid="inception", inception_weights=str(tmp_path / "nope.pth"))
    with pytest.raises(ValueError, match=r"^diffusion\.inception-weights = .*nope\.pth"):
        build_fd_metric(cfg, preset, "cpu")
    with pytest.raises(ValueError, match="diffusion.inception-weights"):
        build_fd_metric(DiffusionConfig(fid="inception"), preset, "cpu")


def _he_init(key, value):
    """Random weights that keep a signal through Inception's depth (BN as identity)."""
    if value.ndim == 4:  # conv (out, in, kh, kw)
        return torch.randn_like(value) * (2.0 / value[0].numel()) ** 0.5
    if key.endswith(("running_var", "bn.weight")):
        return torch.ones_like(value)
    return torch.randn_like(value) * 0.01 if value.ndim == 2 else torch.zeros_like(value)


def test_inception_fid_reads_the_user_supplied_weights_file(tmp_path, monkeypatch):
    # a weights file with torch-fidelity's layout (random values: no download here)
    from torch_fidelity import feature_extractor_inceptionv3 as fidelity

    with monkeypatch.context() as patch:
        patch.setattr(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda *a: None)
        patch.setattr(fidelity.torch, "load", lambda *a, **k: {})
        torch.manual_seed(0)
        model = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], "unused")
    state = {
        key: _he_init(key, v) for key, v in model.state_dict().items() if v.is_floating_point()
    }
    weights = tmp_path / "inception.pth"
    torch.save(state, weights)
    cfg = DiffusionConfig(fid="inception", inception_weights=str(weights))
    reference = load_source("digits", "test", "").images[:12]  # (12, 8, 8, 3)
    distance = FrechetDistance(
        build_fd_metric(cfg, resolve_preset(BackboneConfig()), "cpu"), reference
    )
    assert abs(distance(reference)) < 1e-2
    assert distance(255 - reference) > 1.0


def test_clip_frechet_distance_is_zero_for_the_same_set_and_grows_with_a_shift():
    images = load_source("digits", "test", "").images  # (360, 8, 8, 3)
    metric = build_fd_metric(DiffusionConfig(), resolve_preset(BackboneConfig()), "cpu")
    distance = FrechetDistance(metric, images[:180])
    same = distance(images[:180])
    other_half = distance(images[180:])
    shifted = distance(np.roll(images[180:], 2, axis=2))
    inverted = distance(255 - images[180:])
    assert abs(same) < 1e-3
    assert same < other_half < shifted and other_half < inverted
