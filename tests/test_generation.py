"""Generation: substituted prompt embeddings, per-image seeds, schedulers, loaded once."""

import itertools

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler

from cmfl_flower.backbones import resolve_preset
from cmfl_flower.config import BackboneConfig, GenerationConfig
from cmfl_flower.generation import (
    GeneratedImages,
    GenerationRequest,
    Generator,
    image_seed,
    images_per_request,
    load_generator,
    make_scheduler,
)
from cmfl_flower.prompts import DEFAULT_TEMPLATE

TINY = resolve_preset(BackboneConfig())
MULTI = "hippopotamus"  # three BPE tokens


def fast(**overrides) -> GenerationConfig:
    fields = {"images_per_class": 2, "batch_size": 4, "steps": 2, "scheduler": "ddim"}
    return GenerationConfig(**{**fields, **overrides})


@pytest.fixture(scope="module")
def generator() -> Generator:
    return load_generator(TINY, "cpu", DEFAULT_TEMPLATE)


def name_vectors(gen: Generator, name: str) -> torch.Tensor:
    ids = gen.pipeline.tokenizer(name, add_special_tokens=False).input_ids
    table: torch.Tensor = gen.pipeline.text_encoder.get_input_embeddings().weight
    return table[ids].detach().clone()


def real_prompt_embeds(gen: Generator, names: list[str]) -> torch.Tensor:
    tokenizer = gen.pipeline.tokenizer
    ids = tokenizer(
        [DEFAULT_TEMPLATE.format(name=n) for n in names],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        states: torch.Tensor = gen.pipeline.text_encoder(input_ids=ids).last_hidden_state
    return states


def requests(gen: Generator) -> list[GenerationRequest]:
    return [
        GenerationRequest(sender=1, class_id=7, vectors=name_vectors(gen, "seven")),
        GenerationRequest(sender=2, class_id=3, vectors=name_vectors(gen, MULTI)),
        GenerationRequest(sender=2, class_id=7, vectors=name_vectors(gen, "seven")),
    ]


def test_own_token_embeddings_reproduce_the_real_prompt(generator):
    names = ["seven", MULTI]
    vectors = [name_vectors(generator, n) for n in names]
    assert [v.shape[0] for v in vectors] == [1, 3]
    ours = generator.prompt_embeds(vectors)
    assert ours.shape == (2, 77, 64)
    torch.testing.assert_close(ours, real_prompt_embeds(generator, names), atol=1e-5, rtol=0)
    for i, name in enumerate(names):  # a lone row equals its row in a mixed-length batch
        alone = generator.prompt_embeds([vectors[i]])
        torch.testing.assert_close(
            alone[0], real_prompt_embeds(generator, [name])[0], atol=1e-5, rtol=0
        )
    moved = generator.prompt_embeds([vectors[0] + 0.05 * torch.randn_like(vectors[0]), vectors[1]])
    assert not torch.allclose(moved[0], ours[0], atol=1e-3)
    torch.testing.assert_close(moved[1], ours[1], atol=1e-5, rtol=0)  # rows stay independent


def test_prompts_are_padded_as_the_tiny_unet_was_trained(generator):
    """The tiny UNet was trained on open_clip's ids, which pad with 0, not end-of-text."""
    import open_clip

    tokenizer = open_clip.get_tokenizer(TINY.clip)
    encoder = generator.pipeline.text_encoder
    with torch.no_grad():
        trained = encoder(input_ids=tokenizer(["a photo of a six.", ""])).last_hidden_state
    ours = generator.prompt_embeds([name_vectors(generator, "six")])
    torch.testing.assert_close(ours[0], trained[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(generator._negative_embeds()[0], trained[1], atol=1e-5, rtol=0)
    assert generator.pipeline.tokenizer.pad_token_id == 0


def test_vectors_of_the_wrong_dim_are_refused(generator):
    with pytest.raises(ValueError, match=r"dim 32.*hidden size is 64"):
        generator.prompt_embeds([torch.zeros(2, 32)])
    with pytest.raises(ValueError, match="n_tokens"):
        GenerationRequest(sender=0, class_id=0, vectors=torch.zeros(64))


def test_images_are_seeded_per_image_and_round(generator):
    reqs = requests(generator)
    first = generator.generate(reqs, fast(), run_seed=5, server_round=1)
    again = generator.generate(reqs, fast(), run_seed=5, server_round=1)
    later = generator.generate(reqs, fast(), run_seed=5, server_round=2)
    assert np.array_equal(first.images, again.images)
    assert not np.array_equal(first.images, later.images)
    flat = first.images.reshape(len(first.images), -1).astype(np.int16)
    for a, b in itertools.combinations(range(len(flat)), 2):
        assert np.abs(flat[a] - flat[b]).mean() > 1.0, (a, b)  # no shared noise, same class too


def test_batch_size_does_not_change_the_images(generator):
    reqs = requests(generator)
    one = generator.generate(reqs, fast(batch_size=1), run_seed=5, server_round=1).images
    three = generator.generate(reqs, fast(batch_size=3), run_seed=5, server_round=1).images
    # Different batch shapes change float rounding in the UNet: at most one uint8 level.
    assert np.abs(one.astype(np.int16) - three.astype(np.int16)).max() <= 1
    assert (one == three).mean() > 0.99


def test_outputs_match_the_requests(generator):
    reqs = requests(generator)
    out = generator.generate(reqs, fast(images_per_class=3), run_seed=0, server_round=1)
    assert isinstance(out, GeneratedImages)
    assert out.images.shape == (9, 32, 32, 3) and out.images.dtype == np.uint8
    assert out.labels.dtype == np.int64 and out.senders.dtype == np.int64
    assert out.labels.tolist() == [7, 7, 7, 3, 3, 3, 7, 7, 7]
    assert out.senders.tolist() == [1, 1, 1, 2, 2, 2, 2, 2, 2]


def test_a_round_budget_is_spread_over_requests_and_classes(generator):
    reqs = requests(generator)  # class 7 from senders 1 and 2, class 3 from sender 2
    assert images_per_request(reqs, fast(images_per_round=7)) == [3, 2, 2]
    # one extra image: class 7's first sender; two: each class's first sender, not 7's second
    assert images_per_request(reqs, fast(images_per_round=4)) == [2, 1, 1]
    assert images_per_request(reqs, fast(images_per_round=5)) == [2, 2, 1]
    assert images_per_request(reqs, fast(images_per_round=2)) == [1, 1, 0]
    assert images_per_request([], fast(images_per_round=5)) == []
    out = generator.generate(reqs, fast(images_per_round=5), run_seed=0, server_round=1)
    assert out.labels.tolist() == [7, 7, 3, 3, 7] and out.senders.tolist() == [1, 1, 2, 2, 2]
    # the images a request gets are those it gets per class: a budget changes only how many
    per_class = generator.generate(reqs, fast(), run_seed=0, server_round=1)
    assert np.array_equal(out.images[:2], per_class.images[:2])


@pytest.mark.parametrize("cfg", [None, fast(images_per_class=0)])
def test_nothing_to_generate_gives_empty_arrays(generator, cfg):
    reqs = [] if cfg is None else requests(generator)
    out = generator.generate(reqs, cfg or fast(), run_seed=0, server_round=1)
    assert out.images.shape == (0, 32, 32, 3) and out.images.dtype == np.uint8
    assert out.labels.shape == (0,) and out.senders.shape == (0,)


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("dpm-solver++", DPMSolverMultistepScheduler),
        ("pndm", PNDMScheduler),
        ("ddim", DDIMScheduler),
    ],
)
def test_every_scheduler_generates(generator, name, kind):
    out = generator.generate(requests(generator)[:1], fast(scheduler=name), 0, 1)
    assert out.images.shape == (2, 32, 32, 3)
    assert type(generator.pipeline.scheduler) is kind


def test_scheduler_is_kept_per_name(generator):
    generator.generate(requests(generator)[:1], fast(scheduler="pndm"), 0, 1)
    kept = generator.pipeline.scheduler
    generator.generate(requests(generator)[:1], fast(scheduler="ddim"), 0, 1)
    generator.generate(requests(generator)[:1], fast(scheduler="pndm"), 0, 1)
    assert generator.pipeline.scheduler is kept


def test_unknown_scheduler_is_refused(generator):
    config = dict(generator.pipeline.scheduler.config)
    with pytest.raises(ValueError, match=r"generation\.scheduler.*dpm-solver\+\+, pndm, ddim"):
        make_scheduler("euler", config)


def test_guidance_scale_changes_the_images(generator):
    reqs = requests(generator)[:2]
    plain = generator.generate(reqs, fast(guidance_scale=1.0), 0, 1).images
    guided = generator.generate(reqs, fast(guidance_scale=5.0), 0, 1).images
    assert np.abs(plain.astype(np.int16) - guided.astype(np.int16)).max() > 1


def test_generator_is_loaded_once_per_process(generator):
    assert load_generator(TINY, "cpu", DEFAULT_TEMPLATE) is generator
    assert generator.pipeline.device == torch.device("cpu")


def test_image_seeds_are_stable_and_distinct():
    grid = list(itertools.product(range(3), repeat=5))
    seeds = [image_seed(*key) for key in grid]
    assert len(set(seeds)) == len(grid)
    assert all(0 <= s < 2**63 for s in seeds)
    assert image_seed(1, 2, 3, 4, 5) == image_seed(1, 2, 3, 4, 5)
    assert image_seed(12, 3, 4, 5, 6) != image_seed(1, 23, 4, 5, 6)  # fields do not run together
