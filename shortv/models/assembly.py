"""What every vision-language module shares: splicing visual tokens into the text, left
padding a batch, and the prefill / decode-step passes over a KV cache.

A family's module (`shortv.models.llava.LlavaModel`, `shortv.models.qwen_vl.QwenVLModel`)
subclasses `VisionLanguageModule` and supplies two things: `image_features` (images →
visual tokens) and `positions` (where each token of a sequence is for RoPE: [n] for 1-D
RoPE, [n, 3] for M-RoPE). Everything else, the method included, is the same for every
family: the method is an argument of every pass that depends on it, never state. So is
the vision-feature cache (`shortv.models.feature_cache`): `prepare` and `prefill` take one,
and then an image seen before skips the tower.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ContextLengthError, InputError
from ..methods import VANILLA, Hook, Method
from ..token_types import TYPE_DTYPE, TokenType
from ..tokenizer import IMAGE_TOKEN
from .batch import DecodeState, Encoded, Prepared
from .config import TextConfig
from .feature_cache import FeatureCache, image_key
from .kv_cache import CachePlan, KVCache, SlotCache
from .protocols import LanguageModel
from .taps import Taps

# torch.compile modes that record CUDA graphs, which need the static KV cache.
CUDA_GRAPH_MODES = frozenset({"reduce-overhead", "max-autotune"})


@dataclass(frozen=True)
class Run:
    """A run of one sequence's tokens after splicing: `length` text tokens, or one image's
    visual tokens (`image` is then that image's preprocessed tensor, from `Encoded.images`)."""

    start: int
    length: int
    image: Tensor | None = None


class VisionLanguageModule(nn.Module):
    """Base of a family's torch module: `decoder` (the `LanguageModel`) and `config` (with
    the decoder's `TextConfig` as `config.text`) are set by the subclass."""

    config: Any
    decoder: LanguageModel

    def __init__(self) -> None:
        super().__init__()
        self._compiled_step: Any = None  # set by compile_step()
        self._static_decode = False  # decode steps on a static cache (compile_step(static=True))

    @property
    def text_config(self) -> TextConfig:
        return self.config.text

    @property
    def num_layers(self) -> int:
        return self.text_config.layers

    @property
    def device(self) -> torch.device:
        return self.decoder.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.embed_tokens.weight.dtype

    # ---- what a family supplies -----------------------------------------------------------

    def image_features(self, images: Sequence[Tensor], sizes: Sequence[tuple[int, int]], *,
                       method: Method = VANILLA, taps: Taps | None = None) -> list[Tensor]:
        """Visual tokens [N_i, D] per image (after `method`'s image reduction, if any),
        `taps` firing at the vision tower's layers (`Taps.vision`)."""
        raise NotImplementedError

    @property
    def vision_depth(self) -> int:
        """How many vision tower layers run (the hook point vision.resid_post's layers)."""
        raise NotImplementedError

    def positions(self, runs: Sequence[Run], features: Sequence[Tensor]) -> Tensor:
        """RoPE positions of one spliced sequence made of `runs` ([n], or [n, 3] for
        M-RoPE); `features` are the visual tokens of its image runs, in order."""
        raise NotImplementedError

    # ---- assembly --------------------------------------------------------------------------

    def prepare(self, batch: Sequence[Encoded], *, method: Method = VANILLA,
                cache: FeatureCache | None = None, taps: Taps | None = None) -> Prepared:
        """Embeddings with visual tokens spliced in, token types and positions; sequences
        are left-padded to the longest (padding has type PAD). The images' visual tokens
        are `method`'s (reduced by it, if it reduces images); with a `cache`, images it
        holds skip the tower, and the others still go through it in one call. `taps`:
        hooks at the vision tower's layers and on the projected visual tokens (the
        cache is then bypassed)."""
        images = [im for e in batch for im in e.images]
        sizes = [s for e in batch for s in e.image_sizes]
        vision_taps = taps if taps is not None and taps.touches_images else None
        if cache is None or vision_taps is not None:
            features = iter(self.image_features(images, sizes, method=method, taps=vision_taps))
        else:
            features = iter(self.cached_image_features(images, sizes, method=method, cache=cache))
        embeds, types, positions = [], [], []
        for e in batch:
            x, t, runs, feats = self._splice(e.input_ids.to(self.device), iter(e.images), features)
            embeds.append(x)
            types.append(t)
            positions.append(self.positions(runs, feats))
        prepared = self._left_pad(embeds, types, positions)
        if vision_taps is not None:
            prepared.embeds = vision_taps.projector(prepared.embeds, prepared.types)
        return prepared

    def cached_image_features(self, images: Sequence[Tensor], sizes: Sequence[tuple[int, int]], *,
                              method: Method, cache: FeatureCache) -> list[Tensor]:
        """`image_features` through `cache`: the tower runs once, on the images it does not
        hold (each distinct image once), and their tokens are stored."""
        keys = [image_key(im, size, method, device=self.device, dtype=self.dtype)
                for im, size in zip(images, sizes, strict=True)]

        def compute(indices: list[int]) -> list[Tensor]:
            return self.image_features([images[i] for i in indices], [sizes[i] for i in indices],
                                       method=method)

        return cache.features(keys, compute)

    def _splice(self, ids: Tensor, images: Iterator[Tensor], features: Iterator[Tensor]
                ) -> tuple[Tensor, Tensor, list[Run], list[Tensor]]:
        """One sequence's embeddings and token types with each IMAGE_TOKEN replaced by that
        image's visual tokens, and the runs it is made of."""
        if ids.dim() != 1:
            raise InputError(f"input_ids must be 1-D, got shape {tuple(ids.shape)}")
        vocab = self.text_config.vocab_size
        text = ids[ids != IMAGE_TOKEN]
        if text.numel() and (int(text.min()) < 0 or int(text.max()) >= vocab):
            raise InputError(f"token ids must lie in [0, {vocab}) apart from IMAGE_TOKEN={IMAGE_TOKEN}")
        embeds = self.decoder.embed_tokens(ids.clamp(min=0))
        where = (ids == IMAGE_TOKEN).nonzero().flatten().tolist()
        parts, runs, feats, start, at_out = [], [], [], 0, 0
        for at in where:
            feat = next(features)
            parts += [embeds[start:at], feat.to(embeds.dtype)]
            runs.append(Run(at_out, at - start))
            runs.append(Run(at_out + at - start, feat.shape[0], next(images)))
            feats.append(feat)
            at_out += at - start + feat.shape[0]
            start = at + 1
        parts.append(embeds[start:])
        runs.append(Run(at_out, len(ids) - start))
        kinds = [TokenType.TEXT if r.image is None else TokenType.VISUAL for r in runs]
        types = torch.cat([torch.full((r.length,), int(k), dtype=TYPE_DTYPE)
                           for r, k in zip(runs, kinds, strict=True)])
        return torch.cat(parts), types.to(self.device), runs, feats

    def _left_pad(self, embeds: list[Tensor], types: list[Tensor], positions: list[Tensor]) -> Prepared:
        lengths = [x.shape[0] for x in embeds]
        limit = self.text_config.max_position_embeddings
        if max(lengths) > limit:
            raise ContextLengthError(
                f"the sequence has {max(lengths)} tokens after expanding images, more than "
                f"the model's context of {limit}; shorten the prompt or use fewer/smaller images"
            )
        b, t, d = len(embeds), max(lengths), embeds[0].shape[1]
        x = embeds[0].new_zeros(b, t, d)
        ty = torch.full((b, t), int(TokenType.PAD), dtype=TYPE_DTYPE, device=self.device)
        pos = torch.zeros(b, t, *positions[0].shape[1:], dtype=torch.long, device=self.device)
        for i, (e, k, p) in enumerate(zip(embeds, types, positions, strict=True)):
            n = e.shape[0]
            x[i, t - n:] = e
            ty[i, t - n:] = k
            pos[i, t - n:] = p
        # The next token of each sequence is one past its furthest position (1-D RoPE: its
        # length), on every stream.
        after = torch.tensor([int(p.max()) + 1 if p.numel() else 0 for p in positions],
                             device=self.device)
        nxt = after.view(b, 1, *([1] * (pos.dim() - 2))).expand(b, 1, *pos.shape[2:])
        return Prepared(x, ty, pos, lengths, next_positions=nxt.contiguous())

    # ---- forward passes ---------------------------------------------------------------------

    def hidden_states(self, prepared: Prepared, method: Method, taps: Taps | None = None) -> Tensor:
        """Decoder output [B, T, D] for a prepared batch under `method` (with `taps` at the
        layers' hook points, `models.taps`)."""
        return self.decoder(prepared.embeds, prepared.types, prepared.positions, method=method, taps=taps)

    def prefill(self, batch: Sequence[Encoded], *, max_new_tokens: int, method: Method,
                cache: FeatureCache | None = None, into: DecodeState | None = None,
                slots: Sequence[int] | None = None, taps: Taps | None = None) -> tuple[Tensor, DecodeState]:
        """Run the prompts (left-padded) under `method`; next-token logits [B, vocab] and
        the state that `step` continues: a new one with a slot per prompt, sized for
        `max_new_tokens` more, or `into` with prompt i in slot `slots[i]`. When no new
        token fits the context, the decoder is not run (budget 0, logits empty). `cache`:
        the vision-feature cache, as in `prepare`; `taps`: hooks at the decoder layers' hook
        points (`models.taps`; every layer then computes every position)."""
        # In one piece: the generator's first (and only) result is the prefill's.
        done = next(self.prefill_chunks(batch, max_new_tokens=max_new_tokens, method=method, cache=cache,
                                        into=into, slots=slots, taps=taps))
        assert done is not None
        return done

    @torch.inference_mode()  # around each chunk: a generator must not leave the mode on
    def prefill_chunks(self, batch: Sequence[Encoded], *, max_new_tokens: int, method: Method,
                       cache: FeatureCache | None = None, chunk: int | None = None,
                       into: DecodeState | None = None, slots: Sequence[int] | None = None,
                       taps: Taps | None = None) -> Iterator[tuple[Tensor, DecodeState] | None]:
        """`prefill` in pieces of at most `chunk` positions (None: all at once): the images
        go through the tower first, then each piece through the decoder, appending to the
        prefill's KV cache; yields None after every piece but the last, then what `prefill`
        returns. A server interleaves decode steps between the pieces, so that a long
        prompt does not stall the answers already streaming. The result equals `prefill`'s
        (each piece attends to the cache and causally within itself). A method that drops
        tokens or captures attention to rank them (`Hook.TOKENS`: FastV, VTW, PDrop, DART,
        SparseVLM) needs the whole prompt in one pass, so its prompts go in one piece.

        `into`, `slots`: write prompt i into slot `slots[i]` of a running `DecodeState`
        (free slots; continuous batching) and return that state, instead of a new state
        with a slot per prompt sized for `max_new_tokens` more."""
        if chunk is not None and chunk < 1:
            raise ValueError(f"chunk must be >= 1 or None, got {chunk}")
        if (into is None) != (slots is None) or (slots is not None and len(slots) != len(batch)):
            raise ValueError("into and slots go together, with one slot per prompt")
        prepared = self.prepare(batch, method=method, cache=cache, taps=taps)
        b, t = prepared.types.shape
        context = self.text_config.max_position_embeddings
        budget = max(0, min(max_new_tokens, context - max(prepared.lengths)))
        if into is None:
            state = self.decode_state(b, t + budget if budget else 0, lazy=True)
            slots = range(b)
            state.budget = budget
        else:
            state = into
            if max(prepared.lengths) >= state.cache.capacity:
                raise ContextLengthError(
                    f"the prompt has {max(prepared.lengths)} tokens after expanding its images, and "
                    f"a sequence may hold at most {state.cache.capacity} (prompt and answer; the "
                    "server's --max-context); shorten the messages or send fewer images")
        for slot, n in zip(slots, prepared.lengths, strict=True):
            state.prompt_lengths[slot] = n
        if budget == 0:
            yield prepared.embeds.new_empty(b, 0), state
            return
        kv = KVCache(self.num_layers, capacity=t)
        piece = t if chunk is None or Hook.TOKENS in method.hooks or taps is not None else chunk
        for start in range(0, t, piece):
            end = min(t, start + piece)
            hidden = self.decoder(prepared.embeds[:, start:end], prepared.types[:, start:end],
                                  prepared.positions[:, start:end], cache=kv, method=method,
                                  last_only=end == t and taps is None, taps=taps)
            if end < t:
                yield None
        state.cache.write(slots, kv)
        index = torch.tensor(list(slots), dtype=torch.long, device=state.positions.device)
        assert prepared.next_positions is not None
        state.positions.index_copy_(0, index, prepared.next_positions)
        yield self.decoder.head(hidden[:, -1]), state

    def decode_state(self, slots: int, capacity: int, *, lazy: bool = False) -> DecodeState:
        """An empty `DecodeState`: a `SlotCache` of `slots` sequences of up to `capacity`
        positions each, allocated now (`prefill_chunks(..., into=)` fills its slots), or
        layer by layer as the first prefill fills it (`lazy`)."""
        c = self.text_config
        plan = CachePlan(c.layers, slots, capacity, c.kv_heads, c.head_dim, self.dtype)
        rope_streams = (3,) if c.mrope_section else ()
        positions = torch.zeros(slots, 1, *rope_streams, dtype=torch.long, device=self.device)
        return DecodeState(SlotCache(plan, self.device, lazy=lazy), positions, [0] * slots, 0)

    @torch.inference_mode()
    def step(self, state: DecodeState, tokens: Tensor, method: Method, taps: Taps | None = None) -> Tensor:
        """Feed one new token to each of the slots [0, B) of `state` (tokens [B]) under
        `method`; next-token logits [B, vocab] (a free slot's row is meaningless). Runs the
        compiled decode step once `compile_step` made one, except with `taps` (hooks at the
        layers' hook points, `models.taps`), which run eager."""
        rows = tokens.shape[0]
        if self._static_decode:
            state.cache.mark_static()
        view = state.cache.view(rows, static=self._static_decode)
        if taps is not None:
            logits = self.decoder.step(tokens, state.positions[:rows], view, method, taps)
        else:
            decode = self._compiled_step or self.decoder.step
            logits = decode(tokens, state.positions[:rows], view, method)
        state.cache.advance(rows)
        state.positions[:rows] += 1
        return logits

    @property
    def compiled(self) -> bool:
        """Whether `compile_step` compiled the decode step."""
        return self._compiled_step is not None

    def compile_step(self, *, static: bool | None = None, **options: Any) -> None:
        """Compile the decode step (`Decoder.step`) with torch.compile, as one graph
        (fullgraph: it reads nothing back to the host); the prefill stays eager. `options`
        go to torch.compile.

        `static`: every decode step attends over each slot's whole capacity, so every step
        over the same number of rows has the same shapes: one graph per number of rows, which
        CUDA graphs can replay. The default is static for the modes that use CUDA graphs
        ("reduce-overhead", the default mode on CUDA, and "max-autotune"); otherwise each
        layer attends over as many positions as its longest row holds, and the graph is
        compiled for dynamic shapes, which costs less attention on short answers.
        """
        if self.device.type == "cuda":
            options.setdefault("mode", "reduce-overhead")
        if static is None:
            static = options.get("mode") in CUDA_GRAPH_MODES
        options.setdefault("dynamic", not static)
        self._static_decode = static
        self._compiled_step = torch.compile(self.decoder.step, fullgraph=True, **options)
