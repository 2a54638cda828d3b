"""Hook points inside the decoder layers, in the coordinates of the prepared sequence.

A pass through the decoder holds, at each layer, the tokens a method left (FastV, PDrop ...
drop some; SparseVLM inserts merged ones) and computes only some rows (ShortV freezes the
visual ones). A user's hook sees none of that: at each hook point it gets a tensor
[B, T, D] over the positions of the pass's input (the prepared batch, padding included),
the positions a user indexes with the token types. Rows a frozen layer skips carry zeros in
`attn_out` / `mlp_out` and an unchanged residual; positions a method dropped (and padding)
are absent: zero in what a hook gets, False in `present`, and whatever a hook writes there
is ignored. Tokens a method inserted have no position and are not shown.

The points, per decoder layer (`HookPoint`):

    resid_pre   the layer's input
    attn_out    the attention block's update (after the output projection)
    resid_mid   resid_pre + attn_out
    mlp_out     the MLP block's update
    resid_post  resid_mid + mlp_out, the layer's output
    attn_pattern  per-head attention probabilities [B, H, T, T] (query rows, key columns);
                  `run_with_cache(queries=...)` keeps the rows of chosen positions, [B, H, Q, T]

`attn_pattern` is computed only at the layers asked (the others stay on SDPA's fused
kernels); a hook may change it, and the layer then attends with what it returned. Rows a
layer does not compute (frozen) and absent positions are zero.

At a decode step (generation with the KV cache) the hooks see the new token, [B, 1, ...],
with types [B, 1]; `attn_pattern` is then [B, H, 1, T] over the whole sequence so far
(the prefill's T0 positions, then the generated tokens, the last column the new token
itself) with types [B, T], as the last row of a prefill of the grown sequence has it. Keys
a layer's cache does not hold (padding, dropped) are zero.

Two more points are outside the decoder (`Taps.vision`, `Taps.projector`):
`vision.resid_post` at each vision tower layer (LLaVA's CLIP tower: [crops, 1 + patches,
width], every crop of every image in order, the class token first; Qwen's ViT: [1,
patches, width] in the processor's patch order) and `projector_out` (layer 0: the visual
tokens the projector gives, [B, T, D] in sequence coordinates, present at the visual
positions; a hook's writes change the visual rows only).

A hook is `fn(x, types) -> Tensor | None`; a returned tensor replaces x (its absent
positions ignored). Taps cost nothing when no hook is set: the layer then runs its usual
path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

import torch
from torch import Tensor

from ..token_types import TokenType

HookFn = Callable[[Tensor, Tensor], Tensor | None]


class HookPoint(StrEnum):
    """The hook points of a decoder layer (module docstring)."""

    RESID_PRE = "resid_pre"
    ATTN_OUT = "attn_out"
    RESID_MID = "resid_mid"
    MLP_OUT = "mlp_out"
    RESID_POST = "resid_post"
    ATTN_PATTERN = "attn_pattern"
    # Read-only, kept by `run_with_cache`: the vision tower's layer outputs (per crop,
    # [crops, tokens, width]) and the projector's visual tokens in sequence coordinates.
    VISION_RESID_POST = "vision.resid_post"
    PROJECTOR_OUT = "projector_out"


@dataclass
class Taps:
    """The hooks of one pass, {(point, layer): fn}, the points whose tensors it keeps
    (`keep`, into `kept` as (tensor [B, T0, D], present [B, T0]), on `device` in `dtype`
    when given) and, set by the pass, the token types [B, T0] of its input (the sequence
    coordinates hooks see)."""

    hooks: Mapping[tuple[HookPoint, int], HookFn] = field(default_factory=dict)
    keep: frozenset[tuple[HookPoint, int]] = frozenset()
    device: torch.device | str | None = None
    dtype: torch.dtype | None = None
    queries: Tensor | None = None  # [Q] sequence positions whose attn_pattern rows are kept
    types: Tensor | None = None
    kept: dict[tuple[HookPoint, int], tuple[Tensor, Tensor]] = field(default_factory=dict)
    decoding: bool = False
    # The last prefill's token types [B, T0] and, per layer with an attn_pattern hook, the
    # sequence column of each key its cache took, in order, per row (-1: an inserted token):
    # what a decode step's keys are, before the generated tokens.
    prompt_types: Tensor | None = None
    _prompt_keys: dict[int, list[Tensor]] = field(default_factory=dict)
    _layers: frozenset[int] = field(init=False)

    def __post_init__(self) -> None:
        self._layers = frozenset(layer for _, layer in (*self.hooks, *self.keep))

    def begin(self, types: Tensor, *, decoding: bool) -> None:
        """A pass starts on tokens of `types` [B, T]: a prefill (its input defines the
        sequence coordinates) or a decode step (one new token per row after what the last
        prefill and the steps since cached)."""
        self.types, self.decoding = types, decoding
        if not decoding:
            self.prompt_types, self._prompt_keys = types, {}

    @property
    def touches_images(self) -> bool:
        """Whether a hook or the cache wants a point of the vision side (the vision-feature
        cache is then bypassed: the tower must run)."""
        return any(point in (HookPoint.VISION_RESID_POST, HookPoint.PROJECTOR_OUT)
                   for point, _ in (*self.hooks, *self.keep))

    def vision(self, layer: int, x: Tensor) -> Tensor:
        """Fire vision.resid_post of tower layer `layer` on x [crops (or 1), tokens, width];
        x, or what the hook wrote. Kept when asked."""
        key = (HookPoint.VISION_RESID_POST, layer)
        fn = self.hooks.get(key)
        if fn is not None:
            new = fn(x, torch.full(x.shape[:-1], int(TokenType.VISUAL), dtype=torch.int8, device=x.device))
            x = x if new is None else new.to(x.dtype)
        if key in self.keep:
            stored = x.detach().to(device=self.device, dtype=self.dtype)
            self.kept[key] = (stored, torch.ones(x.shape[:-1], dtype=torch.bool, device=stored.device))
        return x

    def projector(self, embeds: Tensor, types: Tensor) -> Tensor:
        """Fire projector_out (layer 0) on the visual rows of a prepared batch's embeddings
        [B, T, D] (types [B, T]); the embeddings, with the visual rows the hook wrote."""
        key = (HookPoint.PROJECTOR_OUT, 0)
        fn = self.hooks.get(key)
        if fn is None and key not in self.keep:
            return embeds
        visual = types == int(TokenType.VISUAL)
        seq = embeds.masked_fill(~visual[..., None], 0)
        if fn is not None:
            new = fn(seq, types)
            if new is not None:
                embeds = torch.where(visual[..., None], new.to(embeds.dtype), embeds)
                seq = embeds.masked_fill(~visual[..., None], 0)
        if key in self.keep:
            stored = seq.detach().to(device=self.device, dtype=self.dtype)
            self.kept[key] = (stored, visual.to(stored.device))
        return embeds

    def at(self, layer: int, columns: Tensor | None, types: Tensor) -> LayerTap | None:
        """The tap of `layer` for tokens at hand of `types` [B, N] whose columns in the
        pass's input are `columns` [B, N] (None: the input itself); None when nothing is
        asked of the layer."""
        if layer not in self._layers:
            return None
        assert self.types is not None
        valid = types != int(TokenType.PAD)
        if not self.decoding and (HookPoint.ATTN_PATTERN, layer) in self.hooks:
            cached = columns
            if cached is None:
                cached = torch.arange(types.shape[1], device=types.device).expand_as(types)
            self._prompt_keys[layer] = [c[v] for c, v in zip(cached, valid, strict=True)]
        if columns is None:
            columns = torch.arange(types.shape[1], device=types.device).expand_as(types)
            # The pass's own tokens, none of them padding: already in sequence coordinates.
            return LayerTap(self, layer, columns, valid, identity=bool(valid.all()))
        return LayerTap(self, layer, columns, valid & (columns >= 0))

    def step_keys(self, layer: int, ends: Tensor, window: int) -> tuple[Tensor, Tensor]:
        """At a decode step: the sequence column [B, W] of each key in the `window` a row
        of `layer` attends over (-1: none), when row b's cache holds ends[b] keys before
        the new token; and the sequence's token types [B, T] (the prefill's T0 positions,
        then the generated tokens, the new one last)."""
        if self.prompt_types is None or layer not in self._prompt_keys:
            raise RuntimeError("an attn_pattern hook at a decode step needs the prefill to have run with it")
        prompt = self._prompt_keys[layer]
        t0 = self.prompt_types.shape[1]
        columns = torch.full((len(prompt), window), -1, dtype=torch.long, device=ends.device)
        steps = 0
        for row, (keys, end) in enumerate(zip(prompt, ends.tolist(), strict=True)):
            held = keys.shape[0]
            columns[row, :held] = keys
            columns[row, held: end + 1] = t0 + torch.arange(end + 1 - held, device=ends.device)
            steps = max(steps, end + 1 - held)
        text = torch.full((len(prompt), steps), int(TokenType.TEXT), dtype=self.prompt_types.dtype,
                          device=self.prompt_types.device)
        return columns, torch.cat((self.prompt_types, text), dim=1)


@dataclass
class LayerTap:
    """One layer's hooks and the map from its tokens [B, N] to sequence positions [B, T0]."""

    taps: Taps
    layer: int
    columns: Tensor
    valid: Tensor  # [B, N]: a token with a sequence position (not padding, filler, inserted)
    identity: bool = False  # the tokens at hand are the sequence positions, in order
    _present: Tensor | None = None
    _flat_index: Tensor | None = None

    def full(self, point: HookPoint, x: Tensor) -> Tensor:
        """Fire `point` on x [B, N, D] (every token at hand); x, or what the hook wrote.
        A kept point keeps what the layer goes on with (after the hook)."""
        key = (point, self.layer)
        fn = self.taps.hooks.get(key)
        if fn is None and key not in self.taps.keep:
            return x
        assert self.taps.types is not None
        seq = self._to_sequence(x)
        if fn is not None:
            new = fn(seq, self.taps.types)
            if new is not None:
                x = self._from_sequence(new, x)
                seq = self._to_sequence(x)
        if key in self.taps.keep:
            stored = seq.detach().to(device=self.taps.device, dtype=self.taps.dtype)
            if stored is x and self.taps.hooks:
                stored = stored.clone()  # the layer's own tensor, which a hook might change in place
            self.taps.kept[key] = (stored, self.present().to(stored.device))
        return x

    def rows(self, point: HookPoint, y: Tensor, subset, x: Tensor, *, update: bool) -> Tensor:
        """Fire `point` on y, the rows [B, R, D] a layer computed (`subset`, a
        `llama.Subset`, or None for every token); the other tokens of x [B, N, D] take zero
        for an `update` point, else their row of x."""
        key = (point, self.layer)
        if key not in self.taps.hooks and key not in self.taps.keep:
            return y
        base = torch.zeros_like(x) if update else x
        whole = y if subset is None else subset.put_back(base, y)
        whole = self.full(point, whole)
        return whole if subset is None else subset.take(whole)

    def asks(self, point: HookPoint) -> bool:
        """Whether a hook or the cache wants `point` at this layer."""
        key = (point, self.layer)
        return key in self.taps.hooks or key in self.taps.keep

    def pattern(self, probs: Tensor, subset, past: int) -> Tensor:
        """Fire attn_pattern on probs [B, H, R, S] (query rows `subset` of the tokens at
        hand, None for all; keys: `past` cached positions, then the tokens at hand)."""
        if past:
            raise NotImplementedError("attn_pattern is reported at a prefill without cached "
                                      "positions (run_with_cache / run_with_hooks)")
        assert self.taps.types is not None
        b, t0 = self.taps.types.shape
        n = self.columns.shape[1]
        rows = (torch.arange(n, device=probs.device).expand(b, n) if subset is None else subset.index)
        row_valid = self.valid.gather(1, rows) & (True if subset is None else subset.real)
        row_cols, key_cols = self.columns.gather(1, rows), self.columns
        key = (HookPoint.ATTN_PATTERN, self.layer)
        seq = probs.new_zeros(b, probs.shape[1], t0, t0)
        for i in range(b):
            r, c = row_cols[i][row_valid[i]], key_cols[i][self.valid[i]]
            seq[i][:, r[:, None], c[None, :]] = probs[i][:, row_valid[i]][:, :, self.valid[i]]
        fn = self.taps.hooks.get(key)
        if fn is not None:
            new = fn(seq, self.taps.types)
            if new is not None:
                probs = probs.clone()
                for i in range(b):
                    r, c = row_cols[i][row_valid[i]], key_cols[i][self.valid[i]]
                    block = new[i][:, r[:, None], c[None, :]].to(probs.dtype)
                    rows_i = probs[i][:, row_valid[i]]
                    rows_i[:, :, self.valid[i]] = block
                    probs[i][:, row_valid[i]] = rows_i
                seq = new
        if key in self.taps.keep:
            if self.taps.queries is not None:
                seq = seq[:, :, self.taps.queries.to(seq.device)]  # [B, H, Q, T0]
            stored = seq.detach().to(device=self.taps.device, dtype=self.taps.dtype)
            present = self.present().to(stored.device)
            self.taps.kept[key] = (stored, present)
        return probs

    def step_pattern(self, probs: Tensor, ends: Tensor) -> Tensor:
        """Fire attn_pattern at a decode step on probs [B, H, 1, W], each row's new token
        over its slot's window (row b holds ends[b] keys before it): the hook sees
        [B, H, 1, T] in sequence coordinates (module docstring); what it returns is used."""
        fn = self.taps.hooks.get((HookPoint.ATTN_PATTERN, self.layer))
        if fn is None:
            return probs
        columns, types = self.taps.step_keys(self.layer, ends, probs.shape[-1])
        b, h, _, w = probs.shape
        t = types.shape[1]
        spare = torch.where(columns >= 0, columns, t)[:, None, None, :].expand(b, h, 1, w)
        seq = probs.new_zeros(b, h, 1, t + 1).scatter_(-1, spare, probs)[..., :t]
        new = fn(seq, types)
        if new is None:
            return probs
        taken = torch.cat((new.to(probs.dtype), probs.new_zeros(b, h, 1, 1)), dim=-1).gather(-1, spare)
        return torch.where((columns >= 0)[:, None, None, :], taken, probs)

    def _flat(self, t0: int) -> Tensor:
        """The flat [B · T0] index of each valid token at hand (the same at every point)."""
        if self._flat_index is None:
            rows = torch.arange(self.columns.shape[0], device=self.columns.device)[:, None]
            self._flat_index = (self.columns.clamp(min=0) + rows * t0)[self.valid]
        return self._flat_index

    def _to_sequence(self, x: Tensor) -> Tensor:
        if self.identity:
            return x
        assert self.taps.types is not None
        b, t0 = self.taps.types.shape
        seq = x.new_zeros(b * t0, x.shape[-1])
        seq.index_copy_(0, self._flat(t0), x[self.valid])
        return seq.view(b, t0, -1)

    def _from_sequence(self, seq: Tensor, x: Tensor) -> Tensor:
        if self.identity:
            return seq.to(x.dtype)
        b, t0 = seq.shape[:2]
        out = x.clone()
        out[self.valid] = seq.reshape(b * t0, -1)[self._flat(t0)].to(x.dtype)
        return out

    def present(self) -> Tensor:
        """[B, T0] the sequence positions this layer holds."""
        if self._present is None:
            assert self.taps.types is not None
            if self.identity:
                self._present = self.valid
            else:
                b, t0 = self.taps.types.shape
                mask = torch.zeros(b * t0, dtype=torch.bool, device=self.columns.device)
                mask[self._flat(t0)] = True
                self._present = mask.view(b, t0)
        return self._present


@dataclass
class ActivationCache:
    """What `run_with_cache` kept: `cache[name, layer]` is a tensor [B, T, D] over the
    positions of the prepared batch (left-padded; B = 1 for one input), `present[name,
    layer]` [B, T] says which positions the layer held (False: padding, or dropped by the
    method), `types` [B, T] the token types and `positions` the RoPE positions."""

    tensors: dict[tuple[HookPoint, int], Tensor]
    present: dict[tuple[HookPoint, int], Tensor]
    types: Tensor
    positions: Tensor

    def __getitem__(self, key: tuple[str, int]) -> Tensor:
        return self.tensors[_key(key)]

    def __contains__(self, key: object) -> bool:
        try:
            return _key(key) in self.tensors  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return False

    def keys(self) -> list[tuple[HookPoint, int]]:
        return list(self.tensors)

    def of_type(self, key: tuple[str, int], token_type: TokenType) -> Tensor:
        """The rows [n, D] of `cache[key]` at the positions of `token_type` the layer held,
        every sequence's in order."""
        k = _key(key)
        rows = self.present[k] & (self.types.to(self.present[k].device) == int(token_type))
        return self.tensors[k][rows]


def _key(key: tuple[str, int]) -> tuple[HookPoint, int]:
    name, layer = key
    return HookPoint(name), int(layer)
