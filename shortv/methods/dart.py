"""DART (Stop Looking for Important Tokens in Multimodal Language Models: Duplication
Matters More, 2025): keep the visual tokens least duplicated with a few pivot tokens.

The paper's rule: at layer K choose pivot tokens (default: largest key norm), then keep
the visual tokens whose hidden states are least similar (cosine) to the pivots; drop the
rest for layers K.. (hidden states and KV cache). Kept tokens keep their RoPE positions.

What the official code does (ZichenWen1/DART, read from its copy xqy1111111/DART
llava/model/language_model/modeling_llama_self.py `get_retained_image_token` and
`DART_K_norm.forward`, llava/eval/model_vqa_loader.py; mirrored by ModelTC/llmc
llmc/compression/token_reduction/dart.py), which this module follows:

1. Before layer K (`pruned_layer` = 2): the keys of layer K − 1 (after RoPE; the code
   takes them after `repeat_kv`, all heads concatenated) give each token's L1 norm. Ours
   sums |k| over the KV heads of the captured keys; repeating each KV head `group` times
   multiplies every token's L1 norm by `group`, so the ranking is the same.
2. Pivots: the `pivot_image_token` (4) visual tokens of largest key norm, and the
   `pivot_text_token` (4) tokens of largest key norm among the tokens after the image.
3. The hidden states entering layer K (`layer_outputs[0]` of layer K − 1), passed through
   the model's *final* RMSNorm, are compared by cosine similarity.
4. For each pivot in turn, the TOKEN_TOPK visual tokens least similar to it among those
   not yet chosen (image pivots excluded from the start) are added, TOKEN_TOPK =
   `max_num_trunction // (pivot_image_token + pivot_text_token)` (LLaVA-1.5: 128 // 8 =
   16; LLaVA-NeXT: `min(retain_token_num_for_llava_next, n − pivot_image_token) // 8`,
   320 // 8 = 40). The text pivots are removed at the end: the retained visual tokens are
   the image pivots plus everything added, pivot_image_token + 8 · TOKEN_TOPK in all
   (132 for max_num_trunction 128, 324 for 320).

`budget` is the code's max_num_trunction (per sequence): this method keeps
`pivot_image + (pivot_image + pivot_text) · (budget // (pivot_image + pivot_text))`
visual tokens (at most all of them), i.e. 196 / 132 / 68 for the field's 192 / 128 / 64 and
644 / 324 / 164 for NeXT's 640 / 320 / 160, as DART's own code keeps when its paper reports
192 / 128 / 64 (we follow the code). Without a budget, `reduction_ratio` (the code's 0.778)
sets the count by `budget_rule`, which a model fills in when the method is attached
(`check_method`):

- "round" (LLaVA; also when unset): max_num_trunction = round(n · (1 − reduction_ratio))
  for a sequence of n visual tokens, 128 for 576, the LLaVA-1.5 eval scripts' setting. On
  LLaVA-NeXT the model fills in `budget=320`, those scripts' retain_token_num_for_llava_next
  (`for_llava_next`; 4 + 8 · 40 = 324 tokens kept), unless a ratio is given;
- "floor" (Qwen2-VL / Qwen2.5-VL): TOKEN_TOPK = int(n · (1 − reduction_ratio) / 8), the
  authors' Qwen2-VL code (`Qwen2-VL/Qwen2VL_DART/modeling_qwen2_vl_self.py`, which ignores
  max_num_trunction). The two differ where n · (1 − ratio) lies just below a multiple of
  8: for 576 tokens (127.87) "round" adds 16 per pivot (132 kept), "floor" 15 (124); for
  72, 2 against 1. Everything else in the Qwen2-VL code (pivots, their set order, the
  original M-RoPE positions of the kept tokens) is the LLaVA code's.

Full budget (differs): a budget >= a sequence's visual tokens (or reduction_ratio 0) keeps
every one of them, the vanilla model. The code's count, pivot_image + 8 · (budget // 8),
can fall up to 3 short of n even then (n mod 8 > 4), from the integer division alone,
and fewer text tokens than text pivots shorten it further. A budget below pivot_image
(the image pivots are always kept) is refused.

Where ours is defined beyond the code (which handles one image of a batch of one):

- Pivot order (`pivot_order`): the code loops over a Python `set` built from the list
  [image pivots by decreasing key norm, text pivots likewise] of the pivots' sequence
  indices (positions in a batch of one). An int hashes to itself, so that order is
  deterministic: CPython's slot order for those ints, usually but not always increasing
  index. The default, "set", loops in exactly that order (built the same way, from each
  pivot's index in its own sequence, padding not counted). "norm" loops over the list
  itself (image pivots, then text pivots, each by decreasing key norm), shortv's earlier
  order; a later round only picks among what earlier rounds left, so the order changes
  which tokens are kept.
- Ties (key norms, similarities): stable, the earlier position first (the code's `topk`
  leaves them unspecified).
- Batches and several images: per sequence, over all its visual tokens (every image of
  the sequence, one budget per sequence); the text pivots are chosen among the text tokens
  after the sequence's last visual token. If fewer than pivot_text_token follow, the rest
  come from the sequence's other text tokens (largest key norm) so that the number kept
  depends only on the sequence's token counts, not on where the images sit (the code would
  fail: `topk` of more than there is). A pivot round takes min(TOKEN_TOPK, what is left).
- Generation: the code prunes only in the prefill (`seq_length > 1`); so do we. The kept
  set is chosen once; recomputing a longer sequence would pick other text pivots.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from ..token_types import TokenType
from .base import Capture, Hook, LayerView, Method, check_int

DEFAULT_RATIO = 0.778  # the code's reduction_ratio


@dataclass(frozen=True)
class DART(Method):
    """At layer `k`, keep the visual tokens least duplicated (cosine) with the key-norm
    pivots, `budget` (the code's max_num_trunction) setting how many (module docstring)."""

    k: int = 2
    budget: int | None = None
    pivot_image: int = 4
    pivot_text: int = 4
    reduction_ratio: float = DEFAULT_RATIO
    pivot_order: str = "set"
    budget_rule: str | None = None
    name = "dart"
    hooks = frozenset({Hook.TOKENS})

    def __post_init__(self) -> None:
        check_int(self.k, "DART k", allowed="a layer id >= 1 (DART reads layer k - 1's keys)")
        for field in ("pivot_image", "pivot_text"):
            check_int(getattr(self, field), f"DART {field}", minimum=0, allowed="a non-negative integer")
        pivots = self.pivot_image + self.pivot_text
        if pivots < 1:
            raise ConfigError("DART needs at least one pivot; use pivot_image + pivot_text >= 1")
        if self.budget is not None:
            # The image pivots are always kept: a smaller budget cannot be met.
            least = max(1, self.pivot_image)
            check_int(self.budget, "DART budget", minimum=least,
                      allowed=f"at least {least} visual tokens (the {self.pivot_image} image pivots are "
                              "always kept)")
        r = self.reduction_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r < 1.0:
            raise ConfigError(f"DART reduction_ratio={r!r} is not allowed; use a fraction in [0, 1) "
                              "(0 keeps every token)")
        if self.budget_rule is not None and self.budget_rule not in BUDGET_RULES:
            raise ConfigError(f"DART budget_rule={self.budget_rule!r} is not allowed; use one of "
                              f"{', '.join(BUDGET_RULES)} ('round': LLaVA's eval scripts, 'floor': "
                              "the Qwen2-VL code)")
        if self.pivot_order not in PIVOT_ORDERS:
            raise ConfigError(f"DART pivot_order={self.pivot_order!r} is not allowed; use one of "
                              f"{', '.join(PIVOT_ORDERS)} ('set': the authors' loop order)")

    def drops_at(self, layer: int) -> bool:
        return layer == self.k

    def capture(self, layer: int) -> Capture | None:
        return Capture(keys=True) if layer == self.k - 1 else None

    def keep(self, view: LayerView) -> Tensor:
        if view.keys is None:
            raise RuntimeError(f"DART needs the keys it captures before layer {view.layer}")
        norms = view.keys.float().abs().sum(dim=(2, 3))  # [B, T] L1 over KV heads and dims
        normed = view.norm(view.hidden).float()
        visual = view.visual()
        text = view.types == int(TokenType.TEXT)
        indices = view.sequence_indices()
        kept = ~visual
        for b in range(visual.shape[0]):
            kept[b] |= self._retained(norms[b], normed[b], visual[b], text[b], indices[b])
        return kept

    def _retained(self, norms: Tensor, normed: Tensor, visual: Tensor, text: Tensor,
                  indices: Tensor) -> Tensor:
        """[T] the visual tokens one sequence retains."""
        n_visual = int(visual.sum())
        topk = self.per_pivot(n_visual)
        if topk is None:
            return visual.clone()  # full budget: every visual token (the rule for every method)
        chosen = torch.zeros_like(visual)
        t = visual.shape[0]
        positions = torch.arange(t, device=visual.device)
        image_pivots = _ranked(norms, visual)[: self.pivot_image]
        last_visual = int(positions[visual].max())
        after = text & (positions > last_visual)
        # text after the images first (by norm), then the other text tokens (by norm)
        text_order = torch.cat((_ranked(norms, after), _ranked(norms, text & ~after)))
        pivots = torch.cat((image_pivots, text_order[: self.pivot_text])).tolist()
        if self.pivot_order == "set":
            pivots = set_order(pivots, indices.tolist())
        chosen[image_pivots] = True
        for pivot in pivots:
            left = visual & ~chosen
            if topk == 0 or not bool(left.any()):
                break
            sim = F.cosine_similarity(normed[pivot][None], normed, dim=-1)
            least = _ranked(-sim, left)[:topk]
            chosen[least] = True
        return chosen

    def validate(self, num_layers: int) -> None:
        if self.k >= num_layers:
            raise ConfigError(f"DART k={self.k} is out of range; use 1 <= k < {num_layers} (the model's "
                              "layers)")

    def per_pivot(self, n_visual: int) -> int | None:
        """Visual tokens each pivot round adds for a sequence of n_visual (the code's
        TOKEN_TOPK), or None when the budget keeps every visual token."""
        return dart_per_pivot(n_visual, self.budget, self.reduction_ratio,
                              self.pivot_image + self.pivot_text, self.budget_rule)

    def describe(self) -> str:
        budget = f"reduction_ratio={self.reduction_ratio}" if self.budget is None else f"budget={self.budget}"
        rule = "" if self.budget is not None or self.budget_rule in (None, "round") else \
            f", budget_rule={self.budget_rule}"
        order = "" if self.pivot_order == "set" else f", pivot_order={self.pivot_order}"
        return f"dart(k={self.k}, {budget}{rule}, pivots={self.pivot_image}+{self.pivot_text}{order})"


PIVOT_ORDERS = ("set", "norm")
BUDGET_RULES = ("round", "floor")
# The authors' eval scripts' retain_token_num_for_llava_next (llava/eval/model_vqa_*.py).
NEXT_BUDGET = 320


def for_llava_next(method: Method) -> Method:
    """DART as the authors' code runs it on LLaVA-NeXT when neither a budget nor a ratio
    is given: the eval scripts' retain_token_num_for_llava_next, 320 tokens per sequence
    (a ratio the user sets, 0 included, is kept)."""
    if (isinstance(method, DART) and method.budget is None and method.budget_rule is None
            and method.reduction_ratio == DEFAULT_RATIO):
        return replace(method, budget=NEXT_BUDGET)
    return method


def for_qwen(method: Method) -> Method:
    """DART as the authors' Qwen2-VL code runs it when no budget is given: the count from
    the ratio alone (`budget_rule="floor"`)."""
    if isinstance(method, DART) and method.budget is None and method.budget_rule is None:
        return replace(method, budget_rule="floor")
    return method


def set_order(pivots: list[int], indices: list[int]) -> list[int]:
    """`pivots` (positions at hand, listed image pivots first) in the order DART's code
    loops over them: that of a Python set built from their sequence indices (`indices`
    [T], a batch of one's positions) in list order."""
    listed = [indices[p] for p in pivots]  # built from a list, as the code does
    at = dict(zip(listed, pivots, strict=True))
    return [at[i] for i in set(listed)]


def dart_per_pivot(n_visual: int, budget: int | None, reduction_ratio: float, pivots: int,
                   rule: str | None = None) -> int | None:
    """TOKEN_TOPK, the visual tokens each pivot adds, for a sequence of n_visual visual
    tokens; None when every visual token is kept. With a `budget` (the code's
    max_num_trunction): budget // pivots. Without: rule "round" (or None), the LLaVA eval
    scripts' max_num_trunction = round(n · (1 − ratio)), // pivots; rule "floor", the
    code's formula without one (the Qwen2-VL code's only one): int(n · (1 − ratio) / pivots)."""
    if budget is not None:
        return None if budget >= n_visual else budget // pivots
    if rule == "floor":
        return None if reduction_ratio == 0 else int(n_visual * (1.0 - reduction_ratio) / pivots)
    tokens = round(n_visual * (1.0 - reduction_ratio))
    return None if tokens >= n_visual else tokens // pivots


def dart_kept(n_visual: int, n_text: int, budget: int | None = None, pivot_image: int = 4,
              pivot_text: int = 4, reduction_ratio: float = 0.778, rule: str | None = None) -> int:
    """Visual tokens DART retains of a sequence with n_visual visual and n_text text tokens."""
    topk = dart_per_pivot(n_visual, budget, reduction_ratio, pivot_image + pivot_text, rule)
    if topk is None:
        return n_visual
    pivots = min(pivot_image, n_visual) + min(pivot_text, n_text)
    return min(n_visual, min(pivot_image, n_visual) + pivots * topk)


def _ranked(scores: Tensor, where: Tensor) -> Tensor:
    """Positions where `where` [T] is True, by decreasing score (ties: earlier first)."""
    index = torch.nonzero(where).flatten()
    order = scores[index].float().argsort(descending=True, stable=True)
    return index[order]
