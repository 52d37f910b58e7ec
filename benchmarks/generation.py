"""Images per second of the project's generator against the original research loop.

``python -m benchmarks.generation`` measures, in one run and on one preset (``--preset``,
default ``tiny``), the same number of images three ways:

* **reference**, what the original research code does in a client's round: the pipeline
  loaded from disk once (``from_pretrained`` of a saved copy) and reused for every image of the
  round, batch 1, fp32, PNDM 50 steps, guidance 7.5, the prompt given as text (the pipeline
  encodes it and the empty negative prompt on every call);
* **project**: :class:`cmfl_flower.generation.Generator`, with the app's default generation
  config (scheduler, steps, batch size) and ``backbone.dtype = auto``;
* **project at equal steps**: the same generator with PNDM 50 steps, so the ratio separates
  batching from the step count.

Every path is warmed up the same way: one untimed call of the shape it is then timed on (one
image for the reference, which generates one at a time; one full batch for the project, eager
or compiled), so no path pays its first-call costs in the timed part. Loading is timed apart
(``*-load-seconds``), after the imports a first load pays (an untimed load first: the
cold-start benchmark measures imports), and reported two ways: the **steady** ratio leaves
loads out; the **per round** ratio counts one load on each side for ``--images`` images, what
one client's round costs in a fresh process (a deployment starts one per message) when it
generates that many.

It prints the rates and ratios; ``--results`` keeps them (default
``benchmarks/results/generation.json``, under ``--tag``, ``, run <i>`` added with ``--repeats``)
with the command, commit and machine.
``--full-size bk-sdm-small|bk-sdm-v2-small`` builds the full-size architecture from
:mod:`training.archs` with random weights instead (meant for a GPU: bf16/fp16, SDPA
attention, channels-last, optional ``--compile``; ``--height/--width`` make it runnable on a
CPU at a small size).

For the GPU script (``benchmarks/gpu.sh``): ``--compare-compile`` measures the project side
eager, then with the UNet compiled, in the same process; ``--profile`` times one batch's text
encoder, UNet and VAE decoder (the device synchronised around each call); ``--json`` writes
every figure as it comes; ``--reference-images`` and ``--reference-steps`` shorten the
reference loop.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch

from benchmarks import commit, record_line, store, stored_results
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
from training.archs import ARCHS, build_pipeline

CLASS_NAMES = ("zero", "one", "two", "three")  # one request per name
REFERENCE_STEPS = 50
REFERENCE_GUIDANCE = 7.5
RESULTS = Path(__file__).resolve().parent / "results" / "generation.json"


@dataclass(frozen=True)
class Subject:
    """What is measured: a saved pipeline on disk and the generator built from it."""

    label: str
    saved: Path  # a diffusers directory the reference reloads for every image
    generator: Generator  # resident, prepared, in the chosen dtype
    load_seconds: float  # loading or building the resident generator once


def _tiny_subject(preset_name: str, device: torch.device, dtype: torch.dtype) -> Subject:
    preset = resolve_preset(BackboneConfig(preset=preset_name))  # type: ignore[arg-type]
    load_pipeline(preset.diffusion, device, dtype)  # untimed: the imports a first load pays
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


def reference_rate(
    subject: Subject, images: int, device: torch.device, steps: int = REFERENCE_STEPS
) -> tuple[float, float]:
    """(images/s, load seconds) of the research loop: one load, batch 1, fp32, text prompt."""
    height, width = subject.generator.image_size
    start = time.perf_counter()
    pipeline = load_pipeline(str(subject.saved), device, torch.float32)
    pipeline.scheduler = make_scheduler("pndm", dict(pipeline.scheduler.config))
    load_seconds = time.perf_counter() - start

    def one(index: int) -> None:
        name = CLASS_NAMES[index % len(CLASS_NAMES)]
        pipeline(
            DEFAULT_TEMPLATE.format(name=name),
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=REFERENCE_GUIDANCE,
            generator=torch.Generator("cpu").manual_seed(index),
            output_type="np",
        )

    one(-1)  # warm-up: one call of the shape timed
    start = time.perf_counter()
    for index in range(images):
        one(index)
    return images / (time.perf_counter() - start), load_seconds


def project_rate(subject: Subject, images: int, cfg: GenerationConfig) -> float:
    """Images/s of the resident generator on ``images`` images spread over the classes.

    Warm-up: one untimed full batch, the shape then timed (a compiled UNet compiles on it).
    """
    generator = subject.generator
    requests = _requests(generator)
    per_class = -(-images // len(requests))  # ceil
    warm = cfg.model_copy(update={"images_per_class": cfg.batch_size})
    generator.generate(requests[:1], warm, 0, 0)
    start = time.perf_counter()
    out = generator.generate(requests, cfg.model_copy(update={"images_per_class": per_class}), 0, 1)
    return len(out.labels) / (time.perf_counter() - start)


def per_round(images: int, rate: float, load_seconds: float) -> float:
    """Images/s of one client's round of ``images`` images with one load first."""
    return images / (load_seconds + images / rate)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def component_timer(pipeline: Any, device: torch.device) -> Iterator[dict[str, float]]:
    """Seconds spent in the text encoder, UNet and VAE decoder while the block runs."""
    parts = {
        "text-encoder": pipeline.text_encoder,
        "unet": pipeline.unet,
        "vae-decoder": pipeline.vae.decoder,
    }
    seconds = dict.fromkeys(parts, 0.0)
    started: dict[str, float] = {}
    handles = []
    for name, module in parts.items():

        def before(*_: Any, name: str = name) -> None:
            _synchronize(device)
            started[name] = time.perf_counter()

        def after(*_: Any, name: str = name) -> None:
            _synchronize(device)
            seconds[name] += time.perf_counter() - started[name]

        handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        yield seconds
    finally:
        for handle in handles:
            handle.remove()


def profile_batch(
    subject: Subject, cfg: GenerationConfig, device: torch.device
) -> dict[str, float]:
    """One batch of ``cfg.batch_size`` images: wall seconds and seconds per component."""
    generator = subject.generator
    batch = cfg.model_copy(update={"images_per_class": cfg.batch_size})
    with component_timer(generator.pipeline, device) as seconds:
        _synchronize(device)
        start = time.perf_counter()
        generator.generate(_requests(generator)[:1], batch, 0, 2)
        _synchronize(device)
        wall = time.perf_counter() - start
    return {"wall": wall, **seconds, "other": wall - sum(seconds.values())}


def _describe(cfg: GenerationConfig) -> str:
    return f"{cfg.scheduler} {cfg.steps} steps, batch {cfg.batch_size}"


def main(argv: list[str] | None = None) -> None:
    """Measure the reference and the project side by side; print rates and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny"])
    parser.add_argument("--full-size", choices=ARCHS, default=None)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=GenerationConfig().batch_size)
    parser.add_argument("--steps", type=int, default=GenerationConfig().steps)
    parser.add_argument("--height", type=int, default=512, help="--full-size only")
    parser.add_argument("--width", type=int, default=512, help="--full-size only")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    parser.add_argument(
        "--compare-compile", action="store_true", help="project side eager, then compiled"
    )
    parser.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend (eager: no codegen)"
    )
    parser.add_argument("--profile", action="store_true", help="seconds per component, 1 batch")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--no-reference", action="store_true", help="project side only")
    parser.add_argument("--reference-images", type=int, default=0, help="0: --images")
    parser.add_argument("--reference-steps", type=int, default=REFERENCE_STEPS)
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--results", type=Path, default=RESULTS, help="keep them here, by tag")
    parser.add_argument("--tag", default="", help="key in --results (default: subject, device)")
    parser.add_argument("--repeats", type=int, default=1, help="measure this many times")
    parser.add_argument(
        "--show", action="store_true", help="instead: print what --results holds, running nothing"
    )
    args = parser.parse_args(argv)
    if args.show:
        show(args.results)
        return
    if args.compile and args.compare_compile:
        parser.error("--compile and --compare-compile exclude each other")
    if args.threads:
        torch.set_num_threads(args.threads)
    code = commit()  # the code that runs
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    with tempfile.TemporaryDirectory(prefix="cmfl-gen-bench-") as tmp:
        subject = (
            _full_size_subject(args.full_size, (args.height, args.width), device, dtype, Path(tmp))
            if args.full_size
            else _tiny_subject(args.preset, device, dtype)
        )
        if args.compile:
            unet = subject.generator.pipeline.unet
            subject.generator.pipeline.unet = torch.compile(unet, backend=args.compile_backend)
        runs = []
        for _ in range(args.repeats):  # the same loaded subject, measured again
            runs.append(Figures(args.json))
            _report(subject, args, device, dtype, runs[-1])
    tag = args.tag or f"{runs[0]['subject']} on {runs[0]['device']}"
    for index, figures in enumerate(runs, 1):
        store(args.results, f"{tag}, run {index}" if args.repeats > 1 else tag, figures, code)


class Figures(dict[str, Any]):
    """The measured figures, each update written to ``path`` at once (when given) and printed.

    A run stopped by a time limit keeps what it had measured; each update prints the lines of
    :func:`render` that it added.
    """

    def __init__(self, path: Path | None) -> None:
        super().__init__()
        self.path = path
        self.printed = 0

    def add(self, **figures: Any) -> None:
        """Record ``figures`` (keys with ``_`` for ``-``), rewrite the file, print new lines."""
        self.update({key.replace("_", "-"): value for key, value in figures.items()})
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self, indent=1) + "\n")
        lines = render(self)
        for line in lines[self.printed :]:
            print(line, flush=True)
        self.printed = len(lines)


def render(figures: dict[str, Any]) -> list[str]:
    """The lines a run prints of ``figures``, in the order it measures them: those it has.

    Records stored before the run kept its thread count, compile flag and reference settings
    take them from the machine record and the benchmark's defaults.
    """
    height, width = figures["size"]
    threads = figures.get("threads", figures.get("machine", {}).get("torch-threads"))
    batch = figures["project"].rsplit("batch ", 1)[1]
    steps = figures.get("reference-steps", REFERENCE_STEPS)
    lines = [
        f"{figures['subject']}: {figures['images']} images at {height}x{width}, device "
        f"{figures['device']}, project dtype {figures['dtype']}, compile "
        f"{figures.get('compile', False)}, torch threads {threads}",
        f"project: generator loaded in {figures['load-seconds']:.2f} s (not in the rates)",
    ]
    if "project-images-per-s" in figures:
        rate = figures["project-images-per-s"]
        lines.append(f"project ({figures['project']}): {rate:.3f} images/s")
    if "profile-seconds" in figures:
        parts = figures["profile-seconds"].items()
        lines.append("one batch, seconds: " + ", ".join(f"{k} {v:.3f}" for k, v in parts))
    if "equal-steps-images-per-s" in figures:
        lines.append(
            f"project at equal steps (pndm {steps} steps, batch {batch}): "
            f"{figures['equal-steps-images-per-s']:.3f} images/s"
        )
    if "ratio-per-round" in figures:
        lines += _reference_lines(figures, steps)
    if "compiled-images-per-s" in figures:
        rate = figures["compiled-images-per-s"]
        lines.append(
            f"project compiled ({figures['project']}): {rate:.3f} images/s, "
            f"{rate / figures['project-images-per-s']:.2f}x eager "
            f"(compiling and the first batch: {figures['compile-seconds']:.1f} s)"
        )
    if "ratio-compiled-steady" in figures:
        lines.append(f"ratio compiled, steady: {figures['ratio-compiled-steady']:.1f}x")
    return lines


def _reference_lines(figures: dict[str, Any], steps: int) -> list[str]:
    return [
        f"reference ({figures['reference-images']} images; loaded once in "
        f"{figures['reference-load-seconds']:.2f} s, batch 1, fp32, pndm {steps} steps, guidance "
        f"{REFERENCE_GUIDANCE}): {figures['reference-images-per-s']:.3f} images/s",
        f"ratio steady (loads left out): {figures['ratio-steady']:.1f}x",
        f"ratio at equal steps and scheduler: {figures['ratio-equal-steps']:.1f}x",
        f"ratio per round ({figures['images']} images and one load on each side): "
        f"{figures['ratio-per-round']:.1f}x",
    ]


def _report(
    subject: Subject, args: Any, device: torch.device, dtype: torch.dtype, figures: Figures
) -> None:
    """Measure each figure, printed as it comes: eager, profile, reference, then compiled."""
    height, width = subject.generator.image_size
    default = GenerationConfig(batch_size=args.batch_size, steps=args.steps)
    equal = default.model_copy(update={"scheduler": "pndm", "steps": args.reference_steps})
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    figures.add(
        subject=subject.label,
        size=[height, width],
        device=name,
        dtype=str(dtype).removeprefix("torch."),
        images=args.images,
        project=_describe(default),
        load_seconds=subject.load_seconds,
        compile=args.compile,
        threads=torch.get_num_threads(),
        reference_steps=args.reference_steps,
    )
    figures.add(project_images_per_s=project_rate(subject, args.images, default))
    if args.profile:
        figures.add(profile_seconds=profile_batch(subject, default, device))
    if not args.no_reference:
        _reference(subject, args, device, equal, figures)
    if args.compare_compile:
        _compiled(subject, args, default, figures)


def _reference(
    subject: Subject, args: Any, device: torch.device, equal: GenerationConfig, figures: Figures
) -> None:
    """The project at the reference's scheduler and steps, then the reference loop itself."""
    same = project_rate(subject, args.images, equal)
    figures.add(equal_steps_images_per_s=same)
    images = args.reference_images or args.images
    ref, ref_load = reference_rate(subject, images, device, args.reference_steps)
    fast = figures["project-images-per-s"]
    load = subject.load_seconds
    figures.add(
        reference_images=images,
        reference_images_per_s=ref,
        reference_load_seconds=ref_load,
        ratio_steady=fast / ref,
        ratio_equal_steps=same / ref,
        ratio_per_round=per_round(args.images, fast, load) / per_round(args.images, ref, ref_load),
    )


def _compiled(subject: Subject, args: Any, cfg: GenerationConfig, figures: Figures) -> None:
    """Compile the UNet, then measure again (an untimed full batch compiles it)."""
    pipeline = subject.generator.pipeline
    start = time.perf_counter()
    pipeline.unet = torch.compile(pipeline.unet, backend=args.compile_backend)
    full_batch = cfg.model_copy(update={"images_per_class": cfg.batch_size})
    subject.generator.generate(_requests(subject.generator)[:1], full_batch, 0, 0)  # compiles
    compile_seconds = time.perf_counter() - start
    rate = project_rate(subject, args.images, cfg)  # the same warm-up as the eager side
    figures.add(compiled_images_per_s=rate, compile_seconds=compile_seconds)
    if "reference-images-per-s" in figures:
        figures.add(ratio_compiled_steady=rate / figures["reference-images-per-s"])


def runs_table(records: list[dict[str, Any]]) -> str:
    """One row per stored run: the rates and the three ratios."""
    lines = [
        "| run | project images/s | reference images/s | steady | equal steps | per round |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for index, record in enumerate(records, 1):
        lines.append(
            f"| {index} | {record['project-images-per-s']:.2f} | "
            f"{record['reference-images-per-s']:.2f} | {record['ratio-steady']:.1f}x | "
            f"{record['ratio-equal-steps']:.1f}x | {record['ratio-per-round']:.1f}x |"
        )
    return "\n".join(lines)


def show(path: Path) -> None:
    """Per tag: its provenance, the last run as it printed, and a table of every repeat."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for tag, record in stored_results(path).items():
        groups.setdefault(tag.split(", run ")[0], []).append(record)
    for tag, records in groups.items():
        print(record_line(tag, records[-1]))
        print("\n".join(render(records[-1])))
        if len(records) > 1 and all("ratio-per-round" in record for record in records):
            print(runs_table(records))


if __name__ == "__main__":
    main()
