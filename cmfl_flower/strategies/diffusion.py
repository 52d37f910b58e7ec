"""``fedavg-diffusion`` and ``fedlora-diffusion``: federated training of a diffusion UNet.

``fedavg-diffusion`` (FedAvg pre-training): the server holds the whole UNet (a pixel DDPM,
or the preset's text-conditional UNet with ``diffusion.model = "conditional"``) and sends it
to the sampled clients every round; each trains it for ``diffusion.local-steps`` steps on its
images and sends it back with ``num-train``; the server takes the example-weighted mean.

``fedlora-diffusion`` (federated LoRA fine-tuning): only a LoRA on the attention projections
of the preset's UNet travels. Round 1 sends nothing (every client starts from the same seeded
adapter, whose B matrices are zero); then the averaged adapter.

After each round the server saves the global model for diffusers, renders a sample grid and
measures its Fréchet distance (:class:`~cmfl_flower.diffusion_server.DiffusionPublisher`);
the round log shows the bytes on the wire beside the full UNet's size (``model-bytes``).
"""

from __future__ import annotations

from logging import INFO
from typing import Any

from flwr.common.logger import log

from cmfl_flower.config import AppConfig
from cmfl_flower.diffusion_server import DiffusionPublisher, ModelKind
from cmfl_flower.results import Row, RunRecorder
from cmfl_flower.strategies.averaging import WeightAveraging
from cmfl_flower.strategies.base import Arrays


class FedAvgDiffusion(WeightAveraging):
    """FedAvg over the whole diffusion UNet, weighted by the number of training images."""

    task = "diffusion-fedavg"

    def __init__(self, cfg: AppConfig, recorder: RunRecorder) -> None:
        super().__init__(cfg, recorder)
        self.publisher = DiffusionPublisher(cfg, recorder.run_dir, self.kind())
        self._received = 0

    def kind(self) -> ModelKind:
        """Which model the clients train."""
        return self.cfg.diffusion.model

    def initial_arrays(self) -> Arrays | None:
        """What round 1 sends: the server's initial UNet."""
        return self.publisher.initial_unet()

    def summary(self) -> None:
        """Log the settings; refuse a bad evaluation setup before any client works."""
        super().summary()
        self.publisher.check()
        d = self.cfg.diffusion
        log(
            INFO,
            "%s: model=%s local-steps=%d lr=%g batch=%d",
            self.task,
            self.kind(),
            d.local_steps,
            d.lr,
            d.batch_size,
        )

    def absorb(self, server_round: int, node_id: int, row: Row, arrays: Arrays) -> str | None:
        """Count the reply's bytes, then take it as FedAvg does."""
        self._received += int(row.get("bytes-received", 0))
        return super().absorb(server_round, node_id, row, arrays)

    def end_round(self, server_round: int) -> dict[str, Any]:
        """Average, publish (save, render, measure) and log the bytes against the full UNet."""
        out = super().end_round(server_round) | {"model-bytes": self.publisher.model_bytes()}
        if self.global_arrays is not None:
            out |= self.publish(server_round, self.global_arrays)
        sent, received = sum(self._sent_bytes.values()), self._received
        self._received = 0
        log(
            INFO,
            "round %d: bytes on the wire: sent %s, received %s; full UNet (fp32) %s; %s",
            server_round,
            f"{sent:,}",
            f"{received:,}",
            f"{out['model-bytes']:,}",
            " ".join(f"{k}={v:.4f}" for k, v in out.items() if isinstance(v, float)),
        )
        return out

    def publish(self, server_round: int, arrays: Arrays) -> dict[str, float]:
        """Save and evaluate the new global UNet."""
        return self.publisher.publish_unet(server_round, arrays)


class FedLoraDiffusion(FedAvgDiffusion):
    """FedAvg over a LoRA on the preset UNet's attention projections; only LoRA travels."""

    task = "diffusion-fedlora"

    def kind(self) -> ModelKind:
        """Always the preset's UNet with a LoRA."""
        return "lora"

    def initial_arrays(self) -> Arrays | None:
        """Nothing: clients start from the shared seeded adapter."""
        return None

    def publish(self, server_round: int, arrays: Arrays) -> dict[str, float]:
        """Save the adapter for diffusers and evaluate the pipeline with it."""
        return self.publisher.publish_adapter(server_round, arrays)
