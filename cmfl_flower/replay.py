"""Generated images a client keeps across rounds (``generation.replay-rounds``).

A round's generated images train the vision LoRA once, in that round. With
``generation.replay-rounds = R`` a client also keeps the images its screening accepted in its
last R rounds, in its own saved state, and trains on them again beside the round's new ones:
more synthetic data per round at no more generation. Images of a sender whose sets the round's
screening left out go at once, whenever they were drawn.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

ReplayState = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Replay:
    """Kept generated images with their labels, senders, loss weights and round of drawing."""

    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) int64
    senders: np.ndarray  # (N,) int64
    weights: np.ndarray  # (N,) float32
    rounds: np.ndarray  # (N,) int64, the round each image was generated in

    @classmethod
    def empty(cls) -> Replay:
        """No kept image."""
        ids = np.zeros(0, np.int64)
        return cls(np.zeros((0, 1, 1, 3), np.uint8), ids, ids, np.zeros(0, np.float32), ids)

    @classmethod
    def from_state(cls, state: ReplayState | None) -> Replay:
        """The images saved with :meth:`state` (none for ``None``)."""
        if not state:
            return cls.empty()
        return cls(
            state["images"].numpy(),
            state["labels"].numpy(),
            state["senders"].numpy(),
            state["weights"].numpy(),
            state["rounds"].numpy(),
        )

    def state(self) -> ReplayState | None:
        """Tensors to save in the client's state (``None`` when nothing is kept)."""
        if not len(self.labels):
            return None
        return {
            "images": torch.from_numpy(np.ascontiguousarray(self.images)),
            "labels": torch.from_numpy(self.labels),
            "senders": torch.from_numpy(self.senders),
            "weights": torch.from_numpy(self.weights),
            "rounds": torch.from_numpy(self.rounds),
        }

    def _where(self, keep: np.ndarray) -> Replay:
        return Replay(
            self.images[keep],
            self.labels[keep],
            self.senders[keep],
            self.weights[keep],
            self.rounds[keep],
        )

    def without(self, senders: set[int]) -> Replay:
        """The kept images less those of ``senders`` (screened out this round)."""
        return self._where(~np.isin(self.senders, sorted(senders)))

    def then(
        self,
        new: Replay,
        server_round: int,
        keep_rounds: int,
    ) -> Replay:
        """These images and ``new`` ones, less those drawn ``keep_rounds`` or more rounds ago.

        After round ``t`` the kept images are those of rounds ``t - keep_rounds + 1 .. t``, so
        round ``t + 1`` replays its ``keep_rounds`` previous rounds.
        """
        if not len(new.labels):
            both = self
        elif not len(self.labels):
            both = new
        else:
            both = Replay(
                np.concatenate([self.images, new.images]),
                np.concatenate([self.labels, new.labels]),
                np.concatenate([self.senders, new.senders]),
                np.concatenate([self.weights, new.weights]),
                np.concatenate([self.rounds, new.rounds]),
            )
        return both._where(both.rounds > server_round - keep_rounds)
