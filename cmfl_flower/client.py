"""What a client does in one round, free of Flower.

Each task takes the run config, who the client is, its saved state and the arrays the server
sent, and returns metrics, the new state and the arrays to send back. The ClientApp only
unpacks the message and calls :func:`run_task`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmfl_flower.backbones import resolve_device, resolve_preset
from cmfl_flower.config import AppConfig, DataConfig
from cmfl_flower.data import (
    ClientData,
    LabeledImages,
    PartitionSpec,
    default_data_root,
    ensure_partitions,
    holdout,
    load_global_test,
    load_partition,
    opaque_names,
)
from cmfl_flower.diffusion import (
    LocalData,
    captions_for,
    fedavg_round,
    fedlora_round,
    limit_images,
)
from cmfl_flower.encoder import (
    ClipEncoder,
    LoraSpec,
    LoraState,
    TrainingSet,
    accuracy,
    load_encoder,
    train_encoder,
)
from cmfl_flower.generation import GeneratedImages, GenerationRequest, Generator, load_generator
from cmfl_flower.inversion import DenoisingLoss
from cmfl_flower.privacy import privatise
from cmfl_flower.progress import Progress
from cmfl_flower.protocol import ROUND_KEY
from cmfl_flower.report import client_dir, write_label_counts, write_sample_grid
from cmfl_flower.results import output_root
from cmfl_flower.tokens import (
    ClassTokenBank,
    TextSide,
    TokenObjective,
    TokenState,
    class_vectors,
    image_features,
    token_drift,
    train_bank,
)
from cmfl_flower.wire import TokenEntry, WireLimits, parse_relay, reply_arrays

Metrics = dict[str, Any]  # scalar values: int | float
Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class ClientTask:
    """Who runs this round, and which round it is."""

    partition_id: int
    num_partitions: int
    server_round: int


@dataclass
class ClientState:
    """What a client keeps between rounds (small; the backbone is shared)."""

    lora: LoraState | None = None
    tokens: TokenState | None = None


@dataclass
class RoundOutput:
    """A round's metrics, the client's updated state and the arrays it sends back."""

    metrics: Metrics
    state: ClientState = field(default_factory=ClientState)
    arrays: Arrays = field(default_factory=dict)


def parse_task(
    node_config: Mapping[str, Any], config: Mapping[str, Any]
) -> tuple[AppConfig, ClientTask]:
    """Read the node's partition and the message's run config and round."""
    missing = [key for key in ("partition-id", "num-partitions") if key not in node_config]
    if missing:
        raise ValueError(
            f"node config lacks {', '.join(missing)}: start the SuperNode with "
            "--node-config 'partition-id=<i> num-partitions=<n>'"
        )
    flat = dict(config)
    server_round = flat.pop(ROUND_KEY, None)
    task = ClientTask(
        partition_id=_as_int("partition-id", node_config["partition-id"]),
        num_partitions=_as_int("num-partitions", node_config["num-partitions"]),
        server_round=_as_int(ROUND_KEY, server_round),
    )
    if not 0 <= task.partition_id < task.num_partitions:
        raise ValueError(
            f"partition-id = {task.partition_id} is outside 0..{task.num_partitions - 1}"
        )
    return AppConfig.from_run_config(flat), task


def _as_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be an integer, got {value!r}")
    return value


def partition_spec(cfg: DataConfig, num_partitions: int) -> PartitionSpec:
    """The partitioning the data config asks for, over ``num_partitions`` clients."""
    return PartitionSpec(
        dataset=cfg.dataset,
        path=cfg.path,
        num_partitions=num_partitions,
        partitioner=cfg.partitioner,
        alpha=cfg.alpha,
        classes_per_client=cfg.classes_per_client,
        min_partition_size=cfg.min_partition_size,
        test_fraction=cfg.test_fraction,
        seed=cfg.seed,
    )


def data_dir(cfg: DataConfig, num_partitions: int) -> Path:
    """The prepared partition directory (prepared on first use for the offline default)."""
    root = Path(cfg.dir).expanduser() if cfg.dir else default_data_root()
    return ensure_partitions(partition_spec(cfg, num_partitions), root)


@cache
def _global_test(directory: Path) -> LabeledImages:
    """The global test set, read once per process (it is the same for every client)."""
    return load_global_test(directory)


def client_seed(cfg: AppConfig, task: ClientTask) -> int:
    """A seed unique to (run seed, round, client)."""
    return (cfg.seed * 1_000_003 + task.server_round * 10_007 + task.partition_id) % 2**31


@dataclass
class Workspace:
    """Everything a round works with: data, the shared encoder, the text side."""

    cfg: AppConfig
    task: ClientTask
    data: ClientData
    global_test: LabeledImages
    encoder: ClipEncoder
    text: TextSide
    validation: LabeledImages | None = None  # held out of the training images
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def class_names(self) -> tuple[str, ...]:
        """Names the client knows the classes by, index = label id (``data.class-names``)."""
        real = self.global_test.class_names
        return opaque_names(len(real)) if self.cfg.data.class_names == "opaque" else real

    @property
    def seed(self) -> int:
        """The client's seed for the round."""
        return client_seed(self.cfg, self.task)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a phase; reported as ``seconds-<name>``."""
        start = time.perf_counter()
        yield
        self.timings[f"seconds-{name}"] = time.perf_counter() - start

    @torch.no_grad()
    def name_features(self, names: tuple[str, ...] | None = None) -> torch.Tensor:
        """(C, E) text features of every class with the pretrained tokens of its name.

        ``names``: the names to use; default the ones the client knows (``class_names``).
        """
        names = self.class_names if names is None else names
        return self.text.encode([self.text.name_vectors(n) for n in names])

    @property
    def progress(self) -> Progress:
        """Progress bars labelled with the client and round (``output.progress``)."""
        label = f"client {self.task.partition_id} round {self.task.server_round}"
        return Progress(self.cfg.output.progress, label)

    @property
    def artifacts(self) -> Path | None:
        """The client's folder of the run directory, on this machine (None: no run name)."""
        run_name = self.cfg.output.run_name  # the server sends the resolved name
        if not run_name:
            return None
        return client_dir(output_root(self.cfg.output) / run_name, self.task.partition_id)

    def save_artifacts(self, generated: GeneratedImages | None = None) -> None:
        """Write the partition's label counts and the round's sample grid, if any.

        The pictures are for people: a folder this machine cannot write is logged, not fatal.
        """
        directory = self.artifacts
        if directory is None:
            return
        try:
            self._write_artifacts(directory, generated)
        except OSError as err:
            logging.getLogger(__name__).warning("client artifacts not written: %s", err)

    def _write_artifacts(self, directory: Path, generated: GeneratedImages | None) -> None:
        train, test = self.data.train.labels, self.data.test.labels
        write_label_counts(directory, self.task.partition_id, self.class_names, train, test)
        if generated is not None and len(generated.labels):
            task = self.task
            write_sample_grid(
                directory,
                task.partition_id,
                task.server_round,
                generated.images,
                generated.labels,
                self.class_names,
            )

    def local_set(self) -> TrainingSet:
        """The local training images at the CLIP's size, weight 1."""
        train = self.data.train
        return TrainingSet.mix(self.encoder.bundle.image_size, (train.images, train.labels, 1.0))


def open_workspace(cfg: AppConfig, task: ClientTask, lora: LoraState | None) -> Workspace:
    """Load the client's data and activate its adapter on the process-wide encoder."""
    directory = data_dir(cfg.data, task.num_partitions)
    device = resolve_device(cfg.backbone.device)
    spec = LoraSpec.from_config(cfg.encoder)
    encoder = load_encoder(resolve_preset(cfg.backbone), str(device), cfg.seed, spec)
    encoder.load_lora_state(lora if lora is not None else encoder.init_state)
    data = load_partition(directory, task.partition_id)
    validation = None
    if cfg.data.validation_fraction > 0:
        seed = cfg.data.seed * 1_000_003 + task.partition_id
        train, validation = holdout(data.train, cfg.data.validation_fraction, seed)
        data = replace(data, train=train)
    return Workspace(
        cfg=cfg,
        task=task,
        data=data,
        global_test=_global_test(directory),
        encoder=encoder,
        text=TextSide.build(encoder.bundle, cfg.tokens.template),
        validation=validation,
    )


def evaluate(ws: Workspace, text_features: torch.Tensor) -> Metrics:
    """Accuracy on the client's own test split and on the global test set."""
    batch = ws.cfg.encoder.eval_batch_size
    test, glob = ws.data.test, ws.global_test
    with ws.phase("eval"):
        metrics = {
            "local-acc": accuracy(ws.encoder, test.images, test.labels, text_features, batch),
            "global-acc": accuracy(ws.encoder, glob.images, glob.labels, text_features, batch),
        }
        if ws.validation is not None and len(ws.validation):
            val = ws.validation
            metrics["val-acc"] = accuracy(ws.encoder, val.images, val.labels, text_features, batch)
        return metrics


def _base_metrics(ws: Workspace) -> Metrics:
    return {
        "partition-id": ws.task.partition_id,
        "num-train": len(ws.data.train),
        "num-test": len(ws.data.test),
    }


def local_only_round(
    cfg: AppConfig, task: ClientTask, state: ClientState, received: Arrays
) -> RoundOutput:
    """Train the vision LoRA on local images only (pretrained class names), then evaluate."""
    ws = open_workspace(cfg, task, state.lora)
    names = ws.name_features()  # (C, E)
    with ws.phase("encoder"):
        loss = train_encoder(
            ws.encoder, ws.local_set(), names, cfg.encoder, ws.seed, progress=ws.progress
        )
    ws.save_artifacts()
    metrics = evaluate(ws, names) | _base_metrics(ws) | {"train-loss": loss}
    return RoundOutput(metrics | ws.timings, ClientState(lora=ws.encoder.lora_state()))


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
    fallback = _received_means(entries) if cfg.tokens.unseen == "received-mean" else None
    return Knowledge(_requests(ws, entries), fallback, len(entries))


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
            _generator(ws), train.images, cfg.tokens.snr_gamma, cfg.encoder.eval_batch_size
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
    cfg: AppConfig, task: ClientTask, state: ClientState, received: Arrays, source: str
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
            (ws.data.train.images, ws.data.train.labels, 1.0),
            (generated.images, generated.labels, cfg.generation.sample_weight),
        )
        encoder_loss = train_encoder(
            ws.encoder, data, before, cfg.encoder, ws.seed, progress=ws.progress
        )
    with ws.phase("tokens"):
        token_metrics = _train_tokens(ws, bank, knowledge)
    metrics = evaluate(ws, text_features()) | _base_metrics(ws) | token_metrics
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
            own = privatise(own, cfg.privacy, np.random.default_rng())
        sent = reply_arrays(own, _labelled(cfg))
    return RoundOutput(metrics | ws.timings, new_state, sent)


def relay_round(
    cfg: AppConfig, task: ClientTask, state: ClientState, received: Arrays
) -> RoundOutput:
    """One CMFL round: generate from peers' tokens, update the encoder, train own tokens."""
    return token_round(cfg, task, state, received, "relay")


def names_generation_round(
    cfg: AppConfig, task: ClientTask, state: ClientState, received: Arrays
) -> RoundOutput:
    """Baseline: generate the classes the client lacks from their names; nothing is sent."""
    return token_round(cfg, task, state, received, "names")


def local_tokens_round(
    cfg: AppConfig, task: ClientTask, state: ClientState, received: Arrays
) -> RoundOutput:
    """Baseline: learned tokens and the vision LoRA on local images only; nothing is sent."""
    return token_round(cfg, task, state, received, "none")


def _labelled(cfg: AppConfig) -> bool:
    return cfg.tokens.relay == "labelled"


def _global_adapter(ws: Workspace, received: Arrays) -> None:
    """Activate the server's averaged adapter (round 1: the shared seeded initialisation)."""
    if not received:
        ws.encoder.load_lora_state(ws.encoder.init_state)
        return
    expected = ws.encoder.init_state
    for key, value in received.items():
        if key in expected and value.shape != tuple(expected[key].shape):
            raise ValueError(
                f"global adapter {key!r}: shape {value.shape}, expected "
                f"{tuple(expected[key].shape)}"
            )
        if not np.isfinite(value).all():
            raise ValueError(f"global adapter {key!r} holds NaN or Inf")
    ws.encoder.load_lora_state({k: torch.from_numpy(np.array(v)) for k, v in received.items()})


def initial_adapter(cfg: AppConfig) -> Arrays:
    """The seeded initial vision adapter every client starts from (built where it is called)."""
    device = str(resolve_device(cfg.backbone.device))
    spec = LoraSpec.from_config(cfg.encoder)
    encoder = load_encoder(resolve_preset(cfg.backbone), device, cfg.seed, spec)
    return {k: v.detach().cpu().numpy().copy() for k, v in encoder.init_state.items()}


def _averaged_round(cfg: AppConfig, task: ClientTask, received: Arrays, mu: float) -> RoundOutput:
    ws = open_workspace(cfg, task, None)
    _global_adapter(ws, received)
    names = ws.name_features()  # (C, E)
    with ws.phase("encoder"):
        loss = train_encoder(
            ws.encoder, ws.local_set(), names, cfg.encoder, ws.seed, mu, ws.progress
        )
    ws.save_artifacts()
    metrics = evaluate(ws, names) | _base_metrics(ws) | {"train-loss": loss}
    arrays = {k: v.numpy() for k, v in ws.encoder.lora_state().items()}
    return RoundOutput(metrics | ws.timings, ClientState(), arrays)


def fedavg_encoder_round(
    cfg: AppConfig, task: ClientTask, state: ClientState, received: Arrays
) -> RoundOutput:
    """Start from the global vision LoRA, train locally, send the adapter back."""
    return _averaged_round(cfg, task, received, 0.0)


def fedprox_encoder_round(
    cfg: AppConfig, task: ClientTask, state: ClientState, received: Arrays
) -> RoundOutput:
    """As :func:`fedavg_encoder_round`, with FedProx's proximal term."""
    return _averaged_round(cfg, task, received, cfg.federation.proximal_mu)


def _diffusion_data(cfg: AppConfig, task: ClientTask) -> LocalData:
    """The client's training images (at most ``diffusion.images-per-client``), captioned."""
    train = load_partition(data_dir(cfg.data, task.num_partitions), task.partition_id).train
    keep = limit_images(
        len(train), cfg.diffusion.images_per_client, cfg.data.seed + task.partition_id
    )
    template = cfg.diffusion.caption_template
    return LocalData(
        train.images[keep], captions_for(train.labels[keep], train.class_names, template)
    )


def _diffusion_round(cfg: AppConfig, task: ClientTask, received: Arrays, lora: bool) -> RoundOutput:
    data = _diffusion_data(cfg, task)
    start = time.perf_counter()
    train = fedlora_round if lora else fedavg_round
    arrays, loss = train(cfg, data, received, client_seed(cfg, task))
    metrics: Metrics = {
        "partition-id": task.partition_id,
        "num-train": len(data.images),
        "train-loss": loss,
        "seconds-diffusion": time.perf_counter() - start,
    }
    return RoundOutput(metrics, ClientState(), arrays)


def diffusion_fedavg_round(
    cfg: AppConfig, task: ClientTask, state: ClientState, received: Arrays
) -> RoundOutput:
    """Train the global diffusion UNet for E local steps on local images; send it back."""
    return _diffusion_round(cfg, task, received, lora=False)


def diffusion_fedlora_round(
    cfg: AppConfig, task: ClientTask, state: ClientState, received: Arrays
) -> RoundOutput:
    """Fine-tune the global UNet LoRA on local image-caption pairs; send the LoRA back."""
    return _diffusion_round(cfg, task, received, lora=True)


Task = Callable[[AppConfig, ClientTask, ClientState, Arrays], RoundOutput]
TASKS: dict[str, Task] = {
    "local-only": local_only_round,
    "cmfl-relay": relay_round,
    "names-generation": names_generation_round,
    "local-only-tokens": local_tokens_round,
    "encoder-fedavg": fedavg_encoder_round,
    "encoder-fedprox": fedprox_encoder_round,
    "diffusion-fedavg": diffusion_fedavg_round,
    "diffusion-fedlora": diffusion_fedlora_round,
}


def run_task(
    name: str, cfg: AppConfig, task: ClientTask, state: ClientState, received: Arrays
) -> RoundOutput:
    """Run the named client routine (the server names it in every message)."""
    if name not in TASKS:
        raise ValueError(f"unknown client task {name!r}; known: {', '.join(sorted(TASKS))}")
    return TASKS[name](cfg, task, state, received)
