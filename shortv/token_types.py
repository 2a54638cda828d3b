"""Token types: the per-position mask that ShortV, LC, FastV and VTW are built on.

The assembly step (`LLaVA.prepare`) produces one type per sequence position next to the
embeddings, and every decoder layer receives it as an explicit argument.
"""

from __future__ import annotations

from enum import IntEnum

import torch


class TokenType(IntEnum):
    TEXT = 0
    VISUAL = 1
    PAD = 2

    @classmethod
    def parse(cls, name: str | TokenType) -> TokenType:
        """'visual' / 'text' (any case) or a TokenType."""
        if isinstance(name, TokenType):
            return name
        try:
            return cls[name.upper()]
        except KeyError:
            from .errors import ConfigError

            raise ConfigError(f"unknown token type {name!r}; use 'visual' or 'text'") from None


TYPE_DTYPE = torch.int8


def count(types: torch.Tensor, kind: TokenType) -> int:
    return int((types == kind).sum())
