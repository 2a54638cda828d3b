"""Full LLaVA-1.5 / LLaVA-NeXT 7B and 13B shapes on one GPU, random bf16 weights: first-token
latency, prefill MFU and decode speed of vanilla, ShortV, FastV and VTW, next to transformers.

    python scripts/bench_gpu.py [--quick] [--json] [--repeats 3] [--warmup 1] [--new-tokens 32]
        [--peak-tflops X] [--budget-s 420] [--dtype bfloat16] [--device cuda]
    python scripts/bench_gpu.py --device cpu --tiny --quick      # tiny shapes, to test the script

Made to run in one go in under 8 minutes on one H100/H200 (80+ GB). For each size (7B:
LLaVA-1.5-7B / LLaVA-NeXT-7B, 13B: the same at 13B) one set of random weights is built
directly on the GPU in the target dtype, from the zoo cards' architectures, and shared by
four models: shortv's LLaVA-1.5 and LLaVA-NeXT and transformers' LlavaForConditionalGeneration
and LlavaNextForConditionalGeneration (built on the meta device, then given shortv's weight
tensors), so 13B costs 26 GB once. Inputs: 64 text tokens and one image, as pixel tensors
(LLaVA-1.5: 336 x 336, 576 visual tokens; LLaVA-NeXT: a 672 x 672 image, 5 crops through the
tower, 2928 visual tokens, the real anyres count for that size; the paper's 2880 counts 4
tiles only).

Rows per model and prompt, measured interleaved (each round runs every variant, the order
reversed every other round), medians:
- first-token latency: `prefill(max_new_tokens=1)`, i.e. tower + projector + decoder
  prefill + last-position logits; transformers: forward(use_cache=True, logits_to_keep=1);
- prefill MFU: the first token's FLOPs (tower + projector + decoder under the method, in
  shortv.flops' convention of the full attention rectangle, + LM head) / latency / the
  device's dense bf16 peak (table below, or --peak-tflops);
- decode tok/s: greedy, N new tokens, timed from the first new token on the host to the
  last (shortv: shortv.generate.token_steps; transformers: generate with a streamer);
  "compiled": the same after shortv's own `LLaVA.compile()` when it exists, else n/a.
Methods: ShortV with the card's paper N and ranking, FastV k=2 r=50%, VTW k = half the layers.
Before timing, vanilla shortv and transformers must agree on the first-token logits
(float32: max abs diff <= 1e-3; bf16: <= 10% of the largest logit, a check on weights and
inputs, not on rounding). A time budget (--budget-s) skips what would not fit, saying so.
Exit status 2 when CUDA is missing (or on usage errors), 1 when the models disagree.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_vs_transformers as bvt

import shortv
from shortv import zoo
from shortv.errors import ShortVError
from shortv.flops import sequence_flops
from shortv.llava import LLaVA
from shortv.loading import build_empty, resolve_device, resolve_dtype
from shortv.methods import VANILLA, VTW, FastV, Method, ShortV
from shortv.models.config import LlavaConfig, VisionConfig
from shortv.models.llava import LlavaModel

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), matched in order against the
# device name.
PEAK_TFLOPS: list[tuple[str, float]] = [
    ("GH200", 989.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0),
    ("H100", 989.0), ("H800", 989.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0),
    ("B200", 2250.0),
]
SIZES = {"7b": ("llava-v1.5-7b", "llava-v1.6-vicuna-7b"),
         "13b": ("llava-v1.5-13b", "llava-v1.6-vicuna-13b")}
N_TEXT = 64
BF16_REL_TOL = 0.1


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU by name, or None when it is not in the table."""
    for key, peak in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


# ---- models: one set of random weights, four models ------------------------------------------


def tiny(config: LlavaConfig) -> LlavaConfig:
    """A card's architecture at toy size (hidden 64, 4 layers; a 56-px tower with 16
    patches; NeXT pinpoints scaled to the 56-px tile), for testing the script."""
    text = replace(config.text, vocab_size=512, hidden_size=64, intermediate_size=172, layers=4,
                   heads=4, kv_heads=4, head_dim=16)
    vision = VisionConfig(image_size=56, patch_size=14, width=32, layers=3, heads=2, mlp_dim=64)
    scale = vision.image_size / config.vision.image_size
    points = tuple((round(w * scale), round(h * scale)) for w, h in config.image_grid_pinpoints)
    return config.replace(text=text, vision=vision, image_grid_pinpoints=points)


def fill_random(model: nn.Module, device: torch.device, dtype: torch.dtype, seed: int = 0) -> None:
    """Materialize every meta parameter on `device` in `dtype`, one at a time (never the
    whole model in float32), with bench_vs_transformers.randomize's distribution."""
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is None or not p.is_meta:
                    continue
                t = torch.empty(p.shape, device=device, dtype=dtype)
                if t.dim() == 1 and "norm" in type(module).__name__.lower() and name == "weight":
                    t.normal_(1.0, 0.1, generator=g)
                elif t.dim() == 1:
                    t.normal_(0.0, 0.1, generator=g)
                else:
                    t.normal_(0.0, 0.5 / t[0].numel() ** 0.5, generator=g)
                module._parameters[name] = nn.Parameter(t, requires_grad=False)


def share_parameters(source: nn.Module, target: nn.Module) -> None:
    """Give `target` the very parameter tensors of `source`, by name (target's names must
    all exist in source)."""
    params = dict(source.named_parameters())
    for name, _ in list(target.named_parameters()):
        owner, _, attr = name.rpartition(".")
        setattr(target.get_submodule(owner) if owner else target, attr, params[name])


def build_shortv_pair(size: str, device: torch.device, dtype: torch.dtype, *, tiny_shapes: bool
                      ) -> tuple[LLaVA, LLaVA]:
    """shortv's LLaVA-1.5 and LLaVA-NeXT of one size, sharing one set of random weights."""
    names = SIZES[size]
    modules = []
    for name in names:
        config = zoo.get_card(name).config
        modules.append(build_empty(tiny(config) if tiny_shapes else config, LlavaModel))
    v15, next_ = modules
    fill_random(next_, device, dtype)
    share_parameters(next_, v15)
    return LLaVA(v15.eval(), name=names[0]), LLaVA(next_.eval(), name=names[1])


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside put their parameters on the meta device (each created, then
    moved before the next), while buffers (RoPE frequencies, position ids) are real."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def image_token(config: LlavaConfig) -> int:
    """The id transformers' model uses for image positions: shortv's checkpoints (the
    original layout) have no such token, so the last id of the vocabulary stands in (it
    is embedded, then replaced by visual features; text ids never use it)."""
    return config.text.vocab_size - 1


def hf_config(config: LlavaConfig, arch: str) -> Any:
    """transformers' LlavaConfig / LlavaNextConfig for a shortv config."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig

    v, t = config.vision, config.text
    vc = CLIPVisionConfig(hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.layers,
                          num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch_size,
                          hidden_act=v.act, layer_norm_eps=v.norm_eps, projection_dim=v.width)
    tc = LlamaConfig(vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                     intermediate_size=t.intermediate_size, num_hidden_layers=t.layers,
                     num_attention_heads=t.heads, num_key_value_heads=t.kv_heads, head_dim=t.head_dim,
                     rms_norm_eps=t.rms_norm_eps, rope_theta=t.rope_theta,
                     max_position_embeddings=t.max_position_embeddings, bos_token_id=t.bos_token_id,
                     eos_token_id=t.eos_token_id, pad_token_id=0)
    common = dict(vision_config=vc, text_config=tc, image_token_index=image_token(config),
                  vision_feature_layer=config.vision_select_layers[0],
                  vision_feature_select_strategy="default", pad_token_id=0)
    if arch == "llava-next":
        return LlavaNextConfig(image_grid_pinpoints=[list(p) for p in config.image_grid_pinpoints],
                               **common)
    return LlavaConfig(**common)


def build_transformers(ours: LLaVA, arch: str, device: torch.device, dtype: torch.dtype) -> Any:
    """transformers' model of the same architecture holding `ours`' weight tensors; the
    few tensors shortv has no use for (tower layers past the selected one, the tower's
    final LayerNorm) get random values of their own."""
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    from shortv.checkpoint import TRANSFORMERS_LAYOUT, KeyMap

    cls = LlavaNextForConditionalGeneration if arch == "llava-next" else LlavaForConditionalGeneration
    cfg = hf_config(ours.config, arch)
    with parameters_on_meta():
        model = cls(cfg)
    key_map = KeyMap(TRANSFORMERS_LAYOUT)
    params = dict(ours.module.named_parameters())
    shared = 0
    for name, p in list(model.named_parameters()):
        ours_name = key_map(name)
        if isinstance(ours_name, str) and ours_name in params and params[ours_name].shape == p.shape:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, params[ours_name])
            shared += 1
    fill_random(model, device, dtype, seed=1)
    for module in model.modules():
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = b.to(device)
    if shared < len(params):
        raise RuntimeError(f"only {shared} of shortv's {len(params)} tensors found a place in "
                           f"transformers' {cls.__name__}")
    model.config.dtype = dtype
    return model.eval()


# ---- inputs -----------------------------------------------------------------------------------


@dataclass
class Prompt:
    """One prompt for both models, and what it is made of."""

    arch: str
    encoded: shortv.Encoded
    hf: dict[str, Tensor]
    n_visual: int
    crops: int


def make_prompt(model: LLaVA, arch: str, device: torch.device, seed: int = 0) -> Prompt:
    """64 text tokens around one image of random pixels (LLaVA's layout: 35 text tokens,
    the image, the rest); NeXT: a square image of 2 x 2 tiles."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    s, side = c.vision.image_size, c.vision.patches_per_side
    next_ = arch == "llava-next"
    crops = bvt.NEXT_CROPS if next_ else 1
    pixels = torch.randn((crops, 3, s, s) if next_ else (3, s, s), generator=g)
    size = (2 * s, 2 * s) if next_ else (s, s)
    n_visual = side * side + 2 * side * (2 * side + 1) if next_ else side * side
    token = image_token(c)
    text = torch.randint(3, token - 1, (N_TEXT,), generator=g).tolist()
    before = bvt.PREFIX_TEXT
    ids = [*text[:before], shortv.IMAGE_TOKEN, *text[before:]]
    encoded = shortv.Encoded(torch.tensor(ids), (pixels,), (size,))
    hf_ids = [*text[:before], *[token] * n_visual, *text[before:]]
    hf = {"input_ids": torch.tensor([hf_ids]), "attention_mask": torch.ones(1, len(hf_ids), dtype=torch.long),
          "pixel_values": pixels[None]}
    if next_:
        hf["image_sizes"] = torch.tensor([[size[1], size[0]]])
    return Prompt(arch, encoded, {k: v.to(device) for k, v in hf.items()}, n_visual, crops)


# ---- FLOPs ------------------------------------------------------------------------------------


def first_token_flops(model: LLaVA, method: Method, prompt: Prompt) -> float:
    """FLOPs of the first token: tower layers that run + projector + decoder prefill under
    `method` (shortv.flops: matmuls, full attention rectangle) + the LM head's last row."""
    c = model.config
    v, d = c.vision, c.text.hidden_size
    t = v.num_patches + 1
    tower = prompt.crops * (2 * t * 3 * v.patch_size ** 2 * v.width + c.vision_depth * (
        2 * t * (4 * v.width ** 2 + 2 * v.width * v.mlp_dim) + 4 * t * t * v.width))
    projector = 2 * prompt.crops * v.num_patches * (c.vision_feature_size * d + d * d)
    types = model.token_types(prompt.encoded)
    decoder = sequence_flops(c.text, method.for_layers(c.text.layers), types)
    return tower + projector + decoder + 2 * d * c.text.vocab_size


# ---- compiled decode --------------------------------------------------------------------------


def compile_support(model: LLaVA) -> str | None:
    """None when shortv's LLaVA has its own `compile` (torch.nn.Module's compiles forward,
    which generation does not call); otherwise why compiled decode is n/a."""
    if type(model).compile is not nn.Module.compile:
        return None
    if "compile" in inspect.signature(shortv.load).parameters:
        return "n/a (shortv.load(compile=True) only; no LLaVA.compile for random models)"
    return "n/a (shortv has no LLaVA.compile yet)"


# ---- the run ------------------------------------------------------------------------------------


@dataclass
class Row:
    model: str
    arch: str
    n_visual: int
    variant: str
    tflops: float
    first_token_ms: float | None = None
    first_token_runs_ms: list[float] = field(default_factory=list)
    mfu: float | None = None
    decode_tok_s: float | None = None
    decode_runs_s: list[float] = field(default_factory=list)
    compiled_tok_s: float | None = None
    compiled_runs_s: list[float] = field(default_factory=list)
    compiled_note: str = ""
    note: str = ""


class Budget:
    """Wall-clock budget for the whole run."""

    def __init__(self, seconds: float) -> None:
        self.start = time.perf_counter()
        self.seconds = seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)


def methods_for(model: LLaVA) -> list[tuple[str, Method]]:
    """Vanilla, ShortV (the card's paper N and ranking, restricted to the model's layers),
    FastV k=2 r=50%, VTW k = half the layers."""
    card = zoo.get_card(model.name)
    layers = model.num_layers
    ranking = tuple(i for i in card.ranking if i < layers)[: card.n_frozen]
    vtw = VTW().for_layers(layers)
    return [("vanilla", VANILLA), (f"ShortV N={len(ranking)}", ShortV(ranking)),
            ("FastV k=2 r=50%", FastV(k=2, r=0.5)), (f"VTW k={vtw.k}", vtw)]


def agreement(ours: LLaVA, theirs: Any, prompt: Prompt, dtype: torch.dtype) -> float:
    """Vanilla shortv vs transformers on the first-token logits (see the module docstring)."""
    ours.set_method(VANILLA)
    a = bvt.shortv_prefill(ours, [prompt.encoded])
    b = bvt.transformers_prefill(theirs, prompt.hf)
    what = f"{ours.name} ({prompt.n_visual} visual tokens)"
    if dtype == torch.float32:
        return bvt.check_agreement(a, b, bvt.AGREEMENT_TOL, what)
    tol = BF16_REL_TOL * b.float().abs().max().item()
    return bvt.check_agreement(a, b, tol, what + f", {dtype}")


def bench_prompt(ours: LLaVA, theirs: Any, prompt: Prompt, *, repeats: int, warmup: int,
                 new_tokens: int, peak: float | None, budget: Budget, log: Callable[[str], None]
                 ) -> list[Row]:
    """Eager rows (every method + transformers) for one model and prompt."""
    device = ours.device
    methods = methods_for(ours)
    shown = ours.name + (" (tiny)" if ours.config.text.hidden_size < 1024 else "")
    rows = [Row(shown, prompt.arch, prompt.n_visual, label,
                first_token_flops(ours, m, prompt) / 1e12) for label, m in methods]
    rows.append(Row(shown, prompt.arch, prompt.n_visual, "transformers (vanilla)",
                    rows[0].tflops))

    def prefill(method: Method | None) -> Callable[[], float]:
        if method is None:
            return lambda: bvt.timed(lambda: bvt.transformers_prefill(theirs, prompt.hf), device)

        def go() -> float:
            ours.set_method(method)
            return bvt.timed(lambda: bvt.shortv_prefill(ours, [prompt.encoded]), device)
        return go

    def decode(method: Method | None) -> Callable[[], float]:
        if method is None:
            return lambda: bvt.transformers_decode(theirs, prompt.hf, new_tokens)[0]

        def go() -> float:
            ours.set_method(method)
            return bvt.shortv_decode(ours, [prompt.encoded], new_tokens)[0]
        return go

    variants: list[Method | None] = [m for _, m in methods] + [None]
    runs = bvt.interleaved([prefill(m) for m in variants], repeats, warmup)
    for row, r in zip(rows, runs, strict=True):
        row.first_token_runs_ms = [s * 1e3 for s in r]
        row.first_token_ms = statistics.median(r) * 1e3
        if peak:
            row.mfu = row.tflops / (row.first_token_ms / 1e3) / peak
    log(f"  {ours.name} {prompt.n_visual} visual: first token "
        + ", ".join(f"{r.variant} {r.first_token_ms:.1f} ms" for r in rows))
    if new_tokens < 2:
        return rows
    per_round = sum(r.first_token_ms for r in rows) / 1e3 * 2 + 0.05 * new_tokens * len(rows)
    if budget.left() < per_round * (warmup + repeats):
        for row in rows:
            row.note = "decode skipped (time budget)"
        return rows
    runs = bvt.interleaved([decode(m) for m in variants], repeats, warmup)
    for row, r in zip(rows, runs, strict=True):
        row.decode_runs_s = r
        row.decode_tok_s = (new_tokens - 1) / statistics.median(r)
    log(f"  {ours.name} {prompt.n_visual} visual: decode "
        + ", ".join(f"{r.variant} {r.decode_tok_s:.1f} tok/s" for r in rows))
    ours.set_method(VANILLA)
    return rows


def bench_compiled(ours: LLaVA, prompt: Prompt, rows: list[Row], *, repeats: int, warmup: int,
                   new_tokens: int, budget: Budget, log: Callable[[str], None]) -> None:
    """Compiled decode tok/s for the shortv rows, when shortv can compile."""
    reason = compile_support(ours)
    shortv_rows = [r for r in rows if not r.variant.startswith("transformers")]
    for row in rows:
        row.compiled_note = "eager only" if row.variant.startswith("transformers") else (reason or "")
    if reason is not None or new_tokens < 2:
        return
    if budget.left() < 90:
        for row in shortv_rows:
            row.compiled_note = "skipped (time budget)"
        return
    try:
        start = time.perf_counter()
        ours.compile()
        methods = methods_for(ours)

        def decode(method: Method) -> Callable[[], float]:
            def go() -> float:
                ours.set_method(method)
                return bvt.shortv_decode(ours, [prompt.encoded], new_tokens)[0]
            return go

        runs = bvt.interleaved([decode(m) for _, m in methods], repeats, warmup + 1)
        for row, r in zip(shortv_rows, runs, strict=True):
            row.compiled_runs_s = r
            row.compiled_tok_s = (new_tokens - 1) / statistics.median(r)
        log(f"  {ours.name} compiled decode ({time.perf_counter() - start:.0f} s incl. compiling)")
    except Exception as e:  # another engineer's new API: report, do not lose the table
        for row in shortv_rows:
            row.compiled_note = f"error: {type(e).__name__}: {str(e)[:80]}"
    finally:
        ours.set_method(VANILLA)


def _fmt(value: float | None, fmt: str, missing: str = "-") -> str:
    return missing if value is None else format(value, fmt)


def table(rows: Sequence[Row]) -> str:
    head = ("| model | visual tokens | variant | first-token TFLOPs | first-token ms | prefill MFU "
            "| decode tok/s eager | decode tok/s compiled | first token vs transformers "
            "| decode vs transformers |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    ref: dict[tuple[str, int], Row] = {(r.model, r.n_visual): r for r in rows
                                       if r.variant.startswith("transformers")}
    for r in rows:
        t = ref.get((r.model, r.n_visual))
        ft = (r.first_token_ms / t.first_token_ms if t and r.first_token_ms and t.first_token_ms
              else None)
        dec = (t.decode_tok_s / r.decode_tok_s if t and r.decode_tok_s and t.decode_tok_s else None)
        compiled = _fmt(r.compiled_tok_s, ".1f", r.compiled_note or "-")
        lines.append("| " + " | ".join([
            r.model, str(r.n_visual), r.variant, f"{r.tflops:.3g}", _fmt(r.first_token_ms, ".1f"),
            _fmt(r.mfu, ".1%", "n/a"), _fmt(r.decode_tok_s, ".1f", r.note or "-"), compiled,
            _fmt(ft, ".2f"), _fmt(dec, ".2f")]) + " |")
    return "\n".join(lines)


def log(message: str) -> None:
    """Progress, on stderr (the table goes to stdout)."""
    print(message, file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", help="default bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--quick", action="store_true", help="7B shapes only")
    parser.add_argument("--tiny", action="store_true", help="toy shapes (for testing the script)")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="skip decode measurements that would not fit (default 420 s)")
    parser.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    budget = Budget(args.budget_s)
    command = "python scripts/bench_gpu.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    try:
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ShortVError("no CUDA GPU is available; this benchmark needs one "
                              "(use --device cpu --tiny to test the script on a CPU)")
        device = resolve_device(args.device)
        if device.type != "cuda" and not args.tiny:
            raise ShortVError("full 7B/13B shapes need a GPU; on a CPU run --tiny (or "
                              "scripts/bench_vs_transformers.py)")
        dtype = resolve_dtype(args.dtype, device)
    except ShortVError as e:
        print(f"bench_gpu: error: {e}", file=sys.stderr)
        return 2
    import transformers

    transformers.utils.logging.disable_progress_bar()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or (peak_tflops(name) if device.type == "cuda" else None)
    repeats = args.repeats or (1 if args.tiny else 3)
    new_tokens = args.new_tokens or (4 if args.tiny else 32)
    sizes = ["7b"] if args.quick else ["7b", "13b"]
    rows: list[Row] = []
    agreements: dict[str, float] = {}
    attention = ""
    try:
        for size in sizes:
            t0 = time.perf_counter()
            v15, next_ = build_shortv_pair(size, device, dtype, tiny_shapes=args.tiny)
            models = [(v15, "llava-1.5"), (next_, "llava-next")]
            pairs = [(ours, build_transformers(ours, arch, device, dtype), arch) for ours, arch in models]
            attention = str(getattr(pairs[0][1].config, "_attn_implementation", "?"))
            log(f"{size}: random weights built in {time.perf_counter() - t0:.1f} s")
            with torch.inference_mode():
                prompts = [make_prompt(ours, arch, device) for ours, _, arch in pairs]
                for (ours, theirs, _), prompt in zip(pairs, prompts, strict=True):
                    agreements[f"{ours.name} {prompt.n_visual}"] = agreement(ours, theirs, prompt, dtype)
            size_rows = []
            for (ours, theirs, _), prompt in zip(pairs, prompts, strict=True):
                size_rows.append(bench_prompt(ours, theirs, prompt, repeats=repeats, warmup=args.warmup,
                                              new_tokens=new_tokens, peak=peak, budget=budget, log=log))
            for (ours, _, _), prompt, prompt_rows in zip(pairs, prompts, size_rows, strict=True):
                bench_compiled(ours, prompt, prompt_rows, repeats=repeats, warmup=args.warmup,
                               new_tokens=new_tokens, budget=budget, log=log)
                rows += prompt_rows
            del pairs, models, v15, next_
            if device.type == "cuda":
                torch.cuda.empty_cache()
    except bvt.AgreementError as e:
        print(f"bench_gpu: FAILED: {e}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - budget.start
    meta = {"command": command, "device": name, "peak_bf16_tflops": peak, "dtype": str(dtype),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "repeats": repeats, "warmup": args.warmup, "new_tokens": new_tokens,
            "transformers_attention": attention, "agreement_max_abs_diff": agreements,
            "seconds": seconds}
    if args.json:
        print(json.dumps({**meta, "rows": [r.__dict__ for r in rows]}, indent=2))
        return 0
    print(f"`{command}`\n")
    print(f"{name}, {str(dtype).removeprefix('torch.')}, peak {_fmt(peak, '.0f', 'unknown')} TFLOP/s; "
          f"torch {torch.__version__}, transformers {transformers.__version__} "
          f"(attention: {attention}); random weights; "
          f"64 text tokens + one image; medians of {repeats} after {args.warmup} warm-up, "
          f"interleaved; decode: {new_tokens} greedy tokens, batch 1; ratios = shortv time / "
          f"transformers time; logits agreement (max abs diff): "
          + ", ".join(f"{k} {v:.1e}" for k, v in agreements.items()) + f"; {seconds:.0f} s in all\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
