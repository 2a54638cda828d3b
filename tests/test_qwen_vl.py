"""Qwen2-VL and Qwen2.5-VL, loaded by `shortv.load` from tiny random checkpoints in both
published layouts, against transformers' `Qwen2VLForConditionalGeneration` /
`Qwen2_5_VLForConditionalGeneration` on the same weights (fp32).

Oracles: transformers' logits (its own M-RoPE `get_rope_index`, tower, merger and decoder)
for a square image, a wide image that smart_resize changes, two images of different sizes
and text alone; its greedy `generate` for KV-cached decoding; its own decoder layers run on
the text tokens alone, at their original 3-D positions, for a method that drops the
visual tokens (VTW); its image processor's grid for the number of visual tokens.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

import shortv
from shortv import DART, VTW, FastV, PDrop, ShortV, SparseVLM, TokenType, VisionZip, compose
from shortv.errors import CheckpointError, ConfigError, InputError
from shortv.flops import flops_report
from shortv.generate import GenerationOptions, generate
from shortv.tokenizer import IMAGE_TOKEN

from .cli_runner import run_main
from .qwen_checkpoints import VARIANTS, build_model, save_original, save_transformers
from .reference import KeepRecorder, authors_dart_retained, random_rgb, recomputed_with_hooks, reweighting

LAYOUTS = ("transformers", "original")
TOL = dict(atol=1e-4, rtol=1e-4)
PROMPT = "Describe the picture in detail."
# 2.5's windows are 112 px (4×4 merged tokens): these sizes give several, partial ones too.
CASES = {
    "square": [(224, 224)],
    "wide-resized": [(333, 97)],
    "two-sizes": [(280, 170), (120, 200)],
    "text-only": [],
}


def images_of(case: str) -> list:
    return [random_rgb(w, h, seed=i + 1) for i, (w, h) in enumerate(CASES[case])]


@pytest.fixture(scope="module", params=VARIANTS)
def pair(request, tmp_path_factory: pytest.TempPathFactory):
    """(transformers model, {layout: shortv model}) on the same random weights."""
    root = tmp_path_factory.mktemp(request.param)
    hf = build_model(request.param, root / "transformers")
    save_transformers(hf, root / "transformers")
    save_original(hf, root / "original")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(root / "transformers" / name, root / "original" / name)
    ours = {layout: shortv.load(str(root / layout), device="cpu", dtype="float32") for layout in LAYOUTS}
    return hf, ours


def hf_inputs(model: shortv.QwenVL, encoded: shortv.Encoded) -> dict[str, torch.Tensor]:
    """transformers' inputs for the same prompt: each image's one <|image_pad|> repeated
    once per visual token (as its processor writes the text), the same pixel values."""
    ids = []
    grids = [[im.shape[0], 2 * im.shape[1], 2 * im.shape[2]] for im in encoded.images]
    counts = iter(im.shape[0] * im.shape[1] * im.shape[2] for im in encoded.images)
    for i in encoded.input_ids.tolist():
        ids += [model.tokenizer.image_pad_id] * next(counts) if i == IMAGE_TOKEN else [i]
    input_ids = torch.tensor([ids])
    inputs = {"input_ids": input_ids,
              "mm_token_type_ids": (input_ids == model.tokenizer.image_pad_id).int()}
    if encoded.images:
        inputs["pixel_values"] = torch.cat([im.flatten(0, 3) for im in encoded.images])
        inputs["image_grid_thw"] = torch.tensor(grids)
    return inputs


def hf_logits(hf, model: shortv.QwenVL, encoded: shortv.Encoded) -> torch.Tensor:
    with torch.no_grad():
        return hf(**hf_inputs(model, encoded)).logits[0]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(pair, case: str, layout: str):
    hf, ours = pair
    model = ours[layout]
    encoded = model.encode(PROMPT, images_of(case))
    torch.testing.assert_close(model.logits(encoded), hf_logits(hf, model, encoded), **TOL)


def test_visual_tokens_per_image_follow_the_processor(pair):
    """(h/28)·(w/28) per image, as transformers' image processor's grid says."""
    _, ours = pair
    model = ours["original"]
    images = [*images_of("two-sizes"), random_rgb(1000, 40, seed=9)]
    types = model.token_types(model.encode(PROMPT, images))
    grids = Qwen2VLImageProcessorPil()(images, return_tensors="pt")["image_grid_thw"]
    assert int((types == int(TokenType.VISUAL)).sum()) == int(grids.prod(dim=1).sum()) // 4


def test_padded_batch_equals_each_prompt_alone(pair):
    """Two prompts of different lengths (images of different token counts) left-padded
    into one batch: each row's logits are transformers' for that prompt alone."""
    hf, ours = pair
    model = ours["transformers"]
    batch = [model.encode(PROMPT, images_of("two-sizes")), model.encode("Why?", images_of("wide-resized"))]
    with torch.inference_mode():
        prepared = model.prepare(batch)
        logits = model.module.decoder.head(model.hidden_states(prepared))
    assert prepared.positions.shape == (*prepared.types.shape, 3)
    for row, encoded in enumerate(batch):
        n = prepared.lengths[row]
        torch.testing.assert_close(logits[row, -n:], hf_logits(hf, model, encoded), **TOL)


def test_greedy_generation_matches_transformers(pair):
    """KV-cached decoding (M-RoPE positions continuing after the prompt's furthest one) ==
    transformers' greedy generate, for each prompt alone and for both in one batch."""
    hf, ours = pair
    model = ours["original"]
    batch = [model.encode(PROMPT, images_of("two-sizes")), model.encode("Why?", images_of("square"))]
    options = GenerationOptions(max_new_tokens=8)
    expected = []
    for encoded in batch:
        inputs = hf_inputs(model, encoded)
        with torch.no_grad():
            out = hf.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
        expected.append(out[0, inputs["input_ids"].shape[1]:].tolist())
    assert [r.token_ids for r in (generate(model, [e], options)[0] for e in batch)] == expected
    assert [r.token_ids for r in generate(model, batch, options)] == expected


def test_vtw_keeps_the_text_tokens_3d_positions(pair):
    """VTW(k) drops every visual token before layer k. Oracle: transformers' own decoder
    layers k.. run on the text tokens alone, from transformers' hidden states at layer k,
    at the text tokens' positions from transformers' get_rope_index."""
    hf, ours = pair
    model = ours["transformers"]
    k = 2
    encoded = model.encode(PROMPT, images_of("two-sizes"))
    inputs = hf_inputs(model, encoded)
    lm = hf.model.language_model
    with torch.no_grad():
        out = hf(**inputs, output_hidden_states=True)
        positions, _ = hf.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                               inputs["image_grid_thw"])
        text = inputs["mm_token_type_ids"][0] == 0
        h = out.hidden_states[k][:, text]
        cos_sin = lm.rotary_emb(h, positions[:, :, text])
        for layer in lm.layers[k:]:
            h = layer(h, position_embeddings=cos_sin)
        expected = hf.lm_head(lm.norm(h))[0]
    model.set_method(VTW(k=k))
    try:
        got = model.logits(encoded)
    finally:
        model.set_method(shortv.Vanilla())
    torch.testing.assert_close(got[text], expected, **TOL)


# Each method at a budget that keeps every visual token equals vanilla on Qwen too.
FULL = {
    "shortv-none": lambda n: ShortV(()),
    "fastv-r0": lambda n: FastV(k=1, r=0.0),
    "pdrop-lam1": lambda n: PDrop(lam=1.0),
    "dart-all": lambda n: DART(k=1, budget=n, pivot_image=1, pivot_text=4),
    "sparsevlm-all": lambda n: SparseVLM(budget=576),  # its budgets count per 576 visual tokens
    "compose": lambda n: compose(ShortV(()), FastV(k=1, r=0.0)),
}
# And at a reducing budget they run end to end (prefill + KV-cached decode).
REDUCING = {
    "shortv": lambda n: ShortV((1, 2)),
    "fastv": lambda n: FastV(k=1, r=0.5),
    "vtw": lambda n: VTW(k=2),
    "pdrop": lambda n: PDrop(layers=(1, 2, 3), lam=0.5),
    "dart": lambda n: DART(k=1, budget=max(8, n // 4), pivot_image=1, pivot_text=2),
    "sparsevlm": lambda n: SparseVLM(layers=(0, 1, 2), budget=96),  # 96 per 576 visual tokens
}


@pytest.mark.parametrize("name", FULL)
def test_full_budget_is_vanilla(pair, name: str):
    _, ours = pair
    model = ours["transformers"]
    batch = [model.encode(PROMPT, images_of("two-sizes")), model.encode("Why?", images_of("square"))]
    with torch.inference_mode():
        prepared = model.prepare(batch)
        vanilla = model.module.decoder.head(model.hidden_states(prepared))
        n = int((prepared.types == int(TokenType.VISUAL)).sum(dim=1).max())
        model.set_method(FULL[name](n))
        try:
            got = model.module.decoder.head(model.hidden_states(prepared))
        finally:
            model.set_method(shortv.Vanilla())
    real = prepared.types != int(TokenType.PAD)
    torch.testing.assert_close(got[real], vanilla[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", REDUCING)
def test_reducing_methods_generate(pair, name: str):
    """Batched generation under a reducing method equals each prompt's alone (the kept
    tokens' positions and the decode positions travel with each row)."""
    _, ours = pair
    model = ours["transformers"]
    batch = [model.encode(PROMPT, images_of("two-sizes")), model.encode("Why?", images_of("square"))]
    n = int((model.token_types(batch[1]) == int(TokenType.VISUAL)).sum())
    model.set_method(REDUCING[name](n))
    try:
        options = GenerationOptions(max_new_tokens=5)
        alone = [generate(model, [e], options)[0].token_ids for e in batch]
        together = [r.token_ids for r in generate(model, batch, options)]
    finally:
        model.set_method(shortv.Vanilla())
    assert together == alone
    assert all(len(t) == 5 for t in alone)


def test_visionzip_is_refused_in_one_line(pair):
    """When the method is set (before any input), and by the module itself."""
    _, ours = pair
    model = ours["transformers"]
    with pytest.raises(ConfigError, match="LLaVA"):
        model.set_method(compose(FastV(k=1), VisionZip(budget=4)))
    assert model.method == shortv.Vanilla()
    encoded = model.encode(PROMPT, images_of("square"))
    with pytest.raises(InputError, match="LLaVA"):
        model.module.prepare([encoded], method=VisionZip(budget=4))


def test_raw_prompts_take_qwens_image_marker(pair):
    """template=False: the text as transformers' processor takes it, one
    <|vision_start|><|image_pad|><|vision_end|> per image; miscounts are one InputError."""
    hf, ours = pair
    model = ours["original"]
    marker = "<|vision_start|><|image_pad|><|vision_end|>"
    text = f"<|im_start|>user\n{marker}{marker}Compare.<|im_end|>\n<|im_start|>assistant\n"
    encoded = model.encode(text, images_of("two-sizes"), template=False)
    torch.testing.assert_close(model.logits(encoded), hf_logits(hf, model, encoded), **TOL)
    assert encoded.prompt == text
    with pytest.raises(InputError, match="placeholder"):
        model.encode(text, images_of("square"), template=False)


def test_the_template_is_qwens_chat_template(pair):
    _, ours = pair
    model = ours["original"]
    assert model.template.name == "qwen2_vl"
    assert model.encode("Hi", images_of("square")).prompt == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n<|im_start|>assistant\n")


def test_config_that_does_not_fit_the_weights_is_one_error(pair, tmp_path: Path):
    _, ours = pair
    source = ours["original"].checkpoint_dir
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    raw = json.loads((broken / "config.json").read_text())
    raw["vocab_size"] = raw["vocab_size"] * 2
    (broken / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="vocab_size"):
        shortv.load(str(broken), device="cpu")
    raw["model_type"], raw["architectures"] = "qwen9_vl", ["Qwen9VL"]
    (broken / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="qwen2_5_vl"):
        shortv.load(str(broken), device="cpu")


def test_layer_contribution_equals_brute_force_on_transformers(pair):
    """LC (`shortv.layer_contribution`, float64) against brute force on transformers' model:
    for each layer i and token type, a forward hook on transformers' layer i resets that
    type's rows of its output to its input; KL(Q ‖ P) at the last position."""
    hf, ours = pair
    model = shortv.load(str(ours["original"].checkpoint_dir), device="cpu", dtype="float64")
    hf = hf.double()
    try:
        encoded = [model.encode(PROMPT, images_of("two-sizes")),
                   model.encode("Why?", images_of("wide-resized"))]
        report = shortv.layer_contribution(model, encoded, progress=False)
        expected = {"visual": [0.0] * model.num_layers, "text": [0.0] * model.num_layers}
        for e in encoded:
            inputs = hf_inputs(model, e)
            visual = inputs["mm_token_type_ids"][0] == 1
            with torch.no_grad():
                p = hf(**inputs).logits[0, -1]
                for name, rows in (("visual", visual), ("text", ~visual)):
                    for i, layer in enumerate(hf.model.language_model.layers):
                        def reset(module, args, kwargs, output, rows=rows):
                            x = args[0] if args else kwargs["hidden_states"]
                            return torch.where(rows[None, :, None], x, output)
                        handle = layer.register_forward_hook(reset, with_kwargs=True)
                        try:
                            q = hf(**inputs).logits[0, -1]
                        finally:
                            handle.remove()
                        log_q, log_p = q.log_softmax(-1), p.log_softmax(-1)
                        expected[name][i] += float((log_q.exp() * (log_q - log_p)).sum()) / len(encoded)
    finally:
        hf.float()
    for name in ("visual", "text"):
        torch.testing.assert_close(torch.tensor(getattr(report, name)), torch.tensor(expected[name]),
                                   rtol=1e-6, atol=1e-12)
    assert max(expected["visual"]) > 1e-6 and max(expected["text"]) > 1e-4  # not vacuous
    assert report.ranking == sorted(range(model.num_layers), key=lambda i: (expected["visual"][i], i))


# The published config.json of each card's repo (Qwen's original release), transcribed.
PUBLISHED = {
    "qwen2-vl-2b-instruct": dict(
        model_type="qwen2_vl", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
        max_position_embeddings=32768, vision_config=dict(depth=32, embed_dim=1280, mlp_ratio=4,
                                                          num_heads=16, hidden_size=1536)),
    "qwen2-vl-7b-instruct": dict(
        model_type="qwen2_vl", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
        max_position_embeddings=32768, vision_config=dict(depth=32, embed_dim=1280, mlp_ratio=4,
                                                          num_heads=16, hidden_size=3584)),
    "qwen2.5-vl-3b-instruct": dict(
        model_type="qwen2_5_vl", hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
        num_attention_heads=16, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
        max_position_embeddings=128000, vision_config=dict(
            depth=32, hidden_act="silu", hidden_size=1280, intermediate_size=3420, num_heads=16,
            out_hidden_size=2048, window_size=112, fullatt_block_indexes=[7, 15, 23, 31])),
    "qwen2.5-vl-7b-instruct": dict(
        model_type="qwen2_5_vl", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
        max_position_embeddings=128000, vision_config=dict(
            depth=32, hidden_act="silu", hidden_size=1280, intermediate_size=3420, num_heads=16,
            out_hidden_size=3584, window_size=112, fullatt_block_indexes=[7, 15, 23, 31])),
}
COMMON = dict(rms_norm_eps=1e-6, rope_theta=1000000.0, hidden_act="silu", bos_token_id=151643,
              eos_token_id=151645, sliding_window=32768, use_sliding_window=False,
              rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})


@pytest.mark.parametrize("name", PUBLISHED)
def test_cards_hold_the_published_configs(name: str):
    """Each card's config is what its repo's config.json (+ preprocessor_config.json's
    bounds) reads as, and transformers reads that config.json to the same sizes."""
    from transformers import AutoConfig

    from shortv import zoo
    from shortv.models.qwen_config import from_config_json, preprocess_from_json

    raw = {**COMMON, **PUBLISHED[name]}
    card = zoo.get_card(name)
    preprocess = preprocess_from_json({"min_pixels": 3136, "max_pixels": 12845056})
    assert card.config == from_config_json(raw, preprocess)
    hf = AutoConfig.for_model(**raw)
    text, vision = hf.text_config, hf.vision_config
    t = card.config.text
    assert (t.layers, t.hidden_size, t.heads, t.kv_heads, t.intermediate_size, t.vocab_size) == (
        text.num_hidden_layers, text.hidden_size, text.num_attention_heads,
        text.num_key_value_heads, text.intermediate_size, text.vocab_size)
    assert t.mrope_section == tuple(text.rope_parameters["mrope_section"])
    assert t.tie_word_embeddings == hf.tie_word_embeddings
    assert card.config.vision.depth == vision.depth


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_continuous_batching_joins_and_leaves(pair, static: bool):
    """The server's batching: a prompt runs alone for two steps, two more (images of
    other token counts, a padded batch) join it, each leaves when done; every step's
    logits equal that prompt's alone (M-RoPE decode positions travel with each row)."""
    _, ours = pair
    model = ours["transformers"]
    encoded = [model.encode(PROMPT, images_of("two-sizes")), model.encode("Why?", images_of("square")),
               model.encode("Hi", [])]
    new = [5, 3, 4]

    def alone(e: shortv.Encoded, n: int) -> list[torch.Tensor]:
        logits, state = model.prefill([e], max_new_tokens=n)
        out = [logits[0]]
        for _ in range(n - 1):
            out.append(model.step(state, out[-1].argmax(-1)[None])[0])
        return out

    model.module._static_decode = static
    try:
        expected = [alone(e, n) for e, n in zip(encoded, new, strict=True)]
        state = model.decode_state(3, 400)
        slot_of = [2, 0, 1]  # the first prompt in the last slot: the rows before it are free
        logits, _ = model.prefill(encoded[:1], max_new_tokens=max(new), into=state, slots=[2])
        got = [[logits[0]]]
        got[0].append(model.step(state, torch.tensor([0, 0, int(got[0][-1].argmax())]))[2])
        logits, _ = model.prefill(encoded[1:], max_new_tokens=max(new), into=state, slots=[0, 1])
        got += [[row] for row in logits]
        rows = [0, 1, 2]
        while rows:
            tokens = torch.zeros(state.rows_needed(), dtype=torch.long)
            for r in rows:
                tokens[slot_of[r]] = got[r][-1].argmax()
            out = model.step(state, tokens)
            for r in rows:
                got[r].append(out[slot_of[r]])
            done = [r for r in rows if len(got[r]) == new[r]]
            state.free([slot_of[r] for r in done])
            rows = [r for r in rows if r not in done]
    finally:
        model.module._static_decode = False
    for mine, reference in zip(got, expected, strict=True):
        torch.testing.assert_close(torch.stack(mine), torch.stack(reference), atol=1e-4, rtol=0)


def test_eval_command_runs_a_qwen_checkpoint(pair, tmp_path: Path):
    """`shortv eval` on a Qwen checkpoint directory: the answers are the model's own greedy
    answers (chat), and the provenance names the Qwen template."""
    _, ours = pair
    model = ours["original"]
    images = images_of("two-sizes")
    for i, image in enumerate(images):
        image.save(tmp_path / f"{i}.png")
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"question_id": i, "image": f"{i}.png", "text": "What?"}) + "\n"
                                 for i in range(len(images))))
    answers = tmp_path / "a.jsonl"
    run = subprocess.run([sys.executable, "-m", "shortv", "eval", str(model.checkpoint_dir),
                          "--questions", str(questions), "--image-folder", str(tmp_path),
                          "--answers-out", str(answers), "--max-new-tokens", "4", "--dtype", "float32",
                          "--device", "cpu", "--quiet"],
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in answers.read_text().splitlines()]
    for line in lines:
        image = Image.open(tmp_path / f"{line['question_id']}.png")
        assert line["text"] == model.chat("What?", [image], max_new_tokens=4)
        assert line["metadata"]["shortv"]["template"] == "qwen2_vl"


def test_prefill_benchmark_runs_an_mrope_decoder():
    """`shortv bench`'s timing loop feeds an M-RoPE decoder positions on every stream (it
    failed on 1-D positions before)."""
    from shortv.bench import layout, random_decoder, time_methods
    from shortv.models.config import TextConfig

    config = TextConfig(vocab_size=64, hidden_size=64, intermediate_size=96, layers=4, heads=4,
                        kv_heads=2, head_dim=16, attention_bias=True, attention_out_bias=False,
                        mrope_section=(2, 3, 3))
    decoder = random_decoder(config, torch.device("cpu"), torch.float32)
    runs = time_methods(decoder, [shortv.Vanilla(), FastV(k=2, r=0.5)], layout(8, 20, torch.device("cpu")),
                        repeats=2, warmup=0)
    assert [len(r) for r in runs] == [2, 2] and all(ms > 0 for r in runs for ms in r)


# ---- DART against its authors' Qwen2-VL code ------------------------------------------------


@pytest.mark.parametrize("ratio", [0.5, 0.778])
@pytest.mark.parametrize("case", ["wide-resized", "square"])
def test_dart_keeps_what_the_authors_qwen_code_keeps(pair, case: str, ratio: float):
    """DART(k=2) by default on Qwen: the visual tokens kept are those of the authors'
    Qwen2-VL function on transformers' own layer-1 keys (M-RoPE, from get_rope_index) and
    layer-2 input, and the logits are transformers' layers 2.. run on the kept tokens at
    their original 3-D positions (as the code: `position_ids[:, :, keep_indexs]`)."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb, repeat_kv

    hf, ours = pair
    model = ours["transformers"]
    encoded = model.encode(PROMPT, images_of(case))
    inputs = hf_inputs(model, encoded)
    lm = hf.model.language_model
    c = lm.config
    k = 2
    with torch.no_grad():
        out = hf(**inputs, output_hidden_states=True)
        positions, _ = hf.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                               inputs["image_grid_thw"])
        attention = lm.layers[k - 1].self_attn
        h = lm.layers[k - 1].input_layernorm(out.hidden_states[k - 1])
        keys = attention.k_proj(h).view(1, h.shape[1], c.num_key_value_heads, -1).transpose(1, 2)
        cos, sin = lm.rotary_emb(h, positions)
        _, keys = apply_rotary_pos_emb(keys, keys, cos, sin)
        keys = repeat_kv(keys, c.num_attention_heads // c.num_key_value_heads)
        image = torch.nonzero(inputs["mm_token_type_ids"][0]).flatten()
        start, length = int(image[0]), image.numel()
        # the Qwen2-VL code's TOKEN_TOPK: int(image_token_length * (1 - reduction_ratio) / 8)
        expected = authors_dart_retained(lm.norm(out.hidden_states[k]), keys, start, length,
                                         token_topk=int(length * (1 - ratio) / 8))
        keep = (inputs["mm_token_type_ids"][0] == 0).clone()
        keep[expected] = True
        hidden = out.hidden_states[k][:, keep]
        cos_sin = lm.rotary_emb(hidden, positions[:, :, keep])
        for layer in lm.layers[k:]:
            hidden = layer(hidden, position_embeddings=cos_sin)
        logits = hf.lm_head(lm.norm(hidden))[0]
    model.set_method(DART(k=k, reduction_ratio=ratio))
    try:
        assert "budget_rule=floor" in model.method.describe()  # the Qwen code's count, by default
        types = model.token_types(encoded)
        with KeepRecorder(DART) as recorder, torch.no_grad():
            got = model.logits(encoded)
    finally:
        model.set_method(shortv.Vanilla())
    assert int(torch.nonzero(types == int(TokenType.VISUAL))[0]) == start  # the same columns
    assert recorder.kept[0][1][0] == expected
    hf_text = inputs["mm_token_type_ids"][0] == 0
    torch.testing.assert_close(got[types == int(TokenType.TEXT)], logits[hf_text[keep]], **TOL)


def test_flops_cli_counts_dart_as_a_loaded_qwen_model_runs_it(pair, capsys):
    """`shortv flops` on a Qwen checkpoint fits DART's count as `QwenVL.check_method` does,
    so the analytic figure is the one `model.flops` gives for what the model runs."""
    _, ours = pair
    model = ours["transformers"]
    directory = model.checkpoint_dir
    code, out, err = run_main(["flops", str(directory), "--method", "dart", "--n-visual", "72", "--json"],
                              capsys)
    assert code == 0, err
    report = json.loads(out)
    assert "budget_rule=floor" in report["method"]
    fitted = model.check_method(DART())
    assert report["tflops"] == flops_report(model.config.text, fitted, 64, 72)["tflops"]
    round_rule = flops_report(model.config.text, DART(budget_rule="round").for_layers(model.num_layers),
                              64, 72)["tflops"]
    assert report["tflops"] < round_rule  # 72 visual tokens: 1 per pivot against 2


def test_hook_points_equal_transformers_hidden_states(pair):
    """The hook points on Qwen (M-RoPE): resid_pre[i] is transformers' hidden_states[i],
    resid_post[i] its hidden_states[i + 1] (the last one after the final norm there)."""
    hf, ours = pair
    model = ours["transformers"]
    encoded = model.encode(PROMPT, images_of("two-sizes"))
    logits, cache = model.run_with_cache(encoded, names=["resid_pre", "resid_post"])
    with torch.no_grad():
        out = hf(**hf_inputs(model, encoded), output_hidden_states=True)
    lm = hf.model.language_model
    for i in range(model.num_layers):
        torch.testing.assert_close(cache["resid_pre", i][0], out.hidden_states[i][0], **TOL)
        post = cache["resid_post", i][0]
        if i == model.num_layers - 1:
            post = lm.norm(post)
        torch.testing.assert_close(post, out.hidden_states[i + 1][0], **TOL)
    torch.testing.assert_close(logits, out.logits[0], **TOL)


def test_decode_attention_pattern_is_the_recomputed_last_row_on_qwen(pair):
    """With M-RoPE decode positions: an attn_pattern hook at each decode step sees the new
    token's row over the sequence so far, the last row that recomputing the grown sequence
    with the same hook gives, and its change steers the tokens as in the recomputation."""
    _, ours = pair
    model = ours["transformers"]
    encoded = model.encode(PROMPT, images_of("two-sizes"))
    seen: list = []
    tokens = model.generate([PROMPT], [images_of("two-sizes")], max_new_tokens=4,
                            hooks={("attn_pattern", 1): reweighting(seen, 0.05)})[0].token_ids
    alone: list = []
    assert tokens == recomputed_with_hooks(model, encoded, {("attn_pattern", 1): reweighting(alone, 0.05)}, 4)
    assert len(seen) == 4 and [s.shape[-1] for s in seen] == [a.shape[-1] for a in alone]
    for got, expected in zip(seen, alone, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_visual_boxes_are_where_the_processor_puts_the_merged_patches(pair):
    """Qwen: painting white the box a visual token is said to see, on a black wide picture,
    makes that token's 28 x 28 cell of the resized image the brightest (the processor's
    own resize and normalisation, before its patch reordering)."""
    _, ours = pair
    model = ours["transformers"]
    size = (333, 97)
    enc = model.encode(PROMPT, [Image.new("RGB", size)])
    boxes = model.visual_boxes(enc)[0]
    assert boxes.shape[0] == int((model.token_types(enc) == int(TokenType.VISUAL)).sum())
    factor = model.module.config.vision.factor
    target = model.processor.target_size(*size)
    for k in range(0, boxes.shape[0], 3):
        image = Image.new("RGB", size, (0, 0, 0))
        image.paste((255, 255, 255), tuple(round(float(v)) for v in boxes[k]))
        pixels = model.processor.normalise(image.resize(target, resample=Image.Resampling.BICUBIC))
        _, h, w = pixels.shape
        cells = pixels.mean(0).view(h // factor, factor, w // factor, factor).mean(dim=(1, 3)).flatten()
        assert int(cells.argmax()) == k


def test_vision_tower_points_equal_transformers(pair):
    """vision.resid_post[i] on Qwen is transformers' vision block i output (patches in the
    processor's order; Qwen2.5-VL's window reordering undone), and projector_out is what
    its language model receives at the image positions."""
    hf, ours = pair
    model = ours["transformers"]
    encoded = model.encode(PROMPT, images_of("two-sizes"))
    _, cache = model.run_with_cache(encoded, names=["vision.resid_post", "projector_out"])
    inputs = hf_inputs(model, encoded)
    outputs = {}
    blocks = hf.model.visual.blocks
    handles = [block.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out))
               for i, block in enumerate(blocks)]
    try:
        with torch.no_grad():
            out = hf(**inputs, output_hidden_states=True)
    finally:
        for handle in handles:
            handle.remove()
    order = None
    visual_tower = hf.model.visual
    if hasattr(visual_tower, "permute_input_for_window_attn"):  # Qwen2.5-VL: blocks in window order
        from transformers.vision_utils import get_vision_window_index

        window, _ = get_vision_window_index(inputs["image_grid_thw"],
                                            spatial_merge_size=visual_tower.spatial_merge_size,
                                            window_size=visual_tower.window_size,
                                            patch_size=visual_tower.patch_size)
        unit = visual_tower.spatial_merge_unit
        rows = (window[:, None] * unit + torch.arange(unit)).flatten()
        order = torch.empty_like(rows)
        order[rows] = torch.arange(rows.numel())
    for i in range(len(blocks)):
        theirs = outputs[i] if order is None else outputs[i][order]
        torch.testing.assert_close(cache["vision.resid_post", i][0], theirs, **TOL)
    visual = cache.types[0] == int(TokenType.VISUAL)
    torch.testing.assert_close(cache["projector_out", 0][0][visual], out.hidden_states[0][0][visual], **TOL)


def test_vision_hooks_on_qwen_patch_another_images_tower(pair):
    """A hook at a Qwen ViT block sees the patches in the processor's order, and writing
    another image's (same size) block output there gives that image's logits, through
    Qwen2.5-VL's window order too."""
    _, ours = pair
    model = ours["transformers"]
    a = model.encode(PROMPT, [random_rgb(120, 90, seed=1)])
    b = model.encode(PROMPT, [random_rgb(120, 90, seed=2)])
    last = model.module.vision_depth - 1
    _, cache_b = model.run_with_cache(b, names=["vision.resid_post"])
    same = model.run_with_hooks(a, {("vision.resid_post", 1): lambda x, t: x})
    torch.testing.assert_close(same, model.logits(a), **TOL)
    patched = model.run_with_hooks(
        a, {("vision.resid_post", last): lambda x, t: cache_b["vision.resid_post", last]})
    torch.testing.assert_close(patched, model.logits(b), **TOL)
    assert not torch.allclose(model.logits(a), model.logits(b), atol=1e-3)
