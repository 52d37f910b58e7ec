"""Textual inversion: the denoising loss trains only the class tokens, min-SNR weights."""

import numpy as np
import pytest
import torch

from cmfl_flower import inversion
from cmfl_flower.backbones import resolve_preset
from cmfl_flower.config import BackboneConfig, TokensConfig
from cmfl_flower.data import load_source
from cmfl_flower.generation import load_generator
from cmfl_flower.inversion import DenoisingLoss, cached_latents, encode_latents, min_snr_weights
from cmfl_flower.prompts import DEFAULT_TEMPLATE
from cmfl_flower.tokens import ClassTokenBank, TextSide, TokenObjective, train_bank

TINY = resolve_preset(BackboneConfig())


@pytest.fixture(scope="module")
def generator():
    return load_generator(TINY, "cpu", DEFAULT_TEMPLATE)


@pytest.fixture(scope="module")
def digits():
    data = load_source("digits", "train")
    keep = np.flatnonzero(np.isin(data.labels, (3, 8)))[:48]
    return data.images[keep], data.labels[keep], data.class_names


def test_min_snr_weights_clip_the_easy_timesteps():
    alphas = torch.tensor([0.999, 0.9, 0.5, 0.01])  # SNR 999, 9, 1, 0.0101
    t = torch.arange(4)
    eps = min_snr_weights(alphas, t, gamma=5.0, prediction="epsilon")
    torch.testing.assert_close(eps, torch.tensor([5 / 999, 5 / 9, 1.0, 1.0]))
    v = min_snr_weights(alphas, t, gamma=5.0, prediction="v_prediction")
    torch.testing.assert_close(v, torch.tensor([5 / 1000, 5 / 10, 0.5, 0.0101 / 1.0101]))
    with pytest.raises(ValueError, match="sample"):
        min_snr_weights(alphas, t, gamma=5.0, prediction="sample")


def test_latents_have_the_vae_shape(generator, digits):
    images, _, _ = digits
    latents = encode_latents(generator, images[:5], batch_size=2)
    assert latents.shape == (5, 4, 8, 8) and torch.isfinite(latents).all()


def test_latents_are_kept_on_disk_for_the_next_message(generator, digits, tmp_path, monkeypatch):
    images, _, _ = digits
    first = cached_latents(generator, images[:5], 2, tmp_path)
    assert torch.equal(first, encode_latents(generator, images[:5], batch_size=2))
    (saved,) = tmp_path.glob("latents-*.safetensors")

    def refuse(*args: object) -> None:
        raise AssertionError("encoded again")

    monkeypatch.setattr(inversion, "encode_latents", refuse)
    assert torch.equal(cached_latents(generator, images[:5], 2, tmp_path), first)
    with pytest.raises(AssertionError, match="encoded again"):  # other images: another file
        cached_latents(generator, images[1:6], 2, tmp_path)
    assert list(tmp_path.glob("latents-*.safetensors")) == [saved]


def test_denoising_objective_moves_only_the_bank_and_lowers_the_loss(generator, digits):
    images, labels, names = digits
    pipeline = generator.pipeline
    frozen = {
        f"{part}.{n}": p.detach().clone()
        for part in ("unet", "vae", "text_encoder")
        for n, p in getattr(pipeline, part).named_parameters()
    }
    text = _text_side(generator)
    wrong = {3: text.name_vectors("eight"), 8: text.name_vectors("three")}  # swapped names
    bank = ClassTokenBank(wrong)
    denoising = DenoisingLoss.build(generator, images, snr_gamma=5.0, batch_size=16)
    objective = TokenObjective(labels, dict(wrong), denoising=denoising)
    cfg = TokensConfig(objective="diffusion", anchor=0.0, epochs=1, lr=5e-3, batch_size=16)
    first = train_bank(text, bank, objective, names, cfg, seed=0)
    later = train_bank(text, bank, objective, names, cfg.model_copy(update={"epochs": 8}), 1)
    assert later < first
    assert not torch.equal(bank.get(3), wrong[3])
    for part in ("unet", "vae", "text_encoder"):
        for n, p in getattr(pipeline, part).named_parameters():
            assert torch.equal(p, frozen[f"{part}.{n}"]), n
            assert p.grad is None


def _text_side(generator):
    from cmfl_flower.config import EncoderConfig
    from cmfl_flower.encoder import LoraSpec, load_encoder

    encoder = load_encoder(TINY, "cpu", 0, LoraSpec.from_config(EncoderConfig()))
    return TextSide.build(encoder.bundle, DEFAULT_TEMPLATE)
