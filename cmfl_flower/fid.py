"""Fréchet distances of generated images through torchmetrics, with no download at run time.

* ``diffusion.fid = "clip"`` (the offline default): torchmetrics' ``FrechetInceptionDistance``
  with :class:`ClipImageFeatures` as its feature extractor, i.e. the Fréchet distance between
  Gaussians fitted to the preset CLIP's image embeddings (the tiny CLIP's 64-d on ``tiny``).
* ``diffusion.fid = "inception"``: the standard FID (Inception-v3 pool features, 2048-d) from
  the weights file named by ``diffusion.inception-weights`` (torch-fidelity's
  ``weights-inception-2015-12-05-6726825d.pth``), read through torchmetrics'
  ``feature_extractor_weights_path``; the metric never downloads it.

The real (reference) features are computed once and kept across rounds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torchmetrics.image.fid import FrechetInceptionDistance

from cmfl_flower.backbones import ClipBundle, Preset, load_clip
from cmfl_flower.config import DiffusionConfig
from cmfl_flower.images import to_pixels

INCEPTION_FEATURES = 2048
BATCH = 128


class ClipImageFeatures(torch.nn.Module):
    """(N, 3, H, W) uint8 images -> (N, D) CLIP image embeddings (unnormalised)."""

    def __init__(self, bundle: ClipBundle) -> None:
        super().__init__()
        self.bundle = bundle
        self.num_features = int(bundle.model.text_projection.shape[1])

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Resize and normalise for the CLIP, then encode."""
        array = images.permute(0, 2, 3, 1).cpu().numpy()  # (N, H, W, 3) uint8
        features: torch.Tensor = self.bundle.model.encode_image(to_pixels(array, self.bundle))
        return features.float()


def fd_metric_name(cfg: DiffusionConfig) -> str:
    """The round metric under which the distance is recorded."""
    return "fd-clip" if cfg.fid == "clip" else "fid-inception"


def build_fd_metric(cfg: DiffusionConfig, preset: Preset, device: str) -> FrechetInceptionDistance:
    """The configured Fréchet-distance metric; refuses a missing Inception weights file."""
    if cfg.fid == "inception":
        path = Path(cfg.inception_weights).expanduser()
        if not cfg.inception_weights or not path.is_file():
            raise ValueError(
                f"diffusion.inception-weights = {cfg.inception_weights!r} is not a file: "
                "diffusion.fid = 'inception' needs the Inception-v3 FID weights file "
                "(nothing is downloaded at run time)"
            )
        return FrechetInceptionDistance(
            feature=INCEPTION_FEATURES,
            reset_real_features=False,
            feature_extractor_weights_path=str(path),
        ).to(device)
    module = ClipImageFeatures(load_clip(preset, device, 0))
    return FrechetInceptionDistance(feature=module, reset_real_features=False).to(device)


def _update(metric: FrechetInceptionDistance, images: np.ndarray, real: bool) -> None:
    """Feed (N, H, W, 3) uint8 images to ``metric`` in batches."""
    for start in range(0, len(images), BATCH):
        chunk = torch.from_numpy(np.ascontiguousarray(images[start : start + BATCH]))
        metric.update(chunk.permute(0, 3, 1, 2).to(metric.device), real=real)  # (B, 3, H, W)


class FrechetDistance:
    """Distance of generated sets to one fixed reference set (its features kept)."""

    def __init__(self, metric: FrechetInceptionDistance, reference: np.ndarray) -> None:
        if len(reference) < 2:
            raise ValueError("the reference set needs at least 2 images")
        self.metric = metric
        _update(metric, reference, real=True)

    def __call__(self, images: np.ndarray) -> float:
        """Fréchet distance between ``images`` (N >= 2, uint8 NHWC) and the reference."""
        if len(images) < 2:
            raise ValueError(f"need at least 2 generated images, got {len(images)}")
        self.metric.reset()  # keeps the real features (reset_real_features=False)
        _update(self.metric, images, real=False)
        return float(self.metric.compute())
