"""Synthetic images from received class-token vectors (step 3 of the method).

A client receives other clients' class-token vectors, which live in the token space shared by
its CLIP and the diffusion pipeline's text encoder. :class:`Generator` lays each vector set into
the prompt template, runs the pipeline's text encoder with the vectors substituted at the name
positions (:func:`cmfl_flower.prompts.substituted`) and denoises with classifier-free guidance.

Every image has its own noise seed, derived from ``(run seed, round, sender, class, index)``
(:func:`image_seed`): reruns reproduce, images never share noise, and an image does not depend on
the batch it was drawn in. The pipeline is loaded once per process (:func:`load_generator`),
in the dtype ``backbone.dtype`` selects, with SDPA attention and channels-last UNet and VAE
(:func:`prepare_pipeline`); generation batches images across requests and runs under
``torch.inference_mode``.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast, get_args

import numpy as np
import torch

from cmfl_flower.backbones import Preset, load_pipeline, preset_tokenizer, resolve_dtype
from cmfl_flower.config import GenerationConfig, SchedulerName
from cmfl_flower.images import to_uint8
from cmfl_flower.progress import QUIET, Progress
from cmfl_flower.prompts import PromptTemplate, substituted

if TYPE_CHECKING:
    from diffusers import SchedulerMixin

SCHEDULERS: tuple[str, ...] = get_args(SchedulerName)
_SEED_MASK = (1 << 63) - 1


@dataclass(frozen=True)
class GenerationRequest:
    """Class-token vectors of one class, as received from one client.

    ``variants``: the sender's cluster sets of the class (``tokens.clusters``); when given,
    the request's images are drawn from them in turn instead of from ``vectors``.
    """

    sender: int  # id of the client that sent the vectors
    class_id: int  # label id the generated images get
    vectors: torch.Tensor  # (n_tokens, D) in the shared token space
    variants: tuple[torch.Tensor, ...] = ()  # each (n_tokens_k, D)

    def __post_init__(self) -> None:
        if self.sender < 0 or self.class_id < 0:
            raise ValueError(
                f"sender and class_id must be >= 0, got {self.sender} and {self.class_id}"
            )
        for vectors in (self.vectors, *self.variants):
            if vectors.ndim != 2 or vectors.shape[0] < 1:
                raise ValueError(
                    f"vectors must be (n_tokens >= 1, D), got shape {tuple(vectors.shape)}"
                )

    @property
    def sets(self) -> tuple[torch.Tensor, ...]:
        """The vector sets its images are drawn from, image ``i`` from set ``i % len``."""
        return self.variants or (self.vectors,)


@dataclass(frozen=True)
class GeneratedImages:
    """Generated images with their labels and the client each label came from."""

    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) int64 class ids
    senders: np.ndarray  # (N,) int64 client ids


@dataclass(frozen=True)
class _Job:
    """One image to draw: which request it renders, from which prompt, with which seed."""

    request: int  # index into the request list
    prompt: int  # index into the round's prompts (every request's sets, in request order)
    seed: int


def image_seed(run_seed: int, server_round: int, sender: int, class_id: int, index: int) -> int:
    """A stable 63-bit noise seed for one image (blake2b of the tuple, not ``hash()``)."""
    key = f"cmfl-flower/image/{run_seed}/{server_round}/{sender}/{class_id}/{index}"
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & _SEED_MASK


def make_scheduler(name: str, base_config: dict[str, Any]) -> SchedulerMixin:
    """The scheduler called ``name`` (``generation.scheduler``), built from ``base_config``.

    PNDM skips its Runge-Kutta warm-up (PLMS only, as Stable Diffusion configures it), which
    also lets it run with fewer steps than its order. The schedulers are imported here, when
    a client first generates (DPM-Solver imports scipy).
    """
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler

    if name == "dpm-solver++":
        scheduler = DPMSolverMultistepScheduler.from_config(
            base_config, algorithm_type="dpmsolver++"
        )
    elif name == "pndm":
        scheduler = PNDMScheduler.from_config(base_config, skip_prk_steps=True)
    elif name == "ddim":
        scheduler = DDIMScheduler.from_config(base_config)
    else:
        raise ValueError(
            f"generation.scheduler = {name!r} is unknown; allowed: {', '.join(SCHEDULERS)}"
        )
    return cast("SchedulerMixin", scheduler)


def prepare_pipeline(pipeline: Any) -> Any:
    """Put the UNet and VAE in channels-last layout with SDPA attention (in place)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    for model in (pipeline.unet, pipeline.vae):
        model.to(memory_format=torch.channels_last)
        model.set_attn_processor(AttnProcessor2_0())
    return pipeline


def images_per_request(requests: list[GenerationRequest], cfg: GenerationConfig) -> list[int]:
    """How many images each request gets: ``images-per-class``, or a share of the round's budget.

    With ``images-per-round`` = B > 0 the B images are spread over the R requests as evenly as
    integers allow (B // R each); the B % R extra images go one each to the requests first in an
    order that takes every class's first request before any class's second (in request order
    otherwise), so that the extras spread over classes rather than over one class's senders.
    """
    if cfg.images_per_round == 0:
        return [cfg.images_per_class] * len(requests)
    counts = [cfg.images_per_round // len(requests)] * len(requests) if requests else []
    seen: dict[int, int] = {}
    rank = []  # (this request's position among its class's requests, request index)
    for r, req in enumerate(requests):
        rank.append((seen.get(req.class_id, 0), r))
        seen[req.class_id] = seen.get(req.class_id, 0) + 1
    for _, r in sorted(rank)[: cfg.images_per_round % max(len(requests), 1)]:
        counts[r] += 1
    return counts


def _batches(jobs: list[_Job], size: int) -> Iterator[list[_Job]]:
    for start in range(0, len(jobs), size):
        yield jobs[start : start + size]


class Generator:
    """A loaded pipeline plus the prompt template; turns token vectors into images."""

    def __init__(self, pipeline: Any, template: PromptTemplate) -> None:
        tokenizer = pipeline.tokenizer
        if (template.sot, template.eot) != (tokenizer.bos_token_id, tokenizer.eos_token_id):
            raise ValueError(
                f"prompt template start/end ids {(template.sot, template.eot)} differ from the "
                f"pipeline tokenizer's {(tokenizer.bos_token_id, tokenizer.eos_token_id)}"
            )
        self.pipeline = prepare_pipeline(pipeline)
        # diffusers' ``pipeline.device`` walks every module's parameters on each read (13 % of a
        # P1 relay run's time when read per vector, by cProfile); the pipeline never moves
        self._device = torch.device(pipeline.device)
        for part in (pipeline.unet, pipeline.vae, pipeline.text_encoder):
            part.eval().requires_grad_(False)  # frozen: textual inversion moves only tokens
        self.template = template
        self._base_scheduler_config = dict(pipeline.scheduler.config)
        self._schedulers: dict[str, SchedulerMixin] = {}
        self._negative: torch.Tensor | None = None  # (1, L, D_text), the empty prompt

    @property
    def device(self) -> torch.device:
        """Where the pipeline runs (fixed when it is loaded)."""
        return self._device

    @property
    def image_size(self) -> tuple[int, int]:
        """The pipeline's default (height, width)."""
        size = self.pipeline.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else size
        factor = int(self.pipeline.vae_scale_factor)
        return int(height) * factor, int(width) * factor

    def prompt_embeds(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        """Text-encoder states (B, L, D_text) of the template with ``vectors[b]`` as the name."""
        with torch.no_grad():
            return self.encode_vectors(vectors)

    def encode_vectors(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        """As :meth:`prompt_embeds`, differentiable in ``vectors`` (for textual inversion).

        Prompts are padded with the pipeline tokenizer's pad token, as the pipeline pads the
        negative prompt: the text tower is causal, but the UNet attends to every position.
        """
        text_encoder = self.pipeline.text_encoder
        width = int(text_encoder.config.hidden_size)
        for v in vectors:
            if v.ndim != 2 or v.shape[1] != width:
                raise ValueError(
                    f"class-token vectors have dim {v.shape[-1]} (shape {tuple(v.shape)}), but "
                    f"the text encoder's hidden size is {width}"
                )
        tokenizer = self.pipeline.tokenizer
        ids, mask = self.template.layout(  # (B, L), (B, L)
            [v.shape[0] for v in vectors], tokenizer.model_max_length, tokenizer.pad_token_id
        )
        flat = torch.cat([v.to(self.device) for v in vectors])  # (K, D), K = mask.sum()
        with substituted(text_encoder.get_input_embeddings(), mask, flat):
            out = text_encoder(input_ids=ids.to(self.device))
        return out[0]  # type: ignore[no-any-return]  # last_hidden_state (B, L, D_text)

    def _negative_embeds(self) -> torch.Tensor:
        """The pipeline's own encoding (1, L, D_text) of the empty prompt, computed once."""
        if self._negative is None:
            embeds, _ = self.pipeline.encode_prompt("", self.device, 1, False)
            self._negative = embeds
        return self._negative

    def _use_scheduler(self, name: str) -> None:
        """Put the ``name`` scheduler on the pipeline (built once per name, then reused)."""
        if name not in self._schedulers:
            self._schedulers[name] = make_scheduler(name, self._base_scheduler_config)
        self.pipeline.scheduler = self._schedulers[name]

    def _render(self, embeds: torch.Tensor, seeds: list[int], cfg: GenerationConfig) -> np.ndarray:
        """Denoise one batch: embeds (B, L, D_text) -> images (B, H, W, 3) uint8."""
        negative = self._negative_embeds().expand(embeds.shape[0], -1, -1)  # (B, L, D_text)
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        height, width = self.image_size
        out = self.pipeline(
            height=height,
            width=width,
            prompt_embeds=embeds,
            negative_prompt_embeds=negative,
            num_inference_steps=cfg.steps,
            guidance_scale=cfg.guidance_scale,
            generator=generators,
            output_type="np",
        )
        return to_uint8(np.asarray(out.images, dtype=np.float32))  # from (B, H, W, 3) in [0, 1]

    def generate(
        self,
        requests: list[GenerationRequest],
        cfg: GenerationConfig,
        run_seed: int,
        server_round: int,
        progress: Progress = QUIET,
    ) -> GeneratedImages:
        """:func:`images_per_request` images per request, each with its own noise seed.

        A request's image ``i`` is drawn from its set ``i % len(sets)`` (:attr:`~GenerationRequest.
        sets`): cluster sets share the request's images, they do not add to them.
        """
        counts = images_per_request(requests, cfg)
        first = np.cumsum([0, *(len(req.sets) for req in requests)])  # each request's 1st prompt
        jobs = [
            _Job(
                r,
                int(first[r]) + i % len(req.sets),
                image_seed(run_seed, server_round, req.sender, req.class_id, i),
            )
            for r, req in enumerate(requests)
            for i in range(counts[r])
        ]
        labels = np.array([requests[j.request].class_id for j in jobs], dtype=np.int64)
        senders = np.array([requests[j.request].sender for j in jobs], dtype=np.int64)
        if not jobs:
            empty = np.zeros((0, *self.image_size, 3), dtype=np.uint8)
            return GeneratedImages(empty, labels, senders)
        self._use_scheduler(cfg.scheduler)
        chunks: list[np.ndarray] = []
        with torch.inference_mode():
            prompts = [vectors for req in requests for vectors in req.sets]
            embeds = self.prompt_embeds(prompts)  # (P, L, D_text)
            batches = list(_batches(jobs, cfg.batch_size))
            for batch in progress.over(batches, len(batches), "generation"):
                rows = torch.tensor([j.prompt for j in batch], device=embeds.device)
                chunks.append(self._render(embeds[rows], [j.seed for j in batch], cfg))
        return GeneratedImages(np.concatenate(chunks), labels, senders)


@functools.cache
def load_generator(
    preset: Preset, device_name: str, template: str, dtype_name: str = "auto"
) -> Generator:
    """The preset's pipeline and prompt template, loaded once per process.

    ``dtype_name`` is ``backbone.dtype`` (see :func:`cmfl_flower.backbones.resolve_dtype`).
    """
    device = torch.device(device_name)
    dtype = resolve_dtype(dtype_name, device)
    pipeline = load_pipeline(preset.diffusion, device, dtype, preset.download)
    tokenizer = preset_tokenizer(preset)  # the CLIP itself is not needed here
    pipeline.set_progress_bar_config(disable=True)
    return Generator(pipeline, PromptTemplate.build(tokenizer, template))
