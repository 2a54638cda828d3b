"""A batch on its way through a model, stage by stage: each prompt `Encoded` (text ids
and preprocessed images), the batch `Prepared` for the decoder (embeddings, token types
and positions, left-padded), and the batch's `DecodeState` between decode steps.

Plain data: the model (`shortv.models.llava`) makes and reads them, and the code that drives a
model (`shortv.generate`, the server's engine) passes them along, without either side
importing the other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import InputError
from ..tokenizer import IMAGE_TOKEN
from .llama import KVCache


@dataclass(frozen=True)
class Encoded:
    """A tokenized prompt with its preprocessed images.

    input_ids: 1-D LongTensor of text ids with one IMAGE_TOKEN (-200) per image.
    images: per image, [3, S, S] ("pad"/"square") or [1 + tiles, 3, S, S] ("anyres").
    image_sizes: per image, the original (width, height).
    """

    input_ids: Tensor
    images: tuple[Tensor, ...] = ()
    image_sizes: tuple[tuple[int, int], ...] = ()
    prompt: str = ""

    def __post_init__(self) -> None:
        n = int((self.input_ids == IMAGE_TOKEN).sum())
        if n != len(self.images) or len(self.images) != len(self.image_sizes):
            raise InputError(
                f"the prompt has {n} image placeholder(s) but {len(self.images)} image(s) "
                f"and {len(self.image_sizes)} size(s) were given"
            )


@dataclass
class Prepared:
    """A batch ready for the decoder: embeddings, token types and RoPE positions, each
    left-padded to the longest sequence ([B, T, D], [B, T], and [B, T] for 1-D RoPE or
    [B, T, 3] for M-RoPE), the sequences' lengths, and the positions of the token that
    follows each ([B, 1] or [B, 1, 3]; None: each sequence's length)."""

    embeds: Tensor
    types: Tensor
    positions: Tensor
    lengths: list[int] = field(default_factory=list)
    next_positions: Tensor | None = None

    def __post_init__(self) -> None:
        if self.next_positions is None and self.lengths:
            self.next_positions = torch.tensor(self.lengths, device=self.positions.device)[:, None]


@dataclass
class DecodeState:
    """A batch between decode steps: its KV cache, the next RoPE positions [B, 1] (M-RoPE:
    [B, 1, 3]), the
    prompt lengths, and how many new tokens fit (max_new_tokens, or less where the context
    runs out)."""

    cache: KVCache
    positions: Tensor
    prompt_lengths: list[int]
    budget: int

    def join(self, other: DecodeState) -> DecodeState:
        """One batch of this state's sequences followed by `other`'s, each with the room it
        had (continuous batching: a newly prefilled batch joins the running one between
        steps). The next tokens to `step` are this batch's, then other's. The result is
        on a dynamic-mode cache; `budget` is the larger of the two."""
        return DecodeState(self.cache.join(other.cache), torch.cat((self.positions, other.positions)),
                           self.prompt_lengths + other.prompt_lengths, max(self.budget, other.budget))

    def select(self, rows: Sequence[int]) -> DecodeState:
        """The sequences at batch indices `rows`, in that order (finished ones leave)."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.positions.device)
        return DecodeState(self.cache.select(index), self.positions.index_select(0, index),
                           [self.prompt_lengths[i] for i in rows], self.budget)
