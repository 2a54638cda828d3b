"""The generation loop: one prefill, then one token at a time with the KV cache.

Batches are left-padded, so every sequence's next token is at the last position; rows
that finish keep decoding (their tokens are ignored) until all have. Generation stops at
EOS, at a stop string (the template's and the caller's) or after max_new_tokens. The loop
talks to the model through its prefill / step interface only.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..errors import InputError
from .sampling import GenerationOptions, make_generator, pick
from .text import TextAssembler

if TYPE_CHECKING:
    from ..llava import Encoded, LLaVA


@dataclass
class GenerationResult:
    """One answer: its text, the generated ids (EOS excluded), why it ended ("eos",
    "stop" or "length"), and the prompt's length in tokens after image expansion.

    Timings are those of the whole batch the answer was generated in: `prefill_seconds`
    until the first token was known (vision tower + prefill), `decode_seconds` for the
    steps after it."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0


def generate(model: LLaVA, batch: Sequence[Encoded], options: GenerationOptions) -> list[GenerationResult]:
    """Answers for a batch of encoded prompts, in input order."""
    assemblers = [_assembler(model, options) for _ in batch]
    reasons: list[str | None] = [None] * len(batch)
    start = time.perf_counter()
    first_token_at = None
    steps = token_steps(model, batch, options)
    prompt_lengths = next(steps)
    for tokens in steps:  # each step's ids reach the host, so the clock sees finished work
        first_token_at = first_token_at or time.perf_counter()
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
    end = time.perf_counter()
    first_token_at = first_token_at or end
    return [
        GenerationResult(a.final(), a.ids, r or "length", n, first_token_at - start, end - first_token_at)
        for a, r, n in zip(assemblers, reasons, prompt_lengths, strict=True)
    ]


def stream(model: LLaVA, encoded: Encoded, options: GenerationOptions) -> Iterator[str]:
    """Text pieces of one answer as they settle; they join to `generate`'s text."""
    assembler = _assembler(model, options)
    sent = ""
    steps = token_steps(model, [encoded], options)
    next(steps)
    for (token,) in steps:
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


def _assembler(model: LLaVA, options: GenerationOptions) -> TextAssembler:
    model.require_tokenizer()
    stops = tuple(s for s in (*model.template.stop_strings, *options.stop) if s)
    return TextAssembler(model.tokenizer.decode, stops)


@torch.inference_mode()
def token_steps(
    model: LLaVA, batch: Sequence[Encoded], options: GenerationOptions
) -> Iterator[list[int]]:
    """First the prompt lengths (tokens after image expansion), then the next token of
    every sequence, step by step; the caller decides when to stop."""
    if not batch:
        raise InputError("nothing to generate for: the batch is empty")
    logits, state = model.prefill(batch, max_new_tokens=options.max_new_tokens)
    yield state.prompt_lengths
    generator = make_generator(options.seed, model.device)
    for step in range(state.budget):
        token = pick(logits, options, generator)
        yield token.tolist()
        if step + 1 < state.budget:
            logits = model.step(state, token)
