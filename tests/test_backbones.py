"""Backbone presets: the tiny preset builds offline, and the real loaders read saved models."""

from dataclasses import replace

import pytest
import torch

from cmfl_flower.backbones import (
    LOCAL_DIR,
    PRESETS,
    build_tiny_pipeline,
    load_clip,
    load_pipeline,
    resolve_device,
    resolve_preset,
    save_clip,
    tiny_clip_config,
)
from cmfl_flower.config import BackboneConfig

TINY = PRESETS["tiny"]


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
    hub = resolve_preset(BackboneConfig(clip="hf-hub:org/clip"))
    assert hub.clip == "hf-hub:org/clip" and not hub.random_init_ok


def test_tiny_clip_is_seeded_and_has_the_preset_token_dim():
    first, second = load_clip(TINY, "cpu", 3), load_clip(TINY, "cpu", 3)
    other = load_clip(TINY, "cpu", 4)
    a, b, c = (m.model.token_embedding.weight for m in (first, second, other))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (49408, TINY.token_dim)
    assert first.image_size == 32 and len(first.mean) == 3


def test_saved_clip_loads_back_through_open_clip_local_dir(tmp_path):
    bundle = load_clip(TINY, "cpu", 1)
    save_clip(bundle.model, tiny_clip_config(), tmp_path / "clip")
    preset = resolve_preset(BackboneConfig(clip=str(tmp_path / "clip")))
    loaded = load_clip(preset, "cpu", 99)  # another seed: every weight must come from disk
    pixels = torch.randn(2, 3, 32, 32)
    tokens = bundle.tokenizer(["a photo of a seven."])
    with torch.no_grad():
        assert torch.equal(bundle.model.encode_image(pixels), loaded.model.encode_image(pixels))
        assert torch.equal(bundle.model.encode_text(tokens), loaded.model.encode_text(tokens))


def test_local_clip_without_weights_or_config_is_refused(tmp_path):
    bundle = load_clip(TINY, "cpu", 1)
    save_clip(bundle.model, tiny_clip_config(), tmp_path)
    (tmp_path / "open_clip_model.safetensors").unlink()
    with pytest.raises(ValueError, match="holds no weights"):
        load_clip(resolve_preset(BackboneConfig(clip=str(tmp_path))), "cpu", 0)
    with pytest.raises(ValueError, match="open_clip_config.json"):
        load_clip(replace(TINY, clip=f"{LOCAL_DIR}{tmp_path / 'missing'}"), "cpu", 0)


def test_tiny_pipeline_shares_the_clip_token_space(tmp_path):
    clip = load_clip(TINY, "cpu", 0)
    pipe = build_tiny_pipeline(clip.model, 0, tmp_path)
    table = pipe.text_encoder.get_input_embeddings().weight
    assert torch.equal(table, clip.model.token_embedding.weight)
    for prompt in ["a photo of a seven.", "a photo of a Tinca tinca, hippopotamus!"]:
        ours = pipe.tokenizer(prompt).input_ids
        assert ours == clip.tokenizer([prompt])[0][: len(ours)].tolist()


def test_saved_pipeline_loads_back_through_diffusers(tmp_path):
    clip = load_clip(TINY, "cpu", 0)
    pipe = build_tiny_pipeline(clip.model, 0, tmp_path)
    pipe.save_pretrained(tmp_path / "sd")
    loaded = load_pipeline(str(tmp_path / "sd"), torch.device("cpu"))

    def render(p):
        generator = torch.Generator().manual_seed(0)
        out = p(
            "a photo of a seven",
            num_inference_steps=2,
            height=32,
            width=32,
            output_type="np",
            generator=generator,
        )
        return out.images

    images = render(loaded)
    assert images.shape == (1, 32, 32, 3)
    assert (render(pipe) == images).all()


def test_pipeline_directory_without_model_index_is_refused(tmp_path):
    with pytest.raises(ValueError, match="model_index.json"):
        load_pipeline(str(tmp_path), torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present")
def test_cuda_device_is_refused_without_cuda():
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="backbone.device"):
        resolve_device("cuda")
