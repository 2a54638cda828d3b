"""The generation loop: one prefill, then one token at a time with the KV cache.

Batches are left-padded, so every sequence's next token is at the last position; rows
that finish keep decoding (their tokens are ignored) until all have. Generation stops at
EOS, at a stop string (the template's and the caller's) or after max_new_tokens. The loop
talks to the model through `GenerativeModel` (prefill / step) only.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ..errors import InputError
from ..models.batch import Encoded
from .protocol import GenerativeModel
from .sampling import GenerationOptions, make_generator, pick
from .text import TextAssembler


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


def generate(
    model: GenerativeModel, batch: Sequence[Encoded], options: GenerationOptions
) -> list[GenerationResult]:
    """Answers for a batch of encoded prompts, in input order."""
    answers = [Answer.start(model, options) for _ in batch]
    start = time.perf_counter()
    first_token_at = None
    steps = token_steps(model, batch, options)
    prompt_lengths = next(steps)
    for tokens in steps:  # each step's ids reach the host, so the clock sees finished work
        first_token_at = first_token_at or time.perf_counter()
        for answer, token in zip(answers, tokens, strict=True):
            if not answer.done:
                answer.add(token)
        if all(a.done for a in answers):
            break
    end = time.perf_counter()
    first_token_at = first_token_at or end
    return [
        GenerationResult(a.text, a.token_ids, a.reason or "length", n, first_token_at - start,
                         end - first_token_at)
        for a, n in zip(answers, prompt_lengths, strict=True)
    ]


def stream(model: GenerativeModel, encoded: Encoded, options: GenerationOptions) -> Iterator[str]:
    """Text pieces of one answer as they settle; they join to `generate`'s text."""
    answer = Answer.start(model, options)
    steps = token_steps(model, [encoded], options)
    next(steps)
    for (token,) in steps:
        answer.add(token)
        if answer.done:
            break
        if piece := answer.release():
            yield piece
    if piece := answer.release(final=True):
        yield piece


@dataclass
class Answer:
    """One answer as its tokens arrive: the text so far (`TextAssembler`), why it ended
    (`reason`: "eos" or "stop"; None while it may go on, or when only the budget ends it)
    and, for streaming, how much text has been released. `generate`, `stream` and the
    server's batching engine (`shortv.serve.engine`) all build answers with it."""

    assembler: TextAssembler
    eos_id: int | None
    reason: str | None = None
    sent: str = ""

    @classmethod
    def start(cls, model: GenerativeModel, options: GenerationOptions) -> Answer:
        """An empty answer with the template's and `options`' stop strings."""
        tokenizer = model.require_tokenizer()
        stops = tuple(s for s in (*model.template.stop_strings, *options.stop) if s)
        return cls(TextAssembler(tokenizer.decode, stops), tokenizer.eos_id)

    @property
    def done(self) -> bool:
        return self.reason is not None

    @property
    def text(self) -> str:
        return self.assembler.final()

    @property
    def token_ids(self) -> list[int]:
        """The generated ids, EOS excluded."""
        return self.assembler.ids

    def add(self, token: int) -> None:
        """One generated token (EOS ends the answer and is not part of it)."""
        if token == self.eos_id:
            self.reason = "eos"
            return
        self.assembler.add(token)
        if self.assembler.stopped:
            self.reason = "stop"

    def release(self, *, final: bool = False) -> str:
        """The text that settled since the last release ("" if none); `final=True` once
        the answer has ended releases the rest of the final text."""
        text = self.assembler.final() if final else self.assembler.settled()
        if text.startswith(self.sent) and len(text) > len(self.sent):
            piece, self.sent = text[len(self.sent):], text
            return piece
        return ""


@torch.inference_mode()
def token_steps(
    model: GenerativeModel, batch: Sequence[Encoded], options: GenerationOptions
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
