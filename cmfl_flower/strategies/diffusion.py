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

from cmfl_flower.aggregate import weighted_mean
from cmfl_flower.config import AppConfig
from cmfl_flower.diffusion import check_arrays
from cmfl_flower.diffusion_server import DiffusionPublisher, ModelKind
from cmfl_flower.results import Row, RunRecorder
from cmfl_flower.strategies.base import Arrays, CmflStrategy


class FedAvgDiffusion(CmflStrategy):
    """FedAvg over the whole diffusion UNet, weighted by the number of training images."""

    task = "diffusion-fedavg"

    def __init__(self, cfg: AppConfig, recorder: RunRecorder) -> None:
        super().__init__(cfg, recorder)
        self.global_arrays: Arrays | None = None
        self.publisher = DiffusionPublisher(cfg, recorder.run_dir, self.kind())
        self._collected: list[tuple[Arrays, float]] = []
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

    def arrays_for(self, server_round: int, node_id: int) -> Arrays | None:
        """The global weights (created on first use)."""
        if self.global_arrays is None and server_round == 1:
            self.global_arrays = self.initial_arrays()
        return self.global_arrays

    def absorb(self, server_round: int, node_id: int, row: Row, arrays: Arrays) -> str | None:
        """Keep a reply's weights and example count for this round's average."""
        self._received += int(row.get("bytes-received", 0))
        weight = row.get("num-train")
        if not isinstance(weight, int) or weight <= 0:
            return f"metric 'num-train' missing or not positive: {weight!r}"
        expected = self.global_arrays or (self._collected[0][0] if self._collected else arrays)
        reason = check_arrays(expected, arrays) if arrays else "no weights in the reply"
        if reason is not None:
            return reason
        self._collected.append((arrays, float(weight)))
        return None

    def end_round(self, server_round: int) -> dict[str, Any]:
        """Average, publish (save, render, measure) and log the bytes against the full UNet."""
        averaged = len(self._collected)
        if self._collected:
            self.global_arrays = weighted_mean(self._collected)
        self._collected = []
        out: dict[str, Any] = {"averaged": averaged, "model-bytes": self.publisher.model_bytes()}
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

    def state(self) -> tuple[Arrays, dict[str, Any]]:
        """The global weights (empty before round 1 ends)."""
        return dict(self.global_arrays or {}), {}

    def load_state(self, arrays: Arrays, meta: dict[str, Any]) -> None:
        """Restore the global weights."""
        self.global_arrays = dict(arrays) or None


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
