"""Tiny random checkpoints in the real published layouts, built with transformers.

transformers writes the *transformers* layout itself (`save_pretrained`); the *original*
LLaVA layout (liuhaotian/*) is produced by renaming those tensors the way the original
repos name them and writing an original-style config.json, with the vision tower either
inside (v1.6) or in a separate HF CLIPModel directory (v1.5).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              image_size=28, patch_size=14, projection_dim=16)
TEXT = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=4096)
# LLaVA-NeXT's pinpoints scaled to the tiny tower's 28-pixel tiles.
PINPOINTS = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]

WORDS = (
    "the a an image picture photo shows cat dog red blue green car tree house man woman "
    "sitting standing on in under next to with what is this color of how many are there "
    "describe unusual about question answer assistant human chat helpful detailed polite "
    "left right top bottom small large bright dark water sky street table two three four"
).split()


def corpus(lines: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = [
        "A chat between a curious human and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the human's questions.",
        "USER: What is unusual about this image? ASSISTANT: The man is ironing on a taxi.",
    ]
    for _ in range(lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 14))]
        if rng.random() < 0.3:
            words.append(str(rng.randint(0, 2025)))
        out.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ","]))
    return out


def train_sentencepiece(path: Path, vocab_size: int = 400) -> Path:
    """A Llama-like SentencePiece BPE model (byte fallback, split digits, identity)."""
    import sentencepiece as spm

    path.parent.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_prefix=str(path.with_suffix("")),
        model_type="bpe", vocab_size=vocab_size, byte_fallback=True, split_digits=True,
        add_dummy_prefix=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2,
    )
    return path


def sp_vocab_size(model: Path) -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(model)).get_piece_size()


def make_llava(out: Path, tokenizer_model: Path, *, next_: bool = False, seed: int = 0,
               text: dict | None = None, vision: dict | None = None, text_model: str = "llama",
               tokenizer_config: dict | None = None, **config) -> Path:
    """A transformers Llava (or LlavaNext) checkpoint with random weights, saved by
    transformers, plus the SentencePiece tokenizer. The image token is the id after the
    tokenizer's vocabulary, like llava-hf's 32000. text_model: "llama" (LlamaConfig: Vicuna,
    Yi) or "mistral" (MistralConfig); tokenizer_config: the tokenizer_config.json to write
    (default: legacy false, BOS added)."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        MistralConfig,
    )

    vocab = sp_vocab_size(tokenizer_model)
    torch.manual_seed(seed)
    vc = CLIPVisionConfig(**{**VISION, **(vision or {})})
    text_class = {"llama": LlamaConfig, "mistral": MistralConfig}[text_model]
    tc = text_class(**{**TEXT, **(text or {}), "vocab_size": vocab + 1})
    if next_:
        cfg = LlavaNextConfig(vision_config=vc, text_config=tc, image_token_index=vocab,
                              image_grid_pinpoints=PINPOINTS, **config)
        model = LlavaNextForConditionalGeneration(cfg)
    else:
        cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_index=vocab, **config)
        model = LlavaForConditionalGeneration(cfg)
    _randomize(model, seed)
    model.save_pretrained(out)
    shutil.copy(tokenizer_model, out / "tokenizer.model")
    (out / "tokenizer_config.json").write_text(json.dumps(
        tokenizer_config if tokenizer_config is not None else {"legacy": False, "add_bos_token": True}))
    return out


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Larger random weights than transformers' init, so that errors show in the logits
    and norms/biases are not all ones and zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() == 1 and "norm" in name:
                p.copy_(1 + 0.1 * noise)
            elif p.dim() == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise * 0.5 / p.shape[-1] ** 0.5)


# ---- the original layout --------------------------------------------------------------------


def _original_name(key: str) -> str | None:
    """transformers (as saved by v5, legacy names) → original LLaVA names; None = tower."""
    if key.startswith("language_model.model."):
        return "model." + key[len("language_model.model."):]
    if key == "language_model.lm_head.weight":
        return "lm_head.weight"
    if key.startswith("multi_modal_projector.linear_"):
        n, rest = key[len("multi_modal_projector.linear_"):].split(".", 1)
        return f"model.mm_projector.{2 * (int(n) - 1)}.{rest}"
    if key == "image_newline":
        return "model.image_newline"
    if key.startswith("vision_tower."):
        return None
    raise KeyError(key)


def _tower_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        if k.startswith("vision_tower."):
            rest = k[len("vision_tower."):]
            rest = rest[len("vision_model."):] if rest.startswith("vision_model.") else rest
            out["vision_model." + rest] = v
    return out


def to_original(hf_dir: Path, out: Path, *, fmt: str = "safetensors", shards: int = 1,
                tower: str = "separate", tower_dir_name: str = "clip-tower",
                rotary_buffers: bool = False, relative_tower: bool = False) -> Path:
    """Rewrite a transformers checkpoint into original LLaVA's layout.

    tower="separate": v1.5 style, the tower in its own HF CLIPModel directory (text tower
    random) named by mm_vision_tower; tower="inside": v1.6 style, under
    model.vision_tower.vision_tower.vision_model.*.
    """
    out.mkdir(parents=True, exist_ok=True)
    hf_config = json.loads((hf_dir / "config.json").read_text())
    state = load_file(str(hf_dir / "model.safetensors"))
    renamed = {n: v for k, v in state.items() if (n := _original_name(k)) is not None}
    tower_state = _tower_keys(state)
    text = hf_config["text_config"]
    if rotary_buffers:  # transformers 4.31 saved these buffers; loaders must skip them
        hd = text["hidden_size"] // text["num_attention_heads"]
        for i in range(text["num_hidden_layers"]):
            renamed[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(hd // 2)
    if tower == "inside":
        for k, v in tower_state.items():
            renamed["model.vision_tower.vision_tower." + k] = v
        # The tower's config.json still comes from the mm_vision_tower directory.
        _write_clip(out / tower_dir_name, hf_config["vision_config"], tower_state)
        tower_name = tower_dir_name if relative_tower else str(out / tower_dir_name)
    else:
        tower_path = out / tower_dir_name
        _write_clip(tower_path, hf_config["vision_config"], tower_state)
        tower_name = tower_dir_name if relative_tower else str(tower_path)
    next_ = hf_config.get("model_type") == "llava_next"
    mistral = text.get("model_type") == "mistral"  # liuhaotian/llava-v1.6-mistral-7b
    config = {
        "architectures": ["LlavaMistralForCausalLM" if mistral else "LlavaLlamaForCausalLM"],
        "model_type": "llava_mistral" if mistral else "llava_llama",
        **{k: v for k, v in text.items() if k not in ("model_type", "architectures")},
        "mm_vision_tower": tower_name,
        "mm_projector_type": "mlp2x_gelu",
        "mm_hidden_size": hf_config["vision_config"]["hidden_size"],
        "mm_vision_select_layer": hf_config.get("vision_feature_layer", -2),
        "mm_vision_select_feature": "patch",
        "image_aspect_ratio": "anyres" if next_ else "pad",
        "mm_patch_merge_type": "spatial_unpad" if next_ else "flat",
        "torch_dtype": "float32",
    }
    if "rope_parameters" in config:
        config["rope_theta"] = config.pop("rope_parameters")["rope_theta"]
    if next_:
        config["image_grid_pinpoints"] = hf_config["image_grid_pinpoints"]
    (out / "config.json").write_text(json.dumps(config, indent=2))
    _write_weights(out, renamed, fmt, shards)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                 "added_tokens.json"):
        if (hf_dir / name).exists():
            shutil.copy(hf_dir / name, out / name)
    return out


def _write_clip(path: Path, vision_config: dict, tower_state: dict[str, torch.Tensor]) -> None:
    """A full HF CLIPModel directory whose vision tower carries `tower_state`."""
    from transformers import CLIPConfig, CLIPModel

    vc = {k: v for k, v in vision_config.items() if k not in ("model_type", "architectures")}
    cfg = CLIPConfig(vision_config=vc, text_config=dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        vocab_size=64, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
        pad_token_id=1), projection_dim=vc.get("projection_dim", 16))
    clip = CLIPModel(cfg)
    missing, unexpected = clip.load_state_dict(tower_state, strict=False)
    assert not unexpected, unexpected
    assert all(not k.startswith("vision_model.") for k in missing), missing
    clip.save_pretrained(path)


def _write_weights(out: Path, state: dict[str, torch.Tensor], fmt: str, shards: int) -> None:
    keys = sorted(state)
    ext = "safetensors" if fmt == "safetensors" else "bin"
    base = "model" if fmt == "safetensors" else "pytorch_model"
    if shards == 1:
        _save(state, out / f"{base}.{ext}", fmt)
        return
    weight_map = {}
    for i in range(shards):
        part = {k: state[k].contiguous() for k in keys[i::shards]}
        name = f"{base}-{i + 1:05d}-of-{shards:05d}.{ext}"
        _save(part, out / name, fmt)
        weight_map.update({k: name for k in part})
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
             "weight_map": weight_map}
    (out / f"{base}.{ext}.index.json").write_text(json.dumps(index, indent=2))


def _save(state: dict[str, torch.Tensor], path: Path, fmt: str) -> None:
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})
    else:
        torch.save(state, path)


# ---- shared between test modules ----------------------------------------------------------


_built: dict[tuple, Path] = {}


def original_bin_checkpoint(hf_dir: Path, out: Path) -> Path:
    """hf_dir in original LLaVA-1.5's layout as 3 `.bin` shards with rotary buffers
    (built once per session and shared between test modules)."""
    key = ("bin", hf_dir)
    if key not in _built:
        _built[key] = to_original(hf_dir, out, fmt="bin", shards=3, rotary_buffers=True)
    return _built[key]


# ---- weights of single modules ------------------------------------------------------------


def randomize(module: nn.Module, seed: int = 0) -> None:
    """Random weights of a useful size (norm weights near 1, biases and embeddings non-zero)
    so that a wrong mapping or a wrong op shows up in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            owner = name.rsplit(".", 2)[-2] if name.count(".") else ""
            is_norm = "norm" in owner or owner.startswith("ln")
            if p.dim() == 1 and is_norm and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            elif p.dim() == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise * 0.5 / p.shape[-1] ** 0.5)
