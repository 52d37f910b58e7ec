"""Full-size architectures without weights: BK-SDM pipelines and their open_clip CLIPs.

Each ``<preset>.json`` holds the diffusers configs of one BK-SDM pipeline (``unet``, ``vae``,
``scheduler``), its transformers text-encoder config, its tokenizer settings and the name of
the open_clip CLIP of the same token space, whose ``model_cfg`` is ``<clip>.json`` (as open_clip
ships it). The UNet configs are BK-SDM's: Stable Diffusion's UNet without the mid-block and with
one resnet + attention pair less per stage (``layers_per_block = 1``).

The builders make random-initialised full-size models offline, for benchmarks on real shapes;
:func:`parameter_counts` builds them on the meta device (no memory, no time).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import open_clip
import torch

from training.builders import assemble_pipeline, write_clip_tokenizer_files

ARCH_DIR = Path(__file__).resolve().parent
ARCHS = ("bk-sdm-small", "bk-sdm-v2-small")


def load_arch(name: str) -> dict[str, Any]:
    """The configs of the ``name`` pipeline (one of :data:`ARCHS`)."""
    if name not in ARCHS:
        raise ValueError(f"full-size architecture {name!r} is unknown; allowed: {', '.join(ARCHS)}")
    arch: dict[str, Any] = json.loads((ARCH_DIR / f"{name}.json").read_text())
    return arch


def clip_config(name: str) -> dict[str, Any]:
    """The open_clip ``model_cfg`` of the CLIP that shares ``name``'s token space."""
    clip = str(load_arch(name)["clip"])
    config: dict[str, Any] = json.loads((ARCH_DIR / f"{clip}.json").read_text())
    return config


def build_clip(name: str) -> open_clip.CLIP:
    """A random-initialised open_clip CLIP of ``name``'s token space (seed torch first)."""
    return open_clip.CLIP(**clip_config(name))


def build_unet(name: str) -> Any:
    """A random-initialised BK-SDM UNet (diffusers ``UNet2DConditionModel``)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_config(load_arch(name)["unet"])


def build_vae(name: str) -> Any:
    """A random-initialised Stable Diffusion VAE (diffusers ``AutoencoderKL``)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_config(load_arch(name)["vae"])


def build_text_encoder(name: str) -> Any:
    """A random-initialised text encoder (transformers ``CLIPTextModel``)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**load_arch(name)["text_encoder"]))


def build_pipeline(name: str, tokenizer_dir: Path) -> Any:
    """A random-initialised ``StableDiffusionPipeline`` of ``name`` (fp32, CPU; seed first).

    ``tokenizer_dir`` receives the CLIP BPE files the tokenizer is built from (offline).
    """
    from diffusers import PNDMScheduler
    from transformers import CLIPTokenizer

    arch = load_arch(name)
    files = write_clip_tokenizer_files(tokenizer_dir)
    tokenizer = CLIPTokenizer(
        str(files / "vocab.json"), str(files / "merges.txt"), **arch["tokenizer"]
    )
    return assemble_pipeline(
        build_vae(name),
        build_text_encoder(name),
        tokenizer,
        build_unet(name),
        PNDMScheduler.from_config(arch["scheduler"]),
    )


def parameter_counts(name: str) -> dict[str, int]:
    """Parameters of each part of ``name``, built on the meta device (no memory used)."""
    builders = {
        "unet": build_unet,
        "vae": build_vae,
        "text_encoder": build_text_encoder,
        "clip": build_clip,
    }
    counts = {}
    with torch.device("meta"):
        for part, build in builders.items():
            counts[part] = sum(p.numel() for p in build(name).parameters())
    return counts
