"""SparseVLM (Visual Token Sparsification for Efficient Vision-Language Model Inference,
ICML 2025), drop-only.

Rule, per sequence, as the released code (v1.0, the default `USE_VERSION=1_0`) runs it:

1. **Text raters** (paper §3.2): with H the decoder's input embeddings, the relevance of
   each text token t after the image is `mean over visual v of softmax_t(H_v · H_tᵀ)`
   (softmax over the text tokens, no scaling); the raters are the text tokens whose
   relevance is above the mean relevance.
2. At each pruning layer l (default 2, 6, 15) the layer runs on all its tokens; the score of
   a visual token is the attention probability the raters give it in layer l, averaged over
   heads and over raters. The visual tokens with the highest scores are kept, the others are
   dropped from layer l's *output* on, i.e. for layers l + 1, ... (hidden states and KV
   cache). Text tokens are never dropped. Kept tokens keep their RoPE positions.
3. How many: a fixed schedule per pruning layer, chosen by the budget (`score.py`,
   `sparse_token_dict`, for LLaVA-1.5's 576 visual tokens):
   192 → (300, 200, 110), 128 → (303, 110, 36), 96 → (238, 48, 26), 64 → (66, 30, 17);
   at most `current - 1` (the code's `min(count, v_token_num - 1)`). The budget is the
   number of visual tokens averaged over the 32 layers (2·576 + 4·300 + 10·200 + 16·110
   ≈ 192·32 in the code's comment).

Sources: Gumpest/SparseVLMs `llava/model/language_model/modelling_sparse_llama.py`
(`LlamaDynamicvitModel.forward`: rater selection on `inputs_embeds`, pruning after the
layers in `pruning_loc=[2, 6, 15]`, recycling), `llava/model/language_model/score.py`
(`attn_postprocess_topk`, `sparse_token_dict`, `layer_dict`), `.../utils.py`
(`cluster_and_merge`); read again in ModelTC/llmc
`llmc/compression/token_reduction/sparsevlm.py` (the same v1.0 logic).

Where the paper and the code differ we follow the code:

- The token count: the paper adapts it per layer from the rank of the text-visual attention
  matrix; the released code uses the fixed schedule above (no rank is computed anywhere). So
  the count depends only on how many visual tokens a sequence has, never on values.
- Recycling: the paper (and the code by default, v1.0's `s_flag`) recycles deleted tokens:
  the top 30 % of them by score are clustered (density-peak k-NN, with random tie-breaking
  noise) into int(n / 10) + 1 new tokens inserted after the kept visual ones. New tokens do
  not fit shortv's keep-mask interface, so this implementation only drops (SparseVLM v2.0,
  `USE_VERSION=2_0`, also disables the merge: "Cancel Merge").
- Positions: v1.0 renumbers the survivors' RoPE positions contiguously after a drop; shortv
  keeps them (as v2.0 does: "Keep Position ID").
- Batches: the code handles one sequence (`mask[0][indices]`); here each sequence of a batch
  chooses its own raters and tokens. Several images: all visual tokens of a sequence are
  ranked together, and the rater candidates are the text tokens after its first remaining
  visual token (the code's "text after the image"; shortv's view has no original positions).
- Ties: the earlier position first (the code's `topk` leaves them unspecified).
- v2.0's per-head selection (the 14 heads of most text-to-visual attention) and its
  RoPE-bias correction need per-head attention, which shortv's capture does not report; they
  are not implemented (v1.0 averages over all heads, as here).

The raters are rated on the decoder's input embeddings of the current tokens
(`LayerView.embeddings`), as the code does; a view without them (a hand-built one) falls
back to the drop layer's input hidden states.

Depth (differs for other depths): the code hard-codes `pruning_loc=[2, 6, 15]` (and
`layer_dict = {2: 0, 6: 1, 15: 2}`) for every model. The default here (`layers=None`) puts
them at the same fractions of any decoder, l · L / 32 rounded half up: (2, 6, 15) of 32,
(3, 8, 19) of 40, (1, 2, 4) of 8, (0, 1, 2) of 4; filled in when the method is attached
(`for_layers`); fewer than 4 layers cannot hold three distinct pruning layers with a layer
after the last (ConfigError). Pass `layers=(2, 6, 15)` for the code's ids on a deeper model.

Budget and schedule. `budget` is per 576 visual tokens (one LLaVA-1.5 image): a sequence with
n visual tokens keeps, after the j-th pruning layer, round(current · s_j / s_{j-1}) of its
`current` visual tokens (s_{-1} = 576), which is exactly the released schedule for n = 576
and scales it for other n (chained rounding, halves to even). LLaVA-NeXT's 640 / 320 / 160
for a 2880-token (5 × 576) image are budgets 128 / 64 / 32. Budgets without a released
schedule (e.g. 32) take the next larger released one scaled by budget / that budget and
rounded (our choice); `schedule` sets the counts per 576 tokens explicitly. A budget of
576 or more keeps every token, and a stage whose count is not below the previous one's
keeps every token too (the code's `v_token_num - 1` cap would still drop one): such a
stage neither ranks nor drops, so a full budget is the vanilla model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

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
    depth_scaled,
)
from .select import top_visual

REFERENCE_VISUAL = 576  # LLaVA-1.5's visual tokens, what the released schedules count
SCHEDULES: dict[int, tuple[int, ...]] = {
    192: (300, 200, 110),
    128: (303, 110, 36),
    96: (238, 48, 26),
    64: (66, 30, 17),
}
DEFAULT_BUDGET = 192  # the code's RETAIN_TOKN default
REFERENCE_LAYERS = (2, 6, 15)  # the code's pruning_loc, for 32 layers


@dataclass(frozen=True)
class SparseVLM(Method):
    """Text-rater-guided visual token dropping after each layer in `layers` (see the module
    docstring); `budget` per 576 visual tokens (None: 192; 576 or more keeps every token),
    or an explicit `schedule`. `layers` None: the code's (2, 6, 15) of 32 layers at the
    same fractions of the depth (`default_layers`), filled in by `for_layers`."""

    layers: tuple[int, ...] | None = None
    budget: int | None = None
    schedule: tuple[int, ...] | None = None
    name = "sparsevlm"
    hooks = frozenset({Hook.TOKENS})

    def __post_init__(self) -> None:
        if self.layers is not None:
            object.__setattr__(self, "layers", check_increasing_layers(self.layers, "SparseVLM layers",
                                                                       minimum=0))
        if self.budget is not None:
            check_int(self.budget, "SparseVLM budget",
                      allowed=f"a positive number of visual tokens per {REFERENCE_VISUAL}")
        if self.schedule is not None:
            if isinstance(self.schedule, (str, bytes)) or not isinstance(self.schedule, Iterable):
                raise ConfigError(f"SparseVLM schedule={self.schedule!r} must be a tuple of token counts")
            for count in self.schedule:
                check_int(count, "a SparseVLM schedule count", minimum=0,
                          allowed=f"non-negative token counts per {REFERENCE_VISUAL}")
            object.__setattr__(self, "schedule", tuple(self.schedule))
        pruning = len(REFERENCE_LAYERS) if self.layers is None else len(self.layers)
        if len(self.counts()) != pruning:
            given = "the default layers" if self.layers is None else f"layers={self.layers}"
            raise ConfigError(f"SparseVLM needs one count per pruning layer: {given} but counts "
                              f"{self.counts()}; give a schedule with one count each")

    def for_layers(self, num_layers: int) -> SparseVLM:
        fitted = self if self.layers is not None else replace(self, layers=default_layers(num_layers))
        fitted.validate(num_layers)
        return fitted

    @property
    def pruning_layers(self) -> tuple[int, ...]:
        """The pruning layers (ConfigError before `for_layers` filled in the default)."""
        if self.layers is None:
            raise ConfigError("SparseVLM() has no pruning layers until it is fitted to a model "
                              "(model.set_method(...) or .for_layers(num_layers))")
        return self.layers

    def counts(self) -> tuple[int, ...]:
        """Visual tokens kept after each pruning layer, per 576."""
        if self.schedule is not None:
            return self.schedule
        return budget_schedule(DEFAULT_BUDGET if self.budget is None else self.budget)

    def _prunes(self, layer: int) -> bool:
        """Whether pruning layer `layer` drops anything: its count is below the previous
        stage's (a stage that may keep as many keeps every token)."""
        layers = self.pruning_layers
        if layer not in layers:
            return False
        stage = layers.index(layer)
        counts = (REFERENCE_VISUAL, *self.counts())
        return counts[stage + 1] < counts[stage]

    def drops_at(self, layer: int) -> bool:
        return self._prunes(layer - 1)

    def capture(self, layer: int) -> Capture | None:
        return Capture(queries=Queries.TEXT) if self._prunes(layer) else None

    def keep(self, view: LayerView) -> Tensor:
        stage = self.pruning_layers.index(view.layer - 1)
        counts = (REFERENCE_VISUAL, *self.counts())
        scores = view.require_scores("SparseVLM")
        visual = view.visual()
        current = visual.sum(dim=1)
        scaled = torch.round(current.double() * counts[stage + 1] / counts[stage]).long()
        n_keep = torch.minimum(scaled, (current - 1).clamp(min=0))
        embeddings = view.embeddings
        hidden = view.hidden if embeddings is None else embeddings
        assert view.query_positions is not None and view.query_real is not None
        rated = torch.stack([
            rater_scores(hidden[b], view.types[b], scores[b], view.query_positions[b], view.query_real[b])
            for b in range(visual.shape[0])
        ])
        return ~visual | top_visual(rated, visual, n_keep)

    def validate(self, num_layers: int) -> None:
        layers = self.pruning_layers
        check_layer_ids(layers, num_layers)
        if max(layers) >= num_layers - 1:
            raise ConfigError(f"SparseVLM pruning layer {max(layers)} leaves no layer after it to drop "
                              f"tokens from (the model has layers 0..{num_layers - 1})")

    def describe(self) -> str:
        layers = "(2, 6, 15) of 32 scaled to the depth" if self.layers is None else tuple(self.layers)
        return f"sparsevlm(layers={layers}, counts={self.counts()} per {REFERENCE_VISUAL})"


def default_layers(num_layers: int) -> tuple[int, ...]:
    """SparseVLM's default pruning layers for a decoder of `num_layers`: the code's
    (2, 6, 15) of 32 at the same fractions of the depth, l · L / 32 rounded half up
    ((2, 6, 15) at 32, (3, 8, 19) at 40, (1, 2, 4) at 8, (0, 1, 2) at 4). Below 4 layers the
    three cannot be distinct layers with one after the last: ConfigError."""
    if num_layers < 4:
        raise ConfigError(f"SparseVLM's default pruning layers (2, 6, 15 of 32, scaled to the depth) need a "
                          f"decoder of at least 4 layers; this one has {num_layers}: give layers=... "
                          "and a schedule with one count each")
    return depth_scaled(REFERENCE_LAYERS, num_layers)


def budget_schedule(budget: int) -> tuple[int, ...]:
    """The released schedule for `budget` (per 576 visual tokens), else the next larger
    released one scaled to it (the largest for budgets above 192); 576 or more: every
    token at every stage."""
    if budget >= REFERENCE_VISUAL:
        return (REFERENCE_VISUAL,) * len(REFERENCE_LAYERS)
    if budget in SCHEDULES:
        return SCHEDULES[budget]
    larger = [b for b in SCHEDULES if b > budget]
    base = min(larger) if larger else max(SCHEDULES)
    return tuple(min(REFERENCE_VISUAL, round(n * budget / base)) for n in SCHEDULES[base])


def raters(hidden: Tensor, types: Tensor, positions: Tensor, real: Tensor) -> Tensor:
    """[Q] True at the query rows (text tokens at `positions` [Q], real [Q]) that rate the
    visual tokens of one sequence: among the text tokens after its first visual token, those
    whose relevance mean_v softmax_t(h_v · h_t) is above the mean. Without such candidates,
    every real text row; with no token above the mean (all equal), every candidate."""
    visual = types == int(TokenType.VISUAL)
    if not bool(visual.any()):
        return real
    first = int(visual.to(torch.int8).argmax())
    candidate = real & (positions > first)
    if not bool(candidate.any()):
        return real
    work = torch.promote_types(hidden.dtype, torch.float32)
    h = hidden.to(work)
    relevance = (h[visual] @ h[positions[candidate]].T).softmax(dim=1).mean(dim=0)
    above = relevance > relevance.mean()
    if not bool(above.any()):
        return candidate
    chosen = torch.zeros_like(candidate)
    chosen[candidate.nonzero().flatten()[above]] = True
    return chosen


def rater_scores(hidden: Tensor, types: Tensor, scores: Tensor, positions: Tensor, real: Tensor) -> Tensor:
    """[T] the raters' mean attention (already averaged over heads) on every token."""
    rows = raters(hidden, types, positions, real)
    return scores[rows].float().mean(dim=0)
