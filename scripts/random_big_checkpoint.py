"""A full-size random LLaVA checkpoint in the original (liuhaotian/*) layout, written shard by shard.

    python scripts/random_big_checkpoint.py MODEL OUT_DIR [--dtype bfloat16] [--shard-gb 2]
        [--seed 0] [--layers N]

MODEL is a LLaVA zoo name (`models/*.toml`, e.g. llava-v1.6-vicuna-13b, llava-v1.5-7b); its
card gives every size. OUT_DIR (new or empty) gets config.json, model-0000i-of-0000N.safetensors
with model.safetensors.index.json, and the demo's tokenizer (weights/llava-tiny-demo: 1000
tokens, ids valid for any LLaVA vocabulary). The vision tower is carried inside the checkpoint
under model.vision_tower.vision_tower.vision_model.*, as LLaVA-NeXT's originals do, for
LLaVA-1.5 cards too, so no tower directory is needed. Weights are seeded normal(0, 0.02), norm
weights 1, biases 0, and lm_head's rows past the tokenizer's 1000 pieces 0 (so that greedy answers
are random text, not ids the tokenizer cannot spell). --layers N overrides the decoder depth.

It exists to measure loading (time, peak RSS) of models bigger than the machine's memory
(LLaVA-NeXT-13B: 26 GB of bf16 weights), so it never holds more than one shard (--shard-gb,
10^9 bytes) of tensors: the key list and shapes are planned first (cheap), keys are assigned
to shards by cumulative size, and each shard is generated, saved and freed in turn.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from shortv import zoo
from shortv.models.config import KNOWN_TOWERS, LlavaConfig, TextConfig, VisionConfig, projector_depth

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "weights" / "llava-tiny-demo"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json")
TOKENIZER_VOCAB = 1000  # the demo tokenizer's pieces
INDEX = "model.safetensors.index.json"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
GB = 10**9
STD = 0.02
# Where original LLaVA-NeXT checkpoints keep their tuned CLIP tower (shortv.llava_family.TOWER_PREFIX
# plus the CLIPVisionModel wrapper's own prefix).
TOWER = "model.vision_tower.vision_tower.vision_model."
# A tower shortv does not know by name gets its config.json here, beside the weights.
TOWER_CONFIG_DIR = "vision_tower"


@dataclass(frozen=True)
class Spec:
    """One tensor to write: its checkpoint key, shape and how it is initialised."""

    key: str
    shape: tuple[int, ...]
    init: str  # "normal", "ones" or "zeros"
    # Rows after the first `normal_rows` are zero (the head's rows the tokenizer cannot spell).
    normal_rows: int | None = None

    def nbytes(self, dtype: torch.dtype) -> int:
        return math.prod(self.shape) * dtype.itemsize


def _spec(key: str, *shape: int) -> Spec:
    # Biases start at 0 and norm scales at 1, as freshly built modules do; every LayerNorm
    # and RMSNorm key contains "norm" (CLIP's "pre_layrnorm" too), no other key does.
    if key.endswith("bias"):
        return Spec(key, shape, "zeros")
    if key.endswith("weight") and "norm" in key:
        return Spec(key, shape, "ones")
    return Spec(key, shape, "normal")


def decoder_layer(i: int, t: TextConfig) -> list[Spec]:
    """One Llama decoder layer under original LLaVA's names (model.layers.i.*)."""
    h, pre = t.hidden_size, f"model.layers.{i}."
    out = {"q": t.q_dim, "k": t.kv_dim, "v": t.kv_dim}
    specs = [_spec(f"{pre}self_attn.{p}_proj.weight", n, h) for p, n in out.items()]
    specs.append(_spec(f"{pre}self_attn.o_proj.weight", h, t.q_dim))
    if t.attention_bias:
        specs += [_spec(f"{pre}self_attn.{p}_proj.bias", n) for p, n in out.items()]
    if t.out_bias:
        specs.append(_spec(f"{pre}self_attn.o_proj.bias", h))
    specs += [_spec(f"{pre}mlp.gate_proj.weight", t.intermediate_size, h),
              _spec(f"{pre}mlp.up_proj.weight", t.intermediate_size, h),
              _spec(f"{pre}mlp.down_proj.weight", h, t.intermediate_size)]
    if t.mlp_bias:
        specs += [_spec(f"{pre}mlp.{p}_proj.bias", t.intermediate_size) for p in ("gate", "up")]
        specs.append(_spec(f"{pre}mlp.down_proj.bias", h))
    specs += [_spec(f"{pre}input_layernorm.weight", h), _spec(f"{pre}post_attention_layernorm.weight", h)]
    return specs


def projector(config: LlavaConfig) -> list[Spec]:
    """model.mm_projector: one Linear ('linear', unindexed) or an nn.Sequential of Linear and
    GELU ('mlpNx_gelu'), whose Linear layers sit at the even indices 0, 2, 4, ..."""
    h, depth = config.text.hidden_size, projector_depth(config.projector)
    if config.projector == "linear":
        return [_spec("model.mm_projector.weight", h, config.vision_feature_size),
                _spec("model.mm_projector.bias", h)]
    specs = []
    for j in range(depth):
        width_in = config.vision_feature_size if j == 0 else h
        specs += [_spec(f"model.mm_projector.{2 * j}.weight", h, width_in),
                  _spec(f"model.mm_projector.{2 * j}.bias", h)]
    return specs


def tower(v: VisionConfig) -> list[Spec]:
    """The whole CLIP vision tower under HF CLIPVisionModel names: all its layers (the loader
    skips those after the deepest selected one itself) and the final LayerNorm it never uses."""
    w, e = v.width, f"{TOWER}embeddings."
    specs = [_spec(f"{e}class_embedding", w),
             _spec(f"{e}patch_embedding.weight", w, v.channels, v.patch_size, v.patch_size),
             _spec(f"{e}position_embedding.weight", v.num_patches + 1, w),
             _spec(f"{TOWER}pre_layrnorm.weight", w), _spec(f"{TOWER}pre_layrnorm.bias", w)]
    # Each module of a tower layer: (name, weight shape); every one has a bias of its output width.
    modules = [*((f"self_attn.{p}_proj", (w, w)) for p in ("q", "k", "v", "out")),
               ("layer_norm1", (w,)), ("layer_norm2", (w,)),
               ("mlp.fc1", (v.mlp_dim, w)), ("mlp.fc2", (w, v.mlp_dim))]
    for i in range(v.layers):
        for module, shape in modules:
            pre = f"{TOWER}encoder.layers.{i}.{module}."
            specs += [_spec(pre + "weight", *shape), _spec(pre + "bias", shape[0])]
    return [*specs, _spec(f"{TOWER}post_layernorm.weight", w), _spec(f"{TOWER}post_layernorm.bias", w)]


def plan(config: LlavaConfig) -> list[Spec]:
    """Every tensor of the checkpoint, in the order the original shards keep them:
    embeddings and decoder layers first, then the head, projector and tower."""
    t = config.text
    specs = [_spec("model.embed_tokens.weight", t.vocab_size, t.hidden_size)]
    for i in range(t.layers):
        specs += decoder_layer(i, t)
    specs.append(_spec("model.norm.weight", t.hidden_size))
    if not t.tie_word_embeddings:
        # Rows past the demo tokenizer's pieces are zero: their logits are 0 while the max of
        # the random ones is above 0, so greedy answers are text rather than unspellable ids.
        specs.append(Spec("lm_head.weight", (t.vocab_size, t.hidden_size), "normal",
                          normal_rows=min(TOKENIZER_VOCAB, t.vocab_size)))
    specs += projector(config)
    if config.uses_image_newline:
        specs.append(_spec("model.image_newline", t.hidden_size))
    return specs + tower(config.vision)


def shard(specs: list[Spec], dtype: torch.dtype, limit: int) -> list[list[Spec]]:
    """Consecutive groups of at most `limit` bytes (a larger tensor gets a shard of its own)."""
    shards: list[list[Spec]] = [[]]
    size = 0
    for spec in specs:
        n = spec.nbytes(dtype)
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += n
    return shards


def make(spec: Spec, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """The tensor itself; normal_ straight in the target dtype (no float32 copy, and the
    fastest of the ways tried on CPU)."""
    if spec.init == "ones":
        return torch.ones(spec.shape, dtype=dtype)
    if spec.init == "zeros":
        return torch.zeros(spec.shape, dtype=dtype)
    tensor = torch.empty(spec.shape, dtype=dtype)
    rows = spec.shape[0] if spec.normal_rows is None else spec.normal_rows
    tensor[:rows].normal_(0.0, STD, generator=g)
    tensor[rows:].zero_()
    return tensor


def write_shards(out: Path, shards: list[list[Spec]], dtype: torch.dtype, seed: int) -> dict[str, str]:
    """Generate, save and free one shard at a time; {key: file name} for the index."""
    g = torch.Generator().manual_seed(seed)
    total = sum(s.nbytes(dtype) for part in shards for s in part)
    weight_map: dict[str, str] = {}
    written, start = 0, time.perf_counter()
    for i, part in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {s.key: make(s, dtype, g) for s in part}
        # safetensors >= 0.5 writes from the tensors' own memory, so the shard is held once.
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        del tensors
        weight_map.update(dict.fromkeys((s.key for s in part), name))
        written += sum(s.nbytes(dtype) for s in part)
        print(f"shard {i}/{len(shards)}: {len(part)} tensors, {written / GB:.2f}/{total / GB:.2f} GB, "
              f"{time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return weight_map


def tower_source(name: str, card_tower: str | None, vision: VisionConfig, out: Path) -> str:
    """mm_vision_tower: the card's tower when shortv knows its shape by name (it then needs no
    files, the weights being in the checkpoint), else a config-only directory in OUT_DIR."""
    if card_tower is not None and KNOWN_TOWERS.get(card_tower) == vision:
        return card_tower
    clip = {"model_type": "clip_vision_model", "hidden_size": vision.width,
            "intermediate_size": vision.mlp_dim, "num_hidden_layers": vision.layers,
            "num_attention_heads": vision.heads, "image_size": vision.image_size,
            "patch_size": vision.patch_size, "hidden_act": vision.act,
            "layer_norm_eps": vision.norm_eps, "num_channels": vision.channels}
    (out / TOWER_CONFIG_DIR).mkdir()
    (out / TOWER_CONFIG_DIR / "config.json").write_text(json.dumps(clip, indent=2) + "\n")
    print(f"{name}: tower {card_tower!r} is not one shortv knows by name; its config is in "
          f"{out / TOWER_CONFIG_DIR}", file=sys.stderr)
    return TOWER_CONFIG_DIR


def config_json(name: str, config: LlavaConfig, tower_name: str, dtype: str) -> dict[str, Any]:
    """config.json as original LLaVA writes it: the Llama fields at the top level plus mm_*."""
    t = config.text
    # LLaVA-NeXT-Mistral is the one original release of another architecture class.
    mistral = "mistral" in name
    d: dict[str, Any] = {
        "architectures": ["LlavaMistralForCausalLM" if mistral else "LlavaLlamaForCausalLM"],
        "model_type": "llava_mistral" if mistral else "llava_llama",
        "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.layers, "num_attention_heads": t.heads,
        "num_key_value_heads": t.kv_heads, "hidden_act": "silu", "rms_norm_eps": t.rms_norm_eps,
        "rope_theta": t.rope_theta, "rope_scaling": None,
        "max_position_embeddings": t.max_position_embeddings, "vocab_size": t.vocab_size,
        "tie_word_embeddings": t.tie_word_embeddings, "attention_bias": t.attention_bias,
        "mlp_bias": t.mlp_bias, "bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id,
        "pad_token_id": t.pad_token_id, "torch_dtype": dtype, "use_cache": True,
        "mm_vision_tower": tower_name, "mm_projector_type": config.projector,
        "mm_hidden_size": config.vision_feature_size,
        "mm_vision_select_layer": (config.vision_select_layers[0] if len(config.vision_select_layers) == 1
                                   else list(config.vision_select_layers)),
        "mm_vision_select_feature": config.vision_select_feature,
        "image_aspect_ratio": config.image_aspect_ratio,
        "mm_patch_merge_type": config.patch_merge_type,
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
    }
    if config.image_grid_pinpoints:
        d["image_grid_pinpoints"] = [list(p) for p in config.image_grid_pinpoints]
    if t.head_dim * t.heads != t.hidden_size:  # else readers derive it, as originals expect
        d["head_dim"] = t.head_dim
    if mistral or t.sliding_window is not None:
        # Explicit null: a missing sliding_window means MistralConfig's 4096, which would cap
        # the context.
        d["sliding_window"] = t.sliding_window
    return d


def card_config(name: str, layers: int | None) -> tuple[zoo.Card, LlavaConfig]:
    """The card and its config, with the decoder depth overridden by --layers."""
    card = zoo.card(name)
    if card is None or card.family != "llava":
        raise SystemExit(f"{name!r} is not a LLaVA zoo model (see `shortv zoo`)")
    config = card.config
    if layers is not None:
        config = config.replace(text=dataclasses.replace(config.text, layers=layers))
    return card, config


def prepare(out: Path, total: int) -> None:
    """An empty OUT_DIR with room for `total` bytes: stale shards of another run must not be
    mixed in, and a disk filled halfway would hurt whoever shares it."""
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty; remove it or choose another OUT_DIR")
    out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out).free
    if total > free:
        raise SystemExit(f"{out}: the checkpoint needs {total / GB:.1f} GB, the disk has "
                         f"{free / GB:.1f} GB free")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a LLaVA zoo name, e.g. llava-v1.6-vicuna-13b")
    parser.add_argument("out", type=Path, help="output directory (new or empty)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--shard-gb", type=float, default=2.0, help="shard size limit, 10^9 bytes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, help="decoder depth instead of the card's")
    args = parser.parse_args()
    if args.shard_gb <= 0:
        raise SystemExit("--shard-gb must be positive")

    card, config = card_config(args.model, args.layers)
    dtype = DTYPES[args.dtype]
    specs = plan(config)
    shards = shard(specs, dtype, int(args.shard_gb * GB))
    total = sum(s.nbytes(dtype) for s in specs)
    prepare(args.out, total)
    print(f"{card.name}: {config.text.layers} decoder layers, {len(specs)} tensors, "
          f"{total / GB:.2f} GB in {len(shards)} shards", file=sys.stderr)

    weight_map = write_shards(args.out, shards, dtype, args.seed)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (args.out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    tower_name = tower_source(card.name, card.vision_tower, config.vision, args.out)
    config_data = config_json(card.name, config, tower_name, args.dtype)
    (args.out / "config.json").write_text(json.dumps(config_data, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        shutil.copy(DEMO / name, args.out / name)
    print(f"{args.out}: {total / GB:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
