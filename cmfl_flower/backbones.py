"""Backbone presets: a CLIP (open_clip) and a diffusion pipeline (diffusers) in one token space.

Both load through the libraries' own loaders.
A preset is data (:class:`Preset`); every field can be overridden from the run config with a
hub id or a local directory. Models are loaded once per process and cached
(:func:`cmfl_flower.encoder.load_encoder`): the clients one simulation worker serves share them.
"""

from __future__ import annotations

import gzip
import json
import logging
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors.torch import save_file

from cmfl_flower.config import BackboneConfig
from cmfl_flower.zoo import locate

LOGGER = logging.getLogger(__name__)

ZOO_DIR = Path(__file__).resolve().parent / "zoo"
LOCAL_DIR = "local-dir:"
CLIP_CONFIG_FILE = "open_clip_config.json"
CLIP_WEIGHTS_FILE = "open_clip_model.safetensors"
TINY_COMPONENTS_FILE = ZOO_DIR / "tiny" / "diffusion" / "components.json"


@dataclass(frozen=True)
class Preset:
    """A CLIP model and a diffusion pipeline that share one token space."""

    name: str
    clip: str  # open_clip model name, "hf-hub:org/repo" or "local-dir:/abs/dir"
    clip_pretrained: str  # open_clip pretrained tag or checkpoint file ("" = none)
    diffusion: str  # diffusers hub id or local directory ("" = build from configs)
    token_dim: int  # width of the shared token embeddings


ZOO = "zoo:"  # a path inside the project's own zoo (see cmfl_flower.zoo.locate)
PRESETS: dict[str, Preset] = {
    # Trained by `python -m cmfl_flower.zoo.train_tiny` on public digits; ships with the package.
    "tiny": Preset("tiny", f"{ZOO}tiny/clip", "", f"{ZOO}tiny/diffusion", 64),
    # tiny's text tower and pipeline, a vision tower trained on a few public images per class
    # (`python -m cmfl_flower.zoo.train_fewshot`): weak zero-shot, for federated benchmarks.
    "tiny-fewshot": Preset(
        "tiny-fewshot", f"{ZOO}tiny-fewshot/clip", "", f"{ZOO}tiny/diffusion", 64
    ),
    "bk-sdm-small": Preset("bk-sdm-small", "ViT-L-14", "openai", "nota-ai/bk-sdm-small", 768),
    "bk-sdm-v2-small": Preset(
        "bk-sdm-v2-small", "ViT-H-14", "laion2b_s32b_b79k", "nota-ai/bk-sdm-v2-small", 1024
    ),
}


@dataclass(frozen=True)
class ClipBundle:
    """A loaded open_clip model with what it needs around it."""

    model: open_clip.CLIP
    tokenizer: Any  # open_clip tokenizer: list[str] -> (B, context_length) int64
    image_size: int
    mean: tuple[float, ...]  # per RGB channel
    std: tuple[float, ...]
    device: torch.device


def resolve_preset(cfg: BackboneConfig) -> Preset:
    """The preset named in ``cfg`` with its overrides applied."""
    preset = PRESETS[cfg.preset]
    if cfg.clip:
        clip = cfg.clip
        if Path(clip).expanduser().is_absolute():
            clip = f"{LOCAL_DIR}{Path(clip).expanduser()}"
        preset = replace(preset, clip=clip, clip_pretrained=cfg.clip_pretrained)
    elif cfg.clip_pretrained:
        preset = replace(preset, clip_pretrained=cfg.clip_pretrained)
    if cfg.diffusion:
        preset = replace(preset, diffusion=cfg.diffusion)
    if preset.clip.startswith(ZOO):
        preset = replace(preset, clip=f"{LOCAL_DIR}{locate(preset.clip.removeprefix(ZOO))}")
    if preset.diffusion.startswith(ZOO):
        preset = replace(preset, diffusion=str(locate(preset.diffusion.removeprefix(ZOO))))
    return preset


def resolve_device(name: str) -> torch.device:
    """Map the config's device name to a torch device (``auto`` prefers CUDA)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"backbone.device = {name!r}, but CUDA is not available here")
    return device


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Map ``backbone.dtype`` to a torch dtype for ``device`` (``auto``: bf16/fp16 on CUDA)."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name not in DTYPES:
        raise ValueError(
            f"backbone.dtype = {name!r} is unknown; allowed: auto, {', '.join(DTYPES)}"
        )
    if name == "float16" and device.type == "cpu":
        raise ValueError("backbone.dtype = 'float16' needs a GPU; use float32 or bfloat16 on CPU")
    return DTYPES[name]


def _check_local_clip(preset: Preset) -> None:
    """Fail early and precisely on a local CLIP directory that cannot load."""
    directory = Path(preset.clip.removeprefix(LOCAL_DIR))
    fix = "set backbone.clip to a directory with open_clip_config.json and weights, or a name"
    if not directory.is_dir():
        raise ValueError(f"CLIP directory {directory} does not exist: {fix}")
    if not (directory / CLIP_CONFIG_FILE).is_file():
        raise ValueError(f"CLIP directory {directory} has no {CLIP_CONFIG_FILE}: {fix}")
    has_weights = any(directory.glob("*.safetensors")) or any(directory.glob("*.bin"))
    if not has_weights:
        raise ValueError(
            f"CLIP directory {directory} holds no weights (*.safetensors, *.bin): {fix}"
        )


def load_clip(preset: Preset, device_name: str, seed: int) -> ClipBundle:
    """Load the preset's CLIP (eval mode, frozen, on ``device_name``) with open_clip's loader.

    ``seed`` fixes the initialisation of anything the checkpoint does not hold. Callers that
    run per message cache the result (see :func:`cmfl_flower.encoder.load_encoder`).
    """
    if preset.clip.startswith(LOCAL_DIR):
        _check_local_clip(preset)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = open_clip.create_model(
            preset.clip, pretrained=preset.clip_pretrained or None, device=device_name
        )
    model.eval().requires_grad_(False)
    size = model.visual.image_size
    image_size = int(size[0] if isinstance(size, tuple) else size)
    return ClipBundle(
        model=model,
        tokenizer=open_clip.get_tokenizer(preset.clip),
        image_size=image_size,
        mean=tuple(model.visual.image_mean),
        std=tuple(model.visual.image_std),
        device=torch.device(device_name),
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


def load_pipeline(source: str, device: torch.device, dtype: torch.dtype = torch.float32) -> Any:
    """Load a Stable Diffusion pipeline from a hub id or a local directory (diffusers' loader)."""
    from diffusers import StableDiffusionPipeline

    path = Path(source).expanduser()
    if path.is_absolute() and not (path / "model_index.json").is_file():
        state = "does not exist" if not path.is_dir() else "has no model_index.json"
        raise ValueError(
            f"diffusion directory {path} {state}: set backbone.diffusion to a diffusers "
            "pipeline directory or a hub id"
        )
    pipeline = StableDiffusionPipeline.from_pretrained(
        str(path) if path.is_absolute() else source,
        dtype=dtype,
        safety_checker=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)
