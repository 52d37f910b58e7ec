"""The real presets, on their real weights (``pytest -m slow``; none of this runs by default).

The weights come from this host's Hugging Face cache: fetch them first with
``cmfl-fetch-weights --preset bk-sdm-small`` (a few GB); a missing weight fails naming that
command. On a CPU one 512x512 image at 2 steps takes under a minute; a GPU is used if present.
"""

import numpy as np
import pytest

from cmfl_flower.backbones import load_clip, resolve_device, resolve_preset
from cmfl_flower.config import BackboneConfig, GenerationConfig
from cmfl_flower.generation import GenerationRequest, load_generator

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["bk-sdm-small", "bk-sdm-v2-small"])
def test_a_real_preset_shares_one_token_space_and_generates(name):
    preset = resolve_preset(BackboneConfig(preset=name))  # type: ignore[arg-type]
    device = str(resolve_device("auto"))
    clip = load_clip(preset, device, 0)
    assert clip.model.token_embedding.weight.shape[1] == preset.token_dim
    generator = load_generator(preset, device, "a photo of a {name}.")
    ids = clip.tokenizer(["seven"])[0]
    vectors = clip.model.token_embedding.weight[ids[1:2]].detach()  # (1, D): the name's token
    cfg = GenerationConfig(steps=2, batch_size=1, images_per_class=1)
    out = generator.generate([GenerationRequest(0, 7, vectors)], cfg, run_seed=0, server_round=1)
    assert out.images.shape == (1, *generator.image_size, 3) and out.images.dtype == np.uint8
    assert out.images.std() > 0  # an image, not a blank
