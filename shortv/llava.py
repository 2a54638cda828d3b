"""LLaVA assembly: vision tower → projector → image features spliced into the text.

`LLaVA` is both the torch module and the user-facing model (`encode`, `logits`, `chat`,
`generate`). Every IMAGE_TOKEN in a prompt is replaced by that image's visual tokens;
beside the embeddings the assembly produces the token-type tensor (text / visual /
padding) that every decoder layer receives. Generation (`shortv.generate`) drives the
model through `prefill` and `step` only (its `GenerativeModel` protocol, which `LLaVA`
implements); `chat` and `generate` are conveniences over it. The data a batch is made of
(`Encoded`, `Prepared`, `DecodeState`) lives in `shortv.batch`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from .batch import DecodeState, Encoded, Prepared
from .clip import CLIPVisionTower
from .config import LlavaConfig, projector_depth
from .conversation import Template, Turn, get_template, place_images
from .errors import InputError
from .generate import GenerationOptions, GenerationResult, generate, stream
from .image import ImageProcessor, grid_shape, load_image, unpad_slices
from .llama import Decoder, KVCache
from .methods import VANILLA, ImageView, Method, ShortV
from .ops import Linear
from .token_types import TYPE_DTYPE, TokenType
from .tokenizer import IMAGE_PLACEHOLDER, IMAGE_TOKEN, Tokenizer

# torch.compile modes that record CUDA graphs, which need the static KV cache.
CUDA_GRAPH_MODES = frozenset({"reduce-overhead", "max-autotune"})

# One image: a PIL image, a file path, an http(s) URL, or an image file's encoded bytes.
ImageLike = Image.Image | str | os.PathLike | bytes
Images = ImageLike | Sequence[ImageLike] | None


class Projector(nn.Sequential):
    """'linear' or 'mlpNx_gelu': Linear, then (GELU, Linear) × (N - 1)."""

    def __init__(self, kind: str, in_dim: int, out_dim: int, bias: bool = True) -> None:
        layers: list[nn.Module] = [Linear(in_dim, out_dim, bias=bias)]
        for _ in range(projector_depth(kind) - 1):
            layers += [nn.GELU(), Linear(out_dim, out_dim, bias=bias)]
        super().__init__(*layers)


class LLaVA(nn.Module):
    """A LLaVA-1.5 / LLaVA-NeXT model with ShortV and the token-reduction methods built in.

    Build one with `shortv.load(...)`. The tokenizer and conversation template are
    attached by the loader; the module works without them on prepared inputs.
    """

    def __init__(
        self,
        config: LlavaConfig,
        *,
        tokenizer: Tokenizer | None = None,
        template: str | Template = "vicuna_v1",
        name: str = "",
    ) -> None:
        super().__init__()
        self.config = config
        self.vision = CLIPVisionTower(config.vision, depth=config.vision_depth)
        self.projector = Projector(
            config.projector, config.vision_feature_size, config.text.hidden_size,
            bias=config.projector_bias,
        )
        if config.uses_image_newline:
            self.image_newline = nn.Parameter(torch.empty(config.text.hidden_size))
        else:
            self.image_newline = None
        self.decoder = Decoder(config.text)
        self.tokenizer = tokenizer
        self.template = get_template(template) if isinstance(template, str) else template
        self.processor = ImageProcessor.for_config(config)
        self.name = name
        self.method: Method = VANILLA
        self.checkpoint_dir: Path | None = None
        self._compiled_step: Any = None  # set by compile()
        self._static_decode = False  # decode steps on a static cache (compile(static=True))
        # Why there is no tokenizer, when there is none (what encode() reports).
        self.missing_tokenizer = "no tokenizer was attached; load the model with shortv.load(...)"
        self.eval()

    # ---- methods ---------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return self.config.text.layers

    @property
    def frozen_layers(self) -> tuple[int, ...]:
        """Layers in which visual tokens are frozen (ShortV); () for other methods."""
        return self.method.layers if isinstance(self.method, ShortV) else ()

    def set_frozen_layers(self, layers: Sequence[int]) -> None:
        """Freeze visual tokens in exactly these layers (ShortV); () restores vanilla."""
        method = ShortV(tuple(layers) if isinstance(layers, Sequence) else layers)
        self.set_method(method if method.layers else VANILLA)

    def set_method(self, method: Method) -> None:
        """Switch to another method: Vanilla(), ShortV(layers), FastV, VTW, PDrop, VisionZip,
        DART, SparseVLM, or a composition (`shortv.compose`)."""
        if not isinstance(method, Method):
            raise InputError(f"expected a shortv method (e.g. shortv.Vanilla(), shortv.ShortV(layers), "
                             f"shortv.FastV()), got {method!r}")
        self.method = method.for_layers(self.num_layers)

    # ---- placement ---------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.decoder.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.embed_tokens.weight.dtype

    # ---- images → visual tokens ----------------------------------------------------------

    def image_features(
        self, images: Sequence[Tensor], sizes: Sequence[tuple[int, int]], *, reduce: bool = True
    ) -> list[Tensor]:
        """Visual tokens [N_i, D] per image; all crops of all images in one tower call.
        `reduce`: apply the method's image reduction (VisionZip), if it has one."""
        if not images:
            return []
        crops = [im if im.dim() == 4 else im[None] for im in images]
        pixels = torch.cat(crops).to(self.device, self.dtype)
        counts = [c.shape[0] for c in crops]
        if reduce and self.method.reduces_images:
            return self._reduced_image_features(pixels, counts, sizes)
        hidden = torch.cat(self.vision(pixels, self.config.vision_hidden_indices).hidden_states, dim=-1)
        if self.config.vision_select_feature == "patch":
            hidden = hidden[:, 1:]
        features = self.projector(hidden).split(counts)
        return [self._merge_crops(f, size) for f, size in zip(features, sizes, strict=True)]

    def _reduced_image_features(self, pixels: Tensor, counts: list[int],
                                sizes: Sequence[tuple[int, int]]) -> list[Tensor]:
        """Visual tokens per image after the method's `reduce_image` (VisionZip), which
        sees each image's crops at the select layer with that layer's class-token
        attention and keys. The reduced tokens of an image's crops are concatenated in
        crop order (there is no grid left to unpad). An image whose every patch the
        method keeps (`Method.keeps_image`: a full budget) is vanilla's tokens."""
        if self.config.vision_select_feature != "patch" or len(self.config.vision_hidden_indices) != 1:
            raise InputError(f"{self.method.describe()} needs a tower read at one layer without the "
                             "class token (select_feature 'patch')")
        tower = self.vision(pixels, self.config.vision_hidden_indices, class_attention=True)
        if tower.attention is None or tower.keys is None:
            raise InputError(f"{self.method.describe()} needs a tower read at a layer's output, not at "
                             "its embeddings (vision_select_layer 0)")
        (hidden,) = tower.hidden_states
        cls_attention, keys = tower.attention[..., 1:], tower.keys[:, :, 1:]
        out = []
        for h, a, k, size in zip(hidden.split(counts), cls_attention.split(counts), keys.split(counts),
                                 sizes, strict=True):
            patches = h[:, 1:]
            if self.method.keeps_image(patches.shape[0] * patches.shape[1]):
                out.append(self._merge_crops(self.projector(patches), size))
                continue
            reduced = self.method.reduce_image(ImageView(patches, a, k, cls_features=h[:, 0]))
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

    def prepare(self, batch: Sequence[Encoded], *, reduce_images: bool = True) -> Prepared:
        """Embeddings with visual tokens spliced in, token types and positions; sequences
        are left-padded to the longest (padding has type PAD). `reduce_images`: apply the
        method's image reduction, if any."""
        images = [im for e in batch for im in e.images]
        sizes = [s for e in batch for s in e.image_sizes]
        features = iter(self.image_features(images, sizes, reduce=reduce_images))
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

    def hidden_states(self, prepared: Prepared, *, method: Method | None = None) -> Tensor:
        """Decoder output [B, T, D] for a prepared batch under `method` (the model's own
        by default)."""
        return self.decoder(prepared.embeds, prepared.types, prepared.positions,
                            method=self.method if method is None else method)

    @torch.inference_mode()
    def logits(self, encoded: Encoded) -> Tensor:
        """Logits [T, vocab] for every position of the sequence after each image
        placeholder is expanded into that image's visual tokens."""
        _require_encoded(encoded, "logits")
        return self.decoder.head(self.hidden_states(self.prepare([encoded])))[0]

    @torch.inference_mode()
    def prefill(self, batch: Sequence[Encoded], *, max_new_tokens: int) -> tuple[Tensor, DecodeState]:
        """Run the prompts (left-padded) into a fresh KV cache sized for `max_new_tokens`
        more; next-token logits [B, vocab] and the state that `step` continues. When no new
        token fits the context, the decoder is not run (budget 0, logits empty)."""
        prepared = self.prepare(batch)
        b, t = prepared.types.shape
        context = self.config.text.max_position_embeddings
        budget = max(0, min(max_new_tokens, context - max(prepared.lengths)))
        cache = KVCache(self.num_layers, capacity=t + budget)
        positions = torch.tensor(prepared.lengths, device=self.device)[:, None]
        state = DecodeState(cache, positions, prepared.lengths, budget)
        if budget == 0:
            return prepared.embeds.new_empty(b, 0), state
        hidden = self.decoder(prepared.embeds, prepared.types, prepared.positions, cache=cache,
                              method=self.method, last_only=True)
        if self._static_decode:
            cache.make_static()
        return self.decoder.head(hidden[:, -1]), state

    @torch.inference_mode()
    def step(self, state: DecodeState, tokens: Tensor) -> Tensor:
        """Feed one new token per sequence (tokens [B]); next-token logits [B, vocab]."""
        if self._static_decode and not state.cache.static:
            state.cache.make_static()  # a joined or selected state starts dynamic
        decode = self._compiled_step or self.decoder.step
        logits = decode(tokens, state.positions, state.cache, self.method)
        state.positions = state.positions + 1
        return logits

    def compile(self, *, static: bool | None = None, **options: Any) -> LLaVA:
        """Compile the decode step (`Decoder.step`) with torch.compile, as one graph
        (fullgraph: it reads nothing back to the host); the prefill stays eager. `options`
        go to torch.compile. Returns the model; generation then gives the same tokens,
        faster once compiled.

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
        return self

    def token_types(self, encoded: Encoded, *, reduce_images: bool = True) -> Tensor:
        """The token types [T] of one input after image expansion (runs the vision tower,
        since anyres images have a size-dependent number of tokens), and after the
        method's image reduction unless `reduce_images` is False."""
        with torch.inference_mode():
            return self.prepare([encoded], reduce_images=reduce_images).types[0].cpu()

    def flops(self, encoded: Encoded) -> dict[str, Any]:
        """Analytic decoder prefill FLOPs of this input under the current method next to
        vanilla (`shortv.flops.input_flops`)."""
        from .flops import input_flops

        types = self.token_types(encoded)
        full = self.token_types(encoded, reduce_images=False) if self.method.reduces_images else types
        return input_flops(self.config.text, self.method, types, vanilla_types=full)

    # ---- text side ----------------------------------------------------------------------------

    def require_tokenizer(self) -> Tokenizer:
        """The tokenizer, or InputError saying why there is none."""
        if self.tokenizer is None:
            raise InputError(f"this model cannot tokenize text: {self.missing_tokenizer}")
        return self.tokenizer

    def encode(
        self,
        prompt: str,
        images: Images = None,
        *,
        template: bool = True,
        history: Sequence[Turn] = (),
    ) -> Encoded:
        """Tokenize a prompt and preprocess its images (one image or a list; each a PIL
        image, a file path, an http(s) URL, or the bytes of an image file).

        template=True wraps the prompt (after any `history` of (user, reply) turns) in the
        model's conversation template; images without `<image>` placeholders in the
        conversation go at the start of its first user turn. template=False uses the
        prompt as is, and its placeholder count must match the images.
        """
        tokenizer = self.require_tokenizer()
        if not isinstance(prompt, str):
            raise InputError(f"the prompt must be a string, got {type(prompt).__name__}")
        pil = [to_pil(im) for im in image_list(images)]
        if template:
            turns = [*_turns(history), (prompt, None)]
            users = place_images([user for user, _ in turns], len(pil))
            replies = [reply for _, reply in turns]
            text = self.template.render(list(zip(users, replies, strict=True)))
        elif history:
            raise InputError("history needs template=True")
        else:
            text = prompt
        n = text.count(IMAGE_PLACEHOLDER)
        if n != len(pil):
            raise InputError(
                f"the prompt has {n} {IMAGE_PLACEHOLDER} placeholder(s) but {len(pil)} image(s) were given"
            )
        ids = torch.tensor(tokenizer.encode_prompt(text), dtype=torch.long)
        pixels = tuple(self.processor(im) for im in pil)
        return Encoded(ids, pixels, tuple(im.size for im in pil), text)

    def chat(
        self,
        prompt: str,
        images: Images = None,
        *,
        history: Sequence[Turn] = (),
        options: GenerationOptions | None = None,
        stream: bool = False,
        **sampling: Any,
    ) -> str | Iterator[str]:
        """Answer one prompt (optionally after `history` of (user, reply) turns): a string,
        or an iterator of text pieces with stream=True.

        Generation settings come from `options` and/or keyword arguments with the same
        names (`max_new_tokens`, `temperature`, `top_p`, `seed`, `stop`; see
        `shortv.GenerationOptions`); greedy by default.
        """
        settings = GenerationOptions.of(options, **sampling)
        encoded = self.encode(prompt, images, history=history)
        if stream:
            return _stream(self, encoded, settings)
        return generate(self, [encoded], settings)[0].text

    def generate(
        self,
        prompts: Sequence[str],
        images: Sequence[Images] | None = None,
        *,
        options: GenerationOptions | None = None,
        template: bool = True,
        **sampling: Any,
    ) -> list[GenerationResult]:
        """Answer a batch of prompts, each with its own images (left-padded internally).

        Each result has the answer `text`, its `token_ids`, the `finish_reason` ("eos",
        "stop", "length") and `prompt_tokens`. Settings as in `chat`.
        """
        settings = GenerationOptions.of(options, **sampling)
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise InputError("generate takes a list of prompts; use chat() for one")
        images = images if images is not None else [None] * len(prompts)
        if isinstance(images, (str, os.PathLike, Image.Image)) or len(images) != len(prompts):
            raise InputError(f"{len(prompts)} prompts need a list of {len(prompts)} image lists")
        batch = [self.encode(p, im, template=template) for p, im in zip(prompts, images, strict=True)]
        return generate(self, batch, settings)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, method={self.method.describe()}"


_stream = stream  # `chat`'s keyword argument of that name hides the function


# What counts as one image rather than a list (bytes and memoryview are sequences of ints).
_ONE_IMAGE = (Image.Image, str, os.PathLike, bytes, bytearray, memoryview)


def image_list(images: Images) -> list[ImageLike]:
    """One image (PIL image, path, URL or encoded bytes), or a list of them, as a list."""
    if images is None:
        return []
    if isinstance(images, _ONE_IMAGE):
        return [images]
    if isinstance(images, Sequence):
        return list(images)
    raise InputError("images must be an image (PIL image, file path, http(s) URL or image bytes) "
                     f"or a list of them, got {type(images).__name__}")


def _require_encoded(encoded: Any, method: str) -> None:
    """InputError when `encoded` is not an Encoded (a raw prompt string, most likely)."""
    if not isinstance(encoded, Encoded):
        raise InputError(f"{method} takes an Encoded (from model.encode(...)), got "
                         f"{type(encoded).__name__}; call model.{method}(model.encode(text, images))")


def _turns(history: Sequence[Turn]) -> list[Turn]:
    """History as (user, reply) pairs of strings, or InputError."""
    if isinstance(history, str) or not isinstance(history, Sequence):
        raise InputError("history must be a list of (user message, reply) pairs")
    for turn in history:
        if (not isinstance(turn, (tuple, list)) or len(turn) != 2
                or not all(isinstance(t, str) for t in turn)):
            raise InputError(f"history must be (user message, reply) pairs of strings, got {turn!r}")
    return [(u, r) for u, r in history]


def to_pil(image: ImageLike) -> Image.Image:
    """A PIL image from a PIL image, a file path, an http(s) URL (fetched, `load_image`) or
    the encoded bytes of an image file (PNG, JPEG, ...)."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)):
        return load_image(image)
    raise InputError("an image must be a PIL image, a file path, an http(s) URL or the bytes "
                     f"of an image file, got {type(image).__name__}")
