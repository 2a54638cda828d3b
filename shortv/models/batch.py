"""A batch on its way through a model, stage by stage: each prompt `Encoded` (text ids
and preprocessed images), the batch `Prepared` for the decoder (embeddings, token types
and positions, left-padded), and the batch's `DecodeState` between decode steps.

Plain data (the state's cache aside): the model (`shortv.models.assembly`) makes and
reads them, and the code that drives a model (`shortv.generate`, the server's engine)
passes them along, without either side importing the other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import InputError
from ..tokenizer import IMAGE_TOKEN
from .kv_cache import SlotCache


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
    """Sequences between decode steps: their `SlotCache`, the next RoPE position of every
    slot ([slots, 1]; M-RoPE: [slots, 1, 3]), each slot's prompt length (0 for a free
    slot), and how many new tokens fit (the prefill's max_new_tokens, or less where the
    context runs out; a server keeps a budget per request instead).

    A step feeds one token to each of the slots [0, B) (`VisionLanguageModule.step`); a
    prefill `into` a state writes its prompts into free slots, and `free` lets a finished
    sequence's slot go, so sequences join and leave between steps (continuous batching)
    without copying each other's keys."""

    cache: SlotCache
    positions: Tensor
    prompt_lengths: list[int]
    budget: int

    @property
    def slots(self) -> int:
        return self.cache.slots

    def free(self, slots: Sequence[int]) -> None:
        """The sequences in `slots` are done: their slots take the next ones."""
        self.cache.free(slots)
        for slot in slots:
            self.prompt_lengths[slot] = 0

    def rows_needed(self) -> int:
        """The fewest rows a step must run on to cover every live slot (0 when none is)."""
        live = self.cache.in_use.nonzero()
        return int(live[-1]) + 1 if len(live) else 0
