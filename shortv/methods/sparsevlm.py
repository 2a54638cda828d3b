"""SparseVLM (Visual Token Sparsification for Efficient Vision-Language Model Inference,
ICML 2025), as its released code runs it (v1.0, the default `USE_VERSION=1_0`).

Sources: Gumpest/SparseVLMs at 26a5f48 `llava/model/language_model/modelling_sparse_llama.py`
(`LlamaDynamicvitModel.forward`: rater selection on `inputs_embeds`, pruning after the
layers in `pruning_loc=[2, 6, 15]`, recycling, position ids), `.../score.py`
(`attn_postprocess_topk`, `sparse_token_dict`, `layer_dict`), `.../utils.py`
(`cluster_and_merge`). tests/test_method_sparsevlm.py carries a transcription of that code
and checks the kept tokens, the recycled vectors and the logits against it.

Rule, per sequence:

1. **Text raters**, chosen once, before layer 0 (paper §3.2): with H the decoder's input
   embeddings of the whole sequence, the relevance of each text token t after the image
   is `mean over every visual v of softmax_t(H_v · H_tᵀ)` (softmax over those text tokens,
   no scaling); the raters are the text tokens whose relevance is above the mean. The same
   raters rate at every pruning layer (text tokens are never dropped).
2. At each pruning layer l (default 2, 6, 15) the layer runs on all its tokens; the score
   of a visual token is the attention probability the raters give it in layer l, averaged
   over heads and raters. The visual tokens of highest score are kept; the others leave
   from layer l's *output* on (layers l + 1, ...: hidden states and KV cache).
3. **Recycling** (`recycle`, the code's `s_flag`): of the tokens dropped there, the
   int(0.3 · n) + 1 of highest score (`topk`) are clustered, density-peak k-NN with
   k = int(that / 10) + 1 clusters (`cluster_and_merge`: distances / √width, density
   exp(−mean of the squared k nearest distances) plus uniform noise · 1e−6, centres by
   distance-to-denser × density, each token to its nearest centre), and each cluster's
   mean (weights 1 / (count + 1e−6)) becomes a new visual token placed right after the
   kept visual tokens. Later stages rank and may drop it like any visual token. The code
   draws the noise from the global random generator; ours from a generator seeded with 0
   for each sequence at each stage, so a result does not depend on what ran before or on
   the batch (the test seeds the global generator alike to compare exactly).
   `recycle=False` only drops (v2.0's "Cancel Merge").
4. **Positions** (`positions`): after each drop the code numbers the survivors (recycled
   tokens included) 0..n-1, and a decode step's position in a layer is the length of that
   layer's cache, i.e. the same numbering continued. The default, "compact", does this
   (`Method.compacts_positions`: numbered contiguously ending at the last token's own
   position, the same attention since RoPE depends on differences only). "original" keeps
   every token's RoPE position (v2.0's "Keep Position ID"; needs `recycle=False`, since a
   recycled token has no original position). On M-RoPE models (Qwen) positions are 3-D
   and are never renumbered; a recycled token takes the position of the token it follows.
5. **How many**: a fixed schedule per pruning layer, chosen by the budget (`score.py`,
   `sparse_token_dict`, for LLaVA-1.5's 576 visual tokens): 192 → (300, 200, 110),
   128 → (303, 110, 36), 96 → (238, 48, 26), 64 → (66, 30, 17); at most `current − 1`
   (the code's `min(count, v_token_num − 1)`, recycled tokens counted). The budget is the
   number of visual tokens averaged over the 32 layers (2·576 + 4·300 + 10·200 + 16·110
   ≈ 192·32 in the code's comment).

Where the paper and the code differ we follow the code: the paper adapts the count per
layer from the rank of the text-visual attention matrix; the released code uses the fixed
schedule above (no rank is computed anywhere).

Where ours is defined beyond the code (which handles one sequence, `mask[0][indices]`):

- Batches: each sequence of a batch chooses its own raters, tokens and clusters. Several
  images: all visual tokens of a sequence are ranked together, and the rater candidates
  are the text tokens after its first visual token (the code's "text after the image").
- Ties: the earlier position first when ranking (the code's `topk` leaves them
  unspecified); recycling uses `topk` as the code does.
- v2.0's per-head selection (the 14 heads of most text-to-visual attention) and its
  RoPE-bias correction need per-head attention, which shortv's capture does not report;
  they are not implemented (v1.0 averages over all heads, as here).
- A view without the pass's input embeddings (a hand-built one) rates with the drop
  layer's input hidden states.

Depth (differs for other depths): the code hard-codes `pruning_loc=[2, 6, 15]` (and
`layer_dict = {2: 0, 6: 1, 15: 2}`) for every model. The default here (`layers=None`) puts
them at the same fractions of any decoder, l · L / 32 rounded half up: (2, 6, 15) of 32,
(3, 8, 19) of 40, (1, 2, 4) of 8, (0, 1, 2) of 4; filled in when the method is attached
(`for_layers`); fewer than 4 layers cannot hold three distinct pruning layers with a layer
after the last (ConfigError). Pass `layers=(2, 6, 15)` for the code's ids on a deeper model.

Budget and schedule. `budget` is per 576 visual tokens (one LLaVA-1.5 image): a sequence of
n visual tokens keeps round(n · s_j / 576) (halves to even) after the j-th pruning layer,
at most its current visual tokens − 1: exactly the released schedule for n = 576, scaled
for other n. LLaVA-NeXT's 640 / 320 / 160 for a 2880-token (5 × 576) image are budgets
128 / 64 / 32. Budgets without a released schedule (e.g. 32) take the next larger released
one scaled by budget / that budget and rounded (our choice); `schedule` sets the counts per
576 tokens explicitly. A budget of 576 or more keeps every token, and a stage whose count is
not below the previous one's keeps every token too (the code's `v_token_num − 1` cap would
still drop one): such a stage neither ranks nor drops, so a full budget is the vanilla model.
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
    check_positions,
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
    recycle: bool = True
    positions: str = "compact"
    name = "sparsevlm"
    hooks = frozenset({Hook.TOKENS})

    def __post_init__(self) -> None:
        if self.layers is not None:
            object.__setattr__(self, "layers", check_increasing_layers(self.layers, "SparseVLM layers",
                                                                       minimum=0))
        if not isinstance(self.recycle, bool):
            raise ConfigError(f"SparseVLM recycle={self.recycle!r} is not allowed; use true or false")
        check_positions(self.positions, "SparseVLM")
        if self.recycle and self.positions == "original":
            raise ConfigError("SparseVLM recycle=True needs positions='compact' (a recycled token has no "
                              "original position); use recycle=False with positions='original'")
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

    @property
    def compacts_positions(self) -> bool:
        return self.positions == "compact"

    def keep(self, view: LayerView) -> Tensor:
        stage = self.pruning_layers.index(view.layer - 1)
        visual = view.visual()
        first = (view.first_types() == int(TokenType.VISUAL)).sum(dim=1)
        target = torch.round(first.double() * self.counts()[stage] / REFERENCE_VISUAL).long()
        n_keep = torch.minimum(target, (visual.sum(dim=1) - 1).clamp(min=0))
        return ~visual | top_visual(self.rated(view), visual, n_keep)

    def rated(self, view: LayerView) -> Tensor:
        """[B, T] the raters' mean attention (over heads and raters) on every token."""
        if "rated" not in view.memo:
            view.memo["rated"] = self._rated(view)
        return view.memo["rated"]

    def _rated(self, view: LayerView) -> Tensor:
        scores = view.require_scores("SparseVLM")
        assert view.query_positions is not None and view.query_real is not None
        if view.inputs is None:  # a hand-built view: rate with the tokens at hand
            inputs, first_types = view.hidden, view.types
            origin = LayerView(view.layer, view.types, view.hidden, view.norm).origins()
        else:
            inputs, first_types, origin = view.inputs, view.first_types(), view.origins()
        rows = []
        for b in range(scores.shape[0]):
            chosen = raters(inputs[b], first_types[b])  # over the pass's input columns
            at = origin[b][view.query_positions[b]]
            rating = view.query_real[b] & (at >= 0) & chosen[at.clamp(min=0)]
            rows.append(scores[b][rating].float().mean(dim=0))
        return torch.stack(rows)

    def merge(self, view: LayerView, keep: Tensor) -> tuple[Tensor, Tensor] | None:
        if not self.recycle:
            return None
        dropped = view.visual() & ~keep
        rated = self.rated(view)
        merged = [recycled(view.hidden[b], rated[b], dropped[b]) for b in range(keep.shape[0])]
        m = max(t.shape[0] for t in merged)
        real = torch.zeros(keep.shape[0], m, dtype=torch.bool, device=keep.device)
        tokens = view.hidden.new_zeros(keep.shape[0], m, view.hidden.shape[-1])
        for b, t in enumerate(merged):
            tokens[b, : t.shape[0]], real[b, : t.shape[0]] = t, True
        return tokens, real

    def validate(self, num_layers: int) -> None:
        layers = self.pruning_layers
        check_layer_ids(layers, num_layers)
        if max(layers) >= num_layers - 1:
            raise ConfigError(f"SparseVLM pruning layer {max(layers)} leaves no layer after it to drop "
                              f"tokens from (the model has layers 0..{num_layers - 1})")

    def describe(self) -> str:
        layers = "(2, 6, 15) of 32 scaled to the depth" if self.layers is None else tuple(self.layers)
        extra = "" if self.recycle else ", recycle=False"
        extra += "" if self.positions == "compact" else f", positions={self.positions}"
        return f"sparsevlm(layers={layers}, counts={self.counts()} per {REFERENCE_VISUAL}{extra})"


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


def raters(hidden: Tensor, types: Tensor) -> Tensor:
    """[T] True at the text tokens of one sequence (hidden [T, D], types [T]) that rate its
    visual tokens: among the text tokens after its first visual token, those whose relevance
    mean_v softmax_t(h_v · h_t) over every visual token is above the mean. Without such
    candidates, every text token; with none above the mean (all equal), every candidate."""
    visual = types == int(TokenType.VISUAL)
    text = types == int(TokenType.TEXT)
    if not bool(visual.any()):
        return text
    first = int(visual.to(torch.int8).argmax())
    candidate = text & (torch.arange(types.shape[0], device=types.device) > first)
    if not bool(candidate.any()):
        return text
    work = torch.promote_types(hidden.dtype, torch.float32)
    h = hidden.to(work)
    relevance = (h[visual] @ h[candidate].T).softmax(dim=1).mean(dim=0)
    above = relevance > relevance.mean()
    if not bool(above.any()):
        return candidate
    chosen = torch.zeros_like(candidate)
    chosen[candidate.nonzero().flatten()[above]] = True
    return chosen


RECYCLE_SHARE = 0.3  # the code's "Top 30%" of the dropped tokens, by score
NOISE_SEED = 0  # seeds the density noise of each sequence's clustering (module docstring)


def recycled(hidden: Tensor, rated: Tensor, dropped: Tensor) -> Tensor:
    """The recycled tokens [M, D] of one sequence's drop: the int(0.3 · n) + 1 best-rated of
    its n dropped tokens (`dropped` [T]; hidden [T, D], rated [T]), clustered into
    int(that / 10) + 1 tokens; none if nothing was dropped."""
    index = dropped.nonzero().flatten()
    if index.numel() == 0:
        return hidden.new_zeros(0, hidden.shape[-1])
    best = index[rated[index].topk(int(index.numel() * RECYCLE_SHARE) + 1).indices]
    return cluster_and_merge(hidden[best], best.numel() // 10 + 1)


def cluster_and_merge(x: Tensor, clusters: int) -> Tensor:
    """Density-peak k-NN clustering of x [N, C] into `clusters` mean tokens [clusters, C],
    as SparseVLM's `cluster_and_merge` (module docstring)."""
    n, c = x.shape
    dist = torch.cdist(x[None], x[None], compute_mode="donot_use_mm_for_euclid_dist")[0] / c ** 0.5
    nearest = dist.topk(clusters, dim=-1, largest=False).values
    noise = torch.rand(n, generator=torch.Generator().manual_seed(NOISE_SEED), dtype=x.dtype)
    density = (-(nearest ** 2).mean(dim=-1)).exp() + noise.to(x.device) * 1e-6
    denser = density[None, :] > density[:, None]  # [i, j]: j is denser than i
    to_denser = torch.where(denser, dist, dist.max()).min(dim=-1).values
    centres = (to_denser * density).topk(clusters).indices
    assign = dist[centres].argmin(dim=0)
    assign[centres] = torch.arange(clusters, device=x.device)
    weight = 1.0 / (torch.bincount(assign, minlength=clusters).to(x.dtype) + 1e-6)
    return x.new_zeros(clusters, c).index_add_(0, assign, x * weight[assign, None])
