"""shortv vs transformers on the same random checkpoint (LLaVA, Qwen2-VL or Qwen2.5-VL):
first-token latency and greedy decode speed, vanilla, one process, interleaved, medians.

    python scripts/bench_vs_transformers.py [--family llava|qwen2_vl|qwen2_5_vl]
        [--grid tiny|quick|full] [--dtype float32[,bfloat16]] [--device cpu|cuda] [--repeats 3]
        [--warmup 1] [--new-tokens 16] [--only vision|prefill|decode] [--real-tower]
        [--max-tflops X] [--hidden H,..] [--layers L,..] [--batch B,..] [--plan] [--json]

For every decoder shape of the grid, a model is built by transformers with seeded random
weights and saved with `save_pretrained` into a temporary directory (transformers' own
layout): LLaVA-1.5 (`LlavaForConditionalGeneration`) and LLaVA-NeXT
(`LlavaNextForConditionalGeneration`) for --family llava (the default), or
`Qwen2VLForConditionalGeneration` / `Qwen2_5_VLForConditionalGeneration` (GQA decoder
with M-RoPE; a small ViT, 2.5's with window attention and full-attention blocks, and its
2x2 patch merger) for the Qwen families. shortv loads that directory with its own loader,
transformers with `from_pretrained`, each casting to the benchmark dtype. Both get the
same token ids and the same pixel tensors (no tokenizer, no image preprocessing): shortv an
`Encoded` with one IMAGE_TOKEN per image, transformers the ids with each image token
expanded to the image's visual token count (LLaVA: attention mask and position ids for
left-padded batches; Qwen: attention mask, mm_token_type_ids, the flattened patches and
image_grid_thw, transformers computing its own 3-D positions). A Qwen image is one square
image of --grid's size (672 px: 24 x 24 merged patches = 576 visual tokens).

Measured per cell:
- vision (Qwen families): images -> visual tokens on their own, the ViT and its patch
  merger for every image of the batch in one call. shortv: `model.module.image_features`;
  transformers: `model.model.get_image_features`.
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
from shortv.session import VisionLanguageModel

AGREEMENT_TOL = 1e-3
# LLaVA-NeXT's grid pinpoints in units of the tower's tile (336 px for the real models).
NEXT_PINPOINTS = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))
NEXT_CROPS = 5  # a square image of 2 x 2 tiles: the base image + 4 tiles
PREFIX_TEXT = 35  # text tokens before the image in LLaVA's vicuna_v1 prompt
FAMILIES = ("llava", "qwen2_vl", "qwen2_5_vl")
QWEN_ARCHS = ("qwen2_vl", "qwen2_5_vl")  # a Qwen family's one arch has the family's name
QWEN_VOCAB = 151936  # Qwen2-VL's and Qwen2.5-VL's embedding rows
# Qwen's special tokens, as offsets from <|endoftext|> (151643 in the real vocabulary).
QWEN_SPECIAL = {"endoftext": 0, "im_start": 1, "im_end": 2, "vision_start": 9,
                "vision_end": 10, "image_pad": 12, "video_pad": 13}


class AgreementError(RuntimeError):
    """shortv and transformers disagree on the prefill logits of the same inputs."""


# ---- what is benchmarked ---------------------------------------------------------------------


@dataclass(frozen=True)
class Decoder:
    """A Llama / Qwen2 decoder's shapes (kv_heads: grouped-query attention's key/value
    heads; None = heads, plain multi-head attention as in LLaVA's Llama)."""

    hidden: int
    layers: int
    heads: int
    mlp: int
    vocab: int = 32064  # llava-hf's: 32000 + the image token + padding
    kv_heads: int | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv(self) -> int:
        return self.heads if self.kv_heads is None else self.kv_heads

    def params(self) -> int:
        d, m = self.hidden, self.mlp
        attention = 2 * d * d + 2 * d * self.kv * self.head_dim
        return self.layers * (attention + 3 * d * m + 2 * d) + 2 * self.vocab * d + d


def llama_like(hidden: int, layers: int, vocab: int = 32064) -> Decoder:
    """Llama's proportions: head_dim 128 (64 below hidden 1024, 16 for tiny), MLP
    ~2.6875 x hidden (11008 for 4096, 13824 for 5120)."""
    head_dim = 128 if hidden >= 1024 else 64 if hidden >= 256 else 16
    mlp = {4096: 11008, 5120: 13824}.get(hidden, round(hidden * 2.6875))
    return Decoder(hidden, layers, hidden // head_dim, mlp, vocab)


def qwen_like(hidden: int, layers: int, vocab: int = QWEN_VOCAB) -> Decoder:
    """Qwen2's proportions: head_dim as in `llama_like`, a quarter as many key/value heads
    (Qwen2-VL-2B: 12 / 2, 7B: 28 / 4, Qwen2.5-VL-3B: 16 / 2), MLP ~5.5 x hidden (the
    published models' own widths where there is one)."""
    head_dim = 128 if hidden >= 1024 else 64 if hidden >= 256 else 16
    heads = hidden // head_dim
    published = {1536: (8960, 2), 2048: (11008, 2), 3584: (18944, 4)}
    mlp, kv = published.get(hidden, (round(hidden * 5.5), max(1, heads // 4)))
    return Decoder(hidden, layers, heads, mlp, vocab, kv_heads=kv)


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
class QwenTower:
    """A Qwen2-VL / Qwen2.5-VL vision transformer's shapes, and the side of the square
    image a prompt's image has unless the prompt says otherwise (`image_size` px: side /
    28 merged patches a side, one visual token each)."""

    variant: str = "qwen2_vl"
    width: int = 256
    layers: int = 4
    heads: int = 4
    mlp: int = 1024
    image_size: int = 672
    window_size: int = 112  # Qwen2.5-VL: attention windows of 112 px (4 x 4 merged patches)
    fullatt: tuple[int, ...] = ()  # Qwen2.5-VL: the blocks with full attention
    patch_size: int = 14
    merge: int = 2

    @property
    def act(self) -> str:
        return "quick_gelu" if self.variant == "qwen2_vl" else "silu"

    @property
    def factor(self) -> int:
        """Pixels per merged patch side (28)."""
        return self.patch_size * self.merge

    @property
    def side(self) -> int:
        """Merged patches (visual tokens) per side of the default image."""
        return self.image_size // self.factor

    def describe(self) -> str:
        what = (f"window {self.window_size} px, full attention in blocks {list(self.fullatt)}"
                if self.variant == "qwen2_5_vl" else "full attention")
        return (f"{self.variant} ViT {self.width} wide, {self.layers} blocks ({what}), MLP "
                f"{self.mlp}; {self.image_size} px images -> {self.side ** 2} visual tokens")


AnyTower = Tower | QwenTower
QWEN_TOWERS = {  # (tiny, small, real) per variant
    "qwen2_vl": (QwenTower("qwen2_vl", 32, 2, 2, 64, image_size=112),
                 QwenTower("qwen2_vl"),
                 QwenTower("qwen2_vl", 1280, 32, 16, 5120)),  # Qwen2-VL's ViT (675M)
    "qwen2_5_vl": (QwenTower("qwen2_5_vl", 32, 2, 2, 48, image_size=112, window_size=56, fullatt=(1,)),
                   QwenTower("qwen2_5_vl", mlp=688, fullatt=(3,)),
                   QwenTower("qwen2_5_vl", 1280, 32, 16, 3420, fullatt=(7, 15, 23, 31))),
}


def tower_for(family: str, grid_name: str, real: bool = False) -> AnyTower:
    """The vision tower a family's grid runs with: tiny for --grid tiny, the real model's
    with --real-tower, else a small one (256 wide, 4 blocks)."""
    if family == "llava":
        return TINY_TOWER if grid_name == "tiny" else REAL_TOWER if real else SMALL_TOWER
    tiny, small, full = QWEN_TOWERS[family]
    return tiny if grid_name == "tiny" else full if real else small


@dataclass(frozen=True)
class Prompt:
    """A prompt's make-up: `n_text` text tokens and `images` images (LLaVA-1.5: 576
    visual tokens each with the 336-px tower; LLaVA-NeXT: one square image of 2 x 2 tiles,
    672 x 672 for the real tower, 2928 tokens; Qwen: square images of `image_px` px, the
    tower's default size if 0: (px / 28)^2 tokens each, 576 for 672 px)."""

    arch: str  # "llava-1.5", "llava-next", "qwen2_vl" or "qwen2_5_vl"
    n_text: int
    images: int = 1
    image_px: int = 0

    def qwen_side(self, tower: AnyTower) -> int:
        """A Qwen image's merged patches per side."""
        assert isinstance(tower, QwenTower), tower
        return (self.image_px or tower.image_size) // tower.factor

    def visual(self, tower: AnyTower) -> int:
        if self.arch in QWEN_ARCHS:
            return self.images * self.qwen_side(tower) ** 2
        s = tower.side
        if self.arch == "llava-next":
            # base image (s x s) + the 2 x 2 tile feature map (2s x 2s) with a newline per row
            return self.images * (s * s + 2 * s * (2 * s + 1))
        return self.images * s * s

    def describe(self, tower: AnyTower) -> str:
        if not self.images:
            return f"{self.n_text} text"
        what = "NeXT 2x2 tiles" if self.arch == "llava-next" else f"{self.images} img"
        if self.arch in QWEN_ARCHS:
            what += f" {self.qwen_side(tower) * tower.factor} px"
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

    def tokens(self, tower: AnyTower) -> int:
        """Tokens of the longest row after image expansion."""
        return self.prompt.n_text + self.prompt.visual(tower)

    def prefill_tflops(self, tower: AnyTower) -> float:
        """Analytic decoder prefill TFLOPs of the batch (matmuls, full attention rectangle)."""
        d, m = self.decoder.hidden, self.decoder.mlp
        kv = self.decoder.kv * self.decoder.head_dim
        total = 0.0
        for n_text in self.text_lengths():
            t = n_text + self.prompt.visual(tower)
            total += self.decoder.layers * (2 * t * (2 * d * d + 2 * d * kv + 3 * d * m) + 4 * t * t * d)
        return total / 1e12


def grid(name: str, dtypes: Sequence[str], family: str = "llava") -> list[Cell]:
    """The cells of a named grid, for the given dtypes, of one family."""
    if family in QWEN_ARCHS:
        return qwen_grid(name, dtypes, family)
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


def qwen_grid(name: str, dtypes: Sequence[str], arch: str) -> list[Cell]:
    """A Qwen family's cells: the LLaVA grid's widths and depths with Qwen's proportions
    (GQA, its vocabulary), one square image (576 visual tokens at 672 px; the full grid
    also text alone and a 1512-px image, 2916 tokens, about LLaVA-NeXT's count), plus
    Qwen2-VL-2B's decoder (1536 x 28) in the full grid."""
    if name == "tiny":
        dec = [qwen_like(64, 2, vocab=512)]
        prompts = [Prompt(arch, 24)]
    elif name == "quick":
        dec = [qwen_like(h, n) for h in (256, 1024) for n in (2, 8)]
        prompts = [Prompt(arch, 64)]
    elif name == "full":
        depths = {256: (2, 8, 28), 1024: (2, 8, 28), 1536: (2, 28), 2048: (2,), 3584: (2,)}
        dec = [qwen_like(h, n) for h, ns in depths.items() for n in ns]
        prompts = [Prompt(arch, 64, images=0), Prompt(arch, 64), Prompt(arch, 64, image_px=1512)]
    else:
        raise ValueError(f"unknown grid {name!r}")
    return [Cell(arch, d, p, b, dt) for d in dec for p in prompts for b in (1, 4) for dt in dtypes]


# ---- one random checkpoint, two loaders ------------------------------------------------------


def hf_config(arch: str, decoder: Decoder, tower: AnyTower, max_positions: int = 4096) -> Any:
    """transformers' LlavaConfig / LlavaNextConfig for these shapes (image token 32000,
    like llava-hf, or vocab - 12 for small vocabularies); Qwen: `qwen_hf_config`."""
    if arch in QWEN_ARCHS:
        assert isinstance(tower, QwenTower), tower
        return qwen_hf_config(arch, decoder, tower)
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


def qwen_token_ids(vocab: int) -> dict[str, int]:
    """Qwen's special token ids: the published ones (151643..151656) in Qwen's vocabulary,
    the last 14 ids of a smaller one."""
    base = min(151643, vocab - 14)
    return {name: base + offset for name, offset in QWEN_SPECIAL.items()}


def mrope_section(head_dim: int) -> list[int]:
    """M-RoPE's temporal / height / width split of a head's rotary pairs in Qwen's
    proportions (16 / 24 / 24 of 64 pairs)."""
    pairs = head_dim // 2
    return [pairs // 4, 3 * pairs // 8, pairs - pairs // 4 - 3 * pairs // 8]


def qwen_hf_config(arch: str, decoder: Decoder, tower: QwenTower) -> Any:
    """transformers' Qwen2VLConfig / Qwen2_5_VLConfig for these shapes (Qwen's special
    token ids, rope theta 1e6, untied embeddings as in the 7B models)."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    ids = qwen_token_ids(decoder.vocab)
    text = dict(vocab_size=decoder.vocab, hidden_size=decoder.hidden,
                intermediate_size=decoder.mlp, num_hidden_layers=decoder.layers,
                num_attention_heads=decoder.heads, num_key_value_heads=decoder.kv,
                max_position_embeddings=32768, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                 "mrope_section": mrope_section(decoder.head_dim)},
                bos_token_id=ids["endoftext"], eos_token_id=ids["im_end"],
                pad_token_id=ids["endoftext"])
    common = dict(text_config=text, image_token_id=ids["image_pad"], video_token_id=ids["video_pad"],
                  vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"],
                  tie_word_embeddings=False)
    shape = dict(depth=tower.layers, num_heads=tower.heads, patch_size=tower.patch_size,
                 spatial_merge_size=tower.merge, temporal_patch_size=2, hidden_act=tower.act)
    if arch == "qwen2_vl":
        if tower.mlp % tower.width:
            raise ValueError(f"Qwen2-VL's MLP is a whole multiple of its width: {tower.mlp} / {tower.width}")
        vision = dict(shape, embed_dim=tower.width, hidden_size=decoder.hidden,
                      mlp_ratio=tower.mlp // tower.width)
        return Qwen2VLConfig(vision_config=vision, **common)
    vision = dict(shape, hidden_size=tower.width, out_hidden_size=decoder.hidden,
                  intermediate_size=tower.mlp, window_size=tower.window_size,
                  fullatt_block_indexes=list(tower.fullatt))
    return Qwen2_5_VLConfig(vision_config=vision, **common)


def hf_class(arch: str) -> Any:
    """transformers' model class of an arch."""
    import transformers

    return getattr(transformers, {
        "llava-1.5": "LlavaForConditionalGeneration",
        "llava-next": "LlavaNextForConditionalGeneration",
        "qwen2_vl": "Qwen2VLForConditionalGeneration",
        "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    }[arch])


def image_token_of(config: Any) -> int:
    """The id transformers expands into an image's visual tokens."""
    return config.image_token_id if hasattr(config, "image_token_id") else config.image_token_index


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Seeded random weights of a useful size: matrices ~ N(0, 0.25 / fan_in), norm
    weights ~ 1 + N(0, 0.01), other vectors (biases, embeddings) ~ N(0, 0.01), so that a
    wrong op or a wrong weight shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1 and ("norm" in name or "ln_q" in name) and name.endswith("weight"):
                p.normal_(1.0, 0.1, generator=g)
            elif p.dim() == 1:
                p.normal_(0.0, 0.1, generator=g)
            else:
                p.normal_(0.0, 0.5 / p[0].numel() ** 0.5, generator=g)


def write_checkpoint(out: Path, arch: str, decoder: Decoder, tower: AnyTower, seed: int = 0) -> Path:
    """A random checkpoint built and saved by transformers (float32)."""
    config = hf_config(arch, decoder, tower)
    cls = hf_class(arch)
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

    ours: VisionLanguageModel
    theirs: Any
    arch: str
    tower: AnyTower

    @property
    def device(self) -> torch.device:
        return self.ours.device


def load_pair(path: Path, arch: str, tower: AnyTower, device: torch.device, dtype: torch.dtype) -> Pair:
    """Both loaders on one checkpoint directory, cast to `dtype` on `device`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "loaded without a tokenizer": ids are fed directly
        ours = load_directory(path, device=device, dtype=dtype)
    theirs = hf_class(arch).from_pretrained(path, dtype=dtype).to(device).eval()
    return Pair(ours, theirs, arch, tower)


# ---- inputs ------------------------------------------------------------------------------------


@dataclass
class Inputs:
    """One batch for both models: shortv's Encoded list and transformers' keyword arguments."""

    encoded: list[shortv.Encoded]
    hf: dict[str, Tensor]
    lengths: list[int] = field(default_factory=list)


def make_inputs(cell: Cell, tower: AnyTower, image_token: int, device: torch.device,
                seed: int = 0) -> Inputs:
    """Random text ids (LLaVA's layout: prefix text, the image(s), the rest) and random
    pixel tensors; rows of a batch have different text lengths (left-padded)."""
    if cell.arch in QWEN_ARCHS:
        assert isinstance(tower, QwenTower), tower
        return make_qwen_inputs(cell, tower, image_token, device, seed)
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


QWEN_PREFIX_TEXT = 20  # text tokens before the image in Qwen2-VL's chat template


def make_qwen_inputs(cell: Cell, tower: QwenTower, image_token: int, device: torch.device,
                     seed: int = 0) -> Inputs:
    """Random text ids (prefix text, the image(s), the rest; below Qwen's special ids) and
    random preprocessed images, square, of the prompt's size: shortv's [1, s, s, 4,
    patch_dim] each (`QwenImageProcessor`'s layout), transformers' the same patches
    flattened with image_grid_thw [1, 2s, 2s]. Rows of a batch have different text lengths
    (left-padded with <|endoftext|>); transformers gets mm_token_type_ids and the attention
    mask and computes its own M-RoPE positions (text-only rows: 1-D positions given)."""
    g = torch.Generator().manual_seed(seed)
    pad = image_token - QWEN_SPECIAL["image_pad"]  # <|endoftext|>: Qwen's padding, the first special id
    side = cell.prompt.qwen_side(tower)
    px = side * tower.factor
    patch_dim = 3 * 2 * tower.patch_size ** 2  # channels x temporal patch x patch^2
    unit = tower.merge ** 2
    encoded, rows, pixels = [], [], []
    for n_text in cell.text_lengths():
        text = torch.randint(3, pad, (n_text,), generator=g)
        before = min(QWEN_PREFIX_TEXT, n_text - 1) if cell.prompt.images else n_text
        ids = [*text[:before].tolist(), *[shortv.IMAGE_TOKEN] * cell.prompt.images,
               *text[before:].tolist()]
        images = tuple(torch.randn((1, side, side, unit, patch_dim), generator=g)
                       for _ in range(cell.prompt.images))
        encoded.append(shortv.Encoded(torch.tensor(ids), images, ((px, px),) * len(images)))
        expanded: list[int] = []
        for i in ids:
            expanded += [image_token] * side * side if i == shortv.IMAGE_TOKEN else [i]
        rows.append(expanded)
        pixels += images
    t = max(len(r) for r in rows)
    input_ids = torch.tensor([[pad] * (t - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (t - len(r)) + [1] * len(r) for r in rows])
    hf: dict[str, Tensor] = {"input_ids": input_ids, "attention_mask": mask,
                             "mm_token_type_ids": (input_ids == image_token).int()}
    if pixels:
        hf["pixel_values"] = torch.cat([im.flatten(0, 3) for im in pixels])
        hf["image_grid_thw"] = torch.tensor([[1, tower.merge * side, tower.merge * side]] * len(pixels))
    else:  # without images transformers counts positions from the padding; give them
        hf["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    hf = {k: v.to(device) for k, v in hf.items()}
    return Inputs(encoded, hf, [len(r) for r in rows])


# ---- the measured calls ------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def shortv_prefill(model: VisionLanguageModel, batch: Sequence[shortv.Encoded]) -> Tensor:
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


def shortv_decode(model: VisionLanguageModel, batch: Sequence[shortv.Encoded], n: int
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
    pad = getattr(cfg, "pad_token_id", None)
    gen = GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n,
                           pad_token_id=cfg.text_config.pad_token_id if pad is None else pad,
                           eos_token_id=eos,
                           bos_token_id=cfg.text_config.bos_token_id)
    clock = _Clock()
    out = model.generate(**hf, generation_config=gen, streamer=clock)
    if len(clock.times) != n + 1:
        raise RuntimeError(f"transformers generated {len(clock.times) - 1} tokens, not {n}")
    return clock.times[-1] - clock.times[1], out[:, hf["input_ids"].shape[1]:].T.tolist()


@torch.inference_mode()
def shortv_vision(model: VisionLanguageModel, batch: Sequence[shortv.Encoded]) -> list[Tensor]:
    """shortv's visual tokens of every image of the batch (the tower and its projector /
    patch merger, one call), as `prefill` computes them."""
    images = [im for e in batch for im in e.images]
    sizes = [s for e in batch for s in e.image_sizes]
    return model.module.image_features(images, sizes)


@torch.inference_mode()
def transformers_vision(model: Any, hf: dict[str, Tensor]) -> Any:
    """transformers' visual tokens of every image of the batch, as its forward computes
    them (Qwen: `get_image_features`, the ViT and its patch merger)."""
    return model.model.get_image_features(hf["pixel_values"], hf["image_grid_thw"])


def vision_ours(pair: Pair, inputs: Inputs) -> list[Tensor]:
    return shortv_vision(pair.ours, inputs.encoded)


def vision_theirs(pair: Pair, inputs: Inputs) -> Any:
    return transformers_vision(pair.theirs, inputs.hf)


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
    vision_ms: dict[str, float] = field(default_factory=dict)
    vision_runs_ms: dict[str, list[float]] = field(default_factory=dict)
    prefill_ms: dict[str, float] = field(default_factory=dict)
    prefill_runs_ms: dict[str, list[float]] = field(default_factory=dict)
    decode_tok_s: dict[str, float] = field(default_factory=dict)
    decode_runs_s: dict[str, list[float]] = field(default_factory=dict)
    decode_tokens_match: float | None = None
    skipped: str = ""

    @property
    def vision_ratio(self) -> float | None:
        v = self.vision_ms
        return v["shortv"] / v["transformers"] if v else None

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
                   dtype=c.dtype, text_lengths=c.text_lengths(), vision_ratio=self.vision_ratio,
                   prefill_ratio=self.prefill_ratio, decode_ratio=self.decode_ratio)
        return out


def time_cell(pair: Pair, cell: Cell, inputs: Inputs, result: Result, *, repeats: int,
              warmup: int, new_tokens: int, only: str | None) -> None:
    """Fill `result` with both models' vision (Qwen), prefill and decode timings (medians)."""
    device = pair.device

    def both(ours: Callable[[Pair, Inputs], object], theirs: Callable[[Pair, Inputs], object],
             runs_ms: dict[str, list[float]], median_ms: dict[str, float]) -> None:
        """Time ours and theirs interleaved; each one's runs and median, in ms."""
        runs = interleaved([lambda: timed(lambda: ours(pair, inputs), device),
                            lambda: timed(lambda: theirs(pair, inputs), device)], repeats, warmup)
        for name, r in zip(("shortv", "transformers"), runs, strict=True):
            runs_ms[name] = [s * 1e3 for s in r]
            median_ms[name] = statistics.median(r) * 1e3

    if only in (None, "vision") and cell.arch in QWEN_ARCHS and cell.prompt.images:
        both(vision_ours, vision_theirs, result.vision_runs_ms, result.vision_ms)
    if only in (None, "prefill"):
        both(prefill_ours, prefill_theirs, result.prefill_runs_ms, result.prefill_ms)
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


def run_grid(cells: Sequence[Cell], tower: AnyTower, device: torch.device, *, repeats: int,
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
            image_token = image_token_of(pair.theirs.config)
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


def _label(cell: Cell, tower: AnyTower) -> str:
    return (f"{cell.arch} {cell.decoder.hidden}x{cell.decoder.layers} "
            f"{cell.prompt.describe(tower)} b{cell.batch} {cell.dtype}")


def _summary(r: Result) -> str:
    parts = []
    if r.vision_ms:
        parts.append(f"vision {r.vision_ms['shortv']:.1f} / {r.vision_ms['transformers']:.1f} ms "
                     f"({r.vision_ratio:.2f})")
    if r.prefill_ms:
        parts.append(f"prefill {r.prefill_ms['shortv']:.1f} / {r.prefill_ms['transformers']:.1f} ms "
                     f"({r.prefill_ratio:.2f})")
    if r.decode_tok_s:
        parts.append(f"decode {r.decode_tok_s['shortv']:.1f} / {r.decode_tok_s['transformers']:.1f} "
                     f"tok/s ({r.decode_ratio:.2f})")
    return ", ".join(parts)


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(results: Iterable[Result], tower: AnyTower) -> str:
    """One markdown row per cell (Qwen: ViT columns before the prefill's, and the
    decoder's key/value heads)."""
    results = list(results)
    qwen = any(r.cell.arch in QWEN_ARCHS for r in results)
    vision = ["ViT ms shortv", "transformers", "ratio"] if qwen else []
    heads = "heads (kv) x dim" if qwen else "heads x dim"
    head = ("| arch | hidden | layers | " + heads + " | MLP | prompt (text+visual) | batch | dtype | "
            + "".join(f"{v} | " for v in vision)
            + "prefill ms shortv | transformers | ratio | decode tok/s shortv | transformers "
            "| ratio | max abs diff fp32 |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in results:
        c, d = r.cell, r.cell.decoder
        v, p, t = r.vision_ms, r.prefill_ms, r.decode_tok_s
        if r.skipped:
            cells = ["skipped: " + r.skipped] + [""] * (len(vision) + 6)
        else:
            cells = [_num(p.get("shortv"), ".1f"), _num(p.get("transformers"), ".1f"),
                     _num(r.prefill_ratio, ".2f"), _num(t.get("shortv"), ".1f"),
                     _num(t.get("transformers"), ".1f"), _num(r.decode_ratio, ".2f"),
                     f"{r.fp32_max_abs_diff:.1e}"]
            if vision:
                cells[:0] = [_num(v.get("shortv"), ".1f"), _num(v.get("transformers"), ".1f"),
                             _num(r.vision_ratio, ".2f")]
        shape = f"{d.heads} ({d.kv})x{d.head_dim}" if qwen else f"{d.heads}x{d.head_dim}"
        row = [c.arch, str(d.hidden), str(d.layers), shape, str(d.mlp),
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


def estimate_seconds(cells: Sequence[Cell], tower: AnyTower, rates: dict[str, tuple[float, float]],
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
    parser.add_argument("--family", choices=FAMILIES, default="llava",
                        help="llava: LLaVA-1.5 (and LLaVA-NeXT in the tiny and full grids); "
                             "qwen2_vl / qwen2_5_vl: Qwen2-VL / Qwen2.5-VL")
    parser.add_argument("--grid", choices=("tiny", "quick", "full"), default="quick")
    parser.add_argument("--dtype", help="comma-separated: float32, bfloat16 (default: float32; "
                                        "full grid: float32,bfloat16)")
    parser.add_argument("--device")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, help="greedy tokens generated per decode run")
    parser.add_argument("--only", choices=("vision", "prefill", "decode"),
                        help="time only this (vision: the Qwen families' ViT on its own)")
    parser.add_argument("--real-tower", action="store_true",
                        help="the real models' tower instead of a small one (LLaVA: CLIP "
                             "ViT-L/14-336, 24 layers, 1024 wide; Qwen: 32 blocks, 1280 wide)")
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


def vision_note(family: str) -> str:
    """What the ViT columns time, for the table's preamble."""
    if family not in QWEN_ARCHS:
        return ""
    return ("ViT = images -> visual tokens alone (ViT + patch merger, every image of the batch "
            "in one call); prefill includes it; ")


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
    tower = tower_for(args.family, args.grid, args.real_tower)
    repeats = args.repeats or (1 if tiny else 3)
    new_tokens = args.new_tokens or (4 if tiny else 16)
    max_tflops = args.max_tflops
    cells = [c for c in grid(args.grid, dtypes, args.family)
             if _chosen(args.hidden, c.decoder.hidden) and _chosen(args.layers, c.decoder.layers)
             and _chosen(args.batch, c.batch)]
    if not cells:
        print("bench_vs_transformers: error: no cell of the grid matches the filters", file=sys.stderr)
        return 2
    if args.only == "vision" and args.family not in QWEN_ARCHS:
        print("bench_vs_transformers: error: --only vision times the Qwen families' ViT; "
              "add --family qwen2_vl or --family qwen2_5_vl", file=sys.stderr)
        return 2
    import transformers

    transformers.utils.logging.disable_progress_bar()

    meta = {"command": command, "family": args.family, "torch": torch.__version__,
            "transformers": transformers.__version__,
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
          f"{vision_note(args.family)}"
          f"ratio = shortv time / transformers time; batch 4 rows have text lengths "
          f"n, n-n/8, n-2n/8, n-3n/8 (left-padded); {meta['seconds']:.0f} s in all; "
          f"1-min load average {load_before:.1f} before, {meta['load_average'][1]:.1f} after "
          f"({os.cpu_count()} CPUs: above that, other processes shared the cores)\n")
    print(table(results, tower))
    return 0


if __name__ == "__main__":
    sys.exit(main())
