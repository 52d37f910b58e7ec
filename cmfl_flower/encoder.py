"""LoRA on the CLIP vision tower: attach once per process, swap per-client adapters, train.

The CLIP is loaded once per process with LoRA layers injected (peft) into its vision tower;
each client brings its own small adapter state (:meth:`ClipEncoder.load_lora_state`), so the
clients a simulation worker serves share one backbone and keep separate state.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
import torch.nn.functional as F
from peft import (
    LoraConfig,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)

from cmfl_flower.backbones import ClipBundle, Preset, load_clip
from cmfl_flower.config import EncoderConfig
from cmfl_flower.images import resize_uint8, to_pixels
from cmfl_flower.progress import QUIET, Progress

LoraState = dict[str, torch.Tensor]


@dataclass(frozen=True)
class LoraSpec:
    """The hashable part of :class:`EncoderConfig` that shapes the adapter."""

    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]

    @classmethod
    def from_config(cls, cfg: EncoderConfig) -> LoraSpec:
        """Take the adapter's shape from the encoder config."""
        return cls(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, tuple(cfg.target_module_list))


class ClipEncoder:
    """A CLIP whose vision tower carries LoRA layers; the active adapter is swappable."""

    def __init__(self, bundle: ClipBundle, spec: LoraSpec, seed: int) -> None:
        self.bundle = bundle
        visual = bundle.model.visual
        torch.manual_seed(seed)
        config = LoraConfig(
            r=spec.rank,
            lora_alpha=spec.alpha,  # type: ignore[arg-type]  # peft accepts float scaling
            lora_dropout=spec.dropout,
            target_modules=list(spec.target_modules),
        )
        _refuse_bypassed_targets(visual, spec.target_modules)
        try:
            inject_adapter_in_model(config, visual)
        except ValueError as err:
            raise ValueError(
                f"encoder.target-modules = {','.join(spec.target_modules)!r} does not fit the "
                f"CLIP vision tower: {err}"
            ) from None
        self._lora_params = [p for n, p in visual.named_parameters() if ".lora_" in n]
        self.init_state = self.lora_state()

    def lora_state(self) -> LoraState:
        """A CPU copy of the active adapter."""
        state = get_peft_model_state_dict(self.bundle.model.visual)
        return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}

    def load_lora_state(self, state: LoraState) -> None:
        """Make ``state`` the active adapter; its keys must match exactly."""
        expected = set(self.init_state)
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(
                f"LoRA state does not fit the encoder: missing {missing}, extra {extra}"
            )
        set_peft_model_state_dict(self.bundle.model.visual, state)

    @contextmanager
    def pretrained(self) -> Iterator[None]:
        """While active, the encoder is the pretrained CLIP (LoRA B = 0), then as before.

        peft initialises LoRA's B matrices to zero, so :attr:`init_state` leaves the tower's
        output unchanged (``tests/test_encoder.py`` checks it).
        """
        active = self.lora_state()
        self.load_lora_state(self.init_state)
        try:
            yield
        finally:
            self.load_lora_state(active)

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        """The trainable adapter parameters."""
        return self._lora_params

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels -> (B, D) unit-norm image features."""
        features: torch.Tensor = self.bundle.model.encode_image(pixels, normalize=True)
        return features


def _refuse_bypassed_targets(module: torch.nn.Module, targets: tuple[str, ...]) -> None:
    """Refuse ``nn.MultiheadAttention`` and its sub-layers as LoRA targets.

    The attention reads ``out_proj`` by weight without calling it (LoRA there trains but
    changes nothing), and peft's LoRA for the attention module itself merges into and
    unmerges from the frozen weights on every forward, which drifts them in floating point.
    """
    for name, child in module.named_modules():
        if not isinstance(child, torch.nn.MultiheadAttention):
            continue
        names = {name.rsplit(".", 1)[-1], *(sub for sub, _ in child.named_children())}
        for target in sorted(names & set(targets)):
            raise ValueError(
                f"encoder.target-modules names {target!r}, part of {name} "
                "(nn.MultiheadAttention): LoRA there has no effect or alters frozen weights; "
                "use the MLP layers 'c_fc,c_proj'"
            )


@cache
def load_encoder(preset: Preset, device_name: str, seed: int, spec: LoraSpec) -> ClipEncoder:
    """The process-wide encoder for this backbone and adapter shape (loaded once)."""
    return ClipEncoder(load_clip(preset, device_name, seed), spec, seed)


@dataclass(frozen=True)
class TrainingSet:
    """Images with labels, per-sample loss weights and where each came from.

    Generated images weigh less; ``local`` marks the client's own.
    """

    images: np.ndarray  # (N, S, S, 3) uint8
    labels: np.ndarray  # (N,) int64
    weights: np.ndarray  # (N,) float32
    local: np.ndarray  # (N,) bool: the client's own images (False: generated)

    @classmethod
    def mix(
        cls,
        size: int,
        local: tuple[np.ndarray, np.ndarray],
        generated: tuple[np.ndarray, np.ndarray, float | np.ndarray] | None = None,
    ) -> TrainingSet:
        """The client's images and the generated ones, resized to ``size``.

        local: ``(images, labels)``, weight 1; generated: ``(images, labels, weight)``, one
        weight for all or (N,) one per image.
        """
        parts = [(*local, 1.0, True)] + ([(*generated, False)] if generated is not None else [])
        kept = [part for part in parts if len(part[0])]
        return cls(
            images=np.concatenate([resize_uint8(images, size) for images, *_ in kept]),
            labels=np.concatenate([labels.astype(np.int64) for _, labels, *_ in kept]),
            weights=np.concatenate(
                [
                    np.broadcast_to(np.asarray(weight, np.float32), len(labels))
                    for _, labels, weight, _ in kept
                ]
            ),
            local=np.concatenate([np.full(len(labels), own) for _, labels, _, own in kept]),
        )


def weighted_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Per-sample cross-entropy times its weight, averaged over the batch.

    logits: (B, C); target, weights: (B,). Dividing by B, not by the weights' sum, keeps a
    batch of only down-weighted (generated) images from carrying a full batch's weight.
    """
    losses = F.cross_entropy(logits, target, reduction="none")  # (B,)
    return (weights * losses).mean()


def proximal_term(params: list[torch.nn.Parameter], reference: list[torch.Tensor]) -> torch.Tensor:
    """FedProx's ``||w - w_global||^2 / 2`` over the adapter."""
    squared = [((p - r) ** 2).sum() for p, r in zip(params, reference, strict=True)]
    return torch.stack(squared).sum() / 2


def distillation(
    logits: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """KL(teacher || student) of the class probabilities, averaged over the batch.

    logits, teacher: (B, C) image-text logits of the adapted and the pretrained encoder;
    mask: (B,) bool, the samples the term covers (all when None). Dividing by B, as
    :func:`weighted_cross_entropy` does, keeps a batch with few covered samples from giving
    them a full batch's weight.
    """
    kl = F.kl_div(
        F.log_softmax(logits, dim=1),
        F.log_softmax(teacher, dim=1),
        log_target=True,
        reduction="none",
    ).sum(dim=1)  # (B,)
    if mask is not None:
        kl = kl * mask
    return kl.mean()


@torch.no_grad()
def _pretrained_logits(
    encoder: ClipEncoder,
    images: np.ndarray,
    covered: np.ndarray,
    text_features: torch.Tensor,
    batch_size: int,
) -> torch.Tensor:
    """(N, C) logits of the pretrained CLIP (no adapter) on the CPU.

    Only for the ``covered`` (N,) images; zero for the others (the distillation term skips them).
    """
    scale = encoder.bundle.model.logit_scale.exp()
    out = torch.zeros(len(images), len(text_features))
    indices = np.flatnonzero(covered)
    with encoder.pretrained():
        for batch in _batches(len(indices), batch_size, None):
            idx = indices[batch]
            pixels = to_pixels(images[idx], encoder.bundle)
            out[idx] = (scale * encoder.encode_images(pixels) @ text_features.T).cpu()
    return out


def _distilled(data: TrainingSet, cfg: EncoderConfig) -> np.ndarray:
    """(N,) bool: the images the distillation term covers (``encoder.distill-on``)."""
    if cfg.distill == 0:
        return np.zeros(len(data.images), bool)
    return data.local if cfg.distill_on == "local" else np.ones(len(data.images), bool)


def _batches(n: int, batch_size: int, generator: torch.Generator | None) -> Iterator[np.ndarray]:
    order = torch.randperm(n, generator=generator) if generator else torch.arange(n)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size].numpy()


def train_encoder(
    encoder: ClipEncoder,
    data: TrainingSet,
    text_features: torch.Tensor,
    cfg: EncoderConfig,
    seed: int,
    proximal_mu: float = 0.0,
    progress: Progress = QUIET,
) -> float:
    """Train the active adapter with weighted cross-entropy over image-text logits.

    text_features: (C, D). With ``proximal_mu`` > 0, FedProx's proximal term pulls the
    adapter towards the one it started from; with ``cfg.distill`` > 0 a distillation term keeps
    its predictions near the pretrained CLIP's on the images ``cfg.distill_on`` names. Returns
    the mean training loss.
    """
    if len(data.images) == 0:
        raise ValueError("cannot train the image encoder on an empty training set")
    covered = _distilled(data, cfg)
    teacher, mask = None, torch.from_numpy(covered)  # mask: (N,) bool
    if covered.any():
        batch = cfg.eval_batch_size
        teacher = _pretrained_logits(encoder, data.images, covered, text_features, batch)
    params = encoder.lora_parameters()
    reference = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scale = encoder.bundle.model.logit_scale.exp().detach()
    generator = torch.Generator().manual_seed(seed)
    device = encoder.bundle.device
    losses: list[float] = []
    with torch.enable_grad():
        for p in params:
            p.requires_grad_(True)
        encoder.bundle.model.visual.train()
        steps = (
            idx
            for _ in range(cfg.epochs)
            for idx in _batches(len(data.images), cfg.batch_size, generator)
        )
        total = cfg.epochs * -(-len(data.images) // cfg.batch_size)
        for idx in progress.over(steps, total, "encoder"):
            pixels = to_pixels(data.images[idx], encoder.bundle)
            logits = scale * encoder.encode_images(pixels) @ text_features.T  # (B, C)
            target = torch.from_numpy(data.labels[idx]).to(device)
            weights = torch.from_numpy(data.weights[idx]).to(device)
            loss = weighted_cross_entropy(logits, target, weights)
            if teacher is not None:
                term = distillation(logits, teacher[idx].to(device), mask[idx].to(device))
                loss = loss + cfg.distill * term
            if proximal_mu > 0:
                loss = loss + proximal_mu * proximal_term(params, reference)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        encoder.bundle.model.visual.eval()
    return float(np.mean(losses))


@torch.no_grad()
def accuracy(
    encoder: ClipEncoder,
    images: np.ndarray,
    labels: np.ndarray,
    text_features: torch.Tensor,
    batch_size: int,
) -> float:
    """Top-1 accuracy of nearest-text-feature classification.

    images: (N, H, W, 3) uint8; labels: (N,); text_features: (C, D).
    """
    if len(images) == 0:
        raise ValueError("cannot measure accuracy on an empty set")
    correct = 0
    for idx in _batches(len(images), batch_size, None):
        features = encoder.encode_images(to_pixels(images[idx], encoder.bundle))  # (B, D)
        predicted = (features @ text_features.T).argmax(dim=1).cpu().numpy()  # (B,)
        correct += int((predicted == labels[idx]).sum())
    return correct / len(images)
