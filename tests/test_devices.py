"""Device and dtype selection (CUDA mocked) and the generator's inference preparation."""

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from benchmarks.loopback import LoopbackGrid
from client_app import app as client_app
from cmfl_flower.backbones import resolve_device, resolve_dtype, resolve_preset
from cmfl_flower.config import AppConfig, BackboneConfig, GenerationConfig
from cmfl_flower.generation import GenerationRequest, load_generator
from cmfl_flower.prompts import DEFAULT_TEMPLATE
from cmfl_flower.server.rounds import run_federation
from tests.test_strategies import make_cfg

CUDA = torch.device("cuda")
CPU = torch.device("cpu")


@pytest.fixture
def cuda(monkeypatch):
    """Pretend a CUDA GPU is present; the test sets bf16 support itself."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return monkeypatch


@pytest.mark.parametrize(("bf16", "expected"), [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_dtype_is_half_precision_on_cuda(cuda, bf16, expected):
    cuda.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert resolve_device("auto") == CUDA
    assert resolve_dtype("auto", CUDA) == expected


def test_auto_dtype_is_float32_on_cpu():
    assert resolve_device("auto") == CPU
    assert resolve_dtype("auto", CPU) == torch.float32
    assert resolve_dtype("auto", torch.device("mps")) == torch.float32


def test_explicit_dtypes_and_refusals():
    assert resolve_dtype("bfloat16", CPU) == torch.bfloat16
    assert resolve_dtype("float16", CUDA) == torch.float16
    with pytest.raises(ValueError, match=r"backbone\.dtype = 'float16' needs a GPU"):
        resolve_dtype("float16", CPU)
    with pytest.raises(ValueError, match=r"backbone\.dtype = 'fp8'.*auto, float32"):
        resolve_dtype("fp8", CUDA)


def test_bad_dtype_in_the_run_config_names_the_key():
    with pytest.raises(ValueError, match=r"backbone\.dtype.*'half'"):
        AppConfig.from_run_config({"backbone.dtype": "half"})
    assert AppConfig.from_run_config({"backbone.dtype": "bfloat16"}).backbone.dtype == "bfloat16"


def test_generator_in_bfloat16_renders_on_cpu():
    generator = load_generator(
        resolve_preset(BackboneConfig()), "cpu", DEFAULT_TEMPLATE, "bfloat16"
    )
    pipeline = generator.pipeline
    assert pipeline.unet.dtype == torch.bfloat16 and pipeline.text_encoder.dtype == torch.bfloat16
    conv = pipeline.unet.conv_in.weight  # channels-last: the channel stride is 1
    assert conv.stride()[1] == 1 and conv.is_contiguous(memory_format=torch.channels_last)
    processors = {type(p) for p in pipeline.unet.attn_processors.values()}
    assert processors == {AttnProcessor2_0}
    vectors = torch.randn(1, 64)  # float32 vectors into the bf16 text encoder
    cfg = GenerationConfig(images_per_class=2, batch_size=2, steps=2, scheduler="ddim")
    out = generator.generate([GenerationRequest(0, 3, vectors)], cfg, 0, 1)
    assert out.images.shape == (2, 32, 32, 3) and out.images.dtype == np.uint8
    assert out.images.std() > 1.0  # not a blank image


def test_each_client_message_pins_torch_to_backbone_threads(tmp_path):
    cfg = make_cfg(tmp_path, "local-only", 1, **{"backbone.threads": 1})
    torch.set_num_threads(2)  # as a process with two CPUs starts
    try:
        run_federation(LoopbackGrid(client_app, cfg, 2), cfg)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(1)
