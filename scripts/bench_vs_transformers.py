"""shortv vs transformers on the same random llava-hf checkpoint: first-token latency and
greedy decode speed, vanilla, one process, interleaved, medians.

    python scripts/bench_vs_transformers.py [--grid tiny|quick|full] [--dtype float32[,bfloat16]]
        [--device cpu|cuda] [--repeats 3] [--warmup 1] [--new-tokens 16] [--only prefill|decode]
        [--real-tower] [--max-tflops X] [--hidden H,..] [--layers L,..] [--batch B,..] [--plan] [--json]

For every decoder shape of the grid, a LLaVA-1.5 (`LlavaForConditionalGeneration`) or
LLaVA-NeXT (`LlavaNextForConditionalGeneration`) model is built by transformers with
seeded random weights and saved with `save_pretrained` into a temporary directory (the
llava-hf layout). shortv loads that directory with its own loader, transformers with
`from_pretrained`, each casting to the benchmark dtype. Both get the same token ids and
the same pixel tensors (no tokenizer, no image preprocessing): shortv an `Encoded` with one
IMAGE_TOKEN per image, transformers the ids with each image token expanded to the image's
visual token count, plus attention mask and position ids for left-padded batches.

Measured per cell:
- prefill: first-token latency = vision tower + projector + decoder prefill + last-position
  logits. shortv: `model.prefill(batch, max_new_tokens=1)`; transformers: one forward with
  `use_cache=True, logits_to_keep=1`; both under `torch.inference_mode`.
- decode: greedy generation of N new tokens. shortv: `shortv.generate.token_steps`, the loop
  `generate` runs (minus text assembly, which needs a tokenizer); transformers:
  `generate(do_sample=False, max_new_tokens=N, min_new_tokens=N)`. Both are timed the same
  way, inside their loop: from the moment the first new token is on the host to the moment
  the last one is (N - 1 decode steps; transformers' tokens are seen through a streamer).
  tok/s counts every sequence of the batch.
Before timing, the prefill logits of both models are compared in float32 (max abs diff
<= 1e-3) on every cell's inputs; any disagreement stops the benchmark (exit 1): the
comparison is only fair on the same weights and the same inputs.
ratio = shortv time / transformers time (<= 1.0: shortv is as fast or faster).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import shortv
from shortv.errors import ShortVError
from shortv.generate import GenerationOptions, token_steps
from shortv.loading import load_directory, resolve_device, resolve_dtype

AGREEMENT_TOL = 1e-3
# LLaVA-NeXT's grid pinpoints in units of the tower's tile (336 px for the real models).
NEXT_PINPOINTS = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))
NEXT_CROPS = 5  # a square image of 2 x 2 tiles: the base image + 4 tiles
PREFIX_TEXT = 35  # text tokens before the image in LLaVA's vicuna_v1 prompt


class AgreementError(RuntimeError):
    """shortv and transformers disagree on the prefill logits of the same inputs."""


# ---- what is benchmarked ---------------------------------------------------------------------


@dataclass(frozen=True)
class Decoder:
    """A Llama decoder's shapes."""

    hidden: int
    layers: int
    heads: int
    mlp: int
    vocab: int = 32064  # llava-hf's: 32000 + the image token + padding

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def params(self) -> int:
        d, m = self.hidden, self.mlp
        return self.layers * (4 * d * d + 3 * d * m + 2 * d) + 2 * self.vocab * d + d


def llama_like(hidden: int, layers: int, vocab: int = 32064) -> Decoder:
    """Llama's proportions: head_dim 128 (64 below hidden 1024, 16 for tiny), MLP
    ~2.6875 x hidden (11008 for 4096, 13824 for 5120)."""
    head_dim = 128 if hidden >= 1024 else 64 if hidden >= 256 else 16
    mlp = {4096: 11008, 5120: 13824}.get(hidden, round(hidden * 2.6875))
    return Decoder(hidden, layers, hidden // head_dim, mlp, vocab)


@dataclass(frozen=True)
class Tower:
    """A CLIP ViT vision tower's shapes."""

    width: int = 256
    layers: int = 4
    heads: int = 4
    mlp: int = 1024
    image_size: int = 336
    patch_size: int = 14

    @property
    def side(self) -> int:
        return self.image_size // self.patch_size

    def describe(self) -> str:
        return (f"CLIP {self.width} wide, {self.layers} layers, {self.image_size} px / "
                f"{self.patch_size} -> {self.side ** 2} patches")


SMALL_TOWER = Tower()
REAL_TOWER = Tower(width=1024, layers=24, heads=16, mlp=4096)  # CLIP ViT-L/14-336
TINY_TOWER = Tower(width=32, layers=2, heads=2, mlp=64, image_size=56, patch_size=14)


@dataclass(frozen=True)
class Prompt:
    """A prompt's make-up: `n_text` text tokens and `images` images (LLaVA-1.5: 576
    visual tokens each with the 336-px tower; LLaVA-NeXT: one square image of 2 x 2 tiles,
    672 x 672 for the real tower, 2928 tokens)."""

    arch: str  # "llava-1.5" or "llava-next"
    n_text: int
    images: int = 1

    def visual(self, tower: Tower) -> int:
        s = tower.side
        if self.arch == "llava-next":
            # base image (s x s) + the 2 x 2 tile feature map (2s x 2s) with a newline per row
            return self.images * (s * s + 2 * s * (2 * s + 1))
        return self.images * s * s

    def describe(self, tower: Tower) -> str:
        if not self.images:
            return f"{self.n_text} text"
        what = "NeXT 2x2 tiles" if self.arch == "llava-next" else f"{self.images} img"
        return f"{self.n_text}+{self.visual(tower)} ({what})"


@dataclass(frozen=True)
class Cell:
    arch: str
    decoder: Decoder
    prompt: Prompt
    batch: int
    dtype: str

    def text_lengths(self) -> list[int]:
        """Per row of the batch: different text lengths, so a batch is left-padded."""
        step = max(1, self.prompt.n_text // 8)
        return [max(1, self.prompt.n_text - i * step) for i in range(self.batch)]

    def tokens(self, tower: Tower) -> int:
        """Tokens of the longest row after image expansion."""
        return self.prompt.n_text + self.prompt.visual(tower)

    def prefill_tflops(self, tower: Tower) -> float:
        """Analytic decoder prefill TFLOPs of the batch (matmuls, full attention rectangle)."""
        d, m = self.decoder.hidden, self.decoder.mlp
        total = 0.0
        for n_text in self.text_lengths():
            t = n_text + self.prompt.visual(tower)
            total += self.decoder.layers * (2 * t * (4 * d * d + 3 * d * m) + 4 * t * t * d)
        return total / 1e12


def grid(name: str, dtypes: Sequence[str]) -> list[Cell]:
    """The cells of a named grid, for the given dtypes."""
    if name == "tiny":
        dec = [llama_like(64, 2, vocab=512)]
        prompts = [Prompt("llava-1.5", 24), Prompt("llava-next", 24)]
        batches = (1, 4)
    elif name == "quick":
        dec = [llama_like(h, n) for h in (256, 1024) for n in (2, 8)]
        prompts = [Prompt("llava-1.5", 64)]
        batches = (1, 4)
    elif name == "full":
        depths = {256: (2, 8, 40), 1024: (2, 8, 40), 2048: (2, 8), 4096: (2,), 5120: (2,)}
        dec = [llama_like(h, n) for h, ns in depths.items() for n in ns]
        prompts = [Prompt("llava-1.5", 64, images=0), Prompt("llava-1.5", 64),
                   Prompt("llava-next", 64)]
        batches = (1, 4)
    else:
        raise ValueError(f"unknown grid {name!r}")
    return [Cell(p.arch, d, p, b, dt) for d in dec for p in prompts for b in batches for dt in dtypes]


# ---- one random checkpoint, two loaders ------------------------------------------------------


def hf_config(arch: str, decoder: Decoder, tower: Tower, max_positions: int = 4096) -> Any:
    """transformers' LlavaConfig / LlavaNextConfig for these shapes (image token 32000,
    like llava-hf, or vocab - 12 for small vocabularies)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig

    image_token = 32000 if decoder.vocab > 32001 else decoder.vocab - 12
    vc = CLIPVisionConfig(hidden_size=tower.width, intermediate_size=tower.mlp,
                          num_hidden_layers=tower.layers, num_attention_heads=tower.heads,
                          image_size=tower.image_size, patch_size=tower.patch_size,
                          projection_dim=tower.width, hidden_act="quick_gelu")
    tc = LlamaConfig(hidden_size=decoder.hidden, intermediate_size=decoder.mlp,
                     num_hidden_layers=decoder.layers, num_attention_heads=decoder.heads,
                     num_key_value_heads=decoder.heads, head_dim=decoder.head_dim,
                     vocab_size=decoder.vocab, rms_norm_eps=1e-5,
                     max_position_embeddings=max_positions, bos_token_id=1, eos_token_id=2,
                     pad_token_id=image_token + 1)
    common = dict(vision_config=vc, text_config=tc, image_token_index=image_token,
                  vision_feature_layer=-2, vision_feature_select_strategy="default",
                  pad_token_id=image_token + 1)
    if arch == "llava-next":
        tile = tower.image_size
        pinpoints = [[w * tile, h * tile] for w, h in NEXT_PINPOINTS]
        return LlavaNextConfig(image_grid_pinpoints=pinpoints, **common)
    return LlavaConfig(**common)


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Seeded random weights of a useful size: matrices ~ N(0, 0.25 / fan_in), norm
    weights ~ 1 + N(0, 0.01), other vectors (biases, embeddings) ~ N(0, 0.01), so that a
    wrong op or a wrong weight shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1 and "norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.1, generator=g)
            elif p.dim() == 1:
                p.normal_(0.0, 0.1, generator=g)
            else:
                p.normal_(0.0, 0.5 / p[0].numel() ** 0.5, generator=g)


def write_checkpoint(out: Path, arch: str, decoder: Decoder, tower: Tower, seed: int = 0) -> Path:
    """A random llava-hf checkpoint built and saved by transformers (float32)."""
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    config = hf_config(arch, decoder, tower)
    cls = LlavaNextForConditionalGeneration if arch == "llava-next" else LlavaForConditionalGeneration
    with torch.device("meta"):  # no init pass over billions of values; filled below
        model = cls(config)
    model.to_empty(device="cpu")
    randomize(model, seed)
    model.save_pretrained(out)
    del model
    gc.collect()
    return out


@dataclass
class Pair:
    """The same checkpoint loaded by shortv and by transformers."""

    ours: shortv.LLaVA
    theirs: Any
    arch: str
    tower: Tower

    @property
    def device(self) -> torch.device:
        return self.ours.device


def load_pair(path: Path, arch: str, tower: Tower, device: torch.device, dtype: torch.dtype) -> Pair:
    """Both loaders on one checkpoint directory, cast to `dtype` on `device`."""
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "loaded without a tokenizer": ids are fed directly
        ours = load_directory(path, device=device, dtype=dtype)
    cls = LlavaNextForConditionalGeneration if arch == "llava-next" else LlavaForConditionalGeneration
    theirs = cls.from_pretrained(path, dtype=dtype).to(device).eval()
    return Pair(ours, theirs, arch, tower)


# ---- inputs ------------------------------------------------------------------------------------


@dataclass
class Inputs:
    """One batch for both models: shortv's Encoded list and transformers' keyword arguments."""

    encoded: list[shortv.Encoded]
    hf: dict[str, Tensor]
    lengths: list[int] = field(default_factory=list)


def make_inputs(cell: Cell, tower: Tower, image_token: int, device: torch.device,
                seed: int = 0) -> Inputs:
    """Random text ids (LLaVA's layout: prefix text, the image(s), the rest) and random
    pixel tensors; rows of a batch have different text lengths (left-padded)."""
    g = torch.Generator().manual_seed(seed)
    side = tower.image_size
    per_image = cell.prompt.visual(tower) // max(1, cell.prompt.images)
    next_ = cell.arch == "llava-next"
    encoded, rows, pixels = [], [], []
    for n_text in cell.text_lengths():
        text = torch.randint(3, min(32000, image_token), (n_text,), generator=g)
        before = min(PREFIX_TEXT, n_text - 1) if cell.prompt.images else n_text
        ids = [*text[:before].tolist(), *[shortv.IMAGE_TOKEN] * cell.prompt.images,
               *text[before:].tolist()]
        images = []
        for _ in range(cell.prompt.images):
            shape = (NEXT_CROPS, 3, side, side) if next_ else (3, side, side)
            images.append(torch.randn(shape, generator=g))
        size = (2 * side, 2 * side) if next_ else (side, side)
        encoded.append(shortv.Encoded(torch.tensor(ids), tuple(images), (size,) * len(images)))
        expanded: list[int] = []
        for i in ids:
            expanded += [image_token] * per_image if i == shortv.IMAGE_TOKEN else [i]
        rows.append(expanded)
        pixels += images
    t = max(len(r) for r in rows)
    pad = image_token + 1
    input_ids = torch.tensor([[pad] * (t - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (t - len(r)) + [1] * len(r) for r in rows])
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    hf: dict[str, Tensor] = {"input_ids": input_ids, "attention_mask": mask,
                             "position_ids": position_ids}
    if pixels:
        hf["pixel_values"] = torch.stack(pixels)
        if next_:
            hf["image_sizes"] = torch.tensor([[2 * side, 2 * side]] * len(pixels))
    hf = {k: v.to(device) for k, v in hf.items()}
    return Inputs(encoded, hf, [len(r) for r in rows])


# ---- the measured calls ------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def shortv_prefill(model: shortv.LLaVA, batch: Sequence[shortv.Encoded]) -> Tensor:
    """shortv's first-token logits [B, vocab]: tower, projector, decoder prefill, head."""
    logits, _ = model.prefill(batch, max_new_tokens=1)
    return logits


@torch.inference_mode()
def transformers_prefill(model: Any, hf: dict[str, Tensor]) -> Tensor:
    """transformers' first-token logits [B, vocab]: one forward with a cache, last position."""
    hf = dict(hf)
    if "pixel_values" in hf:
        hf["pixel_values"] = hf["pixel_values"].to(model.dtype)
    out = model(**hf, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1]


def shortv_decode(model: shortv.LLaVA, batch: Sequence[shortv.Encoded], n: int
                  ) -> tuple[float, list[list[int]]]:
    """Greedy generation of n tokens with shortv's loop: seconds from the first token on
    the host to the last (n - 1 decode steps), and the tokens per step."""
    steps = token_steps(model, batch, GenerationOptions(max_new_tokens=n))
    next(steps)  # prompt lengths
    tokens, first = [], 0.0
    for i, step in enumerate(steps):  # each step's ids are on the host (.tolist())
        if i == 0:
            first = time.perf_counter()
        tokens.append(step)
    if len(tokens) != n:
        raise RuntimeError(f"shortv generated {len(tokens)} tokens, not {n}")
    return time.perf_counter() - first, tokens


class _Clock:
    """A transformers streamer that only notes when each new token reaches the host."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Tensor) -> None:  # first call: the prompt, then each new token
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@torch.inference_mode()
def transformers_decode(model: Any, hf: dict[str, Tensor], n: int) -> tuple[float, list[list[int]]]:
    """Greedy `generate` of n tokens (min_new_tokens = n): seconds from the first new token
    on the host to the last, seen through a streamer (as shortv's loop is timed), and the
    tokens per step."""
    from transformers import GenerationConfig

    hf = {k: v for k, v in hf.items() if k != "position_ids"}  # generate derives them
    if "pixel_values" in hf:
        hf["pixel_values"] = hf["pixel_values"].to(model.dtype)
    cfg = model.config
    eos = cfg.text_config.eos_token_id
    gen = GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n,
                           pad_token_id=cfg.pad_token_id, eos_token_id=eos,
                           bos_token_id=cfg.text_config.bos_token_id)
    clock = _Clock()
    out = model.generate(**hf, generation_config=gen, streamer=clock)
    if len(clock.times) != n + 1:
        raise RuntimeError(f"transformers generated {len(clock.times) - 1} tokens, not {n}")
    return clock.times[-1] - clock.times[1], out[:, hf["input_ids"].shape[1]:].T.tolist()


def prefill_ours(pair: Pair, inputs: Inputs) -> Tensor:
    return shortv_prefill(pair.ours, inputs.encoded)


def prefill_theirs(pair: Pair, inputs: Inputs) -> Tensor:
    return transformers_prefill(pair.theirs, inputs.hf)


def decode_ours(pair: Pair, inputs: Inputs, n: int) -> tuple[float, list[list[int]]]:
    return shortv_decode(pair.ours, inputs.encoded, n)


def decode_theirs(pair: Pair, inputs: Inputs, n: int) -> tuple[float, list[list[int]]]:
    return transformers_decode(pair.theirs, inputs.hf, n)


def check_agreement(ours: Tensor, theirs: Tensor, tol: float = AGREEMENT_TOL, what: str = "") -> float:
    """Max abs difference of two logit tensors; AgreementError when it exceeds `tol` (or
    the shapes differ, or anything is not finite)."""
    if ours.shape != theirs.shape:
        raise AgreementError(f"{what}: logits of shape {tuple(ours.shape)} (shortv) vs "
                             f"{tuple(theirs.shape)} (transformers)")
    diff = (ours.float() - theirs.float()).abs().max().item()
    if not math.isfinite(diff) or diff > tol:
        raise AgreementError(
            f"{what}: shortv and transformers disagree on the prefill logits of the same "
            f"checkpoint and inputs: max abs diff {diff:.3g} > {tol:g}; the timings would "
            "compare different computations")
    return diff


def prefill_agreement(pair: Pair, inputs: Inputs, tol: float = AGREEMENT_TOL, what: str = "") -> float:
    """Run both prefills and compare (see check_agreement)."""
    return check_agreement(prefill_ours(pair, inputs), prefill_theirs(pair, inputs), tol, what)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def interleaved(fns: Sequence[Callable[[], float]], repeats: int, warmup: int) -> list[list[float]]:
    """`repeats` measurements of each function after `warmup` rounds, interleaved within a
    round (A B, then B A, ...). Each function returns its own measurement (seconds)."""
    runs: list[list[float]] = [[] for _ in fns]
    order = list(range(len(fns)))
    for i in range(warmup + repeats):
        for j in order if i % 2 == 0 else order[::-1]:
            value = fns[j]()
            if i >= warmup:
                runs[j].append(value)
    return runs


# ---- one cell ------------------------------------------------------------------------------------


@dataclass
class Result:
    cell: Cell
    tokens: int
    prefill_tflops: float
    fp32_max_abs_diff: float
    dtype_max_abs_diff: float | None = None
    prefill_ms: dict[str, float] = field(default_factory=dict)
    prefill_runs_ms: dict[str, list[float]] = field(default_factory=dict)
    decode_tok_s: dict[str, float] = field(default_factory=dict)
    decode_runs_s: dict[str, list[float]] = field(default_factory=dict)
    decode_tokens_match: float | None = None
    skipped: str = ""

    @property
    def prefill_ratio(self) -> float | None:
        p = self.prefill_ms
        return p["shortv"] / p["transformers"] if p else None

    @property
    def decode_ratio(self) -> float | None:
        d = self.decode_tok_s
        return d["transformers"] / d["shortv"] if d else None

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "cell"}
        c = self.cell
        out.update(arch=c.arch, decoder=asdict(c.decoder), prompt=asdict(c.prompt), batch=c.batch,
                   dtype=c.dtype, text_lengths=c.text_lengths(),
                   prefill_ratio=self.prefill_ratio, decode_ratio=self.decode_ratio)
        return out


def time_cell(pair: Pair, cell: Cell, inputs: Inputs, result: Result, *, repeats: int,
              warmup: int, new_tokens: int, only: str | None) -> None:
    """Fill `result` with both models' prefill and decode timings (medians)."""
    device = pair.device
    if only in (None, "prefill"):
        runs = interleaved([lambda: timed(lambda: prefill_ours(pair, inputs), device),
                            lambda: timed(lambda: prefill_theirs(pair, inputs), device)],
                           repeats, warmup)
        for name, r in zip(("shortv", "transformers"), runs, strict=True):
            result.prefill_runs_ms[name] = [s * 1e3 for s in r]
            result.prefill_ms[name] = statistics.median(r) * 1e3
    if only in (None, "decode") and new_tokens >= 2:
        tokens: dict[str, list[list[int]]] = {}

        def run(name: str, fn: Callable[[Pair, Inputs, int], tuple[float, list[list[int]]]]
                ) -> Callable[[], float]:
            def go() -> float:
                seconds, tokens[name] = fn(pair, inputs, new_tokens)
                return seconds
            return go

        runs = interleaved([run("shortv", decode_ours), run("transformers", decode_theirs)],
                           repeats, warmup)
        steps = cell.batch * (new_tokens - 1)
        for name, r in zip(("shortv", "transformers"), runs, strict=True):
            result.decode_runs_s[name] = r
            result.decode_tok_s[name] = steps / statistics.median(r)
        a, b = tokens["shortv"], tokens["transformers"]
        same = sum(x == y for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))
        result.decode_tokens_match = same / (len(a) * cell.batch)


# ---- the run ------------------------------------------------------------------------------------


def run_grid(cells: Sequence[Cell], tower: Tower, device: torch.device, *, repeats: int,
             warmup: int, new_tokens: int, only: str | None, max_tflops: float | None,
             log: Callable[[str], None]) -> list[Result]:
    """Every cell: one checkpoint per (arch, decoder shape), agreement in float32 first,
    then the timings in each dtype."""
    results: list[Result] = []
    groups: dict[tuple[str, Decoder], list[Cell]] = {}
    for cell in cells:
        groups.setdefault((cell.arch, cell.decoder), []).append(cell)
    for (arch, decoder), group in groups.items():
        todo = []
        for cell in group:
            result = Result(cell, cell.tokens(tower), cell.prefill_tflops(tower), math.nan)
            results.append(result)
            if max_tflops is not None and result.prefill_tflops > max_tflops:
                result.skipped = f"prefill {result.prefill_tflops:.1f} TFLOPs > --max-tflops {max_tflops:g}"
                continue
            todo.append(result)
        if not todo:
            continue
        with tempfile.TemporaryDirectory(prefix="bench-vs-hf-") as tmp:
            t0 = time.perf_counter()
            path = write_checkpoint(Path(tmp) / "ckpt", arch, decoder, tower)
            log(f"{arch} hidden {decoder.hidden} x {decoder.layers} layers: checkpoint written "
                f"({decoder.params() / 1e6:.0f}M decoder params) in {time.perf_counter() - t0:.1f} s")
            pair = load_pair(path, arch, tower, device, torch.float32)
            image_token = pair.theirs.config.image_token_index
            inputs = {}
            for r in todo:  # the agreement check, in float32, on every cell's inputs
                key = (r.cell.prompt, r.cell.batch)
                if key not in inputs:
                    inputs[key] = make_inputs(r.cell, tower, image_token, device)
                    diff = prefill_agreement(pair, inputs[key], what=_label(r.cell, tower))
                    for other in todo:
                        if (other.cell.prompt, other.cell.batch) == key:
                            other.fp32_max_abs_diff = diff
            for dtype_name in dict.fromkeys(r.cell.dtype for r in todo):
                dtype = resolve_dtype(dtype_name, device)
                if dtype != torch.float32:
                    del pair
                    gc.collect()
                    pair = load_pair(path, arch, tower, device, dtype)
                for r in (r for r in todo if r.cell.dtype == dtype_name):
                    key = (r.cell.prompt, r.cell.batch)
                    if dtype != torch.float32:
                        r.dtype_max_abs_diff = (prefill_ours(pair, inputs[key]).float()
                                                - prefill_theirs(pair, inputs[key]).float()
                                                ).abs().max().item()
                    else:
                        r.dtype_max_abs_diff = r.fp32_max_abs_diff
                    t0 = time.perf_counter()
                    time_cell(pair, r.cell, inputs[key], r, repeats=repeats, warmup=warmup,
                              new_tokens=new_tokens, only=only)
                    log(f"  {_label(r.cell, tower)}: {_summary(r)} ({time.perf_counter() - t0:.0f} s)")
            del pair
            gc.collect()
    return results


def _label(cell: Cell, tower: Tower) -> str:
    return (f"{cell.arch} {cell.decoder.hidden}x{cell.decoder.layers} "
            f"{cell.prompt.describe(tower)} b{cell.batch} {cell.dtype}")


def _summary(r: Result) -> str:
    parts = []
    if r.prefill_ms:
        parts.append(f"prefill {r.prefill_ms['shortv']:.1f} / {r.prefill_ms['transformers']:.1f} ms "
                     f"({r.prefill_ratio:.2f})")
    if r.decode_tok_s:
        parts.append(f"decode {r.decode_tok_s['shortv']:.1f} / {r.decode_tok_s['transformers']:.1f} "
                     f"tok/s ({r.decode_ratio:.2f})")
    return ", ".join(parts)


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(results: Iterable[Result], tower: Tower) -> str:
    """One markdown row per cell."""
    head = ("| arch | hidden | layers | heads x dim | MLP | prompt (text+visual) | batch | dtype "
            "| prefill ms shortv | transformers | ratio | decode tok/s shortv | transformers "
            "| ratio | max abs diff fp32 |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in results:
        c, d = r.cell, r.cell.decoder
        p, t = r.prefill_ms, r.decode_tok_s
        if r.skipped:
            cells = ["skipped: " + r.skipped, "", "", "", "", "", ""]
        else:
            cells = [_num(p.get("shortv"), ".1f"), _num(p.get("transformers"), ".1f"),
                     _num(r.prefill_ratio, ".2f"), _num(t.get("shortv"), ".1f"),
                     _num(t.get("transformers"), ".1f"), _num(r.decode_ratio, ".2f"),
                     f"{r.fp32_max_abs_diff:.1e}"]
        row = [c.arch, str(d.hidden), str(d.layers), f"{d.heads}x{d.head_dim}", str(d.mlp),
               c.prompt.describe(tower), str(c.batch), c.dtype.removeprefix("torch."), *cells]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


# ---- the plan: cells and an estimate of the run time -------------------------------------------


def machine_rates(device: torch.device, dtype: torch.dtype) -> tuple[float, float]:
    """(GEMM FLOP/s, memory bytes/s) of this machine, measured in a second or two."""
    a = torch.randn(1024, 4096, device=device).to(dtype)
    b = torch.randn(4096, 4096, device=device).to(dtype)
    for _ in range(2):
        a @ b
    t = timed(lambda: [a @ b for _ in range(4)], device)
    flops = 4 * 2 * a.shape[0] * a.shape[1] * b.shape[1] / t
    src = torch.ones(256 << 20, dtype=torch.uint8, device=device)
    dst = torch.zeros_like(src)
    dst.copy_(src)
    t = timed(lambda: [dst.copy_(src) for _ in range(4)], device)
    return flops, 4 * 2 * src.numel() / t


def estimate_seconds(cells: Sequence[Cell], tower: Tower, rates: dict[str, tuple[float, float]],
                     *, repeats: int, warmup: int, new_tokens: int, only: str | None,
                     max_tflops: float | None) -> float:
    """A rough run-time estimate: prefill from FLOPs at the measured GEMM rate, decode steps
    from the weights' bytes at the measured memory rate (or their FLOPs, if larger), both
    models, every round; plus checkpoint writing and loading."""
    total = 0.0
    seen: set[tuple[str, Decoder]] = set()
    for c in cells:
        tf = c.prefill_tflops(tower)
        if max_tflops is not None and tf > max_tflops:
            continue
        flops, bandwidth = rates[c.dtype]
        size = 2 if c.dtype in ("bfloat16", "bf16", "float16", "fp16") else 4
        prefill = tf * 1e12 / flops
        step = max(c.decoder.params() * size / bandwidth, 2 * c.decoder.params() * c.batch / flops)
        rounds = 2 * (warmup + repeats)
        if only in (None, "prefill"):
            total += rounds * prefill
        if only in (None, "decode"):
            total += rounds * (prefill + (new_tokens - 1) * step)
        total += prefill * 2  # the float32 agreement check
        if (c.arch, c.decoder) not in seen:
            seen.add((c.arch, c.decoder))
            total += c.decoder.params() * 4 * 6 / 1e9  # write + load twice, ~1 GB/s
    return total


# ---- command line -----------------------------------------------------------------------------------


def _chosen(wanted: str | None, value: int) -> bool:
    return wanted is None or value in {int(v) for v in wanted.split(",")}


def log(message: str) -> None:
    """Progress, on stderr (the table goes to stdout)."""
    print(message, file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", choices=("tiny", "quick", "full"), default="quick")
    parser.add_argument("--dtype", help="comma-separated: float32, bfloat16 (default: float32; "
                                        "full grid: float32,bfloat16)")
    parser.add_argument("--device")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, help="greedy tokens generated per decode run")
    parser.add_argument("--only", choices=("prefill", "decode"))
    parser.add_argument("--real-tower", action="store_true",
                        help="CLIP ViT-L/14-336 (24 layers, 1024 wide) instead of a small tower")
    parser.add_argument("--max-tflops", type=float,
                        help="skip cells whose decoder prefill exceeds this many TFLOPs "
                             "(see --plan for each cell's count and the run-time estimate)")
    parser.add_argument("--hidden", help="only these decoder widths (comma-separated)")
    parser.add_argument("--layers", help="only these depths (comma-separated)")
    parser.add_argument("--batch", help="only these batch sizes (comma-separated)")
    parser.add_argument("--plan", action="store_true", help="list the cells and estimate the run time")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python scripts/bench_vs_transformers.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    try:
        device = resolve_device(args.device)
        names = (args.dtype or ("float32,bfloat16" if args.grid == "full" else "float32")).split(",")
        dtypes = [str(resolve_dtype(n.strip(), device)).removeprefix("torch.") for n in names]
    except ShortVError as e:
        print(f"bench_vs_transformers: error: {e}", file=sys.stderr)
        return 2
    tiny = args.grid == "tiny"
    tower = TINY_TOWER if tiny else REAL_TOWER if args.real_tower else SMALL_TOWER
    repeats = args.repeats or (1 if tiny else 3)
    new_tokens = args.new_tokens or (4 if tiny else 16)
    max_tflops = args.max_tflops
    cells = [c for c in grid(args.grid, dtypes)
             if _chosen(args.hidden, c.decoder.hidden) and _chosen(args.layers, c.decoder.layers)
             and _chosen(args.batch, c.batch)]
    if not cells:
        print("bench_vs_transformers: error: no cell of the grid matches the filters", file=sys.stderr)
        return 2
    import transformers

    transformers.utils.logging.disable_progress_bar()

    meta = {"command": command, "torch": torch.__version__, "transformers": transformers.__version__,
            "device": str(device), "threads": torch.get_num_threads(), "tower": tower.describe(),
            "repeats": repeats, "warmup": args.warmup, "new_tokens": new_tokens}
    if args.plan:
        rates = {d: machine_rates(device, resolve_dtype(d, device)) for d in dtypes}
        seconds = estimate_seconds(cells, tower, rates, repeats=repeats, warmup=args.warmup,
                                   new_tokens=new_tokens, only=args.only, max_tflops=max_tflops)
        kept = [c for c in cells if max_tflops is None or c.prefill_tflops(tower) <= max_tflops]
        plan = {**meta, "cells": len(cells), "run": len(kept), "estimated_seconds": seconds,
                "rates": {d: {"gemm_gflops": f / 1e9, "memory_gb_s": b / 1e9} for d, (f, b) in rates.items()}}
        if args.json:
            print(json.dumps(plan, indent=2))
        else:
            for c in cells:
                skip = " (skipped)" if c not in kept else ""
                print(f"{_label(c, tower)}: {c.prefill_tflops(tower):.2f} TFLOPs{skip}")
            print(f"{len(kept)} of {len(cells)} cells; estimated {seconds / 60:.0f} min")
        return 0
    start = time.perf_counter()
    load_before = os.getloadavg()[0]
    try:
        results = run_grid(cells, tower, device, repeats=repeats, warmup=args.warmup,
                           new_tokens=new_tokens, only=args.only, max_tflops=max_tflops, log=log)
    except AgreementError as e:
        print(f"bench_vs_transformers: FAILED: {e}", file=sys.stderr)
        return 1
    meta["seconds"] = time.perf_counter() - start
    meta["load_average"] = [load_before, os.getloadavg()[0]]
    if args.json:
        print(json.dumps({**meta, "results": [r.as_dict() for r in results]}, indent=2))
        return 0
    print(f"`{command}`\n")
    print(f"torch {meta['torch']}, transformers {meta['transformers']}, {device} "
          f"({meta['threads']} threads), tower: {tower.describe()}; medians of {repeats} "
          f"after {args.warmup} warm-up, interleaved; decode: {new_tokens} new tokens "
          f"(tok/s over the {new_tokens - 1} steps after the first, all rows); "
          f"ratio = shortv time / transformers time; batch 4 rows have text lengths "
          f"n, n-n/8, n-2n/8, n-3n/8 (left-padded); {meta['seconds']:.0f} s in all; "
          f"1-min load average {load_before:.1f} before, {meta['load_average'][1]:.1f} after "
          f"({os.cpu_count()} CPUs: above that, other processes shared the cores)\n")
    print(table(results, tower))
    return 0


if __name__ == "__main__":
    sys.exit(main())
