"""The two KV caches: `KVCache`, which a prefill fills, and `SlotCache`, which decoding
reads and appends to.

A prefill runs a left-padded batch through the decoder into a `KVCache` of its own (one
row per prompt; a layer holds fewer tokens where a method dropped some). When it is done,
`SlotCache.write` copies each prompt's keys and values, without the padding, into a slot
of a `SlotCache`: per layer one buffer `[slots, kv_heads, capacity, head_dim]`, allocated
once, and per slot and layer the number of positions it holds. Decode steps then write each
new token at its slot's end, in place. A sequence that finishes frees its slot (`free`);
no step, join or leave ever copies another slot's keys.

A decode step runs on the first `rows` slots (`SlotCache.view`): the rows that are not in
use compute a token nobody reads. Each layer attends over a window of its buffer: as many
positions as the longest of its live rows will hold after the step (dynamic shapes), or
the whole capacity (`static`: every step has the same shapes, one CUDA graph per number
of rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import InputError


class KVCache:
    """Keys and values of every layer of a prefill. Layers may hold different tokens
    (FastV and VTW drop visual tokens from some layer on), so each layer keeps its own
    length and its own key-validity mask (False for padding)."""

    def __init__(self, num_layers: int, capacity: int = 0) -> None:
        self.layers = [LayerCache(capacity) for _ in range(num_layers)]


class LayerCache:
    """One layer of a `KVCache`: keys and values [B, H_kv, n, D] with their validity
    [B, n], grown as pieces of a prefill arrive."""

    def __init__(self, capacity: int = 0) -> None:
        self.capacity = capacity
        self.k: Tensor | None = None  # [B, H_kv, capacity, D]
        self.v: Tensor | None = None
        self.valid: Tensor | None = None  # [B, capacity]
        self.length = 0
        self.has_pad = False

    def past_valid(self) -> Tensor | None:
        """[B, P]: validity of the keys so far."""
        return None if self.valid is None else self.valid[:, : self.length]

    def append(self, k: Tensor, v: Tensor, valid: Tensor, has_pad: bool) -> tuple[Tensor, Tensor]:
        """Store new keys/values; return all keys/values so far."""
        new = k.shape[2]
        end = self.length + new
        if self.k is None or end > self.k.shape[2]:
            self._grow(k, v, max(end, self.capacity, 2 * (self.k.shape[2] if self.k is not None else 0)))
        assert self.k is not None and self.v is not None and self.valid is not None
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.valid[:, self.length : end] = valid
        self.length = end
        self.has_pad = self.has_pad or has_pad
        return self.k[:, :, :end], self.v[:, :, :end]

    def content(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """Keys, values and validity written so far (None for a layer nothing reached)."""
        if self.k is None:
            return None
        assert self.v is not None and self.valid is not None
        n = self.length
        return self.k[:, :, :n], self.v[:, :, :n], self.valid[:, :n]

    def _grow(self, k: Tensor, v: Tensor, size: int) -> None:
        b, h, _, d = k.shape
        old = self.length
        new_k, new_v = k.new_empty(b, h, size, d), v.new_empty(b, h, size, d)
        new_valid = torch.zeros(b, size, dtype=torch.bool, device=k.device)
        if self.k is not None and old:
            assert self.v is not None and self.valid is not None
            new_k[:, :, :old] = self.k[:, :, :old]
            new_v[:, :, :old] = self.v[:, :, :old]
            new_valid[:, :old] = self.valid[:, :old]
        self.k, self.v, self.valid = new_k, new_v, new_valid


@dataclass(frozen=True)
class CachePlan:
    """The shape of a `SlotCache`: its bytes follow from it (`nbytes`)."""

    layers: int
    slots: int
    capacity: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the keys and values (2 buffers per layer)."""
        item = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.layers * self.slots * self.kv_heads * self.capacity * self.head_dim * item

    def describe(self) -> str:
        return (f"{self.slots} slots x {self.capacity} positions x {self.layers} layers "
                f"({self.kv_heads} KV heads of {self.head_dim}, {str(self.dtype).removeprefix('torch.')}): "
                f"{self.nbytes / 2**20:.1f} MiB")


class SlotCache:
    """Keys and values of up to `slots` sequences being decoded (see the module docstring).

    `ends[l, s]` (a host tensor) is how many positions slot s holds in layer l; `in_use[s]`
    whether slot s holds a sequence. The buffers are zeros at first, so that the positions
    a step reads past a row's end (masked) are finite.
    """

    def __init__(self, plan: CachePlan, device: torch.device | str, *, lazy: bool = False) -> None:
        self.plan = plan
        self._device = device
        # lazy: each layer's buffers are allocated by the first `write` (a prefill's own
        # state: its prefill cache is freed layer by layer as the slots fill, so the two
        # never both hold every layer).
        self.k: list[Tensor] = []
        self.v: list[Tensor] = []
        if not lazy:
            for layer in range(plan.layers):
                self._allocate(layer)
        # On the host: [layers, slots] positions held, [slots] in use.
        self.ends = torch.zeros(plan.layers, plan.slots, dtype=torch.long)
        self.in_use = torch.zeros(plan.slots, dtype=torch.bool)
        self._columns = torch.arange(plan.capacity, device=device)
        self._rows = torch.arange(plan.slots, device=device)
        # Where slot s's head h starts in a buffer seen as [slots * heads * capacity, D].
        heads = torch.arange(plan.kv_heads, device=device)
        self._starts = (self._rows[:, None] * plan.kv_heads + heads) * plan.capacity
        self._static = False

    def _allocate(self, layer: int) -> None:
        if layer < len(self.k):
            return
        plan = self.plan
        shape = (plan.slots, plan.kv_heads, plan.capacity, plan.head_dim)
        self.k.append(torch.zeros(shape, dtype=plan.dtype, device=self._device))
        self.v.append(torch.zeros(shape, dtype=plan.dtype, device=self._device))

    def mark_static(self) -> None:
        """Give the buffers fixed addresses for compiled code: a recorded CUDA graph may
        then write them in place (inductor skips CUDA graphs for other mutated inputs)."""
        if not self._static:
            for buffer in (*self.k, *self.v):
                torch._dynamo.mark_static_address(buffer)
            self._static = True

    @property
    def slots(self) -> int:
        return self.plan.slots

    @property
    def capacity(self) -> int:
        return self.plan.capacity

    @property
    def live(self) -> list[bool]:
        """Whether each slot holds a sequence."""
        return self.in_use.tolist()

    @property
    def nbytes(self) -> int:
        """Bytes the buffers hold (equal to `plan.nbytes`)."""
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def held(self, slot: int) -> int:
        """The most positions slot `slot` holds in any layer."""
        return int(self.ends[:, slot].max())

    def room(self, slot: int) -> int:
        """How many more tokens slot `slot` can take."""
        return self.capacity - self.held(slot)

    def write(self, slots: Sequence[int], prefill: KVCache) -> None:
        """Move row i of a prefill's cache into slot `slots[i]`, without its padding (and
        the fillers a drop left): the slot's keys keep the order they had. A slot that
        held a sequence is overwritten; the prefill cache is emptied layer by layer as it
        is copied. InputError when a row does not fit the capacity."""
        if len(prefill.layers) != self.plan.layers:
            raise ValueError("a prefill cache of another depth")
        runs = [_valid_runs(layer) for layer in prefill.layers]
        longest = max((n for layer in runs for _, n in layer), default=0)
        if longest > self.capacity:
            raise InputError(f"the prompt needs {longest} cached positions, more than the "
                             f"{self.capacity} a slot holds (the server's --max-context)")
        for layer, (cache, rows) in enumerate(zip(prefill.layers, runs, strict=True)):
            self._allocate(layer)
            content = cache.content()
            for row, slot in enumerate(slots):
                start, held = rows[row] if rows else (0, 0)
                self.ends[layer, slot] = held
                if content is None or not held:
                    continue
                k, v, valid = content
                if start >= 0:  # one run of valid positions: one slice
                    self.k[layer][slot, :, :held] = k[row, :, start: start + held]
                    self.v[layer][slot, :, :held] = v[row, :, start: start + held]
                else:
                    self.k[layer][slot, :, :held] = k[row][:, valid[row]]
                    self.v[layer][slot, :, :held] = v[row][:, valid[row]]
            cache.k = cache.v = cache.valid = None  # copied: its memory may go now
        self.in_use[list(slots)] = True

    def free(self, slots: Sequence[int]) -> None:
        """The sequences in `slots` are done: their slots take the next ones (no copy)."""
        index = list(slots)
        self.in_use[index] = False
        self.ends[:, index] = 0

    def view(self, rows: int, *, static: bool = False) -> SlotView:
        """What a decode step over slots [0, rows) reads and writes (see `SlotLayer`).
        `static`: every layer's window is the whole capacity. A single row needs no mask
        when its window is exactly what it holds (dynamic)."""
        if not 1 <= rows <= self.slots:
            raise ValueError(f"a step runs on 1 to {self.slots} rows, not {rows}")
        if len(self.k) < self.plan.layers:  # a lazy cache stepped before any write
            for layer in range(len(self.k), self.plan.layers):
                self._allocate(layer)
        ends = self.ends[:, :rows]
        live_ends = ends * self.in_use[:rows]  # a free slot's ends are 0 anyway
        longest = live_ends.max(dim=1).values.tolist()
        if max(longest) >= self.capacity:
            raise InputError(f"a slot is full ({self.capacity} positions): it cannot take another token")
        windows = [self.capacity] * len(self.k) if static else [n + 1 for n in longest]
        device = self._columns.device
        ends = ends.to(device, non_blocking=True) if device.type != "cpu" else ends
        rows_index, starts = self._rows[:rows], self._starts[:rows]
        masked = static or rows > 1
        return SlotView([SlotLayer(k, v, ends[i], self._columns[:w], rows_index, starts, masked)
                         for i, (k, v, w) in enumerate(zip(self.k, self.v, windows, strict=True))])

    def advance(self, rows: int) -> None:
        """After a step over slots [0, rows): each live one holds one more position."""
        self.ends[:, :rows] += self.in_use[:rows]


def _valid_runs(layer: LayerCache) -> list[tuple[int, int]]:
    """Per row of a prefill layer, (its first valid position, how many are valid). The
    padding is on the left and a drop's fillers lead, so the valid positions are one run
    and a row is copied as one slice; the start is -1 for a row where they are not."""
    content = layer.content()
    if content is None:
        return []
    valid = content[2].to(torch.int8)
    t = valid.shape[1]
    counts = valid.sum(dim=1)
    first = valid.argmax(dim=1)
    last = t - 1 - valid.flip(1).argmax(dim=1)
    one_run = (counts == last - first + 1) | (counts == 0)
    start = torch.where(one_run, first, -1)
    return list(zip(start.tolist(), counts.tolist(), strict=True))


class SlotView:
    """A decode step's view of a `SlotCache`: one `SlotLayer` per layer."""

    def __init__(self, layers: list[SlotLayer]) -> None:
        self.layers = layers


class SlotLayer:
    """One layer of a decode step over slots [0, B): the layer's whole buffers, each row's
    end [B] (where its new token goes), the columns [W] it attends over, the rows' indices
    [B] and where each row's heads start in the flattened buffers [B, H_kv], and whether
    the step needs a mask (several rows, or a static window)."""

    def __init__(self, k: Tensor, v: Tensor, ends: Tensor, columns: Tensor, rows: Tensor,
                 starts: Tensor, masked: bool) -> None:
        self.k, self.v, self.ends, self.columns = k, v, ends, columns
        self.rows, self.starts, self.masked = rows, starts, masked

    def step_mask(self) -> Tensor | None:
        """[B, 1, 1, W]: the positions each row's new token may see (those it holds, and
        its own); None when that is every position of the window."""
        if not self.masked:
            return None
        return (self.columns[None, :] <= self.ends[:, None])[:, None, None, :]

    def append(self, k: Tensor, v: Tensor, valid: Tensor, has_pad: bool) -> tuple[Tensor, Tensor]:
        """Write one new token per row (k, v [B, H_kv, 1, D]) at the row's end, in place;
        return the window of keys and values [B, H_kv, W, D] the step attends over."""
        b, _, _, d = k.shape
        if torch.compiler.is_compiling():
            # Traced: advanced indexing on the buffers themselves (a write through a
            # flattened view of a graph input doubles the time dynamo takes to trace).
            self.k[self.rows, :, self.ends] = k[:, :, 0]
            self.v[self.rows, :, self.ends] = v[:, :, 0]
        else:
            # Eager: one row of D per (row, head) into the flattened buffers, which costs
            # less per call than the advanced-indexing write.
            at = (self.starts + self.ends[:, None]).view(-1)
            self.k.view(-1, d).index_copy_(0, at, k.reshape(-1, d))
            self.v.view(-1, d).index_copy_(0, at, v.reshape(-1, d))
        w = self.columns.shape[0]
        return self.k[:b, :, :w], self.v[:b, :, :w]
