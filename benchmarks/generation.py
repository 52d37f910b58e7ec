"""Images per second of the project's generator against the original research loop.

``python -m benchmarks.generation`` measures, in one run and on one preset (``--preset``,
default ``tiny``), the same number of images three ways:

* **reference**, what the original research code did: for every image the pipeline is loaded
  from disk again (``from_pretrained`` of a saved copy), batch 1, fp32, PNDM 50 steps,
  guidance 7.5, the prompt given as text (the pipeline encodes it and the empty negative
  prompt on every call);
* **project**: :class:`cmfl_flower.generation.Generator` kept resident, with the app's default
  generation config (scheduler, steps, batch size) and ``backbone.dtype = auto``;
* **project at equal steps**: the same generator with PNDM 50 steps, so the ratio separates
  batching and residency from the step count.

It prints the three rates and two ratios. ``--full-size bk-sdm-small|bk-sdm-v2-small`` builds
the full-size architecture from :mod:`cmfl_flower.archs` with random weights instead (meant for
a GPU: bf16/fp16, SDPA attention, channels-last, optional ``--compile``; ``--height/--width``
make it runnable on a CPU at a small size). Both sides get one untimed warm-up image.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch

from cmfl_flower.archs import ARCHS, build_pipeline
from cmfl_flower.backbones import (
    PRESETS,
    load_pipeline,
    resolve_device,
    resolve_dtype,
    resolve_preset,
)
from cmfl_flower.config import BackboneConfig, GenerationConfig
from cmfl_flower.generation import GenerationRequest, Generator, make_scheduler
from cmfl_flower.prompts import DEFAULT_TEMPLATE, PromptTemplate

CLASS_NAMES = ("zero", "one", "two", "three")  # one request per name
REFERENCE_STEPS = 50
REFERENCE_GUIDANCE = 7.5


@dataclass(frozen=True)
class Subject:
    """What is measured: a saved pipeline on disk and the generator built from it."""

    label: str
    saved: Path  # a diffusers directory the reference reloads for every image
    generator: Generator  # resident, prepared, in the chosen dtype
    load_seconds: float  # loading or building the resident generator once


def _tiny_subject(preset_name: str, device: torch.device, dtype: torch.dtype) -> Subject:
    preset = resolve_preset(BackboneConfig(preset=preset_name))  # type: ignore[arg-type]
    start = time.perf_counter()
    pipeline = load_pipeline(preset.diffusion, device, dtype)
    template = PromptTemplate.build(open_clip.get_tokenizer(preset.clip), DEFAULT_TEMPLATE)
    generator = Generator(pipeline, template)
    return Subject(preset_name, Path(preset.diffusion), generator, time.perf_counter() - start)


def _full_size_subject(
    name: str, size: tuple[int, int], device: torch.device, dtype: torch.dtype, work: Path
) -> Subject:
    torch.manual_seed(0)
    start = time.perf_counter()
    pipeline = build_pipeline(name, work / "tokenizer")
    factor = int(pipeline.vae_scale_factor)
    pipeline.unet.register_to_config(sample_size=[size[0] // factor, size[1] // factor])
    saved = work / "pipeline"
    pipeline.save_pretrained(saved)
    build_seconds = time.perf_counter() - start
    start = time.perf_counter()
    pipeline = pipeline.to(device, dtype)
    template = PromptTemplate.build(open_clip.get_tokenizer(PRESETS[name].clip), DEFAULT_TEMPLATE)
    generator = Generator(pipeline, template)
    print(f"built {name} with random weights and saved a copy in {build_seconds:.1f} s")
    return Subject(name, saved, generator, time.perf_counter() - start)


def _requests(generator: Generator) -> list[GenerationRequest]:
    """One request per class name, its vectors the text encoder's own name embeddings."""
    tokenizer = generator.pipeline.tokenizer
    table = generator.pipeline.text_encoder.get_input_embeddings().weight  # (V, D)
    requests = []
    for class_id, name in enumerate(CLASS_NAMES):
        ids = tokenizer(name, add_special_tokens=False).input_ids
        requests.append(GenerationRequest(1, class_id, table[ids].detach().float().clone()))
    return requests


def reference_rate(subject: Subject, images: int, device: torch.device) -> float:
    """Images/s of the research loop: reload, batch 1, fp32, PNDM 50 steps, text prompt."""
    height, width = subject.generator.image_size

    def one(index: int) -> None:
        pipeline = load_pipeline(str(subject.saved), device, torch.float32)
        pipeline.scheduler = make_scheduler("pndm", dict(pipeline.scheduler.config))
        name = CLASS_NAMES[index % len(CLASS_NAMES)]
        pipeline(
            DEFAULT_TEMPLATE.format(name=name),
            height=height,
            width=width,
            num_inference_steps=REFERENCE_STEPS,
            guidance_scale=REFERENCE_GUIDANCE,
            generator=torch.Generator("cpu").manual_seed(index),
            output_type="np",
        )

    one(-1)  # warm-up
    start = time.perf_counter()
    for index in range(images):
        one(index)
    return images / (time.perf_counter() - start)


def project_rate(subject: Subject, images: int, cfg: GenerationConfig) -> float:
    """Images/s of the resident generator on ``images`` images spread over the classes."""
    generator = subject.generator
    requests = _requests(generator)
    per_class = -(-images // len(requests))  # ceil
    generator.generate(requests[:1], cfg.model_copy(update={"images_per_class": 1}), 0, 0)
    start = time.perf_counter()
    out = generator.generate(requests, cfg.model_copy(update={"images_per_class": per_class}), 0, 1)
    return len(out.labels) / (time.perf_counter() - start)


def _describe(cfg: GenerationConfig) -> str:
    return f"{cfg.scheduler} {cfg.steps} steps, batch {cfg.batch_size}"


def main(argv: list[str] | None = None) -> None:
    """Measure the reference and the project side by side; print rates and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny"])
    parser.add_argument("--full-size", choices=ARCHS, default=None)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=GenerationConfig().batch_size)
    parser.add_argument("--height", type=int, default=512, help="--full-size only")
    parser.add_argument("--width", type=int, default=512, help="--full-size only")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--no-reference", action="store_true", help="project side only")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    with tempfile.TemporaryDirectory(prefix="cmfl-gen-bench-") as tmp:
        subject = (
            _full_size_subject(args.full_size, (args.height, args.width), device, dtype, Path(tmp))
            if args.full_size
            else _tiny_subject(args.preset, device, dtype)
        )
        if args.compile:
            subject.generator.pipeline.unet = torch.compile(subject.generator.pipeline.unet)
        _report(subject, args, device, dtype)


def _report(subject: Subject, args: Any, device: torch.device, dtype: torch.dtype) -> None:
    height, width = subject.generator.image_size
    default = GenerationConfig(batch_size=args.batch_size)
    equal = default.model_copy(update={"scheduler": "pndm", "steps": REFERENCE_STEPS})
    print(
        f"{subject.label}: {args.images} images at {height}x{width}, device {device}, "
        f"project dtype {str(dtype).removeprefix('torch.')}, compile {args.compile}, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"project: generator loaded once in {subject.load_seconds:.2f} s (not in the rates)")
    fast = project_rate(subject, args.images, default)
    print(f"project ({_describe(default)}): {fast:.3f} images/s", flush=True)
    if args.no_reference:
        return
    same = project_rate(subject, args.images, equal)
    print(f"project at equal steps ({_describe(equal)}): {same:.3f} images/s", flush=True)
    ref = reference_rate(subject, args.images, device)
    print(
        f"reference (reload per image, batch 1, fp32, pndm {REFERENCE_STEPS} steps, "
        f"guidance {REFERENCE_GUIDANCE}): {ref:.3f} images/s"
    )
    print(f"ratio overall: {fast / ref:.1f}x")
    print(f"ratio at equal steps and scheduler: {same / ref:.1f}x")


if __name__ == "__main__":
    main()
