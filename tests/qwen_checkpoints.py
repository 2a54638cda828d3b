"""Tiny random Qwen2-VL / Qwen2.5-VL checkpoints, made with transformers in the published
layouts: transformers 5's own `save_pretrained` (`model.visual.*`, `model.language_model.*`,
nested `text_config`) and Qwen's original release (`visual.*`, `model.*`, flat config with
`rope_scaling`), with a tiny byte-level BPE tokenizer carrying Qwen's special tokens and
Qwen2-VL-Instruct's chat template."""

from __future__ import annotations

import json
from pathlib import Path

import tokenizers
import torch
from safetensors.torch import save_file
from tokenizers import Regex, decoders, normalizers, pre_tokenizers, processors

# Qwen/Qwen2-VL-7B-Instruct's chat_template.json (the same text as its tokenizer_config.json's
# "chat_template"), as transformers' own tests carry it: huggingface/transformers,
# tests/models/qwen2_vl/test_processor_qwen2_vl.py, Qwen2VLProcessorTest.prepare_processor_dict.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2's pre-tokenizer split (tokenizer.json of every Qwen2 / Qwen2-VL checkpoint).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
               r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2-VL's added tokens, in their order (ids 151643.. in the real vocabulary).
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
                "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
                "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                "<|image_pad|>", "<|video_pad|>"]
CORPUS = [
    "A chat between a user and an assistant. What is shown in this image?",
    "The cat sits on the red mat. It's 2024, isn't it? I'll say: yes!",
    "Describe the picture in detail.\nThen compare them, line by line.\n\n  Indented   text.",
    "Café, naïve, 東京, Ünïcödé and emoji 🙂 too; numbers 12345 and 3.14.",
]


def make_qwen_tokenizer(directory: Path) -> Path:
    """A tiny byte-level BPE with Qwen2's normalizer, pre-tokenizer, decoder and special
    tokens, saved as tokenizer.json + tokenizer_config.json like Qwen2-VL-Instruct's."""
    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.decoder = decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=420, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(CORPUS * 3, trainer)
    backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                                for t in QWEN_SPECIAL])
    directory.mkdir(parents=True, exist_ok=True)
    backend.save(str(directory / "tokenizer.json"))
    decoder = {str(backend.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False,
                                             "rstrip": False, "single_word": False, "special": True}
               for t in QWEN_SPECIAL}
    config = {
        "add_prefix_space": False, "added_tokens_decoder": decoder,
        "additional_special_tokens": QWEN_SPECIAL[1:3] + QWEN_SPECIAL[3:],
        "bos_token": None, "chat_template": QWEN2_VL_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
        "model_max_length": 32768, "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return directory



VARIANTS = ("qwen2_vl", "qwen2_5_vl")


def tiny_config(variant: str, token_ids: dict[str, int], *, tied: bool = False):
    """A tiny transformers config of the variant whose special token ids are the tiny
    tokenizer's. Head dim 16 with mrope_section (2, 3, 3); the tower has 4 blocks (2.5:
    full attention in blocks 1 and 3, 112-px windows)."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    text = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                    "mrope_section": [2, 3, 3]},
                bos_token_id=token_ids["<|endoftext|>"], eos_token_id=token_ids["<|im_end|>"])
    ids = dict(image_token_id=token_ids["<|image_pad|>"], video_token_id=token_ids["<|video_pad|>"],
               vision_start_token_id=token_ids["<|vision_start|>"],
               vision_end_token_id=token_ids["<|vision_end|>"], tie_word_embeddings=tied)
    if variant == "qwen2_vl":
        vision = dict(depth=3, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
        return Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
    vision = dict(depth=4, hidden_size=32, out_hidden_size=64, num_heads=2, intermediate_size=48,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  fullatt_block_indexes=[1, 3], hidden_act="silu")
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)


def build_model(variant: str, directory: Path, *, tied: bool = False, seed: int = 0):
    """The tiny transformers model (eval mode, fp32) with its tokenizer in `directory`,
    random weights scaled so that outputs are far from zero."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    make_qwen_tokenizer(directory)
    backend = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    token_ids = {t: backend.token_to_id(t) for t in QWEN_SPECIAL}
    config = tiny_config(variant, token_ids, tied=tied)
    cls = Qwen2VLForConditionalGeneration if variant == "qwen2_vl" else Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_q" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.5 / max(1, p.shape[-1]) ** 0.5))
    return model


def save_transformers(model, directory: Path) -> Path:
    """transformers 5's layout, as `save_pretrained` writes it (tokenizer files kept)."""
    model.save_pretrained(directory)
    return directory


def save_original(model, directory: Path, *, shards: int = 2) -> Path:
    """Qwen's original release layout: flat config.json (decoder fields at the top level,
    `rope_scaling` with type mrope, vision_config as Qwen wrote it) and `visual.*`,
    `model.*`, `lm_head.weight` in sharded safetensors with an index."""
    config = model.config
    text, vision = config.text_config, config.vision_config
    raw = {
        "architectures": [type(model).__name__], "model_type": config.model_type,
        "hidden_size": text.hidden_size, "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_hidden_layers, "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads, "vocab_size": text.vocab_size,
        "max_position_embeddings": text.max_position_embeddings, "rms_norm_eps": text.rms_norm_eps,
        "rope_theta": text.rope_parameters["rope_theta"], "hidden_act": "silu",
        "rope_scaling": {"type": "mrope", "mrope_section": text.rope_parameters["mrope_section"]},
        "sliding_window": 32768, "use_sliding_window": False, "max_window_layers": 28,
        "tie_word_embeddings": config.tie_word_embeddings, "bos_token_id": text.bos_token_id,
        "eos_token_id": text.eos_token_id, "image_token_id": config.image_token_id,
        "video_token_id": config.video_token_id, "vision_start_token_id": config.vision_start_token_id,
        "vision_end_token_id": config.vision_end_token_id, "torch_dtype": "float32",
    }
    if config.model_type == "qwen2_vl":
        raw["vision_config"] = {"depth": vision.depth, "embed_dim": vision.embed_dim,
                                "mlp_ratio": vision.mlp_ratio, "num_heads": vision.num_heads,
                                "in_chans": 3, "hidden_size": vision.hidden_size,
                                "patch_size": vision.patch_size, "spatial_patch_size": vision.patch_size,
                                "spatial_merge_size": vision.spatial_merge_size,
                                "temporal_patch_size": vision.temporal_patch_size}
    else:
        raw["vision_config"] = {"depth": vision.depth, "hidden_act": "silu",
                                "hidden_size": vision.hidden_size,
                                "intermediate_size": vision.intermediate_size,
                                "num_heads": vision.num_heads, "in_chans": 3,
                                "out_hidden_size": vision.out_hidden_size,
                                "patch_size": vision.patch_size,
                                "spatial_merge_size": vision.spatial_merge_size,
                                "spatial_patch_size": vision.patch_size,
                                "window_size": vision.window_size,
                                "fullatt_block_indexes": list(vision.fullatt_block_indexes),
                                "tokens_per_second": 2, "temporal_patch_size": vision.temporal_patch_size}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(raw, indent=2))
    state = {}
    for key, value in model.state_dict().items():
        if config.tie_word_embeddings and key == "lm_head.weight":
            continue
        key = key.replace("model.visual.", "visual.").replace("model.language_model.", "model.")
        state[key] = value.contiguous().clone()
    keys = sorted(state)
    per = -(-len(keys) // shards)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i * per:(i + 1) * per]}
        save_file(part, str(directory / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "preprocessor_config.json").write_text(json.dumps({
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
        "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor"}))
    return directory
