"""Builders of the project's own tiny models, for the zoo's training tools and the tests.

Not on the apps' import path: a run only loads what these wrote (:mod:`cmfl_flower.backbones`).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors.torch import save_file

from cmfl_flower.backbones import (
    CLIP_CONFIG_FILE,
    CLIP_WEIGHTS_FILE,
    TINY_COMPONENTS_FILE,
    ZOO_DIR,
)


def save_clip(model: open_clip.CLIP, model_cfg: dict[str, Any], out_dir: Path) -> Path:
    """Write ``model`` as an open_clip ``local-dir:`` checkpoint (config + safetensors)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "model_cfg": model_cfg,
        "preprocess_cfg": {
            "mean": list(model.visual.image_mean),
            "std": list(model.visual.image_std),
        },
    }
    (out_dir / CLIP_CONFIG_FILE).write_text(json.dumps(config, indent=2))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / CLIP_WEIGHTS_FILE))
    return out_dir


def tiny_clip_config() -> dict[str, Any]:
    """The ``model_cfg`` of the tiny CLIP."""
    config = json.loads((ZOO_DIR / "tiny" / "clip" / CLIP_CONFIG_FILE).read_text())
    return dict(config["model_cfg"])


def clip_text_to_hf(clip: open_clip.CLIP) -> Any:
    """The CLIP's text tower as a transformers ``CLIPTextModel`` (same weights, same outputs).

    This is how a Stable Diffusion text encoder relates to its CLIP: the pipeline reads class
    tokens through exactly the function the CLIP was trained with. Needs a built-in open_clip
    text tower with GELU (not QuickGELU) and no layer scale.
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    blocks = clip.transformer.resblocks
    width = int(clip.token_embedding.weight.shape[1])
    config = CLIPTextConfig(
        vocab_size=int(clip.token_embedding.weight.shape[0]),
        hidden_size=width,
        intermediate_size=int(blocks[0].mlp.c_fc.out_features),
        num_hidden_layers=len(blocks),
        num_attention_heads=int(blocks[0].attn.num_heads),
        max_position_embeddings=int(clip.positional_embedding.shape[0]),
        projection_dim=int(clip.text_projection.shape[1]),
        hidden_act="gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    model = CLIPTextModel(config)
    # transformers 4 nests the tower under ``text_model.``; transformers 5 does not
    nested = any(key.startswith("text_model.") for key in model.state_dict())
    state = {
        (key if nested else key.removeprefix("text_model.")): value
        for key, value in _hf_text_state(clip).items()
    }
    model.load_state_dict(state, strict=True)
    return model.eval()


def _hf_text_state(clip: open_clip.CLIP) -> dict[str, torch.Tensor]:
    """open_clip text-tower weights under transformers' ``CLIPTextModel`` names."""
    state = {
        "text_model.embeddings.token_embedding.weight": clip.token_embedding.weight,
        "text_model.embeddings.position_embedding.weight": clip.positional_embedding,
        "text_model.final_layer_norm.weight": clip.ln_final.weight,
        "text_model.final_layer_norm.bias": clip.ln_final.bias,
    }
    for i, block in enumerate(clip.transformer.resblocks):
        prefix = f"text_model.encoder.layers.{i}."
        q, k, v = block.attn.in_proj_weight.chunk(3)  # (3W, W) -> 3 x (W, W)
        qb, kb, vb = block.attn.in_proj_bias.chunk(3)
        names = {
            "self_attn.q_proj": (q, qb),
            "self_attn.k_proj": (k, kb),
            "self_attn.v_proj": (v, vb),
            "self_attn.out_proj": (block.attn.out_proj.weight, block.attn.out_proj.bias),
            "layer_norm1": (block.ln_1.weight, block.ln_1.bias),
            "layer_norm2": (block.ln_2.weight, block.ln_2.bias),
            "mlp.fc1": (block.mlp.c_fc.weight, block.mlp.c_fc.bias),
            "mlp.fc2": (block.mlp.c_proj.weight, block.mlp.c_proj.bias),
        }
        for name, (weight, bias) in names.items():
            state[f"{prefix}{name}.weight"] = weight
            state[f"{prefix}{name}.bias"] = bias
    return {key: value.detach().clone() for key, value in state.items()}


def write_clip_tokenizer_files(out_dir: Path) -> Path:
    """Write ``vocab.json`` + ``merges.txt`` equal to open_clip's BPE (for ``CLIPTokenizer``)."""
    bpe_path = Path(open_clip.tokenizer.default_bpe())
    tokenizer = open_clip.tokenizer.SimpleTokenizer()
    with gzip.open(bpe_path) as handle:
        lines = handle.read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    out_dir.mkdir(parents=True, exist_ok=True)
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {names.get(token, token): index for token, index in tokenizer.encoder.items()}
    (out_dir / "vocab.json").write_text(json.dumps(vocab))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return out_dir


def tiny_components() -> dict[str, dict[str, Any]]:
    """The configs of the tiny pipeline's UNet, VAE and scheduler (``components.json``)."""
    config: dict[str, dict[str, Any]] = json.loads(TINY_COMPONENTS_FILE.read_text())
    return config


def build_tiny_pipeline(
    clip: open_clip.CLIP, tokenizer_dir: Path, vae: Any = None, unet: Any = None
) -> Any:
    """An SD-compatible pipeline whose text encoder is ``clip``'s text tower.

    ``vae`` and ``unet`` default to fresh ones built from :func:`tiny_components` (seed torch
    first for a reproducible initialisation). ``tokenizer_dir`` receives the tokenizer files.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTokenizer

    components = tiny_components()
    files = write_clip_tokenizer_files(tokenizer_dir)
    tokenizer = CLIPTokenizer(
        str(files / "vocab.json"),
        str(files / "merges.txt"),
        pad_token="!",  # id 0: what open_clip pads with, so the UNet sees what it was trained on
        model_max_length=int(clip.positional_embedding.shape[0]),
    )
    return assemble_pipeline(
        vae if vae is not None else AutoencoderKL(**components["vae"]),
        clip_text_to_hf(clip),
        tokenizer,
        unet if unet is not None else UNet2DConditionModel(**components["unet"]),
        DDIMScheduler.from_config(components["scheduler"]),
    )


def assemble_pipeline(
    vae: Any, text_encoder: Any, tokenizer: Any, unet: Any, scheduler: Any
) -> Any:
    """A ``StableDiffusionPipeline`` of these parts (no safety checker), progress bar off."""
    from diffusers import StableDiffusionPipeline

    pipeline: Any = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
