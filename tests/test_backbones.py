"""Backbone presets: the shipped tiny backbone loads offline, and the real loaders read saved
models back."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from cmfl_flower import zoo
from cmfl_flower.backbones import (
    LOCAL_DIR,
    PRESETS,
    clip_tokenizer,
    load_clip,
    load_pipeline,
    resolve_device,
    resolve_preset,
)
from cmfl_flower.config import BackboneConfig
from cmfl_flower.data import load_source
from cmfl_flower.images import to_pixels
from tests.pipelines import render
from training.builders import (
    build_tiny_pipeline,
    clip_text_to_hf,
    save_clip,
    tiny_clip_config,
)

TINY = resolve_preset(BackboneConfig())


def test_real_presets_name_matching_clip_and_diffusion_models():
    small, v2 = PRESETS["bk-sdm-small"], PRESETS["bk-sdm-v2-small"]
    assert (small.clip, small.clip_pretrained, small.diffusion) == (
        "ViT-L-14",
        "openai",
        "nota-ai/bk-sdm-small",
    )
    assert (v2.clip, v2.diffusion, v2.token_dim) == ("ViT-H-14", "nota-ai/bk-sdm-v2-small", 1024)


def test_overrides_accept_local_directories_and_hub_ids(tmp_path):
    cfg = BackboneConfig(preset="bk-sdm-small", clip=str(tmp_path), diffusion="org/other-sd")
    preset = resolve_preset(cfg)
    assert preset.clip == f"{LOCAL_DIR}{tmp_path}" and preset.diffusion == "org/other-sd"
    assert resolve_preset(BackboneConfig(clip="hf-hub:org/clip")).clip == "hf-hub:org/clip"


def test_tiny_preset_resolves_to_the_shipped_weights():
    assert TINY.clip.startswith(LOCAL_DIR) and TINY.clip.endswith("tiny/clip")
    assert (zoo.locate("tiny/clip") / "open_clip_model.safetensors").is_file()
    assert (zoo.locate("tiny/diffusion") / "model_index.json").is_file()


def test_zoo_without_weights_anywhere_is_reported(monkeypatch, tmp_path):
    monkeypatch.setattr(zoo, "candidates", lambda: [tmp_path])
    with pytest.raises(ValueError, match="CMFL_FLOWER_ZOO"):
        zoo.locate("tiny/clip")


def test_tiny_clip_is_pretrained_zero_shot_classifier_of_held_out_digits():
    first, other_seed = load_clip(TINY, "cpu", 3), load_clip(TINY, "cpu", 4)
    a, b = (m.model.token_embedding.weight for m in (first, other_seed))
    assert torch.equal(a, b)  # every weight comes from disk
    assert a.shape == (49408, TINY.token_dim) and first.image_size == 32
    held_out = load_source("digits", "test")
    names = [f"a photo of a {n}." for n in held_out.class_names]
    with torch.no_grad():
        text = first.model.encode_text(first.tokenizer(names), normalize=True)
        image = first.model.encode_image(to_pixels(held_out.images, first), normalize=True)
    accuracy = float(((image @ text.T).argmax(1).numpy() == held_out.labels).mean())
    assert accuracy > 0.8, accuracy


def test_saved_clip_loads_back_through_open_clip_local_dir(tmp_path):
    bundle = load_clip(TINY, "cpu", 1)
    save_clip(bundle.model, tiny_clip_config(), tmp_path / "clip")
    loaded = load_clip(resolve_preset(BackboneConfig(clip=str(tmp_path / "clip"))), "cpu", 99)
    pixels = torch.randn(2, 3, 32, 32)
    tokens = bundle.tokenizer(["a photo of a seven."])
    with torch.no_grad():
        assert torch.equal(bundle.model.encode_image(pixels), loaded.model.encode_image(pixels))
        assert torch.equal(bundle.model.encode_text(tokens), loaded.model.encode_text(tokens))


def test_a_checkpointed_clip_is_not_initialised_at_random(monkeypatch):
    calls = []
    for name in ("normal_", "kaiming_uniform_", "xavier_uniform_"):
        original = getattr(torch.nn.init, name)
        monkeypatch.setattr(
            torch.nn.init, name, lambda *a, _f=original, **k: calls.append(1) or _f(*a, **k)
        )
    bundle = load_clip(TINY, "cpu", 0)  # every weight is read from disk (compared above)
    assert calls == []
    assert bundle.tokenizer is clip_tokenizer(TINY.clip)  # built once, shared with the generator


def test_local_clip_without_weights_or_config_is_refused(tmp_path):
    bundle = load_clip(TINY, "cpu", 1)
    save_clip(bundle.model, tiny_clip_config(), tmp_path)
    (tmp_path / "open_clip_model.safetensors").unlink()
    with pytest.raises(ValueError, match="holds no weights"):
        load_clip(resolve_preset(BackboneConfig(clip=str(tmp_path))), "cpu", 0)
    with pytest.raises(ValueError, match="open_clip_config.json"):
        load_clip(replace(TINY, clip=f"{LOCAL_DIR}{tmp_path / 'missing'}"), "cpu", 0)


def test_pipeline_text_encoder_is_the_clip_text_tower():
    clip = load_clip(TINY, "cpu", 0).model
    encoder = clip_text_to_hf(clip)
    ids = load_clip(TINY, "cpu", 0).tokenizer(["a photo of a seven.", "a photo of a Tinca tinca."])
    with torch.no_grad():
        x = clip.token_embedding(ids) + clip.positional_embedding
        ours = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask))
        theirs = encoder(input_ids=ids).last_hidden_state
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_tiny_pipeline_tokenizer_matches_open_clip(tmp_path):
    clip = load_clip(TINY, "cpu", 0)
    pipe = build_tiny_pipeline(clip.model, tmp_path)
    for prompt in ["a photo of a seven.", "a photo of a Tinca tinca, hippopotamus?"]:
        ours = pipe.tokenizer(prompt).input_ids
        assert ours == clip.tokenizer([prompt])[0][: len(ours)].tolist()
    # the pad token is "!" (id 0), what open_clip pads with; like SD 2's tokenizer, it is then
    # a special token, so a literal "!" in a prompt becomes id 0
    assert pipe.tokenizer.pad_token_id == 0 == int(clip.tokenizer([""])[0][-1])


def test_saved_pipeline_loads_back_through_diffusers(tmp_path):
    torch.manual_seed(0)
    pipe = build_tiny_pipeline(load_clip(TINY, "cpu", 0).model, tmp_path)
    pipe.save_pretrained(tmp_path / "sd")
    loaded = load_pipeline(str(tmp_path / "sd"), torch.device("cpu"))
    images = render(loaded)
    assert images.shape == (1, 32, 32, 3)
    assert np.array_equal(render(pipe), images)


def test_shipped_tiny_pipeline_loads_offline_and_renders():
    pipe = load_pipeline(TINY.diffusion, torch.device("cpu"))
    images = render(pipe)
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
    assert pipe.unet.dtype == torch.float32  # float16 on disk, float32 when loaded on CPU


def test_pipeline_directory_without_model_index_is_refused(tmp_path):
    with pytest.raises(ValueError, match="model_index.json"):
        load_pipeline(str(tmp_path), torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present")
def test_cuda_device_is_refused_without_cuda():
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="backbone.device"):
        resolve_device("cuda")
