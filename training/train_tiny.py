"""Train the project's own tiny backbone on the *public* digits split (CPU, seeded).

``python -m training.train_tiny`` trains, in order:

1. a tiny open_clip CLIP (vision and text towers, open_clip's real BPE tokenizer) with
   cross-entropy between images and the text features of the ten class prompts, several prompt
   templates, light augmentation;
2. the diffusion pipeline's text encoder: the CLIP's text tower converted to a transformers
   ``CLIPTextModel`` (so class tokens learned against the CLIP drive the generator), frozen;
3. a tiny ``AutoencoderKL`` (32x32 RGB <-> 8x8x4 latents: the digits are 8x8 at source);
4. a tiny ``UNet2DConditionModel`` (epsilon prediction, SD's noise schedule, 10 % empty
   prompts for classifier-free guidance).

It prints the training curves, measures the quality gates (zero-shot accuracy on held-out
digits; share of generated images the CLIP recognises as the prompted class), renders a
sample grid and writes the weights (safetensors, float16) with a model card. The public split
is disjoint from every client's data and from the global test set.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from cmfl_flower.backbones import CLIP_CONFIG_FILE
from cmfl_flower.data import LabeledImages, load_source
from cmfl_flower.images import resize_uint8
from cmfl_flower.zoo import HERE as ZOO_HOME
from training.builders import (
    build_tiny_pipeline,
    clip_text_to_hf,
    save_clip,
    tiny_components,
)

ZOO_TINY = ZOO_HOME / "tiny"  # the runtime reads the weights from the zoo
IMAGE_SIZE = 32
TEMPLATES = (
    "a photo of a {name}.",
    "a handwritten {name}.",
    "the digit {name}.",
    "a picture of the number {name}.",
    "a blurry photo of a {name}.",
    "an image of a {name}.",
    "{name}",
)
EVAL_TEMPLATE = TEMPLATES[0]
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


@dataclass(frozen=True)
class Budget:
    """Steps and batch sizes of every stage."""

    clip_steps: int = 3000
    vae_steps: int = 800
    unet_steps: int = 5000
    batch_size: int = 64
    eval_images_per_class: int = 20


QUICK = Budget(clip_steps=20, vae_steps=20, unet_steps=50, batch_size=16, eval_images_per_class=2)


def log(message: str) -> None:
    """Print a line of the training log, flushed."""
    print(message, flush=True)


def to_unit(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [0, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random small rotation, scale and shift. x: (B, 3, H, W) in [0, 1]."""
    n = x.shape[0]
    angle = (torch.rand(n, generator=generator) - 0.5) * math.radians(20)
    scale = 1 + (torch.rand(n, generator=generator) - 0.5) * 0.2
    shift = (torch.rand(n, 2, generator=generator) - 0.5) * 0.15
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="zeros", align_corners=False)


def lr_at(step: int, total: int, peak: float, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay to 10 % of ``peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, value: float) -> None:
    """Set every parameter group's learning rate."""
    for group in optimizer.param_groups:
        group["lr"] = value


# ----- CLIP --------------------------------------------------------------------------------
def prompt_ids(tokenizer: Any, template: str, names: tuple[str, ...]) -> torch.Tensor:
    """(C, 77) token ids of ``template`` for every class name."""
    ids: torch.Tensor = tokenizer([template.format(name=name) for name in names])
    return ids


@torch.no_grad()
def zero_shot_accuracy(model: Any, tokenizer: Any, data: LabeledImages) -> float:
    """Top-1 accuracy of ``a photo of a {name}.`` prompts on ``data``."""
    model.eval()
    text = model.encode_text(prompt_ids(tokenizer, EVAL_TEMPLATE, data.class_names), normalize=True)
    pixels = (to_unit(resize_uint8(data.images, IMAGE_SIZE)) - MEAN) / STD
    predicted = (model.encode_image(pixels, normalize=True) @ text.T).argmax(1).numpy()
    return float((predicted == data.labels).mean())


def train_clip(budget: Budget, public: LabeledImages, held_out: LabeledImages, seed: int) -> Any:
    """Train the tiny CLIP from its config; returns the model (eval mode)."""
    torch.manual_seed(seed)
    model = open_clip.create_model(f"local-dir:{ZOO_TINY / 'clip'}", load_weights=False)
    tokenizer = open_clip.get_tokenizer(f"local-dir:{ZOO_TINY / 'clip'}")
    generator = torch.Generator().manual_seed(seed)
    images, labels = (
        to_unit(resize_uint8(public.images, IMAGE_SIZE)),
        torch.from_numpy(public.labels),
    )
    texts = [prompt_ids(tokenizer, t, public.class_names) for t in TEMPLATES]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    for step in range(budget.clip_steps):
        model.train()
        set_lr(optimizer, lr_at(step, budget.clip_steps, 2e-3))
        idx = torch.randint(len(images), (budget.batch_size,), generator=generator)
        pixels = (augment(images[idx], generator) - MEAN) / STD
        template = int(torch.randint(len(texts), (1,), generator=generator))
        image_f = model.encode_image(pixels, normalize=True)  # (B, E)
        text_f = model.encode_text(texts[template], normalize=True)  # (C, E)
        loss = F.cross_entropy(model.logit_scale.exp() * image_f @ text_f.T, labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 250 == 0 or step == budget.clip_steps - 1:
            acc = zero_shot_accuracy(model, tokenizer, held_out)
            log(f"clip  step {step:5d}  loss {loss.item():.4f}  held-out zero-shot acc {acc:.3f}")
    return model.eval().requires_grad_(False)


# ----- diffusion ---------------------------------------------------------------------------
def build_vae() -> Any:
    """The tiny AutoencoderKL from the shipped components config."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(**tiny_components()["vae"])


def train_vae(budget: Budget, public: LabeledImages, seed: int) -> Any:
    """Reconstruction + small KL; sets the latent scaling factor to 1 / std of the latents."""
    torch.manual_seed(seed)
    vae = build_vae()
    generator = torch.Generator().manual_seed(seed + 1)
    images = to_unit(resize_uint8(public.images, IMAGE_SIZE)) * 2 - 1  # (N, 3, S, S) in [-1, 1]
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    for step in range(budget.vae_steps):
        set_lr(optimizer, lr_at(step, budget.vae_steps, 1e-3))
        idx = torch.randint(len(images), (budget.batch_size,), generator=generator)
        x = augment((images[idx] + 1) / 2, generator) * 2 - 1
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=generator)).sample
        loss = F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 250 == 0 or step == budget.vae_steps - 1:
            log(f"vae   step {step:5d}  loss {loss.item():.5f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mode()
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    log(f"vae   latent scaling factor {vae.config.scaling_factor:.4f}")
    return vae


def text_table(text_encoder: Any, tokenizer: Any, names: tuple[str, ...]) -> torch.Tensor:
    """(T*C + 1, 77, D) prompt embeddings of every (template, class), then the empty prompt."""
    ids = [prompt_ids(tokenizer, t, names) for t in TEMPLATES]
    ids.append(tokenizer([""]))
    with torch.no_grad():
        hidden: torch.Tensor = text_encoder(input_ids=torch.cat(ids)).last_hidden_state
    return hidden


def build_unet() -> Any:
    """The tiny UNet2DConditionModel from the shipped components config."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**tiny_components()["unet"])


def train_unet(
    budget: Budget, public: LabeledImages, vae: Any, table: torch.Tensor, seed: int
) -> Any:
    """Epsilon-prediction training on VAE latents, conditioned on prompt embeddings."""
    from diffusers import DDPMScheduler

    torch.manual_seed(seed)
    unet = build_unet()
    schedule = DDPMScheduler.from_config(tiny_components()["scheduler"])
    generator = torch.Generator().manual_seed(seed + 2)
    images = to_unit(resize_uint8(public.images, IMAGE_SIZE))
    labels = torch.from_numpy(public.labels)
    classes = len(public.class_names)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=5e-4, weight_decay=0.01)
    for step in range(budget.unet_steps):
        set_lr(optimizer, lr_at(step, budget.unet_steps, 5e-4))
        idx = torch.randint(len(images), (budget.batch_size,), generator=generator)
        with torch.no_grad():
            x = augment(images[idx], generator) * 2 - 1
            latents = vae.encode(x).latent_dist.sample(generator=generator)
            latents = latents * vae.config.scaling_factor  # (B, 4, 8, 8)
        template = torch.randint(len(TEMPLATES), (len(idx),), generator=generator)
        rows = template * classes + labels[idx]
        empty = torch.rand(len(idx), generator=generator) < 0.1
        rows[empty] = len(table) - 1
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(schedule.config.num_train_timesteps, (len(idx),), generator=generator)
        noisy = schedule.add_noise(latents, noise, t)
        predicted = unet(noisy, t, encoder_hidden_states=table[rows]).sample
        loss = F.mse_loss(predicted, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        if step % 250 == 0 or step == budget.unet_steps - 1:
            log(f"unet  step {step:5d}  loss {loss.item():.5f}")
    return unet.eval().requires_grad_(False)


# ----- quality gates -----------------------------------------------------------------------
@dataclass(frozen=True)
class Gates:
    """The measured quality figures written into the model card."""

    zero_shot_accuracy: float
    generation_recognised: float
    generated_per_class: int
    per_class_recognised: list[float]


def measure_gates(
    clip: Any, pipeline: Any, held_out: LabeledImages, per_class: int, seed: int, out: Path
) -> Gates:
    """Zero-shot accuracy, and the share of generations the CLIP labels as their prompt."""
    from cmfl_flower.config import GenerationConfig
    from cmfl_flower.generation import GenerationRequest, Generator
    from cmfl_flower.prompts import PromptTemplate

    tokenizer = open_clip.get_tokenizer(f"local-dir:{ZOO_TINY / 'clip'}")
    generator = Generator(pipeline, PromptTemplate.build(tokenizer, EVAL_TEMPLATE))
    names = held_out.class_names
    requests = [
        GenerationRequest(0, c, clip.token_embedding.weight[tokenizer.encode(n)].detach())
        for c, n in enumerate(names)
    ]
    images = generator.generate(requests, GenerationConfig(images_per_class=per_class), seed, 0)
    recognised = LabeledImages(images.images, images.labels, names)
    predicted = _predict(clip, tokenizer, recognised)
    hits = predicted == images.labels
    save_grid(images.images, len(names), per_class, names, out / "samples.png")
    return Gates(
        zero_shot_accuracy=zero_shot_accuracy(clip, tokenizer, held_out),
        generation_recognised=float(hits.mean()),
        generated_per_class=per_class,
        per_class_recognised=[float(hits[images.labels == c].mean()) for c in range(len(names))],
    )


@torch.no_grad()
def _predict(clip: Any, tokenizer: Any, data: LabeledImages) -> np.ndarray:
    text = clip.encode_text(prompt_ids(tokenizer, EVAL_TEMPLATE, data.class_names), normalize=True)
    pixels = (to_unit(resize_uint8(data.images, IMAGE_SIZE)) - MEAN) / STD
    predicted: np.ndarray = (clip.encode_image(pixels, normalize=True) @ text.T).argmax(1).numpy()
    return predicted


def save_grid(
    images: np.ndarray, rows: int, columns: int, names: tuple[str, ...], path: Path
) -> None:
    """A PNG grid: one row per class (labelled), ``columns`` images each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = min(columns, 8)
    figure, axes = plt.subplots(rows, shown, figsize=(shown * 0.9, rows * 0.9), squeeze=False)
    for row in range(rows):
        for col in range(shown):
            axis = axes[row][col]
            axis.imshow(images[row * columns + col], interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
        axes[row][0].set_ylabel(names[row], rotation=0, ha="right", va="center", fontsize=8)
    figure.suptitle("tiny pipeline: 'a photo of a {name}.'", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


# ----- writing -----------------------------------------------------------------------------
def save_all(clip: Any, pipeline: Any, out: Path) -> int:
    """Write CLIP and pipeline weights (float16 safetensors); return total bytes."""
    config = json.loads((ZOO_TINY / "clip" / CLIP_CONFIG_FILE).read_text())["model_cfg"]
    save_clip(clip.half(), config, out / "clip")
    clip.float()
    pipeline.to(dtype=torch.float16).save_pretrained(out / "diffusion", safe_serialization=True)
    pipeline.to(dtype=torch.float32)
    return sum(p.stat().st_size for p in out.rglob("*.safetensors"))


def gate_table(gates: Gates) -> str:
    """The quality gates as a Markdown table."""
    rows = [
        ("zero-shot accuracy, held-out digits (global test split)", gates.zero_shot_accuracy),
        ("generations the tiny CLIP recognises as the prompted class", gates.generation_recognised),
        ("generations per class (DPM-Solver++, 20 steps, guidance 7.5)", gates.generated_per_class),
    ]
    lines = [f"| {name} | {value:.3f} |" for name, value in rows[:2]]
    lines.append(f"| {rows[2][0]} | {rows[2][1]} |")
    per_class = ", ".join(f"{v:.2f}" for v in gates.per_class_recognised)
    lines.append(f"| recognised per class (`zero` ... `nine`) | {per_class} |")
    return "\n".join(["| gate | value |", "| --- | --- |", *lines])


def write_card(
    out: Path, budget: Budget, gates: Gates, sizes: int, seconds: float, argv: list[str]
) -> None:
    """The model card: data, split, steps, metrics and the exact command."""
    card = f"""# tiny backbone (cmfl-flower)

Trained by `python -m training.train_tiny {" ".join(argv)}` in {seconds / 60:.1f} min on
{platform.machine()} CPU ({torch.get_num_threads()} threads, torch {torch.__version__}).

- **Data:** the *public* split of scikit-learn's digits (40 %, stratified, seed 0; 8x8 images
  upsampled to 32x32). It is disjoint from the training pool that clients receive and from the
  global test set.
- **CLIP:** open_clip `CLIP` from `clip/open_clip_config.json` (ViT 32 px, patch 4, width 64,
  2 layers; text width 64, 2 layers; open_clip's BPE tokenizer), {budget.clip_steps} steps of
  cross-entropy between images and the ten class prompts ({len(TEMPLATES)} templates).
- **Diffusion:** `StableDiffusionPipeline`; text encoder = the CLIP's text tower converted to
  `CLIPTextModel` (frozen); `AutoencoderKL` 32x32x3 -> 8x8x4 ({budget.vae_steps} steps);
  `UNet2DConditionModel` ({budget.unet_steps} steps, epsilon prediction, 10 % empty prompts).
- **Weights:** float16 safetensors, {sizes / 1e6:.1f} MB in total.

## Quality gates (measured by the training script)

{gate_table(gates)}

![samples](samples.png)
"""
    (out / "MODEL_CARD.md").write_text(card)
    (out / "metrics.json").write_text(json.dumps(asdict(gates) | {"seconds": seconds}, indent=2))


REMEASURED = "Gates re-measured on the written weights by `python -m training.train_tiny"


def remeasure(out: Path, seed: int, per_class: int) -> Gates:
    """Measure the gates of the weights in ``out`` again; update metrics.json and the card."""
    from cmfl_flower.backbones import Preset, load_clip, load_pipeline

    preset = Preset("tiny", f"local-dir:{out / 'clip'}", "", str(out / "diffusion"), 64)
    clip = load_clip(preset, "cpu", seed).model
    pipeline = load_pipeline(preset.diffusion, torch.device("cpu"))
    held_out = load_source("digits", "test")
    gates = measure_gates(clip, pipeline, held_out, per_class, seed, out)
    metrics = json.loads((out / "metrics.json").read_text())
    (out / "metrics.json").write_text(json.dumps(metrics | asdict(gates), indent=2))
    card = (out / "MODEL_CARD.md").read_text()
    start, end = card.index("| gate | value |"), card.index("![samples]")
    note = f"{REMEASURED} --remeasure` (on the weights in this folder).\n\n"
    table = gate_table(gates) + "\n\n" + note
    (out / "MODEL_CARD.md").write_text(card[:start] + table + card[end:])
    return gates


def main(argv: list[str] | None = None) -> None:
    """Train, measure and write the tiny backbone (or only measure it again)."""
    parser = argparse.ArgumentParser(description="Train the tiny backbone on public digits.")
    parser.add_argument("--out", type=Path, default=ZOO_TINY, help="where weights are written")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a few steps (smoke test only)")
    parser.add_argument(
        "--remeasure", action="store_true", help="only measure the gates of --out's weights"
    )
    args = parser.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    if args.remeasure:
        budget = QUICK if args.quick else Budget()
        log(f"gates: {remeasure(args.out, args.seed, budget.eval_images_per_class)}")
        return
    budget = QUICK if args.quick else Budget()
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    public, held_out = load_source("digits", "public"), load_source("digits", "test")
    log(f"public split: {len(public)} images; held-out: {len(held_out)}; budget {budget}")
    clip = train_clip(budget, public, held_out, args.seed)
    vae = train_vae(budget, public, args.seed)
    tokenizer = open_clip.get_tokenizer(f"local-dir:{ZOO_TINY / 'clip'}")
    table = text_table(clip_text_to_hf(clip), tokenizer, public.class_names)
    unet = train_unet(budget, public, vae, table, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        pipeline = build_tiny_pipeline(clip, Path(tmp), vae=vae, unet=unet)
    args.out.mkdir(parents=True, exist_ok=True)
    gates = measure_gates(
        clip, pipeline, held_out, budget.eval_images_per_class, args.seed, args.out
    )
    log(f"gates: {gates}")
    sizes = save_all(clip, pipeline, args.out)
    seconds = time.perf_counter() - start
    write_card(args.out, budget, gates, sizes, seconds, argv)
    log(f"wrote {args.out} ({sizes / 1e6:.1f} MB of weights) in {seconds / 60:.1f} min")


if __name__ == "__main__":
    main()
