"""Screening of relayed knowledge: every received (sender, class) set is judged before it trains.

A receiver generates images from each peer's class vectors and, for the classes it lacks, uses
the received vectors as the text side of its classifier (``tokens.unseen = received-mean``). A
peer that lies (vectors of one class sent under another's id, noise, vectors tuned to make
harmful images) would train the receiver's encoder under wrong labels and move its classifier.
So, after generation and before any training, every received (sender, class) set is judged
twice, by the frozen pretrained CLIP, in two feature spaces:

* its **images**: the images generated from the sender's vectors of the class, against
  ``screening.min-score``;
* its **tokens**: the text features of the sender's vectors themselves (the class-name prompt
  with the received vectors in the name's place), against ``screening.min-token-score``.

A set that either judgement rejects is left out of training and of the received mean; its
images are still drawn in the sample grid, crossed out. In each space every judge that applies
scores the set, and the lowest score counts:

* ``own``: the receiver holds the class. Prototypes: for the images, the mean feature of its
  own images of each class it holds (at least ``tokens.min-images``); for the tokens, the text
  feature of its own learned vectors of each class. Every other class: the mean feature of the
  sets received for it, for the claimed class only from other senders (a sender cannot vouch
  for itself).
* ``names``: class names mean something (``data.class-names = real``): the pretrained CLIP's
  text features of the class-name prompts, for every class. In the token space each class has
  a second reference, its *history*: the mean text feature of the sets of the class this
  receiver accepted in the last round it accepted any (:func:`history`), kept in its state. A
  class's similarity is the nearer of its two references, so honest vectors that drift away
  from their name over the run stay near what they were a round before, while vectors sent
  under another class's id sit near that class's name and history.
* ``consensus``: opaque names and a class the receiver lacks, sent by at least
  ``screening.consensus-senders`` senders: the ``own`` judge's prototypes, where the claimed
  class's comes from the other senders only, so an outlier sender stands out.
* otherwise the set is *unjudged* in that space: kept (there is nothing to compare with).

A set's score is the judge's mean class probability of the claimed class over that of the most
probable class (softmax of the CLIP-scaled cosine similarities, averaged over the set's
images, or over its one token feature): 1 when the claimed class is the judge's first choice.
The name judge first divides each class's probability by its mean over everything it judges
that round, so that a weak zero-shot CLIP's bias towards a few classes does not count against
the sets of the others. The judge is the pretrained CLIP without the client's LoRA, so that
nothing a peer sent can have moved it.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from cmfl_flower.config import ScreeningConfig

OWN, NAMES, CONSENSUS, NONE = "own", "names", "consensus", "none"
TOKEN = "token-"  # prefix of the token judges' names: token-own, token-names, token-consensus


@dataclass(frozen=True)
class Verdict:
    """The judgement of one received (sender, class) set."""

    sender: int
    class_id: int
    judge: str  # the deciding judge: OWN, NAMES, CONSENSUS (TOKEN-prefixed), or NONE (unjudged)
    score: float  # NaN when unjudged
    accepted: bool


@dataclass(frozen=True)
class Evidence:
    """What the judges see, all in the frozen judge's unit-norm feature space (width E)."""

    features: torch.Tensor  # (N, E) the generated images, or one text feature per set
    labels: np.ndarray  # (N,) int64 the class each image was generated for (or set claims)
    senders: np.ndarray  # (N,) int64 the sender of the vectors it came from
    own: dict[int, torch.Tensor]  # class id -> (E,) the receiver's own prototype of the class
    names: torch.Tensor | None  # (C, E) class-name features, or (R, C, E) R references each
    scale: float  # the CLIP's logit scale


def sets_of(labels: np.ndarray, senders: np.ndarray) -> list[tuple[int, int]]:
    """The (sender, class) sets among generated images' (N,) labels and senders, in order."""
    return sorted({(int(s), int(c)) for s, c in zip(senders, labels, strict=True)})


def unscreened(labels: np.ndarray, senders: np.ndarray) -> list[Verdict]:
    """Every set kept, unjudged: what a receiver does with screening off."""
    return [Verdict(s, c, NONE, math.nan, True) for s, c in sets_of(labels, senders)]


def judge_sets(
    evidence: Evidence, cfg: ScreeningConfig, min_score: float, prefix: str = ""
) -> list[Verdict]:
    """One verdict per (sender, class) set in ``evidence``, in (sender, class) order.

    ``min_score``: the lowest accepted score; ``prefix``: put before the judges' names
    (:data:`TOKEN` for the token judges).
    """
    labels, senders = evidence.labels, evidence.senders
    sets = sets_of(labels, senders)
    senders_of = Counter(class_id for _, class_id in sets)
    prior = None
    if evidence.names is not None:
        prior = _probabilities(evidence.features, evidence.names, evidence.scale)
    verdicts = []
    for sender, class_id in sets:
        members = torch.from_numpy((senders == sender) & (labels == class_id))
        features = evidence.features[members.to(evidence.features.device)]  # (n, E)
        scores = {}  # judge -> score
        if class_id in evidence.own:
            scores[OWN] = _prototype_score(evidence, sender, class_id, features)
        if evidence.names is not None:
            scores[NAMES] = _score(features, evidence.names, class_id, evidence.scale, prior)
        elif class_id not in evidence.own and senders_of[class_id] >= cfg.consensus_senders:
            scores[CONSENSUS] = _prototype_score(evidence, sender, class_id, features)
        scores = {name: score for name, score in scores.items() if not math.isnan(score)}
        if not scores:
            verdicts.append(Verdict(sender, class_id, NONE, math.nan, True))
            continue
        judge = min(scores, key=lambda name: scores[name])
        score = scores[judge]
        verdicts.append(Verdict(sender, class_id, prefix + judge, score, score >= min_score))
    return verdicts


def combine(*judgements: list[Verdict]) -> list[Verdict]:
    """One verdict per set from several judgements (images, tokens) of the same sets.

    A set is accepted only if no judgement rejected it. The verdict kept is the first rejecting
    one, else the first judged one, else unjudged.
    """
    by_set: dict[tuple[int, int], list[Verdict]] = {}
    for verdicts in judgements:
        for verdict in verdicts:
            by_set.setdefault((verdict.sender, verdict.class_id), []).append(verdict)
    out = []
    for key in sorted(by_set):
        verdicts = by_set[key]
        rejecting = [v for v in verdicts if not v.accepted]
        judged = [v for v in verdicts if v.judge != NONE]
        out.append((rejecting or judged or verdicts)[0])
    return out


def references(names: torch.Tensor, history: dict[int, torch.Tensor]) -> torch.Tensor:
    """(2, C, E): each class's name feature (C, E) and its history, the name where it has none."""
    past = names.clone()
    for class_id, feature in history.items():
        past[class_id] = feature.to(past)
    return torch.stack([names, past])


def history(
    evidence: Evidence, verdicts: list[Verdict], before: dict[int, torch.Tensor]
) -> dict[int, torch.Tensor]:
    """Class id -> (E,) the unit mean of the accepted sets' features of the class this round.

    ``evidence``: the token evidence the ``verdicts`` judged. Classes with no accepted set this
    round keep their feature from ``before``.
    """
    accepted = {(v.sender, v.class_id) for v in verdicts if v.accepted}
    pairs = zip(evidence.senders.tolist(), evidence.labels.tolist(), strict=True)
    keep = torch.tensor([pair in accepted for pair in pairs], dtype=torch.bool)
    out = dict(before)
    for class_id in np.unique(evidence.labels[keep.numpy()]):
        members = keep & torch.from_numpy(evidence.labels == class_id)
        mean = evidence.features[members.to(evidence.features.device)].mean(0)  # (E,)
        out[int(class_id)] = torch.nn.functional.normalize(mean, dim=0).cpu()
    return out


def _probabilities(features: torch.Tensor, prototypes: torch.Tensor, scale: float) -> torch.Tensor:
    """(K,) the judge's class probabilities averaged over ``features`` (n, E).

    ``prototypes``: (K, E), or (R, K, E) R references per class, of which the nearest counts.
    """
    similarities = features @ prototypes.transpose(-1, -2)  # (n, K) or (R, n, K)
    if similarities.dim() == 3:
        similarities = similarities.amax(0)  # (n, K)
    return torch.softmax(scale * similarities, dim=1).mean(0)


def _score(
    features: torch.Tensor,
    prototypes: torch.Tensor,
    target: int,
    scale: float,
    prior: torch.Tensor | None = None,
) -> float:
    """Mean probability of class ``target`` over the most probable's.

    ``prototypes``: (K, E), or (R, K, E) R references per class (:func:`_probabilities`).

    ``prior``: (K,) the judge's mean probabilities over every image it judges this round; the
    probabilities are divided by it first, so that a judge's bias towards some classes does
    not count against the sets of the others.
    """
    probabilities = _probabilities(features, prototypes, scale)  # (K,)
    if prior is not None:
        probabilities = probabilities / prior
    return float(probabilities[target] / probabilities.max())


def _prototype_score(
    evidence: Evidence, sender: int, class_id: int, features: torch.Tensor
) -> float:
    """:func:`_score` against class prototypes; the claimed class's is not ``sender``'s own.

    A class the receiver holds: the mean of its own images. Any other class: the mean of the
    images generated for it, for the claimed class only from other senders' vectors (a sender
    cannot vouch for itself). Classes with neither have no prototype.
    """
    device = evidence.features.device
    others = torch.from_numpy(evidence.senders != sender).to(device)
    classes, rows = [], []
    for candidate in sorted(set(evidence.own) | {int(c) for c in evidence.labels}):
        if candidate in evidence.own:
            rows.append(evidence.own[candidate])
        else:
            members = torch.from_numpy(evidence.labels == candidate).to(device)
            if candidate == class_id:
                members &= others
            if not members.any():
                continue
            rows.append(evidence.features[members].mean(0))
        classes.append(candidate)
    if class_id not in classes:  # no other sender of the class: nothing to compare with
        return math.nan
    prototypes = torch.nn.functional.normalize(torch.stack(rows), dim=1)  # (K, E)
    return _score(features, prototypes, classes.index(class_id), evidence.scale)


def screening_metrics(verdicts: list[Verdict]) -> dict[str, int]:
    """``screened-out`` (sets left out), ``judged``, ``unjudged`` and per sender ``s<id>``.

    Per sender ``id``: ``kept-s<id>``, its sets this receiver trained on; ``judged-s<id>`` and
    ``rejected-s<id>``, those it judged and those it left out (the server's quarantine reads
    them; absent when none was judged).
    """
    judged = [v for v in verdicts if v.judge != NONE]
    metrics = {
        "screened-out": sum(not v.accepted for v in verdicts),
        "judged": len(judged),
        "unjudged": len(verdicts) - len(judged),
    }
    for sender in sorted({v.sender for v in verdicts}):
        metrics[f"kept-s{sender}"] = sum(v.accepted for v in verdicts if v.sender == sender)
        if mine := [v for v in judged if v.sender == sender]:
            metrics[f"judged-s{sender}"] = len(mine)
            metrics[f"rejected-s{sender}"] = sum(not v.accepted for v in mine)
    return metrics
