"""Llama / Vicuna decoder in plain torch, with token-type-aware layers.

Every layer computes keys and values for all tokens, but queries, the output projection
and the MLP only for its *rows*: all positions in a vanilla layer, a gathered subset in a
frozen one (ShortV, docs/design.md §6) or when only the last position is needed. Token
types and positions travel as explicit tensors; what the layers of one pass share (RoPE
tables, key validity, attention masks) lives in a `Segment`. One helper, `Subset`, gathers
a per-sequence choice of positions into a dense block and scatters results back: the rows
a layer computes and the tokens FastV/VTW keep are both subsets.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..methods import VANILLA, Capture, LayerStep, LayerView, Method, Queries, layer_plan, walk_plan
from ..ops import Linear
from ..token_types import TYPE_DTYPE, TokenType
from .config import TextConfig
from .kv_cache import KVCache, LayerCache, SlotLayer, SlotView
from .rotary import apply_rope, rope_tables
from .taps import HookPoint, LayerTap, Taps

# The token types of a decode step. (Tensors are compared with the types' int values
# throughout: torch.compile's tracer folds a tensor compared with an IntEnum member into a
# Python bool.)
TEXT_ONLY = frozenset({TokenType.TEXT})


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        shape = (x.shape[-1],)
        if x.dtype in (torch.float32, torch.float64) and x.dtype == self.weight.dtype:
            return F.rms_norm(x, shape, self.weight, self.eps)
        # Half precision: normalise in fp32 and cast back before the weight, as Llama does.
        return self.weight * F.rms_norm(x.float(), shape, eps=self.eps).to(x.dtype)


@dataclass
class Subset:
    """A per-sequence choice of positions, gathered into a dense [B, N] block.

    For each sequence the chosen positions in order, right-aligned: a sequence that chose
    fewer than N starts with filler slots. Fillers point at positions the sequence did not
    choose (valid indices, so any math on them stays finite) and are never written back.
    """

    index: Tensor  # [B, N] positions in the full sequence
    real: Tensor  # [B, N] False for filler slots
    all_real: bool

    @classmethod
    def of(cls, chosen: Tensor, order: Tensor | None = None) -> Subset:
        """The positions where `chosen` [B, T] is True, in position order, or by increasing
        `order` [B, T] (distinct non-negative keys) when given."""
        b, t = chosen.shape
        counts = chosen.sum(dim=1)
        n = int(counts.max()) if b else 0
        # Chosen positions last (a stable sort keeps their order), then the last n of each
        # row: a row with fewer starts with some unchosen positions, its fillers.
        key = chosen.to(torch.int8) if order is None else torch.where(chosen, order, -1)
        index = torch.sort(key, dim=1, stable=True).indices[:, t - n:]
        real = torch.arange(n, device=chosen.device).expand(b, n) >= (n - counts)[:, None]
        return cls(index, real, bool(real.all()))

    @property
    def size(self) -> int:
        return self.index.shape[1]

    def take(self, x: Tensor) -> Tensor:
        """x[b, index[b, n]] for x [B, T, ...]."""
        return _take(x, self.index)

    def put_back(self, full: Tensor, x: Tensor) -> Tensor:
        """`full` [B, T, D] with the real slots' rows replaced by those of x [B, N, D]."""
        b, t, d = full.shape
        flat = self.index + (torch.arange(b, device=x.device) * t)[:, None]
        if self.all_real:
            dst, rows = flat.reshape(-1), x.reshape(-1, d)
        else:
            dst, rows = flat[self.real], x[self.real]
        return full.reshape(-1, d).index_copy(0, dst, rows).view_as(full)


@dataclass
class Rows:
    """The query rows one layer computes, with their RoPE tables and attention mask.
    `subset` is None when every position is a row."""

    cos: Tensor
    sin: Tensor
    mask: Tensor | None  # [B, 1, Q, S] bool, True = may attend; None = `causal` or all keys
    causal: bool
    subset: Subset | None = None


@dataclass
class Segment:
    """The tokens one forward pass feeds through a run of layers and what those layers
    share. A new segment starts where FastV/VTW drop tokens, since from there on the
    layers see other tokens and other cache contents."""

    types: Tensor  # [B, T] TokenType values
    positions: Tensor  # [B, T] RoPE positions ([B, T, 3] with M-RoPE)
    cos: Tensor
    sin: Tensor
    past_valid: Tensor | None  # [B, P] validity of the cached keys before this pass
    has_pad: bool
    kinds: frozenset[TokenType]
    # A decode step on a `SlotCache`: each layer attends over its own window with its own
    # mask (`SlotLayer.step_mask`), so layers that hold fewer tokens need no new segment.
    decoding: bool = False
    _rows: dict[object, Rows] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        types: Tensor,
        positions: Tensor,
        config: TextConfig,
        dtype: torch.dtype,
        past: LayerCache | SlotLayer | None = None,
        kinds: frozenset[TokenType] | None = None,
    ) -> Segment:
        """`kinds`: the token types present, when the caller knows them (a decode step's are
        TEXT alone): finding them out reads the types back to the host."""
        cos, sin = rope_tables(positions, config.head_dim, config.rope_theta, dtype,
                               sections=config.mrope_section)
        if kinds is None:
            kinds = frozenset(TokenType(int(t)) for t in torch.unique(types).tolist())
        if isinstance(past, SlotLayer):
            # A decode step on a `SlotCache`: the new token sits inside the window it
            # attends over, and each layer masks its own window (`SlotLayer.step_mask`).
            return cls(types, positions, cos, sin, None, True, kinds, decoding=True)
        past_valid = past.past_valid() if past is not None and past.length else None
        has_pad = TokenType.PAD in kinds or bool(past is not None and past.has_pad)
        return cls(types, positions, cos, sin, past_valid, has_pad, kinds)

    @property
    def past_length(self) -> int:
        return 0 if self.past_valid is None else self.past_valid.shape[1]

    @property
    def key_valid(self) -> Tensor:
        """[B, P + T]: which keys exist (False for padding)."""
        new = self.types != int(TokenType.PAD)
        return new if self.past_valid is None else torch.cat((self.past_valid, new), dim=1)

    def all_rows(self) -> Rows:
        if "all" not in self._rows:
            b, t = self.types.shape
            p = self.past_length
            if self.decoding:  # the mask is each layer's own (`DecoderLayer.forward`)
                rows = Rows(self.cos, self.sin, None, causal=False)
            elif not self.has_pad and (p == 0 or t == 1):
                # No padding: plain causal attention (or a single new query seeing all keys),
                # which lets SDPA pick its fastest kernels.
                rows = Rows(self.cos, self.sin, None, causal=t > 1 and p == 0)
            else:
                query_at = p + torch.arange(t, device=self.types.device).expand(b, t)
                rows = Rows(self.cos, self.sin, self.query_mask(query_at), causal=False)
            self._rows["all"] = rows
        return self._rows["all"]

    def last_rows(self) -> Rows:
        """The last position of every sequence (always a real token: padding is on the
        left). It may attend to every key, so without padding no mask is needed."""
        if "last" not in self._rows:
            b, t = self.types.shape
            index = torch.full((b, 1), t - 1, dtype=torch.long, device=self.types.device)
            subset = Subset(index, torch.ones(b, 1, dtype=torch.bool, device=index.device), True)
            mask = self.query_mask(self.past_length + index) if self.has_pad else None
            self._rows["last"] = Rows(self.cos[:, -1:], self.sin[:, -1:], mask, causal=False,
                                      subset=subset)
        return self._rows["last"]

    def query_subset(self, queries: Queries) -> Subset:
        """The positions of a `Capture`'s query rows in this pass."""
        b, t = self.types.shape
        if queries == Queries.LAST:
            index = torch.full((b, 1), t - 1, dtype=torch.long, device=self.types.device)
            return Subset(index, torch.ones_like(index, dtype=torch.bool), True)
        if queries == Queries.TEXT:
            return Subset.of(self.types == int(TokenType.TEXT))
        raise ValueError(f"unknown query rows {queries!r}")

    def rows_where(self, active: Tensor, key: object) -> Rows:
        """Rows for the positions where `active` [B, T] is True (memoised under `key`)."""
        if key not in self._rows:
            self._rows[key] = self._gathered_rows(active)
        return self._rows[key]

    def _gathered_rows(self, active: Tensor) -> Rows:
        subset = Subset.of(active)
        cos, sin = subset.take(self.cos), subset.take(self.sin)
        return Rows(cos, sin, self.query_mask(self.past_length + subset.index), causal=False, subset=subset)

    def query_mask(self, query_at: Tensor) -> Tensor:
        """[B, 1, Q, S]: causal over sequence order, no padding keys, and each query may
        always see itself so that padding rows stay finite."""
        keys = torch.arange(self.past_length + self.types.shape[1], device=query_at.device)
        causal = keys <= query_at[..., None]
        mask = (causal & self.key_valid[:, None, :]) | (keys == query_at[..., None])
        return mask[:, None]


def _take(x: Tensor, index: Tensor) -> Tensor:
    """x[b, index[b, q]] for x [B, T, ...]."""
    return torch.gather(x, 1, index.reshape(*index.shape, *([1] * (x.dim() - 2))).expand(
        *index.shape, *x.shape[2:]))


class Attention(nn.Module):
    def __init__(self, c: TextConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c.heads, c.kv_heads, c.head_dim
        self.q_proj = Linear(c.hidden_size, c.heads * c.head_dim, bias=c.attention_bias)
        self.k_proj = Linear(c.hidden_size, c.kv_heads * c.head_dim, bias=c.attention_bias)
        self.v_proj = Linear(c.hidden_size, c.kv_heads * c.head_dim, bias=c.attention_bias)
        self.o_proj = Linear(c.heads * c.head_dim, c.hidden_size, bias=c.out_bias)

    def _heads(self, x: Tensor, heads: int) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, heads, self.head_dim)

    def queries(self, h: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """[B, H, T, D] rotated queries of hidden states h [B, T, hidden]."""
        # Row-major projections keep SDPA on its fused kernels (it falls back to the
        # unfused math path for other layouts).
        return apply_rope(self._heads(self.q_proj(h, contiguous=True), self.heads), cos, sin).transpose(1, 2)

    def keys(self, h: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """[B, H_kv, T, D] rotated keys."""
        k = self._heads(self.k_proj(h, contiguous=True), self.kv_heads)
        return apply_rope(k, cos, sin).transpose(1, 2)

    def keys_values(self, h: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """[B, H_kv, T, D] rotated keys and values."""
        v = self._heads(self.v_proj(h, contiguous=True), self.kv_heads)
        return self.keys(h, cos, sin), v.transpose(1, 2)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, rows: Rows) -> Tensor:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=rows.mask, is_causal=rows.causal,
            enable_gqa=self.heads != self.kv_heads,
        )
        b, _, t, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))

    def pattern(self, q: Tensor, k: Tensor, rows: Rows) -> Tensor:
        """Per-head attention probabilities [B, H, Q, S] of queries q [B, H, Q, D] over keys
        k [B, H_kv, S, D] under the rows' mask (softmax in fp32, in q's dtype): what `attend`
        computes inside SDPA, for a hook to read or change (`mix` then applies it)."""
        k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
        logits = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(self.head_dim)
        if rows.mask is not None:
            logits = logits.masked_fill(~rows.mask, float("-inf"))
        elif rows.causal:
            q_len, s_len = logits.shape[-2:]
            causal = torch.ones(q_len, s_len, dtype=torch.bool, device=q.device).tril(s_len - q_len)
            logits = logits.masked_fill(~causal, float("-inf"))
        return logits.softmax(dim=-1).to(q.dtype)

    def mix(self, probs: Tensor, v: Tensor) -> Tensor:
        """The attention update from probabilities [B, H, Q, S] and values [B, H_kv, S, D]."""
        out = probs @ v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        b, _, t, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))

    def query_scores(self, q: Tensor, k: Tensor, mask: Tensor) -> Tensor:
        """Attention probabilities of queries q [B, H, Q, D] over keys k [B, H_kv, S, D]
        under mask [B, 1, Q, S], mean over heads, in fp32: [B, Q, S]."""
        k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
        logits = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(self.head_dim)
        return logits.masked_fill(~mask, float("-inf")).softmax(dim=-1).mean(dim=1)


@dataclass
class Captured:
    """What a layer reported for a later drop (see `methods.Capture` and `LayerView`)."""

    scores: Tensor | None = None  # [B, Q, T] over this pass's tokens
    query_positions: Tensor | None = None  # [B, Q]
    query_real: Tensor | None = None  # [B, Q]
    keys: Tensor | None = None  # [B, T, H_kv, D]


class MLP(nn.Module):
    def __init__(self, c: TextConfig) -> None:
        super().__init__()
        self.gate_proj = Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, c: TextConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.attn = Attention(c)
        self.mlp_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(
        self,
        x: Tensor,
        seg: Segment,
        rows: Rows,
        cache: LayerCache | SlotLayer | None = None,
        capture: Capture | None = None,
        tap: LayerTap | None = None,
    ) -> tuple[Tensor, Captured | None]:
        """One layer. Keys and values come from every token; queries, the output projection
        and the MLP only from `rows`; other positions pass through unchanged. With a
        `capture`, also what it asks for (computed for the asked query rows only); with a
        `tap`, its hooks fire at the layer's hook points (`models.taps`)."""
        subset = rows.subset
        no_rows = subset is not None and subset.size == 0
        if no_rows and cache is None:
            return (x if tap is None else _unchanged(tap, x)), None
        if tap is not None:
            x = tap.full(HookPoint.RESID_PRE, x)
        h = self.attn_norm(x)
        k_new, v = self.attn.keys_values(h, seg.cos, seg.sin)
        k = k_new
        if cache is not None:
            k, v = cache.append(k_new, v, seg.types != int(TokenType.PAD), TokenType.PAD in seg.kinds)
            if isinstance(cache, SlotLayer):  # a decode step: this layer's own window and mask
                rows = Rows(rows.cos, rows.sin, cache.step_mask(), causal=False)
        if no_rows:
            # Nothing to update (a prefill chunk of frozen visual tokens alone), but their
            # keys and values are cached for the tokens that follow.
            return (x if tap is None else _unchanged(tap, x, after_pre=True)), None
        x_rows, h_rows = (x, h) if subset is None else (subset.take(x), subset.take(h))
        q = self.attn.queries(h_rows, rows.cos, rows.sin)
        if tap is not None and tap.asks(HookPoint.ATTN_PATTERN):
            # Asked for: this layer's attention explicitly, so a hook can read or change it.
            probs = self.attn.pattern(q, k, rows)
            if isinstance(cache, SlotLayer):
                probs = tap.step_pattern(probs, cache.ends)
            else:
                probs = tap.pattern(probs, subset, k.shape[2] - x.shape[1])
            update = self.attn.mix(probs, v)
        else:
            update = self.attn.attend(q, k, v, rows)
        if tap is not None:
            update = tap.rows(HookPoint.ATTN_OUT, update, subset, x, update=True)
        out = x_rows + update
        if tap is not None:
            out = tap.rows(HookPoint.RESID_MID, out, subset, x, update=False)
        update = self.mlp(self.mlp_norm(out))
        if tap is not None:
            update = tap.rows(HookPoint.MLP_OUT, update, subset, x, update=True)
        out = out + update
        captured = self._capture(capture, h, k_new, k, seg) if capture is not None else None
        out = out if subset is None else subset.put_back(x, out)
        return (out if tap is None else tap.full(HookPoint.RESID_POST, out)), captured

    def observe(self, x: Tensor, seg: Segment, capture: Capture, cache: LayerCache | None) -> Captured:
        """What `capture` asks of this layer on input x, without running the layer (and
        without touching its cache): for a drop that ranks with the layer's own attention."""
        h = self.attn_norm(x)
        k_new = self.attn.keys(h, seg.cos, seg.sin)
        k = k_new
        if cache is not None and cache.k is not None and cache.length:
            k = torch.cat((cache.k[:, :, : cache.length], k_new), dim=2)
        return self._capture(capture, h, k_new, k, seg)

    def _capture(self, capture: Capture, h: Tensor, k_new: Tensor, k: Tensor, seg: Segment) -> Captured:
        got = Captured(keys=k_new.transpose(1, 2) if capture.keys else None)
        if capture.queries is not None:
            chosen = seg.query_subset(capture.queries)
            q = self.attn.queries(chosen.take(h), chosen.take(seg.cos), chosen.take(seg.sin))
            probs = self.attn.query_scores(q, k, seg.query_mask(seg.past_length + chosen.index))
            got.scores = probs[:, :, seg.past_length:] * chosen.real[..., None]
            got.query_positions, got.query_real = chosen.index, chosen.real
        return got


class Decoder(nn.Module):
    """The language model: embeddings, decoder layers, final norm and LM head."""

    def __init__(self, c: TextConfig) -> None:
        super().__init__()
        self.config = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = Linear(c.hidden_size, c.vocab_size, bias=False)
        # `_run`'s one-entry cache of the last method's `layer_plan` (plain attributes,
        # not registered: a Method and a tuple of steps).
        self._plan_method: Method | None = None
        self._plan: tuple[LayerStep, ...] = ()

    def head(self, hidden: Tensor) -> Tensor:
        """Logits from final hidden states."""
        return self.lm_head(self.norm(hidden))

    def segment(self, types: Tensor, positions: Tensor, dtype: torch.dtype,
                past: LayerCache | SlotLayer | None = None,
                kinds: frozenset[TokenType] | None = None) -> Segment:
        return Segment.build(types, positions, self.config, dtype, past, kinds)

    def forward(
        self,
        x: Tensor,
        types: Tensor,
        positions: Tensor,
        *,
        cache: KVCache | None = None,
        method: Method = VANILLA,
        layers: Iterable[int] | None = None,
        last_only: bool = False,
        taps: Taps | None = None,
    ) -> Tensor:
        """Run hidden states x [B, T, D] through `layers` (all by default, in order).

        types/positions [B, T] describe the tokens; `method` decides, per layer, which
        token types are frozen and where tokens are dropped; with `last_only` the last
        layer computes the last position only (all that next-token logits need); `taps`
        fire hooks and keep tensors at the layers' hook points (`models.taps`). Returns
        the last hidden states [B, T, D]; tokens dropped by FastV/VTW keep the state they
        had when dropped.
        """
        return self._run(x, types, positions, cache=cache, method=method, layers=layers, last_only=last_only,
                         taps=taps)

    def step(self, tokens: Tensor, positions: Tensor, cache: SlotView, method: Method,
             taps: Taps | None = None) -> Tensor:
        """One decode step: feed one new text token per sequence (tokens [B], at RoPE
        positions [B, 1]) after what `cache` holds (slots [0, B) of a `SlotCache`);
        next-token logits [B, vocab]. `taps`: hooks at the layers' hook points, which see
        the new tokens ([B, 1, ...])."""
        x = self.embed_tokens(tokens[:, None])
        types = torch.full(positions.shape[:2], int(TokenType.TEXT), dtype=TYPE_DTYPE,
                           device=positions.device)
        hidden = self._run(x, types, positions, cache=cache, method=method, kinds=TEXT_ONLY, taps=taps)
        return self.head(hidden[:, -1])

    def _run(
        self,
        x: Tensor,
        types: Tensor,
        positions: Tensor,
        *,
        cache: KVCache | SlotView | None = None,
        method: Method = VANILLA,
        layers: Iterable[int] | None = None,
        last_only: bool = False,
        kinds: frozenset[TokenType] | None = None,
        taps: Taps | None = None,
    ) -> Tensor:
        """`forward`'s pass; takes the token types present as `kinds` when the caller knows
        them (see `Segment.build`). The method's plan (`methods.layer_plan`) says what each layer
        does; `walk_plan` runs it on a `_Pass` in the plan's order."""
        ids = list(range(len(self.layers)) if layers is None else layers)
        if not ids:
            return x
        if torch.compiler.is_compiling():
            # Traced once per graph: plan afresh, so the graph guards on the method itself.
            steps = layer_plan(method, len(self.layers))
        else:
            if method is not self._plan_method:
                self._plan_method, self._plan = method, layer_plan(method, len(self.layers))
            steps = self._plan
        past = cache.layers[ids[0]] if cache is not None else None
        seg = self.segment(types, positions, x.dtype, past, kinds)
        if taps is not None:
            taps.begin(types, decoding=seg.decoding)
        run = _Pass(self, method, x, seg, cache, ids[-1] if last_only else None, taps)
        walk_plan(steps if layers is None else [steps[i] for i in ids], run)
        return run.output()

    @staticmethod
    def _rows(seg: Segment, frozen: TokenType | None, last_only: bool) -> Rows:
        frozen = frozen if frozen in seg.kinds else None
        if frozen is None:
            return seg.last_rows() if last_only else seg.all_rows()
        active = seg.types != int(TokenType.PAD)
        if frozen is not None:
            active = active & (seg.types != int(frozen))
        if last_only:
            last = torch.zeros_like(active)
            last[:, -1] = True
            active = active & last
        return seg.rows_where(active, (frozen, last_only))


class _Pass:
    """The state of one `Decoder._run` pass, which `walk_plan` moves through the layers
    (the hooks of `methods.PlanPass`): the hidden states at hand, their segment, the
    latest capture since the last drop, and each drop's tokens to put back at the end."""

    def __init__(self, decoder: Decoder, method: Method, x: Tensor, seg: Segment,
                 cache: KVCache | SlotView | None, last_only_at: int | None,
                 taps: Taps | None = None) -> None:
        self.decoder, self.method, self.cache = decoder, method, cache
        self.taps = taps
        self.last_only_at = last_only_at  # the layer that computes the last position only
        self.x = x
        self.first, self.first_types = x, seg.types  # the pass's input, for `LayerView`
        self.origin: Tensor | None = None  # [B, T] each token's column in `first` (after a drop)
        self.seg = seg
        self.captured: Captured | None = None
        # Each drop: the tokens before it, the kept ones among them, and how many of them
        # are the previous tokens (a merge appends new ones, which are not put back).
        self.drops: list[tuple[Tensor, Subset, int]] = []

    def cache_of(self, layer: int) -> LayerCache | SlotLayer | None:
        return self.cache.layers[layer] if self.cache is not None else None

    def visual_left(self) -> bool:
        return TokenType.VISUAL in self.seg.kinds

    def capture_before(self, step: LayerStep) -> None:
        assert step.capture_before is not None
        self.captured = self.decoder.layers[step.layer].observe(
            self.x, self.seg, step.capture_before, self.cache_of(step.layer))

    def drop(self, step: LayerStep) -> None:
        seg = self.seg
        view = self._view(step.layer)
        keep = self.method.keep(view)
        x, types, positions, origin = self.x, seg.types, seg.positions, view.origins()
        merged = self.method.merge(view, keep)
        if merged is None:
            kept = Subset.of(keep)
        else:
            # New tokens after each sequence's last kept visual token: appended to the block,
            # then ordered there.
            tokens, real = merged
            order = _merge_order(keep, seg.types, real)
            x = torch.cat((x, tokens.to(x.dtype)), dim=1)
            keep = torch.cat((keep, real), dim=1)
            types = torch.cat((types, torch.full_like(real, int(TokenType.VISUAL), dtype=types.dtype)), dim=1)
            positions = torch.cat((positions, _merged_positions(positions, order, real)), dim=1)
            origin = torch.cat((origin, torch.full_like(real, -1, dtype=origin.dtype)), dim=1)
            kept = Subset.of(keep, order)
        self.drops.append((x, kept, self.x.shape[1]))
        self.x, self.origin = kept.take(x), kept.take(origin)
        if self.method.compacts_positions and positions.dim() == 2:
            new_positions = _compact_positions(kept, seg.positions)
        else:
            new_positions = kept.take(positions)
        # The layers from here on hold other cache contents: a new segment.
        self.seg = self.decoder.segment(_kept_types(kept, types), new_positions, self.x.dtype,
                                        self.cache_of(step.layer))
        self.captured = None

    def _view(self, layer: int) -> LayerView:
        """What `Method.keep` sees before `layer`: the tokens at hand and the latest capture."""
        view = LayerView(layer, self.seg.types, self.x, self.decoder.norm, inputs=self.first,
                         input_types=self.first_types, origin=self.origin)
        if self.captured is not None:
            got = self.captured
            view.scores, view.keys = got.scores, got.keys
            view.query_positions, view.query_real = got.query_positions, got.query_real
        return view

    def nothing_to_drop(self, step: LayerStep) -> None:
        # The same tokens, but the layers from here on may hold other cache contents (an
        # earlier pass dropped tokens there): a new segment, with the same token types. A
        # decode step keeps its segment: each layer masks its own slot window.
        seg = self.seg
        if seg.decoding:
            return
        self.seg = self.decoder.segment(seg.types, seg.positions, self.x.dtype,
                                        self.cache_of(step.layer), seg.kinds)

    def run_layer(self, step: LayerStep, capture: Capture | None) -> None:
        rows = self.decoder._rows(self.seg, step.frozen, step.layer == self.last_only_at)
        tap = None if self.taps is None else self.taps.at(step.layer, self.origin, self.seg.types)
        self.x, got = self.decoder.layers[step.layer](self.x, self.seg, rows, self.cache_of(step.layer),
                                                      capture, tap)
        self.captured = got if got is not None else self.captured

    def output(self) -> Tensor:
        """The last hidden states, every token: dropped tokens keep the state they had when
        they were dropped."""
        x = self.x
        for full, kept, before in reversed(self.drops):
            x = kept.put_back(full, x)[:, :before]
        return x


def _unchanged(tap: LayerTap, x: Tensor, *, after_pre: bool = False) -> Tensor:
    """A layer that updates no row: its hook points see x (resid_pre unless fired already,
    resid_mid and resid_post) and zero updates."""
    if not after_pre:
        x = tap.full(HookPoint.RESID_PRE, x)
    zeros = torch.zeros_like(x)
    tap.full(HookPoint.ATTN_OUT, zeros)
    x = tap.full(HookPoint.RESID_MID, x)
    tap.full(HookPoint.MLP_OUT, zeros)
    return tap.full(HookPoint.RESID_POST, x)


def _compact_positions(kept: Subset, positions: Tensor) -> Tensor:
    """RoPE positions [B, N] after a drop that renumbers: each sequence's kept tokens
    numbered contiguously, its last token keeping its position (fillers: 0).

    PDrop's and SparseVLM's code number the survivors 0..n-1 and shift later decode
    positions down by as many; attention depends on position differences only, so ending
    at the last token's own position gives the same attention, and decode steps go on at
    the sequence's own positions."""
    real = kept.real.long()
    last = positions[:, -1:]  # padding is on the left: the last column is a real token
    numbered = last - real.sum(dim=1, keepdim=True) + real.cumsum(dim=1)
    return torch.where(kept.real, numbered, torch.zeros_like(numbered))


def _merge_order(keep: Tensor, types: Tensor, real: Tensor) -> Tensor:
    """Keys ordering [B, T + M]: the T tokens in place, the M merged ones right after each
    sequence's last kept visual token (its last visual token if none is kept)."""
    b, t = keep.shape
    m = real.shape[1]
    columns = torch.arange(t, device=keep.device).expand(b, t)
    visual = types == int(TokenType.VISUAL)
    kept_visual = visual & keep
    anchor_of = torch.where(kept_visual.any(dim=1, keepdim=True), kept_visual, visual)
    anchor = torch.where(anchor_of, columns, -1).amax(dim=1, keepdim=True).clamp(min=0)
    step = m + 1
    merged = anchor * step + 1 + torch.arange(m, device=keep.device)
    return torch.cat((columns * step, merged), dim=1)


def _merged_positions(positions: Tensor, order: Tensor, real: Tensor) -> Tensor:
    """Placeholder RoPE positions of merged tokens before they are placed ([B, M, ...]):
    the position of the token they follow (what stays when positions are not renumbered)."""
    m = real.shape[1]
    t = positions.shape[1]
    anchor = (order[:, t:] // (m + 1)).clamp(max=t - 1)
    return _take(positions, anchor)


def _kept_types(kept: Subset, types: Tensor) -> Tensor:
    """Token types after a drop: the kept tokens' types, PAD for filler slots."""
    return torch.where(kept.real, types.gather(1, kept.index), int(TokenType.PAD)).to(types.dtype)
