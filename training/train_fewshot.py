"""Train the ``tiny-fewshot`` CLIP: the tiny CLIP's text tower, a deliberately weak vision tower.

The shipped ``tiny`` CLIP classifies held-out digits zero-shot almost perfectly, which leaves a
federated strategy no room to gain. ``python -m training.train_fewshot`` builds a weaker
CLIP for benchmarks:

1. load the shipped tiny CLIP and keep its text tower (token embedding, positional embedding,
   transformer, ``ln_final``, ``text_projection``) and ``logit_scale`` unchanged, so the token
   space is the one of the shipped tiny diffusion pipeline (``zoo:tiny/diffusion``);
2. re-initialise the vision tower (seeded) and train only it, with cross-entropy against the
   frozen text features of the class prompts (``train_tiny``'s templates and augmentation), on
   ``--per-class`` images per class drawn (seeded) from the *public* digits split;
3. measure, on the rest of the public split (public-validation), the zero-shot accuracy and the
   accuracy of a vision LoRA trained centrally on the clients' pooled ``train`` split. The
   recipe (:class:`Recipe`) was chosen on these figures only (``--sweep`` reruns the choice);
4. report the same two figures on the global ``test`` split (reporting only), and write the
   weights (float16 safetensors), ``metrics.json`` and a model card.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from cmfl_flower.backbones import CLIP_CONFIG_FILE, ClipBundle
from cmfl_flower.config import EncoderConfig
from cmfl_flower.data import LabeledImages, load_source
from cmfl_flower.encoder import (
    ClipEncoder,
    LoraSpec,
    TrainingSet,
    accuracy,
    train_encoder,
)
from cmfl_flower.images import resize_uint8
from cmfl_flower.zoo import HERE as ZOO_HOME
from cmfl_flower.zoo import locate
from training.builders import save_clip
from training.train_tiny import (
    EVAL_TEMPLATE,
    IMAGE_SIZE,
    MEAN,
    STD,
    TEMPLATES,
    augment,
    log,
    lr_at,
    prompt_ids,
    set_lr,
    to_unit,
    zero_shot_accuracy,
)

ZOO_FEWSHOT = ZOO_HOME / "tiny-fewshot"  # the runtime reads the weights from the zoo
# state-dict keys of the text tower: these stay byte-identical to the tiny CLIP's
TEXT_PREFIXES = (
    "token_embedding.",
    "positional_embedding",
    "transformer.",
    "ln_final.",
    "text_projection",
)
# the centrally trained vision LoRA that measures how much a federation could still gain
CENTRAL_LORA = EncoderConfig(
    lora_rank=8, lora_alpha=16.0, target_modules="c_fc,c_proj", lr=3e-3, batch_size=32, epochs=15
)
GOAL_ZERO_SHOT_AT_MOST = 0.75
GOAL_CENTRAL_AT_LEAST = 0.90
SWEEP_PER_CLASS = (2, 3, 5)
SWEEP_STEPS = (100, 300, 500, 1000)
SWEEP_SEEDS = (0, 1, 2)
SWEEP_FILE = "sweep.json"


@dataclass(frozen=True)
class Recipe:
    """How the weak vision tower is trained (the defaults are the recipe ``--sweep`` chose)."""

    per_class: int = 2  # public images per class the vision tower sees
    steps: int = 1000
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 30
    seed: int = 0


@dataclass(frozen=True)
class Figures:
    """Zero-shot accuracy and the accuracy of the centrally trained vision LoRA."""

    zero_shot: float
    central_lora: float

    def meets_goal(self) -> bool:
        """Weak zero-shot, yet a federation can reach a useful accuracy."""
        return (
            self.zero_shot <= GOAL_ZERO_SHOT_AT_MOST and self.central_lora >= GOAL_CENTRAL_AT_LEAST
        )


def tiny_clip() -> tuple[Any, Any]:
    """The shipped tiny CLIP (float32, eval mode) and its tokenizer."""
    source = f"local-dir:{locate('tiny/clip')}"
    model = open_clip.create_model(source)
    return model.eval(), open_clip.get_tokenizer(source)


def is_text_key(key: str) -> bool:
    """Whether a CLIP state-dict key belongs to the text tower."""
    return key.startswith(TEXT_PREFIXES)


def split_public(
    public: LabeledImages, per_class: int, seed: int
) -> tuple[LabeledImages, LabeledImages]:
    """(shots, validation): ``per_class`` seeded images of every class, and the rest."""
    rng = np.random.default_rng(seed)
    chosen = [
        rng.choice(np.flatnonzero(public.labels == c), per_class, replace=False)
        for c in range(len(public.class_names))
    ]
    shots = np.sort(np.concatenate(chosen)).astype(np.int64)
    rest = np.setdiff1d(np.arange(len(public), dtype=np.int64), shots)
    return public.subset(shots), public.subset(rest)


def train_fewshot_clip(recipe: Recipe, shots: LabeledImages) -> tuple[Any, list[float]]:
    """The tiny CLIP with a re-initialised vision tower trained on ``shots`` only.

    Returns the model (eval mode, frozen) and the loss every 50 steps.
    """
    model, tokenizer = tiny_clip()
    torch.manual_seed(recipe.seed)
    fresh = open_clip.create_model(f"local-dir:{locate('tiny/clip')}", load_weights=False)
    model.visual.load_state_dict(fresh.visual.state_dict())
    model.requires_grad_(False)
    model.visual.requires_grad_(True)
    with torch.no_grad():  # the text tower is frozen: encode every template once
        texts = [
            model.encode_text(prompt_ids(tokenizer, t, shots.class_names), normalize=True)
            for t in TEMPLATES
        ]  # T x (C, E)
    scale = model.logit_scale.exp().detach()
    images, labels = to_unit(resize_uint8(shots.images, IMAGE_SIZE)), torch.from_numpy(shots.labels)
    generator = torch.Generator().manual_seed(recipe.seed)
    optimizer = torch.optim.AdamW(model.visual.parameters(), lr=recipe.lr, weight_decay=0.05)
    losses: list[float] = []
    model.visual.train()
    for step in range(recipe.steps):
        set_lr(optimizer, lr_at(step, recipe.steps, recipe.lr, recipe.warmup))
        idx = torch.randint(len(images), (recipe.batch_size,), generator=generator)
        pixels = (augment(images[idx], generator) - MEAN) / STD
        template = int(torch.randint(len(texts), (1,), generator=generator))
        features = model.encode_image(pixels, normalize=True)  # (B, E)
        loss = F.cross_entropy(scale * features @ texts[template].T, labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == recipe.steps - 1:
            losses.append(float(loss.detach()))
            log(f"vision step {step:4d}  loss {loss.item():.4f}")
    return model.eval().requires_grad_(False), losses


def central_lora_accuracy(
    model: Any, train: LabeledImages, evaluation: LabeledImages, cfg: EncoderConfig, seed: int
) -> float:
    """Accuracy on ``evaluation`` of a vision LoRA trained on all of ``train`` (one client)."""
    tokenizer = open_clip.get_tokenizer(f"local-dir:{locate('tiny/clip')}")
    bundle = ClipBundle(
        model=copy.deepcopy(model).eval().requires_grad_(False),
        tokenizer=tokenizer,
        image_size=IMAGE_SIZE,
        mean=tuple(model.visual.image_mean),
        std=tuple(model.visual.image_std),
        device=torch.device("cpu"),
    )
    encoder = ClipEncoder(bundle, LoraSpec.from_config(cfg), seed)
    with torch.no_grad():
        text = bundle.model.encode_text(
            prompt_ids(tokenizer, EVAL_TEMPLATE, train.class_names), normalize=True
        )  # (C, E)
    data = TrainingSet.mix(IMAGE_SIZE, (train.images, train.labels))
    train_encoder(encoder, data, text, cfg, seed)
    return accuracy(encoder, evaluation.images, evaluation.labels, text, cfg.eval_batch_size)


def measure(
    model: Any, train: LabeledImages, evaluation: LabeledImages, cfg: EncoderConfig, seed: int
) -> Figures:
    """Zero-shot and central-LoRA accuracy of ``model`` on ``evaluation``."""
    tokenizer = open_clip.get_tokenizer(f"local-dir:{locate('tiny/clip')}")
    return Figures(
        zero_shot=zero_shot_accuracy(model, tokenizer, evaluation),
        central_lora=central_lora_accuracy(model, train, evaluation, cfg, seed),
    )


def sweep(recipes: list[Recipe], cfg: EncoderConfig) -> list[tuple[Recipe, Figures]]:
    """Public-validation figures of every recipe (reads the public and train splits only)."""
    public, train = load_source("digits", "public"), load_source("digits", "train")
    rows = []
    for recipe in recipes:
        shots, validation = split_public(public, recipe.per_class, recipe.seed)
        model, _ = train_fewshot_clip(recipe, shots)
        figures = measure(model, train, validation, cfg, recipe.seed)
        log(f"sweep {recipe}: {figures}")
        rows.append((recipe, figures))
    return rows


def margin(figures: Figures) -> float:
    """How far ``figures`` clear the goal (negative: missed), the smaller of the two margins."""
    return min(
        GOAL_ZERO_SHOT_AT_MOST - figures.zero_shot, figures.central_lora - GOAL_CENTRAL_AT_LEAST
    )


def choose(rows: list[tuple[Recipe, Figures]]) -> tuple[Recipe, float]:
    """The (per-class, steps) whose worst margin over the seeds is largest, and that margin."""
    worst: dict[Recipe, float] = {}
    for recipe, figures in rows:
        key = replace(recipe, seed=Recipe.seed)
        worst[key] = min(worst.get(key, math.inf), margin(figures))
    best = max(worst, key=lambda recipe: worst[recipe])
    return best, worst[best]


def save(model: Any, out: Path) -> int:
    """Write the CLIP (float16 safetensors, the tiny CLIP's config) to ``out/clip``; bytes."""
    config = json.loads((locate("tiny/clip") / CLIP_CONFIG_FILE).read_text())["model_cfg"]
    save_clip(copy.deepcopy(model).half(), config, out / "clip")
    return sum(p.stat().st_size for p in (out / "clip").glob("*.safetensors"))


def write_sweep(
    out: Path, rows: list[tuple[Recipe, Figures]], cfg: EncoderConfig, seconds: float
) -> Path:
    """Record the sweep (public-validation figures only) in ``out/sweep.json``."""
    best, worst = choose(rows)
    record = {
        "command": " ".join(["python -m training.train_fewshot", *sys.argv[1:]]),
        "goal": {
            "zero_shot_at_most": GOAL_ZERO_SHOT_AT_MOST,
            "central_lora_at_least": GOAL_CENTRAL_AT_LEAST,
        },
        "central_lora_epochs": cfg.epochs,
        "rows": [
            asdict(recipe) | asdict(figures) | {"margin": margin(figures)}
            for recipe, figures in rows
        ],
        "chosen": {"per_class": best.per_class, "steps": best.steps, "worst_margin": worst},
        "seconds": seconds,
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / SWEEP_FILE
    path.write_text(json.dumps(record, indent=2))
    return path


def sweep_section(path: Path) -> str:
    """The model card's account of the sweep in ``path`` (empty if there is none)."""
    if not path.is_file():
        return ""
    record = json.loads(path.read_text())
    groups: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for row in record["rows"]:
        groups.setdefault((row["per_class"], row["steps"]), []).append(row)
    chosen = (record["chosen"]["per_class"], record["chosen"]["steps"])
    lines = [
        "| per class | steps | zero-shot per seed | central LoRA per seed | worst margin |",
        "| --- | --- | --- | --- | --- |",
    ]
    for (per_class, steps), rows in groups.items():
        zero_shot = ", ".join(f"{row['zero_shot']:.3f}" for row in rows)
        central = ", ".join(f"{row['central_lora']:.3f}" for row in rows)
        worst = min(row["margin"] for row in rows)
        mark = " **(chosen)**" if (per_class, steps) == chosen else ""
        lines.append(f"| {per_class} | {steps} | {zero_shot} | {central} | {worst:+.3f}{mark} |")
    seeds = sorted({row["seed"] for row in record["rows"]})
    return f"""
## How the recipe was chosen (public split only)

`{record["command"]}` ({record["seconds"] / 60:.0f} min) trained every recipe below with seeds
{", ".join(map(str, seeds))} (the seed draws the public shots and initialises the vision tower) and
measured both figures on that seed's public-validation images (central LoRA:
{record["central_lora_epochs"]} epochs). A recipe's margin is the smaller of
`{GOAL_ZERO_SHOT_AT_MOST} - zero-shot` and `central LoRA - {GOAL_CENTRAL_AT_LEAST}`; the
recipe whose worst seed has the largest margin was chosen (a positive margin: every seed met
the goal), and seed 0 of it is shipped. The global test split played no part.

{chr(10).join(lines)}
"""


def write_card(
    out: Path,
    recipe: Recipe,
    cfg: EncoderConfig,
    figures: dict[str, Figures],
    counts: dict[str, int],
    sizes: int,
    seconds: float,
    argv: list[str],
) -> None:
    """The model card and ``metrics.json``."""
    lora, validation, test = cfg, figures["public_validation"], figures["test"]
    command = " ".join(["python -m training.train_fewshot", *argv])
    card = f"""# tiny-fewshot CLIP (cmfl-flower)

A deliberately weak CLIP for federated benchmarks. The shipped `tiny` CLIP classifies held-out
digits zero-shot at 0.98, which leaves no federated strategy room to gain. This one keeps the
tiny CLIP's **text tower byte-identical** (token embedding, positional embedding, transformer,
`ln_final`, `text_projection`; also `logit_scale`), so its token space is the one of the shipped
tiny diffusion pipeline (`zoo:tiny/diffusion`, whose text encoder is that text tower), and pairs
it with a **vision tower trained on only {recipe.per_class} public images per class**.

Trained by `{command}` in {seconds / 60:.1f} min on {platform.machine()} CPU
({torch.get_num_threads()} torch thread(s), torch {torch.__version__}); the time includes the
two central LoRA trainings that measure the figures below.

## Recipe

- **Vision tower:** re-initialised (seeded, open_clip's initialisation; the tiny CLIP's vision
  tower was trained on the whole public split, so reusing it could not be weak), then
  {recipe.steps} AdamW steps (peak lr {recipe.lr:g}, {recipe.warmup} warm-up steps, cosine to
  10 %, weight decay 0.05, batch {recipe.batch_size} drawn with replacement, `train_tiny`'s
  augmentation) of cross-entropy between images and the frozen text features of the ten class
  prompts ({len(TEMPLATES)} templates of `train_tiny`). Only `visual.*` is trained.
- **Data:** {counts["shots"]} images of the *public* digits split ({recipe.per_class} per class,
  drawn with `numpy.random.default_rng({recipe.seed})`). The other {counts["validation"]} public
  images are the **public-validation** set on which the recipe was chosen. The clients' `train`
  split ({counts["train"]} images) trains the central LoRA below; the global `test` split
  ({counts["test"]} images) was used only to report the last column, never to choose.
- **Weights:** float16 safetensors, {sizes / 1e6:.1f} MB, config identical to `tiny/clip`.
  The figures below are measured on these float16 weights.

## Measured

Zero-shot: `{EVAL_TEMPLATE}` prompts. Central LoRA: vision LoRA (rank {lora.lora_rank}, alpha
{lora.lora_alpha:g}, `{lora.target_modules}`, AdamW lr {lora.lr:g}, batch {lora.batch_size},
{lora.epochs} epochs) trained on the whole `train` split (all clients' data pooled), the text
features of `{EVAL_TEMPLATE}` as classifier. Goal: zero-shot <= {GOAL_ZERO_SHOT_AT_MOST} while
the central LoRA reaches >= {GOAL_CENTRAL_AT_LEAST}.

| figure | public-validation (chosen on) | global test (reported only) |
| --- | --- | --- |
| zero-shot accuracy | {validation.zero_shot:.3f} | {test.zero_shot:.3f} |
| central LoRA accuracy | {validation.central_lora:.3f} | {test.central_lora:.3f} |
{sweep_section(out / SWEEP_FILE)}"""
    (out / "MODEL_CARD.md").write_text(card)
    metrics = {
        "recipe": asdict(recipe),
        "central_lora": {
            "rank": lora.lora_rank,
            "alpha": lora.lora_alpha,
            "target_modules": lora.target_modules,
            "lr": lora.lr,
            "batch_size": lora.batch_size,
            "epochs": lora.epochs,
        },
        "public_validation": asdict(validation),
        "test": asdict(test),
        "counts": counts,
        "seconds": seconds,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))


def run(recipe: Recipe, out: Path, cfg: EncoderConfig, argv: list[str]) -> dict[str, Figures]:
    """Train, measure (public-validation, then global test) and write everything to ``out``."""
    start = time.perf_counter()
    public, train = load_source("digits", "public"), load_source("digits", "train")
    shots, validation = split_public(public, recipe.per_class, recipe.seed)
    log(f"{recipe}; {len(shots)} shots, {len(validation)} public-validation, {len(train)} train")
    model, _ = train_fewshot_clip(recipe, shots)
    model = model.half().float()  # measure exactly the float16 weights that are written
    on_validation = measure(model, train, validation, cfg, recipe.seed)
    log(f"public-validation: {on_validation}")
    test = load_source("digits", "test")  # reporting only: the recipe is fixed by now
    on_test = measure(model, train, test, cfg, recipe.seed)
    log(f"global test: {on_test}")
    out.mkdir(parents=True, exist_ok=True)
    sizes = save(model, out)
    seconds = time.perf_counter() - start
    counts = {"shots": len(shots), "validation": len(validation), "train": len(train)}
    counts["test"] = len(test)
    figures = {"public_validation": on_validation, "test": on_test}
    write_card(out, recipe, cfg, figures, counts, sizes, seconds, argv)
    log(f"wrote {out} ({sizes / 1e6:.1f} MB of weights) in {seconds / 60:.1f} min")
    return figures


def main(argv: list[str] | None = None) -> None:
    """Command line: train and write the tiny-fewshot CLIP, or ``--sweep`` recipes."""
    parser = argparse.ArgumentParser(description="Train the tiny-fewshot CLIP (weak vision).")
    parser.add_argument("--out", type=Path, default=ZOO_FEWSHOT, help="where files are written")
    parser.add_argument("--per-class", type=int, default=Recipe.per_class)
    parser.add_argument("--steps", type=int, default=Recipe.steps)
    parser.add_argument("--seed", type=int, default=Recipe.seed)
    parser.add_argument("--lora-epochs", type=int, default=CENTRAL_LORA.epochs)
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="choose the recipe: public-validation figures of per-class x steps x seeds "
        f"{SWEEP_PER_CLASS} x {SWEEP_STEPS} x {SWEEP_SEEDS} (public and train splits only); "
        f"writes only OUT/{SWEEP_FILE}, which the model card then reports",
    )
    args = parser.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = CENTRAL_LORA.model_copy(update={"epochs": args.lora_epochs})
    recipe = Recipe(per_class=args.per_class, steps=args.steps, seed=args.seed)
    if args.sweep:
        grid = [
            replace(recipe, per_class=k, steps=s, seed=seed)
            for k in SWEEP_PER_CLASS
            for s in SWEEP_STEPS
            for seed in SWEEP_SEEDS
        ]
        start = time.perf_counter()
        rows = sweep(grid, cfg)
        write_sweep(args.out, rows, cfg, time.perf_counter() - start)
        for row, figures in rows:
            log(
                f"per-class {row.per_class} steps {row.steps:4d} seed {row.seed}: zero-shot "
                f"{figures.zero_shot:.3f} central LoRA {figures.central_lora:.3f} "
                f"margin {margin(figures):+.3f}"
            )
        best, worst = choose(rows)
        log(f"chosen: per-class {best.per_class} steps {best.steps} (worst margin {worst:+.3f})")
        return
    run(recipe, args.out, cfg, argv)


if __name__ == "__main__":
    main()
