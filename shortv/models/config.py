"""Model configuration as plain dataclasses, and parsing of both published config.json layouts.

Two layouts exist (docs/design.md §4):
- *original* LLaVA (`LlavaLlamaForCausalLM`): Llama fields at the top level plus `mm_*` fields;
  the vision tower's config lives in the `mm_vision_tower` repo.
- *transformers* (`LlavaForConditionalGeneration`, `LlavaNextForConditionalGeneration`):
  nested `text_config` / `vision_config`, which transformers may save sparsely (only
  non-default values), so the defaults below are transformers' defaults.

Grid pinpoints are read as (width, height) and searched in list order in both layouts, as
original LLaVA-NeXT does (transformers reads its copy as (height, width), which only
changes tie-breaks for the symmetric lists published checkpoints use).

Every value is validated when a config is built (parsed or constructed in code): its type,
its range, and how fields fit together. A config.json is input, not trusted code: no
value may reach a constructor as a raw ZeroDivisionError or RuntimeError, nor make
building the model allocate without bound, so each refusal is a ConfigError naming the
field as config.json spells it. Whether the sizes also agree with the weights is checked
against the checkpoint's headers by `checkpoint.check_config_against_checkpoint`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# LLaVA-NeXT's grid pinpoints, (width, height) each, in the order the original searches them.
LLAVA_NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))

# LLaVA-NeXT-34B (Nous-Hermes-2-Yi-34B, a Llama architecture) is an LlavaLlamaForCausalLM too;
# LLaVA-NeXT-Mistral-7B is an LlavaMistralForCausalLM (model_type llava_mistral).
ORIGINAL_ARCHITECTURES = ("LlavaLlamaForCausalLM", "LlavaMistralForCausalLM")
ORIGINAL_MODEL_TYPES = ("llava_llama", "llava_mistral")
TRANSFORMERS_ARCHITECTURES = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration")

PROJECTOR_TYPES_HELP = "'linear' or 'mlpNx_gelu' (N >= 1)"
ASPECT_RATIOS = ("pad", "anyres", "square")
MERGE_TYPES = ("flat", "spatial", "spatial_unpad")
SELECT_FEATURES = ("patch", "cls_patch")
VISION_ACTIVATIONS = ("quick_gelu", "gelu")  # what clip.ACTIVATIONS implements

# The decoder fields the original layout keeps at its top level. Unlike transformers'
# text_config, which may be saved sparsely against LlamaConfig's defaults, an original
# LLaVA config.json always writes them, so a missing one means a broken file, not a default.
ORIGINAL_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "vocab_size")

# Upper bounds, far above any published LLaVA / Llama / CLIP model (Llama-3-405B: hidden
# 16384, MLP 53248, 126 layers, 128 heads; vocabularies up to 262144), so that no config
# can make building the model (one module per layer, even on the meta device) or
# preparing an image grow without limit.
MAX_LAYERS = 1024
MAX_WIDTH = 1 << 16
MAX_MLP = 1 << 20
MAX_VOCAB = 1 << 21
MAX_HEADS = 1 << 12
MAX_HEAD_DIM = 1 << 12
MAX_POSITIONS = 1 << 24
MAX_IMAGE_SIZE = 1 << 12
MAX_PINPOINT = 1 << 13  # a side of an anyres grid resolution, in pixels
MAX_PINPOINTS = 1024
MAX_PROJECTOR_DEPTH = 64
MAX_SELECT_LAYERS = 64
MAX_TOKEN_ID = 1 << 31


# ---------------------------------------------------------------------------------------
# Reading single values (types) and checking them (ranges). Messages name the field as
# config.json spells it, and show at most a short excerpt of a bad value.


def _as_layers(key: str, value: Any) -> tuple[int, ...]:
    layers = value if isinstance(value, (list, tuple)) else [value]
    if not 1 <= len(layers) <= MAX_SELECT_LAYERS:
        raise ConfigError(f"{key}={_show(value)} must be one layer index or a list of "
                          f"1 to {MAX_SELECT_LAYERS}")
    return tuple(_as_int(key, v) for v in layers)


def _pinpoints(value: Any) -> tuple[tuple[int, int], ...]:
    if value is None or (isinstance(value, (str, list)) and not value):
        return ()
    if isinstance(value, str):  # the original code also accepts a Python literal string
        import ast

        if len(value) > 64 * MAX_PINPOINTS:  # literal_eval's cost grows with the text
            raise ConfigError(f"image_grid_pinpoints is a string of {len(value)} characters")
        try:
            value = ast.literal_eval(value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            raise ConfigError(f"image_grid_pinpoints {_show(value)} is not a list") from None
    if not isinstance(value, (list, tuple)) or len(value) > MAX_PINPOINTS:
        raise ConfigError(f"image_grid_pinpoints {_show(value)} is not a list of at most "
                          f"{MAX_PINPOINTS} [w, h] pairs")
    points = []
    for point in value:
        if not isinstance(point, (list, tuple)) or len(point) != 2:
            raise ConfigError(f"image_grid_pinpoints {_show(value)} is not a list of [w, h]")
        points.append((_as_int("image_grid_pinpoints", point[0]),
                       _as_int("image_grid_pinpoints", point[1])))
    _check_pinpoints(tuple(points))
    return tuple(points)


def _check_pinpoints(points: Any) -> None:
    if not isinstance(points, tuple) or len(points) > MAX_PINPOINTS:
        raise ConfigError(f"image_grid_pinpoints {_show(points)} is not a tuple of at most "
                          f"{MAX_PINPOINTS} (w, h) pairs")
    for point in points:
        if (not isinstance(point, tuple) or len(point) != 2
                or not all(_is_int(v) and 1 <= v <= MAX_PINPOINT for v in point)):
            raise ConfigError(f"image_grid_pinpoints has {_show(point)}: each side must be an "
                              f"integer from 1 to {MAX_PINPOINT} pixels")


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{what} must be a JSON object, not {_show(value)}")
    return value


def _int(d: dict[str, Any], key: str, default: int, where: str = "config") -> int:
    return _as_int(key, d.get(key, default), where)


def _as_int(key: str, value: Any, where: str = "config") -> int:
    # Integral floats (4096.0) are accepted as JSON writers sometimes produce them; inf and
    # nan (which Python's json reads) are not integers.
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if not _is_int(value):
        raise ConfigError(f"{where} field {key}={_show(value)} is not an integer")
    return value


def _float(d: dict[str, Any], key: str, default: float, where: str = "config") -> float:
    value = d.get(key, default)
    if not _is_number(value) or not math.isfinite(value):
        raise ConfigError(f"{where} field {key}={_show(value)} is not a finite number")
    return float(value)


def _bool(d: dict[str, Any], key: str, default: bool, where: str = "config") -> bool:
    value = d.get(key)
    if value is None:  # absent, or null as some writers save an unset flag
        return default
    if not isinstance(value, bool):
        raise ConfigError(f"{where} field {key}={_show(value)} is not true or false")
    return value


def _str(d: dict[str, Any], key: str, default: str, where: str = "config") -> str:
    value = d.get(key, default)
    if not isinstance(value, str):
        raise ConfigError(f"{where} field {key}={_show(value)} is not a string")
    return value


def _optional_int(d: dict[str, Any], key: str, default: int | None, where: str = "config"
                  ) -> int | None:
    value = d.get(key, default)
    if isinstance(value, list):  # some configs list several eos ids; the first is the EOS
        value = value[0] if value else None
    return None if value is None else _as_int(key, value, where)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _show(value: Any, limit: int = 60) -> str:
    """repr(value), cut short: a bad value may be a huge list or string."""
    text = repr(value) if not _is_int(value) or abs(value) < 10**limit else f"<{value.bit_length()}-bit int>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_int(where: str, name: str, value: Any, low: int, high: int) -> None:
    if not _is_int(value) or not low <= value <= high:
        raise ConfigError(f"{where}: {name}={_show(value)} is out of range; it must be an "
                          f"integer from {low} to {high}")


def _check_eps(where: str, name: str, value: Any) -> None:
    if not _is_number(value) or not 0 < value < 1:  # False for nan too
        raise ConfigError(f"{where}: {name}={_show(value)} must be a number between 0 and 1, "
                          "exclusive")


def _check_number(where: str, name: str, value: Any) -> None:
    if not _is_number(value) or not 0 < value < math.inf:
        raise ConfigError(f"{where}: {name}={_show(value)} must be a positive finite number")


def _check_bool(where: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: {name}={_show(value)} must be true or false")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{name}={_show(value)} is not supported; expected one of {choices}")



@dataclass(frozen=True)
class VisionConfig:
    """A CLIP ViT vision tower. Defaults are CLIP ViT-L/14-336 (docs/design.md §5)."""

    image_size: int = 336
    patch_size: int = 14
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_dim: int = 4096
    act: str = "quick_gelu"
    norm_eps: float = 1e-5
    channels: int = 3

    def __post_init__(self) -> None:
        where = "vision tower config"
        _check_int(where, "image_size", self.image_size, 1, MAX_IMAGE_SIZE)
        _check_int(where, "patch_size", self.patch_size, 1, self.image_size)
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"{where}: image_size={self.image_size} is not a multiple of "
                f"patch_size={self.patch_size}; the tower would drop the border pixels")
        _check_int(where, "hidden_size", self.width, 1, MAX_WIDTH)
        _check_int(where, "num_hidden_layers", self.layers, 1, MAX_LAYERS)
        _check_int(where, "num_attention_heads", self.heads, 1, MAX_HEADS)
        if self.width % self.heads:
            raise ConfigError(f"{where}: hidden_size={self.width} is not divisible by "
                              f"num_attention_heads={self.heads}")
        _check_int(where, "intermediate_size", self.mlp_dim, 1, MAX_MLP)
        _check_choice(f"{where}: hidden_act", self.act, VISION_ACTIVATIONS)
        _check_eps(where, "layer_norm_eps", self.norm_eps)
        if self.channels != 3 or isinstance(self.channels, bool):
            raise ConfigError(f"{where}: num_channels={self.channels!r} is not supported; "
                              "images are fed as RGB (3 channels)")

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.patches_per_side**2

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> VisionConfig:
        """From a transformers CLIPVisionConfig dict (or a CLIPConfig with `vision_config`)."""
        d = _object(d, "the vision tower config")
        if "vision_config" in d:  # a whole CLIPConfig
            d = _object(d["vision_config"] or {}, "the vision tower config's vision_config")
        w = "vision tower config"
        return cls(
            image_size=_int(d, "image_size", 224, w),
            patch_size=_int(d, "patch_size", 32, w),
            width=_int(d, "hidden_size", 768, w),
            layers=_int(d, "num_hidden_layers", 12, w),
            heads=_int(d, "num_attention_heads", 12, w),
            mlp_dim=_int(d, "intermediate_size", 3072, w),
            act=_str(d, "hidden_act", "quick_gelu", w),
            norm_eps=_float(d, "layer_norm_eps", 1e-5, w),
            channels=_int(d, "num_channels", 3, w),
        )


# Towers named by original LLaVA configs, so a checkpoint that carries its tower (v1.6)
# loads without fetching the tower's config.json.
KNOWN_TOWERS = {
    "openai/clip-vit-large-patch14-336": VisionConfig(),
    "openai/clip-vit-large-patch14": VisionConfig(image_size=224),
}


# What transformers assumes for a decoder field a config.json leaves out, by model_type: a
# text_config saved sparsely omits the values equal to these. LlamaConfig's for Llama / Vicuna /
# Yi (a Llama architecture); MistralConfig's for Mistral (llava-hf/llava-v1.6-mistral-7b-hf keeps
# a text_config of model_type "mistral"; original LLaVA's llava_mistral writes every field).
# None for num_key_value_heads means "as many as the query heads".
LLAMA_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": None,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 2048,
    "sliding_window": None,
}
MISTRAL_DEFAULTS: dict[str, Any] = {
    **LLAMA_DEFAULTS, "intermediate_size": 14336, "num_key_value_heads": 8,
    "max_position_embeddings": 4096 * 32, "sliding_window": 4096,
}
TEXT_DEFAULTS = {"mistral": MISTRAL_DEFAULTS, "llava_mistral": MISTRAL_DEFAULTS}
TEXT_MODEL_TYPES = ("llama", "llava_llama", "llava", "mistral", "llava_mistral")


def text_defaults(model_type: Any) -> dict[str, Any]:
    """transformers' defaults for a decoder config of this model_type (LlamaConfig's unless
    Mistral)."""
    return TEXT_DEFAULTS.get(model_type, LLAMA_DEFAULTS) if isinstance(model_type, str) else LLAMA_DEFAULTS


@dataclass(frozen=True)
class TextConfig:
    """A Llama-architecture decoder: Vicuna (Llama-2), Mistral, Yi. Defaults are Vicuna-7B v1.5
    (docs/design.md §5). Grouped-query attention when `kv_heads` < `heads`.

    `sliding_window`: Mistral's attention window, or None. shortv computes full causal
    attention, which equals sliding-window attention for sequences of at most that many
    tokens, so `max_position_embeddings` (the longest sequence shortv accepts) may not exceed
    it; `from_hf` caps the context at the window."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    layers: int = 32
    heads: int = 32
    kv_heads: int = 32
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None
    sliding_window: int | None = None
    # The output projection's bias when it differs from q/k/v's (Qwen2: q/k/v have biases,
    # o_proj has none); None: the same as `attention_bias`.
    attention_out_bias: bool | None = None
    # M-RoPE (Qwen2-VL): how many of a head's rotated pairs take the temporal, height and
    # width position streams (positions [B, T, 3]); () for 1-D RoPE (positions [B, T]).
    mrope_section: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        where = "text config"
        _check_int(where, "vocab_size", self.vocab_size, 1, MAX_VOCAB)
        _check_int(where, "hidden_size", self.hidden_size, 1, MAX_WIDTH)
        _check_int(where, "intermediate_size", self.intermediate_size, 1, MAX_MLP)
        _check_int(where, "num_hidden_layers", self.layers, 1, MAX_LAYERS)
        _check_int(where, "num_attention_heads", self.heads, 1, MAX_HEADS)
        _check_int(where, "num_key_value_heads", self.kv_heads, 1, self.heads)
        if self.heads % self.kv_heads:
            raise ConfigError(f"{where}: num_attention_heads={self.heads} is not a multiple of "
                              f"num_key_value_heads={self.kv_heads}")
        _check_int(where, "head_dim", self.head_dim, 1, MAX_HEAD_DIM)
        if self.head_dim % 2:  # RoPE rotates the two halves of each head against each other
            raise ConfigError(f"{where}: head_dim={self.head_dim} is odd; RoPE needs an even one")
        _check_eps(where, "rms_norm_eps", self.rms_norm_eps)
        _check_number(where, "rope_theta", self.rope_theta)
        _check_int(where, "max_position_embeddings", self.max_position_embeddings, 1, MAX_POSITIONS)
        for name in ("attention_bias", "mlp_bias", "tie_word_embeddings"):
            _check_bool(where, name, getattr(self, name))
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None:
                # -1 is how some older Llama configs say "no padding token".
                _check_int(where, name, value, -1, MAX_TOKEN_ID)
        if self.attention_out_bias is not None:
            _check_bool(where, "attention_out_bias", self.attention_out_bias)
        if self.mrope_section:
            if not isinstance(self.mrope_section, tuple) or len(self.mrope_section) != 3:
                raise ConfigError(f"{where}: mrope_section={_show(self.mrope_section)} must be "
                                  "three section sizes (temporal, height, width)")
            for n in self.mrope_section:
                _check_int(where, "mrope_section", n, 0, self.head_dim // 2)
            if sum(self.mrope_section) != self.head_dim // 2:
                raise ConfigError(f"{where}: mrope_section={list(self.mrope_section)} sums to "
                                  f"{sum(self.mrope_section)}, not head_dim / 2 = {self.head_dim // 2}")
        if self.sliding_window is not None:
            _check_int(where, "sliding_window", self.sliding_window, 1, MAX_POSITIONS)
            if self.max_position_embeddings > self.sliding_window:
                raise ConfigError(
                    f"{where}: max_position_embeddings={self.max_position_embeddings} exceeds "
                    f"sliding_window={self.sliding_window}; shortv attends over the whole "
                    "sequence, which is the sliding-window attention only up to the window, so "
                    "the context must not be longer than it")

    @property
    def out_bias(self) -> bool:
        """Whether the attention output projection has a bias."""
        return self.attention_bias if self.attention_out_bias is None else self.attention_out_bias

    @property
    def position_streams(self) -> int:
        """RoPE position streams per token: 3 with M-RoPE, else 1."""
        return 3 if self.mrope_section else 1

    @property
    def q_dim(self) -> int:
        """Width of the query (and attention output) projection: heads × head_dim."""
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of each of the key and value projections: kv_heads × head_dim (smaller than
        q_dim with grouped-query attention)."""
        return self.kv_heads * self.head_dim

    @classmethod
    def from_hf(cls, d: dict[str, Any], *, defaults: dict[str, Any] | None = None) -> TextConfig:
        """From Llama / Mistral fields as transformers writes them (flat or in `text_config`).

        A missing field takes the default of transformers' config class for the config's
        `model_type` (`text_defaults`: LlamaConfig's, MistralConfig's for mistral /
        llava_mistral), as transformers does when it reads a sparsely saved text_config. Every
        value is checked (see `__post_init__`); head_dim, when not given, is hidden_size /
        num_attention_heads and must then divide evenly. A `sliding_window` (Mistral) caps the
        context: max_position_embeddings becomes min(max_position_embeddings, sliding_window)."""
        w = "text config"
        given = {**(defaults or {}), **_object(d, "the text config")}
        base = text_defaults(given.get("model_type"))
        d = {**base, **given}
        hidden = _int(d, "hidden_size", 4096, w)
        heads = _int(d, "num_attention_heads", 32, w)
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"text config: hidden_act={_show(act)} is not supported; Llama uses 'silu'")
        rope = _object(d.get("rope_scaling") or {}, "text config: rope_scaling")
        rope_params = _object(d.get("rope_parameters") or {}, "text config: rope_parameters")
        rope_type = rope.get("rope_type", rope.get("type")) or rope_params.get("rope_type")
        if rope_type not in (None, "default"):
            raise ConfigError(
                f"text config: rope_scaling type {_show(rope_type)} is not supported; only plain "
                "RoPE (Vicuna/Llama-2, Mistral, Yi)"
            )
        # rope_parameters (transformers v5) holds the theta when the flat field is absent.
        theta = given.get("rope_theta", rope_params.get("rope_theta", base["rope_theta"]))
        # transformers: None means "as many as the query heads"; any other value is taken as
        # given, and 0 is refused.
        kv_heads = heads if d.get("num_key_value_heads") is None else _int(d, "num_key_value_heads", 0, w)
        if d.get("head_dim") is None:
            # The sizes must be valid before they are divided.
            _check_int(w, "hidden_size", hidden, 1, MAX_WIDTH)
            _check_int(w, "num_attention_heads", heads, 1, MAX_HEADS)
            if hidden % heads:
                raise ConfigError(
                    f"text config: hidden_size={hidden} is not divisible by "
                    f"num_attention_heads={heads}, and no head_dim is given")
            head_dim = hidden // heads
        else:
            head_dim = _int(d, "head_dim", 0, w)
        window = d.get("sliding_window")
        window = None if window is None else _as_int("sliding_window", window, w)
        context = _int(d, "max_position_embeddings", 2048, w)
        if window is not None and isinstance(context, int) and window >= 1:
            context = min(context, window)
        return cls(
            vocab_size=_int(d, "vocab_size", 32000, w),
            hidden_size=hidden,
            intermediate_size=_int(d, "intermediate_size", 11008, w),
            layers=_int(d, "num_hidden_layers", 32, w),
            heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=_float(d, "rms_norm_eps", 1e-6, w),
            rope_theta=_float({"rope_theta": theta}, "rope_theta", 10000.0, w),
            max_position_embeddings=context,
            attention_bias=_bool(d, "attention_bias", False, w),
            mlp_bias=_bool(d, "mlp_bias", False, w),
            tie_word_embeddings=_bool(d, "tie_word_embeddings", False, w),
            bos_token_id=_optional_int(d, "bos_token_id", 1, w),
            eos_token_id=_optional_int(d, "eos_token_id", 2, w),
            pad_token_id=_optional_int(d, "pad_token_id", None, w),
            sliding_window=window,
        )


@dataclass(frozen=True)
class LlavaConfig:
    """A whole LLaVA model: vision tower, projector, decoder and image handling."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    projector: str = "mlp2x_gelu"
    projector_bias: bool = True
    projector_act: str = "gelu"
    # Hidden-state indices of the tower to use (-2 = penultimate); several are concatenated.
    vision_select_layers: tuple[int, ...] = (-2,)
    vision_select_feature: str = "patch"
    image_aspect_ratio: str = "pad"
    image_grid_pinpoints: tuple[tuple[int, int], ...] = ()
    patch_merge_type: str = "flat"
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    # Where the original layout's tower comes from when the checkpoint carries none.
    vision_tower: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.vision, VisionConfig) or not isinstance(self.text, TextConfig):
            raise ConfigError("LlavaConfig needs a VisionConfig and a TextConfig")
        projector_depth(self.projector)
        _check_bool("config", "projector bias (multimodal_projector_bias)", self.projector_bias)
        _check_choice("image_aspect_ratio", self.image_aspect_ratio, ASPECT_RATIOS)
        _check_choice("mm_patch_merge_type", self.patch_merge_type, MERGE_TYPES)
        _check_choice("mm_vision_select_feature", self.vision_select_feature, SELECT_FEATURES)
        if self.vision_tower is not None and not isinstance(self.vision_tower, str):
            raise ConfigError(f"mm_vision_tower={self.vision_tower!r} is not a string")
        _check_pinpoints(self.image_grid_pinpoints)
        if self.image_aspect_ratio == "anyres" and not self.image_grid_pinpoints:
            raise ConfigError("image_aspect_ratio='anyres' needs image_grid_pinpoints")
        layers = self.vision_select_layers
        if not isinstance(layers, tuple) or not 1 <= len(layers) <= MAX_SELECT_LAYERS:
            raise ConfigError(
                f"vision select layers (mm_vision_select_layer / vision_feature_layer) "
                f"{layers!r} must be one layer index or a list of 1 to {MAX_SELECT_LAYERS}")
        for index in layers:
            if isinstance(index, bool) or not isinstance(index, int):
                raise ConfigError(f"vision select layer {index!r} (mm_vision_select_layer / "
                                  "vision_feature_layer) is not an integer")
            if not -(self.vision.layers + 1) <= index <= self.vision.layers:
                raise ConfigError(
                    f"vision select layer {index} (mm_vision_select_layer / vision_feature_layer) "
                    f"is outside the tower's {self.vision.layers} layers (+1 for the embeddings)"
                )
        if (self.image_aspect_ratio == "anyres" and self.patch_merge_type != "flat"
                and self.vision_select_feature != "patch"):
            raise ConfigError(
                f"mm_patch_merge_type={self.patch_merge_type!r} rebuilds a feature map from the "
                "patch tokens, so it needs mm_vision_select_feature='patch', not 'cls_patch'"
            )
        if self.projector_act != "gelu":
            raise ConfigError(f"projector activation {self.projector_act!r} "
                              "(projector_hidden_act) is not supported; use 'gelu'")
        for name, values in (("image_mean", self.image_mean), ("image_std", self.image_std)):
            if (not isinstance(values, tuple) or len(values) != 3
                    or not all(_is_number(v) and math.isfinite(v) for v in values)
                    or (name == "image_std" and min(values) <= 0)):
                raise ConfigError(f"{name}={values!r} must be 3 finite numbers (std > 0)")

    @property
    def vision_hidden_indices(self) -> tuple[int, ...]:
        """Selected hidden states as non-negative indices (0 = embeddings, i = after layer i)."""
        n = self.vision.layers + 1
        return tuple(i % n for i in self.vision_select_layers)

    @property
    def vision_depth(self) -> int:
        """How many tower layers must run; later layers are never used by LLaVA."""
        return max(self.vision_hidden_indices)

    @property
    def vision_feature_size(self) -> int:
        return self.vision.width * len(self.vision_select_layers)

    @property
    def default_visual_tokens(self) -> int:
        """Visual tokens of one image as the ShortV paper counts them (what `shortv flops`
        assumes without --n-visual): the tower's patches (576 for a 336-px LLaVA-1.5), or
        2880 for anyres LLaVA-NeXT (its typical 4-tile grid)."""
        return 2880 if self.image_aspect_ratio == "anyres" else self.vision.num_patches

    @property
    def uses_image_newline(self) -> bool:
        """Whether the checkpoint carries `image_newline` (the original creates it for any
        'unpad' merge type, though only anyres images use it)."""
        return "unpad" in self.patch_merge_type

    def replace(self, **changes: Any) -> LlavaConfig:
        return dataclasses.replace(self, **changes)


def projector_depth(kind: str) -> int:
    """Number of Linear layers of a projector type ('linear' = 1, 'mlp2x_gelu' = 2)."""
    if kind == "linear":
        return 1
    if isinstance(kind, str) and kind.startswith("mlp") and kind.endswith("x_gelu"):
        depth = kind[3 : -len("x_gelu")]
        # isascii: str.isdigit() also accepts digits such as '²' that int() refuses.
        if depth.isascii() and depth.isdigit() and 1 <= int(depth) <= MAX_PROJECTOR_DEPTH:
            return int(depth)
    raise ConfigError(f"mm_projector_type {kind!r} is not supported; use {PROJECTOR_TYPES_HELP}, "
                      f"N <= {MAX_PROJECTOR_DEPTH}")


def detect_layout(config_json: dict[str, Any]) -> str:
    """'original' or 'transformers', from config.json's architectures / model_type."""
    config_json = _object(config_json, "config.json")
    archs = config_json.get("architectures") or []
    model_type = config_json.get("model_type", "")
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ConfigError(f"config.json's architectures={_show(archs)} is not a list of names")
    if not isinstance(model_type, str):
        raise ConfigError(f"config.json's model_type={_show(model_type)} is not a string")
    if (any(a in ORIGINAL_ARCHITECTURES for a in archs) or "mm_vision_tower" in config_json
            or model_type in ORIGINAL_MODEL_TYPES):
        return "original"
    if any(a in TRANSFORMERS_ARCHITECTURES for a in archs) or model_type in ("llava", "llava_next"):
        return "transformers"
    raise ConfigError(
        f"config.json describes {archs or model_type or 'an unknown model'}, not a LLaVA model; "
        f"expected architectures {ORIGINAL_ARCHITECTURES + TRANSFORMERS_ARCHITECTURES}"
    )


def from_original(config_json: dict[str, Any], vision: VisionConfig) -> LlavaConfig:
    """Parse an original LLaVA config.json; `vision` comes from the mm_vision_tower config.

    The decoder's sizes (ORIGINAL_REQUIRED) must be present: this layout has no defaults
    for them, and a silent 4096-wide default would only fail later, tensor by tensor."""
    d = _object(config_json, "config.json")
    missing = [k for k in ORIGINAL_REQUIRED if k not in d]
    if missing:
        raise ConfigError(
            f"config.json has no {', '.join(missing)}; the original LLaVA layout keeps the "
            f"decoder's sizes at its top level ({', '.join(ORIGINAL_REQUIRED)})")
    select_layer = d.get("mm_vision_select_layer", -2)
    aspect = d.get("image_aspect_ratio") or "square"
    pinpoints = _pinpoints(d.get("image_grid_pinpoints"))
    return LlavaConfig(
        vision=vision,
        text=TextConfig.from_hf(d),
        projector=_str(d, "mm_projector_type", "linear"),
        vision_select_layers=_as_layers("mm_vision_select_layer", select_layer),
        vision_select_feature=_str(d, "mm_vision_select_feature", "patch"),
        image_aspect_ratio=aspect,
        image_grid_pinpoints=pinpoints,
        patch_merge_type=_str(d, "mm_patch_merge_type", "flat"),
        vision_tower=d.get("mm_vision_tower"),
    )


def from_transformers(config_json: dict[str, Any]) -> LlavaConfig:
    """Parse a transformers Llava / LlavaNext config.json.

    As in transformers: fields missing from a (sparsely saved) text_config / vision_config
    take LlamaConfig's / CLIPVisionConfig's defaults, and a missing vision_config is
    LlavaConfig's default tower, CLIP ViT-L/14-336."""
    d = _object(config_json, "config.json")
    next_ = d.get("model_type") == "llava_next" or "LlavaNextForConditionalGeneration" in (
        d.get("architectures") or []
    )
    strategy = d.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise ConfigError(f"vision_feature_select_strategy {_show(strategy)} is not supported")
    pinpoints = _pinpoints(d.get("image_grid_pinpoints")) or LLAVA_NEXT_PINPOINTS
    vision_config = d.get("vision_config")
    text_config = d.get("text_config")
    return LlavaConfig(
        vision=VisionConfig() if vision_config is None else VisionConfig.from_hf(
            _object(vision_config, "config.json's vision_config")),
        text=TextConfig.from_hf(_object(text_config or {}, "config.json's text_config")),
        projector="mlp2x_gelu",
        projector_bias=_bool(d, "multimodal_projector_bias", True),
        projector_act=_str(d, "projector_hidden_act", "gelu"),
        vision_select_layers=_as_layers("vision_feature_layer", d.get("vision_feature_layer", -2)),
        vision_select_feature="patch" if strategy == "default" else "cls_patch",
        image_aspect_ratio="anyres" if next_ else "pad",
        image_grid_pinpoints=pinpoints if next_ else (),
        patch_merge_type="spatial_unpad" if next_ else "flat",
    )
