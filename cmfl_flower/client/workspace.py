"""What a client round works with: its data, the process-wide encoder and the text side.

:func:`open_workspace` loads them (the encoder once per process, see
:func:`cmfl_flower.encoder.load_encoder`) and activates the client's adapter; :func:`evaluate`
scores a round. The types a routine receives and returns are :mod:`cmfl_flower.client.task`'s.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from cmfl_flower.aliases import Metrics
from cmfl_flower.backbones import resolve_device, resolve_preset
from cmfl_flower.client.task import ClientTask, client_seed
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
from cmfl_flower.data.sites import load_eval_folder, load_site
from cmfl_flower.encoder import (
    ClipEncoder,
    LoraSpec,
    LoraState,
    TrainingSet,
    accuracy,
    load_encoder,
)
from cmfl_flower.paths import client_dir, output_root
from cmfl_flower.progress import Progress
from cmfl_flower.report import SITE_CLASS, write_label_counts, write_sample_grid
from cmfl_flower.tokens import TextSide

if TYPE_CHECKING:
    from cmfl_flower.generation import GeneratedImages


def data_root(cfg: DataConfig) -> Path:
    """``data.dir``, else the default data root."""
    return Path(cfg.dir).expanduser() if cfg.dir else default_data_root()


def data_dir(cfg: DataConfig, num_partitions: int) -> Path:
    """The prepared partition directory (prepared on first use for the offline default)."""
    return ensure_partitions(PartitionSpec.from_settings(cfg, num_partitions), data_root(cfg))


def client_data(cfg: DataConfig, task: ClientTask) -> tuple[ClientData, LabeledImages | None]:
    """The client's train and test splits, and the set ``global-acc`` is measured on.

    A site's own folder (node config ``data-path``, class ids from ``data.classes``), else its
    prepared partition. The global set: the node's ``eval-path`` folder if given, else the
    prepared dataset's global test set; a site without ``eval-path`` has none (None).
    """
    classes = cfg.class_list
    if task.data_path and not classes:
        raise ValueError(
            "node config data-path needs the run config's data.classes: the federation's "
            "class names in order, e.g. --run-config \"data.classes='cat,dog,bird'\""
        )
    evaluation = None
    if task.eval_path:
        if not classes:
            raise ValueError("node config eval-path needs the run config's data.classes")
        evaluation = load_eval_folder(Path(task.eval_path), classes, cfg.image_size, data_root(cfg))
    if task.data_path:
        return load_site(Path(task.data_path), classes, cfg.image_size, data_root(cfg)), evaluation
    directory = data_dir(cfg, task.num_partitions)
    data = load_partition(directory, task.partition_id)
    if classes and classes != data.train.class_names:
        raise ValueError(
            f"data.classes ({', '.join(classes)}) differs from the classes of {cfg.dataset!r} "
            f"({', '.join(data.train.class_names)}): leave it empty or give those"
        )
    return data, evaluation if evaluation is not None else _global_test(directory)


@cache
def _global_test(directory: Path) -> LabeledImages:
    """The global test set, read once per process (it is the same for every client)."""
    return load_global_test(directory)


def _split_validation(
    cfg: DataConfig, task: ClientTask, data: ClientData
) -> tuple[ClientData, LabeledImages | None]:
    """The client's data without its held-out split, and the split ``val-acc`` measures."""
    if cfg.validation_fraction == 0:
        return data, None
    train, own = _held_out(data.train, cfg, task.partition_id)
    data = replace(data, train=train)
    if cfg.validation_scope == "own":
        return data, own
    if task.data_path:
        raise ValueError(
            "data.validation-scope = 'pooled' reads every partition: a site with its own "
            "folder (data-path) can only use 'own'"
        )
    directory = data_dir(cfg, task.num_partitions)
    return data, _pooled_validation(directory, cfg, task.num_partitions)


def _held_out(
    train: LabeledImages, cfg: DataConfig, partition_id: int
) -> tuple[LabeledImages, LabeledImages]:
    """(rest, held out) of a partition's training images, seeded by data seed and partition."""
    return holdout(train, cfg.validation_fraction, cfg.seed * 1_000_003 + partition_id)


@cache
def _pooled_validation(directory: Path, cfg: DataConfig, num_partitions: int) -> LabeledImages:
    """Every partition's held-out split together, read once per process."""
    held = [_held_out(load_partition(directory, p).train, cfg, p)[1] for p in range(num_partitions)]
    return LabeledImages(
        np.concatenate([h.images for h in held]),  # (N, H, W, 3)
        np.concatenate([h.labels for h in held]),  # (N,)
        held[0].class_names,
    )


@dataclass
class Workspace:
    """Everything a round works with: data, the shared encoder, the text side."""

    cfg: AppConfig
    task: ClientTask
    data: ClientData
    global_test: LabeledImages | None  # None: a site without an evaluation folder
    encoder: ClipEncoder
    text: TextSide
    validation: LabeledImages | None = None  # held out of the training images
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def class_names(self) -> tuple[str, ...]:
        """Names the client knows the classes by, index = label id (``data.class-names``)."""
        real = self.real_class_names
        return opaque_names(len(real)) if self.cfg.data.class_names == "opaque" else real

    @property
    def real_class_names(self) -> tuple[str, ...]:
        """The classes' real names (the dataset's, or ``data.classes``), index = label id."""
        return self.data.train.class_names

    @property
    def seed(self) -> int:
        """The client's seed for the round."""
        return client_seed(self.cfg, self.task)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a phase; reported as ``seconds-<name>`` (summed if it runs again)."""
        start = time.perf_counter()
        yield
        key = f"seconds-{name}"
        self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - start

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

    def save_artifacts(
        self, generated: GeneratedImages | None = None, screened: np.ndarray | None = None
    ) -> None:
        """Write the partition's label counts and the round's sample grid, if any.

        ``screened``: (N,) bool, the generated images screening left out (crossed out). The
        pictures are for people: a folder this machine cannot write is logged, not fatal.
        """
        directory = self.artifacts
        if directory is None:
            return
        try:
            self._write_artifacts(directory, generated, screened)
        except OSError as err:
            logging.getLogger(__name__).warning("client artifacts not written: %s", err)

    def _write_artifacts(
        self, directory: Path, generated: GeneratedImages | None, screened: np.ndarray | None
    ) -> None:
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
                screened,
                from_names=generated.senders == task.partition_id,  # never a peer's id
            )

    def local_set(self) -> TrainingSet:
        """The local training images at the CLIP's size, weight 1."""
        train = self.data.train
        return TrainingSet.mix(self.encoder.bundle.image_size, (train.images, train.labels))


def open_workspace(cfg: AppConfig, task: ClientTask, lora: LoraState | None) -> Workspace:
    """Load the client's data and activate its adapter on the process-wide encoder."""
    data, global_test = client_data(cfg.data, task)  # before the encoder: data errors first
    device = resolve_device(cfg.backbone.device)
    spec = LoraSpec.from_config(cfg.encoder)
    start = time.perf_counter()  # the model loads of a round are its seconds-load, not its work
    encoder = load_encoder(resolve_preset(cfg.backbone), str(device), cfg.seed, spec)
    load_seconds = time.perf_counter() - start
    encoder.load_lora_state(lora if lora is not None else encoder.init_state)
    data, validation = _split_validation(cfg.data, task, data)
    return Workspace(
        cfg=cfg,
        task=task,
        data=data,
        global_test=global_test,
        encoder=encoder,
        text=TextSide.build(encoder.bundle, cfg.tokens.template),
        validation=validation,
        timings={"seconds-load": load_seconds},
    )


def evaluate(ws: Workspace, text_features: torch.Tensor) -> Metrics:
    """Accuracy on the client's own test split and on the global test set."""
    batch = ws.cfg.encoder.eval_batch_size
    test, glob = ws.data.test, ws.global_test
    with ws.phase("eval"):
        metrics = {
            "local-acc": accuracy(ws.encoder, test.images, test.labels, text_features, batch),
        }
        if glob is not None:
            metrics["global-acc"] = accuracy(
                ws.encoder, glob.images, glob.labels, text_features, batch
            )
        if ws.validation is not None and len(ws.validation):
            val = ws.validation
            metrics["val-acc"] = accuracy(ws.encoder, val.images, val.labels, text_features, batch)
        return metrics


def base_metrics(ws: Workspace) -> Metrics:
    """Who replied and how much data it holds (a site: ``site-class-<id>`` training images)."""
    metrics: Metrics = {
        "partition-id": ws.task.partition_id,
        "num-train": len(ws.data.train),
        "num-test": len(ws.data.test),
    }
    if ws.task.data_path:  # a site's own folder: which classes it holds, for the report
        counts = np.bincount(ws.data.train.labels, minlength=len(ws.real_class_names))
        metrics |= {f"{SITE_CLASS}{c}": int(n) for c, n in enumerate(counts)}  # equal key sets
    return metrics
