"""The rest of the LLaVA-NeXT family: llava-v1.6-mistral-7b (Mistral-7B-Instruct-v0.2) and
llava-v1.6-34b (Nous-Hermes-2-Yi-34B). Both decoders use grouped-query attention (8 KV heads).

Oracles, all independent of shortv's own code paths:
- transformers' LlavaNextForConditionalGeneration on tiny random checkpoints with a Mistral
  decoder (MistralConfig, GQA, RoPE theta 1e6, a sliding window) and a Yi-style one
  (LlamaConfig, 3 query heads per KV head, head_dim != hidden / heads, RoPE theta 5e6), loaded
  by shortv from the transformers layout and from original LLaVA's (LlavaMistralForCausalLM /
  LlavaLlamaForCausalLM, tower inside); fp32 logits within 1e-4;
- ShortV against a hooked vanilla run, the KV cache against recomputation, FastV's kept set
  against explicit attention (tests/reference.py) on those GQA models;
- the conversation templates against a rendering written here from original LLaVA's
  llava/conversation.py (conv_mistral_instruct: SeparatorStyle.LLAMA_2, system "", sep "",
  sep2 "</s>"; conv_chatml_direct: SeparatorStyle.MPT, system "<|im_start|>system\\nAnswer the
  questions.", roles "<|im_start|>user\\n" / "<|im_start|>assistant\\n", sep "<|im_end|>");
- prompt ids against LLaVA's tokenizer_image_token over transformers 4.37's slow
  LlamaTokenizer, re-implemented here on the sentencepiece package, with tokenizers trained
  for the test (a Llama-like one; Yi-like ones with <|startoftext|> / <|endoftext|> and
  <|im_start|> / <|im_end|> as user-defined or control pieces, declared as added tokens);
- the zoo cards against the published config.json values (typed in below);
- FLOPs with GQA against torch.utils.flop_counter on the real layer shapes.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

import shortv
from shortv import zoo
from shortv.conversation import get_template
from shortv.flops import decoder_flops, layer_flops
from shortv.methods import VTW, FastV, ShortV, Vanilla
from shortv.models.config import TextConfig, from_original, from_transformers
from shortv.token_types import TokenType

from . import checkpoints
from .data import image
from .reference import (
    assert_rows_close,
    cached_tokens,
    fastv_dropped,
    frozen_reference,
    hf_logits,
    hf_visual_count,
    kl_q_p,
    last_logits,
    recomputed_tokens,
)

spm = pytest.importorskip("sentencepiece")

LOGITS = dict(atol=1e-4, rtol=1e-4)
SPACE = "\u2581"
P_ = int(TokenType.PAD)

# Tiny decoders with the published models' peculiarities. transformers v5 takes RoPE theta in
# rope_parameters.
MISTRAL_TEXT = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=1, sliding_window=None,
                    max_position_embeddings=512,
                    rope_parameters={"rope_type": "default", "rope_theta": 1e6})
YI_TEXT = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=6,
               num_key_value_heads=2, head_dim=10, max_position_embeddings=512,
               rope_parameters={"rope_type": "default", "rope_theta": 5e6})
CHATML = ("<|im_start|>", "<|im_end|>")


# ---- test tokenizers ------------------------------------------------------------------------


def yi_like_sentencepiece(path: Path, *, pieces: str, dummy_prefix: bool) -> Path:
    """A Yi-like BPE model: <|startoftext|> / <|endoftext|> as BOS / EOS, the ChatML markers as
    `pieces` ("user" = user-defined symbols, "control" = control symbols)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = checkpoints.corpus(300, seed=5) + [
        f"<|im_start|>user\n{line}<|im_end|><|im_start|>assistant\n" for line in
        checkpoints.corpus(60, seed=6)]
    symbols = {"user_defined_symbols" if pieces == "user" else "control_symbols": list(CHATML)}
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(path.with_suffix("")), model_type="bpe",
        vocab_size=420, byte_fallback=True, split_digits=True, add_dummy_prefix=dummy_prefix,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, bos_piece="<|startoftext|>", eos_piece="<|endoftext|>", minloglevel=2,
        **symbols)
    return path


def yi_tokenizer_config(sp_model: Path, *, legacy: bool = True, declare: bool = True) -> dict:
    """tokenizer_config.json as Nous-Hermes-2-Yi-34B's family writes it: no BOS added, EOS
    <|im_end|>, the ChatML markers in added_tokens_decoder (non-special)."""
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    config = {"add_bos_token": False, "add_eos_token": False, "legacy": legacy,
              "bos_token": "<|startoftext|>", "eos_token": "<|im_end|>", "unk_token": "<unk>",
              "pad_token": "<unk>", "tokenizer_class": "LlamaTokenizer"}
    if declare:
        config["added_tokens_decoder"] = {
            str(sp.piece_to_id(t)): {"content": t, "lstrip": False, "normalized": False,
                                     "rstrip": False, "single_word": False, "special": False}
            for t in CHATML}
    return config


def tokenizer_dir(out: Path, sp_model: Path, config: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(sp_model, out / "tokenizer.model")
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


class SlowTokenizer:
    """transformers 4.37's slow LlamaTokenizer (what original LLaVA ran, use_fast=False) on the
    sentencepiece package: the text is cut at every added token (the special ones, bos / eos /
    unk / pad, and tokenizer_config.json's added_tokens_decoder); each other piece is encoded
    by SentencePiece (legacy=False: without a dummy prefix, after the "<unk>" trick, the whole
    text given one leading "▁"); `__call__` adds BOS when add_bos_token."""

    def __init__(self, directory: Path) -> None:
        config = json.loads((directory / "tokenizer_config.json").read_text())
        proto = (directory / "tokenizer.model").read_bytes()
        self.legacy = config.get("legacy", True)
        if not self.legacy:  # get_spm_processor: normalizer_spec.add_dummy_prefix = False
            proto += bytes([(3 << 3) | 2, 2, (3 << 3) | 0, 0])
        self.sp = spm.SentencePieceProcessor(model_proto=proto)
        self.add_bos = config.get("add_bos_token", True)
        sp_names = {"bos_token": self.sp.bos_id(), "eos_token": self.sp.eos_id(),
                    "unk_token": self.sp.unk_id()}
        special = {config.get(k) or self.sp.id_to_piece(i) for k, i in sp_names.items()}
        if config.get("pad_token"):
            special.add(config["pad_token"])
        added = {e["content"] for e in config.get("added_tokens_decoder", {}).values()}
        self.special = special
        self.added = sorted(special | added, key=len, reverse=True)
        self.unk = self.sp.id_to_piece(self.sp.unk_id())
        self.bos_id = self.sp.piece_to_id(config.get("bos_token") or self.sp.id_to_piece(
            self.sp.bos_id()))

    def _tokenize(self, text: str) -> list[str]:
        if self.legacy or not text.startswith((SPACE, " ")):
            return self.sp.encode(text, out_type=str)
        tokens = self.sp.encode(self.unk + text, out_type=str)
        n = len(self.sp.encode(self.unk, out_type=str))
        return tokens[n:] if len(tokens) >= n else tokens

    def _split(self, text: str) -> list[str]:
        out: list[str] = []
        for part in re.split("(" + "|".join(map(re.escape, self.added)) + ")", text):
            if part:
                out += [part] if part in self.added else self._tokenize(part)
        return out

    def tokenize(self, text: str) -> list[str]:
        if self.legacy or not text:
            return self._split(text)
        tokens = self._split(SPACE + text.replace(SPACE, " "))
        if len(tokens) > 1 and tokens[0] == SPACE and tokens[1] in self.special:
            tokens = tokens[1:]
        return tokens

    def __call__(self, text: str) -> list[int]:
        ids = [self.sp.piece_to_id(t) for t in self.tokenize(text)]
        return ([self.bos_id] if self.add_bos else []) + ids


def llava_tokenizer_image_token(prompt: str, tokenizer: SlowTokenizer) -> list[int]:
    """llava/mm_utils.py tokenizer_image_token, IMAGE_TOKEN_INDEX = -200."""
    chunks = [tokenizer(chunk) for chunk in prompt.split("<image>")]
    out: list[int] = []
    offset = 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_id and tokenizer.add_bos:
        offset = 1
        out.append(chunks[0][0])
    separated: list[list[int]] = []
    for chunk in chunks:
        separated += [chunk, [-200] * (offset + 1)]
    for x in separated[:-1]:
        out.extend(x[offset:])
    return out


# ---- templates: LLaVA's get_prompt, written from llava/conversation.py -------------------------


def llava_get_prompt(template: str, messages: list[tuple[str, str | None]]) -> str:
    """Original LLaVA's Conversation.get_prompt for the two templates, messages alternating
    user / assistant, the last reply None (open)."""
    if template == "mistral_instruct":  # SeparatorStyle.LLAMA_2, system "", sep "", sep2 "</s>"
        system, sep, sep2 = "", "", "</s>"
        ret = ""
        for i, (_, message) in enumerate(messages):
            if message:
                if i == 0:
                    message = (f"<<SYS>>\n{system}\n<</SYS>>\n\n" if system else system) + message
                if i % 2 == 0:
                    ret += sep + f"[INST] {message} [/INST]"
                else:
                    ret += " " + message + " " + sep2
        return ret.lstrip(sep)
    if template == "chatml_direct":  # SeparatorStyle.MPT
        system = "<|im_start|>system\nAnswer the questions."
        roles = ("<|im_start|>user\n", "<|im_start|>assistant\n")
        sep = "<|im_end|>"
        ret = system + sep
        for i, (_, message) in enumerate(messages):
            role = roles[i % 2]
            ret += role + message + sep if message else role
        return ret
    raise AssertionError(template)


CONVERSATIONS = {
    "one-image": [("<image>\nWhat is in the picture?", None)],
    "multi-turn": [("<image>\nWhat is it?", "A red car."), ("And the sky?", "Blue, clear."),
                   ("Anything else?", None)],
    "two-images": [("Left <image> and right <image>\nhow many dogs?", None)],
    "text-only": [("hello there, what color is the sky? </s> ok", None)],
}


def flat(conversation) -> list[tuple[str, str | None]]:
    """(role, message) pairs of (user, reply) turns, as LLaVA's Conversation.messages."""
    messages = [m for turn in conversation for m in turn]
    return [(("user", "assistant")[i % 2], m) for i, m in enumerate(messages)]


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("template", ["mistral_instruct", "chatml_direct"])
def test_templates_render_as_llava(template, conversation):
    turns = CONVERSATIONS[conversation]
    assert get_template(template).render(turns) == llava_get_prompt(template, flat(turns))


def test_template_examples_and_stops():
    """The published prompt formats (transformers' convert script / llava-hf model cards),
    typed in, and LLaVA's stop strings (sep, or sep2 for style TWO; none when empty)."""
    mistral, chatml = get_template("mistral_instruct"), get_template("chatml_direct")
    assert mistral.render([("<image>\nWhat is shown in this image?", None)]) == \
        "[INST] <image>\nWhat is shown in this image? [/INST]"
    assert chatml.render([("<image>\nWhat is shown in this image?", None)]) == (
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\n"
        "What is shown in this image?<|im_end|><|im_start|>assistant\n")
    assert mistral.stop_strings == () and chatml.stop_strings == ("<|im_end|>",)
    with pytest.raises(shortv.InputError):
        mistral.render([("", None)])


def test_encode_puts_the_image_first_in_these_templates(yi_model):
    """Images without a placeholder go at the start of the first user turn, as LLaVA's CLI."""
    enc = yi_model.encode("What is it?", [image((60, 25))])
    assert enc.prompt == llava_get_prompt("chatml_direct", flat([("<image>\nWhat is it?", None)]))
    try:
        yi_model.template = get_template("mistral_instruct")
        enc = yi_model.encode("What is it?", [image((60, 25))], history=[("Hi", "Hello.")])
        assert enc.prompt == "[INST] <image>\nHi [/INST] Hello. </s>[INST] What is it? [/INST]"
    finally:
        yi_model.template = get_template("chatml_direct")


# ---- prompt ids -----------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["user-prefix", "user-noprefix", "control-noprefix"])
def yi_sp(request, tmp_path_factory) -> Path:
    pieces, prefix = request.param.split("-")
    return yi_like_sentencepiece(tmp_path_factory.mktemp("yi-sp") / "tokenizer.model",
                                 pieces=pieces, dummy_prefix=prefix == "prefix")


@pytest.mark.parametrize("declare", [True, False], ids=["declared", "undeclared"])
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_chatml_prompt_ids_match_llava(tmp_path, yi_sp, conversation, declare):
    d = tokenizer_dir(tmp_path / "tok", yi_sp, yi_tokenizer_config(yi_sp, declare=declare))
    slow, ours = SlowTokenizer(d), shortv.Tokenizer.from_directory(d)
    prompt = llava_get_prompt("chatml_direct", flat(CONVERSATIONS[conversation]))
    want = llava_tokenizer_image_token(prompt, slow)
    assert ours.encode_prompt(prompt) == want
    sp = spm.SentencePieceProcessor(model_file=str(yi_sp))
    assert want[0] != slow.bos_id  # add_bos_token false: no BOS
    # EOS is the tokenizer's eos_token, <|im_end|>, not the model's <|endoftext|>
    assert ours.eos_id == sp.piece_to_id("<|im_end|>") != sp.eos_id()
    assert ours.bos_id == sp.piece_to_id("<|startoftext|>")


def test_chatml_markers_are_single_tokens(tmp_path, yi_sp):
    """Not vacuous: declared (or user-defined) markers are one id each, and the text after one
    starts a new SentencePiece segment."""
    d = tokenizer_dir(tmp_path / "tok", yi_sp, yi_tokenizer_config(yi_sp))
    ours = shortv.Tokenizer.from_directory(d)
    sp = spm.SentencePieceProcessor(model_file=str(yi_sp))
    ids = ours.encode_prompt("<|im_start|>user\nhello<|im_end|>")
    assert ids[0] == sp.piece_to_id("<|im_start|>") and ids[-1] == sp.piece_to_id("<|im_end|>")
    assert ids[1:-1] == sp.encode("user\nhello")  # legacy: the segment encoded on its own


@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_mistral_prompt_ids_match_llava(tmp_path, sp_model, conversation, legacy):
    """Mistral's tokenizer is Llama's kind (BOS added, </s> a control piece)."""
    d = tokenizer_dir(tmp_path / "tok", sp_model, {"add_bos_token": True, "legacy": legacy,
                                                    "bos_token": "<s>", "eos_token": "</s>"})
    prompt = llava_get_prompt("mistral_instruct", flat(CONVERSATIONS[conversation]))
    want = llava_tokenizer_image_token(prompt, SlowTokenizer(d))
    assert shortv.Tokenizer.from_directory(d).encode_prompt(prompt) == want
    assert want[0] == 1  # BOS


# ---- tiny checkpoints: Mistral and Yi decoders, both layouts -----------------------------------


@pytest.fixture(scope="module")
def yi_sp_model(tmp_path_factory) -> Path:
    return yi_like_sentencepiece(tmp_path_factory.mktemp("yi-sp-model") / "tokenizer.model",
                                 pieces="user", dummy_prefix=False)


@pytest.fixture(scope="module")
def hf_mistral(tmp_path_factory, sp_model: Path) -> Path:
    return checkpoints.make_llava(tmp_path_factory.mktemp("hf-mistral"), sp_model, next_=True,
                                  seed=11, text=MISTRAL_TEXT, text_model="mistral")


@pytest.fixture(scope="module")
def hf_yi(tmp_path_factory, yi_sp_model: Path) -> Path:
    return checkpoints.make_llava(tmp_path_factory.mktemp("hf-yi"), yi_sp_model, next_=True,
                                  seed=12, text=YI_TEXT,
                                  tokenizer_config=yi_tokenizer_config(yi_sp_model))


@pytest.fixture(scope="module")
def original_mistral(tmp_path_factory, hf_mistral: Path) -> Path:
    return checkpoints.to_original(hf_mistral, tmp_path_factory.mktemp("orig-mistral"),
                                   tower="inside")


@pytest.fixture(scope="module")
def original_yi(tmp_path_factory, hf_yi: Path) -> Path:
    return checkpoints.to_original(hf_yi, tmp_path_factory.mktemp("orig-yi"), tower="inside")


def hf_reference(directory: Path):
    from transformers import LlavaNextForConditionalGeneration

    return LlavaNextForConditionalGeneration.from_pretrained(directory, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def yi_model(original_yi: Path) -> shortv.LLaVA:
    model = shortv.load(original_yi, device="cpu", dtype=torch.float32)
    model.template = get_template("chatml_direct")  # what the card gives llava-v1.6-34b
    return model


@pytest.fixture(scope="module")
def mistral_model(original_mistral: Path) -> shortv.LLaVA:
    model = shortv.load(original_mistral, device="cpu", dtype=torch.float32)
    model.template = get_template("mistral_instruct")
    return model


def test_original_layouts_are_the_published_kinds(original_mistral, original_yi, hf_mistral):
    mistral = json.loads((original_mistral / "config.json").read_text())
    yi = json.loads((original_yi / "config.json").read_text())
    assert mistral["architectures"] == ["LlavaMistralForCausalLM"]
    assert mistral["model_type"] == "llava_mistral"
    assert yi["architectures"] == ["LlavaLlamaForCausalLM"]
    assert json.loads((hf_mistral / "config.json").read_text())["text_config"]["model_type"] == \
        "mistral"


PROMPTS = {
    "one-image": ("<image>\nWhat is in the picture?", [(60, 25)]),
    "two-images": ("Left <image> and right <image>\nhow many dogs?", [(25, 60), (70, 40)]),
    "text-only": ("hello there, what color is the sky?", []),
}


@pytest.mark.parametrize("case", list(PROMPTS))
@pytest.mark.parametrize("layout", ["transformers", "original"])
@pytest.mark.parametrize("family", ["mistral", "yi"])
def test_logits_match_transformers(request, family, layout, case):
    hf_dir = request.getfixturevalue(f"hf_{family}")
    directory = hf_dir if layout == "transformers" else request.getfixturevalue(f"original_{family}")
    model = shortv.load(directory, device="cpu", dtype=torch.float32)
    text = model.config.text
    assert text.kv_heads < text.heads  # GQA
    ref = _reference(request, family)
    template = "mistral_instruct" if family == "mistral" else "chatml_direct"
    message, sizes = PROMPTS[case]
    prompt = get_template(template).render([(message, None)])
    encoded = model.encode(prompt, [image(s) for s in sizes], template=False)
    counts = [hf_visual_count(ref, s) for s in sizes]
    want = hf_logits(ref, encoded, counts)
    got = model.logits(encoded)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, **LOGITS)


_refs: dict[str, object] = {}


def _reference(request, family: str):
    if family not in _refs:
        _refs[family] = hf_reference(request.getfixturevalue(f"hf_{family}"))
    return _refs[family]


def test_parsed_decoders(mistral_model, yi_model):
    m, y = mistral_model.config.text, yi_model.config.text
    assert (m.heads, m.kv_heads, m.head_dim, m.rope_theta, m.sliding_window) == (4, 1, 12, 1e6, None)
    assert (y.heads, y.kv_heads, y.head_dim, y.rope_theta) == (6, 2, 10, 5e6)
    assert y.q_dim == 60 != y.hidden_size
    assert yi_model.tokenizer.eos_id == spm.SentencePieceProcessor(
        model_file=str(yi_model.checkpoint_dir / "tokenizer.model")).piece_to_id("<|im_end|>")


def test_sliding_window_caps_the_context(tmp_path, sp_model):
    """Mistral's window: within it, full attention is the windowed one (parity with
    transformers, whose mask applies the window); beyond it shortv refuses the input."""
    text = {**MISTRAL_TEXT, "sliding_window": 40}
    hf_dir = checkpoints.make_llava(tmp_path / "hf", sp_model, next_=True, seed=13, text=text,
                                    text_model="mistral")
    model = shortv.load(hf_dir, device="cpu", dtype=torch.float32)
    assert model.config.text.max_position_embeddings == 40 == model.config.text.sliding_window
    encoded = model.encode("[INST] <image>\nWhat? [/INST]", [image((60, 25))], template=False)
    ref = hf_reference(hf_dir)
    want = hf_logits(ref, encoded, [hf_visual_count(ref, (60, 25))])
    assert want.shape[0] <= 40
    torch.testing.assert_close(model.logits(encoded), want, **LOGITS)
    with pytest.raises(shortv.InputError):
        model.logits(model.encode("[INST] <image>\n" + "What is this? " * 8 + "[/INST]",
                                  [image((60, 25))], template=False))
    with pytest.raises(shortv.ConfigError, match="sliding_window"):
        TextConfig(max_position_embeddings=4096, sliding_window=1024)
    assert TextConfig.from_hf({**text, "model_type": "mistral",
                               "max_position_embeddings": 4096}).max_position_embeddings == 40


# ---- methods with GQA on these decoders ------------------------------------------------------


def family_batch(model: shortv.LLaVA) -> list[shortv.Encoded]:
    return [model.encode("What is this?", [image((60, 25))]),
            model.encode("Compare <image> with <image>, please.", [image((25, 60)), image((70, 40))]),
            model.encode("hello there, what color is the sky today?")]


@pytest.mark.parametrize("family", ["mistral", "yi"])
def test_shortv_equals_hooked_reference(request, family):
    model = request.getfixturevalue(f"{family}_model")
    prepared = model.prepare(family_batch(model))
    types = prepared.types.long()
    for layers in [(0,), (1, 3), (0, 1, 2, 3)]:
        with torch.no_grad():
            ours = model.hidden_states(prepared, method=ShortV(layers))
        assert_rows_close(ours, frozen_reference(model, prepared, types, layers), types != P_)


@pytest.mark.parametrize("method", [Vanilla(), ShortV((1, 3)), VTW(2)], ids=["vanilla", "shortv", "vtw"])
@pytest.mark.parametrize("family", ["mistral", "yi"])
def test_generation_with_cache_equals_recomputation(request, family, method):
    model = request.getfixturevalue(f"{family}_model")
    batch = family_batch(model)
    model.set_method(method)
    try:
        got = cached_tokens(model, batch, 6)
        for enc, tokens in zip(batch, got, strict=True):
            assert tokens == recomputed_tokens(model, enc, 6)
    finally:
        model.set_method(Vanilla())


@pytest.mark.parametrize("family", ["mistral", "yi"])
def test_fastv_keeps_the_explicitly_attended_tokens(request, family):
    """FastV's scores with GQA: each KV head serves its group of query heads."""
    model = request.getfixturevalue(f"{family}_model")
    prepared = model.prepare(family_batch(model))
    types = prepared.types.long()
    dropped = fastv_dropped(model, prepared, types, 2, 0.5)
    captured = {}
    layer = model.module.decoder.layers[2]
    handle = layer.register_forward_pre_hook(lambda _m, args: captured.update(x=args[0]))
    try:
        with torch.no_grad():
            model.hidden_states(prepared, method=FastV(k=2, r=0.5))
    finally:
        handle.remove()
    kept_visual = int((types == int(TokenType.VISUAL)).sum() - dropped.sum())
    x = captured["x"]
    # the compacted input of layer k holds exactly the kept tokens: its visual rows are the
    # visual rows the explicit reference keeps (compared through their hidden states)
    with torch.no_grad():
        vanilla_inputs = []
        hook = layer.register_forward_pre_hook(lambda _m, args: vanilla_inputs.append(args[0]))
        model.hidden_states(prepared, method=Vanilla())
        hook.remove()
    full = vanilla_inputs[0]
    keep = (types != P_) & ~dropped
    for b in range(types.shape[0]):
        want = full[b][keep[b]]
        got = x[b][-want.shape[0]:]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert kept_visual < int((types == int(TokenType.VISUAL)).sum())


# ---- the cards against the published configs ---------------------------------------------------

# liuhaotian/llava-v1.6-mistral-7b config.json (as its copies on the Hub show it; the decoder
# fields are those of mistralai/Mistral-7B-Instruct-v0.2)
ORIGINAL_MISTRAL = {
    "architectures": ["LlavaMistralForCausalLM"], "model_type": "llava_mistral",
    "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096,
    "image_aspect_ratio": "anyres", "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672],
                                                             [1008, 336], [336, 1008]],
    "intermediate_size": 14336, "max_position_embeddings": 32768, "mm_hidden_size": 1024,
    "mm_patch_merge_type": "spatial_unpad", "mm_projector_type": "mlp2x_gelu",
    "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
    "mm_vision_tower": "openai/clip-vit-large-patch14-336", "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False,
    "vocab_size": 32000,
}
# liuhaotian/llava-v1.6-34b config.json (decoder: NousResearch/Nous-Hermes-2-Yi-34B)
ORIGINAL_34B = {
    "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
    "bos_token_id": 1, "eos_token_id": 7, "hidden_act": "silu", "hidden_size": 7168,
    "image_aspect_ratio": "anyres", "image_grid_pinpoints": ORIGINAL_MISTRAL["image_grid_pinpoints"],
    "intermediate_size": 20480, "max_position_embeddings": 4096, "mm_hidden_size": 1024,
    "mm_patch_merge_type": "spatial_unpad", "mm_projector_type": "mlp2x_gelu",
    "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
    "mm_vision_tower": "openai/clip-vit-large-patch14-336", "num_attention_heads": 56,
    "num_hidden_layers": 60, "num_key_value_heads": 8, "pad_token_id": 0, "rms_norm_eps": 1e-05,
    "rope_scaling": None, "rope_theta": 5000000.0, "tie_word_embeddings": False,
    "vocab_size": 64000,
}
# llava-hf's text_config, saved sparsely (fields equal to the defaults left out)
HF_MISTRAL_TEXT = {"_name_or_path": "mistralai/Mistral-7B-Instruct-v0.2",
                   "architectures": ["MistralForCausalLM"], "intermediate_size": 14336,
                   "max_position_embeddings": 32768, "model_type": "mistral",
                   "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
                   "sliding_window": None, "vocab_size": 32064}
HF_34B_TEXT = {"_name_or_path": "NousResearch/Nous-Hermes-2-Yi-34B",
               "architectures": ["LlamaForCausalLM"], "eos_token_id": 7, "hidden_size": 7168,
               "intermediate_size": 20480, "max_position_embeddings": 4096, "model_type": "llama",
               "num_attention_heads": 56, "num_hidden_layers": 60, "num_key_value_heads": 8,
               "pad_token_id": 0, "rms_norm_eps": 1e-05, "rope_theta": 5000000.0,
               "vocab_size": 64064}


@pytest.mark.parametrize("name,raw,hf_text", [
    ("llava-v1.6-mistral-7b", ORIGINAL_MISTRAL, HF_MISTRAL_TEXT),
    ("llava-v1.6-34b", ORIGINAL_34B, HF_34B_TEXT)])
def test_cards_match_published_configs(name, raw, hf_text):
    card = zoo.get_card(name)
    parsed = from_original(raw, card.config.vision)
    assert parsed.vision_tower == card.vision_tower
    assert card.config.replace(vision_tower=parsed.vision_tower) == parsed
    hf = from_transformers({"model_type": "llava_next", "text_config": hf_text,
                            "image_grid_pinpoints": raw["image_grid_pinpoints"]})
    # llava-hf appends <image> and <pad> (padded to a multiple of 64) after the vocabulary
    assert hf.text == dataclasses.replace(card.config.text,
                                          vocab_size=card.config.text.vocab_size + 64)
    assert hf.replace(vision_tower=None) == card.config.replace(text=hf.text)
    assert card.ranking == () and card.n_frozen is None and card.ranking_origin == "none"
    assert card.config.text.kv_heads == 8 < card.config.text.heads


def test_sparse_mistral_text_config_takes_mistral_defaults():
    """A text_config of model_type mistral without num_key_value_heads / intermediate_size
    means MistralConfig's 8 and 14336, not LlamaConfig's."""
    from transformers import MistralConfig

    sparse = {"model_type": "mistral", "rope_theta": 1e6, "sliding_window": None}
    ref = MistralConfig(**sparse)
    ours = TextConfig.from_hf(sparse)
    assert (ours.kv_heads, ours.intermediate_size, ours.rms_norm_eps) == \
        (ref.num_key_value_heads, ref.intermediate_size, ref.rms_norm_eps) == (8, 14336, 1e-6)
    assert TextConfig.from_hf({"model_type": "mistral"}).max_position_embeddings == 4096  # window


def test_n_frozen_without_a_ranking_says_how_to_get_one():
    card = zoo.get_card("llava-v1.6-34b")
    with pytest.raises(shortv.ConfigError) as info:
        shortv.ranking.choose_method(card.config.text.layers, n_frozen=20,
                                     default_ranking=card.ranking, model_name=card.name)
    message = str(info.value)
    assert "shortv lc llava-v1.6-34b --data" in message and "--ranking" in message
    # with a ranking of its own it freezes as usual
    method = shortv.ranking.choose_method(60, n_frozen=2, ranking="59,58,1", model_name=card.name)
    assert method.layers == (58, 59)


def test_load_refuses_n_frozen_without_a_ranking_before_looking_for_weights(tmp_path, monkeypatch):
    """No weights anywhere and offline: the missing ranking is what the user hears, at once,
    not that the 34B checkpoint is missing (which they would fetch in vain)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SHORTV_WEIGHTS", str(tmp_path / "store"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(shortv.ConfigError, match=r"shortv lc llava-v1\.6-34b"):
        shortv.load("llava-v1.6-34b", n_frozen=20)
    with pytest.raises(shortv.ModelNotFoundError):
        shortv.load("llava-v1.6-34b")


# ---- FLOPs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llava-v1.6-mistral-7b", "llava-v1.6-34b"])
def test_layer_flops_of_the_real_shapes_match_flop_counter(name):
    """One decoder layer of the card's real sizes (built on the meta device: no memory), with
    q queries over k keys, against torch.utils.flop_counter: K/V projections are kv_heads wide."""
    from torch.utils.flop_counter import FlopCounterMode

    c = zoo.get_card(name).config.text
    q, k = 64, 640
    with torch.device("meta"):
        h_q, h_k = torch.empty(1, q, c.hidden_size), torch.empty(1, k, c.hidden_size)
        wq, wk = torch.empty(c.q_dim, c.hidden_size), torch.empty(c.kv_dim, c.hidden_size)
        wv, wo = torch.empty(c.kv_dim, c.hidden_size), torch.empty(c.hidden_size, c.q_dim)
        w1 = torch.empty(c.intermediate_size, c.hidden_size)
        w2 = torch.empty(c.hidden_size, c.intermediate_size)
        with FlopCounterMode(display=False) as counter:
            qs = (h_q @ wq.T).view(1, q, c.heads, c.head_dim).transpose(1, 2)
            ks = (h_k @ wk.T).view(1, k, c.kv_heads, c.head_dim).transpose(1, 2)
            vs = (h_k @ wv.T).view(1, k, c.kv_heads, c.head_dim).transpose(1, 2)
            group = c.heads // c.kv_heads
            ks, vs = ks.repeat_interleave(group, 1), vs.repeat_interleave(group, 1)
            att = (qs @ ks.transpose(-1, -2)).softmax(-1) @ vs
            out = att.transpose(1, 2).reshape(1, q, c.q_dim) @ wo.T
            (torch.nn.functional.silu(out @ w1.T) * (out @ w1.T)) @ w2.T
    want = counter.get_total_flops()
    assert abs(layer_flops(c, q, k) - want) <= 0.02 * want
    assert layer_flops(c, q, k) == want  # exact, in fact


def test_flops_table_for_the_new_cards():
    """Vanilla and every method at the paper's convention (64 text + 2880 visual tokens),
    and K/V projections counted at kv_heads: an MHA decoder of the same sizes costs more."""
    mistral = zoo.get_card("llava-v1.6-mistral-7b").config.text
    yi = zoo.get_card("llava-v1.6-34b").config.text
    tflops = {(c.layers, m.describe()): decoder_flops(c, m.for_layers(c.layers), 64, 2880) / 1e12
              for c in (mistral, yi)
              for m in (Vanilla(), FastV(2, 0.5), VTW(), ShortV(tuple(range(19))))}
    assert round(tflops[32, "vanilla"], 1) == 45.6 and round(tflops[60, "vanilla"], 1) == 212.0
    assert round(tflops[32, "fastv(k=2, r=0.5)"], 1) == 23.6
    assert round(tflops[60, "fastv(k=2, r=0.5)"], 1) == 108.2
    mha = TextConfig(**{**mistral.__dict__, "kv_heads": mistral.heads})
    n = 64 + 2880
    assert decoder_flops(mha, Vanilla(), 64, 2880) - decoder_flops(mistral, Vanilla(), 64, 2880) \
        == 32 * 2 * 2 * n * 4096 * (4096 - 1024)  # K and V: 3 of 4 heads' width saved


# ---- LC with GQA, and the cards through shortv.load -----------------------------------------


def test_lc_equals_brute_force_on_gqa(original_yi):
    """Layer Contribution on the Yi-style GQA decoder (fp64) against one hooked vanilla run
    per layer and type (tests/reference.py, with the anyres token types)."""
    from shortv.lc import layer_contribution

    model = shortv.load(original_yi, device="cpu", dtype=torch.float64)
    model.template = get_template("chatml_direct")
    encoded = [model.encode("What is this?", [image((60, 25))]),
               model.encode("Compare <image> with <image>.", [image((25, 60)), image((70, 40))])]
    report = layer_contribution(model, encoded, progress=False)
    want = {"visual": [0.0] * model.num_layers, "text": [0.0] * model.num_layers}
    for enc in encoded:
        prepared = model.prepare([enc])
        types = prepared.types.long()
        p = last_logits(model, prepared, {})
        for name, kind in (("visual", int(TokenType.VISUAL)), ("text", int(TokenType.TEXT))):
            for i in range(model.num_layers):
                want[name][i] += kl_q_p(last_logits(model, prepared, {i: types == kind}), p) / 2
    for name in want:
        torch.testing.assert_close(torch.tensor(getattr(report, name)), torch.tensor(want[name]),
                                   rtol=1e-6, atol=1e-13)
    assert max(report.visual) > 1e-6


@pytest.fixture
def store(tmp_path, monkeypatch, original_mistral, original_yi) -> Path:
    """A weight store holding the tiny checkpoints under the new cards' names."""
    for name, src in (("llava-v1.6-mistral-7b", original_mistral), ("llava-v1.6-34b", original_yi)):
        shutil.copytree(src, tmp_path / name)
    monkeypatch.setenv("SHORTV_WEIGHTS", str(tmp_path))
    return tmp_path


def test_zoo_names_load_with_their_templates(store):
    yi = shortv.load("llava-v1.6-34b", device="cpu", dtype=torch.float32)
    assert yi.template.name == "chatml_direct" and yi.name == "llava-v1.6-34b"
    enc = yi.encode("What is it?", [image((60, 25))])
    assert enc.prompt.startswith("<|im_start|>system\nAnswer the questions.<|im_end|>")
    result = yi.generate(["What is it?"], [[image((60, 25))]], max_new_tokens=4)[0]
    assert result.finish_reason in ("length", "eos", "stop")
    mistral = shortv.load("llava-v1.6-mistral-7b", device="cpu", dtype=torch.float32)
    assert mistral.template.name == "mistral_instruct"
    assert mistral.encode("Hi").prompt == "[INST] Hi [/INST]"
    with pytest.raises(shortv.ConfigError, match=re.escape("shortv lc llava-v1.6-mistral-7b --data")):
        shortv.load("llava-v1.6-mistral-7b", n_frozen=2, device="cpu")
    frozen = shortv.load("llava-v1.6-mistral-7b", n_frozen=2, ranking=[3, 0, 1], device="cpu")
    assert frozen.frozen_layers == (0, 3)
