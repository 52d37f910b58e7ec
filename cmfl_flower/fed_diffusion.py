"""Diffusion UNets trained on local images: the client side of the federated diffusion baselines.

The client side of ``diffusion-unet`` and ``diffusion-lora`` (free of Flower), on the models of
:mod:`cmfl_flower.fed_diffusion_models`: :func:`train_steps` runs E AdamW steps of the
epsilon-prediction loss, at the round's learning rate (:func:`round_lr`), from the optimiser
state the client kept from its last round (:func:`optimizer_state`,
:func:`load_optimizer_state`; kept on the node's disk by :mod:`cmfl_flower.client.store`);
:func:`sample_ddpm` and :func:`render_prompts` draw from the models.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMPipeline

from cmfl_flower.aliases import Arrays
from cmfl_flower.backbones import resolve_device, resolve_preset
from cmfl_flower.config import AppConfig, DiffusionConfig
from cmfl_flower.fed_diffusion_models import (
    LatentModel,
    attach_lora,
    build_ddpm_unet,
    ddpm_scheduler,
    ddpm_unet_name,
    latent_model,
    load_module_arrays,
    module_arrays,
)
from cmfl_flower.images import to_uint8, to_unit_range

OptimizerState = dict[str, torch.Tensor]  # "<parameter index>.<AdamW buffer>" -> tensor


# ----- local training ---------------------------------------------------------------------
@dataclass(frozen=True)
class LocalData:
    """A client's training images with their captions (None for the unconditional DDPM)."""

    images: np.ndarray  # (N, H, W, 3) uint8
    captions: list[str] | None


def captions_for(labels: np.ndarray, class_names: tuple[str, ...], template: str) -> list[str]:
    """One caption per image from its class name."""
    return [template.replace("{name}", class_names[int(label)]) for label in labels]


def limit_images(n: int, limit: int, seed: int) -> np.ndarray:
    """Indices of at most ``limit`` of ``n`` items (all when ``limit`` is 0), seeded."""
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[:limit] if limit else order)


def _batch_indices(n: int, batch: int, steps: int, generator: torch.Generator) -> Iterator[Any]:
    """``steps`` batches drawn by walking seeded permutations of ``range(n)``."""
    order = torch.randperm(n, generator=generator)
    position = 0
    for _ in range(steps):
        if position + min(batch, n) > n:
            order, position = torch.randperm(n, generator=generator), 0
        yield order[position : position + batch].numpy()
        position += batch


def round_lr(cfg: DiffusionConfig, server_round: int, rounds: int) -> float:
    """The local learning rate of round ``server_round`` (1-based) of ``rounds``.

    ``constant``: ``cfg.lr``. ``cosine``: from ``cfg.lr`` in round 1 down to
    ``cfg.lr * cfg.lr_final`` in the last round (and after it, should a run go on).
    """
    if cfg.lr_schedule == "constant" or rounds <= 1:
        return cfg.lr
    progress = min(1.0, (server_round - 1) / (rounds - 1))
    return cfg.lr * (cfg.lr_final + (1 - cfg.lr_final) * 0.5 * (1 + math.cos(math.pi * progress)))


def optimizer_state(optimizer: torch.optim.Optimizer) -> OptimizerState:
    """The optimiser's per-parameter buffers as flat tensors (``"3.exp_avg"``, ``"3.step"``)."""
    state = optimizer.state_dict()["state"]
    return {
        f"{index}.{name}": torch.as_tensor(value).detach().cpu().clone()
        for index, buffers in state.items()
        for name, value in buffers.items()
    }


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], flat: OptimizerState
) -> None:
    """Restore :func:`optimizer_state`'s buffers; refuse buffers that do not fit ``params``."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        position, _, name = key.partition(".")
        state.setdefault(int(position), {})[name] = tensor.clone()  # the optimiser updates in place
    if set(state) != set(range(len(params))):
        raise ValueError(
            f"saved optimiser state covers {len(state)} parameters, the model has {len(params)}: "
            "the state was saved by another model (change output.run-name to start afresh)"
        )
    for number, buffers in state.items():
        for buffer, tensor in buffers.items():
            if tensor.dim() and tensor.shape != params[number].shape:
                raise ValueError(
                    f"saved optimiser state {number}.{buffer} has shape {tuple(tensor.shape)}, "
                    f"its parameter {tuple(params[number].shape)}: saved by another model"
                )
    saved = optimizer.state_dict()
    saved["state"] = state
    optimizer.load_state_dict(saved)


def train_steps(
    unet: torch.nn.Module,
    params: list[torch.nn.Parameter],
    data: LocalData,
    cfg: DiffusionConfig,
    seed: int,
    latent: LatentModel | None = None,
    *,
    lr: float | None = None,
    state: OptimizerState | None = None,
) -> tuple[float, OptimizerState]:
    """``cfg.local_steps`` AdamW steps of the epsilon-prediction MSE.

    Pixel DDPM when ``latent`` is None (images in [-1, 1] at the UNet's size), otherwise the
    latent UNet conditioned on the captions through ``latent``'s VAE and text encoder. The
    optimiser runs at ``lr`` (default ``cfg.lr``) and starts from ``state`` (default: fresh).
    Returns the mean loss and the optimiser's state after the last step.
    """
    if len(data.images) == 0:
        raise ValueError("cannot train a diffusion model on an empty training set")
    generator = torch.Generator().manual_seed(seed)
    scheduler = latent.scheduler() if latent is not None else ddpm_scheduler(cfg)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr if lr is None else lr)
    if state:
        load_optimizer_state(optimizer, params, state)  # the buffers; the rate stays this one
    device = next(unet.parameters()).device
    losses = []
    for p in params:
        p.requires_grad_(True)
    unet.train()
    with torch.enable_grad():
        for idx in _batch_indices(len(data.images), cfg.batch_size, cfg.local_steps, generator):
            loss = _loss(unet, scheduler, data, idx, generator, latent, device)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    unet.eval()
    return float(np.mean(losses)), optimizer_state(optimizer)


def _loss(
    unet: torch.nn.Module,
    scheduler: Any,  # diffusers DDPMScheduler
    data: LocalData,
    idx: np.ndarray,
    generator: torch.Generator,
    latent: LatentModel | None,
    device: torch.device,
) -> torch.Tensor:
    """MSE between the noise added at random timesteps and the UNet's prediction."""
    if latent is None:
        config: Any = unet.config
        x0 = to_unit_range(data.images[idx], int(config["sample_size"])).to(device)
        condition: dict[str, torch.Tensor] = {}
    else:
        x0 = latent.latents(data.images[idx], generator)  # (B, C_lat, h, w)
        captions = [data.captions[i] for i in idx] if data.captions else [""] * len(idx)
        condition = {"encoder_hidden_states": latent.text_states(captions)}
    noise = torch.randn(x0.shape, generator=generator).to(device)  # (B, C, h, w)
    steps = int(scheduler.config["num_train_timesteps"])
    t = torch.randint(0, steps, (x0.shape[0],), generator=generator).to(device)  # (B,)
    noisy = scheduler.add_noise(x0, noise, t)
    prediction = unet(noisy, t, **condition).sample
    return F.mse_loss(prediction, noise)


# ----- sampling ---------------------------------------------------------------------------
def sample_ddpm(
    unet: torch.nn.Module, cfg: DiffusionConfig, count: int, seed: int, batch: int
) -> np.ndarray:
    """``count`` unconditional samples (DDIM, ``cfg.sample_steps``) -> (N, S, S, 3) uint8."""
    pipeline: Any = DDIMPipeline(unet=unet, scheduler=ddpm_scheduler(cfg))
    pipeline.set_progress_bar_config(disable=True)
    chunks = []
    for start in range(0, count, batch):
        size = min(batch, count - start)
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(size)]
        out = pipeline(
            batch_size=size,
            generator=generators,
            num_inference_steps=cfg.sample_steps,
            output_type="np",
        )
        chunks.append(to_uint8(np.asarray(out.images)))
    return np.concatenate(chunks)


def render_prompts(
    pipeline: Any, prompts: list[str], steps: int, guidance: float, seed: int, batch: int
) -> np.ndarray:
    """One image per prompt (seeded per index) -> (N, H, W, 3) uint8."""
    chunks = []
    for start in range(0, len(prompts), batch):
        part = prompts[start : start + batch]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(part))]
        out = pipeline(
            part,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generators,
            output_type="np",
        )
        chunks.append(to_uint8(np.asarray(out.images)))
    return np.concatenate(chunks)


# ----- one client round -------------------------------------------------------------------
@dataclass(frozen=True)
class LocalStep:
    """How a client trains this round: its learning rate and the optimiser state it kept."""

    lr: float
    state: OptimizerState | None  # None: a fresh optimiser


@functools.cache
def ddpm_unet(name: str, device_name: str) -> torch.nn.Module:
    """The process-wide pixel DDPM module clients load the global weights into."""
    return build_ddpm_unet(name, 0).to(device_name)


def fedavg_round(
    cfg: AppConfig, data: LocalData, received: Arrays, seed: int, step: LocalStep
) -> tuple[Arrays, float, OptimizerState]:
    """Load the global UNet, train it for E steps on ``data``.

    Returns the trained UNet, the mean loss and the optimiser state to keep.
    """
    if not received:
        raise ValueError("fedavg-diffusion: the server sent no global UNet")
    preset = resolve_preset(cfg.backbone)
    device = str(resolve_device(cfg.backbone.device))
    latent = None
    if cfg.diffusion.model == "conditional":
        latent = latent_model(preset, device, "fedavg")
        unet = latent.unet
    else:
        unet = ddpm_unet(ddpm_unet_name(cfg.diffusion, preset.name), device)
    load_module_arrays(unet, received)
    params = list(unet.parameters())
    loss, state = train_steps(
        unet, params, data, cfg.diffusion, seed, latent, lr=step.lr, state=step.state
    )
    return module_arrays(unet), loss, state


def fedlora_round(
    cfg: AppConfig, data: LocalData, received: Arrays, seed: int, step: LocalStep
) -> tuple[Arrays, float, OptimizerState]:
    """Activate the global LoRA (round 1: the seeded one) and train it, as :func:`fedavg_round`."""
    d = cfg.diffusion
    preset = resolve_preset(cfg.backbone)
    device = str(resolve_device(cfg.backbone.device))
    lora = attach_lora(preset, device, d.lora_rank, d.lora_alpha, cfg.seed)
    lora.load(received or lora.init_state)
    loss, state = train_steps(
        lora.model.unet, lora.parameters(), data, d, seed, lora.model, lr=step.lr, state=step.state
    )
    return lora.state(), loss, state
