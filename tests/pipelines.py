"""Test helper: render one image from a pipeline, seeded, in two denoising steps."""

import numpy as np
import torch


def render(pipe, prompt: str = "a photo of a seven.") -> np.ndarray:
    """(1, H, W, 3) float image of ``prompt`` (2 steps, seed 0)."""
    out = pipe(
        prompt,
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    return out.images
