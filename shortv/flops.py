"""Analytic prefill FLOPs of the LLaVA decoder (the language model) under each method.

Convention (the one that reproduces every number of the ShortV paper's table, docs/design.md §8):

- Counted: the matrix multiplications of the decoder layers, at 2 FLOPs per multiply-add
  (the convention of `torch.utils.flop_counter.FlopCounterMode`):
    * Q and O projections for each *query* token: 2 · d · (heads · head_dim) MACs,
    * K and V projections for each *key* token: 2 · d · (kv_heads · head_dim) MACs,
    * attention scores Q·Kᵀ and the weighted sum of values: 2 · heads · head_dim MACs
      per (query, key) pair, over the *full* query × key rectangle (no causal halving),
    * the gated MLP, gate, up and down projections: 3 · d · m MACs per query token.
  With Vicuna's shapes (kv_heads = heads, heads · head_dim = d) one layer with n tokens
  costs 2 · (4·n·d² + 2·n²·d + 3·n·d·m) FLOPs: FastV's formula 4nd² + 2n²d + 2ndm with the
  MLP term counting all three SwiGLU matrices, doubled.
- Not counted: the LM head (2 · d · vocab per position it is applied to), embeddings,
  RMSNorm, RoPE, softmax, SiLU and the residual additions, biases, the vision tower and the
  projector (counted apart, in the same convention, by `shortv.vision_flops`), and the
  rest of a method's own ranking arithmetic (norms, similarities, top-k).
- Counted on top (`capture_flops`): what a method captures to rank tokens. Query rows it
  asks for are projected again and scored against every key: 2·rows·q_dim·(d + n)
  (FastV's last query in layer K − 1: 2·q_dim·(d + n), 0.04 GFLOPs at 7B, invisible in
  the table); a capture before a drop (PDrop's stage layers) also projects the keys of
  all n tokens, 2·n·d·kv_dim.
- Causal masking is not accounted for: every query is charged for every key of its
  sequence, so the count depends only on *how many* tokens of each type a sequence has,
  not on where the visual block sits. (A causal kernel skips about half of the attention
  term; that term is 2.0–2.5 % of vanilla LLaVA-1.5 and 8.7–10.7 % of vanilla LLaVA-NeXT prefill.)
- Per layer, "queries" are the tokens whose hidden states the layer updates (attention
  query rows, Q/O projections, MLP) and "keys" are the tokens whose K and V the layer
  computes and attends to:
    * vanilla: queries = keys = all tokens;
    * ShortV, frozen layer: queries = non-visual tokens, keys = all tokens (visual tokens
      still compute K and V, nothing else), so the saving is the same for any N layers;
    * FastV(k, r): layers ≥ k see the text tokens plus round((1 − r) · n_visual) visual ones;
    * VTW(k): layers ≥ k see the text tokens only.
  The per-layer counts walk the method's plan (`methods.layer_plan`, from `drops_at`,
  `capture`, `frozen_type`), the very steps the decoder runs, in its order
  (`methods.walk_plan`), with `keep` deciding the drops and `image_tokens` a reduction
  before the language model; so any method built on the interface, and any composition,
  is counted as it runs.
- TFLOPs are 10¹² FLOPs. With n_text = 64 and n_visual = 576 (LLaVA-1.5) or 2880
  (LLaVA-NeXT) this gives every printed TFLOPs value of the table rounded to one decimal
  (largest deviation 0.047 TFLOPs: LLaVA-NeXT-7B VTW, 21.753 vs 21.8).
- Ratios: the paper's percentages are the ratio of the *printed* (one-decimal) TFLOPs,
  rounded to a whole percent (`printed_percent`): all 12 agree. The unrounded ratio agrees
  for 11 of 12; LLaVA-1.5-7B FastV is 4.867 / 8.504 = 57.2 % while the paper prints 58 %
  = 4.9 / 8.5. `flops_report` gives both.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ConfigError
from .methods import Capture, LayerStep, LayerView, Method, Queries, Vanilla, layer_plan, walk_plan
from .models.config import TextConfig
from .token_types import TokenType

TERA = 1e12

# The paper's decoders (Vicuna-7B / -13B v1.5) and prompt sizes (docs/design.md §8).
VICUNA_7B = TextConfig()
VICUNA_13B = TextConfig(
    hidden_size=5120, intermediate_size=13824, layers=40, heads=40, kv_heads=40, head_dim=128
)
PAPER_N_TEXT = 64
PAPER_N_VISUAL = {"llava-1.5": 576, "llava-next": 2880}


def default_n_visual(config: Any) -> int:
    """Visual tokens of one image as a model's family counts a typical one (the config's
    `default_visual_tokens`: 576 for LLaVA-1.5, 2880 for LLaVA-NeXT as the paper counts
    them; a 1024×768 photo for Qwen2-VL)."""
    return config.default_visual_tokens


@dataclass(frozen=True)
class LayerTokens:
    """Token counts one decoder layer works on."""

    queries: int  # tokens the layer updates: Q/O projections, attention rows, MLP
    keys: int  # tokens whose K/V the layer computes and attends to
    ranking: int = 0  # FLOPs of what a method captures in this layer to rank tokens


def layer_flops(config: TextConfig, queries: int, keys: int) -> int:
    """FLOPs (2 per multiply-add) of one decoder layer for `queries` queries over `keys` keys."""
    d = config.hidden_size
    q_dim = config.heads * config.head_dim
    kv_dim = config.kv_heads * config.head_dim
    projections = 2 * queries * d * q_dim + 2 * keys * d * kv_dim  # Q, O | K, V
    attention = 2 * queries * keys * q_dim  # Q·Kᵀ and softmax(Q·Kᵀ)·V, all heads
    mlp = 3 * queries * d * config.intermediate_size  # gate, up, down
    return 2 * (projections + attention + mlp)


def layer_tokens(config: TextConfig, method: Method, types: torch.Tensor) -> list[LayerTokens]:
    """Per-layer (queries, keys) for one sequence of token types (1-D; PAD is ignored),
    as they enter the language model (after any image reduction).

    Walks the method's plan (`methods.layer_plan`) with `walk_plan`, as the decoder does.
    Drops are simulated with `method.keep` on placeholder inputs (seeded random hidden
    states, keys and scores of what the method captures): which tokens survive does not
    change the FLOPs, only how many of each type.
    """
    method = method.for_layers(config.layers)
    types = _row(types)
    count = _Count(config, method, types[types != TokenType.PAD])
    walk_plan(layer_plan(method, config.layers), count)
    return count.layers


class _Count:
    """The FLOPs count's pass through a plan (the hooks of `methods.PlanPass`): the token
    types at hand, what was captured since the last drop, and each layer's counts."""

    def __init__(self, config: TextConfig, method: Method, types: torch.Tensor) -> None:
        self.config, self.method, self.types = config, method, types
        self.input_types = types[None]  # [1, T0]: what the method's view calls the pass's input
        self.origin = torch.arange(types.numel())[None]  # each token's column there (-1: merged)
        self.capture: Capture | None = None  # the latest capture since the last drop
        self.ranking = 0  # capture FLOPs charged to the layer about to run
        self.layers: list[LayerTokens] = []
        self.generator = torch.Generator().manual_seed(0)

    def visual_left(self) -> bool:
        return bool((self.types == TokenType.VISUAL).any())

    def capture_before(self, step: LayerStep) -> None:
        assert step.capture_before is not None
        self.capture = step.capture_before
        self.ranking += capture_flops(self.config, step.capture_before, self.types)

    def drop(self, step: LayerStep) -> None:
        view = _placeholder_view(step.layer, self.types, self.capture, self.generator)
        view.input_types, view.origin = self.input_types, self.origin
        keep = self.method.keep(view)[0]
        merged = self.method.merge(view, keep[None])
        types, origin = self.types[keep], self.origin[0][keep]
        if merged is not None:
            # Merged tokens are visual tokens placed after the last kept visual one: counted
            # as they run (where they sit does not change a layer's FLOPs).
            n = int(merged[1].sum())
            types = torch.cat((types, torch.full((n,), int(TokenType.VISUAL), dtype=types.dtype)))
            origin = torch.cat((origin, torch.full((n,), -1, dtype=origin.dtype)))
        self.types, self.origin = types, origin[None]
        self.capture = None

    def nothing_to_drop(self, step: LayerStep) -> None:
        pass  # the same tokens go on (the decoder only starts a new cache segment)

    def run_layer(self, step: LayerStep, capture: Capture | None) -> None:
        keys = self.types.numel()
        frozen = int((self.types == step.frozen).sum()) if step.frozen is not None else 0
        if capture is not None:
            self.capture = capture
            self.ranking += capture_flops(self.config, capture, self.types)
        self.layers.append(LayerTokens(queries=keys - frozen, keys=keys, ranking=self.ranking))
        self.ranking = 0


def capture_flops(config: TextConfig, capture: Capture, types: torch.Tensor) -> int:
    """FLOPs of a capture over a layer's tokens `types`: the asked query rows' Q projection
    and their scores over every key; before a drop, also the K projection of every token
    (the layer computes its keys again for the tokens that survive)."""
    n = types.numel()
    rows = 0
    if capture.queries == Queries.LAST:
        rows = 1
    elif capture.queries == Queries.TEXT:
        rows = int((types == TokenType.TEXT).sum())
    q_dim, kv_dim = config.heads * config.head_dim, config.kv_heads * config.head_dim
    flops = 2 * rows * config.hidden_size * q_dim + 2 * rows * n * q_dim
    if capture.before_drop:
        flops += 2 * n * config.hidden_size * kv_dim
    return flops


def _placeholder_view(layer: int, types: torch.Tensor, capture: Capture | None,
                      g: torch.Generator) -> LayerView:
    t, width = types.numel(), 8
    view = LayerView(layer, types[None], torch.randn(1, t, width, generator=g), lambda x: x)
    if capture is not None and capture.keys:
        view.keys = torch.randn(1, t, 1, width, generator=g)
    if capture is not None and capture.queries is not None:
        at = torch.arange(t) if capture.queries == Queries.TEXT else torch.tensor([t - 1])
        if capture.queries == Queries.TEXT:
            at = at[types == TokenType.TEXT]
        scores = torch.rand(1, at.numel(), t, generator=g)
        view.scores = scores / scores.sum(-1, keepdim=True)
        view.query_positions, view.query_real = at[None], torch.ones(1, at.numel(), dtype=torch.bool)
    return view


def decoder_flops(config: TextConfig, method: Method, n_text: int, n_visual: int) -> float:
    """Prefill FLOPs of the decoder for one sequence of n_text text + n_visual visual tokens."""
    for name, value in (("n_text", n_text), ("n_visual", n_visual)):
        if isinstance(value, bool) or not hasattr(value, "__index__") or value < 0:
            raise ConfigError(f"{name}={value!r} must be a non-negative integer token count")
    n_text, n_visual = operator.index(n_text), operator.index(n_visual)
    n_visual = method.for_layers(config.layers).image_tokens(n_visual)
    return float(_flops(config, method, count_types(n_text, n_visual)))


def count_types(n_text: int, n_visual: int) -> torch.Tensor:
    """Token types [T] of n_text text then n_visual visual tokens (the FLOPs of a sequence
    depend only on these counts)."""
    return torch.cat([
        torch.full((n_text,), int(TokenType.TEXT), dtype=torch.int8),
        torch.full((n_visual,), int(TokenType.VISUAL), dtype=torch.int8),
    ])


def sequence_flops(config: TextConfig, method: Method, types: torch.Tensor) -> float:
    """Prefill FLOPs of the decoder for concrete token types.

    types: 1-D tensor of `TokenType` values (TEXT=0, VISUAL=1, PAD=2 ignored), or a 2-D
    batch [B, T] whose rows are separate sequences (their FLOPs add up). Equals
    `decoder_flops(config, method, #TEXT, #VISUAL)` per row wherever the visual tokens sit.
    """
    types = torch.as_tensor(types).detach().cpu()
    if types.dim() == 1:
        return float(_flops(config, method, types))
    if types.dim() == 2:
        return float(sum(_flops(config, method, row) for row in types))
    raise ConfigError(f"token types must be 1-D [T] or 2-D [B, T], got shape {tuple(types.shape)}")


def flops_report(config: TextConfig, method: Method, n_text: int, n_visual: int) -> dict[str, Any]:
    """The method's prefill TFLOPs next to vanilla's, for one sequence.

    Keys: tflops, vanilla_tflops, ratio (tflops / vanilla, unrounded), percent
    (round(100 · ratio)), printed_percent (the paper's convention, `printed_percent`),
    method, n_text, n_visual, layers.
    """
    method = method.for_layers(config.layers)
    tflops = decoder_flops(config, method, n_text, n_visual) / TERA
    vanilla = decoder_flops(config, Vanilla(), n_text, n_visual) / TERA
    ratio = tflops / vanilla if vanilla else 1.0
    return {
        "tflops": tflops,
        "vanilla_tflops": vanilla,
        "ratio": ratio,
        "percent": round(100 * ratio),
        "printed_percent": printed_percent(tflops, vanilla),
        "method": method.describe(),
        "n_text": n_text,
        "n_visual": n_visual,
        "layers": config.layers,
    }


def input_flops(config: TextConfig, method: Method, types: torch.Tensor,
                vanilla_types: torch.Tensor | None = None) -> dict[str, Any]:
    """Prefill FLOPs of one concrete input (its token types [T] after image expansion, as
    the language model receives them under `method`) next to vanilla's, on
    `vanilla_types` when the method reduced the images before the model (default: the
    same types).

    Keys: tflops, vanilla_tflops, ratio, method, n_text, n_visual (under the method).
    """
    types = _row(types)
    full = types if vanilla_types is None else _row(vanilla_types)
    method = method.for_layers(config.layers)
    flops = sequence_flops(config, method, types)
    vanilla = sequence_flops(config, Vanilla(), full)
    return {
        "tflops": flops / TERA, "vanilla_tflops": vanilla / TERA,
        "ratio": flops / vanilla if vanilla else 1.0, "method": method.describe(),
        "n_text": int((types == TokenType.TEXT).sum()),
        "n_visual": int((types == TokenType.VISUAL).sum()),
    }


def format_flops(tflops: float) -> str:
    """TFLOPs as text in a unit that shows the number: "8.5 TFLOPs", "42.0 GFLOPs"."""
    if abs(tflops) >= 0.1:
        return f"{tflops:.1f} TFLOPs"
    if abs(tflops) >= 1e-4:
        return f"{tflops * 1e3:.1f} GFLOPs"
    return f"{tflops * 1e6:.1f} MFLOPs"


def printed_percent(tflops: float, vanilla_tflops: float) -> int | None:
    """Whole-percent ratio of the TFLOPs rounded to one decimal, as the paper prints it.

    None when vanilla rounds to 0.0 TFLOPs (small models / prompts).
    """
    vanilla = round(vanilla_tflops, 1)
    if vanilla == 0:
        return None
    return round(100 * round(tflops, 1) / vanilla)


def _flops(config: TextConfig, method: Method, types: torch.Tensor) -> int:
    return sum(layer_flops(config, t.queries, t.keys) + t.ranking
               for t in layer_tokens(config, method, types))


def _row(types: torch.Tensor) -> torch.Tensor:
    types = torch.as_tensor(types).detach().cpu()
    if types.dim() != 1:
        raise ConfigError(f"expected 1-D token types [T], got shape {tuple(types.shape)}")
    return types

