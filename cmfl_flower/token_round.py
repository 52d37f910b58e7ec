"""One round with learned class tokens, free of Flower: the method and its token baselines.

:func:`token_round` generates from what the client is given (peers' relayed vectors, the names
of the classes it lacks, or nothing), updates the vision LoRA on local + generated images,
trains the client's own class vectors and evaluates. The relay (:mod:`cmfl_flower.methods.relay`)
and the baselines ``local-only-tokens`` and ``names-generation``
(:mod:`cmfl_flower.methods.local`) are this routine with another source.

What it generates from comes from :mod:`cmfl_flower.knowledge`, where an unusable relayed
entry is dropped and counted (``dropped-<rule>``); every (sender, class) set of images
generated from peers' vectors is screened (:mod:`cmfl_flower.screening`) before it trains
anything.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Literal

import numpy as np
import torch

from cmfl_flower.aliases import Arrays, Metrics
from cmfl_flower.backbones import resolve_preset
from cmfl_flower.client.task import ClientState, ClientTask, RoundOutput
from cmfl_flower.client.workspace import Workspace, base_metrics, evaluate, open_workspace
from cmfl_flower.config import AppConfig, GenerationConfig
from cmfl_flower.encoder import TrainingSet, train_encoder
from cmfl_flower.generation import (
    GeneratedImages,
    GenerationRequest,
    Generator,
    images_per_request,
    load_generator,
)
from cmfl_flower.inversion import DenoisingLoss
from cmfl_flower.judge import JUDGED, judge_for
from cmfl_flower.knowledge import (
    Knowledge,
    anchor,
    name_knowledge,
    relayed_knowledge,
    uncovered,
)
from cmfl_flower.paths import CACHE_DIR
from cmfl_flower.privacy import privatise
from cmfl_flower.replay import Replay
from cmfl_flower.screening import (
    TOKEN,
    Evidence,
    Verdict,
    combine,
    history,
    judge_sets,
    references,
    screening_metrics,
    unscreened,
)
from cmfl_flower.tokens import (
    ClassTokenBank,
    ClusterSets,
    TokenObjective,
    TokenState,
    class_vectors,
    cluster_numbers,
    image_features,
    pretrained_features,
    token_drift,
    train_bank,
    train_sets,
)
from cmfl_flower.wire import TokenEntry, reply_arrays

Source = Literal["relay", "names", "none"]


def own_bank(ws: Workspace, state: ClientState) -> ClassTokenBank:
    """The client's saved vectors, else its classes with ``tokens.min-images`` images, named."""
    if state.tokens is not None:
        return ClassTokenBank.from_state(state.tokens)
    counts = np.bincount(ws.data.train.labels, minlength=len(ws.class_names))
    learned = [c for c, n in enumerate(counts) if n >= ws.cfg.tokens.min_images]
    return ClassTokenBank.from_names(ws.text, learned, ws.class_names)


def own_sets(ws: Workspace, state: ClientState, bank: ClassTokenBank) -> ClusterSets | None:
    """The client's cluster sets (``tokens.clusters`` >= 2): saved, else its classes' vectors."""
    k = ws.cfg.tokens.clusters
    return ClusterSets.for_bank(bank, state.tokens, k) if k > 1 and bank.class_ids else None


def judge_features(ws: Workspace, generated: GeneratedImages) -> torch.Tensor:
    """(N, E) the generated images' features under the pretrained CLIP (no LoRA), once a round.

    Both :func:`screen` and :func:`generated_recognised` judge with them.
    """
    with ws.encoder.pretrained(), torch.no_grad():
        return image_features(ws.encoder, generated.images, ws.cfg.encoder.eval_batch_size)


def generated_recognised(
    ws: Workspace, generated: GeneratedImages, features: torch.Tensor
) -> Metrics:
    """Share of the generated images the judge labels as the class they were generated for.

    The judge is the preset's pretrained CLIP (no LoRA) with prompts of the real class names,
    also when clients only know opaque ids: it measures, it never trains. ``features``: the
    images' :func:`judge_features`. With ``generation.judge`` set, the independent judge of
    :mod:`cmfl_flower.judge` scores them too (``generated-recognised-judge``).
    """
    if not len(generated.labels):
        return {}
    with ws.encoder.pretrained(), torch.no_grad():
        names = ws.name_features(ws.real_class_names)  # (C, E) the real names, always
    predicted = (features @ names.T).argmax(dim=1).cpu().numpy()  # (N,)
    metrics = {"generated-recognised": float((predicted == generated.labels).mean())}
    if ws.cfg.generation.judge:
        judge = judge_for(ws.cfg.generation.judge, ws.real_class_names)
        metrics[JUDGED] = judge.recognised(generated.images, generated.labels)
    return metrics


def generated_weights(
    ws: Workspace, generated: GeneratedImages, features: torch.Tensor, text: torch.Tensor
) -> np.ndarray:
    """(N,) each generated image's loss weight (``generation.weighting``).

    ``features``: the images' :func:`judge_features`; ``text``: (C, E) the client's own text
    side. ``confidence`` scales ``sample-weight`` by the probability ``text`` gives each image's
    class: the client's knowledge only, never the real names or a judge. ``relative`` divides
    those probabilities by their mean, so the round's generated images keep their total weight.
    """
    cfg = ws.cfg.generation
    weights = np.full(len(generated.labels), cfg.sample_weight, np.float32)
    if cfg.weighting == "fixed" or not len(weights):
        return weights
    scale = float(ws.encoder.bundle.model.logit_scale.exp())
    with torch.no_grad():
        probs = (scale * features @ text.T).softmax(dim=1)  # (N, C)
        own = probs[torch.arange(len(weights)), torch.as_tensor(generated.labels)]  # (N,)
    if cfg.weighting == "relative":
        own = own / own.mean().clamp_min(1e-12)
    return weights * own.cpu().numpy().astype(np.float32)


def screen(
    ws: Workspace,
    generated: GeneratedImages,
    features: torch.Tensor,
    bank: ClassTokenBank,
    entries: list[TokenEntry],
    past: TokenState,
) -> tuple[list[Verdict], TokenState]:
    """Verdicts on every received (sender, class) set (:mod:`cmfl_flower.screening`).

    Its images (``generated``, with their :func:`judge_features` ``features``) and its vectors
    (labelled ``entries``) are judged apart; a set either rejects is left out. ``bank``: the
    receiver's own vectors, the token judges' ``own`` prototypes. ``past``: the token name
    judge's history (``c<id>`` -> (E,), :func:`cmfl_flower.screening.history`); returned
    updated with this round's accepted sets.
    """
    cfg = ws.cfg.screening
    names = None
    with ws.encoder.pretrained(), torch.no_grad():
        if ws.cfg.data.class_names == "real":
            names = ws.name_features()  # (C, E)
    scale = float(ws.encoder.bundle.model.logit_scale.exp())
    before = {int(key[1:]): feature for key, feature in past.items()}
    images = image_evidence(ws, generated, features, names, scale)
    tokens = token_evidence(ws, bank, entries, names, scale, before)
    token_verdicts = judge_sets(tokens, cfg, cfg.min_token_score, TOKEN) if tokens else []
    verdicts = combine(judge_sets(images, cfg, cfg.min_score) if images else [], token_verdicts)
    after = history(tokens, verdicts, before) if tokens else before
    return verdicts, {f"c{c}": feature for c, feature in sorted(after.items())}


def image_evidence(
    ws: Workspace,
    generated: GeneratedImages,
    features: torch.Tensor,
    names: torch.Tensor | None,
    scale: float,
) -> Evidence | None:
    """The image judges' evidence; ``own``: the mean features of the client's own images."""
    if not len(generated.labels):
        return None
    train, min_images = ws.data.train, ws.cfg.tokens.min_images
    counts = np.bincount(train.labels, minlength=len(ws.class_names))
    held = np.isin(train.labels, [c for c, n in enumerate(counts) if n >= min_images])
    own: dict[int, torch.Tensor] = {}
    if held.any():  # a client may hold no class with min-images images (Dirichlet splits)
        every = pretrained_features(ws.encoder, train.images, ws.cfg.encoder.eval_batch_size)
        mine = every[torch.from_numpy(held)]  # (H, E) its images of the classes it holds
        own_labels = train.labels[held]
        for c in np.unique(own_labels):
            own[int(c)] = mine[torch.from_numpy(own_labels == c)].mean(0)
    return Evidence(features, generated.labels, generated.senders, own, names, scale)


def token_evidence(
    ws: Workspace,
    bank: ClassTokenBank,
    entries: list[TokenEntry],
    names: torch.Tensor | None,
    scale: float,
    past: dict[int, torch.Tensor] | None = None,
) -> Evidence | None:
    """The token judges' evidence: one text feature per labelled received entry.

    ``own``: the text features of the client's own vectors; ``names`` (C, E) gains each
    class's ``past`` feature as a second reference (:func:`cmfl_flower.screening.references`).
    Unlabelled entries are not judged here: their class is the one their vectors are nearest to.
    """
    labelled = [e for e in entries if e.class_id is not None]
    if not labelled:
        return None
    device = ws.encoder.bundle.device
    with torch.no_grad():
        received = ws.text.encode([torch.from_numpy(e.vectors).to(device) for e in labelled])
        own = {}
        if bank.class_ids:
            mine = ws.text.encode([bank.get(c).to(device) for c in bank.class_ids])  # (B, E)
            own = dict(zip(bank.class_ids, mine, strict=True))
    return Evidence(
        features=received,  # (S, E)
        labels=np.array([e.class_id for e in labelled], np.int64),
        senders=np.array([e.sender for e in labelled], np.int64),
        own=own,
        names=references(names, past or {}) if names is not None else None,
        scale=scale,
    )


def _kept(generated: GeneratedImages, verdicts: list[Verdict]) -> np.ndarray:
    """(N,) bool: the generated images whose (sender, class) set screening accepted."""
    out = {(v.sender, v.class_id) for v in verdicts if not v.accepted}
    pairs = zip(generated.senders.tolist(), generated.labels.tolist(), strict=True)
    return np.array([pair not in out for pair in pairs], bool)


def _with_replay(
    ws: Workspace,
    state: ClientState,
    generated: GeneratedImages,
    kept: np.ndarray,
    weights: np.ndarray,
    verdicts: list[Verdict],
) -> Replay:
    """The round's accepted generated images and those kept from earlier rounds.

    ``generation.replay-rounds`` earlier rounds' images (:mod:`cmfl_flower.replay`), less
    those of senders this round's screening left out; none when the key is 0.
    """
    fresh = Replay(
        generated.images[kept],
        generated.labels[kept],
        generated.senders[kept],
        weights[kept],
        np.full(int(kept.sum()), ws.task.server_round, np.int64),
    )
    if not ws.cfg.generation.replay_rounds:
        return fresh
    screened_out = {v.sender for v in verdicts if not v.accepted}
    return (
        Replay.from_state(state.replay)
        .without(screened_out)
        .then(fresh, ws.task.server_round, ws.cfg.generation.replay_rounds + 1)
    )


def _dropped_metrics(dropped: Counter[str]) -> Metrics:
    """``dropped`` (unusable received entries) and ``dropped-<rule>`` per rule."""
    return {"dropped": sum(dropped.values())} | {f"dropped-{k}": n for k, n in dropped.items()}


def _generate(
    ws: Workspace, requests: list[GenerationRequest], cfg: GenerationConfig | None = None
) -> GeneratedImages:
    """Images for ``requests`` (none when nothing is requested or generation is off).

    ``cfg``: the generation settings, by default ``generation``'s.
    """
    cfg = cfg or ws.cfg.generation
    if not requests or not cfg.enabled:
        return GeneratedImages(
            np.zeros((0, 1, 1, 3), np.uint8), np.zeros(0, np.int64), np.zeros(0, np.int64)
        )
    generator = _generator(ws)
    return generator.generate(requests, cfg, ws.cfg.seed, ws.task.server_round, ws.progress)


def _fill_in(
    ws: Workspace,
    bank: ClassTokenBank,
    knowledge: Knowledge,
    generated: GeneratedImages,
    judged: torch.Tensor,
    kept: np.ndarray,
) -> tuple[GeneratedImages, torch.Tensor, np.ndarray]:
    """The round's images with those of uncovered lacking classes, from their names.

    ``generation.uncovered`` (:func:`cmfl_flower.knowledge.uncovered`): each such class gets
    as many images as a relayed set got this round. Returns the images, their (N, E)
    :func:`judge_features` and the (N,) kept mask, the new images appended (kept: they are
    the client's own knowledge, not a peer's).
    """
    requests = uncovered(ws, bank, knowledge, set(generated.labels[kept].tolist()))
    if not requests or not ws.cfg.generation.enabled:
        return generated, judged, kept
    cfg = ws.cfg.generation
    counts = images_per_request(knowledge.requests, cfg)  # the relayed sets' (budget's) counts
    if counts:  # else the round's budget goes to the names alone
        cfg = cfg.model_copy(
            update={"images_per_round": 0, "images_per_class": max(1, min(counts))}
        )
    with ws.phase("generation"):
        named = _generate(ws, requests, cfg)
    features = judge_features(ws, named)  # (M, E)
    together = GeneratedImages(
        np.concatenate([generated.images, named.images]) if len(generated.labels) else named.images,
        np.concatenate([generated.labels, named.labels]),
        np.concatenate([generated.senders, named.senders]),
    )
    judged = torch.cat([judged, features]) if len(generated.labels) else features
    return together, judged, np.concatenate([kept, np.ones(len(named.labels), bool)])


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


def _train_tokens(
    ws: Workspace, bank: ClassTokenBank, knowledge: Knowledge, sets: ClusterSets | None
) -> Metrics:
    """Train the bank with ``tokens.objective``, then the cluster ``sets`` on the denoising loss.

    ``token-loss``, ``token-drift`` and with sets ``cluster-loss`` (none for an empty bank).
    """
    if not bank.class_ids:
        return {}
    objective = _token_objective(ws, bank, knowledge)
    cfg = ws.cfg.tokens
    loss = train_bank(ws.text, bank, objective, ws.class_names, cfg, ws.seed, ws.progress)
    metrics = {"token-loss": loss, "token-drift": token_drift(bank, objective.anchors)}
    if sets is not None and objective.denoising is not None:
        train = ws.data.train  # fixed features: fixed clusters
        features = pretrained_features(ws.encoder, train.images, ws.cfg.encoder.eval_batch_size)
        numbers = cluster_numbers(features, train.labels, bank.class_ids, cfg.clusters, ws.seed)
        metrics["cluster-loss"] = train_sets(
            sets, objective.denoising, train.labels, numbers, cfg, ws.seed, ws.progress
        )
    return metrics


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
    sets = own_sets(ws, state, bank) if source == "relay" else None  # only the relay sends them
    if source == "relay":
        knowledge = relayed_knowledge(ws, received)
        if not cfg.generation.held_classes:
            lacking = [r for r in knowledge.requests if r.class_id not in bank.class_ids]
            knowledge = replace(knowledge, requests=lacking)
    elif source == "names":
        knowledge = name_knowledge(ws, bank)
    else:
        knowledge = Knowledge()

    def text_features() -> torch.Tensor:
        with torch.no_grad():
            return ws.text.encode(class_vectors(ws.text, bank, names, knowledge.fallback))

    generating = bool(knowledge.requests) and cfg.generation.enabled
    if generating or (bank.class_ids and cfg.tokens.objective != "clip"):
        with ws.phase("load"):  # once per process: later calls find it loaded
            _generator(ws)
    with ws.phase("generation"):
        generated = _generate(ws, knowledge.requests)
    judged = judge_features(ws, generated) if len(generated.labels) else torch.zeros(0)
    verdicts = unscreened(generated.labels, generated.senders)
    past = state.screening or {}
    if source == "relay" and cfg.screening.enabled:
        with ws.phase("screening"):
            verdicts, past = screen(ws, generated, judged, bank, knowledge.entries, past)
        knowledge = knowledge.without(verdicts, ws)
    kept = _kept(generated, verdicts)  # (N,) bool
    if source == "relay":
        generated, judged, kept = _fill_in(ws, bank, knowledge, generated, judged, kept)
    ws.save_artifacts(generated, screened=~kept)
    before = text_features()  # the bank is fixed until token training: one encoding serves both
    weights = generated_weights(ws, generated, judged, before)  # (N,)
    synthetic = _with_replay(ws, state, generated, kept, weights, verdicts)
    with ws.phase("encoder"):
        data = TrainingSet.mix(
            ws.encoder.bundle.image_size,
            (ws.data.train.images, ws.data.train.labels),
            (synthetic.images, synthetic.labels, synthetic.weights),
        )
        encoder_loss = train_encoder(
            ws.encoder, data, before, cfg.encoder, ws.seed, progress=ws.progress
        )
    with ws.phase("tokens"):
        token_metrics = _train_tokens(ws, bank, knowledge, sets)
    metrics = evaluate(ws, text_features()) | base_metrics(ws) | token_metrics
    metrics |= generated_recognised(ws, generated, judged)
    if source == "relay":
        metrics |= _dropped_metrics(knowledge.dropped) | screening_metrics(verdicts)
        metrics["num-generated-from-names"] = int((generated.senders == task.partition_id).sum())
    metrics |= {
        "num-received-classes": knowledge.received,
        "num-generated": len(generated.labels),
        "num-replayed": len(synthetic.labels) - int(kept.sum()),
        "num-token-classes": len(bank.class_ids),
        "encoder-loss": encoder_loss,
    }
    tokens = bank.state() | (sets.state() if sets is not None else {})
    replay_rounds = cfg.generation.replay_rounds
    new_state = ClientState(
        lora=ws.encoder.lora_state(),
        tokens=tokens,
        screening=past or None,
        replay=synthetic.then(Replay.empty(), task.server_round, replay_rounds).state(),
    )
    sent: Arrays = {}
    if source == "relay":
        own = {c: tokens[f"c{c}"].numpy() for c in bank.class_ids}
        if cfg.privacy.enabled:  # the noise is fresh OS entropy: the run seed is no secret
            anchors = {c: anchor(ws, c) for c in own}
            own = privatise(own, anchors, cfg.privacy, np.random.default_rng())
        sent = reply_arrays(own, _labelled(cfg), sets.arrays() if sets is not None else None)
    return RoundOutput(metrics | ws.timings, new_state, sent)


def _labelled(cfg: AppConfig) -> bool:
    return cfg.tokens.relay == "labelled"
