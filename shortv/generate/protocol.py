"""What generation needs from a model, as a protocol: any model family that has these
members can be driven by `generate`, `stream`, `token_steps` and the server's engine.
`shortv.LLaVA` is one; the loop never names a family."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor

from ..conversation import Template
from ..models.batch import DecodeState, Encoded
from ..tokenizer import Tokenizer


class GenerativeModel(Protocol):
    """A model that answers prompts token by token.

    template: the conversation template (its stop strings end an answer).
    device: where the next-token logits live (a seeded sampler is made there).
    """

    template: Template

    @property
    def device(self) -> torch.device: ...

    def require_tokenizer(self) -> Tokenizer:
        """The tokenizer (decodes answers, knows EOS), or InputError saying why there is none."""
        ...

    def prefill(self, batch: Sequence[Encoded], *, max_new_tokens: int) -> tuple[Tensor, DecodeState]:
        """Next-token logits [B, vocab] after the prompts, and the state `step` continues
        (its `budget`: how many new tokens fit; its `prompt_lengths`)."""
        ...

    def step(self, state: DecodeState, tokens: Tensor) -> Tensor:
        """Feed one new token per sequence (tokens [B]); next-token logits [B, vocab]."""
        ...
