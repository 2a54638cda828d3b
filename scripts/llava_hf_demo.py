"""The embedded demo (original LLaVA layout) as the llava-hf directory a transformers user has.

    python scripts/llava_hf_demo.py [--out weights/llava-tiny-demo-hf] [--check]

`transformers serve` (and AutoProcessor / LlavaForConditionalGeneration) need what the
llava-hf repos ship: LlavaForConditionalGeneration weights and config, a tokenizer.json with
an `<image>` token and a chat template, and processor files that expand `<image>` into the
image's 36 tokens. The demo has none of these: it is `LlavaLlamaForCausalLM` with a separate
CLIP tower and a SentencePiece tokenizer.model. This writes that directory so that both
servers can serve the very same files (shortv loads llava-hf directories too):

- weights: the vision tower straight from the demo's CLIPVisionModel checkpoint (all three
  layers; shortv builds only those up to the selected one); projector and decoder loaded
  with shortv, each of transformers' parameter names mapped to ours with shortv's own
  TRANSFORMERS_LAYOUT key map (so the two layouts cannot drift); the text vocabulary gets
  one row for `<image>` (id 1000, as llava-hf appends 32000): a zero embedding (transformers
  puts the image features there) and a zero lm_head row (a logit of 0: --check shows greedy
  decoding never picks it on the demo's questions);
- tokenizer: tokenizer.model as a tokenizer.json (BOS added by its post-processor), `<image>`
  added as a special token, with a Jinja chat template that writes the demo card's
  `llava_v1` conversation (shortv.conversation: system + " ", "USER: <image>\\n{text} ",
  "ASSISTANT: {reply}</s>", open turn "ASSISTANT:"), to the token: LLaVA tokenizes the text
  after an image on its own (tokenizer_image_token), so SentencePiece gives it a dummy-prefix
  "▁" before the "\\n"; a tokenizer that sees the whole prompt does not, so the template
  writes "<image> \\n" (the space is that "▁"). No `{{ bos_token }}` in the template either:
  "<s>A" would lose the "▁" of "▁A"; the processor adds BOS itself. The prompt ids then equal
  shortv's (LLaVA's) with the image's 36 `<image>` ids in place of its one -200;
- processor: LlavaImageProcessor with the demo's 84 px, CLIP mean / std, bicubic, and
  do_pad (LLaVA's "pad" aspect ratio: expand to a square of the mean colour), and
  patch_size 14 / strategy "default" / 1 additional token: (84 / 14)^2 + 1 - 1 = 36
  (transformers 5 writes the image processor's settings inside processor_config.json; there
  is no separate preprocessor_config.json). Its torchvision resize differs from LLaVA's PIL
  one by up to 0.015 in normalised pixels; the answers do not change.

--check answers the demo's questions greedily with shortv on the demo, shortv on the new
directory (its template, then llava_v1) and transformers on the new directory, and prints
the answers and prompt token ids side by side.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "weights" / "llava-tiny-demo"
IMAGE_TOKEN = "<image>"
TOWER_PREFIX = "model.vision_tower."
QUESTIONS = [
    "What is in this picture?",
    "Describe the picture.",
    "What shapes do you see?",
    "What colour is the circle on the left of the picture? Answer in one word.",
]

# shortv.conversation's llava_v1 ("two" style, sep " ", sep2 "</s>"), as Jinja over the
# processor's messages (content a string or a list of {"type": "text"|"image"} parts; the
# images of a turn go first, one "<image>\n" line each, as shortv.conversation.place_images).
_TEXTS = "| selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ')"
CHAT_TEMPLATE = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set head = messages[0]['content'] if messages[0]['content'] is string"
    " else messages[0]['content'] " + _TEXTS + " %}"
    "{% set turns = messages[1:] %}"
    "{% else %}"
    "{% set head = 'SYSTEM_TEXT' %}{% set turns = messages %}"
    "{% endif %}"
    "{{ head }} "
    "{% for message in turns %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}{% set n = 0 %}"
    "{% else %}"
    "{% set text = message['content'] " + _TEXTS + " %}"
    "{% set n = message['content'] | selectattr('type', 'equalto', 'image') | list | length %}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}USER: {{ '<image> \\n' * n }}{{ text }} "
    "{% else %}ASSISTANT: {{ text }}</s>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def hf_config(demo: Path, vocab: int) -> object:
    """transformers' LlavaConfig for the demo's shapes (read from its two config.json)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = json.loads((demo / "config.json").read_text())
    vision = json.loads((demo / text["mm_vision_tower"] / "config.json").read_text())
    vision_keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "image_size", "patch_size", "hidden_act", "layer_norm_eps", "num_channels")
    text_keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "rms_norm_eps", "rope_theta", "max_position_embeddings",
                 "hidden_act", "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings")
    if text["mm_projector_type"] != "mlp2x_gelu" or text["mm_vision_select_feature"] != "patch":
        raise SystemExit("this converter knows the demo's mlp2x_gelu projector and 'patch' features only")
    return LlavaConfig(
        vision_config=CLIPVisionConfig(**{k: vision[k] for k in vision_keys}),
        text_config=LlamaConfig(vocab_size=vocab, **{k: text[k] for k in text_keys}),
        image_token_index=text["vocab_size"],
        projector_hidden_act="gelu",
        vision_feature_layer=text["mm_vision_select_layer"],
        vision_feature_select_strategy="default",  # drops CLS: LLaVA's "patch"
        image_seq_length=(vision["image_size"] // vision["patch_size"]) ** 2,
        pad_token_id=text["pad_token_id"],
        tie_word_embeddings=False,
    )


def hf_state(ours: dict[str, torch.Tensor], tower: dict[str, torch.Tensor], names: list[str],
             own_vocab: int, defaults: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' state dict: the vision tower straight from the demo's CLIP checkpoint
    (a CLIPVisionModel: all its layers, which shortv trims at the selected one), the rest
    from shortv's modules, each of transformers' names through shortv's key map; vocabulary
    rows past the demo's (the `<image>` row) are zeros."""
    from shortv.checkpoint import TRANSFORMERS_LAYOUT, KeyMap

    key_map = KeyMap(TRANSFORMERS_LAYOUT)
    state = {}
    for name in names:
        if name.startswith(TOWER_PREFIX):
            key = name.removeprefix(TOWER_PREFIX)
            if key not in tower:
                raise SystemExit(f"the demo's CLIP checkpoint has no {key}")
            state[name] = tower[key]
            continue
        mine = key_map(name)
        if mine is False:
            raise SystemExit(f"shortv's key map does not know transformers' {name}")
        if mine is None:
            state[name] = defaults[name]
            continue
        value = ours[mine]
        target = defaults[name]
        if value.shape != target.shape:  # embed_tokens / lm_head: one more row for <image>
            grown = torch.zeros_like(target)
            grown[:own_vocab] = value
            value = grown
        state[name] = value.detach().clone()
    return state


def write_weights(out: Path) -> None:
    from transformers import LlavaForConditionalGeneration

    import shortv
    from shortv.checkpoint import read_tensors

    own_vocab = json.loads((DEMO / "config.json").read_text())["vocab_size"]
    config = hf_config(DEMO, own_vocab + 1)
    model = LlavaForConditionalGeneration(config).eval()
    defaults = model.state_dict()
    ours = shortv.load(str(DEMO), dtype="float32", device="cpu").module.state_dict()
    tower = {key.removeprefix("vision_model."): value
             for key, value in read_tensors(DEMO / "clip-vit-tiny" / "model.safetensors")}
    model.load_state_dict(hf_state(ours, tower, list(defaults), own_vocab, defaults), strict=True)
    model.generation_config.do_sample = False
    model.save_pretrained(out)


def fast_tokenizer(model: Path) -> object:
    """tokenizer.model as a `tokenizers.Tokenizer`, the way transformers' Llama conversion
    builds one (BOS prepended, SentencePiece's decoder). transformers' own conversion needs
    sentencepiece's protobuf module, which this .venv's protobuf runtime refuses to load
    (gencode 7.36 > runtime 6.33), so shortv's protobuf-free reader builds the model, in
    `legacy=False` mode (text after a special token gets no dummy prefix)."""
    from tokenizers import decoders, processors

    from shortv.sentencepiece import load_sentencepiece

    tokenizer = load_sentencepiece(model, legacy=False)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                           decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return tokenizer


def write_processor(out: Path) -> None:
    from transformers import LlamaTokenizer, LlavaImageProcessor, LlavaProcessor

    from shortv.conversation import LLAVA_SYSTEM

    vision = json.loads((DEMO / "clip-vit-tiny" / "config.json").read_text())
    tokenizer = LlamaTokenizer(tokenizer_object=fast_tokenizer(DEMO / "tokenizer.model"), bos_token="<s>",
                               eos_token="</s>", unk_token="<unk>", pad_token="<unk>", legacy=False,
                               add_bos_token=True, add_eos_token=False)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    own_vocab = json.loads((DEMO / "config.json").read_text())["vocab_size"]
    if image_id != own_vocab:
        raise SystemExit(f"<image> got id {image_id}, expected {own_vocab}")
    side = vision["image_size"]
    images = LlavaImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                                 do_pad=True)
    template = CHAT_TEMPLATE.replace("SYSTEM_TEXT", LLAVA_SYSTEM.replace("'", "\\'"))
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, chat_template=template,
                               patch_size=vision["patch_size"], vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, image_token=IMAGE_TOKEN)
    processor.save_pretrained(out)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(out)


def convert(out: Path) -> Path:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    write_weights(out)
    write_processor(out)
    shutil.copy(DEMO / "example.png", out / "example.png")
    return out


def check(out: Path, max_new_tokens: int = 32) -> bool:
    """Greedy answers to QUESTIONS on the demo image: shortv on the demo, shortv on `out`
    (its default template, then the card's llava_v1), transformers on `out`."""
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    import shortv

    image = Image.open(DEMO / "example.png").convert("RGB")
    demo = shortv.load("llava-tiny-demo", method=shortv.Vanilla(), device="cpu", dtype="float32")
    mine = shortv.load(str(out), method=shortv.Vanilla(), device="cpu", dtype="float32")
    processor = AutoProcessor.from_pretrained(out)
    model = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    answers: dict[str, list[str]] = {"shortv demo (llava_v1)": [], f"shortv dir ({mine.template.name})": [],
                                     "shortv dir (llava_v1)": [], "transformers dir": []}
    ids: dict[str, list[list[int]]] = {"shortv demo": [], "transformers dir": []}
    for question in QUESTIONS:
        answers["shortv demo (llava_v1)"].append(demo.chat(question, image, max_new_tokens=max_new_tokens))
        answers[f"shortv dir ({mine.template.name})"].append(
            mine.chat(question, image, max_new_tokens=max_new_tokens))
        enc = demo.encode(question, image)
        ids["shortv demo"].append(enc.input_ids.tolist() if hasattr(enc, "input_ids") else enc[0].tolist())
        messages = [{"role": "user", "content": [{"type": "text", "text": question},
                                                 {"type": "image", "image": image}]}]
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt")
        ids["transformers dir"].append(inputs["input_ids"][0].tolist())
        with torch.no_grad():
            seq = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answers["transformers dir"].append(
            processor.decode(seq[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    mine.template = demo.template
    for question in QUESTIONS:
        answers["shortv dir (llava_v1)"].append(mine.chat(question, image, max_new_tokens=max_new_tokens))
    for i, question in enumerate(QUESTIONS):
        print(f"Q: {question}")
        for who, said in answers.items():
            print(f"  {who:28s} {said[i]!r}")
        a, b = ids["shortv demo"][i], ids["transformers dir"][i]
        print(f"  prompt ids: shortv {len(a)} (image as one -200), transformers {len(b)} "
              f"(36 image tokens); text ids equal: {[t for t in a if t >= 0] == [t for t in b if t != 1000]}")
    reference = answers["shortv demo (llava_v1)"]
    same = all(said == reference for said in answers.values())
    print("greedy answers agree" if same else "greedy answers DIFFER")
    return same


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "weights" / "llava-tiny-demo-hf")
    parser.add_argument("--check", action="store_true", help="compare greedy answers after writing")
    parser.add_argument("--no-write", action="store_true", help="only --check an existing --out")
    args = parser.parse_args()
    if not args.no_write:
        convert(args.out)
        print(f"wrote {args.out}: {sorted(p.name for p in args.out.iterdir())}")
    if args.check:
        return 0 if check(args.out) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
