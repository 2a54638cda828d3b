"""Make the embedded demo checkpoint `weights/llava-tiny-demo/` reproducibly.

A tiny LLaVA-1.5 (CLIP-style tower 56 px / 3 layers / width 64, 8-layer decoder of width
128, 1000-token SentencePiece vocabulary) trained here from scratch for a few minutes on
the CPU on synthetic scenes — coloured circles, squares and triangles — to answer simple
questions about them. It is written in the *original* published layout: config.json
(LlavaLlamaForCausalLM with mm_* fields), model.safetensors with original key names, its
own CLIP tower in a sub-directory named by mm_vision_tower (HF CLIPVisionModel layout),
and a `tokenizer.model` trained here. So every code path of a real checkpoint runs,
offline, in seconds, and the answers make sense.

The script also measures Layer Contribution on held-out scenes and prints the ranking
for the demo's zoo card, and the answer accuracy of vanilla / ShortV / FastV / VTW.

    python scripts/make_demo.py            # needs the `sentencepiece` package (test extra)

Training is seeded (about 30 minutes on 2 CPU cores); with --threads 1 a rerun on the
same torch build gives bit-identical weights.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors.torch import save_file

import shortv
from shortv import lc
from shortv.llava import LLaVA
from shortv.models.config import LlavaConfig, TextConfig, VisionConfig
from shortv.models.llava import LlavaModel
from shortv.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "weights" / "llava-tiny-demo"
SEED = 1234

VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              image_size=84, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5,
              num_channels=3, model_type="clip_vision_model",
              architectures=["CLIPVisionModel"])
TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=8, num_attention_heads=4,
            num_key_value_heads=4, rms_norm_eps=1e-5, rope_theta=10000.0,
            max_position_embeddings=2048, hidden_act="silu", bos_token_id=1, eos_token_id=2,
            pad_token_id=0, tie_word_embeddings=False)

# ---- synthetic scenes ---------------------------------------------------------------------

COLOURS = {"red": (210, 35, 40), "green": (40, 160, 60), "blue": (35, 70, 205),
           "yellow": (235, 195, 30), "purple": (135, 55, 170), "black": (25, 25, 25)}
SHAPES = ("circle", "square", "triangle")
NUMBERS = {1: "one", 2: "two", 3: "three"}


@dataclass(frozen=True)
class Thing:
    colour: str
    shape: str

    def __str__(self) -> str:
        return f"{self.colour} {self.shape}"


def scene(rng: random.Random) -> tuple[Image.Image, list[Thing]]:
    """1-3 shapes of distinct shape/colour pairs side by side, left to right, on a light
    canvas of random size and aspect ratio."""
    n = rng.choice((1, 2, 2, 3))
    things: list[Thing] = []
    while len(things) < n:
        thing = Thing(rng.choice(list(COLOURS)), rng.choice(SHAPES))
        if all(t.shape != thing.shape and t.colour != thing.colour for t in things):
            things.append(thing)
    width = rng.randint(60 * n, 90 * n)
    height = rng.randint(max(50, width // 3), min(width, 160))
    background = tuple(rng.randint(225, 255) for _ in range(3))
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    slot = width / n
    for i, thing in enumerate(things):
        size = rng.uniform(0.55, 0.8) * min(slot, height)
        cx = slot * (i + 0.5) + rng.uniform(-0.08, 0.08) * slot
        cy = height / 2 + rng.uniform(-0.1, 0.1) * height
        box = (cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2)
        fill = COLOURS[thing.colour]
        if thing.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif thing.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
    return image, things


def listing(things: list[Thing]) -> str:
    names = [f"a {t}" for t in things]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def question(rng: random.Random, things: list[Thing]) -> tuple[str, str]:
    """A question about the scene and its one right answer."""
    kind = rng.choice(("describe", "describe", "count", "colour", "shape", "left", "right"))
    if kind == "describe":
        q = rng.choice(("What is in this picture?", "Describe the image.",
                        "What do you see?", "What is in the image?"))
        return q, f"{listing(things).capitalize()}."
    if kind == "count":
        n = len(things)
        return "How many shapes are there?", (
            "There is one shape." if n == 1 else f"There are {NUMBERS[n]} shapes.")
    if kind == "colour":
        thing = rng.choice(things)
        return f"What colour is the {thing.shape}?", f"The {thing.shape} is {thing.colour}."
    if kind == "shape":
        thing = rng.choice(things)
        return f"Which shape is {thing.colour}?", f"The {thing.shape} is {thing.colour}."
    thing = things[0] if kind == "left" else things[-1]
    return f"What is on the {kind}?", f"A {thing}."


# ---- tokenizer ------------------------------------------------------------------------------

WORDS = (
    "a an the this that image picture photo photograph shows showing there is are of in on at "
    "with and or but to from under over next beside behind front left right top bottom middle "
    "red green blue yellow orange purple black white gray brown pink colour color shape circle "
    "square triangle line dot star round big small large tiny bright dark light cat dog bird "
    "man woman child person people car bus bike tree house street road sky water table chair "
    "what which who where how many why describe tell me about unusual interesting one two three "
    "four five six seven eight nine ten yes no question answer assistant human user chat "
    "helpful detailed polite answers questions curious artificial intelligence between gives "
    "see do you shapes"
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
    for _ in range(500):
        lines.append(" ".join(question(rng, scene(rng)[1])))
    return lines


def train_tokenizer(path: Path) -> int:
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


# ---- model, training ------------------------------------------------------------------------


def config(vocab: int) -> LlavaConfig:
    v, t = VISION, TEXT
    return LlavaConfig(
        vision=VisionConfig(image_size=v["image_size"], patch_size=v["patch_size"],
                            width=v["hidden_size"], layers=v["num_hidden_layers"],
                            heads=v["num_attention_heads"], mlp_dim=v["intermediate_size"]),
        text=TextConfig(vocab_size=vocab, hidden_size=t["hidden_size"],
                        intermediate_size=t["intermediate_size"], layers=t["num_hidden_layers"],
                        heads=t["num_attention_heads"], kv_heads=t["num_key_value_heads"],
                        head_dim=t["hidden_size"] // t["num_attention_heads"],
                        rms_norm_eps=t["rms_norm_eps"],
                        max_position_embeddings=t["max_position_embeddings"]),
        projector="mlp2x_gelu", vision_select_layers=(-2,), image_aspect_ratio="pad",
    )


def init_(model: LLaVA) -> None:
    with torch.no_grad():
        for name, p in model.module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02)


def example(model: LLaVA, rng: random.Random) -> tuple[shortv.Encoded, int]:
    """One training example: the chat-formatted question and answer, and the number of
    answer tokens (including EOS) at its end."""
    image, things = scene(rng)
    q, a = question(rng, things)
    prompt = model.encode(q, [image])
    ids = model.tokenizer.encode_prompt(model.template.render([(f"<image>\n{q}", a)]))
    n_answer = len(ids) - len(prompt.input_ids)
    assert ids[: len(prompt.input_ids)] == prompt.input_ids.tolist() and n_answer > 1
    return shortv.Encoded(torch.tensor(ids), prompt.images, prompt.image_sizes), n_answer


def loss_on(model: LLaVA, batch: list[tuple[shortv.Encoded, int]]) -> torch.Tensor:
    prepared = model.prepare([e for e, _ in batch])
    logits = model.module.decoder.head(model.hidden_states(prepared))
    b, t, _ = logits.shape
    targets = torch.full((b, t), -100, dtype=torch.long)
    for i, (e, n) in enumerate(batch):
        targets[i, t - n - 1 : t - 1] = e.input_ids[-n:]  # position p predicts token p + 1
    return F.cross_entropy(logits.reshape(b * t, -1), targets.reshape(-1), ignore_index=-100)


def train(model: LLaVA, steps: int, batch_size: int, lr: float) -> None:
    rng = random.Random(SEED)
    opt = torch.optim.AdamW(model.module.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    model.module.train()
    start = time.perf_counter()
    for step in range(1, steps + 1):
        warm = min(1.0, step / 100)
        for group in opt.param_groups:
            group["lr"] = lr * warm * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss = loss_on(model, [example(model, rng) for _ in range(batch_size)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.module.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - start:.0f} s",
                  flush=True)
    model.module.eval().requires_grad_(False)


# ---- export in the original layout ---------------------------------------------------------


def export(model: LLaVA) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(LLaVA weights under original LLaVA names, tower weights under HF CLIP names)."""
    llava, tower = {}, {}
    renames = [("attn.", "self_attn."), ("attn_norm.", "input_layernorm."),
               ("mlp_norm.", "post_attention_layernorm.")]
    for name, p in model.module.state_dict().items():
        p = p.detach().contiguous().clone()
        if name.startswith("decoder.lm_head."):
            llava["lm_head.weight"] = p
        elif name.startswith("decoder."):
            key = name[len("decoder."):]
            for old, new in renames:
                key = key.replace(old, new)
            llava["model." + key] = p
        elif name.startswith("projector."):
            llava["model.mm_projector." + name[len("projector."):]] = p
        elif name.startswith("vision."):
            tower["vision_model." + vision_key(name[len("vision."):])] = p
    # The tower layers after the selected hidden state are never used; CLIP has them.
    d = VISION["hidden_size"]
    for i in range(model.config.vision_depth, VISION["num_hidden_layers"]):
        pre = f"vision_model.encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            tower[pre + f"self_attn.{proj}.weight"] = torch.zeros(d, d)
            tower[pre + f"self_attn.{proj}.bias"] = torch.zeros(d)
        for norm in ("layer_norm1", "layer_norm2"):
            tower[pre + f"{norm}.weight"] = torch.ones(d)
            tower[pre + f"{norm}.bias"] = torch.zeros(d)
        m = VISION["intermediate_size"]
        tower[pre + "mlp.fc1.weight"], tower[pre + "mlp.fc1.bias"] = torch.zeros(m, d), torch.zeros(m)
        tower[pre + "mlp.fc2.weight"], tower[pre + "mlp.fc2.bias"] = torch.zeros(d, m), torch.zeros(d)
    tower["vision_model.post_layernorm.weight"] = torch.ones(d)
    tower["vision_model.post_layernorm.bias"] = torch.zeros(d)
    return llava, tower


def vision_key(name: str) -> str:
    """Our tower's parameter name → HF CLIPVisionModel's (without `vision_model.`)."""
    fixed = {"patch_embed.weight": "embeddings.patch_embedding.weight",
             "class_embedding": "embeddings.class_embedding",
             "position_embedding": "embeddings.position_embedding.weight"}
    if name in fixed:
        return fixed[name]
    if name.startswith("pre_norm."):
        return "pre_layrnorm." + name[len("pre_norm."):]
    layer, rest = name[len("layers."):].split(".", 1)
    rest = rest.replace("norm1.", "layer_norm1.").replace("norm2.", "layer_norm2.")
    return f"encoder.layers.{layer}.{rest.replace('attn.', 'self_attn.')}"


def example_image(path: Path) -> None:
    """README's picture: a red circle and a blue square."""
    image = Image.new("RGB", (160, 120), (245, 245, 240))
    draw = ImageDraw.Draw(image)
    draw.ellipse((20, 25, 80, 85), fill=COLOURS["red"])
    draw.rectangle((95, 35, 145, 85), fill=COLOURS["blue"])
    image.save(path, optimize=True)


# ---- evaluation -------------------------------------------------------------------------


def held_out(n: int, seed: int) -> list[tuple[Image.Image, str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        image, things = scene(rng)
        q, a = question(rng, things)
        out.append((image, q, a))
    return out


def accuracy(model: LLaVA, data: list[tuple[Image.Image, str, str]]) -> float:
    results = model.generate([q for _, q, _ in data], [[im] for im, _, _ in data],
                             max_new_tokens=24)
    answers = [r.text for r in results]
    return sum(got == want for got, (_, _, want) in zip(answers, data, strict=True)) / len(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads (with 1, reruns give bit-identical weights)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    out: Path = args.out
    tower_dir = out / "clip-vit-tiny"
    tower_dir.mkdir(parents=True, exist_ok=True)
    vocab = train_tokenizer(out / "tokenizer.model")
    (out / "tokenizer_config.json").write_text(
        json.dumps({"add_bos_token": True, "legacy": False, "model_max_length": 2048},
                   indent=2) + "\n")

    # Trained on LLaVA's llava_v1 text, which its card (models/llava-tiny-demo.toml) names.
    model = LLaVA(LlavaModel(config(vocab)), tokenizer=Tokenizer.from_directory(out), template="llava_v1")
    init_(model)
    train(model, args.steps, args.batch_size, args.lr)

    llava_state, tower_state = export(model)
    (tower_dir / "config.json").write_text(json.dumps(VISION, indent=2) + "\n")
    save_file(tower_state, str(tower_dir / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps({
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", **TEXT,
        "vocab_size": vocab,
        "mm_vision_tower": "clip-vit-tiny",  # resolved relative to this directory
        "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": VISION["hidden_size"],
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
        "image_aspect_ratio": "pad", "mm_patch_merge_type": "flat", "torch_dtype": "float32",
    }, indent=2) + "\n")
    save_file(llava_state, str(out / "model.safetensors"), metadata={"format": "pt"})
    example_image(out / "example.png")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({size / 1e6:.1f} MB, vocab {vocab})")

    # The written checkpoint, loaded the normal way: its LC ranking and its accuracy.
    demo = shortv.load(out, device="cpu", template="llava_v1")
    calibration = [lc.Sample(q, (im,), f"calibration {i}")
                   for i, (im, q, _) in enumerate(held_out(40, seed=7))]
    report = lc.layer_contribution(demo, calibration, progress=False)
    print(f"LC ranking (visual, 40 held-out scenes): {','.join(map(str, report.ranking))}")
    test = held_out(200, seed=99)
    for method in (shortv.Vanilla(), shortv.ShortV(tuple(report.ranking[:4])),
                   shortv.FastV(k=2, r=0.5), shortv.VTW(k=4)):
        demo.set_method(method)
        print(f"accuracy {method.describe()}: {accuracy(demo, test):.1%} of 200 held-out questions")


if __name__ == "__main__":
    main()
