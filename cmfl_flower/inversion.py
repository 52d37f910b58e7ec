"""Textual inversion: class-token vectors trained through the generator's own denoising loss.

Tokens trained only through CLIP's image-text loss drift out of what the diffusion model
understands, and peers then generate images of the wrong class from them. Here the UNet, VAE
and text encoder stay frozen; a training image's latents are noised at a random timestep and
the UNet, conditioned on the prompt whose name slots hold the image's class vectors, predicts
the noise (or velocity). The squared error, weighted by min-SNR-gamma, moves only the vectors.

The latents of a client's images do not change between rounds: :func:`cached_latents` keeps
them on the node's disk, so a fresh process per message encodes them once per run.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from safetensors.torch import load_file, save_file

from cmfl_flower.generation import Generator
from cmfl_flower.images import resize_uint8


@torch.no_grad()
def encode_latents(generator: Generator, images: np.ndarray, batch_size: int) -> torch.Tensor:
    """(N, C, h, w) scaled VAE latents (posterior mode) of (N, H, W, 3) uint8 images."""
    vae = generator.pipeline.vae
    size = generator.image_size[0]
    chunks = []
    for start in range(0, len(images), batch_size):
        part = resize_uint8(images[start : start + batch_size], size)
        x = torch.from_numpy(part).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        x = x.to(generator.device, vae.dtype)  # (B, 3, S, S) in [-1, 1]
        chunks.append(vae.encode(x).latent_dist.mode() * vae.config.scaling_factor)
    return torch.cat(chunks)


def cached_latents(
    generator: Generator, images: np.ndarray, batch_size: int, directory: Path | None
) -> torch.Tensor:
    """:func:`encode_latents`, kept in ``directory`` for the next message (None: not kept).

    The file is named by a hash of the images and of what the encoding depends on (pipeline,
    size, dtype, device type, batch size), written to a temporary file and renamed into place.
    """
    if directory is None:
        return encode_latents(generator, images, batch_size)
    pipeline = generator.pipeline
    key = hashlib.blake2b(np.ascontiguousarray(images).tobytes(), digest_size=16)
    setting = (pipeline.name_or_path, images.shape, generator.image_size, pipeline.vae.dtype)
    key.update(repr((*setting, generator.device.type, batch_size)).encode())
    file = directory / f"latents-{key.hexdigest()}.safetensors"
    if file.is_file():
        return load_file(file, device=str(generator.device))["latents"]
    latents = encode_latents(generator, images, batch_size)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.tmp")
    save_file({"latents": latents.cpu().contiguous()}, tmp)
    tmp.replace(file)
    return latents


def min_snr_weights(
    alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float, prediction: str
) -> torch.Tensor:
    """Per-sample loss weights (B,) of min-SNR-gamma (Hang et al., 2023).

    ``min(SNR, gamma) / SNR`` for epsilon prediction, ``min(SNR, gamma) / (SNR + 1)`` for
    v-prediction, so that both weight the implied x0 error alike.
    """
    alpha = alphas_cumprod[timesteps.cpu()].float()  # (B,)
    snr = alpha / (1.0 - alpha)
    clipped = torch.clamp(snr, max=gamma)
    if prediction == "v_prediction":
        return clipped / (snr + 1.0)
    if prediction == "epsilon":
        return clipped / snr
    raise ValueError(f"textual inversion supports epsilon or v_prediction UNets, not {prediction}")


@dataclass
class DenoisingLoss:
    """The denoising loss of one client's images, ready to evaluate for batches of them."""

    generator: Generator
    latents: torch.Tensor  # (N, C, h, w), scaled
    schedule: Any  # a DDPMScheduler with the pipeline's training noise schedule
    snr_gamma: float

    @classmethod
    def build(
        cls,
        generator: Generator,
        images: np.ndarray,
        snr_gamma: float,
        batch_size: int,
        cache: Path | None = None,
    ) -> DenoisingLoss:
        """Encode ``images`` (N, H, W, 3) uint8 once; the schedule is the pipeline's own.

        ``cache``: where the latents are kept between messages (:func:`cached_latents`).
        """
        schedule = DDPMScheduler.from_config(generator.pipeline.scheduler.config)
        latents = cached_latents(generator, images, batch_size, cache)
        return cls(generator, latents, schedule, snr_gamma)

    def __call__(
        self, vectors: list[torch.Tensor], idx: np.ndarray, rng: torch.Generator
    ) -> torch.Tensor:
        """Mean weighted denoising loss of images ``idx``; ``vectors[b]``: (n_b, D) of image b."""
        unet = self.generator.pipeline.unet
        latents = self.latents[torch.from_numpy(idx).to(self.latents.device)]  # (B, C, h, w)
        noise = torch.randn(latents.shape, generator=rng).to(latents)
        steps = int(self.schedule.config.num_train_timesteps)
        t = torch.randint(0, steps, (len(idx),), generator=rng).to(latents.device)
        noisy = self.schedule.add_noise(latents, noise, t)
        embeds = self.generator.encode_vectors(vectors)  # (B, L, D_text), grad to vectors
        predicted = unet(noisy, t, encoder_hidden_states=embeds.to(unet.dtype)).sample
        prediction = str(self.schedule.config.prediction_type)
        target = noise if prediction == "epsilon" else self.schedule.get_velocity(latents, noise, t)
        errors = F.mse_loss(predicted.float(), target.float(), reduction="none")
        per_sample = errors.mean(dim=(1, 2, 3))  # (B,)
        weights = min_snr_weights(self.schedule.alphas_cumprod, t, self.snr_gamma, prediction)
        return (weights.to(per_sample.device) * per_sample).mean()
