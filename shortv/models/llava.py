"""LLaVA's weights and forward passes: vision tower → projector → image features spliced
into the text → decoder.

`LlavaModel` is the torch module: it holds the weights and runs them; the method (ShortV,
FastV, ...) is an argument of every pass that depends on it, never state. Beside the
embeddings the assembly produces the token-type tensor (text / visual / padding) that
every decoder layer receives. The user-facing model (tokenizer, template, the current
method, `chat`, ...) is `shortv.llava.LLaVA`, which drives this module.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InputError
from ..methods import VANILLA, ImageView, Method
from ..ops import Linear
from ..token_types import TYPE_DTYPE, TokenType
from ..tokenizer import IMAGE_TOKEN
from .anyres import grid_shape, unpad_slices
from .batch import DecodeState, Encoded, Prepared
from .clip import CLIPVisionTower
from .config import LlavaConfig, projector_depth
from .llama import Decoder, KVCache
from .protocols import LanguageModel, VisionTower

# torch.compile modes that record CUDA graphs, which need the static KV cache.
CUDA_GRAPH_MODES = frozenset({"reduce-overhead", "max-autotune"})


class Projector(nn.Sequential):
    """'linear' or 'mlpNx_gelu': Linear, then (GELU, Linear) × (N - 1)."""

    def __init__(self, kind: str, in_dim: int, out_dim: int, bias: bool = True) -> None:
        layers: list[nn.Module] = [Linear(in_dim, out_dim, bias=bias)]
        for _ in range(projector_depth(kind) - 1):
            layers += [nn.GELU(), Linear(out_dim, out_dim, bias=bias)]
        super().__init__(*layers)


class LlavaModel(nn.Module):
    """The modules of a LLaVA-1.5 / LLaVA-NeXT model and its forward passes, with ShortV
    and the token-reduction methods built in (each pass takes the method to run).

    Its parts follow `shortv.models.protocols`: a CLIP `VisionTower`, a Llama
    `LanguageModel`, and the model itself is LLaVA's `Assembler` (`prepare`)."""

    def __init__(self, config: LlavaConfig) -> None:
        super().__init__()
        self.config = config
        self.vision: VisionTower = CLIPVisionTower(config.vision, depth=config.vision_depth)
        self.projector = Projector(
            config.projector, config.vision_feature_size, config.text.hidden_size,
            bias=config.projector_bias,
        )
        if config.uses_image_newline:
            self.image_newline = nn.Parameter(torch.empty(config.text.hidden_size))
        else:
            self.image_newline = None
        self.decoder: LanguageModel = Decoder(config.text)
        self._compiled_step: Any = None  # set by compile_step()
        self._static_decode = False  # decode steps on a static cache (compile_step(static=True))
        self.eval()

    @property
    def num_layers(self) -> int:
        return self.config.text.layers

    @property
    def device(self) -> torch.device:
        return self.decoder.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.embed_tokens.weight.dtype

    # ---- images → visual tokens ----------------------------------------------------------

    def image_features(
        self, images: Sequence[Tensor], sizes: Sequence[tuple[int, int]], *, method: Method = VANILLA
    ) -> list[Tensor]:
        """Visual tokens [N_i, D] per image; all crops of all images in one tower call,
        after `method`'s image reduction (VisionZip), if it has one."""
        if not images:
            return []
        crops = [im if im.dim() == 4 else im[None] for im in images]
        pixels = torch.cat(crops).to(self.device, self.dtype)
        counts = [c.shape[0] for c in crops]
        if method.reduces_images:
            return self._reduced_image_features(pixels, counts, sizes, method)
        hidden = torch.cat(self.vision(pixels, self.config.vision_hidden_indices).hidden_states, dim=-1)
        if self.config.vision_select_feature == "patch":
            hidden = hidden[:, 1:]
        features = self.projector(hidden).split(counts)
        return [self._merge_crops(f, size) for f, size in zip(features, sizes, strict=True)]

    def _reduced_image_features(self, pixels: Tensor, counts: list[int],
                                sizes: Sequence[tuple[int, int]], method: Method) -> list[Tensor]:
        """Visual tokens per image after the method's `reduce_image` (VisionZip), which
        sees each image's crops at the select layer with that layer's class-token
        attention and keys. The reduced tokens of an image's crops are concatenated in
        crop order (there is no grid left to unpad). An image whose every patch the
        method keeps (`Method.keeps_image`: a full budget) is vanilla's tokens."""
        if self.config.vision_select_feature != "patch" or len(self.config.vision_hidden_indices) != 1:
            raise InputError(f"{method.describe()} needs a tower read at one layer without the "
                             "class token (select_feature 'patch')")
        tower = self.vision(pixels, self.config.vision_hidden_indices, class_attention=True)
        if tower.attention is None or tower.keys is None:
            raise InputError(f"{method.describe()} needs a tower read at a layer's output, not at "
                             "its embeddings (vision_select_layer 0)")
        (hidden,) = tower.hidden_states
        cls_attention, keys = tower.attention[..., 1:], tower.keys[:, :, 1:]
        out = []
        for h, a, k, size in zip(hidden.split(counts), cls_attention.split(counts), keys.split(counts),
                                 sizes, strict=True):
            patches = h[:, 1:]
            if method.keeps_image(patches.shape[0] * patches.shape[1]):
                out.append(self._merge_crops(self.projector(patches), size))
                continue
            reduced = method.reduce_image(ImageView(patches, a, k, cls_features=h[:, 0]))
            out.append(self.projector(reduced).flatten(0, 1))
        return out

    def _merge_crops(self, feats: Tensor, size: tuple[int, int]) -> Tensor:
        """One image's crop features [C, P, D] as a token sequence, the original's way."""
        c = self.config
        # The original merges crops only for anyres; "pad"/"square" images are one crop.
        if c.patch_merge_type == "flat" or c.image_aspect_ratio != "anyres":
            return feats.flatten(0, 1)
        unpad = c.patch_merge_type == "spatial_unpad"
        if feats.shape[0] == 1:
            return torch.cat((feats[0], self.image_newline[None])) if unpad else feats[0]
        side = c.vision.patches_per_side
        cols, rows = grid_shape(size, c.image_grid_pinpoints, c.vision.image_size)
        base, tiles = feats[0], feats[1:]
        if tiles.shape[0] != rows * cols:
            raise InputError(
                f"image of size {size} was cut into {tiles.shape[0]} tiles but the grid needs "
                f"{rows}x{cols}; preprocess it with this model's encode()"
            )
        grid = tiles.view(rows, cols, side, side, -1)
        if not unpad:
            return torch.cat((base, grid.permute(0, 2, 1, 3, 4).flatten(0, 3)))
        # One feature map [rows*side, cols*side, D], cropped back to the image's aspect,
        # with image_newline closing every row.
        fmap = grid.permute(0, 2, 1, 3, 4).reshape(rows * side, cols * side, -1)
        row_slice, col_slice = unpad_slices(size, rows * side, cols * side)
        fmap = fmap[row_slice, col_slice]
        newline = self.image_newline.expand(fmap.shape[0], 1, -1)
        return torch.cat((base, torch.cat((fmap, newline), dim=1).flatten(0, 1)))

    # ---- assembly --------------------------------------------------------------------------

    def prepare(self, batch: Sequence[Encoded], *, method: Method = VANILLA) -> Prepared:
        """Embeddings with visual tokens spliced in, token types and positions; sequences
        are left-padded to the longest (padding has type PAD). The images' visual tokens
        are `method`'s (reduced by it, if it reduces images)."""
        images = [im for e in batch for im in e.images]
        sizes = [s for e in batch for s in e.image_sizes]
        features = iter(self.image_features(images, sizes, method=method))
        embeds, types = [], []
        for e in batch:
            x, t = self._splice(e.input_ids.to(self.device), features)
            embeds.append(x)
            types.append(t)
        return self._left_pad(embeds, types)

    def _splice(self, ids: Tensor, features: Iterator[Tensor]) -> tuple[Tensor, Tensor]:
        if ids.dim() != 1:
            raise InputError(f"input_ids must be 1-D, got shape {tuple(ids.shape)}")
        vocab = self.config.text.vocab_size
        text = ids[ids != IMAGE_TOKEN]
        if text.numel() and (int(text.min()) < 0 or int(text.max()) >= vocab):
            raise InputError(f"token ids must lie in [0, {vocab}) apart from IMAGE_TOKEN={IMAGE_TOKEN}")
        embeds = self.decoder.embed_tokens(ids.clamp(min=0))
        where = (ids == IMAGE_TOKEN).nonzero().flatten().tolist()
        parts, kinds, start = [], [], 0
        for at in where:
            feat = next(features)
            parts += [embeds[start:at], feat.to(embeds.dtype)]
            kinds += [(TokenType.TEXT, at - start), (TokenType.VISUAL, feat.shape[0])]
            start = at + 1
        parts.append(embeds[start:])
        kinds.append((TokenType.TEXT, len(ids) - start))
        types = torch.cat([torch.full((n,), int(k), dtype=TYPE_DTYPE) for k, n in kinds])
        return torch.cat(parts), types.to(self.device)

    def _left_pad(self, embeds: list[Tensor], types: list[Tensor]) -> Prepared:
        lengths = [x.shape[0] for x in embeds]
        limit = self.config.text.max_position_embeddings
        if max(lengths) > limit:
            raise InputError(
                f"the sequence has {max(lengths)} tokens after expanding images, more than "
                f"the model's context of {limit}; shorten the prompt or use fewer/smaller images"
            )
        b, t, d = len(embeds), max(lengths), embeds[0].shape[1]
        x = embeds[0].new_zeros(b, t, d)
        ty = torch.full((b, t), int(TokenType.PAD), dtype=TYPE_DTYPE, device=self.device)
        pos = torch.zeros(b, t, dtype=torch.long, device=self.device)
        for i, (e, k) in enumerate(zip(embeds, types, strict=True)):
            n = e.shape[0]
            x[i, t - n:] = e
            ty[i, t - n:] = k
            pos[i, t - n:] = torch.arange(n, device=self.device)
        return Prepared(x, ty, pos, lengths)


    # ---- forward passes ---------------------------------------------------------------------

    def hidden_states(self, prepared: Prepared, method: Method) -> Tensor:
        """Decoder output [B, T, D] for a prepared batch under `method`."""
        return self.decoder(prepared.embeds, prepared.types, prepared.positions, method=method)

    @torch.inference_mode()
    def prefill(self, batch: Sequence[Encoded], *, max_new_tokens: int,
                method: Method) -> tuple[Tensor, DecodeState]:
        """Run the prompts (left-padded) under `method` into a fresh KV cache sized for
        `max_new_tokens` more; next-token logits [B, vocab] and the state that `step`
        continues. When no new token fits the context, the decoder is not run (budget 0,
        logits empty)."""
        prepared = self.prepare(batch, method=method)
        b, t = prepared.types.shape
        context = self.config.text.max_position_embeddings
        budget = max(0, min(max_new_tokens, context - max(prepared.lengths)))
        cache = KVCache(self.num_layers, capacity=t + budget)
        positions = torch.tensor(prepared.lengths, device=self.device)[:, None]
        state = DecodeState(cache, positions, prepared.lengths, budget)
        if budget == 0:
            return prepared.embeds.new_empty(b, 0), state
        hidden = self.decoder(prepared.embeds, prepared.types, prepared.positions, cache=cache,
                              method=method, last_only=True)
        if self._static_decode:
            cache.make_static()
        return self.decoder.head(hidden[:, -1]), state

    @torch.inference_mode()
    def step(self, state: DecodeState, tokens: Tensor, method: Method) -> Tensor:
        """Feed one new token per sequence (tokens [B]) under `method`; next-token logits
        [B, vocab]. Runs the compiled decode step once `compile_step` made one."""
        if self._static_decode and not state.cache.static:
            state.cache.make_static()  # a joined or selected state starts dynamic
        decode = self._compiled_step or self.decoder.step
        logits = decode(tokens, state.positions, state.cache, method)
        state.positions = state.positions + 1
        return logits

    def compile_step(self, *, static: bool | None = None, **options: Any) -> None:
        """Compile the decode step (`Decoder.step`) with torch.compile, as one graph
        (fullgraph: it reads nothing back to the host); the prefill stays eager. `options`
        go to torch.compile.

        `static`: decode on a static KV cache (`KVCache.make_static`): every step has the
        same shapes, so one graph serves every step and CUDA graphs can replay it. The
        default is static for the modes that use CUDA graphs ("reduce-overhead", the
        default mode on CUDA, and "max-autotune"); otherwise the cache is read up to its
        current length and the graph is compiled for dynamic shapes, which costs less
        attention on short answers.
        """
        if self.device.type == "cuda":
            options.setdefault("mode", "reduce-overhead")
        if static is None:
            static = options.get("mode") in CUDA_GRAPH_MODES
        options.setdefault("dynamic", not static)
        self._static_decode = static
        self._compiled_step = torch.compile(self.decoder.step, fullgraph=True, **options)
