"""Learned class tokens: the vectors that replace a class name's tokens in the prompt.

A client's :class:`ClassTokenBank` holds, for every class it has seen, an ``(n, D)`` tensor
initialised from the CLIP's pretrained token embeddings of the class name. Text features come
from the frozen open_clip text tower with the vectors substituted at the name's positions
(:mod:`cmfl_flower.prompts`); training moves the bank and nothing else.

With ``tokens.clusters = K >= 2`` a client also holds :class:`ClusterSets`: per class, K more
sets, each learned by the denoising loss alone on one cluster of its images of the class
(:func:`cluster_numbers`, :func:`train_sets`), for peers to generate more varied images from.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from cmfl_flower.backbones import ClipBundle
from cmfl_flower.config import TokensConfig
from cmfl_flower.encoder import ClipEncoder
from cmfl_flower.images import to_pixels
from cmfl_flower.progress import QUIET, Progress
from cmfl_flower.prompts import PromptTemplate, substituted

if TYPE_CHECKING:  # the denoising loss brings diffusers; token code needs only its type
    from cmfl_flower.inversion import DenoisingLoss

TokenState = dict[str, torch.Tensor]
Key = TypeVar("Key", int, tuple[int, int])  # a class id, or (class id, cluster set)


def state_key(class_id: int) -> str:
    """The key of a class's vectors in saved state and on the wire (``c<id>``)."""
    return f"c{class_id}"


def set_key(class_id: int, number: int) -> str:
    """The key of a class's cluster set ``number`` (>= 1) in saved state (``c<id>.<number>``)."""
    return f"c{class_id}.{number}"


@dataclass
class TextSide:
    """The CLIP text tower and prompt layout, ready to encode class-token vectors."""

    bundle: ClipBundle
    template: PromptTemplate

    @classmethod
    def build(cls, bundle: ClipBundle, template: str) -> TextSide:
        """Tokenise ``template`` with the bundle's tokenizer."""
        if not hasattr(bundle.model, "token_embedding"):
            raise ValueError("class tokens need an open_clip CLIP with a built-in text tower")
        return cls(bundle, PromptTemplate.build(bundle.tokenizer, template))

    @property
    def token_dim(self) -> int:
        """Width D of the token embeddings."""
        return int(self.bundle.model.token_embedding.weight.shape[1])

    def name_vectors(self, name: str) -> torch.Tensor:
        """(n, D) pretrained token embeddings of ``name`` (a copy)."""
        ids = torch.tensor(self.bundle.tokenizer.encode(name), device=self.bundle.device)
        if len(ids) == 0:
            raise ValueError(f"class name {name!r} has no tokens")
        table: torch.Tensor = self.bundle.model.token_embedding.weight
        return table[ids].detach().clone()

    def encode(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        """(C, E) unit-norm text features of prompts whose name slots hold ``vectors[c]``.

        vectors[c]: (n_c, D). Gradients flow to the vectors only.
        """
        model = self.bundle.model
        ids, mask = self.template.layout(
            [len(v) for v in vectors], int(model.positional_embedding.shape[0]), pad_id=0
        )
        flat = torch.cat([v.to(self.bundle.device) for v in vectors])  # (K, D)
        with substituted(model.token_embedding, mask, flat):
            features: torch.Tensor = model.encode_text(ids.to(self.bundle.device), normalize=True)
        return features


class _KeyedVectors(torch.nn.Module, Generic[Key]):
    """Learnable ``(n, D)`` vectors, one tensor per key, held in sorted key order."""

    def __init__(self, vectors: dict[Key, torch.Tensor]) -> None:
        super().__init__()
        self.keys: list[Key] = sorted(vectors)
        self.vectors = torch.nn.ParameterList(
            torch.nn.Parameter(vectors[key].detach().clone().float()) for key in self.keys
        )

    def _of(self, key: Key) -> torch.Tensor:
        """(n, D) vectors of ``key``."""
        vectors: torch.Tensor = self.vectors[self.keys.index(key)]
        return vectors

    def _copies(self) -> dict[Key, torch.Tensor]:
        """CPU copies of every key's vectors."""
        return {
            key: v.detach().to("cpu", copy=True)
            for key, v in zip(self.keys, self.vectors, strict=True)
        }


class ClassTokenBank(_KeyedVectors[int]):
    """Learnable name-token vectors for a client's classes, always in sorted class order."""

    @property
    def class_ids(self) -> list[int]:
        """The bank's classes, sorted."""
        return self.keys

    @classmethod
    def from_names(
        cls, text: TextSide, class_ids: list[int], class_names: tuple[str, ...]
    ) -> ClassTokenBank:
        """Initialise each class from the pretrained embeddings of its name."""
        return cls({c: text.name_vectors(class_names[c]) for c in class_ids})

    @classmethod
    def from_state(cls, state: TokenState) -> ClassTokenBank:
        """Rebuild a bank saved with :meth:`state` (cluster sets' keys are skipped)."""
        return cls(
            {int(key.removeprefix("c")): value for key, value in state.items() if "." not in key}
        )

    def state(self) -> TokenState:
        """CPU copies of the vectors, keyed ``c<class id>``."""
        return {state_key(c): v for c, v in self._copies().items()}

    def get(self, class_id: int) -> torch.Tensor:
        """(n, D) vectors of ``class_id``."""
        return self._of(class_id)


class ClusterSets(_KeyedVectors[tuple[int, int]]):
    """Per bank class, ``K`` vector sets; set ``k`` learns the ``k``-th cluster of its images.

    Keys are ``(class id, set number >= 1)``.
    """

    @classmethod
    def for_bank(cls, bank: ClassTokenBank, state: TokenState | None, k: int) -> ClusterSets:
        """Sets 1..k of every bank class: as saved in ``state``, else the class's vectors."""
        saved = state or {}
        return cls(
            {
                (c, n): saved.get(set_key(c, n), bank.get(c))
                for c in bank.class_ids
                for n in range(1, k + 1)
            }
        )

    def get(self, class_id: int, number: int) -> torch.Tensor:
        """(n, D) vectors of ``class_id``'s set ``number``."""
        return self._of((class_id, number))

    def state(self) -> TokenState:
        """CPU copies of the sets, keyed ``c<class id>.<set>``."""
        return {set_key(c, n): v for (c, n), v in self._copies().items()}

    def arrays(self) -> dict[tuple[int, int], np.ndarray]:
        """The sets as the wire sends them: (class id, set) -> (n, D) float32."""
        return {key: v.float().numpy() for key, v in self._copies().items()}


def cluster_numbers(
    features: torch.Tensor, labels: np.ndarray, class_ids: list[int], k: int, seed: int
) -> np.ndarray:
    """(N,) each image's cluster set, 1..k, among its class's images; 0 outside ``class_ids``.

    k-means (scikit-learn, seeded) on ``features`` (N, E), the pretrained CLIP's features, so a
    client's clusters stay the same from round to round. A class with fewer than ``k`` images
    fills only as many sets as it has images; the rest learn nothing.
    """
    from sklearn.cluster import KMeans  # only clients with tokens.clusters >= 2 need it

    numbers = np.zeros(len(labels), np.int64)
    points = features.detach().float().cpu().numpy()
    for class_id in class_ids:
        rows = np.flatnonzero(labels == class_id)
        if not len(rows):
            continue
        n_clusters = min(k, len(rows))
        kmeans = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed)
        numbers[rows] = kmeans.fit_predict(points[rows]) + 1
    return numbers


def class_vectors(
    text: TextSide,
    bank: ClassTokenBank,
    class_names: tuple[str, ...],
    fallback: dict[int, torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """(n_c, D) vectors for every class: the bank's, else ``fallback``'s, else the name's."""
    fallback = fallback or {}
    vectors = []
    for class_id, name in enumerate(class_names):
        if class_id in bank.class_ids:
            vectors.append(bank.get(class_id))
        elif class_id in fallback:
            vectors.append(fallback[class_id])
        else:
            vectors.append(text.name_vectors(name))
    return vectors


@torch.no_grad()
def image_features(encoder: ClipEncoder, images: np.ndarray, batch_size: int) -> torch.Tensor:
    """(N, E) unit-norm image features; images: (N, H, W, 3) uint8."""
    chunks = [
        encoder.encode_images(to_pixels(images[start : start + batch_size], encoder.bundle))
        for start in range(0, len(images), batch_size)
    ]
    return torch.cat(chunks)


_PRETRAINED: weakref.WeakKeyDictionary[ClipEncoder, dict[bytes, torch.Tensor]] = (
    weakref.WeakKeyDictionary()
)
KEPT_FEATURE_SETS = 32  # per encoder: a simulation's clients in one process; the oldest go first


def pretrained_features(encoder: ClipEncoder, images: np.ndarray, batch_size: int) -> torch.Tensor:
    """(N, E) :func:`image_features` under the pretrained CLIP (no LoRA), kept per encoder.

    The pretrained weights never train, so the same images keep the same features from round to
    round: a client's own images are encoded once per process (keyed by a digest of their bytes),
    not every round for screening and again for clustering. At most :data:`KEPT_FEATURE_SETS`
    image sets are kept per encoder, so a long-lived process does not grow with every partition
    it serves. Read-only: callers index, never write.
    """
    digest = hashlib.blake2b(np.ascontiguousarray(images).tobytes(), digest_size=16).digest()
    kept = _PRETRAINED.setdefault(encoder, {})
    if digest not in kept:
        while len(kept) >= KEPT_FEATURE_SETS:
            del kept[next(iter(kept))]  # the set encoded longest ago
        with encoder.pretrained():
            kept[digest] = image_features(encoder, images, batch_size)
    return kept[digest]


@dataclass
class TokenObjective:
    """What a round's token training minimises (``tokens.objective``), with its inputs.

    ``features`` (N, E) fixed image features drive CLIP's cross-entropy; ``denoising`` the
    generator's loss on the same N images; ``anchors`` the pretrained name embedding of each
    bank class; ``fallback`` the text side of classes the bank lacks.
    """

    labels: np.ndarray  # (N,) class ids over the class names
    anchors: dict[int, torch.Tensor]  # class id -> (n, D) pretrained name embedding
    features: torch.Tensor | None = None
    denoising: DenoisingLoss | None = None
    fallback: dict[int, torch.Tensor] | None = None


def relative_sq_distances(bank: ClassTokenBank, anchors: dict[int, torch.Tensor]) -> torch.Tensor:
    """(C,) ``||v - a||^2 / ||a||^2`` per bank class (a: the name's pretrained embedding)."""
    terms = []
    for class_id, vectors in zip(bank.class_ids, bank.vectors, strict=True):
        anchor = anchors[class_id].to(vectors)
        terms.append(((vectors - anchor) ** 2).sum() / (anchor**2).sum().clamp_min(1e-12))
    return torch.stack(terms)


def token_drift(bank: ClassTokenBank, anchors: dict[int, torch.Tensor]) -> float:
    """Mean over the bank's classes of how far the tokens moved, relative to the name's norm."""
    with torch.no_grad():
        return float(relative_sq_distances(bank, anchors).sqrt().mean())


def train_bank(
    text: TextSide,
    bank: ClassTokenBank,
    objective: TokenObjective,
    class_names: tuple[str, ...],
    cfg: TokensConfig,
    seed: int,
    progress: Progress = QUIET,
) -> float:
    """Minimise ``cfg.objective`` (+ the anchor) over the bank's vectors only. Mean loss.

    Batches run over the N images of ``objective``; the CLIP term needs ``features``, the
    diffusion term ``denoising`` (it uses the images of the bank's classes only). A bank with
    no class trains nothing (NaN loss).
    """
    if not bank.class_ids:
        return float("nan")
    use_clip = cfg.objective in ("clip", "both")
    use_diffusion = cfg.objective in ("diffusion", "both")
    if (use_clip and objective.features is None) or (use_diffusion and objective.denoising is None):
        raise ValueError(f"tokens.objective = {cfg.objective!r} lacks its inputs")
    optimizer = torch.optim.AdamW(bank.parameters(), lr=cfg.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    labels = objective.labels
    losses: list[float] = []
    rows = np.arange(len(labels))
    total = cfg.epochs * -(-len(labels) // cfg.batch_size)
    with torch.enable_grad():
        for idx in progress.over(_batches(rows, cfg, generator), total, "tokens"):
            terms = []
            if use_clip:
                terms.append(_clip_loss(text, bank, objective, class_names, idx))
            learned = idx[np.isin(labels[idx], bank.class_ids)]  # images of bank classes
            if use_diffusion and len(learned):
                assert objective.denoising is not None
                vectors = [bank.get(int(c)) for c in labels[learned]]
                weight = cfg.diffusion_weight if use_clip else 1.0
                terms.append(weight * objective.denoising(vectors, learned, generator))
            if cfg.anchor > 0:
                terms.append(cfg.anchor * relative_sq_distances(bank, objective.anchors).mean())
            if not terms:
                continue
            loss = torch.stack([term.to(bank.vectors[0].device) for term in terms]).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    return float(np.mean(losses)) if losses else float("nan")


def _batches(
    rows: np.ndarray, cfg: TokensConfig, generator: torch.Generator
) -> Iterator[np.ndarray]:
    """``cfg.epochs`` shuffled passes over ``rows`` in batches of ``cfg.batch_size``."""
    for _ in range(cfg.epochs):
        order = rows[torch.randperm(len(rows), generator=generator).numpy()]
        for start in range(0, len(order), cfg.batch_size):
            yield order[start : start + cfg.batch_size]


def train_sets(
    sets: ClusterSets,
    denoising: DenoisingLoss,
    labels: np.ndarray,
    numbers: np.ndarray,
    cfg: TokensConfig,
    seed: int,
    progress: Progress = QUIET,
) -> float:
    """Textual inversion of each cluster set on its images; the mean denoising loss.

    ``labels`` and ``numbers`` (:func:`cluster_numbers`): (N,) over the images ``denoising``
    holds; an image of set 0 trains nothing. Epochs, batch size and learning rate are the
    class tokens' (``tokens.*``).
    """
    rows = np.flatnonzero(numbers > 0)
    if not len(rows):
        return float("nan")
    optimizer = torch.optim.AdamW(sets.parameters(), lr=cfg.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    total = cfg.epochs * -(-len(rows) // cfg.batch_size)
    with torch.enable_grad():
        for idx in progress.over(_batches(rows, cfg, generator), total, "cluster sets"):
            vectors = [sets.get(int(labels[i]), int(numbers[i])) for i in idx]
            loss = denoising(vectors, idx, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    return float(np.mean(losses))


def _clip_loss(
    text: TextSide,
    bank: ClassTokenBank,
    objective: TokenObjective,
    class_names: tuple[str, ...],
    idx: np.ndarray,
) -> torch.Tensor:
    """CLIP's cross-entropy over image-text logits for the images ``idx``."""
    assert objective.features is not None
    features = objective.features[torch.from_numpy(idx).to(objective.features.device)]
    target = torch.from_numpy(objective.labels[idx]).to(features.device)
    scale = text.bundle.model.logit_scale.exp().detach()
    text_features = text.encode(class_vectors(text, bank, class_names, objective.fallback))
    logits = scale * features @ text_features.T  # (B, C)
    return F.cross_entropy(logits, target)
