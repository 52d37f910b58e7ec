"""One round with learned class tokens, free of Flower: the method and its token baselines.

:func:`token_round` generates from what the client is given (peers' relayed vectors, the names
of the classes it lacks, or nothing), updates the vision LoRA on local + generated images,
trains the client's own class vectors and evaluates. The relay (:mod:`cmfl_flower.methods.relay`)
and the baselines ``local-only-tokens`` and ``names-generation``
(:mod:`cmfl_flower.methods.local`) are this routine with another source.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from cmfl_flower.backbones import resolve_preset
from cmfl_flower.client_round import Workspace, base_metrics, evaluate, open_workspace
from cmfl_flower.config import AppConfig
from cmfl_flower.encoder import TrainingSet, accuracy, train_encoder
from cmfl_flower.generation import GeneratedImages, GenerationRequest, Generator, load_generator
from cmfl_flower.inversion import DenoisingLoss
from cmfl_flower.paths import CACHE_DIR
from cmfl_flower.privacy import denoise, privatise
from cmfl_flower.tokens import (
    ClassTokenBank,
    TokenObjective,
    class_vectors,
    image_features,
    token_drift,
    train_bank,
)
from cmfl_flower.wire import TokenEntry, WireLimits, parse_relay, reply_arrays
from cmfl_flower.workspace import Arrays, ClientState, ClientTask, Metrics, RoundOutput

Source = Literal["relay", "names", "none"]


def _received_means(entries: list[TokenEntry]) -> dict[int, torch.Tensor]:
    """Per class, the mean of the received vectors (over senders with equal token counts)."""
    by_class: dict[int, list[np.ndarray]] = {}
    for entry in entries:
        if entry.class_id is not None:
            by_class.setdefault(entry.class_id, []).append(entry.vectors)
    means = {}
    for class_id, arrays in by_class.items():
        same = [a for a in arrays if a.shape == arrays[0].shape]
        means[class_id] = torch.from_numpy(np.mean(same, axis=0))
    return means


def _requests(ws: Workspace, entries: list[TokenEntry]) -> list[GenerationRequest]:
    """Generation requests; unlabelled vectors get the label of their nearest class.

    The nearest class is judged against the pretrained name features, not the client's own
    learned tokens, which would pull received vectors towards its own classes.
    """
    device = ws.encoder.bundle.device
    vectors = [torch.from_numpy(entry.vectors).to(device) for entry in entries]
    unlabelled = [i for i, entry in enumerate(entries) if entry.class_id is None]
    nearest: dict[int, int] = {}
    if unlabelled:
        with torch.no_grad():
            features = ws.text.encode([vectors[i] for i in unlabelled])  # (U, E), one batch
        names = ws.name_features()  # (C, E)
        nearest = dict(zip(unlabelled, (features @ names.T).argmax(1).tolist(), strict=True))
    return [
        GenerationRequest(
            entry.sender, entry.class_id if entry.class_id is not None else nearest[i], vectors[i]
        )
        for i, entry in enumerate(entries)
    ]


@dataclass(frozen=True)
class Knowledge:
    """What a token round generates from, and the text side of classes the client lacks."""

    requests: list[GenerationRequest] = field(default_factory=list)
    fallback: dict[int, torch.Tensor] | None = None
    received: int = 0  # received class-vector sets


def relayed_knowledge(ws: Workspace, received: Arrays) -> Knowledge:
    """Peers' vectors from the server's relay message (``cmfl-relay``)."""
    cfg = ws.cfg
    limits = WireLimits(
        ws.text.token_dim, len(ws.class_names), cfg.tokens.max_tokens, cfg.tokens.max_bytes
    )
    # a client the server cannot place yet (e.g. after a restart) also gets its own vectors
    entries = [e for e in parse_relay(received, limits) if e.sender != ws.task.partition_id]
    if cfg.privacy.enabled and cfg.privacy.denoise:
        entries = [_denoised(ws, entry) for entry in entries]
    fallback = _received_means(entries) if cfg.tokens.unseen == "received-mean" else None
    return Knowledge(_requests(ws, entries), fallback, len(entries))


def _denoised(ws: Workspace, entry: TokenEntry) -> TokenEntry:
    """A labelled entry's vectors replaced by their posterior mean; unlabelled ones as they are."""
    if entry.class_id is None:
        return entry
    anchor = _anchor(ws, entry.class_id)
    return TokenEntry(entry.sender, entry.class_id, denoise(entry.vectors, anchor, ws.cfg.privacy))


def _anchor(ws: Workspace, class_id: int) -> np.ndarray:
    """(n, D) pretrained embedding of the class's name, on the CPU: the DP release's centre."""
    return ws.text.name_vectors(ws.class_names[class_id]).float().cpu().numpy()


def name_knowledge(ws: Workspace, bank: ClassTokenBank) -> Knowledge:
    """The classes the client lacks, from their pretrained names: no communication."""
    missing = [c for c in range(len(ws.class_names)) if c not in bank.class_ids]
    requests = [
        GenerationRequest(ws.task.partition_id, c, ws.text.name_vectors(ws.class_names[c]))
        for c in missing
    ]
    return Knowledge(requests)


def own_bank(ws: Workspace, state: ClientState) -> ClassTokenBank:
    """The client's saved vectors, else its classes with ``tokens.min-images`` images, named."""
    if state.tokens is not None:
        return ClassTokenBank.from_state(state.tokens)
    counts = np.bincount(ws.data.train.labels, minlength=len(ws.class_names))
    learned = [c for c, n in enumerate(counts) if n >= ws.cfg.tokens.min_images]
    return ClassTokenBank.from_names(ws.text, learned, ws.class_names)


def generated_recognised(ws: Workspace, generated: GeneratedImages) -> Metrics:
    """Share of the generated images the judge labels as the class they were generated for.

    The judge is the preset's pretrained CLIP (no LoRA) with prompts of the real class names,
    also when clients only know opaque ids: it measures, it never trains.
    """
    if not len(generated.labels):
        return {}
    with ws.encoder.pretrained(), torch.no_grad():
        names = ws.name_features(ws.global_test.class_names)  # the real names, always
        share = accuracy(
            ws.encoder,
            generated.images,
            generated.labels,
            names,
            ws.cfg.encoder.eval_batch_size,
        )
    return {"generated-recognised": share}


def _generate(ws: Workspace, requests: list[GenerationRequest]) -> GeneratedImages:
    """Images for ``requests`` (none when nothing is requested or generation is off)."""
    cfg = ws.cfg
    if not requests or cfg.generation.images_per_class == 0:
        return GeneratedImages(
            np.zeros((0, 1, 1, 3), np.uint8), np.zeros(0, np.int64), np.zeros(0, np.int64)
        )
    generator = _generator(ws)
    return generator.generate(requests, cfg.generation, cfg.seed, ws.task.server_round, ws.progress)


def _generator(ws: Workspace) -> Generator:
    cfg = ws.cfg
    return load_generator(
        resolve_preset(cfg.backbone),
        str(ws.encoder.bundle.device),
        cfg.tokens.template,
        cfg.backbone.dtype,
    )


def _token_objective(ws: Workspace, bank: ClassTokenBank, knowledge: Knowledge) -> TokenObjective:
    """The inputs ``tokens.objective`` needs, computed with the updated encoder."""
    cfg, train = ws.cfg, ws.data.train
    objective = TokenObjective(
        labels=train.labels,
        anchors={c: ws.text.name_vectors(ws.class_names[c]) for c in bank.class_ids},
        fallback=knowledge.fallback,
    )
    if cfg.tokens.objective != "diffusion":
        objective.features = image_features(ws.encoder, train.images, cfg.encoder.eval_batch_size)
    if cfg.tokens.objective != "clip":
        objective.denoising = DenoisingLoss.build(
            _generator(ws),
            train.images,
            cfg.tokens.snr_gamma,
            cfg.generation.batch_size,  # images through the VAE at once, as in generation
            cache=ws.artifacts / CACHE_DIR if ws.artifacts else None,  # on the client's node
        )
    return objective


def _train_tokens(ws: Workspace, bank: ClassTokenBank, knowledge: Knowledge) -> Metrics:
    """Train the bank with ``tokens.objective``; ``token-loss`` (none for an empty bank)."""
    if not bank.class_ids:
        return {}
    objective = _token_objective(ws, bank, knowledge)
    cfg = ws.cfg.tokens
    loss = train_bank(ws.text, bank, objective, ws.class_names, cfg, ws.seed, ws.progress)
    return {"token-loss": loss, "token-drift": token_drift(bank, objective.anchors)}


def token_round(
    cfg: AppConfig, task: ClientTask, state: ClientState, received: Arrays, source: Source
) -> RoundOutput:
    """One round with learned class tokens; ``source`` says what the client generates from.

    ``relay``: peers' vectors (the method); ``names``: the names of the classes it lacks;
    ``none``: nothing. Then: generate, update the encoder on local + generated images, train
    its own tokens, evaluate.
    """
    ws = open_workspace(cfg, task, state.lora)
    names = ws.class_names
    bank = own_bank(ws, state)
    if source == "relay":
        knowledge = relayed_knowledge(ws, received)
    elif source == "names":
        knowledge = name_knowledge(ws, bank)
    else:
        knowledge = Knowledge()

    def text_features() -> torch.Tensor:
        with torch.no_grad():
            return ws.text.encode(class_vectors(ws.text, bank, names, knowledge.fallback))

    before = text_features()  # the bank is fixed until token training: one encoding serves both
    with ws.phase("generation"):
        generated = _generate(ws, knowledge.requests)
    ws.save_artifacts(generated)
    with ws.phase("encoder"):
        data = TrainingSet.mix(
            ws.encoder.bundle.image_size,
            (ws.data.train.images, ws.data.train.labels),
            (generated.images, generated.labels, cfg.generation.sample_weight),
        )
        encoder_loss = train_encoder(
            ws.encoder, data, before, cfg.encoder, ws.seed, progress=ws.progress
        )
    with ws.phase("tokens"):
        token_metrics = _train_tokens(ws, bank, knowledge)
    metrics = evaluate(ws, text_features()) | base_metrics(ws) | token_metrics
    metrics |= generated_recognised(ws, generated)
    metrics |= {
        "num-received-classes": knowledge.received,
        "num-generated": len(generated.labels),
        "num-token-classes": len(bank.class_ids),
        "encoder-loss": encoder_loss,
    }
    tokens = bank.state()
    new_state = ClientState(lora=ws.encoder.lora_state(), tokens=tokens)
    sent: Arrays = {}
    if source == "relay":
        own = {c: tokens[f"c{c}"].numpy() for c in bank.class_ids}
        if cfg.privacy.enabled:  # the noise is fresh OS entropy: the run seed is no secret
            anchors = {c: _anchor(ws, c) for c in own}
            own = privatise(own, anchors, cfg.privacy, np.random.default_rng())
        sent = reply_arrays(own, _labelled(cfg))
    return RoundOutput(metrics | ws.timings, new_state, sent)


def _labelled(cfg: AppConfig) -> bool:
    return cfg.tokens.relay == "labelled"
