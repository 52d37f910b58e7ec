"""One backbone per process: clients share the CLIP and the pipeline, never their adapters."""

import torch

from cmfl_flower.backbones import resolve_preset
from cmfl_flower.client.task import ClientState, ClientTask
from cmfl_flower.client.workspace import open_workspace
from cmfl_flower.config import AppConfig
from cmfl_flower.generation import load_generator
from cmfl_flower.methods.relay import relay_round
from cmfl_flower.wire import TokenEntry, parse_reply, relay_arrays
from tests.test_strategies import ANY_SIZE


def make_cfg(tmp_path) -> AppConfig:
    return AppConfig.from_run_config(
        {
            "data.dir": str(tmp_path / "data"),
            "generation.images-per-class": 1,
            "generation.steps": 2,
            "tokens.epochs": 1,
        }
    )


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_clients_share_the_backbone_but_keep_their_own_adapter_and_bank(tmp_path):
    cfg = make_cfg(tmp_path)
    first, second = ClientTask(0, 2, 1), ClientTask(1, 2, 1)
    out0 = relay_round(cfg, first, ClientState(), {})
    kept = {k: v.clone() for k, v in out0.state.lora.items()}

    ws1 = open_workspace(cfg, second, None)  # a fresh client after client 0 trained
    assert ws1.encoder.bundle.model is open_workspace(cfg, first, None).encoder.bundle.model
    assert same(ws1.encoder.lora_state(), ws1.encoder.init_state)  # 0's adapter did not leak
    assert not same(out0.state.lora, ws1.encoder.init_state)  # ... and 0 did train one

    sent = parse_reply(out0.arrays, ANY_SIZE, labelled=True)
    received = relay_arrays([TokenEntry(0, e.class_id, e.vectors) for e in sent])  # relayed
    out1 = relay_round(cfg, ClientTask(1, 2, 2), ClientState(), received)
    assert out1.metrics["num-generated"] > 0
    assert same(out0.state.lora, kept)  # training client 1 left client 0's saved adapter alone
    assert not same(out1.state.lora, out0.state.lora)
    banks = [set(out.state.tokens) for out in (out0, out1)]
    assert banks[0] and banks[1] and banks[0] != banks[1]  # each bank holds its own classes

    again = open_workspace(cfg, first, out0.state.lora)  # client 0 comes back
    assert again.encoder is ws1.encoder
    assert same(again.encoder.lora_state(), out0.state.lora)

    device = str(ws1.encoder.bundle.device)
    generator = load_generator(resolve_preset(cfg.backbone), device, cfg.tokens.template)
    assert load_generator(resolve_preset(cfg.backbone), device, cfg.tokens.template) is generator


def test_a_relay_round_can_skip_held_classes_and_keep_a_round_budget(tmp_path):
    def cfg(**overrides: object) -> AppConfig:
        iid = {"data.partitioner": "iid", "generation.images-per-class": 1}
        return AppConfig.from_run_config(make_cfg(tmp_path).to_run_config() | iid | overrides)

    out0 = relay_round(cfg(), ClientTask(0, 2, 1), ClientState(), {})
    first1 = relay_round(cfg(), ClientTask(1, 2, 1), ClientState(), {})
    entries = parse_reply(out0.arrays, ANY_SIZE, labelled=True)
    sent = {e.class_id for e in entries}
    held = {int(key[1:]) for key in first1.state.tokens}
    assert sent & held  # the peer sends classes client 1 holds
    received = relay_arrays([TokenEntry(0, e.class_id, e.vectors) for e in entries])

    def generated(**overrides: object) -> float:
        out = relay_round(cfg(**overrides), ClientTask(1, 2, 2), first1.state, received)
        return out.metrics["num-generated"]

    assert generated() == len(sent)  # one image per received set
    assert generated(**{"generation.held-classes": False}) == len(sent - held)
    assert generated(**{"generation.images-per-round": 5}) == 5
