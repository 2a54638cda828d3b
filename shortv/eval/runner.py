"""`shortv eval`'s engine: answer a question file into an answer file, in batches, over
one process or a torchrun group, then score and summarise."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import parallel
from ..errors import InputError
from ..flops import TERA, count_types, decoder_flops, sequence_flops
from ..generate import GenerationOptions, GenerationResult, generate
from ..methods import VANILLA
from ..parallel import Ranks
from ..questions import Question
from ..session import VisionLanguageModel
from ..tokenizer import IMAGE_TOKEN
from . import provenance
from .answers import AnswerFile, answer_record, key
from .vqa import vqa_accuracy


@dataclass
class Measured:
    """What the questions answered in this run cost: per question, prompt tokens and
    analytic prefill FLOPs (method, vanilla); per batch, prefill and decode time and the
    tokens decoded."""

    prompt_tokens: list[int] = field(default_factory=list)
    flops: list[float] = field(default_factory=list)
    vanilla_flops: list[float] = field(default_factory=list)
    prefill_ms: list[float] = field(default_factory=list)  # per batch
    decode_s: float = 0.0
    decoded_tokens: int = 0

    def add(self, other: Measured) -> None:
        self.prompt_tokens += other.prompt_tokens
        self.flops += other.flops
        self.vanilla_flops += other.vanilla_flops
        self.prefill_ms += other.prefill_ms
        self.decode_s += other.decode_s
        self.decoded_tokens += other.decoded_tokens


def evaluate(
    model: VisionLanguageModel,
    questions: Sequence[Question],
    answers_out: str | Path,
    *,
    options: GenerationOptions | None = None,
    batch_size: int = 1,
    ranks: Ranks | None = None,
    progress: bool = True,
    overwrite: bool = False,
    limit: int | None = None,
) -> dict[str, Any] | None:
    """Answer `questions` with `model` into the answer file `answers_out`, and return the
    summary (on rank 0; None on the other ranks of a torchrun run).

    The file is resumed only if it was written by the same run (model, method and its
    options, template, generation options, dtype, shortv version: `shortv.eval.provenance`);
    otherwise InputError, naming what differs, before anything is written. `overwrite`
    starts it afresh. `limit`: the --limit that cut `questions` from a longer question
    file (answers beyond it may be in the file already; see `AnswerFile`).

    Greedy by default (`options`), `batch_size` questions per generate call (left-padded).
    The summary: accuracy (when the questions carry answers), n, answers_in_file, model,
    method, provenance, mean prompt tokens, mean analytic prefill TFLOPs with the method
    and vanilla and their ratio, mean prefill ms per batch, decode tokens/s, wall seconds
    (the measured ones over the questions answered in this run: None if none were).
    """
    ranks = ranks or Ranks()
    options = options or GenerationOptions(max_new_tokens=128)
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    started = time.perf_counter()
    run_record = provenance.of_model(model, options)
    # Rank 0 reads the file; every rank stops if it cannot be resumed, then learns what is left.
    answers = parallel.on_main(ranks, lambda: AnswerFile(
        answers_out, questions, run_record, limit=limit, overwrite=overwrite))
    remaining = parallel.broadcast(ranks, answers.remaining if answers else None)
    todo = [q for q in questions if key(q.question_id) in remaining]
    mine = ranks.shard(todo)
    position = {key(q.question_id): i for i, q in enumerate(questions)}
    measured = Measured()
    bar = _progress(len(todo), progress and ranks.main, len(questions) - len(todo))
    try:
        for step in range(ranks.steps(len(todo), batch_size)):
            batch = mine[step * batch_size:(step + 1) * batch_size]
            records, part, error = [], Measured(), None
            try:
                records, part = _answer(model, batch, options, run_record)
            except Exception as e:  # shared with the other ranks before anyone raises
                error = e
            gathered = parallel.gather(ranks, (records, part), error)
            if gathered is None:
                continue
            merged = sorted((r for rs, _ in gathered for r in rs),
                            key=lambda r: position[key(r["question_id"])])
            for _, p in gathered:
                measured.add(p)
            answers.append(merged)
            bar.update(len(merged))
    finally:
        bar.close()
    if not ranks.main:
        return None
    answers.finish()
    return _summary(model, questions, answers, run_record, measured, time.perf_counter() - started)


def _answer(model: VisionLanguageModel, batch: Sequence[Question], options: GenerationOptions,
            run_record: dict[str, Any]) -> tuple[list[dict[str, Any]], Measured]:
    measured = Measured()
    if not batch:
        return [], measured
    encoded = []
    for q in batch:
        try:
            encoded.append(model.encode(q.text, list(q.images)))
        except InputError as e:
            raise InputError(f"{q.where}: {e}") from None
    results = generate(model, encoded, options)
    config = model.config.text
    for enc, result in zip(encoded, results, strict=True):
        n_text = int((enc.input_ids != IMAGE_TOKEN).sum())
        n_visual = result.prompt_tokens - n_text
        measured.prompt_tokens.append(result.prompt_tokens)
        if model.method.reduces_images:
            # The prompt's visual count is the reduced one (what the method's count needs);
            # vanilla's needs the full images, which only the tower can tell.
            full = model.token_types(enc, reduce_images=False)
            measured.flops.append(sequence_flops(config, model.method, count_types(n_text, n_visual)))
            measured.vanilla_flops.append(sequence_flops(config, VANILLA, full))
            continue
        measured.flops.append(decoder_flops(config, model.method, n_text, n_visual))
        measured.vanilla_flops.append(decoder_flops(config, VANILLA, n_text, n_visual))
    measured.prefill_ms.append(results[0].prefill_seconds * 1e3)
    measured.decode_s += results[0].decode_seconds
    measured.decoded_tokens += _decoded(results)
    records = [answer_record(q, r.text, model.name, run_record)
               for q, r in zip(batch, results, strict=True)]
    return records, measured


def _decoded(results: Sequence[GenerationResult]) -> int:
    """Tokens produced by decode steps (the first token of each answer comes from the prefill)."""
    return sum(max(len(r.token_ids) + (r.finish_reason == "eos") - 1, 0) for r in results)


def _summary(model: VisionLanguageModel, questions: Sequence[Question], answers: AnswerFile,
             run_record: dict[str, Any], measured: Measured, wall: float) -> dict[str, Any]:
    scored = [(answers.done[key(q.question_id)]["text"], q.answer) for q in questions
              if q.answer is not None and key(q.question_id) in answers.done]
    tflops, vanilla = mean(measured.flops), mean(measured.vanilla_flops)
    return {
        "accuracy": mean([vqa_accuracy(text, answer) for text, answer in scored]),
        "n": len(answers.done),
        "scored": len(scored),
        "answered_now": len(measured.prompt_tokens),
        "answers_in_file": answers.held,
        "model": model.name,
        "method": model.method.describe(),
        "provenance": run_record,
        "answers": str(answers.path),
        "mean_prompt_tokens": mean(measured.prompt_tokens),
        "mean_prefill_tflops": tflops / TERA if tflops is not None else None,
        "mean_vanilla_prefill_tflops": vanilla / TERA if vanilla is not None else None,
        "tflops_ratio": tflops / vanilla if tflops and vanilla else None,
        "mean_prefill_ms": mean(measured.prefill_ms),
        "decode_tokens_per_s": (measured.decoded_tokens / measured.decode_s
                                if measured.decode_s > 0 else None),
        "wall_s": wall,
    }


def mean(values: Sequence[float]) -> float | None:
    """The mean, or None for no values (a resumed run may have answered nothing new)."""
    return statistics.fmean(values) if values else None


def _progress(total: int, enabled: bool, initial: int):
    from huggingface_hub.utils import tqdm

    return tqdm(total=total + initial, initial=initial, desc="questions", unit="q",
                disable=not enabled)

