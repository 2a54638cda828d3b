"""Text generation: one prefill, then one token at a time with the KV cache.

Batches are left-padded, so every sequence's next token is at the last position; rows
that finish keep decoding (their tokens are ignored) until all have. Greedy decoding by
default; temperature / top-p sampling with an optional seed. Generation stops at EOS, at
a stop string (the template's and the caller's) or after max_new_tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .errors import InputError
from .llama import KVCache
from .token_types import TYPE_DTYPE, TokenType

if TYPE_CHECKING:
    from .llava import Encoded, LLaVA


@dataclass(frozen=True)
class Options:
    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise InputError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class GenerationResult:
    """One answer: its text, the generated ids (EOS excluded), why it ended, and the
    prompt's length in tokens after image expansion."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "eos", "stop" or "length"
    prompt_tokens: int


@dataclass
class TextAssembler:
    """Turns a growing list of token ids into text: strips like original LLaVA, cuts at
    stop strings, and only releases text that later tokens cannot change (an incomplete
    UTF-8 character, or a possible start of a stop string, is held back)."""

    decode: Callable[[list[int]], str]
    stops: tuple[str, ...]
    ids: list[int] = field(default_factory=list)
    text: str = ""
    stopped: bool = False

    def add(self, token: int) -> None:
        self.ids.append(token)
        text = self.decode(self.ids).lstrip()
        found = [at for stop in self.stops if (at := text.find(stop)) >= 0]
        if found:  # the earliest stop string wins, whatever the order they were given in
            text, self.stopped = text[: min(found)], True
        self.text = text

    def final(self) -> str:
        return self.text.strip()

    def settled(self) -> str:
        """The prefix of the text that no later token can change."""
        if self.stopped:
            return self.final()
        text = self.text.rstrip()
        if text.endswith("\ufffd"):
            text = text.rstrip("\ufffd")
        hold = max((k for s in self.stops for k in range(1, len(s))
                    if self.text.endswith(s[:k])), default=0)
        return text[: len(self.text) - hold] if hold else text


def generate(model: LLaVA, batch: Sequence[Encoded], options: Options) -> list[GenerationResult]:
    """Generate for a batch; results in input order."""
    assemblers = [_assembler(model, options) for _ in batch]
    reasons: list[str | None] = [None] * len(batch)
    prompt_lengths: list[int] = []
    for tokens in _tokens(model, batch, options, prompt_lengths):
        for i, token in enumerate(tokens):
            if reasons[i] is not None:
                continue
            if token == model.tokenizer.eos_id:
                reasons[i] = "eos"
                continue
            assemblers[i].add(token)
            if assemblers[i].stopped:
                reasons[i] = "stop"
        if all(r is not None for r in reasons):
            break
    return [
        GenerationResult(a.final(), a.ids, r or "length", n)
        for a, r, n in zip(assemblers, reasons, prompt_lengths, strict=True)
    ]


def stream(model: LLaVA, encoded: Encoded, options: Options) -> Iterator[str]:
    """Text pieces of one answer as they settle; they join to `generate`'s text."""
    assembler = _assembler(model, options)
    sent = ""
    for (token,) in _tokens(model, [encoded], options, []):
        if token == model.tokenizer.eos_id:
            break
        assembler.add(token)
        settled = assembler.settled()
        if settled.startswith(sent) and len(settled) > len(sent):
            yield settled[len(sent):]
            sent = settled
        if assembler.stopped:
            break
    final = assembler.final()
    if final.startswith(sent) and len(final) > len(sent):
        yield final[len(sent):]


def _assembler(model: LLaVA, options: Options) -> TextAssembler:
    if model.tokenizer is None:
        raise InputError("this model has no tokenizer, so it cannot generate text")
    stops = tuple(s for s in (*model.template.stop_strings, *options.stop) if s)
    return TextAssembler(model.tokenizer.decode, stops)


@torch.inference_mode()
def _tokens(
    model: LLaVA, batch: Sequence[Encoded], options: Options, prompt_lengths: list[int]
) -> Iterator[list[int]]:
    """Next tokens for every sequence, step by step (the caller decides when to stop)."""
    if not batch:
        return
    prepared = model.prepare(batch)
    prompt_lengths.extend(prepared.lengths)
    context = model.config.text.max_position_embeddings
    b, t = prepared.types.shape
    budget = min(options.max_new_tokens, context - max(prepared.lengths))
    if budget <= 0:
        return
    cache = KVCache(model.num_layers, capacity=t + budget)
    hidden = model.hidden_states(prepared, cache=cache, last_only=True)
    logits = model.decoder.head(hidden[:, -1])
    positions = torch.tensor(prepared.lengths, device=model.device)[:, None]
    types = torch.full((b, 1), int(TokenType.TEXT), dtype=TYPE_DTYPE, device=model.device)
    generator = _generator(options.seed, model.device)
    for step in range(budget):
        token = _pick(logits, options, generator)
        yield token.tolist()
        if step + 1 == budget:
            return
        x = model.decoder.embed_tokens(token[:, None])
        hidden = model.decoder(x, types, positions, cache=cache, method=model.method)
        logits = model.decoder.head(hidden[:, -1])
        positions = positions + 1


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def _pick(logits: Tensor, options: Options, generator: torch.Generator | None) -> Tensor:
    """Greedy at temperature 0; otherwise sample from the temperature / top-p distribution."""
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
