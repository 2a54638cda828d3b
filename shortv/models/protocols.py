"""What a model family's components offer the code that assembles and runs them.

A family (LLaVA today, Qwen2-VL later) is built from three parts, each a small protocol:

- `VisionTower`: pixels → hidden states at the layers asked for, and, when a method asks
  (VisionZip), one layer's class-token attention and keys, as a return value.
- `LanguageModel`: token embeddings, decoder layers running a method's plan (the hook
  points: frozen token types, dropped tokens, captured attention), the final norm and the
  LM head, and the prefill and decode-step pieces over a KV cache.
- `Assembler`: places an encoded batch's visual features among its text tokens and says
  what each position is (token types) and where it is (RoPE position ids).

A family's modules implement them structurally (`shortv.models.clip.CLIPVisionTower`,
`shortv.models.llama.Decoder`, `shortv.models.llava.LlavaModel`); nothing subclasses
these classes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from torch import Tensor, nn

from ..methods import Method
from .batch import Encoded, Prepared
from .llama import KVCache
from .taps import Taps


@dataclass(frozen=True)
class TowerOutput:
    """A vision tower's result: the hidden states [N, 1 + patches, width] asked for, in
    order, and, when asked, the class-token attention [N, heads, 1 + patches] and keys
    [N, heads, 1 + patches, head_dim] of the layer that outputs the last of them."""

    hidden_states: list[Tensor]
    attention: Tensor | None = None
    keys: Tensor | None = None


class VisionTower(Protocol):
    """Pixels → features (an nn.Module; calling it runs its forward pass)."""

    def __call__(self, pixels: Tensor, hidden_indices: tuple[int, ...], *,
                 class_attention: bool = False, taps: Taps | None = None) -> TowerOutput:
        """Hidden states at `hidden_indices` (0 = the embeddings, i = the output of layer
        i) for images [N, 3, S, S]. With `class_attention`, also the class-token attention
        and keys of the layer that outputs the last of them (none for the embeddings);
        `taps` fire at each layer's output (`Taps.vision`)."""
        ...


class LanguageModel(Protocol):
    """The decoder: embeddings, layers, norm and head (an nn.Module; calling it runs the
    layers).

    embed_tokens: token ids → embeddings [..., D]; its weight gives the model's device
        and dtype.
    layers: the decoder layers, in order (their number is the model's layer count).
    norm: the final norm, applied by `head`.
    """

    embed_tokens: nn.Embedding
    layers: nn.ModuleList
    norm: nn.Module

    def __call__(self, x: Tensor, types: Tensor, positions: Tensor, *,
                 cache: KVCache | None = None, method: Method = ...,
                 layers: Iterable[int] | None = None, last_only: bool = False,
                 taps: Taps | None = None) -> Tensor:
        """Hidden states x [B, T, D] with their token types and RoPE positions through
        `layers` (all by default) under `method` (vanilla by default), appending to
        `cache` when given; the last hidden states [B, T, D]. With `last_only` the last
        layer computes the last position only; `taps` fire hooks and keep tensors at the
        layers' hook points (`models.taps`)."""
        ...

    def head(self, hidden: Tensor) -> Tensor:
        """Logits [..., vocab] from final hidden states [..., D] (norm, then LM head)."""
        ...

    def step(self, tokens: Tensor, positions: Tensor, cache: KVCache, method: Method) -> Tensor:
        """One decode step: one new text token per sequence (tokens [B], at positions
        [B, 1]) after what `cache` holds, under `method`; next-token logits [B, vocab]."""
        ...


class Assembler(Protocol):
    """Places visual features among the text tokens of a batch."""

    def prepare(self, batch: Sequence[Encoded], *, method: Method = ...) -> Prepared:
        """The batch for the language model, left-padded to its longest sequence:
        embeddings [B, T, D] (text tokens embedded, each image placeholder replaced by
        that image's visual tokens, reduced by `method` if it reduces images), token types
        [B, T] (text / visual / padding) and position ids. Positions are [B, T] for 1-D
        RoPE (LLaVA); a multi-stream RoPE (M-RoPE: temporal, height, width) would give
        [3, B, T]."""
        ...
