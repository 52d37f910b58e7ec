"""The federated diffusion baselines' models, and their weights as arrays.

* :func:`build_ddpm_unet` builds a diffusers ``UNet2DModel`` from a named config
  (:data:`DDPM_UNETS`, architecture as data); it denoises images in pixel space with the
  configured linear beta schedule (:func:`ddpm_scheduler`).
* :class:`LatentModel` wraps the preset's Stable Diffusion pipeline: images go through its VAE,
  captions through its text encoder, and its ``UNet2DConditionModel`` is trained with the
  pipeline's own noise schedule (a pretrained UNet keeps the schedule it was trained with).
* :func:`attach_lora` puts a peft LoRA on the UNet's attention projections
  (:data:`LORA_TARGETS`); only those weights are trained and sent.

Weights travel as float32 numpy arrays named by the module's ``state_dict`` (or peft) keys.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict

from cmfl_flower.aliases import Arrays
from cmfl_flower.backbones import Preset, load_pipeline
from cmfl_flower.config import DiffusionConfig
from cmfl_flower.images import to_unit_range
from cmfl_flower.weights import weights_problem

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")

# Pixel-space DDPM UNets as data. `ddpm-cifar10` is the 35.7 M-parameter CIFAR-10 model of
# Ho et al. (2020); `tiny` keeps its shape at a size that trains on a CPU in seconds.
DDPM_UNETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "sample_size": 16,
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
        "attention_head_dim": 8,
        "norm_num_groups": 8,
    },
    "ddpm-cifar10": {
        "sample_size": 32,
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": [128, 256, 256, 256],
        "layers_per_block": 2,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
        "dropout": 0.1,
    },
}


TINY_PRESETS = ("tiny", "tiny-fewshot")  # the presets built on the 32 px tiny pipeline


def ddpm_unet_name(cfg: DiffusionConfig, preset: str) -> str:
    """The DDPM architecture ``cfg.unet`` names (``auto``: ``tiny`` on the tiny presets)."""
    if cfg.unet != "auto":
        return cfg.unet
    return "tiny" if preset in TINY_PRESETS else "ddpm-cifar10"


def build_ddpm_unet(name: str, seed: int) -> torch.nn.Module:
    """A freshly initialised pixel DDPM UNet (a diffusers ``UNet2DModel``, seeded)."""
    torch.manual_seed(seed)
    return cast(torch.nn.Module, UNet2DModel(**DDPM_UNETS[name]))


def ddpm_scheduler(cfg: DiffusionConfig) -> Any:
    """The training noise schedule of the pixel DDPM (linear 1e-4 .. 0.02, T = 1000 default)."""
    return DDPMScheduler(
        num_train_timesteps=cfg.timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule=cfg.beta_schedule,
        clip_sample=True,
    )


# ----- weights as arrays ------------------------------------------------------------------
def module_arrays(module: torch.nn.Module) -> Arrays:
    """Every weight of ``module`` as float32 numpy arrays (``state_dict`` keys)."""
    return {k: v.detach().to("cpu", torch.float32).numpy().copy() for k, v in _state(module)}


def _state(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    return iter(module.state_dict().items())


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of the module's weights in float32 (LoRA layers not counted)."""
    return sum(4 * v.numel() for k, v in _state(module) if "lora_" not in k)


def load_module_arrays(module: torch.nn.Module, arrays: Arrays) -> None:
    """Load a full set of weights into ``module``; refuse any mismatch."""
    reason = weights_problem(arrays, module_arrays(module))
    if reason is not None:
        raise ValueError(f"global UNet does not fit: {reason}")
    module.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()})


# ----- the preset's latent, text-conditional UNet -----------------------------------------
@dataclass
class LatentModel:
    """The preset's SD pipeline as a trainable text-to-image model (VAE and text frozen)."""

    pipeline: Any  # diffusers StableDiffusionPipeline
    # where it was loaded; diffusers' ``pipeline.device`` walks every parameter on each read
    device: torch.device

    @property
    def unet(self) -> torch.nn.Module:
        """The pipeline's ``UNet2DConditionModel``."""
        unet: torch.nn.Module = self.pipeline.unet
        return unet

    @property
    def image_size(self) -> int:
        """Pixel size the pipeline renders (latent size x VAE factor)."""
        return int(self.pipeline.unet.config.sample_size) * int(self.pipeline.vae_scale_factor)

    def scheduler(self) -> Any:
        """The pipeline's own noise schedule, as a DDPM training scheduler."""
        return DDPMScheduler.from_config(self.pipeline.scheduler.config)

    @torch.no_grad()
    def latents(self, images: np.ndarray, generator: torch.Generator) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, C_lat, h, w) scaled VAE latents."""
        pixels = to_unit_range(images, self.image_size).to(self.device)
        dist = self.pipeline.vae.encode(pixels).latent_dist
        noise = torch.randn(dist.mean.shape, generator=generator).to(dist.mean.device)
        sample: torch.Tensor = dist.mean + dist.std * noise  # (B, C_lat, h, w)
        return sample * float(self.pipeline.vae.config.scaling_factor)

    @torch.no_grad()
    def text_states(self, captions: list[str]) -> torch.Tensor:
        """Captions -> (B, L, D_text) text-encoder states."""
        embeds, _ = self.pipeline.encode_prompt(captions, self.device, 1, False)
        return embeds  # type: ignore[no-any-return]


@functools.cache
def latent_model(preset: Preset, device_name: str, purpose: str) -> LatentModel:
    """The preset's pipeline, loaded once per process and ``purpose`` (separate copies)."""
    device = torch.device(device_name)
    pipeline = load_pipeline(preset.diffusion, device, torch.float32, preset.download)
    pipeline.unet.requires_grad_(False)
    pipeline.vae.requires_grad_(False)
    pipeline.text_encoder.requires_grad_(False)
    return LatentModel(pipeline, device)


def lora_config(rank: int, alpha: float) -> LoraConfig:
    """The LoRA on the UNet's attention projections."""
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,  # type: ignore[arg-type]  # peft accepts float scaling
        init_lora_weights="gaussian",
        target_modules=list(LORA_TARGETS),
    )


@dataclass
class LoraModel:
    """A latent model whose UNet carries one LoRA; the active adapter is swappable."""

    model: LatentModel
    init_state: Arrays

    def state(self) -> Arrays:
        """The active adapter as float32 arrays (peft keys, adapter name removed)."""
        state = get_peft_model_state_dict(self.model.unet)
        return {k: v.detach().to("cpu", torch.float32).numpy().copy() for k, v in state.items()}

    def load(self, arrays: Arrays) -> None:
        """Make ``arrays`` the active adapter; refuse a mismatch."""
        reason = weights_problem(arrays, self.init_state)
        if reason is not None:
            raise ValueError(f"global LoRA adapter does not fit: {reason}")
        tensors = {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
        set_peft_model_state_dict(self.model.unet, tensors)

    def parameters(self) -> list[torch.nn.Parameter]:
        """The adapter's trainable parameters."""
        return [p for n, p in self.model.unet.named_parameters() if "lora_" in n]


@functools.cache
def attach_lora(preset: Preset, device_name: str, rank: int, alpha: float, seed: int) -> LoraModel:
    """The preset's pipeline with a seeded LoRA on its UNet (once per process and shape)."""
    model = latent_model(preset, device_name, f"lora-{rank}-{alpha}-{seed}")
    torch.manual_seed(seed)
    model.pipeline.unet.add_adapter(lora_config(rank, alpha))
    lora = LoraModel(model, {})
    lora.init_state = lora.state()
    return lora
