"""The loaded model: what `shortv.load` returns, for every family.

`VisionLanguageModel` holds the torch module (a `VisionLanguageModule`: weights and
forward passes), the tokenizer, the image preprocessor, the conversation template and the
current method, and offers `encode`, `logits`, `chat` and `generate`. It is plain Python:
every tensor operation is the module's, called with the current method as an argument.
Every IMAGE_TOKEN in a prompt is replaced by that image's visual tokens. Generation
(`shortv.generate`) drives the model through `prefill` and `step` only (its
`GenerativeModel` protocol); `chat` and `generate` are conveniences over it.
`cache_features` turns on the vision-feature cache (off by default): an image seen before
then skips the vision tower. The data a batch is made of (`Encoded`, `Prepared`,
`DecodeState`) lives in `shortv.models.batch`.

A family's session (`shortv.llava.LLaVA`, `shortv.qwen_vl.QwenVL`) is a subclass that
says how its images are preprocessed.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, get_args

import torch
from PIL import Image
from torch import Tensor

from . import quantized_checkpoint
from .conversation import Template, Turn, get_template, place_images
from .errors import ConfigError, InputError
from .generate import GenerationOptions, GenerationResult, generate, stream
from .image import ImageSource, load_image
from .methods import VANILLA, Method, ShortV
from .models.assembly import VisionLanguageModule
from .models.batch import DecodeState, Encoded, Prepared
from .models.feature_cache import FeatureCache
from .models.quant import Quantization, quantization_of
from .models.taps import ActivationCache, HookFn, HookPoint, Taps
from .ranking import with_family_defaults
from .tokenizer import Tokenizer

# One image: a PIL image, a file path, an http(s) URL, or an image file's encoded bytes.
ImageLike = Image.Image | ImageSource
Images = ImageLike | Sequence[ImageLike] | None

# What encode() says when no tokenizer was attached.
NO_TOKENIZER = "no tokenizer was attached; load the model with shortv.load(...)"


class VisionLanguageModel:
    """A vision-language model with ShortV and the token-reduction methods built in.

    Build one with `shortv.load(...)`. `module` is the torch module (the weights); the
    tokenizer, template and method are this object's. Without a tokenizer it works on
    prepared inputs only (`missing_tokenizer` says why there is none). `processor` turns a
    PIL image into the module's image tensor.
    """

    def __init__(
        self,
        module: VisionLanguageModule,
        *,
        processor: Callable[[Image.Image], Tensor],
        tokenizer: Tokenizer | None = None,
        template: str | Template = "vicuna_v1",
        name: str = "",
        checkpoint_dir: Path | None = None,
        missing_tokenizer: str = NO_TOKENIZER,
    ) -> None:
        self.module = module
        self.tokenizer = tokenizer
        self.template = get_template(template) if isinstance(template, str) else template
        self.processor = processor
        self.name = name
        self.method: Method = VANILLA
        # Visual tokens of images seen before (`cache_features`); None: every image goes
        # through the tower.
        self.feature_cache: FeatureCache | None = None
        self.checkpoint_dir = checkpoint_dir
        # Why there is no tokenizer, when there is none (what encode() reports).
        self.missing_tokenizer = missing_tokenizer

    @staticmethod
    def cli_template(model_path: str) -> str:
        """The template `shortv chat` uses for a model without a zoo card and without
        --template: the one the family's own command-line tool picks for that path."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, method={self.method.describe()})"

    # ---- the module's facts ----------------------------------------------------------------

    @property
    def config(self) -> Any:
        """The module's config (LlavaConfig, QwenVLConfig, ...); `config.text` is the
        decoder's TextConfig."""
        return self.module.config

    @property
    def num_layers(self) -> int:
        return self.module.num_layers

    @property
    def device(self) -> torch.device:
        return self.module.device

    @property
    def dtype(self) -> torch.dtype:
        return self.module.dtype

    @property
    def quantization(self) -> Quantization | None:
        """The weight-only scheme of the language model's Linear layers (None: dense)."""
        return quantization_of(self.module)

    def save_quantized(self, directory: str | Path) -> Path:
        """Save this quantized model (loaded with `quantize=`) as a checkpoint directory that
        `shortv.load` reads back without quantizing again: the source's config and tokenizer
        files and one safetensors file of the quantized tensors (docs/quantization.md)."""
        return quantized_checkpoint.save(self, directory)

    # ---- methods ---------------------------------------------------------------------

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
        self.method = self.check_method(method)

    def check_method(self, method: Method) -> Method:
        """`method` fitted to this model's depth, or ConfigError / InputError when this
        model cannot run it (`set_method` and the server's per-request methods use it)."""
        if not isinstance(method, Method):
            raise InputError(f"expected a shortv method (e.g. shortv.Vanilla(), shortv.ShortV(layers), "
                             f"shortv.FastV()), got {method!r}")
        return with_family_defaults(self.module.config, method.for_layers(self.num_layers))

    def cache_features(self, max_mb: float | None = 512) -> VisionLanguageModel:
        """Keep the visual tokens of the images this model has seen, up to `max_mb` MiB on
        the model's device (least recently used out first), so that the same image again
        (the same pixels after preprocessing, however it was given) skips the vision tower
        and projector; answers do not change. None or 0 turns the cache off. A new call
        starts an empty cache. `feature_cache` holds it, with its hit and miss counts.
        Returns the model."""
        self.feature_cache = FeatureCache.of_mb(max_mb) if max_mb else None
        return self

    # ---- forward passes under the current method -------------------------------------------

    def prepare(self, batch: Sequence[Encoded], *, reduce_images: bool = True) -> Prepared:
        """The module's `prepare` (embeddings with visual tokens spliced in, token types,
        positions; left-padded) with the current method's image reduction, unless
        `reduce_images` is False, through the feature cache if it is on."""
        return self.module.prepare(batch, method=self.method if reduce_images else VANILLA,
                                   cache=self.feature_cache)

    def hidden_states(self, prepared: Prepared, *, method: Method | None = None) -> Tensor:
        """Decoder output [B, T, D] for a prepared batch under `method` (the current one
        by default)."""
        return self.module.hidden_states(prepared, self.method if method is None else method)

    # ---- layer internals: hook points in sequence coordinates (`models.taps`) ---------------

    @torch.inference_mode()
    def run_with_hooks(self, inputs: Encoded | Sequence[Encoded],
                       hooks: Mapping[tuple[str, int], HookFn]) -> Tensor:
        """Logits under the current method with `hooks` {(point, layer): fn} at the hook
        points (docs/internals.md): at each decoder layer resid_pre, attn_out, resid_mid,
        mlp_out, resid_post ([B, T, D] over the positions of the prepared batch) and
        attn_pattern ([B, H, T, T]); at each vision tower layer vision.resid_post; and
        projector_out (layer 0). fn(x, types) gets x and the token types [B, T]; a tensor
        it returns replaces x. One input: logits [T, vocab]; a list: [B, T, vocab],
        left-padded."""
        batch, one = _as_batch(inputs, "run_with_hooks")
        logits, _ = self._tapped(batch, Taps(hooks=self._hook_keys(hooks)))
        return logits[0] if one else logits

    @torch.inference_mode()
    def run_with_cache(self, inputs: Encoded | Sequence[Encoded], *,
                       names: Sequence[str] | None = None, layers: Sequence[int] | None = None,
                       hooks: Mapping[tuple[str, int], HookFn] | None = None,
                       device: torch.device | str | None = None,
                       dtype: torch.dtype | None = None,
                       queries: Sequence[int] | None = None) -> tuple[Tensor, ActivationCache]:
        """(logits, cache): `run_with_hooks` (with `hooks`, if any) that also keeps the
        tensors of the hook points `names` (by default the five residual points; also
        attn_pattern, vision.resid_post, kept at every tower layer, and projector_out, at
        layer 0) at the decoder `layers` (all by default), on `device`
        in `dtype` when given (e.g. "cpu", torch.float16). `queries`: the sequence
        positions (negative from the end) whose attn_pattern rows are kept, [B, H, Q, T]
        (all rows by default). Only what is asked is computed and kept. Logits as
        `run_with_hooks`; the cache always has a batch dimension."""
        batch, one = _as_batch(inputs, "run_with_cache")
        points = [_hook_point(name) for name in (names if names is not None else STREAM_POINTS)]
        ids = range(self.num_layers) if layers is None else [self._layer_id(layer) for layer in layers]
        keep = {(p, i) for p in points if p not in VISION_POINTS for i in ids}
        if HookPoint.VISION_RESID_POST in points:
            if not any(enc.images for enc in batch):
                raise InputError("vision.resid_post needs an input with an image")
            keep |= {(HookPoint.VISION_RESID_POST, i) for i in range(self.module.vision_depth)}
        if HookPoint.PROJECTOR_OUT in points:
            keep.add((HookPoint.PROJECTOR_OUT, 0))
        taps = Taps(hooks=self._hook_keys(hooks or {}), keep=frozenset(keep), device=device, dtype=dtype)
        logits, prepared = self._tapped(batch, taps, queries)
        kept = taps.kept
        cache = ActivationCache({k: v[0] for k, v in kept.items()}, {k: v[1] for k, v in kept.items()},
                                prepared.types.cpu() if device is None else prepared.types.to(device),
                                prepared.positions)
        return (logits[0] if one else logits), cache

    def _tapped(self, batch: list[Encoded], taps: Taps,
                queries: Sequence[int] | None = None) -> tuple[Tensor, Prepared]:
        """Logits [B, T, vocab] of `batch` under the current method with `taps` at the hook
        points (vision side included), and the prepared batch."""
        prepared = self.module.prepare(batch, method=self.method, cache=self.feature_cache, taps=taps)
        if queries is not None:
            taps.queries = _query_rows(queries, prepared.types.shape[1])
        return self.module.decoder.head(self.module.hidden_states(prepared, self.method, taps)), prepared

    def _hook_keys(self, hooks: Mapping[tuple[str, int], HookFn]) -> dict[tuple[HookPoint, int], HookFn]:
        out = {}
        for key, fn in hooks.items():
            if not (isinstance(key, tuple) and len(key) == 2):
                raise ConfigError(f"hook key {key!r} is not (point, layer), e.g. ('resid_post', 3)")
            if not callable(fn):
                raise ConfigError(f"hook {key!r} is not callable: give fn(x, types) -> tensor or None")
            point = _hook_point(key[0])
            out[point, self._point_layer(point, key[1])] = fn
        return out

    def _point_layer(self, point: HookPoint, layer: object) -> int:
        """`layer` checked for `point`: a decoder layer, a vision tower layer, or 0 for
        projector_out."""
        if point == HookPoint.PROJECTOR_OUT:
            if layer != 0 or isinstance(layer, bool):
                raise ConfigError(f"projector_out has one layer, 0; got {layer!r}")
            return 0
        if point == HookPoint.VISION_RESID_POST:
            depth = self.module.vision_depth
            if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < depth:
                raise ConfigError(f"vision layer {layer!r} is not in the vision tower's layers "
                                  f"0..{depth - 1}")
            return layer
        return self._layer_id(layer)

    def _layer_id(self, layer: object) -> int:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise ConfigError(f"layer {layer!r} is not a decoder layer; this model has layers "
                              f"0..{self.num_layers - 1}")
        return layer

    @torch.inference_mode()
    def logits(self, encoded: Encoded) -> Tensor:
        """Logits [T, vocab] for every position of the sequence after each image
        placeholder is expanded into that image's visual tokens."""
        _require_encoded(encoded, "logits")
        return self.module.decoder.head(self.hidden_states(self.prepare([encoded])))[0]

    def prefill(self, batch: Sequence[Encoded], *, max_new_tokens: int, into: DecodeState | None = None,
                slots: Sequence[int] | None = None) -> tuple[Tensor, DecodeState]:
        """Run the prompts (left-padded); next-token logits [B, vocab] and the state that
        `step` continues: a new one with a slot per prompt, sized for `max_new_tokens`
        more, or `into` (a `decode_state`) with prompt i written into its free slot
        `slots[i]`, beside the sequences already decoding there. When no new token fits
        the context, the decoder is not run (budget 0, logits empty)."""
        return self.module.prefill(batch, max_new_tokens=max_new_tokens, method=self.method,
                                   cache=self.feature_cache, into=into, slots=slots)

    def prefill_chunks(self, batch: Sequence[Encoded], *, max_new_tokens: int, chunk: int | None,
                       into: DecodeState | None = None, slots: Sequence[int] | None = None,
                       method: Method | None = None) -> Iterator[tuple[Tensor, DecodeState] | None]:
        """`prefill` in pieces of at most `chunk` positions (the module's `prefill_chunks`):
        None after each piece but the last, then `prefill`'s result. For a caller that has
        other work to do between the pieces (the server's decode steps). `method`: this
        prefill's, instead of the model's (one from `check_method`)."""
        return self.module.prefill_chunks(batch, max_new_tokens=max_new_tokens,
                                          method=self.method if method is None else method,
                                          cache=self.feature_cache, chunk=chunk, into=into, slots=slots)

    def decode_state(self, slots: int, capacity: int) -> DecodeState:
        """An empty `DecodeState` of `slots` sequences of up to `capacity` positions each
        (prompt and answer), its KV cache allocated now: `prefill(..., into=state,
        slots=...)` starts sequences in it, `state.free(slots)` ends them, and `step`
        advances the slots [0, B) together (continuous batching)."""
        return self.module.decode_state(slots, capacity)

    def step(self, state: DecodeState, tokens: Tensor) -> Tensor:
        """Feed one new token to each of the slots [0, B) of `state` (tokens [B]); next-token
        logits [B, vocab] (a free slot's row is meaningless). The step is the same for every
        method (each layer attends over what its slot holds, however the prefill filled
        it), so sequences prefilled under different methods may share it."""
        return self.module.step(state, tokens, self.method)

    def compile(self, *, static: bool | None = None, **options: Any) -> VisionLanguageModel:
        """Compile the module's decode step with torch.compile (`VisionLanguageModule.compile_step`:
        `static` and `options` are its). Returns the model; generation then gives the same
        tokens, faster once compiled."""
        self.module.compile_step(static=static, **options)
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

    def visual_boxes(self, encoded: Encoded) -> list[Tensor]:
        """Per image of `encoded`, the box (x0, y0, x1, y1) in its original pixels that each
        of its visual tokens sees, in the sequence's order: [n, 4] float64, NaN for a
        token that is no image region. The family says (`LLaVA`, `QwenVL`)."""
        raise InputError(f"{type(self).__name__} does not map its visual tokens to pixels")

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
            users = place_images([user for user, _ in turns], len(pil), self.template)
            replies = [reply for _, reply in turns]
            text = self.template.render(list(zip(users, replies, strict=True)))
        elif history:
            raise InputError("history needs template=True")
        else:
            text = prompt
        # The text marks each image with the tokenizer's marker (`<image>` for LLaVA); the
        # template writes that marker for each `<image>` of a conversation.
        marker = tokenizer.image_marker
        n = text.count(marker)
        if n != len(pil):
            raise InputError(f"the prompt has {n} {marker} placeholder(s) but {len(pil)} image(s) were given")
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
        hooks: Mapping[tuple[str, int], HookFn] | None = None,
        **sampling: Any,
    ) -> str | Iterator[str]:
        """Answer one prompt (optionally after `history` of (user, reply) turns): a string,
        or an iterator of text pieces with stream=True.

        Generation settings come from `options` and/or keyword arguments with the same
        names (`max_new_tokens`, `temperature`, `top_p`, `seed`, `stop`; see
        `shortv.GenerationOptions`); greedy by default. `hooks`: as `run_with_hooks`,
        firing at the prefill and at every decode step (on the new token, [B, 1, ...];
        attn_pattern: [B, H, 1, T] over the sequence so far, with its types [B, T]).
        """
        settings = GenerationOptions.of(options, **sampling)
        encoded = self.encode(prompt, images, history=history)
        runner = self._with_hooks(hooks)
        if stream:
            return _stream(runner, encoded, settings)
        return generate(runner, [encoded], settings)[0].text

    def generate(
        self,
        prompts: Sequence[str],
        images: Sequence[Images] | None = None,
        *,
        options: GenerationOptions | None = None,
        template: bool = True,
        hooks: Mapping[tuple[str, int], HookFn] | None = None,
        **sampling: Any,
    ) -> list[GenerationResult]:
        """Answer a batch of prompts, each with its own images (left-padded internally).

        Each result has the answer `text`, its `token_ids`, the `finish_reason` ("eos",
        "stop", "length") and `prompt_tokens`. Settings and `hooks` as in `chat`.
        """
        settings = GenerationOptions.of(options, **sampling)
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise InputError("generate takes a list of prompts; use chat() for one")
        images = images if images is not None else [None] * len(prompts)
        if isinstance(images, (str, os.PathLike, Image.Image)) or len(images) != len(prompts):
            raise InputError(f"{len(prompts)} prompts need a list of {len(prompts)} image lists")
        batch = [self.encode(p, im, template=template) for p, im in zip(prompts, images, strict=True)]
        return generate(self._with_hooks(hooks), batch, settings)

    def _with_hooks(self, hooks: Mapping[tuple[str, int], HookFn] | None) -> Any:
        """This model, or a view of it whose prefill and decode steps fire `hooks`."""
        if not hooks:
            return self
        taps = Taps(hooks=self._hook_keys(hooks))
        if self.module.compiled:
            warnings.warn("generation with hooks runs the decode step eager, not the compiled one",
                          stacklevel=3)
        return _Hooked(self, taps)


_stream = stream  # `chat`'s keyword argument of that name hides the function


class _Hooked:
    """A model whose prefill and decode steps fire hooks (`GenerativeModel`, for `generate`)."""

    def __init__(self, model: VisionLanguageModel, taps: Taps) -> None:
        self.model, self.taps = model, taps
        self.template = model.template

    @property
    def device(self) -> torch.device:
        return self.model.device

    def require_tokenizer(self) -> Tokenizer:
        return self.model.require_tokenizer()

    def prefill(self, batch: Sequence[Encoded], *, max_new_tokens: int) -> tuple[Tensor, DecodeState]:
        model = self.model
        return model.module.prefill(batch, max_new_tokens=max_new_tokens, method=model.method,
                                    cache=model.feature_cache, taps=self.taps)

    def step(self, state: DecodeState, tokens: Tensor) -> Tensor:
        return self.model.module.step(state, tokens, self.model.method, self.taps)


# What counts as one image rather than a list (bytes and memoryview are sequences of ints).
_ONE_IMAGE = (Image.Image, *get_args(ImageSource))


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
    if isinstance(image, _ONE_IMAGE):
        return load_image(image)
    raise InputError("an image must be a PIL image, a file path, an http(s) URL or the bytes "
                     f"of an image file, got {type(image).__name__}")


# The points outside the decoder layers (the vision tower's and the projector's).
VISION_POINTS = frozenset({HookPoint.VISION_RESID_POST, HookPoint.PROJECTOR_OUT})
# run_with_cache's default points: the residual stream and its updates (not attn_pattern).
STREAM_POINTS = [p for p in HookPoint if p != HookPoint.ATTN_PATTERN and p not in VISION_POINTS]


def _query_rows(queries: Sequence[int], length: int) -> Tensor:
    """`queries` (sequence positions, negative from the end) as indices into `length`."""
    rows = []
    for q in queries:
        if isinstance(q, bool) or not isinstance(q, int) or not -length <= q < length:
            raise ConfigError(f"query position {q!r} is not in the prepared input's {length} positions")
        rows.append(q % length)
    if not rows:
        raise ConfigError("queries=[] names no position; give positions, or None for every row")
    return torch.tensor(rows, dtype=torch.long)


def _hook_point(name: object) -> HookPoint:
    try:
        return HookPoint(name)
    except ValueError:
        raise ConfigError(f"unknown hook point {name!r}; use one of "
                          f"{', '.join(p.value for p in HookPoint)}") from None


def _as_batch(inputs: Encoded | Sequence[Encoded], what: str) -> tuple[list[Encoded], bool]:
    """`inputs` as a batch, and whether it was one input."""
    if isinstance(inputs, Encoded):
        return [inputs], True
    batch = list(inputs)
    if not batch:
        raise InputError(f"{what} needs at least one input")
    for item in batch:
        _require_encoded(item, what)
    return batch, False
