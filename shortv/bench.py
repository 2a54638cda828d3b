"""Decoder prefill latency, vanilla vs a method, measured in one process.

The two variants run interleaved (A, B, A, B, ...) after warm-up, and the medians are
compared, so that drift in machine load affects both alike. `random_decoder` builds a zoo
model's decoder shapes with random weights (optionally only its first L layers), so the
benchmark runs anywhere without a checkpoint.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .errors import ConfigError
from .flops import sequence_flops
from .methods import VANILLA, Method
from .models.config import TextConfig
from .models.llama import Decoder, DecoderLayer
from .models.quant import Quantization, quantize_decoder
from .token_types import TYPE_DTYPE, TokenType

# Text tokens before the image in LLaVA's vicuna_v1 prompt (system prompt + "USER: ") with
# Llama's tokenizer; llava_v1's ("human" for "user") has as many.
PREFIX_TEXT = 35


def random_decoder(config: TextConfig, device: torch.device, dtype: torch.dtype,
                   seed: int = 0, share_layers: bool = False,
                   quantization: Quantization | None = None) -> Decoder:
    """A decoder with the given shapes and random weights, built directly on `device`.

    share_layers: every layer uses the first layer's weight tensors. The compute is that
    of the full model and the memory that of one layer, so full 7B/13B depths fit on a
    small machine (a layer's weights are far larger than any cache, so reuse does not
    flatter the timings).

    quantization: quantize the Linear layers (`quantize_decoder`), each layer as soon as it
    is filled (the one shared layer, with share_layers, at the end), so that only one layer
    is ever dense: a full-depth 7B / 13B decoder in int8 or int4 needs its quantized size,
    not its bfloat16 one. The weights are the ones
    `random_decoder` without `quantization` draws for the same seed.
    """
    from .loading import meta_device

    torch.manual_seed(seed)
    with meta_device():
        decoder = Decoder(config)
    first = decoder.layers[0]
    # In registration order, so that the values drawn do not depend on share_layers or
    # quantization: the embeddings, each layer, the final norm, the head.
    with torch.no_grad():
        for prefix, part in _parts(decoder):
            if share_layers and isinstance(part, DecoderLayer) and part is not first:
                continue  # takes the first layer's weights below
            if not any(p.is_meta for p in part.parameters()):
                continue  # a head tied to the embeddings: filled with them
            part.to_empty(device=device).to(dtype)
            for name, p in part.named_parameters(prefix):
                p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02)
            if quantization is not None and not share_layers and isinstance(part, DecoderLayer):
                quantize_decoder(part, quantization)
    if share_layers:
        for layer in decoder.layers[1:]:
            for name, p in first.named_parameters():
                owner, _, attr = name.rpartition(".")
                setattr(layer.get_submodule(owner), attr, p)
    if quantization is not None:
        # The output head; with share_layers also the layers, one quantized layer per shared
        # weight (`quantize_decoder`).
        quantize_decoder(decoder, quantization)
    return decoder.eval().requires_grad_(False)


def _parts(decoder: Decoder) -> list[tuple[str, nn.Module]]:
    """(name, module) of the decoder's children in registration order, each layer apart."""
    parts: list[tuple[str, nn.Module]] = []
    for name, child in decoder.named_children():
        if isinstance(child, nn.ModuleList):
            parts += [(f"{name}.{i}", layer) for i, layer in enumerate(child)]
        else:
            parts.append((name, child))
    return parts


def layout(n_text: int, n_visual: int, device: torch.device) -> Tensor:
    """Token types [1, T] shaped like a LLaVA prompt: prefix text, the image, the rest."""
    if n_text < 1 or n_visual < 0:
        raise ConfigError(f"need n_text >= 1 and n_visual >= 0, got {n_text} and {n_visual}")
    before = min(PREFIX_TEXT, n_text - 1)
    kinds = [TokenType.TEXT] * before + [TokenType.VISUAL] * n_visual
    kinds += [TokenType.TEXT] * (n_text - before)
    return torch.tensor([kinds], dtype=TYPE_DTYPE, device=device)


@dataclass
class BenchResult:
    vanilla_ms: float
    method_ms: float
    vanilla_runs: list[float]
    method_runs: list[float]
    flops_speedup: float
    vanilla_tflops: float
    method_tflops: float

    @property
    def speedup(self) -> float:
        return self.vanilla_ms / self.method_ms


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    def run(fn: Callable[[], object]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) * 1e3

    return run


@torch.inference_mode()
def time_methods(decoder: Decoder, methods: Sequence[Method], types: Tensor | Sequence[Tensor], *,
                 repeats: int = 5, warmup: int = 1, seed: int = 0) -> list[list[float]]:
    """Prefill milliseconds of `decoder` on random hidden states with token types
    `types` [1, T] (or one layout per method: a method that reduces images before the
    decoder sees fewer visual tokens), for each method: `repeats` rounds after `warmup`,
    the methods interleaved within a round and their order reversed every other round."""
    if repeats < 1:
        raise ConfigError(f"repeats must be >= 1, got {repeats}")
    methods = [method.for_layers(len(decoder.layers)) for method in methods]
    layouts = [types] * len(methods) if isinstance(types, Tensor) else list(types)
    weight = decoder.embed_tokens.weight
    g = torch.Generator(device=weight.device).manual_seed(seed)
    inputs = []
    for t in layouts:
        x = torch.randn(*t.shape, decoder.config.hidden_size, generator=g, device=weight.device)
        positions = torch.arange(t.shape[1], device=weight.device)[None]
        if decoder.config.position_streams > 1:  # M-RoPE: text-like positions on every stream
            positions = positions[..., None].expand(-1, -1, decoder.config.position_streams)
        inputs.append((x.to(weight.dtype), t, positions))
    runs: list[list[float]] = [[] for _ in methods]
    timed = _timer(weight.device)
    order = list(range(len(methods)))
    for i in range(warmup + repeats):
        for j in order if i % 2 == 0 else order[::-1]:
            ms = timed(lambda m=methods[j], a=inputs[j]: decoder(*a, method=m))
            if i >= warmup:
                runs[j].append(ms)
    return runs


def bench_prefill(decoder: Decoder, method: Method, types: Tensor, *, repeats: int = 5,
                  warmup: int = 1, seed: int = 0) -> BenchResult:
    """Median prefill milliseconds, vanilla vs `method`, interleaved, with FLOPs. A method
    that reduces images before the language model (VisionZip) runs on its reduced count
    of visual tokens."""
    method = method.for_layers(len(decoder.layers))
    reduced = types
    if method.reduces_images:
        visual = int((types[0] == int(TokenType.VISUAL)).sum())
        reduced = layout(int((types[0] == int(TokenType.TEXT)).sum()), method.image_tokens(visual),
                         types.device)
    vanilla_runs, method_runs = time_methods(decoder, [VANILLA, method], [types, reduced],
                                             repeats=repeats, warmup=warmup, seed=seed)
    vanilla_flops = sequence_flops(decoder.config, VANILLA, types[0])
    method_flops = sequence_flops(decoder.config, method, reduced[0])
    return BenchResult(
        vanilla_ms=statistics.median(vanilla_runs),
        method_ms=statistics.median(method_runs),
        vanilla_runs=vanilla_runs,
        method_runs=method_runs,
        flops_speedup=vanilla_flops / method_flops,
        vanilla_tflops=vanilla_flops / 1e12,
        method_tflops=method_flops / 1e12,
    )
