"""LLaVA assembly: vision tower → projector → image features spliced into the text.

`LLaVA` is both the torch module and the user-facing model (`encode`, `logits`, `chat`,
`generate`). Every IMAGE_TOKEN in a prompt is replaced by that image's visual tokens;
beside the embeddings the assembly produces the token-type tensor (text / visual /
padding) that every decoder layer receives.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torch import Tensor, nn

from .clip import CLIPVisionTower
from .config import LlavaConfig, projector_depth
from .conversation import Template, Turn, get_template
from .errors import InputError
from .image import ImageProcessor, grid_shape, load_image, unpad_slices
from .llama import Decoder, KVCache
from .methods import VANILLA, Method, ShortV
from .ops import Linear
from .token_types import TYPE_DTYPE, TokenType
from .tokenizer import IMAGE_PLACEHOLDER, IMAGE_TOKEN, Tokenizer

if TYPE_CHECKING:
    from .generation import GenerationResult

ImageLike = Image.Image | str | os.PathLike


@dataclass(frozen=True)
class Encoded:
    """A tokenized prompt with its preprocessed images.

    input_ids: 1-D LongTensor of text ids with one IMAGE_TOKEN (-200) per image.
    images: per image, [3, S, S] ("pad"/"square") or [1 + tiles, 3, S, S] ("anyres").
    image_sizes: per image, the original (width, height).
    """

    input_ids: Tensor
    images: tuple[Tensor, ...] = ()
    image_sizes: tuple[tuple[int, int], ...] = ()
    prompt: str = ""

    def __post_init__(self) -> None:
        n = int((self.input_ids == IMAGE_TOKEN).sum())
        if n != len(self.images) or len(self.images) != len(self.image_sizes):
            raise InputError(
                f"the prompt has {n} image placeholder(s) but {len(self.images)} image(s) "
                f"and {len(self.image_sizes)} size(s) were given"
            )


@dataclass
class Prepared:
    """A batch ready for the decoder: embeddings, token types and RoPE positions, each
    left-padded to the longest sequence ([B, T, D] and [B, T])."""

    embeds: Tensor
    types: Tensor
    positions: Tensor
    lengths: list[int] = field(default_factory=list)


class Projector(nn.Sequential):
    """'linear' or 'mlpNx_gelu': Linear, then (GELU, Linear) × (N - 1)."""

    def __init__(self, kind: str, in_dim: int, out_dim: int, bias: bool = True) -> None:
        layers: list[nn.Module] = [Linear(in_dim, out_dim, bias=bias)]
        for _ in range(projector_depth(kind) - 1):
            layers += [nn.GELU(), Linear(out_dim, out_dim, bias=bias)]
        super().__init__(*layers)


class LLaVA(nn.Module):
    """A LLaVA-1.5 / LLaVA-NeXT model with ShortV, FastV and VTW built in.

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
        self.default_ranking: tuple[int, ...] = ()  # the zoo card's, for n_frozen
        self.checkpoint_dir: Path | None = None
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
        layers = list(layers)
        self.set_method(ShortV(tuple(layers)) if layers else VANILLA)

    def set_method(self, method: Method) -> None:
        """Switch between Vanilla(), ShortV(layers), FastV(k, r) and VTW(k)."""
        if not isinstance(method, Method):
            raise InputError(f"expected a shortv method (Vanilla, ShortV, FastV, VTW), got {method!r}")
        method.validate(self.num_layers)
        self.method = method

    # ---- placement ---------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.decoder.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.embed_tokens.weight.dtype

    # ---- images → visual tokens ----------------------------------------------------------

    def image_features(
        self, images: Sequence[Tensor], sizes: Sequence[tuple[int, int]]
    ) -> list[Tensor]:
        """Visual tokens [N_i, D] per image; all crops of all images in one tower call."""
        if not images:
            return []
        crops = [im if im.dim() == 4 else im[None] for im in images]
        pixels = torch.cat(crops).to(self.device, self.dtype)
        hidden = torch.cat(self.vision(pixels, self.config.vision_hidden_indices), dim=-1)
        if self.config.vision_select_feature == "patch":
            hidden = hidden[:, 1:]
        features = self.projector(hidden).split([c.shape[0] for c in crops])
        return [self._merge_crops(f, size) for f, size in zip(features, sizes, strict=True)]

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

    def prepare(self, batch: Sequence[Encoded]) -> Prepared:
        """Embeddings with visual tokens spliced in, token types and positions; sequences
        are left-padded to the longest (padding has type PAD)."""
        images = [im for e in batch for im in e.images]
        sizes = [s for e in batch for s in e.image_sizes]
        features = iter(self.image_features(images, sizes))
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

    def hidden_states(
        self,
        prepared: Prepared,
        *,
        cache: KVCache | None = None,
        method: Method | None = None,
        last_only: bool = False,
    ) -> Tensor:
        """Decoder output [B, T, D] for a prepared batch under `method` (the model's own
        by default). With `last_only` only the last position is valid."""
        return self.decoder(
            prepared.embeds, prepared.types, prepared.positions, cache=cache,
            method=self.method if method is None else method, last_only=last_only,
        )

    @torch.inference_mode()
    def logits(self, encoded: Encoded) -> Tensor:
        """Logits [T, vocab] for every position of the sequence after each image
        placeholder is expanded into that image's visual tokens."""
        prepared = self.prepare([encoded])
        return self.decoder.head(self.hidden_states(prepared))[0]

    def flops(self, encoded: Encoded) -> dict[str, object]:
        """Analytic decoder prefill FLOPs of this input under the current method, and the
        vanilla count (see `shortv.flops`). Runs the vision tower to place the tokens."""
        from .flops import sequence_flops

        with torch.inference_mode():
            types = self.prepare([encoded]).types[0].cpu()
        flops = sequence_flops(self.config.text, self.method, types)
        vanilla = sequence_flops(self.config.text, VANILLA, types)
        return {
            "tflops": flops / 1e12, "vanilla_tflops": vanilla / 1e12, "ratio": flops / vanilla,
            "method": self.method.describe(), "n_text": int((types == TokenType.TEXT).sum()),
            "n_visual": int((types == TokenType.VISUAL).sum()),
        }

    # ---- text side ----------------------------------------------------------------------------

    def encode(
        self,
        prompt: str,
        images: Sequence[ImageLike] | None = None,
        *,
        template: bool = True,
        history: Sequence[Turn] = (),
    ) -> Encoded:
        """Tokenize a prompt and preprocess its images (PIL images or file paths).

        template=True wraps the prompt (after any `history` of (user, reply) turns) in the
        model's conversation template; images without `<image>` placeholders in the
        conversation go at the start of its first user turn. template=False uses the
        prompt as is, and its placeholder count must match the images.
        """
        if self.tokenizer is None:
            raise InputError("this model has no tokenizer; load it with shortv.load(...)")
        pil = [to_pil(im) for im in images or ()]
        if template:
            turns = [*history, (prompt, None)]
            placed = sum(u.count(IMAGE_PLACEHOLDER) for u, _ in turns)
            if pil and placed == 0:
                first = turns[0]
                turns[0] = ((IMAGE_PLACEHOLDER + "\n") * len(pil) + first[0], first[1])
            text = self.template.render(turns)
        elif history:
            raise InputError("history needs template=True")
        else:
            text = prompt
        n = text.count(IMAGE_PLACEHOLDER)
        if n != len(pil):
            raise InputError(
                f"the prompt has {n} {IMAGE_PLACEHOLDER} placeholder(s) but {len(pil)} image(s) were given"
            )
        ids = torch.tensor(self.tokenizer.encode_prompt(text), dtype=torch.long)
        pixels = tuple(self.processor(im) for im in pil)
        return Encoded(ids, pixels, tuple(im.size for im in pil), text)

    def chat(
        self,
        prompt: str,
        images: Sequence[ImageLike] | None = None,
        *,
        history: Sequence[Turn] = (),
        max_new_tokens: int = 512,
        temperature: float = 0.0,
        top_p: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
        stream: bool = False,
    ) -> str | Iterator[str]:
        """Answer one prompt (optionally after `history`); a string, or an iterator of
        text pieces with stream=True."""
        from . import generation

        encoded = self.encode(prompt, images, history=history)
        options = generation.Options(max_new_tokens, temperature, top_p, seed, tuple(stop))
        if stream:
            return generation.stream(self, encoded, options)
        return generation.generate(self, [encoded], options)[0].text

    def generate(
        self,
        prompts: Sequence[str],
        images: Sequence[Sequence[ImageLike] | None] | None = None,
        *,
        max_new_tokens: int = 512,
        temperature: float = 0.0,
        top_p: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
        template: bool = True,
    ) -> list[str]:
        """Answer a batch of prompts (each with its own images); left-padded internally."""
        return [r.text for r in self.generate_results(
            prompts, images, max_new_tokens=max_new_tokens, temperature=temperature,
            top_p=top_p, seed=seed, stop=stop, template=template)]

    def generate_results(
        self,
        prompts: Sequence[str],
        images: Sequence[Sequence[ImageLike] | None] | None = None,
        *,
        max_new_tokens: int = 512,
        temperature: float = 0.0,
        top_p: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
        template: bool = True,
    ) -> list[GenerationResult]:
        """Like `generate`, with token ids and the reason each answer stopped."""
        from . import generation

        if isinstance(prompts, str):
            raise InputError("generate takes a list of prompts; use chat() for one")
        images = images if images is not None else [None] * len(prompts)
        if len(images) != len(prompts):
            raise InputError(f"{len(prompts)} prompts but {len(images)} image lists")
        batch = [self.encode(p, im, template=template) for p, im in zip(prompts, images, strict=True)]
        options = generation.Options(max_new_tokens, temperature, top_p, seed, tuple(stop))
        return generation.generate(self, batch, options)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, method={self.method.describe()}"


def to_pil(image: ImageLike) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    raise InputError(f"an image must be a PIL image or a file path, got {type(image).__name__}")
