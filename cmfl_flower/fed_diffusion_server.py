"""The server's side of federated diffusion training, free of Flower.

After every round :class:`DiffusionPublisher` takes the new global weights and

* writes them in a form diffusers loads: ``model/`` (a ``DDPMPipeline`` for the pixel DDPM,
  ``model/unet`` for the preset's UNet) or ``adapter/pytorch_lora_weights.safetensors``
  (``pipe.load_lora_weights(adapter_dir)``);
* renders ``diffusion.eval-samples`` images (the prompts cycled; unconditional for the DDPM)
  with the same seeds every ``diffusion.eval-every`` rounds, saves them as
  ``samples/round-<k>.png``;
* measures their Fréchet distance to the dataset's test split (:mod:`cmfl_flower.fid`).

Models, the reference features and the server's pipeline are loaded lazily, once.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from cmfl_flower.aliases import Arrays
from cmfl_flower.backbones import Preset, resolve_device, resolve_preset
from cmfl_flower.config import AppConfig
from cmfl_flower.data import LabeledImages, load_source
from cmfl_flower.fed_diffusion import render_prompts, sample_ddpm
from cmfl_flower.fed_diffusion_models import (
    LatentModel,
    attach_lora,
    build_ddpm_unet,
    ddpm_scheduler,
    ddpm_unet_name,
    latent_model,
    load_module_arrays,
    lora_config,
    module_arrays,
    module_bytes,
)
from cmfl_flower.fid import FrechetDistance, build_fd_metric, fd_metric_name
from cmfl_flower.paths import ADAPTER_DIR, MODEL_DIR, SAMPLES_DIR
from cmfl_flower.report import MAX_COLUMNS, sample_grid

ModelKind = Literal["ddpm", "conditional", "lora"]


def _replace_dir(tmp: Path, final: Path) -> None:
    """Put the finished directory ``tmp`` in place of ``final``."""
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """Only diffusers' errors while inside."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def save_adapter(arrays: Arrays, rank: int, alpha: float, directory: Path) -> Path:
    """Write a UNet LoRA (peft keys) as diffusers' ``pytorch_lora_weights.safetensors``."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers

    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    layers = convert_state_dict_to_diffusers({k: torch.from_numpy(v) for k, v in arrays.items()})
    StableDiffusionPipeline.save_lora_weights(
        tmp,
        unet_lora_layers=layers,
        unet_lora_adapter_metadata=lora_config(rank, alpha).to_dict(),
        safe_serialization=True,
    )
    _replace_dir(tmp, directory)
    return directory


def measured(cfg: AppConfig, server_round: int) -> bool:
    """Whether round ``server_round``'s global model is rendered and measured."""
    return server_round % cfg.diffusion.eval_every == 0 or server_round >= cfg.federation.rounds


class DiffusionPublisher:
    """Saves, renders and measures the global diffusion model after each round."""

    def __init__(self, cfg: AppConfig, run_dir: Path, kind: ModelKind) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.kind = kind
        self.preset: Preset = resolve_preset(cfg.backbone)
        self.device = str(resolve_device(cfg.backbone.device))
        self._ddpm: torch.nn.Module | None = None

    # ----- lazily loaded ------------------------------------------------------------------
    @functools.cached_property
    def class_names(self) -> tuple[str, ...]:
        """The dataset's class names (index = label id)."""
        return self.reference.class_names

    @functools.cached_property
    def reference(self) -> LabeledImages:
        """The dataset's test split (the FD reference set)."""
        data = self.cfg.data
        return load_source(data.dataset, "test", data.path)

    @functools.cached_property
    def distance(self) -> FrechetDistance:
        """The Fréchet distance to the test split (its features computed once)."""
        metric = build_fd_metric(self.cfg.diffusion, self.preset, self.device)
        return FrechetDistance(metric, self.reference.images)

    @functools.cached_property
    def latent(self) -> LatentModel:
        """The server's own copy of the preset's pipeline (loaded on first use)."""
        return latent_model(self.preset, self.device, "server")

    @property
    def ddpm(self) -> torch.nn.Module:
        """The server's pixel DDPM UNet (built on first use)."""
        if self._ddpm is None:
            name = ddpm_unet_name(self.cfg.diffusion, self.preset.name)
            self._ddpm = build_ddpm_unet(name, self.cfg.seed).to(self.device).eval()
        return self._ddpm

    # ----- what the strategies ask ----------------------------------------------------------
    def check(self) -> None:
        """Fail before round 1 on a bad evaluation setup (e.g. a missing weights file)."""
        _ = self.distance

    def initial_arrays(self) -> Arrays:
        """The global weights before round 1.

        The seeded DDPM, the preset's pretrained UNet, or (``lora``) the seeded adapter every
        client starts from, whose B matrices are zero.
        """
        if self.kind == "lora":
            d = self.cfg.diffusion
            lora = attach_lora(self.preset, self.device, d.lora_rank, d.lora_alpha, self.cfg.seed)
            return dict(lora.init_state)
        return module_arrays(self.latent.unet if self.kind != "ddpm" else self.ddpm)

    def model_bytes(self) -> int:
        """Bytes of the full UNet in float32 (what FedAvg of the whole model ships)."""
        return module_bytes(self.latent.unet if self.kind != "ddpm" else self.ddpm)

    def eval_prompts(self) -> list[str]:
        """The configured prompts (or one caption per class), cycled to ``eval-samples``."""
        cfg = self.cfg.diffusion
        prompts = cfg.prompt_list or [
            cfg.caption_template.replace("{name}", name) for name in self.class_names
        ]
        return [prompts[i % len(prompts)] for i in range(cfg.eval_samples)]

    def publish_unet(
        self, server_round: int, arrays: Arrays, measure: bool = True
    ) -> dict[str, float]:
        """Save the averaged UNet; render and measure it when ``measure``."""
        cfg = self.cfg.diffusion
        tmp = self.run_dir / f".{MODEL_DIR}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        if self.kind == "conditional":
            load_module_arrays(self.latent.unet, arrays)
            self.latent.pipeline.unet.save_pretrained(tmp / "unet")
        else:
            from diffusers import DDPMPipeline

            load_module_arrays(self.ddpm, arrays)
            pipeline: Any = DDPMPipeline(unet=self.ddpm, scheduler=ddpm_scheduler(cfg))
            pipeline.save_pretrained(tmp)
        _replace_dir(tmp, self.run_dir / MODEL_DIR)
        if not measure:
            return {}
        if self.kind == "conditional":
            return self._evaluate(server_round, self._render_prompts())
        with torch.no_grad():
            images = sample_ddpm(self.ddpm, cfg, cfg.eval_samples, self.cfg.seed, cfg.batch_size)
        return self._evaluate(server_round, images)

    def publish_adapter(
        self, server_round: int, arrays: Arrays, measure: bool = True
    ) -> dict[str, float]:
        """Save the averaged LoRA for diffusers; when ``measure``, load it back and evaluate."""
        cfg = self.cfg.diffusion
        directory = save_adapter(arrays, cfg.lora_rank, cfg.lora_alpha, self.run_dir / ADAPTER_DIR)
        if not measure:
            return {}
        pipeline = self.latent.pipeline
        pipeline.unload_lora_weights()
        with _quiet_diffusers():  # it warns on every load that a UNet LoRA has no text part
            pipeline.load_lora_weights(str(directory))  # the saved file is what gets rendered
        return self._evaluate(server_round, self._render_prompts())

    # ----- helpers -------------------------------------------------------------------------
    def _render_prompts(self) -> np.ndarray:
        cfg = self.cfg.diffusion
        guidance = self.cfg.generation.guidance_scale
        with torch.no_grad():
            return render_prompts(
                self.latent.pipeline,
                self.eval_prompts(),
                cfg.sample_steps,
                guidance,
                self.cfg.seed,
                cfg.batch_size,
            )

    def _evaluate(self, server_round: int, images: np.ndarray) -> dict[str, float]:
        """Grid PNG of the samples and their Fréchet distance to the test split."""
        self._save_grid(server_round, images)
        return {fd_metric_name(self.cfg.diffusion): self.distance(images)}

    def _save_grid(self, server_round: int, images: np.ndarray) -> None:
        """One row per prompt (class names for the default captions); unconditional: in order."""
        index = np.arange(len(images))
        if self.kind == "ddpm":
            labels = index // MAX_COLUMNS
            names = [f"#{row * MAX_COLUMNS + 1}" for row in range(int(labels[-1]) + 1)]
        else:  # eval_prompts cycles through the prompts
            names = self.cfg.diffusion.prompt_list or list(self.class_names)
            labels = index % len(names)
        title = (
            f"round {server_round}: {self.kind} samples, {self.cfg.diffusion.sample_steps} steps"
        )
        path = self.run_dir / SAMPLES_DIR / f"round-{server_round}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        sample_grid(images, labels, names, title).save(path, optimize=True)
