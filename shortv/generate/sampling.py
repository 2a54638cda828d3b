"""Generation options and how the next token is picked from the logits."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError


@dataclass(frozen=True)
class GenerationOptions:
    """How to generate: greedy by default (temperature 0), as LLaVA's eval scripts do.

    max_new_tokens: at most this many new tokens (fewer when the context runs out).
    temperature / top_p: sampling from the temperature-scaled distribution, restricted to
        the smallest set of most likely tokens whose mass reaches top_p.
    seed: makes sampling reproducible.
    stop: strings that end an answer (besides EOS and the template's own stop string).
    """

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # A single string is one stop string, not a list of characters.
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        try:
            object.__setattr__(self, "stop", tuple(stop))
        except TypeError:
            raise InputError(f"stop must be a list of strings, got {self.stop!r}") from None
        if not all(isinstance(s, str) for s in self.stop):
            raise InputError(f"stop must be a list of strings, got {self.stop!r}")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise InputError(f"max_new_tokens must be an integer, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise InputError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if self.top_p is not None and (not _is_number(self.top_p) or not 0 < self.top_p <= 1):
            raise InputError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise InputError(f"seed must be an integer, got {self.seed!r}")

    @classmethod
    def of(cls, options: GenerationOptions | None = None, **overrides: Any) -> GenerationOptions:
        """`options` (or the defaults) with some fields replaced; unknown names are an error."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise InputError(f"unknown generation option(s) {', '.join(unknown)}; "
                             f"use {', '.join(sorted(names))}")
        if options is not None and not isinstance(options, GenerationOptions):
            raise InputError(f"options must be a GenerationOptions, got {type(options).__name__}")
        return replace(options or cls(), **overrides)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A seeded generator on `device`, or None for the global RNG."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def pick(logits: Tensor, options: GenerationOptions, generator: torch.Generator | None) -> Tensor:
    """Next tokens [B] from logits [B, vocab]: greedy at temperature 0, otherwise sampled
    from the temperature / top-p distribution."""
    if options.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / options.temperature, dim=-1)
    if options.top_p is not None and options.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest set of most likely tokens whose mass reaches top_p.
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= options.top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
