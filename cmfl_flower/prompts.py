"""Prompts whose class-name tokens are replaced by learned vectors.

A prompt such as ``"a photo of a {name}."`` is laid out as token ids
``[SOT] prefix [slot] * n suffix [EOT] pad ...``; the ``n`` slot positions then receive the
class-token vectors through a forward hook on the text tower's token-embedding module (no
library class is patched). The tower's own forward runs unchanged, so its pooling finds the
EOT token wherever the slots end, whatever ``n`` is.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch

DEFAULT_TEMPLATE = "a photo of a {name}."
SLOT_TEXT = "x"  # token id put in the slots before substitution (any id below EOT works)


class BpeTokenizer(Protocol):
    """The part of a CLIP BPE tokenizer we use (open_clip's ``SimpleTokenizer``)."""

    sot_token_id: int
    eot_token_id: int

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` without start/end tokens."""
        ...


@dataclass(frozen=True)
class PromptTemplate:
    """A template with one ``{name}`` field, tokenised around it."""

    prefix: tuple[int, ...]  # ids before the name
    suffix: tuple[int, ...]  # ids after the name
    slot_id: int
    sot: int
    eot: int

    @classmethod
    def build(cls, tokenizer: BpeTokenizer, template: str = DEFAULT_TEMPLATE) -> PromptTemplate:
        """Tokenise ``template`` around its single ``{name}`` field."""
        if template.count("{name}") != 1:
            raise ValueError(f"tokens.template must contain '{{name}}' once, got {template!r}")
        before, after = template.split("{name}")
        return cls(
            prefix=tuple(tokenizer.encode(before)),
            suffix=tuple(tokenizer.encode(after)),
            slot_id=tokenizer.encode(SLOT_TEXT)[0],
            sot=tokenizer.sot_token_id,
            eot=tokenizer.eot_token_id,
        )

    def max_slots(self, context_length: int) -> int:
        """How many name tokens fit in a context of ``context_length``."""
        return context_length - len(self.prefix) - len(self.suffix) - 2

    def layout(
        self, num_slots: list[int], context_length: int, pad_id: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, L) and a slot mask (B, L) for prompts with ``num_slots[b]`` slots."""
        ids = torch.full((len(num_slots), context_length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(num_slots), context_length), dtype=torch.bool)
        for row, n in enumerate(num_slots):
            if not 1 <= n <= self.max_slots(context_length):
                raise ValueError(
                    f"{n} name tokens do not fit a context of {context_length} "
                    f"(1..{self.max_slots(context_length)} allowed)"
                )
            tokens = [self.sot, *self.prefix, *([self.slot_id] * n), *self.suffix, self.eot]
            ids[row, : len(tokens)] = torch.tensor(tokens)
            start = 1 + len(self.prefix)
            mask[row, start : start + n] = True
        return ids, mask


@contextmanager
def substituted(
    embedding: torch.nn.Module, mask: torch.Tensor, vectors: torch.Tensor
) -> Iterator[None]:
    """While active, ``embedding`` outputs ``vectors`` at the ``mask`` positions.

    mask: (B, L) bool with K true entries, in row-major order; vectors: (K, D).
    """

    def hook(_module: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        if output.shape[:2] != mask.shape:
            raise RuntimeError(f"embedding output {tuple(output.shape)} does not fit the mask")
        out = output.clone()  # (B, L, D)
        out[mask.to(out.device)] = vectors.to(out.dtype)
        return out

    handle = embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
