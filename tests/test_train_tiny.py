"""The tiny-backbone training script runs end to end and writes loadable weights and a card."""

import json

import numpy as np
import torch

from cmfl_flower.backbones import load_clip, load_pipeline, resolve_preset
from cmfl_flower.config import BackboneConfig
from tests.pipelines import render
from training import train_tiny


def test_quick_training_writes_weights_card_and_grid(tmp_path):
    train_tiny.main(["--quick", "--out", str(tmp_path)])
    card = (tmp_path / "MODEL_CARD.md").read_text()
    assert "python -m training.train_tiny --quick" in card and "| gate | value |" in card
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert 0.0 <= metrics["generation_recognised"] <= 1.0
    assert len(metrics["per_class_recognised"]) == 10
    assert (tmp_path / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    weights = sorted(p.stat().st_size for p in tmp_path.rglob("*.safetensors"))
    assert weights and sum(weights) < 30e6
    # the written files load through the real loaders, float16 on disk -> float32 here
    preset = resolve_preset(
        BackboneConfig(clip=str(tmp_path / "clip"), diffusion=str(tmp_path / "diffusion"))
    )
    clip = load_clip(preset, "cpu", 0)
    assert clip.model.token_embedding.weight.dtype == torch.float32
    pipe = load_pipeline(preset.diffusion, torch.device("cpu"))
    table = pipe.text_encoder.get_input_embeddings().weight
    assert torch.equal(table, clip.model.token_embedding.weight)
    images = render(pipe, "a photo of a two.")
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()


def test_augment_keeps_shape_and_range():
    x = torch.rand(4, 3, 32, 32)
    y = train_tiny.augment(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    assert not torch.equal(x, y)


def test_learning_rate_warms_up_then_decays():
    peak = 1e-3
    values = [train_tiny.lr_at(step, 1000, peak) for step in (0, 99, 500, 999)]
    assert values[0] < values[1] == peak > values[2] > values[3] >= 0.1 * peak
