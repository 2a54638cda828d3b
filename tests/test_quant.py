"""Weight-only int8 / int4 quantization (`shortv.models.quant`, `shortv.load(quantize=)`).

The oracles: each scheme's rule written out here (int8: per output channel, symmetric;
int4: per group of inputs, min/max with the offset convention of torch's kernel), applied
to the checkpoint's own weights, and transformers' Llava run on the weights so rounded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import shortv
from shortv import ConfigError, FastV, ShortV, Vanilla
from shortv.eval import provenance
from shortv.models.quant import (
    KERNEL_MAX_ROWS,
    Quantization,
    QuantizedLinear,
    _pack_int4,
    decoder_weight_bytes,
)
from shortv.ops import Linear

from . import checkpoints

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from .cli_runner import run_main
from .reference import hf_input_ids, hf_tokens_per_image

EXAMPLE = Path(__file__).resolve().parent.parent / "weights" / "llava-tiny-demo" / "example.png"


def int8_rule(w: torch.Tensor) -> torch.Tensor:
    """The weight int8 per output channel gives: q = round(w / s), s = max|w| / 127."""
    s = w.abs().amax(dim=1, keepdim=True) / 127
    return (w / s).round().clamp(-127, 127) * s


def int4_rule(w: torch.Tensor, group: int) -> torch.Tensor:
    """The weight int4 with groups of `group` inputs gives: 16 levels from the group's min
    to its max, stored as (q - 8) · s + z with z = min + 8 s."""
    out, width = w.shape
    g = w.reshape(out, width // group, group)
    low, high = g.amin(dim=2, keepdim=True), g.amax(dim=2, keepdim=True)
    s = (high - low) / 15
    z = low + 8 * s
    q = ((g - z) / s + 8).round().clamp(0, 15)
    return ((q - 8) * s + z).reshape(out, width)


def rule(scheme: str, w: torch.Tensor, group: int) -> torch.Tensor:
    return int8_rule(w) if scheme == "int8" else int4_rule(w, group)


@pytest.mark.parametrize("scheme,group", [("int8", 128), ("int4", 32), ("int4", 128)])
@pytest.mark.parametrize("out", [96, 401, 256])
@pytest.mark.parametrize("rows", [1, 5, 40, 120])
def test_a_layer_computes_with_the_rounded_weight(scheme: str, group: int, out: int, rows: int):
    """fp32 activations: the kernels (few rows) and the dense path (many: 120 for int4,
    40 and 120 for int8) both give
    x @ rule(W)ᵀ + b, for channel counts that need int4's padding too."""
    torch.manual_seed(out + rows)
    dense = Linear(256, out, bias=True)
    layer = QuantizedLinear.from_linear(dense, Quantization(scheme, group))
    x = torch.randn(2, rows, 256)
    expected = x @ rule(scheme, dense.weight.detach(), group).T + dense.bias.detach()
    got = layer(x)
    assert got.shape == (2, rows, out)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
    assert not torch.allclose(got, dense(x), atol=1e-3)  # it is quantized


@pytest.mark.parametrize("out", [96, 401])
@pytest.mark.parametrize("rows", [1, 7, 120])
def test_a_w8a8_layer_rounds_each_activation_row_to_int8(out: int, rows: int):
    """w8a8: each row of x rounded to int8 against its own max (s = max|row| / 127), times
    int8's rounded weight; int32 accumulation, so exact up to the final float scaling."""
    torch.manual_seed(out + rows)
    dense = Linear(256, out, bias=True)
    layer = QuantizedLinear.from_linear(dense, Quantization("w8a8"))
    x = torch.randn(rows, 256) * torch.linspace(0.1, 3.0, 256)
    s = x.abs().amax(dim=1, keepdim=True) / 127
    expected = ((x / s).round() * s) @ int8_rule(dense.weight.detach()).T + dense.bias.detach()
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    weight_only = QuantizedLinear.from_linear(dense, Quantization("int8"))
    assert not torch.allclose(layer(x), weight_only(x), atol=1e-4)  # the activations are rounded too


def test_w8a8_answers_do_not_depend_on_the_batch(hf64, images):
    """Rows are rounded each against its own max, so a padded batch answers as each prompt
    alone does."""
    model = shortv.load(hf64, device="cpu", dtype=torch.float32, quantize="w8a8")
    prompts, pictures = ["What is this?", "Describe both pictures."], [[images[0]], images[1:3]]
    together = [r.token_ids for r in model.generate(prompts, pictures, max_new_tokens=6)]
    alone = [model.generate([p], [im], max_new_tokens=6)[0].token_ids for p, im in zip(prompts, pictures,
                                                                                         strict=True)]
    assert together == alone


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_bfloat16_kernels_agree_with_the_dense_path(scheme: str):
    """In bfloat16 (scales rounded to bfloat16) the kernel path (a few rows: decode) and
    the dense path (many rows: prefill) compute the same product with the layer's weight,
    to bfloat16's precision."""
    torch.manual_seed(0)
    dense = Linear(512, 192, bias=False).to(torch.bfloat16)
    layer = QuantizedLinear.from_linear(dense, Quantization(scheme, 64))
    x = torch.randn(KERNEL_MAX_ROWS[scheme] + 8, 512, dtype=torch.bfloat16)
    expected = x.double() @ layer.dequantized().double().T
    few, many = layer(x[:3]).double(), layer(x).double()
    for got in (few, many[:3]):
        assert (got - expected[:3]).abs().max() <= 0.01 * expected.abs().max()
    assert not torch.equal(few, many[:3])  # two different paths


def test_int4_packing_is_torchs():
    q = torch.randint(0, 16, (192, 256), dtype=torch.int32, generator=torch.Generator().manual_seed(1))
    theirs = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    assert torch.equal(_pack_int4(q.to(torch.uint8)), theirs)


@pytest.fixture(scope="module")
def hf64(tmp_path_factory, sp_model):
    """A transformers-layout LLaVA-1.5 whose widths (64, 128) take int4 groups of 32 and 64;
    grouped-query attention, an output head of 401 rows (int4 pads it)."""
    return checkpoints.make_llava(tmp_path_factory.mktemp("hf64"), sp_model,
                                  text={"hidden_size": 64, "intermediate_size": 128})


@pytest.fixture(scope="module")
def original64(tmp_path_factory, hf64):
    """The same weights in original LLaVA-1.5's layout, its CLIP tower a directory beside."""
    return checkpoints.to_original(hf64, tmp_path_factory.mktemp("orig64"), relative_tower=True)


@pytest.fixture(scope="module")
def hf_reference(hf64):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(hf64, dtype=torch.float32).eval()


def rounded_reference(hf, scheme: str, group: int):
    """transformers' model with every language-model Linear weight replaced by the rule's
    rounding of it (the output head too); the rest as it is."""
    import copy

    ref = copy.deepcopy(hf)
    lm = ref.model.language_model
    with torch.no_grad():
        for module in [*lm.modules(), ref.lm_head]:
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(rule(scheme, module.weight, group))
    return ref


@pytest.mark.parametrize("scheme,group", [("int8", None), ("int4", 32), ("int4", 64)])
def test_a_quantized_model_equals_transformers_on_the_rounded_weights(hf64, hf_reference, images,
                                                                      scheme: str, group: int):
    """shortv.load(quantize=) in float32: the logits are transformers' on the rule's
    rounded weights (1e-4); the vision tower, projector and embeddings stay dense."""
    model = shortv.load(hf64, device="cpu", dtype=torch.float32, quantize=scheme, group_size=group)
    ref = rounded_reference(hf_reference, scheme, group)
    enc = model.encode("Describe this picture.", [images[1]])
    ids = hf_input_ids(enc.input_ids, ref.config.image_token_id, hf_tokens_per_image(ref.config))
    with torch.no_grad():
        expected = ref(input_ids=ids, pixel_values=enc.images[0][None]).logits[0]
    torch.testing.assert_close(model.logits(enc), expected, atol=1e-4, rtol=1e-4)
    quantized = [n for n, m in model.module.named_modules() if isinstance(m, QuantizedLinear)]
    layers = model.num_layers
    assert len(quantized) == 7 * layers + 1 and all(n.startswith("decoder.") for n in quantized)
    assert model.quantization == Quantization.of(scheme, group)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_methods_run_unchanged_on_a_quantized_model(hf64, images, scheme: str):
    """ShortV, FastV and cached generation on a quantized model equal the same on a dense
    model whose Linear weights are the quantized model's own (the hooks sit around the
    layers, not inside)."""
    quantized = shortv.load(hf64, device="cpu", dtype=torch.float32, quantize=scheme,
                            group_size=32 if scheme == "int4" else None)
    dense = shortv.load(hf64, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        for name, module in quantized.module.named_modules():
            if isinstance(module, QuantizedLinear):
                dense.module.get_submodule(name).weight.copy_(module.dequantized())
    enc = quantized.encode("What is this?", [images[0]])
    for method in (Vanilla(), ShortV((1, 2)), FastV(k=1, r=0.5)):
        quantized.set_method(method)
        dense.set_method(method)
        torch.testing.assert_close(quantized.logits(enc), dense.logits(enc), atol=1e-5, rtol=1e-5)
        assert quantized.chat("What is this?", [images[0]], max_new_tokens=6) == \
            dense.chat("What is this?", [images[0]], max_new_tokens=6)
        assert quantized.flops(enc) == dense.flops(enc)


def test_demo_defaults_to_bfloat16_and_answers(images):
    model = shortv.load("llava-tiny-demo", quantize="int4", group_size=32)
    assert model.dtype == torch.bfloat16 and model.quantization == Quantization("int4", 32)
    assert isinstance(model.chat("What is in this picture?", [images[0]], max_new_tokens=8), str)


def test_weight_bytes_closed_form_equals_what_a_loaded_model_holds(hf64):
    """`decoder_weight_bytes` (what `shortv flops` reports) against the tensors a loaded
    model holds: dense and both schemes."""
    for scheme in (None, "int8", "int4"):
        model = shortv.load(hf64, device="cpu", dtype=torch.bfloat16, quantize=scheme,
                            group_size=32 if scheme == "int4" else None)
        decoder = model.module.decoder
        tensors = [*decoder.named_parameters(), *decoder.named_buffers()]
        held = sum(t.numel() * t.element_size() for name, t in tensors if not name.endswith(".bias"))
        assert decoder_weight_bytes(model.config.text, model.quantization) == held


@pytest.mark.parametrize("kwargs,match", [
    (dict(quantize="int5"), "unknown quantization"),
    (dict(quantize="int4", group_size=48), "group size must be one of 32, 64, 128, 256"),
    (dict(quantize="int4", group_size=128), "does not divide the input width 64"),
    (dict(group_size=32), "needs quantize='int4'"),
    (dict(quantize="int8", group_size=64), "applies to int4 only"),
    (dict(quantize="int4", group_size=32.0), "group size must be one of"),
    (dict(quantize="int8", device="meta"), "CPU only"),
])
def test_bad_quantization_is_one_clear_error(hf64, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        shortv.load(hf64, **kwargs)


def test_cli_quantize_options(capsys):
    argv = ["flops", "llava-v1.5-7b", "--method", "fastv", "--quantize", "int8", "--json"]
    code, out, err = run_main(argv, capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["quantize"] == "int8 (per channel)"
    assert report["decoder_weight_gb"] > 1.9 * report["quantized_decoder_weight_gb"]
    for bad in (["--quantize", "int3"], ["--group-size", "64"], ["--quantize", "int4", "--group-size", "3"]):
        code, _, err = run_main(["flops", "llava-v1.5-7b", "--method", "fastv", *bad], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err


def test_eval_records_the_quantization_and_refuses_to_mix():
    dense = provenance.build(model="m", dtype=torch.bfloat16)
    int8 = provenance.build(model="m", dtype=torch.bfloat16, quantization=Quantization("int8"))
    assert int8["quantization"] == {"quantization": "int8"} and "quantization" not in dense
    assert provenance.difference(dense, dense) is None and provenance.difference(int8, int8) is None
    assert "quantization" in provenance.difference(dense, int8)
    assert "quantization" in provenance.difference(int8, dense)


def test_state_dict_holds_the_quantized_tensors(tmp_path, hf64):
    from safetensors.torch import save_file

    model = shortv.load(hf64, device="cpu", dtype=torch.bfloat16, quantize="int8")
    layer = model.module.decoder.layers[0].attn.q_proj
    save_file({k: v.contiguous() for k, v in layer.state_dict().items()}, tmp_path / "q.safetensors")
    saved = load_file(tmp_path / "q.safetensors")
    assert saved["qweight"].dtype == torch.int8 and torch.equal(saved["qweight"], layer.qweight)


@pytest.mark.parametrize("scheme,group", [("int8", None), ("int4", 32), ("w8a8", None)])
@pytest.mark.parametrize("source", ["hf64", "original64"])
def test_a_saved_quantized_checkpoint_loads_back_the_same_model(request, tmp_path, images, scheme, group,
                                                                source):
    """save_quantized, then shortv.load of the directory: the same scheme and logits
    (bit for bit), without quantizing again; the original layout's separate tower too."""
    from shortv.quantized_checkpoint import QUANTIZED_FILE

    directory = request.getfixturevalue(source)
    model = shortv.load(directory, device="cpu", quantize=scheme, group_size=group)
    out = model.save_quantized(tmp_path / "q")
    assert not list(out.glob("model*.safetensors"))
    with safe_open(str(out / QUANTIZED_FILE), framework="pt") as f:
        meta = f.metadata()
    assert meta["quantization"] == scheme and meta["dtype"] == "bfloat16"
    again = shortv.load(out, device="cpu")
    assert again.quantization == model.quantization and again.dtype == torch.bfloat16
    enc = model.encode("What is this?", [images[0]])
    assert torch.equal(again.logits(enc), model.logits(enc))
    assert again.chat("What is this?", [images[0]], max_new_tokens=5) == \
        model.chat("What is this?", [images[0]], max_new_tokens=5)
    other = "int4" if scheme != "int4" else "int8"
    with pytest.raises(ConfigError, match="quantized checkpoint"):
        shortv.load(out, quantize=other)
    with pytest.raises(ConfigError, match="already holds a checkpoint"):
        model.save_quantized(out)


def test_a_quantized_checkpoint_that_does_not_fit_its_config_is_refused(tmp_path, hf64):
    from safetensors.torch import save_file

    from shortv.quantized_checkpoint import QUANTIZED_FILE

    out = shortv.load(hf64, device="cpu", quantize="int8").save_quantized(tmp_path / "q")
    path = out / QUANTIZED_FILE
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    state = load_file(path)
    key = next(k for k in state if k.endswith("q_proj.qweight"))
    state[key] = state[key][:, :-2].contiguous()
    save_file(state, str(path), metadata=meta)
    with pytest.raises(shortv.CheckpointError, match=r"q_proj\.qweight"):
        shortv.load(out)
    save_file(state, str(path), metadata={**meta, "format": "something-else"})
    with pytest.raises(shortv.CheckpointError, match="not a shortv quantized checkpoint"):
        shortv.load(out)
    with pytest.raises(ConfigError, match="save_quantized saves a quantized model"):
        shortv.load(hf64, device="cpu").save_quantized(tmp_path / "dense")


def test_bench_and_chat_commands_take_quantize(capsys):
    code, out, err = run_main(["bench", "llava-tiny-demo", "--random-weights", "--n-frozen", "2",
                               "--quantize", "int4", "--group-size", "32", "--repeats", "1", "--warmup", "0",
                               "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["quantize"] == "int4 (groups of 32)" and report["dtype"] == "bfloat16"
    code, out, err = run_main(["chat", "--model", "llava-tiny-demo", "--image", str(EXAMPLE), "--prompt",
                               "What is in this picture?", "--no-stream", "--quantize", "int8"], capsys)
    assert code == 0 and out.strip(), err


@pytest.mark.parametrize("share_layers", [False, True])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_a_random_decoder_quantized_as_it_is_built(scheme: str, share_layers: bool):
    """`random_decoder(quantization=)` (which quantizes each layer as soon as it is filled)
    holds the rounded weights of the dense decoder the same seed draws: no Linear stays
    dense, and shared layers share their quantized layers."""
    from dataclasses import replace

    from shortv.bench import random_decoder
    from shortv.models.config import TextConfig

    config = TextConfig(vocab_size=320, hidden_size=128, intermediate_size=192, layers=3, heads=4,
                        kv_heads=2, head_dim=32, rms_norm_eps=1e-5, max_position_embeddings=256)
    for tie in (False, True):
        config = replace(config, tie_word_embeddings=tie)
        dense = random_decoder(config, torch.device("cpu"), torch.float32, seed=5, share_layers=share_layers)
        quant = random_decoder(config, torch.device("cpu"), torch.float32, seed=5, share_layers=share_layers,
                               quantization=Quantization(scheme, 64))
        linears = [name for name, m in dense.named_modules(remove_duplicate=False) if isinstance(m, Linear)]
        assert len(linears) == 7 * 3 + 1
        for name in linears:
            layer = quant.get_submodule(name)
            assert isinstance(layer, QuantizedLinear), name
            expected = rule(scheme, dense.get_submodule(name).weight, 64)
            torch.testing.assert_close(layer.dequantized(), expected, rtol=0, atol=1e-6)
        assert torch.equal(quant.embed_tokens.weight, dense.embed_tokens.weight)
        assert (quant.layers[2].mlp.up_proj is quant.layers[0].mlp.up_proj) == share_layers


def test_the_dense_path_is_safe_across_threads_and_modes():
    """The dequantize buffer is per thread (two threads' prefills at once give each its own
    product), usable after inference mode, and float16 does not overflow on int8's
    unscaled product."""
    import threading

    torch.manual_seed(0)
    dense = Linear(256, 192, bias=False)
    layers = {scheme: QuantizedLinear.from_linear(dense, Quantization(scheme, 64))
              for scheme in ("int8", "int4")}
    inputs = [torch.randn(150, 256) for _ in range(2)]
    expected = {s: [x @ layer.dequantized().T for x in inputs] for s, layer in layers.items()}
    wrong: list[str] = []

    def work(i: int) -> None:
        with torch.inference_mode():
            for _ in range(30):
                for scheme, layer in layers.items():
                    if not torch.allclose(layer(inputs[i]), expected[scheme][i], atol=1e-4):
                        wrong.append(scheme)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong
    with torch.no_grad():  # after inference mode made the buffer
        torch.testing.assert_close(layers["int8"](inputs[0]), expected["int8"][0], atol=1e-4, rtol=1e-4)
    half = QuantizedLinear.from_linear(Linear(256, 64, bias=False).half(), Quantization("int8"))
    x = torch.full((40, 256), 300.0, dtype=torch.float16)
    with torch.inference_mode():
        assert torch.isfinite(half(x)).all()


def test_eval_resumes_on_a_saved_quantized_checkpoint(tmp_path, capsys):
    """The record `shortv eval` checks before loading takes a quantized checkpoint's own
    scheme and dtype, so a second run resumes the first's answers."""
    import make_demo_eval

    questions = make_demo_eval.write(tmp_path / "set", 3, seed=5)
    saved = shortv.load("llava-tiny-demo", quantize="int8").save_quantized(tmp_path / "q")
    answers = tmp_path / "answers.jsonl"
    for limit in ("2", "3"):
        code, _, err = run_main(["eval", str(saved), "--questions", str(questions), "--answers-out",
                                 str(answers), "--limit", limit, "--quiet", "--max-new-tokens", "4"], capsys)
        assert code == 0, err
    assert len(answers.read_text().splitlines()) == 3
    record = json.loads(answers.read_text().splitlines()[0])["metadata"]["shortv"]
    assert record["quantization"] == {"quantization": "int8"} and record["dtype"] == "bfloat16"
