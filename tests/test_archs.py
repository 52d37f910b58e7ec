"""Full-size architectures as data: BK-SDM and open_clip configs build the published shapes."""

import pytest

from cmfl_flower.backbones import PRESETS
from training.archs import ARCHS, clip_config, load_arch, parameter_counts

# Parameter counts published in the BK-SDM README (text encoders there include the 77
# position ids, a buffer); the CLIP counts are open_clip's ViT-L-14 and ViT-H-14.
PUBLISHED = {
    "bk-sdm-small": {
        "unet": 482_346_884,
        "vae": 83_653_863,
        "text_encoder": 123_060_557 - 77,
        "clip": 427_616_513,
    },
    "bk-sdm-v2-small": {
        "unet": 485_787_524,
        "vae": 83_653_863,
        "text_encoder": 340_387_917 - 77,
        "clip": 986_109_441,
    },
}


@pytest.mark.parametrize("name", ARCHS)
def test_unet_is_sd_without_mid_block_and_one_pair_less_per_stage(name):
    unet = load_arch(name)["unet"]
    assert unet["mid_block_type"] is None
    assert unet["layers_per_block"] == 1
    assert unet["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert unet["up_block_types"] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert unet["block_out_channels"] == [320, 640, 1280, 1280]
    assert unet["sample_size"] * 8 == 512  # 512x512 images through the 8x VAE


@pytest.mark.parametrize("name", ARCHS)
def test_all_parts_share_the_presets_token_space(name):
    arch, width = load_arch(name), PRESETS[name].token_dim
    assert arch["clip"] == PRESETS[name].clip
    assert arch["unet"]["cross_attention_dim"] == width
    assert arch["text_encoder"]["hidden_size"] == width
    assert clip_config(name)["text_cfg"]["width"] == width


@pytest.mark.parametrize("name", ARCHS)
def test_configs_build_models_of_the_published_size(name):
    assert parameter_counts(name) == PUBLISHED[name]


def test_unknown_architecture_is_refused():
    with pytest.raises(ValueError, match="bk-sdm-small, bk-sdm-v2-small"):
        load_arch("bk-sdm-tiny")
