"""Run configuration: one pydantic model, parsed once from Flower's flat run config.

Flower hands an app a flat mapping with dotted, hyphenated keys (``data.min-partition-size``).
:func:`AppConfig.from_run_config` turns it into a frozen, validated :class:`AppConfig`;
:meth:`AppConfig.to_run_config` goes the other way. Unknown keys, wrong types and out-of-range
values raise ``ValueError`` naming the key, the value and what is allowed.

``python -m cmfl_flower.config --toml`` prints the ``[tool.flwr.app.config]`` block of
``pyproject.toml``; ``--markdown`` prints the config reference of ``docs/configuration.md``.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

Scalar = bool | int | float | str

_DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
# vocabularies: declared once here; other modules derive their tuples with typing.get_args
DatasetName = Literal["digits", "cifar10", "cifar100", "tiny-imagenet", "folder"]
PartitionerName = Literal["dirichlet", "pathological", "iid"]
SchedulerName = Literal["dpm-solver++", "pndm", "ddim"]

_NAME_PATTERN = re.compile(r"^([a-z0-9][a-z0-9-]*|[A-Za-z_][\w.]*:[A-Za-z_]\w*)$")
_MODULE_NAME_PATTERN = re.compile(r"^[A-Za-z_][\w.]*$")


class _Section(BaseModel):
    """Base of every config section: strict types, no unknown fields, immutable."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _absolute_or_empty(value: str) -> str:
    if value and not Path(value).expanduser().is_absolute():
        raise ValueError(f"must be an absolute path or empty, got {value!r}")
    return value


class DataConfig(_Section):
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

    _check_dir = field_validator("dir")(_absolute_or_empty)

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


class BackboneConfig(_Section):
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
        if not _DEVICE_PATTERN.match(value):
            raise ValueError(f"must be one of auto, cpu, cuda, cuda:N, mps; got {value!r}")
        return value


class TokensConfig(_Section):
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


class RelayConfig(_Section):
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


class ScreeningConfig(_Section):
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


class GenerationConfig(_Section):
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


class EncoderConfig(_Section):
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
        bad = [name for name in names if not _MODULE_NAME_PATTERN.match(name)]
        if bad:
            raise ValueError(f"module names must be identifiers, got {bad!r}")
        return ",".join(names)

    @property
    def target_module_list(self) -> list[str]:
        """The target modules as a list."""
        return self.target_modules.split(",")


class FederationConfig(_Section):
    """Rounds, client sampling and timeouts."""

    rounds: int = Field(3, ge=1, description="Number of server rounds.")
    fraction: float = Field(1.0, gt=0, le=1, description="Share of nodes sampled every round.")
    min_nodes: int = Field(
        2, ge=1, description="Start quorum: nodes to wait for (`wait-for-nodes` s) before round 1."
    )
    min_live_nodes: int = Field(
        1,
        ge=1,
        description="Once started, the fewest connected nodes a round samples (it waits for "
        "them); lost nodes do not stop the run until fewer than `min-replies` reply.",
    )
    round_timeout: float = Field(600.0, gt=0, description="Seconds to wait for replies.")
    min_replies: int = Field(
        0,
        ge=0,
        description="Fewest usable replies per round; fewer stop the run (failed). 0 = half "
        "the sampled nodes, rounded up.",
    )
    num_partitions: int = Field(
        0,
        ge=0,
        description="Partition ids a reply may claim are 0..num-partitions-1 (0 = the number of"
        " nodes connected when the run starts).",
    )
    fraction_evaluate: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Share of nodes sent Flower's `evaluate` message each round (weight methods;"
        " 0 = none: clients report accuracy after training and the server scores the global"
        " weights).",
    )
    wait_for_nodes: float = Field(
        120.0, gt=0, description="Seconds to wait for `min-nodes` nodes to connect."
    )


class PrivacyConfig(_Section):
    """Differential privacy: relayed class vectors (`cmfl_flower.privacy`), averaged adapters."""

    enabled: bool = Field(
        False,
        description="`cmfl-relay`: clip and noise each class's vectors before a client sends "
        "them; weight methods: central DP of the combined weights (Flower's wrapper around "
        "the strategy).",
    )
    clip_norm: float = Field(
        0.2,
        gt=0,
        description="L2 (Frobenius) bound C of how far one class's vectors may move from "
        "their name's pretrained embedding (the release is centred there).",
    )
    noise_multiplier: float = Field(
        1.0, gt=0, description="Gaussian noise std per coordinate, in units of `clip-norm`."
    )
    denoise: bool = Field(
        True,
        description="`cmfl-relay` receivers: replace each received labelled class vector by "
        "its posterior mean given the noise (shrunk towards the name's embedding).",
    )
    delta: float = Field(1e-5, gt=0, lt=1, description="Delta of the reported (epsilon, delta).")
    update_clip_norm: float = Field(
        1.0,
        gt=0,
        description="Weight methods: L2 bound C of a client's update (Flower's server-side "
        "fixed clipping; noise std = noise-multiplier * C / n).",
    )


class OutputConfig(_Section):
    """Where results go."""

    dir: str = Field(
        "", description="Absolute root of run directories; empty = `~/.cache/cmfl-flower/runs`."
    )
    run_name: str = Field("", description="Run directory name; empty = timestamp + method.")
    resume: bool = Field(
        False,
        description="Continue run `run-name` from its last checkpoint (same config; more "
        "`federation.rounds` allowed).",
    )
    progress: bool = Field(True, description="Progress bars (stderr) for the long client phases.")
    tensorboard: bool = Field(
        False,
        description="Also log round scalars and images for TensorBoard (extra `tensorboard`).",
    )

    _check_dir = field_validator("dir")(_absolute_or_empty)

    @field_validator("run_name")
    @classmethod
    def _check_run_name(cls, value: str) -> str:
        if value and not re.match(r"^[\w.-]+$", value):
            raise ValueError(f"must use letters, digits, '.', '_' or '-' only, got {value!r}")
        return value

    @model_validator(mode="after")
    def _check_resume(self) -> OutputConfig:
        if self.resume and not self.run_name:
            raise ValueError("output.resume = true needs output.run-name: the run to continue")
        return self


class DiffusionConfig(_Section):
    """Federated diffusion training: the UNet, local steps, noise schedule, LoRA, evaluation."""

    model: Literal["ddpm", "conditional"] = Field(
        "ddpm",
        description="`diffusion-unet` trains a pixel-space DDPM UNet (`ddpm`) or the preset's "
        "text-conditional latent UNet (`conditional`).",
    )
    unet: Literal["auto", "tiny", "ddpm-cifar10"] = Field(
        "auto",
        description="Pixel DDPM architecture (`cmfl_flower.fed_diffusion.DDPM_UNETS`); `auto` = "
        "`tiny` on the tiny preset, else `ddpm-cifar10`.",
    )
    local_steps: int = Field(2, ge=1, description="Local optimiser steps per round (E).")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate of local training.")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant",
        description="Local learning rate over the rounds: `constant`, or `cosine` from "
        "`diffusion.lr` in round 1 to `diffusion.lr` x `diffusion.lr-final` in the last.",
    )
    lr_final: float = Field(
        0.1, gt=0, le=1, description="`cosine`: the last round's rate over `diffusion.lr`."
    )
    keep_optimizer: bool = Field(
        True,
        description="Keep each client's AdamW state from round to round on its node's disk; "
        "`false` restarts the optimiser every round.",
    )
    batch_size: int = Field(16, ge=1, description="Local training batch size.")
    beta_start: float = Field(1e-4, gt=0, lt=1, description="First beta of the DDPM schedule.")
    beta_end: float = Field(0.02, gt=0, lt=1, description="Last beta of the DDPM schedule.")
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = Field(
        "linear", description="DDPM beta schedule (the preset's UNets keep their own)."
    )
    timesteps: int = Field(1000, ge=2, description="DDPM training timesteps (T).")
    lora_rank: int = Field(8, ge=1, description="LoRA rank of `diffusion-lora`.")
    lora_alpha: float = Field(8.0, gt=0, description="LoRA scaling numerator (alpha / rank).")
    caption_template: str = Field(
        "a photo of a {name}.", description="Caption of a training image; `{name}` = its class."
    )
    prompts: str = Field(
        "", description="`|`-separated prompts to render; empty = the caption of every class."
    )
    images_per_client: int = Field(
        0, ge=0, description="Use at most this many training images per client; 0 = all."
    )
    eval_samples: int = Field(100, ge=2, description="Images rendered per round for the FD.")
    eval_every: int = Field(
        1,
        ge=1,
        description="Render and measure the global model every this many rounds and after "
        "the last (it is saved every round).",
    )
    sample_steps: int = Field(50, ge=1, description="DDIM steps when rendering samples.")
    fid: Literal["clip", "inception"] = Field(
        "clip",
        description="Fréchet distance in the preset CLIP's image features, or Inception FID "
        "(needs `diffusion.inception-weights`).",
    )
    inception_weights: str = Field(
        "", description="Absolute path of the FID Inception weights file (torch-fidelity's)."
    )

    _check_weights = field_validator("inception_weights")(_absolute_or_empty)

    @field_validator("caption_template")
    @classmethod
    def _check_caption(cls, value: str) -> str:
        if value.count("{name}") != 1:
            raise ValueError(f"must contain '{{name}}' exactly once, got {value!r}")
        return value

    @property
    def prompt_list(self) -> list[str]:
        """The configured prompts (empty when the class captions are to be used)."""
        return [p.strip() for p in self.prompts.split("|") if p.strip()]


class AppConfig(_Section):
    """The whole run configuration; the single source of truth for server and clients."""

    method: str = Field(
        "cmfl-relay",
        description="What clients train and send: a built-in method (`docs/methods.md`) or"
        " `package.module:Name` of a plug-in.",
    )
    strategy: str = Field(
        "fedavg",
        description="How the server combines weights (weight methods): a Flower strategy's short"
        " name (`fedavg`, `fedadam`, `krum`, ...) or `package.module:Class`.",
    )
    strategy_args: str = Field(
        "",
        description="Keyword arguments of the strategy, `name=value` separated by spaces"
        " (e.g. `eta=0.01 beta_1=0.9`); checked against its signature.",
    )
    seed: int = Field(0, ge=0, description="Seed of training, sampling and generation.")
    data: DataConfig = DataConfig()
    backbone: BackboneConfig = BackboneConfig()
    tokens: TokensConfig = TokensConfig()
    relay: RelayConfig = RelayConfig()
    screening: ScreeningConfig = ScreeningConfig()
    generation: GenerationConfig = GenerationConfig()
    encoder: EncoderConfig = EncoderConfig()
    federation: FederationConfig = FederationConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    output: OutputConfig = OutputConfig()
    diffusion: DiffusionConfig = DiffusionConfig()

    @field_validator("method", "strategy")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _NAME_PATTERN.match(value):
            raise ValueError(f"must be a short name or 'package.module:Name', got {value!r}")
        return value

    @model_validator(mode="after")
    def _check_relay(self) -> AppConfig:
        if self.relay.combine == "mean" and self.tokens.relay == "unlabelled":
            raise ValueError(
                "relay.combine = 'mean' needs class ids: set tokens.relay = 'labelled' "
                "or relay.combine = 'select'"
            )
        return self

    @classmethod
    def from_run_config(cls, flat: Mapping[str, Any]) -> AppConfig:
        """Parse Flower's flat run config; raise ``ValueError`` naming any bad key."""
        nested: dict[str, Any] = {}
        for key, value in flat.items():
            section, attr = _split_key(key)
            if section:
                nested.setdefault(section, {})[attr] = value
            else:
                nested[attr] = value
        try:
            return cls.model_validate(nested)
        except ValidationError as err:
            raise ValueError(_describe(err)) from None

    def to_run_config(self) -> dict[str, Scalar]:
        """The flat run config (dotted, hyphenated keys) equal to this model."""
        flat: dict[str, Scalar] = {}
        for name, value in self.model_dump().items():
            if isinstance(value, dict):
                for attr, inner in value.items():
                    flat[f"{name}.{_to_key(attr)}"] = inner
            else:
                flat[_to_key(name)] = value
        return flat


def _to_key(attr: str) -> str:
    return attr.replace("_", "-")


def _sections() -> dict[str, type[_Section]]:
    sections: dict[str, type[_Section]] = {}
    for name, info in AppConfig.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, _Section):
            sections[name] = annotation
    return sections


def all_keys() -> list[str]:
    """Every valid flat key, in declaration order."""
    return list(AppConfig().to_run_config())


def _split_key(key: str) -> tuple[str, str]:
    """Map ``data.min-partition-size`` to ``("data", "min_partition_size")``."""
    section, sep, name = key.partition(".")
    sections = _sections()
    if sep:
        fields = sections[section].model_fields if section in sections else {}
        attr = name.replace("-", "_")
        if attr in fields and "_" not in name:
            return section, attr
    elif key not in sections and "_" not in key:
        attr = key.replace("-", "_")
        if attr in AppConfig.model_fields:
            return "", attr
    close = difflib.get_close_matches(key, all_keys(), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"Unknown run config key {key!r}.{hint} Valid keys: {', '.join(all_keys())}.")


def _describe(err: ValidationError) -> str:
    """One line per problem, naming the flat key, the value and what is allowed."""
    lines = []
    for problem in err.errors():
        loc = [str(part) for part in problem["loc"]]
        message = str(problem["msg"]).removeprefix("Value error, ")
        if not loc:  # a rule across keys: its message names them
            lines.append(message)
            continue
        key = ".".join([loc[0], *(_to_key(part) for part in loc[1:])])
        lines.append(f"run config key {key!r} = {problem.get('input')!r}: {message}")
    return "Invalid run config:\n  " + "\n  ".join(lines)


def _toml_value(value: Scalar) -> str:
    return json.dumps(value) if not isinstance(value, bool) else str(value).lower()


def render_toml() -> str:
    """The ``[tool.flwr.app.config]`` body for pyproject.toml (every key with its default)."""
    return "\n".join(f"{key} = {_toml_value(v)}" for key, v in AppConfig().to_run_config().items())


def render_markdown() -> str:
    """A Markdown table of every key: type, default and description."""
    rows = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    models: list[tuple[str, type[_Section]]] = [("", AppConfig), *_sections().items()]
    for prefix, model in models:
        for attr, info in model.model_fields.items():
            if attr in _sections() and not prefix:
                continue
            key = f"{prefix}.{_to_key(attr)}" if prefix else _to_key(attr)
            kind = getattr(info.annotation, "__name__", str(info.annotation))
            kind = str(info.annotation).replace("typing.", "") if kind == "Literal" else kind
            default = _toml_value(info.default)
            rows.append(f"| `{key}` | {kind} | `{default}` | {info.description or ''} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    """Print the TOML defaults or the Markdown reference."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toml", action="store_true", help="print [tool.flwr.app.config]")
    parser.add_argument("--markdown", action="store_true", help="print the docs' table")
    args = parser.parse_args(argv)
    print(render_markdown() if args.markdown else render_toml())


if __name__ == "__main__":
    main()
