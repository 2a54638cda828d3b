"""Model configuration as plain dataclasses, and parsing of both published config.json layouts.

Two layouts exist (DESIGN §4):
- *original* LLaVA (`LlavaLlamaForCausalLM`): Llama fields at the top level plus `mm_*` fields;
  the vision tower's config lives in the `mm_vision_tower` repo.
- *transformers* (`LlavaForConditionalGeneration`, `LlavaNextForConditionalGeneration`):
  nested `text_config` / `vision_config`, which transformers may save sparsely (only
  non-default values), so the defaults below are transformers' defaults.

Grid pinpoints are read as (width, height) and searched in list order in both layouts, as
original LLaVA-NeXT does (transformers reads its copy as (height, width), which only
changes tie-breaks for the symmetric lists published checkpoints use).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# LLaVA-NeXT's grid pinpoints, (width, height) each, in the order the original searches them.
LLAVA_NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))

ORIGINAL_ARCHITECTURES = ("LlavaLlamaForCausalLM",)
TRANSFORMERS_ARCHITECTURES = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration")

PROJECTOR_TYPES_HELP = "'linear' or 'mlpNx_gelu' (N >= 1)"
ASPECT_RATIOS = ("pad", "anyres", "square")
MERGE_TYPES = ("flat", "spatial", "spatial_unpad")
SELECT_FEATURES = ("patch", "cls_patch")


@dataclass(frozen=True)
class VisionConfig:
    """A CLIP ViT vision tower. Defaults are CLIP ViT-L/14-336 (DESIGN §5)."""

    image_size: int = 336
    patch_size: int = 14
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_dim: int = 4096
    act: str = "quick_gelu"
    norm_eps: float = 1e-5
    channels: int = 3

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.patches_per_side**2

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> VisionConfig:
        """From a transformers CLIPVisionConfig dict (or a CLIPConfig with `vision_config`)."""
        if "vision_config" in d:
            d = d["vision_config"] or {}
        return cls(
            image_size=_int(d, "image_size", 224),
            patch_size=_int(d, "patch_size", 32),
            width=_int(d, "hidden_size", 768),
            layers=_int(d, "num_hidden_layers", 12),
            heads=_int(d, "num_attention_heads", 12),
            mlp_dim=_int(d, "intermediate_size", 3072),
            act=str(d.get("hidden_act", "quick_gelu")),
            norm_eps=_float(d, "layer_norm_eps", 1e-5),
            channels=_int(d, "num_channels", 3),
        )


# Towers named by original LLaVA configs, so a checkpoint that carries its tower (v1.6)
# loads without fetching the tower's config.json.
KNOWN_TOWERS = {
    "openai/clip-vit-large-patch14-336": VisionConfig(),
    "openai/clip-vit-large-patch14": VisionConfig(image_size=224),
}


@dataclass(frozen=True)
class TextConfig:
    """A Llama / Vicuna decoder. Defaults are Vicuna-7B v1.5 (DESIGN §5)."""

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

    @classmethod
    def from_hf(cls, d: dict[str, Any], *, defaults: dict[str, Any] | None = None) -> TextConfig:
        """From Llama fields as transformers writes them (flat or in `text_config`)."""
        d = {**(defaults or {}), **d}
        hidden = _int(d, "hidden_size", 4096)
        heads = _int(d, "num_attention_heads", 32)
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"text model hidden_act={act!r} is not supported; Llama uses 'silu'")
        rope = d.get("rope_scaling") or {}
        rope_params = d.get("rope_parameters") or {}
        rope_type = rope.get("rope_type", rope.get("type")) or rope_params.get("rope_type")
        if rope_type not in (None, "default"):
            raise ConfigError(
                f"rope scaling {rope_type!r} is not supported; only plain RoPE (Vicuna/Llama-2)"
            )
        theta = d.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        return cls(
            vocab_size=_int(d, "vocab_size", 32000),
            hidden_size=hidden,
            intermediate_size=_int(d, "intermediate_size", 11008),
            layers=_int(d, "num_hidden_layers", 32),
            heads=heads,
            kv_heads=_int(d, "num_key_value_heads", heads) if d.get("num_key_value_heads") else heads,
            head_dim=_int(d, "head_dim", 0) if d.get("head_dim") else hidden // heads,
            rms_norm_eps=_float(d, "rms_norm_eps", 1e-6),
            rope_theta=_float({"rope_theta": theta}, "rope_theta", 10000.0),
            max_position_embeddings=_int(d, "max_position_embeddings", 2048),
            attention_bias=bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=_optional_int(d.get("bos_token_id", 1)),
            eos_token_id=_optional_int(d.get("eos_token_id", 2)),
            pad_token_id=_optional_int(d.get("pad_token_id")),
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
        projector_depth(self.projector)
        _check_choice("image_aspect_ratio", self.image_aspect_ratio, ASPECT_RATIOS)
        _check_choice("mm_patch_merge_type", self.patch_merge_type, MERGE_TYPES)
        _check_choice("mm_vision_select_feature", self.vision_select_feature, SELECT_FEATURES)
        if self.image_aspect_ratio == "anyres" and not self.image_grid_pinpoints:
            raise ConfigError("image_aspect_ratio='anyres' needs image_grid_pinpoints")
        for index in self.vision_select_layers:
            if not -(self.vision.layers + 1) <= index <= self.vision.layers:
                raise ConfigError(
                    f"vision select layer {index} is outside the tower's "
                    f"{self.vision.layers} layers (+1 for the embeddings)"
                )
        if (self.image_aspect_ratio == "anyres" and self.patch_merge_type != "flat"
                and self.vision_select_feature != "patch"):
            raise ConfigError(
                f"mm_patch_merge_type={self.patch_merge_type!r} rebuilds a feature map from the "
                "patch tokens, so it needs mm_vision_select_feature='patch', not 'cls_patch'"
            )
        if self.projector_act != "gelu":
            raise ConfigError(f"projector activation {self.projector_act!r} is not supported")

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
    if kind.startswith("mlp") and kind.endswith("x_gelu"):
        depth = kind[3 : -len("x_gelu")]
        if depth.isdigit() and int(depth) >= 1:
            return int(depth)
    raise ConfigError(f"mm_projector_type {kind!r} is not supported; use {PROJECTOR_TYPES_HELP}")


def detect_layout(config_json: dict[str, Any]) -> str:
    """'original' or 'transformers', from config.json's architectures / model_type."""
    archs = config_json.get("architectures") or []
    model_type = config_json.get("model_type", "")
    if any(a in ORIGINAL_ARCHITECTURES for a in archs) or "mm_vision_tower" in config_json:
        return "original"
    if any(a in TRANSFORMERS_ARCHITECTURES for a in archs) or model_type in ("llava", "llava_next"):
        return "transformers"
    raise ConfigError(
        f"config.json describes {archs or model_type or 'an unknown model'}, not a LLaVA model; "
        f"expected architectures {ORIGINAL_ARCHITECTURES + TRANSFORMERS_ARCHITECTURES}"
    )


def from_original(config_json: dict[str, Any], vision: VisionConfig) -> LlavaConfig:
    """Parse an original LLaVA config.json; `vision` comes from the mm_vision_tower config."""
    d = config_json
    select_layer = d.get("mm_vision_select_layer", -2)
    aspect = d.get("image_aspect_ratio") or "square"
    pinpoints = _pinpoints(d.get("image_grid_pinpoints"))
    return LlavaConfig(
        vision=vision,
        text=TextConfig.from_hf(d),
        projector=str(d.get("mm_projector_type", "linear")),
        vision_select_layers=_as_layers(select_layer),
        vision_select_feature=str(d.get("mm_vision_select_feature", "patch")),
        image_aspect_ratio=aspect,
        image_grid_pinpoints=pinpoints,
        patch_merge_type=str(d.get("mm_patch_merge_type", "flat")),
        vision_tower=d.get("mm_vision_tower"),
    )


def from_transformers(config_json: dict[str, Any]) -> LlavaConfig:
    """Parse a transformers Llava / LlavaNext config.json."""
    d = config_json
    next_ = d.get("model_type") == "llava_next" or "LlavaNextForConditionalGeneration" in (
        d.get("architectures") or []
    )
    strategy = d.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise ConfigError(f"vision_feature_select_strategy {strategy!r} is not supported")
    pinpoints = _pinpoints(d.get("image_grid_pinpoints")) or LLAVA_NEXT_PINPOINTS
    return LlavaConfig(
        vision=VisionConfig.from_hf(d.get("vision_config") or {}),
        text=TextConfig.from_hf(d.get("text_config") or {}),
        projector="mlp2x_gelu",
        projector_bias=bool(d.get("multimodal_projector_bias", True)),
        projector_act=str(d.get("projector_hidden_act", "gelu")),
        vision_select_layers=_as_layers(d.get("vision_feature_layer", -2)),
        vision_select_feature="patch" if strategy == "default" else "cls_patch",
        image_aspect_ratio="anyres" if next_ else "pad",
        image_grid_pinpoints=pinpoints if next_ else (),
        patch_merge_type="spatial_unpad" if next_ else "flat",
    )


def _as_layers(value: Any) -> tuple[int, ...]:
    layers = value if isinstance(value, (list, tuple)) else [value]
    try:
        return tuple(int(v) for v in layers)
    except (TypeError, ValueError):
        raise ConfigError(f"vision select layer {value!r} is not an integer or a list") from None


def _pinpoints(value: Any) -> tuple[tuple[int, int], ...]:
    if value in (None, "", []):
        return ()
    if isinstance(value, str):  # the original code also accepts a Python literal string
        import ast

        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ConfigError(f"image_grid_pinpoints {value!r} is not a list") from None
    try:
        points = tuple((int(w), int(h)) for w, h in value)
    except (TypeError, ValueError):
        raise ConfigError(f"image_grid_pinpoints {value!r} is not a list of [w, h]") from None
    if any(w <= 0 or h <= 0 for w, h in points):
        raise ConfigError(f"image_grid_pinpoints {value!r} has a non-positive size")
    return points


def _int(d: dict[str, Any], key: str, default: int) -> int:
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise ConfigError(f"config field {key}={value!r} is not an integer")
    return int(value)


def _float(d: dict[str, Any], key: str, default: float) -> float:
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"config field {key}={value!r} is not a number")
    return float(value)


def _optional_int(value: Any) -> int | None:
    if isinstance(value, list):  # some configs list several eos ids; the first is the EOS
        value = value[0] if value else None
    return None if value is None else int(value)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not supported; expected one of {choices}")
