"""Image conversions, in one place: uint8 arrays (N, H, W, 3) to and from model tensors."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from cmfl_flower.backbones import ClipBundle


def _resized(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 3, H, W) float -> (N, 3, size, size) (bilinear, antialiased); as is when it fits."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def resize_uint8(images: np.ndarray, size: int) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, size, size, 3) uint8 (bilinear, antialiased)."""
    if images.shape[1:3] == (size, size):
        return images
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    resized = _resized(x, size).round().clamp(0, 255).to(torch.uint8)
    out: np.ndarray = resized.permute(0, 2, 3, 1).numpy()
    return out


def to_pixels(images: np.ndarray, bundle: ClipBundle) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, S, S) float, resized and normalised for a CLIP ``bundle``."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(bundle.device)
    x = _resized(x.permute(0, 3, 1, 2).float().div_(255.0), bundle.image_size)  # in [0, 1]
    mean = torch.tensor(bundle.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(bundle.std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def to_unit_range(images: np.ndarray, size: int) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, size, size) float in [-1, 1] (a diffusion model's input)."""
    x = torch.from_numpy(np.ascontiguousarray(resize_uint8(images, size)))
    return x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) float in [0, 1] (a pipeline's ``np`` output) -> uint8."""
    out: np.ndarray = (np.clip(images, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return out
