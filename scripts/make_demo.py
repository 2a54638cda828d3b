"""Make the embedded demo checkpoint `weights/llava-tiny-demo/` reproducibly.

A tiny LLaVA-1.5 in the *original* published layout: config.json (LlavaLlamaForCausalLM
with mm_* fields), model.safetensors with original key names, its own CLIP tower in a
sub-directory named by mm_vision_tower (HF CLIPVisionModel layout), and a SentencePiece
`tokenizer.model` trained here. Weights are random (seeded), so answers are gibberish;
the point is that every code path of a real checkpoint runs offline in seconds.

    python scripts/make_demo.py            # needs the `sentencepiece` package (test extra)
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "weights" / "llava-tiny-demo"
SEED = 1234

VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              image_size=56, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5,
              num_channels=3, model_type="clip_vision_model",
              architectures=["CLIPVisionModel"])
TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=8, num_attention_heads=4,
            num_key_value_heads=4, rms_norm_eps=1e-5, rope_theta=10000.0,
            max_position_embeddings=2048, hidden_act="silu", bos_token_id=1, eos_token_id=2,
            pad_token_id=0, tie_word_embeddings=False)

WORDS = (
    "a an the this that image picture photo photograph shows showing there is are of in on at "
    "with and or but to from under over next beside behind front left right top bottom middle "
    "red green blue yellow orange purple black white gray brown pink color colour shape circle "
    "square triangle line dot star round big small large tiny bright dark light cat dog bird "
    "man woman child person people car bus bike tree house street road sky water table chair "
    "what which who where how many why describe tell me about unusual interesting one two three "
    "four five six seven eight nine ten yes no question answer assistant human user chat "
    "helpful detailed polite answers questions curious artificial intelligence between gives"
).split()


def corpus(n: int = 3000) -> list[str]:
    rng = random.Random(SEED)
    lines = [
        "A chat between a curious human and an artificial intelligence assistant. The "
        "assistant gives helpful, detailed, and polite answers to the human's questions.",
        "USER: What is unusual about this image? ASSISTANT:",
    ]
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 16))]
        if rng.random() < 0.2:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 1999)))
        lines.append(" ".join(words).capitalize() + rng.choice(".?!,:"))
    return lines


def train_tokenizer(path: Path) -> int:
    import io

    import sentencepiece as spm

    # Llama's trainer settings, scaled down: BPE, byte fallback, split digits, identity.
    # Written through model_writer so that no output path ends up inside the file.
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=buffer,
        model_type="bpe", vocab_size=1000, byte_fallback=True, split_digits=True,
        add_dummy_prefix=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, minloglevel=2,
    )
    path.write_bytes(buffer.getvalue())
    return spm.SentencePieceProcessor(model_proto=buffer.getvalue()).get_piece_size()


def random_tensor(g: torch.Generator, *shape: int, std: float = 0.02) -> torch.Tensor:
    return torch.randn(shape, generator=g) * std


def clip_state(g: torch.Generator, vision: dict = VISION) -> dict[str, torch.Tensor]:
    """Random CLIP vision weights under HF CLIPModel names (vision_model.*)."""
    d, m, s = vision["hidden_size"], vision["intermediate_size"], vision["image_size"]
    p = vision["patch_size"]
    state = {
        "vision_model.embeddings.class_embedding": random_tensor(g, d),
        "vision_model.embeddings.patch_embedding.weight": random_tensor(g, d, 3, p, p),
        "vision_model.embeddings.position_embedding.weight": random_tensor(g, (s // p) ** 2 + 1, d),
        "vision_model.pre_layrnorm.weight": torch.ones(d),
        "vision_model.pre_layrnorm.bias": torch.zeros(d),
        "vision_model.post_layernorm.weight": torch.ones(d),
        "vision_model.post_layernorm.bias": torch.zeros(d),
    }
    for i in range(vision["num_hidden_layers"]):
        pre = f"vision_model.encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            state[pre + f"self_attn.{proj}.weight"] = random_tensor(g, d, d)
            state[pre + f"self_attn.{proj}.bias"] = torch.zeros(d)
        for norm in ("layer_norm1", "layer_norm2"):
            state[pre + f"{norm}.weight"] = torch.ones(d)
            state[pre + f"{norm}.bias"] = torch.zeros(d)
        state[pre + "mlp.fc1.weight"] = random_tensor(g, m, d)
        state[pre + "mlp.fc1.bias"] = torch.zeros(m)
        state[pre + "mlp.fc2.weight"] = random_tensor(g, d, m)
        state[pre + "mlp.fc2.bias"] = torch.zeros(d)
    return state


def llava_state(g: torch.Generator, vocab: int, text: dict = TEXT, vision: dict = VISION
                ) -> dict[str, torch.Tensor]:
    """Random LLaVA-1.5 weights under original LLaVA names (no tower)."""
    d, m = text["hidden_size"], text["intermediate_size"]
    v = vision["hidden_size"]
    state = {
        "model.embed_tokens.weight": random_tensor(g, vocab, d),
        "model.norm.weight": torch.ones(d),
        "lm_head.weight": random_tensor(g, vocab, d),
        "model.mm_projector.0.weight": random_tensor(g, d, v),
        "model.mm_projector.0.bias": torch.zeros(d),
        "model.mm_projector.2.weight": random_tensor(g, d, d),
        "model.mm_projector.2.bias": torch.zeros(d),
    }
    for i in range(text["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            state[pre + f"self_attn.{proj}.weight"] = random_tensor(g, d, d)
        state[pre + "mlp.gate_proj.weight"] = random_tensor(g, m, d)
        state[pre + "mlp.up_proj.weight"] = random_tensor(g, m, d)
        state[pre + "mlp.down_proj.weight"] = random_tensor(g, d, m)
        state[pre + "input_layernorm.weight"] = torch.ones(d)
        state[pre + "post_attention_layernorm.weight"] = torch.ones(d)
    return state


def example_image(path: Path) -> None:
    """A small picture for README's first command: a red circle and a blue square."""
    image = Image.new("RGB", (160, 120), (245, 245, 240))
    draw = ImageDraw.Draw(image)
    draw.ellipse((20, 25, 80, 85), fill=(200, 30, 40))
    draw.rectangle((95, 40, 145, 90), fill=(30, 60, 200))
    image.save(path, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    out: Path = args.out
    tower = out / "clip-vit-tiny"
    tower.mkdir(parents=True, exist_ok=True)
    vocab = train_tokenizer(out / "tokenizer.model")
    g = torch.Generator().manual_seed(SEED)

    (tower / "config.json").write_text(json.dumps(VISION, indent=2) + "\n")
    save_file(clip_state(g), str(tower / "model.safetensors"), metadata={"format": "pt"})

    config = {
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava_llama",
        **TEXT,
        "vocab_size": vocab,
        "mm_vision_tower": "clip-vit-tiny",  # resolved relative to this directory
        "mm_projector_type": "mlp2x_gelu",
        "mm_hidden_size": VISION["hidden_size"],
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "image_aspect_ratio": "pad",
        "mm_patch_merge_type": "flat",
        "torch_dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(llava_state(g, vocab), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "tokenizer_config.json").write_text(
        json.dumps({"add_bos_token": True, "legacy": False, "model_max_length": 2048}, indent=2) + "\n"
    )
    example_image(out / "example.png")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({size / 1e6:.1f} MB, vocab {vocab})")


if __name__ == "__main__":
    main()
