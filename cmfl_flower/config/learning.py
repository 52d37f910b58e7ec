"""The run config's sections of what a client learns with.

Data, backbone, tokens, relay, screening, generation and the vision encoder.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from cmfl_flower.config.base import (
    DEVICE_PATTERN,
    MODULE_NAME_PATTERN,
    DatasetName,
    PartitionerName,
    SchedulerName,
    Section,
    absolute_or_empty,
)


class DataConfig(Section):
    """Which dataset, and how it is split over clients."""

    dataset: DatasetName = Field(
        "digits", description="Source dataset; `digits` is bundled with scikit-learn (offline)."
    )
    path: str = Field(
        "", description="Local source: image folder (`folder`) or `save_to_disk` directory."
    )
    dir: str = Field(
        "",
        description="Absolute root of prepared partitions; empty = `~/.cache/cmfl-flower/data`.",
    )
    image_size: int = Field(
        64,
        ge=8,
        le=1024,
        description="Side in pixels at which `folder` images are stored when partitions are "
        "prepared (centre-cropped and resized once); the CLIP and the generator resize from "
        "there to their own input sizes. Each stored image costs side x side x 3 bytes in "
        "memory: 64 suits the tiny presets, the CLIP's 224 real photographs on `bk-sdm-*`. "
        "Other datasets keep their own size (digits 8, CIFAR 32, tiny-imagenet 64).",
    )
    partitioner: PartitionerName = Field(
        "dirichlet", description="How the training pool is split over clients."
    )
    alpha: float = Field(0.1, gt=0, description="Dirichlet concentration (smaller = more skew).")
    classes_per_client: int = Field(2, ge=1, description="Classes per client (`pathological`).")
    min_partition_size: int = Field(10, ge=0, description="Smallest allowed client partition.")
    test_fraction: float = Field(
        0.25, gt=0, lt=1, description="Share of each client's data kept as its test split."
    )
    seed: int = Field(0, ge=0, description="Seed of the partitioning (fixed across methods).")
    class_names: Literal["real", "opaque"] = Field(
        "real",
        description="`opaque`: clients know classes only by ids no backbone was trained on "
        "(`zqa`, `zqb`, ...), so names carry no meaning; the generation judge still uses the "
        "real names.",
    )
    validation_fraction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Share of each client's training images held out as a validation split "
        "(reported as `val-acc`; for tuning without the test sets); 0 = none.",
    )
    validation_scope: Literal["own", "pooled"] = Field(
        "own",
        description="What `val-acc` measures: `own` = the client's held-out split; `pooled` = "
        "every partition's held-out splits together (simulation only: a client reads every "
        "partition; it tunes for the global metric without the test sets).",
    )

    classes: str = Field(
        "",
        description="The federation's class list: names separated by commas, in order (index = "
        "class id), so that ids agree across sites. Needed when a SuperNode brings its own "
        "image folder (node config `data-path`), whose class sub-folders are named from it; "
        "sets the class count the server checks relayed ids against. Empty = the dataset's "
        "own classes.",
    )

    _check_dir = field_validator("dir")(absolute_or_empty)

    @field_validator("classes")
    @classmethod
    def _check_classes(cls, text: str) -> str:
        if text:
            class_list(text)
        return text

    @property
    def class_list(self) -> tuple[str, ...]:
        """``data.classes`` as a tuple of names (empty: the dataset's own)."""
        return class_list(self.classes) if self.classes else ()

    @model_validator(mode="after")
    def _pooled_needs_a_split(self) -> DataConfig:
        if self.validation_scope == "pooled" and self.validation_fraction == 0:
            raise ValueError(
                "data.validation-scope = 'pooled' needs data.validation-fraction > 0 "
                "(there is no validation split to pool)"
            )
        return self


def class_list(text: str) -> tuple[str, ...]:
    """``"cat, dog"`` -> ``("cat", "dog")``; refuses empty, repeated and path-like names."""
    names = tuple(name.strip() for name in text.split(","))
    if any(not name for name in names):
        raise ValueError(f"data.classes {text!r}: give class names separated by commas")
    if repeated := sorted({n for n in names if names.count(n) > 1}):
        raise ValueError(f"data.classes names {repeated} more than once")
    if bad := [n for n in names if "/" in n or n.startswith(".")]:
        raise ValueError(f"data.classes {bad}: a class name is a folder name (no '/', no '.')")
    return names


class BackboneConfig(Section):
    """The CLIP model and diffusion pipeline (a named preset, with optional overrides)."""

    preset: Literal["tiny", "tiny-fewshot", "bk-sdm-small", "bk-sdm-v2-small"] = Field(
        "tiny",
        description="Named backbone preset (see `cmfl_flower.backbones.PRESETS`); "
        "`tiny-fewshot` = the tiny pipeline with a weak CLIP vision tower (benchmarks).",
    )
    clip: str = Field(
        "", description="Override the preset's CLIP: open_clip model name, `hf-hub:` id or dir."
    )
    clip_pretrained: str = Field(
        "", description="Override the preset's open_clip pretrained tag or checkpoint file."
    )
    diffusion: str = Field(
        "", description="Override the preset's diffusion pipeline: hub id or local directory."
    )
    download: bool = Field(
        False,
        description="May a process download hub weights (CLIP, pipeline) while it loads them, "
        "inside a round? Off: they must already be in the Hugging Face cache of its host "
        "(`HF_HUB_CACHE`, else `HF_HOME`/hub), put there by `cmfl-fetch-weights`; a missing "
        "weight fails at the first message, naming that command. Presets in the package "
        "(`tiny`) and local directories never download.",
    )
    device: str = Field("auto", description="`auto`, `cpu`, `cuda`, `cuda:N` or `mps`.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Diffusion pipeline dtype; `auto` = bfloat16 on CUDA (float16 without bf16 "
        "support), float32 elsewhere. The CLIP and its LoRA stay float32.",
    )
    threads: int = Field(
        0,
        ge=0,
        description="Torch threads of each client process; 0 = the CPUs it was given (node "
        "config `num-cpus`, the simulation's `client-resources-num-cpus`, else its affinity "
        "mask), fewer when some of them are busy as a message starts.",
    )

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not DEVICE_PATTERN.match(value):
            raise ValueError(f"must be one of auto, cpu, cuda, cuda:N, mps; got {value!r}")
        return value


class TokensConfig(Section):
    """Learned class tokens: prompt, training, what is accepted from peers."""

    template: str = Field(
        "a photo of a {name}.", description="Prompt; `{name}` is replaced by the class tokens."
    )
    epochs: int = Field(5, ge=1, description="Local epochs of class-token training per round.")
    batch_size: int = Field(32, ge=1, description="Class-token training batch size.")
    lr: float = Field(5e-3, gt=0, description="AdamW learning rate of the class tokens.")
    objective: Literal["clip", "diffusion", "both"] = Field(
        "both",
        description="What trains the tokens: CLIP's image-text cross-entropy, the generator's "
        "denoising loss (textual inversion, min-SNR weighted), or their weighted sum.",
    )
    diffusion_weight: float = Field(
        1.0, ge=0, description="Weight of the denoising loss in `objective = both`."
    )
    snr_gamma: float = Field(
        5.0, gt=0, description="Min-SNR-gamma weighting of the denoising loss."
    )
    anchor: float = Field(
        0.0,
        ge=0,
        description="L2 pull of each class's tokens towards its name's pretrained embedding "
        "(relative: squared distance over squared norm).",
    )
    min_images: int = Field(
        5,
        ge=1,
        description="Classes with fewer local training images are neither learned nor relayed.",
    )
    clusters: int = Field(
        1,
        ge=1,
        le=8,
        description="Vector sets a client learns per class for peers to generate from. 1: the "
        "class's own vectors. K >= 2: its images of each class are split into K clusters "
        "(k-means on the pretrained CLIP's image features) and one extra set per cluster "
        "learns the denoising loss on that cluster's images (textual inversion, started from "
        "the class's vectors); they travel beside the class's vectors and receivers draw a "
        "(sender, class)'s images from its sets in turn, at the same image budget. Costs one "
        "more denoising pass over the client's images per token epoch and K sets more bytes "
        "per class. Needs `tokens.objective` `diffusion` or `both`, the labelled relay, "
        "`relay.combine = select` and privacy off. K = 2 gained nothing on P1 validation "
        "(docs/benchmark-method.md).",
    )
    relay: Literal["labelled", "unlabelled"] = Field(
        "labelled",
        description="`labelled`: class ids travel with vectors; `unlabelled`: receivers "
        "pseudo-label each vector by its nearest class.",
    )
    unseen: Literal["pretrained", "received-mean"] = Field(
        "received-mean",
        description="Text side of classes a client never saw: pretrained name embeddings, or "
        "the mean of the vectors received for that class.",
    )
    max_tokens: int = Field(16, ge=1, description="Most tokens accepted per received class.")
    max_bytes: int = Field(
        4_000_000, ge=1, description="Most bytes of token vectors accepted in one message."
    )
    max_norm_ratio: float = Field(
        4.0,
        gt=0,
        description="Largest L2 norm of one received token vector, as a multiple of the largest "
        "token norm of the backbone's pretrained vocabulary (plus the room a DP release needs); "
        "checked by the server on every reply and again by every receiver (a longer vector is "
        "refused or dropped). Costs one norm per token; the server loads the preset's CLIP once.",
    )

    @field_validator("template")
    @classmethod
    def _check_template(cls, value: str) -> str:
        if value.count("{name}") != 1:
            raise ValueError(f"must contain '{{name}}' exactly once, got {value!r}")
        return value


class RelayConfig(Section):
    """What the ``cmfl-relay`` server sends each client: a bounded choice of senders."""

    max_senders_per_class: int = Field(
        2,
        ge=0,
        description="Most senders whose vectors of one class a client receives per round (0 = "
        "every sender); the most recently updated first, rotating over rounds among equals. "
        "Unlabelled relay: at most this many times one sender's vector count per message.",
    )
    combine: Literal["select", "mean"] = Field(
        "select",
        description="`select`: the chosen senders' vectors as they are; `mean`: one vector per "
        "class, the mean of the chosen senders' (labelled relay only).",
    )


class ScreeningConfig(Section):
    """``cmfl-relay`` defences: receivers judge relayed knowledge, the server quarantines."""

    enabled: bool = Field(
        True,
        description="Each receiver judges every received (sender, class) set before it trains "
        "anything, its generated images against `min-score` and its vectors against "
        "`min-token-score`, and leaves out a set either rejects (the judges: "
        "`docs/robustness.md`). Costs one pass of the frozen CLIP over the generated "
        "and the client's own images and of its text tower over the received vectors: the share"
        " of a client's round is in `benchmarks/results/robustness.json`.",
    )
    min_score: float = Field(
        0.001,
        ge=0,
        le=1,
        description="Lowest accepted score of a set's images: the judge's mean probability of "
        "the claimed class over the most probable class's, each divided by the judge's mean over"
        " the round's images for the name judge (1 = the claimed class is the judge's first "
        "choice). Chosen on the scores of honest, label-flipped and noise sets "
        "(`benchmarks.screening_scores`), not on test data.",
    )
    min_token_score: float = Field(
        0.3,
        ge=0,
        le=1,
        description="Lowest accepted score of a set's vectors: the same score as `min-score`, "
        "for the text feature of the class prompt with the received vectors in the name's "
        "place. Chosen, as `min-score`, on the scores of honest, label-flipped and noise sets "
        "(`benchmarks.screening_scores`).",
    )
    consensus_senders: int = Field(
        3,
        ge=3,
        description="Fewest senders of a class for the consensus judge (opaque names, a class "
        "the receiver lacks); with fewer the set is reported as unjudged and kept.",
    )
    quarantine_rounds: int = Field(
        3,
        ge=0,
        description="Rounds the server stops relaying a sender's vectors once most receivers "
        "that judged them (at least two) screened them out, doubled at each repeat of the same "
        "sender (0 = no quarantine); costs nothing.",
    )


class GenerationConfig(Section):
    """Synthetic images from received class tokens (BK-SDM / the tiny pipeline)."""

    images_per_class: int = Field(
        4,
        ge=0,
        description="Images generated per request: per received (sender, class) set for the "
        "relay, per lacking class for `names-generation`.",
    )
    images_per_round: int = Field(
        0,
        ge=0,
        description="Images a client generates per round in total, spread evenly over its "
        "requests (replaces `images-per-class` when > 0): gives methods that make different "
        "numbers of requests the same synthetic budget.",
    )
    held_classes: bool = Field(
        True,
        description="The relay also generates from peers' vectors of the classes the client "
        "learns its own vectors for (false: only from those of classes it lacks).",
    )

    uncovered: Literal["names", "none"] = Field(
        "names",
        description="The relay's classes a client lacks that no accepted relayed set covers in "
        "a round where it received peers' vectors (their only senders screened out, "
        "quarantined or silent): `names` generates them from their pretrained names, as "
        "`names-generation` does, with as many images as a relayed set gets (no "
        "communication; costs that generation only in such rounds); `none` leaves them out. "
        "With `data.class_names = opaque` a name means nothing and nothing is generated. "
        "Never acts in the honest P1 and default runs; on P1 with 2 and 3 hostile clients of "
        "10 it keeps 0.5 and 0.9 point more of the honest clients' accuracy under label flip "
        "(docs/robustness.md).",
    )

    replay_rounds: int = Field(
        2,
        ge=0,
        description="Earlier rounds whose generated images a client trains on again beside the "
        "round's new ones: 0 none; R the images its screening accepted in its last R rounds, "
        "kept in its saved state (images of a sender a later round screens out go). More "
        "synthetic data per round at no more generation; costs encoder time for the extra "
        "images and state size (the images themselves, uint8). 2 leads 0 by 2.0 points on P1 "
        "validation (docs/benchmark-method.md).",
    )

    @property
    def enabled(self) -> bool:
        """Whether a request gets any image."""
        return self.images_per_class > 0 or self.images_per_round > 0

    batch_size: int = Field(8, ge=1, description="Images per denoising batch.")
    steps: int = Field(20, ge=1, description="Denoising steps.")
    guidance_scale: float = Field(7.5, ge=1, description="Classifier-free guidance scale.")
    scheduler: SchedulerName = Field("dpm-solver++", description="Noise scheduler.")
    sample_weight: float = Field(
        0.5, ge=0, description="Loss weight of a generated image (a local image weighs 1)."
    )
    weighting: Literal["fixed", "confidence", "relative"] = Field(
        "fixed",
        description="`fixed`: every generated image weighs `sample-weight`; `confidence`: "
        "`sample-weight` times the probability the client's own text side (its vectors and "
        "the received ones) gives the image's class under the pretrained CLIP, so images "
        "that look like another class count less (1.7 points below `fixed` on P1's "
        "validation split: docs/benchmark-method.md); `relative`: the same, divided by the "
        "round's mean probability, so that the generated images together weigh as much as "
        "under `fixed` (no stored measurement yet).",
    )
    judge: str = Field(
        "",
        description="A judge file (`python -m cmfl_flower.judge` trains one on public images; "
        "no client trains it and no default was chosen on it): generating clients also report "
        "`generated-recognised-judge`, the share of their generated images it labels as their "
        "class. Empty: only the pretrained CLIP judges (`generated-recognised`).",
    )


class EncoderConfig(Section):
    """LoRA on the CLIP vision tower and its local training."""

    lora_rank: int = Field(8, ge=1, description="LoRA rank.")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (alpha / rank).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: str = Field(
        "c_fc,c_proj",
        description="Comma-separated module names (exact suffix match) that get LoRA.",
    )
    epochs: int = Field(1, ge=1, description="Local epochs per round.")
    batch_size: int = Field(32, ge=1, description="Training batch size.")
    lr: float = Field(3e-3, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    distill: float = Field(
        1.0,
        ge=0,
        description="Weight of a distillation term (KL divergence) that keeps the adapted "
        "encoder's class probabilities on its training images near the pretrained CLIP's; "
        "0 = off.",
    )
    distill_on: Literal["all", "local"] = Field(
        "all",
        description="The images the distillation term covers: `all`, generated images too; "
        "`local`, only the client's own.",
    )
    eval_batch_size: int = Field(256, ge=1, description="Batch size for accuracy evaluation.")

    @field_validator("target_modules")
    @classmethod
    def _check_modules(cls, value: str) -> str:
        names = [name.strip() for name in value.split(",")]
        bad = [name for name in names if not MODULE_NAME_PATTERN.match(name)]
        if bad:
            raise ValueError(f"module names must be identifiers, got {bad!r}")
        return ",".join(names)

    @property
    def target_module_list(self) -> list[str]:
        """The target modules as a list."""
        return self.target_modules.split(",")
