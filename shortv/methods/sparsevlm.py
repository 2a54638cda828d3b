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

Budget and schedule. `budget` is per 576 visual tokens (one LLaVA-1.5 image): a sequence with
n visual tokens keeps, after the j-th pruning layer, round(current · s_j / s_{j-1}) of its
`current` visual tokens (s_{-1} = 576), which is exactly the released schedule for n = 576
and scales it for other n (chained rounding, halves to even). LLaVA-NeXT's 640 / 320 / 160
for a 2880-token (5 × 576) image are budgets 128 / 64 / 32. Budgets without a released
schedule (e.g. 32) take the next larger released one scaled by budget / that budget and
rounded (our choice); `schedule` sets the counts per 576 tokens explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError
from ..token_types import TokenType
from .base import Capture, LayerView, Method, Queries, check_layer_ids, layer_ids
from .fastv import top_visual

REFERENCE_VISUAL = 576  # LLaVA-1.5's visual tokens, what the released schedules count
SCHEDULES: dict[int, tuple[int, ...]] = {
    192: (300, 200, 110),
    128: (303, 110, 36),
    96: (238, 48, 26),
    64: (66, 30, 17),
}
DEFAULT_BUDGET = 192  # the code's RETAIN_TOKN default


@dataclass(frozen=True)
class SparseVLM(Method):
    """Text-rater-guided visual token dropping after each layer in `layers` (see the module
    docstring); `budget` per 576 visual tokens (None: 192), or an explicit `schedule`."""

    layers: tuple[int, ...] = (2, 6, 15)
    budget: int | None = None
    schedule: tuple[int, ...] | None = None
    name = "sparsevlm"
    hooks = frozenset({"tokens"})

    def counts(self) -> tuple[int, ...]:
        """Visual tokens kept after each pruning layer, per 576."""
        if self.schedule is not None:
            return tuple(self.schedule)
        return budget_schedule(DEFAULT_BUDGET if self.budget is None else self.budget)

    def drops_at(self, layer: int) -> bool:
        return layer - 1 in self.layers

    def capture(self, layer: int) -> Capture | None:
        return Capture(queries=Queries.TEXT) if layer in self.layers else None

    def keep(self, view: LayerView) -> Tensor:
        stage = self.layers.index(view.layer - 1)
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
        layers = layer_ids(self.layers)
        if not layers:
            raise ConfigError("SparseVLM needs at least one pruning layer")
        check_layer_ids(layers, num_layers)
        if max(layers) >= num_layers - 1:
            raise ConfigError(f"SparseVLM pruning layer {max(layers)} leaves no layer after it to drop "
                              f"tokens from (the model has layers 0..{num_layers - 1})")
        if layers != sorted(layers):
            raise ConfigError(f"SparseVLM layers={tuple(layers)} must be increasing")
        if self.schedule is not None:
            if (isinstance(self.schedule, (str, bytes)) or not all(
                    isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in self.schedule)):
                raise ConfigError(f"SparseVLM schedule={self.schedule!r} must be non-negative token counts")
            if len(self.schedule) != len(layers):
                raise ConfigError(f"SparseVLM schedule={tuple(self.schedule)} needs one count per pruning "
                                  f"layer {tuple(layers)}")
        else:
            b = self.budget
            if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
                raise ConfigError(f"SparseVLM budget={b!r} must be a positive number of visual tokens "
                                  "(per 576)")
            if len(self.counts()) != len(layers):
                raise ConfigError(f"SparseVLM's released schedules have {len(self.counts())} pruning "
                                  f"layers, got layers={tuple(layers)}; give a schedule with one count each")

    def describe(self) -> str:
        return f"sparsevlm(layers={tuple(self.layers)}, counts={self.counts()} per {REFERENCE_VISUAL})"


def budget_schedule(budget: int) -> tuple[int, ...]:
    """The released schedule for `budget` (per 576 visual tokens), else the next larger
    released one scaled to it (the largest for budgets above 192)."""
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
