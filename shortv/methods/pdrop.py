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
- Query row: `prompt_len + image_tokens - 1`, the last prompt position (the code's
  "last instruction token" at inference) = `Queries.LAST` at prefill. Same.
- Scores: softmax(q·kᵀ/√d + causal mask) in fp32, mean over heads, restricted to the
  image's tokens; `topk(keep)` then re-sorted by position. Ours: the same probabilities
  (fp32), visual tokens only, a stable ranking (ties: earlier position), kept in order.
- Which layer's attention: the code ranks with the *stage layer itself*
  (`self.layers[rank_layer].self_attn`, its input_layernorm, q/k projections and RoPE on
  the hidden states entering that layer, before the drop); so does ours
  (`Capture(before_drop=True)` at the stage layers).
- **Positions** (differs): after each drop the code renumbers the survivors' RoPE positions
  compactly (`position_ids[i, :cur_len] = arange(cur_len)`) and shifts the decode positions
  of later layers by the number dropped; shortv keeps every token's RoPE position
  (docs/design.md §9), so ours does not renumber.
- **Counts**: the code keeps `int(n · ratio[s])` of the *original* n image tokens at stage
  s. The interface shows a stage only its current tokens, so stage s keeps
  `int(c · λ)` of the c visual tokens it sees; for λ = 1/m (the default 0.5) this is
  exactly the code's count (floor(floor(x)/m) = floor(x/m)); otherwise it may keep up to
  two tokens fewer in the later stages.
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
ConfigError naming the minimum.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import pairwise

import torch
from torch import Tensor

from ..errors import ConfigError
from .base import Capture, LayerView, Method, Queries, check_layer_ids, layer_ids
from .fastv import top_visual


@dataclass(frozen=True)
class PDrop(Method):
    """Keep the fraction `lam` of the visual tokens at each stage layer of `layers`, ranked
    by the last query's attention in the stage layer itself, on its input (see the module
    docstring). With `budget`, λ is solved so that the average visual tokens per layer is
    `budget` for an image of `budget_of` visual tokens."""

    layers: tuple[int, ...] = (8, 16, 24)
    lam: float = 0.5
    budget: int | None = None
    budget_of: int = 576
    name = "pdrop"
    hooks = frozenset({"tokens"})

    def for_layers(self, num_layers: int) -> PDrop:
        self.validate(num_layers)
        if self.budget is None:
            return self
        return replace(self, lam=pdrop_lambda(self.budget / self.budget_of, self.layers, num_layers))

    def drops_at(self, layer: int) -> bool:
        return layer in self.layers

    def capture(self, layer: int) -> Capture | None:
        # As the code: stage layer l ranks with its own attention on its input, then drops.
        return Capture(queries=Queries.LAST, before_drop=True) if layer in self.layers else None

    def keep(self, view: LayerView) -> Tensor:
        scores = view.require_scores("PDrop")[:, 0]
        visual = view.visual()
        return ~visual | top_visual(scores, visual, pdrop_kept(visual.sum(dim=1), self.lam))

    def validate(self, num_layers: int) -> None:
        if isinstance(self.layers, (str, bytes)) or not hasattr(self.layers, "__iter__"):
            raise ConfigError(f"PDrop layers={self.layers!r} must be a tuple of layer ids")
        ids = layer_ids(self.layers)
        if not ids:
            raise ConfigError("PDrop needs at least one stage layer")
        check_layer_ids(ids, num_layers)
        if ids != sorted(ids):
            raise ConfigError(f"PDrop layers={tuple(ids)} must be increasing")
        if ids[0] < 1:
            raise ConfigError(f"PDrop stage layer {ids[0]} must be >= 1")
        if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)) or not 0.0 <= self.lam <= 1.0:
            raise ConfigError(f"PDrop lam={self.lam!r} must be a fraction in [0, 1]")
        if isinstance(self.budget_of, bool) or not isinstance(self.budget_of, int) or self.budget_of < 1:
            raise ConfigError(f"PDrop budget_of={self.budget_of!r} must be a positive token count")
        if self.budget is not None:
            if isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget < 0:
                raise ConfigError(f"PDrop budget={self.budget!r} must be a non-negative token count")
            low = stage_weights(ids, num_layers)[0] * self.budget_of
            if not low <= self.budget <= self.budget_of:
                raise ConfigError(
                    f"PDrop budget={self.budget} is out of reach with stage layers {tuple(ids)} of "
                    f"{num_layers}: the average visual tokens per layer lies in [{low:g}, "
                    f"{self.budget_of}] for budget_of={self.budget_of} visual tokens (move the first "
                    "stage earlier for lower budgets, e.g. layers (2, 8, 16); for LLaVA-NeXT set "
                    "budget_of=2880, --param budget_of=2880)")

    def describe(self) -> str:
        extra = "" if self.budget is None else f", budget={self.budget} of {self.budget_of}"
        return f"pdrop(layers={tuple(self.layers)}, lam={self.lam:g}{extra})"


def pdrop_kept(n_visual: Tensor, lam: float) -> Tensor:
    """Visual tokens a PDrop stage keeps of the n_visual it sees: int(n · λ), in double
    precision like the code's Python `int(n * ratio)`."""
    return torch.floor(n_visual.double() * lam).long()


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
