"""PDrop (PyramidDrop, CVPR 2025), training-free inference form.

The paper's rule: the decoder is split into stages at layers l_1 < l_2 < ...; at the start
of each stage the visual tokens are ranked by the attention they receive from the *last
instruction token* (at inference: the last prompt position, mean over heads) and the top
fraction λ of the remaining ones is kept, so stage s holds λ^s of the image. Published
inference setting (scripts/v1_5/pdrop_eval/*.sh and scripts/v1_6/...): layer_list
[8, 16, 24], image_token_ratio_list [0.5, 0.25, 0.125], i.e. λ = 0.5.

What the official code does (Cooperx521/PyramidDrop, llava/model/modeling_llama_pdrop.py,
`LlamaModel.pdrop_forward` / `pdrop_rank_drop`; mirrored by ModelTC/llmc
token_reduction/pyramiddrop.py) and how this module relates to it:

- Stage boundaries: `rank_layer = layer_idx + 1 in layer_list`, i.e. the drop happens
  before (0-based) layer l for l in layer_list; ours: `layers=(8, 16, 24)` drops before
  the same layers.
- **Depth** (differs for other depths): the code takes `--layer_list` as given and its
  scripts pass [8, 16, 24] for every model (also LLaVA-1.5-13B's 40 layers); the paper
  and README describe it as dividing the forward pass into 4 equal stages. The default
  here (`layers=None`) is that definition for any depth: L/4, L/2, 3L/4 rounded half up
  (8, 16, 24 of 32; 10, 20, 30 of 40; 1, 2, 3 of 4), filled in when the method is attached
  (`for_layers`), so the attached method's fields name them; decoders of fewer than 4
  layers cannot hold three distinct stages (ConfigError). Pass `layers=(8, 16, 24)` to
  run the scripts' setting on a 40-layer model.
- Query row: `prompt_len + image_tokens - 1`, the last prompt position (the code's
  "last instruction token" at inference) = `Queries.LAST` at prefill. Same.
- Scores: softmax(q·kᵀ/√d + causal mask) in fp32, mean over heads, restricted to the
  image's tokens; `topk(keep)` then re-sorted by position. Ours: the same probabilities
  (fp32), visual tokens only, a stable ranking (ties: earlier position), kept in order.
- Which layer's attention: the code ranks with the *stage layer itself*
  (`self.layers[rank_layer].self_attn`, its input_layernorm, q/k projections and RoPE on
  the hidden states entering that layer, before the drop); so does ours
  (`Capture(before_drop=True)` at the stage layers).
- **Positions** (`positions`): after each drop the code renumbers the survivors' RoPE
  positions (`position_ids[i, :cur_len] = arange(cur_len)`), so the next stage ranks and
  runs on renumbered tokens, and in decoding it shifts each later stage's position down by
  the number dropped. The default, "compact", does the same (`Method.compacts_positions`:
  the survivors are numbered contiguously ending at the last token's own position, which
  gives the same attention, since RoPE attention depends on position differences only).
  "original" keeps every token's RoPE position (docs/design.md §9), shortv's earlier rule.
  On M-RoPE models (Qwen) positions are 3-D and are never renumbered.
- **Counts**: the code keeps `int(n · ratio[s])` of the *original* n image tokens at stage
  s, ratio[s] = λ^(s+1) for the published [0.5, 0.25, 0.125]; so does ours, n counting
  the sequence's visual tokens before the first stage (at most the tokens it sees).
- Batches and several images: the code assumes right padding and one image per sequence
  (its `image_tokens[i]` is indexed by the batch row, `image_token_posi` is the first
  image only). Ours chooses per sequence over *all* visual tokens of that sequence (any
  number of images, left padding), c counting that sequence's visual tokens.
- Generation: the code drops only in the prefill (`hidden_states.shape[1] != 1`); so do
  we (decode steps carry no visual tokens). The kept set is chosen once, by the last
  prompt token.

Budgets (`budget`): the field compares PDrop at 192 / 128 / 64 visual tokens for
LLaVA-1.5 (640 / 320 / 160 for LLaVA-NeXT) by the *average number of visual tokens per
decoder layer* (PDrop issues #10, #22, #29: sum over layers / number of layers; the
authors' advice for lower budgets is to keep the λ, λ², λ³ structure and move the stage
layers earlier, e.g. layers (2, 8, 16) with λ = 0.19 for 64 tokens). With a budget B, λ is
solved (bisection) from

    (l_1 · 1 + (l_2 − l_1) · λ + (l_3 − l_2) · λ² + ... + (L − l_k) · λ^k) / L = B / budget_of,

budget_of being the image's visual-token count that the budget refers to (576: LLaVA-1.5
at 336 px; use 2880 for LLaVA-NeXT's five 576-token crops, as the papers do). λ is a
fixed number per configuration (filled in by `for_layers`), so sequences with other
visual counts keep the same fractions. A budget the stage layers cannot reach (with
layers (8, 16, 24) the average is at least a quarter of the image even at λ = 0) is a
ConfigError naming the minimum. A budget of every token (budget >= budget_of), like
λ = 1, keeps every token: no stage drops or ranks, the vanilla model.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import pairwise

import torch
from torch import Tensor

from ..errors import ConfigError
from ..token_types import TokenType
from .base import (
    Capture,
    Hook,
    LayerView,
    Method,
    Queries,
    check_increasing_layers,
    check_int,
    check_layer_ids,
    check_positions,
    depth_scaled,
    layer_ids,
)
from .select import top_visual

# The published stage layers of a 32-layer decoder: 4 equal stages.
REFERENCE_LAYERS = (8, 16, 24)


@dataclass(frozen=True)
class PDrop(Method):
    """Keep the fraction `lam` of the visual tokens at each stage layer of `layers`, ranked
    by the last query's attention in the stage layer itself, on its input (see the module
    docstring). `layers` None: the paper's four equal stages, l = L/4, L/2, 3L/4 rounded
    half up (8, 16, 24 of 32; 10, 20, 30 of 40), filled in by `for_layers`. With `budget`,
    λ is solved so that the average visual tokens per layer is `budget` for an image of
    `budget_of` visual tokens; a budget >= budget_of (or lam=1) keeps every token."""

    layers: tuple[int, ...] | None = None
    lam: float = 0.5
    budget: int | None = None
    budget_of: int = 576
    positions: str = "compact"
    name = "pdrop"
    hooks = frozenset({Hook.TOKENS})

    def __post_init__(self) -> None:
        if self.layers is not None:
            layers = check_increasing_layers(self.layers, "PDrop layers", minimum=1)
            object.__setattr__(self, "layers", layers)
        lam = self.lam
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0.0 < lam <= 1.0:
            raise ConfigError(f"PDrop lam={lam!r} is not allowed; use a fraction in (0, 1] (1 keeps every "
                              "token)")
        check_int(self.budget_of, "PDrop budget_of", allowed="a positive visual-token count")
        check_positions(self.positions, "PDrop")
        if self.budget is not None:
            check_int(self.budget, "PDrop budget", allowed="a positive average visual-token count")

    def for_layers(self, num_layers: int) -> PDrop:
        fitted = self if self.layers is not None else replace(self, layers=default_layers(num_layers))
        fitted.validate(num_layers)
        if fitted.budget is None:
            return fitted
        return replace(fitted, lam=pdrop_lambda(fitted.budget / fitted.budget_of, fitted.stages, num_layers))

    @property
    def stages(self) -> tuple[int, ...]:
        """The stage layers (ConfigError before `for_layers` filled in the default)."""
        if self.layers is None:
            raise ConfigError("PDrop() has no stage layers until it is fitted to a model "
                              "(model.set_method(...) or .for_layers(num_layers))")
        return self.layers

    def drops_at(self, layer: int) -> bool:
        return self.lam < 1.0 and layer in self.stages  # λ = 1 keeps every token: no stage

    def capture(self, layer: int) -> Capture | None:
        # As the code: stage layer l ranks with its own attention on its input, then drops.
        return Capture(queries=Queries.LAST, before_drop=True) if self.drops_at(layer) else None

    @property
    def compacts_positions(self) -> bool:
        return self.positions == "compact"

    def keep(self, view: LayerView) -> Tensor:
        scores = view.require_scores("PDrop")[:, 0]
        visual = view.visual()
        stage = self.stages.index(view.layer)
        first = (view.first_types() == int(TokenType.VISUAL)).sum(dim=1)
        n_keep = torch.minimum(pdrop_kept(first, self.lam ** (stage + 1)), visual.sum(dim=1))
        return ~visual | top_visual(scores, visual, n_keep)

    def validate(self, num_layers: int) -> None:
        ids = self.stages
        check_layer_ids(ids, num_layers)
        if self.budget is not None and self.budget < self.budget_of:
            low = stage_weights(ids, num_layers)[0] * self.budget_of
            if not low < self.budget:
                raise ConfigError(
                    f"PDrop budget={self.budget} is out of reach with stage layers {ids} of "
                    f"{num_layers}: the average visual tokens per layer is above {low:g} for "
                    f"budget_of={self.budget_of} visual tokens (move the first stage earlier for lower "
                    "budgets, e.g. layers (2, 8, 16); for LLaVA-NeXT set budget_of=2880, --param "
                    "budget_of=2880)")

    def describe(self) -> str:
        layers = "L/4, L/2, 3L/4" if self.layers is None else tuple(self.layers)
        extra = "" if self.budget is None else f", budget={self.budget} of {self.budget_of}"
        extra += "" if self.positions == "compact" else f", positions={self.positions}"
        return f"pdrop(layers={layers}, lam={self.lam:g}{extra})"


def default_layers(num_layers: int) -> tuple[int, ...]:
    """PDrop's default stage layers for a decoder of `num_layers`: (8, 16, 24) scaled to
    its depth (L/4, L/2, 3L/4 rounded half up). ConfigError below 4 layers, where the
    three stages cannot be distinct layers >= 1."""
    layers = depth_scaled(REFERENCE_LAYERS, num_layers)
    if num_layers < 4:
        raise ConfigError(f"PDrop's default stage layers (L/4, L/2, 3L/4) need a decoder of at least 4 "
                          f"layers; this one has {num_layers}: give layers=... (--param pdrop.layers=1)")
    return layers


def pdrop_kept(n_visual: Tensor, ratio: float) -> Tensor:
    """Visual tokens a PDrop stage keeps of an image of n_visual: int(n · ratio) (ratio =
    λ^(s+1) at stage s), in double precision like the code's Python `int(n * ratio)`."""
    return torch.floor(n_visual.double() * ratio).long()


def stage_weights(layers: list[int] | tuple[int, ...], num_layers: int) -> list[float]:
    """Fraction of the decoder's layers in each stage: [l_1, l_2 − l_1, ..., L − l_k] / L."""
    bounds = [0, *layers, num_layers]
    return [(b - a) / num_layers for a, b in pairwise(bounds)]


def pdrop_lambda(fraction: float, layers: tuple[int, ...], num_layers: int) -> float:
    """λ in [0, 1] whose pyramid Σ_s w_s λ^s (w: `stage_weights`) averages `fraction` of the
    visual tokens per layer (bisection; the average increases with λ)."""
    weights = stage_weights(list(layer_ids(layers)), num_layers)

    def average(lam: float) -> float:
        return sum(w * lam ** s for s, w in enumerate(weights))

    lo, hi = 0.0, 1.0
    if fraction <= average(lo):
        return lo
    if fraction >= average(hi):
        return hi
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if average(mid) < fraction else (lo, mid)
    return (lo + hi) / 2
