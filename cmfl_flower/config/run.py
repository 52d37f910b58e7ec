"""The run config's sections of how a run goes.

Federation, privacy, output, and the training of the federated diffusion baselines.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from cmfl_flower.config.base import Section, absolute_or_empty


class FederationConfig(Section):
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


class PrivacyConfig(Section):
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


class OutputConfig(Section):
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

    _check_dir = field_validator("dir")(absolute_or_empty)

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


class DiffusionConfig(Section):
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

    _check_weights = field_validator("inception_weights")(absolute_or_empty)

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
