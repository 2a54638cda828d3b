"""Random LLaVA-1.5 checkpoints in the original layout, for the benchmark scripts.

`write(out, text, vision, vocab)` writes config.json, model.safetensors (or other formats
via `save`) and a CLIP tower directory `tower/`, with seeded random weights under the
published key names; `tokenizer_from` copies a tokenizer in.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              image_size=56, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5,
              num_channels=3, model_type="clip_vision_model")
TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=8, num_attention_heads=4,
            num_key_value_heads=4, rms_norm_eps=1e-5, rope_theta=10000.0,
            max_position_embeddings=2048, hidden_act="silu", bos_token_id=1, eos_token_id=2)


def _normal(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=g) * 0.02


def clip_state(g: torch.Generator, vision: dict = VISION) -> dict[str, torch.Tensor]:
    """Random CLIP vision weights under HF CLIPModel names (vision_model.*)."""
    d, m, s, p = (vision["hidden_size"], vision["intermediate_size"], vision["image_size"],
                  vision["patch_size"])
    state = {
        "vision_model.embeddings.class_embedding": _normal(g, d),
        "vision_model.embeddings.patch_embedding.weight": _normal(g, d, 3, p, p),
        "vision_model.embeddings.position_embedding.weight": _normal(g, (s // p) ** 2 + 1, d),
        "vision_model.pre_layrnorm.weight": torch.ones(d),
        "vision_model.pre_layrnorm.bias": torch.zeros(d),
        "vision_model.post_layernorm.weight": torch.ones(d),
        "vision_model.post_layernorm.bias": torch.zeros(d),
    }
    for i in range(vision["num_hidden_layers"]):
        pre = f"vision_model.encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            state[pre + f"self_attn.{proj}.weight"] = _normal(g, d, d)
            state[pre + f"self_attn.{proj}.bias"] = torch.zeros(d)
        for norm in ("layer_norm1", "layer_norm2"):
            state[pre + f"{norm}.weight"] = torch.ones(d)
            state[pre + f"{norm}.bias"] = torch.zeros(d)
        state[pre + "mlp.fc1.weight"], state[pre + "mlp.fc1.bias"] = _normal(g, m, d), torch.zeros(m)
        state[pre + "mlp.fc2.weight"], state[pre + "mlp.fc2.bias"] = _normal(g, d, m), torch.zeros(d)
    return state


def llava_state(g: torch.Generator, vocab: int, text: dict = TEXT, vision: dict = VISION
                ) -> dict[str, torch.Tensor]:
    """Random LLaVA-1.5 weights under original LLaVA names (no tower)."""
    d, m, v = text["hidden_size"], text["intermediate_size"], vision["hidden_size"]
    state = {
        "model.embed_tokens.weight": _normal(g, vocab, d),
        "model.norm.weight": torch.ones(d),
        "lm_head.weight": _normal(g, vocab, d),
        "model.mm_projector.0.weight": _normal(g, d, v),
        "model.mm_projector.0.bias": torch.zeros(d),
        "model.mm_projector.2.weight": _normal(g, d, d),
        "model.mm_projector.2.bias": torch.zeros(d),
    }
    for i in range(text["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            state[pre + f"self_attn.{proj}.weight"] = _normal(g, d, d)
        state[pre + "mlp.gate_proj.weight"] = _normal(g, m, d)
        state[pre + "mlp.up_proj.weight"] = _normal(g, m, d)
        state[pre + "mlp.down_proj.weight"] = _normal(g, d, m)
        state[pre + "input_layernorm.weight"] = torch.ones(d)
        state[pre + "post_attention_layernorm.weight"] = torch.ones(d)
    return state


def write(out: Path, text: dict, vision: dict, vocab: int, *, fmt: str = "safetensors",
          shards: int = 1, seed: int = 0) -> Path:
    """A random checkpoint in the original LLaVA-1.5 layout, tower in `out/tower`."""
    g = torch.Generator().manual_seed(seed)
    state = llava_state(g, vocab, text, vision)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tower").mkdir(exist_ok=True)
    (out / "tower" / "config.json").write_text(json.dumps(vision))
    save_file(clip_state(g, vision), str(out / "tower" / "model.safetensors"))
    config = {"architectures": ["LlavaLlamaForCausalLM"], **text, "vocab_size": vocab,
              "mm_vision_tower": "tower", "mm_projector_type": "mlp2x_gelu",
              "mm_vision_select_layer": -2, "image_aspect_ratio": "pad"}
    (out / "config.json").write_text(json.dumps(config))
    keys = sorted(state)
    ext, base = ("safetensors", "model") if fmt == "safetensors" else ("bin", "pytorch_model")
    weight_map = {}
    for i in range(shards):
        part = keys[i::shards]
        name = f"{base}.{ext}" if shards == 1 else f"{base}-{i + 1:05d}-of-{shards:05d}.{ext}"
        chunk = {k: state[k] for k in part}
        if fmt == "safetensors":
            save_file(chunk, str(out / name))
        else:
            torch.save(chunk, out / name)
        weight_map.update(dict.fromkeys(part, name))
    if shards > 1:
        (out / f"{base}.{ext}.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return out


def tokenizer_from(source: Path, out: Path) -> None:
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(source / name, out / name)
