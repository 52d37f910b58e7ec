"""The tiny-fewshot preset: the tiny CLIP's text tower with a weak vision tower, and its script."""

import json
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from cmfl_flower import zoo
from cmfl_flower.backbones import CLIP_WEIGHTS_FILE, LOCAL_DIR, load_clip, resolve_preset
from cmfl_flower.config import BackboneConfig
from cmfl_flower.data import load_source
from training import train_fewshot
from training.train_fewshot import Figures, Recipe

TINY = resolve_preset(BackboneConfig())
FEWSHOT = resolve_preset(BackboneConfig(preset="tiny-fewshot"))


def split_state(model: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(text tower, vision tower) tensors of a CLIP, keyed by state-dict name."""
    state = model.state_dict()
    text = {k: v for k, v in state.items() if train_fewshot.is_text_key(k)}
    vision = {k: v for k, v in state.items() if k.startswith("visual.")}
    return text, vision


def assert_text_equal_vision_differs(model: Any, tiny: Any) -> None:
    (text, vision), (tiny_text, tiny_vision) = split_state(model), split_state(tiny)
    assert text.keys() == tiny_text.keys() and len(text) > 10
    assert {"token_embedding.weight", "text_projection", "ln_final.weight"} <= text.keys()
    for key, value in text.items():
        assert torch.equal(value, tiny_text[key]), key
    assert torch.equal(model.logit_scale, tiny.logit_scale)
    assert vision.keys() == tiny_vision.keys()
    differing = [k for k in vision if not torch.equal(vision[k], tiny_vision[k])]
    assert len(differing) > len(vision) // 2, differing


def test_preset_resolves_to_its_clip_and_the_tiny_pipeline():
    assert FEWSHOT.clip.startswith(LOCAL_DIR) and FEWSHOT.clip.endswith("tiny-fewshot/clip")
    assert (zoo.locate("tiny-fewshot/clip") / CLIP_WEIGHTS_FILE).is_file()
    assert FEWSHOT.diffusion == TINY.diffusion and FEWSHOT.token_dim == TINY.token_dim == 64
    assert FEWSHOT.clip != TINY.clip


def test_shipped_clip_keeps_tiny_text_tower_and_has_a_weak_vision_tower():
    fewshot, tiny = load_clip(FEWSHOT, "cpu", 0), load_clip(TINY, "cpu", 0)
    assert fewshot.image_size == tiny.image_size == 32
    assert_text_equal_vision_differs(fewshot.model, tiny.model)
    # byte-identical on disk too (both float16 safetensors)
    on_disk = load_file(str(zoo.locate("tiny-fewshot/clip") / CLIP_WEIGHTS_FILE))
    tiny_on_disk = load_file(str(zoo.locate("tiny/clip") / CLIP_WEIGHTS_FILE))
    assert on_disk.keys() == tiny_on_disk.keys()
    for key in filter(train_fewshot.is_text_key, on_disk):
        assert on_disk[key].dtype == torch.float16 and torch.equal(on_disk[key], tiny_on_disk[key])
    # weak, but far from chance, zero-shot on held-out digits; the shipped metrics say the same
    held_out = load_source("digits", "test")
    weak = train_fewshot.zero_shot_accuracy(fewshot.model, fewshot.tokenizer, held_out)
    strong = train_fewshot.zero_shot_accuracy(tiny.model, tiny.tokenizer, held_out)
    assert 0.3 < weak <= 0.8 < 0.9 < strong, (weak, strong)
    metrics = json.loads((zoo.locate("tiny-fewshot") / "metrics.json").read_text())
    assert abs(metrics["test"]["zero_shot"] - weak) < 0.02, (metrics["test"], weak)
    assert metrics["public_validation"]["zero_shot"] <= train_fewshot.GOAL_ZERO_SHOT_AT_MOST
    assert metrics["public_validation"]["central_lora"] >= train_fewshot.GOAL_CENTRAL_AT_LEAST


def test_public_split_gives_seeded_disjoint_shots_and_validation():
    public = load_source("digits", "public")
    shots, validation = train_fewshot.split_public(public, 3, seed=0)
    assert np.bincount(shots.labels, minlength=10).tolist() == [3] * 10
    assert len(shots) + len(validation) == len(public)
    rows = {row.tobytes() for row in shots.images.reshape(len(shots), -1)}
    validation_rows = {row.tobytes() for row in validation.images.reshape(len(validation), -1)}
    assert len(rows) == len(shots) and not rows & validation_rows
    again, _ = train_fewshot.split_public(public, 3, seed=0)
    other, _ = train_fewshot.split_public(public, 3, seed=1)
    assert np.array_equal(again.images, shots.images)
    assert not np.array_equal(other.images, shots.images)


def test_choose_prefers_the_recipe_whose_worst_seed_clears_the_goal_most():
    rows = [
        (Recipe(per_class=2, steps=300, seed=0), Figures(zero_shot=0.60, central_lora=0.95)),
        (Recipe(per_class=2, steps=300, seed=1), Figures(zero_shot=0.60, central_lora=0.89)),
        (Recipe(per_class=3, steps=300, seed=0), Figures(zero_shot=0.70, central_lora=0.93)),
        (Recipe(per_class=3, steps=300, seed=1), Figures(zero_shot=0.72, central_lora=0.92)),
    ]
    best, worst = train_fewshot.choose(rows)
    assert (best.per_class, best.steps) == (3, 300) and abs(worst - 0.02) < 1e-9
    assert not rows[1][1].meets_goal() and rows[3][1].meets_goal()


def test_quick_run_writes_a_loadable_checkpoint_card_and_metrics(tmp_path, monkeypatch):
    monkeypatch.setattr(train_fewshot, "SWEEP_PER_CLASS", (1,))
    monkeypatch.setattr(train_fewshot, "SWEEP_STEPS", (2,))
    monkeypatch.setattr(train_fewshot, "SWEEP_SEEDS", (0,))
    train_fewshot.main(["--sweep", "--out", str(tmp_path), "--lora-epochs", "1"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.json"]  # the sweep trains only
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert [(row["per_class"], row["steps"], row["seed"]) for row in sweep["rows"]] == [(1, 2, 0)]
    assert sweep["chosen"]["per_class"] == 1 and sweep["chosen"]["worst_margin"] < 0
    train_fewshot.main(["--out", str(tmp_path), "--steps", "2", "--lora-epochs", "1"])
    card = (tmp_path / "MODEL_CARD.md").read_text()
    assert "python -m training.train_fewshot --out" in card and "| figure |" in card
    assert "How the recipe was chosen" in card and "| 1 | 2 |" in card and "1 epochs" in card
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["recipe"]["steps"] == 2 and metrics["counts"]["shots"] == 10 * Recipe.per_class
    for split in ("public_validation", "test"):
        assert set(metrics[split]) == {"zero_shot", "central_lora"}
        assert all(0.0 <= value <= 1.0 for value in metrics[split].values())
    weights = tmp_path / "clip" / CLIP_WEIGHTS_FILE
    assert weights.is_file() and weights.stat().st_size < 10e6
    loaded = load_clip(resolve_preset(BackboneConfig(clip=str(tmp_path / "clip"))), "cpu", 5)
    assert loaded.model.token_embedding.weight.dtype == torch.float32
    assert_text_equal_vision_differs(loaded.model, load_clip(TINY, "cpu", 0).model)
