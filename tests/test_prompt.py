"""Prompt text and prompt tokenization, against original LLaVA.

The oracle (tests/reference.py) is a re-implementation, on top of the `sentencepiece`
package and the same tokenizer.model, of what original LLaVA ran: transformers' slow
`LlamaTokenizer` (4.31-4.37: special tokens written in the text, the legacy / non-legacy
dummy-prefix rules and the "<unk>" prefix trick) called through LLaVA's `tokenizer_image_token`.
Template strings are typed in from LLaVA's llava/conversation.py (conv_vicuna_v1, "curious
user"; tests/test_templates.py checks every template against LLaVA's get_prompt).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import shortv
from shortv import IMAGE_TOKEN, InputError, Tokenizer

from .reference import SPACE, SlowLlamaTokenizer, llava_tokenize

spm = pytest.importorskip("sentencepiece")

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "weights" / "llava-tiny-demo"

# ---- prompts -------------------------------------------------------------------------------

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions."
)


def vicuna(*turns: tuple[str, str | None]) -> str:
    """LLaVA's vicuna_v1 (style TWO), written out by hand for the prompts below."""
    text = SYSTEM + " "
    for user, reply in turns:
        text += f"USER: {user} "
        text += f"ASSISTANT: {reply}</s>" if reply is not None else "ASSISTANT:"
    return text


# What LLaVA's own code would hand to tokenizer_image_token: the template with <image>\n.
TEMPLATE_PROMPTS = [
    vicuna(("<image>\nWhat is unusual about this image?", None)),
    vicuna(("<image>\n<image>\nWhat is the difference between these two pictures?", None)),
    vicuna(("<image>\nHow many cats are there?", "There are 3 cats."), ("And dogs?", None)),
    vicuna(("<image>\nq1", "a1"), ("q2", "a2 with 12345 and 3.14"), ("q3", None)),
    vicuna(("<image>\nDescribe 😀 and 你好 and café.", None)),
    vicuna(("<image>\nline one\nline two\n\nline four", None)),
    vicuna(("What is 2+2?", None)),
]

EDGE_PROMPTS = [
    "",
    "<image>",
    "<image>\n",
    "<image><image>",
    "<image>\nDescribe the image.",
    "Describe the image.<image>",
    "Describe the image. <image>",
    "a<image>b",
    "a <image> b",
    "left<image>\n<image>\nright",
    "<image> leading space after the image",
    "  two leading spaces",
    "trailing spaces   ",
    "digits 0123456789 and 2024-01-01",
    "emoji 😀🎉 and unseen 鑫龘 characters",
    "tabs\tand\nnewlines\n",
    "literal " + SPACE + " meta space",
    "</s>",
    "</s>starts with eos",
    "a1</s>USER: q2",
    "a1</s> USER: q2",
    "a1 </s> q2 </s>",
    "<image></s>after an image",
    "<s>bos in text</s>",
    "x <s> y",
    "<unk>unk in text",
    "text<unk> more",
    "\n</s>\n",
]


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory, sp_model: Path) -> dict:
    """tokenizer.model directories with legacy true / false / unset in tokenizer_config."""
    dirs = {}
    for key, settings in {True: {"legacy": True}, False: {"legacy": False}, None: None}.items():
        d = tmp_path_factory.mktemp(f"tok-legacy-{key}")
        shutil.copy(sp_model, d / "tokenizer.model")
        if settings is not None:
            (d / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, **settings}))
        dirs[key] = d
    return dirs


def _mismatches(prompts, ours: Tokenizer, reference: SlowLlamaTokenizer) -> list:
    return [
        (p, want, got)
        for p in prompts
        if (got := ours.encode_prompt(p)) != (want := llava_tokenize(p, reference))
    ]


# ---- tests: tokenization --------------------------------------------------------------------


def test_reference_is_not_trivial(sp_model):
    """The oracle itself distinguishes what it must: dummy prefixes, EOS in text, bytes."""
    legacy, modern = (SlowLlamaTokenizer(sp_model, legacy=v) for v in (True, False))
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    # Without special tokens both modes are plain SentencePiece with BOS.
    assert legacy("the dog is red") == modern("the dog is red") == [sp.bos_id(), *sp.encode("the dog is red")]
    # After </s> the modes differ (dummy prefix or not), and </s> is the EOS id.
    a, b = legacy("red</s>dog"), modern("red</s>dog")
    assert sp.eos_id() in a and sp.eos_id() in b and a != b
    assert legacy("</s>") == modern("</s>") == [sp.bos_id(), sp.eos_id()]
    assert any(sp.is_byte(i) for i in modern("😀"))
    ids = llava_tokenize("a<image>b<image>", modern)
    assert ids.count(IMAGE_TOKEN) == 2 and ids.count(sp.bos_id()) == 1 and ids[0] == sp.bos_id()


@pytest.mark.parametrize("legacy", [True, False])
def test_prompt_tokenization_matches_original_llava(tokenizer_dirs, sp_model, legacy):
    ours = Tokenizer.from_directory(tokenizer_dirs[legacy])
    reference = SlowLlamaTokenizer(sp_model, legacy=legacy)
    assert _mismatches(TEMPLATE_PROMPTS + EDGE_PROMPTS, ours, reference) == []


def test_legacy_flag_matters_for_multi_turn_prompts(tokenizer_dirs):
    """The multi-turn prompt tokenizes differently with legacy true / false (text after
    "</s>"), so the test above really checks that the flag is read."""
    prompt = TEMPLATE_PROMPTS[2]
    a, b = (Tokenizer.from_directory(tokenizer_dirs[v]).encode_prompt(prompt) for v in (True, False))
    assert a != b


def test_missing_legacy_setting_means_legacy(tokenizer_dirs, sp_model):
    """The slow tokenizer treated an absent `legacy` (and an absent tokenizer_config) as True."""
    ours = Tokenizer.from_directory(tokenizer_dirs[None])
    assert _mismatches(TEMPLATE_PROMPTS + EDGE_PROMPTS, ours, SlowLlamaTokenizer(sp_model, legacy=True)) == []


def test_add_bos_token_false(tmp_path, sp_model):
    shutil.copy(sp_model, tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False, "legacy": False}))
    ours = Tokenizer.from_directory(tmp_path)
    reference = SlowLlamaTokenizer(sp_model, legacy=False, add_bos=False)
    assert _mismatches(TEMPLATE_PROMPTS + EDGE_PROMPTS, ours, reference) == []
    assert ours.encode_prompt("<image>\nhi")[0] == IMAGE_TOKEN


def test_special_ids_and_vocab(tokenizer_dirs, sp_model):
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    ours = Tokenizer.from_directory(tokenizer_dirs[False])
    assert (ours.bos_id, ours.eos_id) == (sp.bos_id(), sp.eos_id())
    assert ours.vocab_size == sp.get_piece_size()


def test_decode_matches_sentencepiece(tokenizer_dirs, sp_model):
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    ours = Tokenizer.from_directory(tokenizer_dirs[False])
    for text in ["the dog is red", "emoji 😀 and 你好", "digits 0123 and\nnewline", " lead"]:
        ids = sp.encode(text)
        assert ours.decode(ids) == sp.decode(ids)
    # Image placeholders and special tokens are skipped.
    ids = [sp.bos_id(), *sp.encode("the cat"), IMAGE_TOKEN, sp.eos_id()]
    assert ours.decode(ids) == sp.decode(sp.encode("the cat"))


def _byte_ids(sp, data: bytes) -> list[int]:
    return [sp.piece_to_id(f"<0x{b:02X}>") for b in data]


# Byte runs that are not valid UTF-8 as a whole: SentencePiece (and so the slow tokenizer
# LLaVA decoded with) keeps the valid characters and writes U+FFFD per invalid byte.
INVALID_BYTE_RUNS = [b"C\xe2", b"\xcb\xa7\xa4", b"\xa7\xc3\xa9", b"ok\xe2\x82", b"\xf0\x9f\x98x"]


def test_decode_of_invalid_byte_runs_matches_sentencepiece(tokenizer_dirs, sp_model):
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    ours = Tokenizer.from_directory(tokenizer_dirs[False])
    got = {data: ours.decode([*sp.encode("the"), *_byte_ids(sp, data)]) for data in INVALID_BYTE_RUNS}
    want = {data: sp.decode([*sp.encode("the"), *_byte_ids(sp, data)]) for data in INVALID_BYTE_RUNS}
    assert got == want


def test_decode_is_prefix_stable(tokenizer_dirs, sp_model):
    """Text decoded from a prefix of the ids, minus a trailing incomplete character, stays a
    prefix of the text of all of them: what streaming relies on. (SentencePiece has it.)"""
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    ours = Tokenizer.from_directory(tokenizer_dirs[False])
    for data in INVALID_BYTE_RUNS:
        ids = [*sp.encode("the"), *_byte_ids(sp, data), *sp.encode(" dog")]
        assert all(sp.decode(ids).startswith(sp.decode(ids[:k]).rstrip("\ufffd")) for k in range(len(ids)))
        full = ours.decode(ids)
        for k in range(len(ids)):
            assert full.startswith(ours.decode(ids[:k]).rstrip("\ufffd")), (data, k)


def test_demo_model_prompts_match_original_llava():
    """The embedded demo's own tokenizer.model (legacy: false) end to end through encode()."""
    assert json.loads((DEMO / "tokenizer_config.json").read_text())["legacy"] is False
    reference = SlowLlamaTokenizer(DEMO / "tokenizer.model", legacy=False)
    ours = Tokenizer.from_directory(DEMO)
    assert _mismatches(TEMPLATE_PROMPTS + EDGE_PROMPTS, ours, reference) == []


def _transformers_tokenizer_json(sp_model: Path, out: Path, *, legacy: bool) -> Path:
    """A tokenizer.json as transformers writes it (llava-hf repos ship one)."""
    transformers = pytest.importorskip("transformers")
    from transformers.tokenization_utils_base import generate_merges

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    scores = {sp.id_to_piece(i): sp.get_score(i) for i in range(sp.get_piece_size())}
    tok = transformers.LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab, scores),
                                      legacy=legacy, add_bos_token=True)
    tok.save_pretrained(out)
    assert (out / "tokenizer.json").is_file() and not (out / "tokenizer.model").exists()
    return out


@pytest.mark.parametrize("legacy", [True, False])
def test_tokenizer_json_directory(tmp_path, tokenizer_dirs, sp_model, legacy):
    """A directory with only a tokenizer.json (transformers' conversion) gives the ids the
    tokenizer.model directory gives, and the slow tokenizer's, for LLaVA's prompts.

    (transformers' fast Llama tokenizer itself differs from the slow one on text chunks
    that start with a space, e.g. "<image> x": that is a property of the file, so those
    prompts are not compared here.)"""
    json_dir = _transformers_tokenizer_json(sp_model, tmp_path / "tj", legacy=legacy)
    from_json = Tokenizer.from_directory(json_dir)
    from_model = Tokenizer.from_directory(tokenizer_dirs[legacy])
    assert from_json.source.endswith("tokenizer.json")
    assert (from_json.bos_id, from_json.eos_id) == (from_model.bos_id, from_model.eos_id)
    reference = SlowLlamaTokenizer(sp_model, legacy=legacy)
    for p in TEMPLATE_PROMPTS:
        assert from_json.encode_prompt(p) == from_model.encode_prompt(p) == llava_tokenize(p, reference), p


@pytest.mark.parametrize("legacy", [True, False])
def test_tokenizer_json_written_by_shortv(tmp_path, tokenizer_dirs, sp_model, legacy):
    """shortv's SentencePiece conversion saved as tokenizer.json loads back identically
    (special ids found through tokenizer_config / defaults) for every prompt."""
    from shortv.sentencepiece import load_sentencepiece

    load_sentencepiece(sp_model, legacy=legacy).save(str(tmp_path / "tokenizer.json"))
    from_json = Tokenizer.from_directory(tmp_path)
    from_model = Tokenizer.from_directory(tokenizer_dirs[legacy])
    prompts = TEMPLATE_PROMPTS + EDGE_PROMPTS
    assert [from_json.encode_prompt(p) for p in prompts] == [from_model.encode_prompt(p) for p in prompts]
    assert (from_json.bos_id, from_json.eos_id) == (from_model.bos_id, from_model.eos_id)


def test_no_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(shortv.CheckpointError, match="tokenizer"):
        Tokenizer.from_directory(tmp_path)


# ---- tests: the conversation template -----------------------------------------------------


def test_vicuna_v1_single_turn():
    t = shortv.get_template("vicuna_v1")
    assert t.render([("<image>\nWhat is unusual about this image?", None)]) == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the user's questions. "
        "USER: <image>\nWhat is unusual about this image? ASSISTANT:"
    )


def test_vicuna_v1_multi_turn():
    t = shortv.get_template("vicuna_v1")
    assert t.render([("q1", "a1"), ("q2", None)]) == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the user's questions. "
        "USER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT:"
    )
    assert t.render([("q1", "a1"), ("q2", "a2"), ("q3", None)]).endswith(
        " USER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>USER: q3 ASSISTANT:"
    )


def test_unknown_template_is_an_error():
    with pytest.raises(shortv.ConfigError, match="template"):
        shortv.get_template("no-such-template")


@pytest.fixture(scope="module")
def demo():
    # A directory, not the zoo name: no card, so the default template, vicuna_v1.
    return shortv.load(DEMO, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def pictures():
    return [Image.new("RGB", (40, 30), (200, 30, 40)), Image.new("RGB", (20, 60), (30, 60, 200))]


def test_encode_puts_images_at_the_start_of_the_user_turn(demo, pictures):
    e = demo.encode("What is unusual about this image?", pictures[:1])
    assert e.prompt == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the user's questions. "
        "USER: <image>\nWhat is unusual about this image? ASSISTANT:"
    )
    reference = SlowLlamaTokenizer(DEMO / "tokenizer.model", legacy=False)
    assert e.input_ids.dtype == torch.long and e.input_ids.dim() == 1
    assert e.input_ids.tolist() == llava_tokenize(e.prompt, reference)
    assert len(e.images) == 1 and e.image_sizes == ((40, 30),)

    two = demo.encode("Compare them.", pictures)
    assert two.prompt == vicuna(("<image>\n<image>\nCompare them.", None))
    assert two.input_ids.tolist().count(IMAGE_TOKEN) == 2
    assert two.image_sizes == ((40, 30), (20, 60))

    none = demo.encode("Hello there")
    assert none.prompt == vicuna(("Hello there", None)) and IMAGE_TOKEN not in none.input_ids.tolist()


def test_encode_with_history_puts_images_in_the_first_turn(demo, pictures):
    e = demo.encode("q2", pictures[:1], history=[("q1", "a1")])
    assert e.prompt == vicuna(("<image>\nq1", "a1"), ("q2", None))
    reference = SlowLlamaTokenizer(DEMO / "tokenizer.model", legacy=False)
    assert e.input_ids.tolist() == llava_tokenize(e.prompt, reference)


def test_encode_keeps_placeholders_the_user_wrote(demo, pictures):
    e = demo.encode("first <image> then <image> end", pictures)
    assert e.prompt == vicuna(("first <image> then <image> end", None))
    assert e.input_ids.tolist().count(IMAGE_TOKEN) == 2


def test_encode_without_template(demo, pictures):
    e = demo.encode("<image>\nraw text", pictures[:1], template=False)
    assert e.prompt == "<image>\nraw text"
    reference = SlowLlamaTokenizer(DEMO / "tokenizer.model", legacy=False)
    assert e.input_ids.tolist() == llava_tokenize("<image>\nraw text", reference)


@pytest.mark.parametrize(
    ("prompt", "n_images", "template"),
    [
        ("no placeholder", 1, False),
        ("<image>\ntwo placeholders <image>", 1, False),
        ("<image>\none placeholder", 0, False),
        ("<image>\none placeholder", 2, True),  # placeholders present: no auto placement
        ("<image> and <image>", 1, True),
        ("<image> but no image", 0, True),
    ],
)
def test_placeholder_count_mismatch_is_an_input_error(demo, pictures, prompt, n_images, template):
    images = (pictures * 2)[:n_images]
    with pytest.raises(InputError, match="placeholder"):
        demo.encode(prompt, images, template=template)


def test_encoded_checks_its_own_consistency():
    with pytest.raises(InputError):
        shortv.Encoded(torch.tensor([1, IMAGE_TOKEN, 5]))
    with pytest.raises(InputError):
        shortv.Encoded(torch.tensor([1, 5]), (torch.zeros(3, 4, 4),), ((4, 4),))
