"""Class tokens: substitution equals the plain prompt, EOS is right, only the bank trains."""

import numpy as np
import pytest
import torch

from cmfl_flower.backbones import resolve_preset
from cmfl_flower.config import BackboneConfig, EncoderConfig, TokensConfig
from cmfl_flower.data import load_source
from cmfl_flower.encoder import LoraSpec, load_encoder
from cmfl_flower.prompts import PromptTemplate
from cmfl_flower.tokens import (
    ClassTokenBank,
    TextSide,
    TokenObjective,
    class_vectors,
    image_features,
    token_drift,
    train_bank,
)

TINY = resolve_preset(BackboneConfig())


@pytest.fixture(scope="module")
def encoder():
    return load_encoder(TINY, "cpu", 0, LoraSpec.from_config(EncoderConfig()))


@pytest.fixture(scope="module")
def text(encoder):
    return TextSide.build(encoder.bundle, "a photo of a {name}.")


@pytest.mark.parametrize("name", ["seven", "European fire salamander", "Tinca tinca"])
def test_name_vectors_reproduce_the_plain_prompt(text, name):
    bundle = text.bundle
    with torch.no_grad():
        ours = text.encode([text.name_vectors(name)])
        plain = bundle.model.encode_text(
            bundle.tokenizer([f"a photo of a {name}."]), normalize=True
        )
    assert len(bundle.tokenizer.encode(name)) >= 1
    assert torch.allclose(ours, plain, atol=1e-6)


def test_eos_position_follows_the_number_of_name_tokens(text):
    ids, mask = text.template.layout([1, 3], 77, pad_id=0)
    eot = text.template.eot
    assert ids[0].argmax() == 1 + 4 + 1 + 1 and ids[0, 7] == eot  # SOT, 4 prefix, 1 slot, '.'
    assert ids[1].argmax() == 1 + 4 + 3 + 1 and ids[1, 9] == eot
    assert mask.sum(1).tolist() == [1, 3]
    with torch.no_grad():  # a 3-token bank is pooled at its own EOT: equals the plain prompt
        name = "European fire salamander"
        three = text.encode([text.name_vectors("seven"), text.name_vectors(name)])
        alone = text.encode([text.name_vectors(name)])
    assert torch.allclose(three[1], alone[0], atol=1e-6)


def test_template_must_hold_one_name_field(text):
    with pytest.raises(ValueError, match="tokens.template"):
        PromptTemplate.build(text.bundle.tokenizer, "a photo")
    with pytest.raises(ValueError, match="do not fit"):
        text.template.layout([80], 77, pad_id=0)


def test_changing_vectors_changes_features_and_gradients_reach_them(text):
    vectors = text.name_vectors("seven").requires_grad_(True)
    features = text.encode([vectors])
    features.sum().backward()
    assert vectors.grad is not None and vectors.grad.abs().sum() > 0
    with torch.no_grad():
        moved = text.encode(
            [vectors + 0.5 * torch.randn(vectors.shape)]
        )  # a shift alone is normalised away
    assert not torch.allclose(moved, features.detach())


def test_bank_is_sorted_and_round_trips_through_state(text):
    names = load_source("digits", "test").class_names
    bank = ClassTokenBank.from_names(text, [7, 2, 5], names)
    assert bank.class_ids == [2, 5, 7]
    again = ClassTokenBank.from_state(bank.state())
    assert again.class_ids == [2, 5, 7]
    assert all(torch.equal(bank.get(c), again.get(c)) for c in bank.class_ids)
    vectors = class_vectors(text, bank, names, fallback={3: torch.zeros(1, text.token_dim)})
    assert len(vectors) == 10 and torch.equal(vectors[3], torch.zeros(1, text.token_dim))
    assert torch.equal(vectors[0], text.name_vectors("zero"))


def _digits(classes=(1, 4, 7), count=90):
    data = load_source("digits", "train")
    keep = np.flatnonzero(np.isin(data.labels, classes))[:count]
    return data.images[keep], data.labels[keep], data.class_names


def _anchors(text, bank, names):
    return {c: text.name_vectors(names[c]) for c in bank.class_ids}


def test_training_moves_only_the_bank_and_lowers_the_loss(encoder, text):
    images, labels, names = _digits()
    before = {n: p.detach().clone() for n, p in encoder.bundle.model.named_parameters()}
    bank = ClassTokenBank.from_names(text, [1, 4, 7], names)
    start = {c: bank.get(c).detach().clone() for c in bank.class_ids}
    objective = TokenObjective(
        labels, _anchors(text, bank, names), features=image_features(encoder, images, 64)
    )
    cfg = TokensConfig(objective="clip", anchor=0.0, epochs=1, lr=1e-2)
    first = train_bank(text, bank, objective, names, cfg, seed=0)
    later = train_bank(text, bank, objective, names, cfg.model_copy(update={"epochs": 5}), seed=1)
    assert later < first
    assert all(not torch.equal(bank.get(c), start[c]) for c in bank.class_ids)
    for name, param in encoder.bundle.model.named_parameters():
        assert torch.equal(param, before[name]), name


def test_anchor_keeps_tokens_near_their_names(encoder, text):
    images, labels, names = _digits()
    features = image_features(encoder, images, 64)
    drift = {}
    for anchor in (0.0, 10.0):
        bank = ClassTokenBank.from_names(text, [1, 4, 7], names)
        objective = TokenObjective(labels, _anchors(text, bank, names), features=features)
        cfg = TokensConfig(objective="clip", anchor=anchor, epochs=5, lr=2e-2)
        train_bank(text, bank, objective, names, cfg, seed=0)
        drift[anchor] = token_drift(bank, objective.anchors)
    assert drift[0.0] > 0.05
    assert drift[10.0] < 0.5 * drift[0.0]


def test_objective_without_its_inputs_is_refused(text):
    _, labels, names = _digits()
    bank = ClassTokenBank.from_names(text, [1, 4, 7], names)
    objective = TokenObjective(labels, _anchors(text, bank, names))  # no features, no denoiser
    with pytest.raises(ValueError, match="tokens.objective = 'clip'"):
        train_bank(text, bank, objective, names, TokensConfig(objective="clip"), seed=0)


def test_empty_bank_trains_nothing(text):
    _, labels, names = _digits()
    bank = ClassTokenBank.from_names(text, [], names)
    objective = TokenObjective(labels, {})
    assert np.isnan(train_bank(text, bank, objective, names, TokensConfig(), seed=0))
