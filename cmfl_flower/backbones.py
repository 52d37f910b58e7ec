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
from typing import Any, cast

import open_clip
import torch
from safetensors.torch import save_file

from cmfl_flower.config import BackboneConfig

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
    random_init_ok: bool = False  # may the CLIP load without weights (seeded random init)?


PRESETS: dict[str, Preset] = {
    # Untrained until the project ships its own weights: seeded random init, offline.
    "tiny": Preset("tiny", f"{LOCAL_DIR}{ZOO_DIR / 'tiny' / 'clip'}", "", "", 64, True),
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
        preset = replace(
            preset, clip=clip, clip_pretrained=cfg.clip_pretrained, random_init_ok=False
        )
    elif cfg.clip_pretrained:
        preset = replace(preset, clip_pretrained=cfg.clip_pretrained, random_init_ok=False)
    if cfg.diffusion:
        preset = replace(preset, diffusion=cfg.diffusion)
    return preset


def resolve_device(name: str) -> torch.device:
    """Map the config's device name to a torch device (``auto`` prefers CUDA)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"backbone.device = {name!r}, but CUDA is not available here")
    return device


def _check_local_clip(preset: Preset) -> None:
    """Fail early and precisely on a local CLIP directory that cannot load."""
    directory = Path(preset.clip.removeprefix(LOCAL_DIR))
    if not (directory / CLIP_CONFIG_FILE).is_file():
        raise ValueError(f"CLIP directory {directory} has no {CLIP_CONFIG_FILE}")
    has_weights = any(directory.glob("*.safetensors")) or any(directory.glob("*.bin"))
    if not has_weights and not preset.random_init_ok:
        raise ValueError(f"CLIP directory {directory} holds no weights (*.safetensors, *.bin)")


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


def build_tiny_pipeline(clip: open_clip.CLIP, seed: int, tmp_dir: Path) -> Any:
    """Build the tiny SD-compatible pipeline from configs, seeded.

    Its text encoder's token-embedding table is a copy of ``clip``'s, so both models read
    class-token vectors in the same space. ``tmp_dir`` receives the tokenizer files.
    """
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    components = json.loads(TINY_COMPONENTS_FILE.read_text())
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**components["unet"])
    vae = AutoencoderKL(**components["vae"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**components["text_encoder"]))
    table = cast(torch.nn.Embedding, text_encoder.get_input_embeddings())
    with torch.no_grad():
        table.weight.copy_(clip.token_embedding.weight)  # (vocab, token_dim)
    tokenizer_dir = write_clip_tokenizer_files(tmp_dir / "tokenizer")
    tokenizer = CLIPTokenizer(
        str(tokenizer_dir / "vocab.json"),
        str(tokenizer_dir / "merges.txt"),
        pad_token="<|endoftext|>",
        model_max_length=components["text_encoder"]["max_position_embeddings"],
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**components["scheduler"]),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def load_pipeline(source: str, device: torch.device, dtype: torch.dtype = torch.float32) -> Any:
    """Load a Stable Diffusion pipeline from a hub id or a local directory (diffusers' loader)."""
    from diffusers import StableDiffusionPipeline

    path = Path(source).expanduser()
    if path.is_absolute() and not (path / "model_index.json").is_file():
        raise ValueError(f"diffusion directory {path} has no model_index.json")
    pipeline = StableDiffusionPipeline.from_pretrained(
        str(path) if path.is_absolute() else source,
        dtype=dtype,
        safety_checker=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)
