"""Token types: the per-position mask that ShortV, LC, FastV and VTW are built on.

The assembly step (`LlavaModel.prepare`) produces one type per sequence position next to the
embeddings, and every decoder layer receives it as an explicit argument
(docs/design.md §3).
"""

from __future__ import annotations

from enum import IntEnum

import torch


class TokenType(IntEnum):
    """What a sequence position holds."""

    TEXT = 0
    VISUAL = 1
    PAD = 2


# Small on purpose: one byte per position, compared often, never used in arithmetic.
TYPE_DTYPE = torch.int8
