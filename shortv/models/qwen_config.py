"""Qwen2-VL and Qwen2.5-VL configuration: the vision tower's dataclass, the whole model's,
and the reading of both published config.json layouts.

Two layouts exist:
- Qwen's original release (`Qwen2VLForConditionalGeneration` as transformers 4 saved it):
  the Qwen2 decoder's fields at the top level, the tower's in `vision_config`.
- transformers 5's re-saved layout: the decoder's fields in `text_config`, the tower's in
  `vision_config` (the top level may still carry copies).

Every value is validated when a config is built, as for LLaVA (`shortv.models.config`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from .config import (
    CLIP_MEAN,
    CLIP_STD,
    MAX_HEADS,
    MAX_LAYERS,
    MAX_MLP,
    MAX_WIDTH,
    TextConfig,
    _bool,
    _check_choice,
    _check_eps,
    _check_int,
    _float,
    _int,
    _object,
    _optional_int,
    _show,
    _str,
)

QWEN2_VL = "qwen2_vl"
QWEN2_5_VL = "qwen2_5_vl"
VARIANTS = (QWEN2_VL, QWEN2_5_VL)
QWEN_VISION_ACTIVATIONS = ("quick_gelu", "silu", "gelu")


@dataclass(frozen=True)
class QwenVisionConfig:
    """The Qwen2-VL / Qwen2.5-VL vision transformer and its 2×2 patch merger.

    variant: "qwen2_vl" (LayerNorm, fc1/fc2 MLP, full attention in every block) or
        "qwen2_5_vl" (RMSNorm, SiLU-gated MLP with biases, window attention except in
        `fullatt_block_indexes`).
    width: the ViT's width (config.json `embed_dim` for Qwen2-VL, `hidden_size` for 2.5).
    out_width: the merger's output, the language model's width (Qwen2-VL's vision
        `hidden_size`, Qwen2.5-VL's `out_hidden_size`).
    mlp_dim: the blocks' MLP width (Qwen2-VL: width × mlp_ratio; 2.5: `intermediate_size`).
    window_size: Qwen2.5-VL's attention window, in pixels (112: 4×4 merged tokens).
    """

    variant: str = QWEN2_VL
    depth: int = 32
    width: int = 1280
    heads: int = 16
    mlp_dim: int = 5120
    out_width: int = 3584
    act: str = "quick_gelu"
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    channels: int = 3
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = ()
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        where = "vision config"
        _check_choice(f"{where}: variant", self.variant, VARIANTS)
        _check_int(where, "depth", self.depth, 1, MAX_LAYERS)
        _check_int(where, "embed_dim", self.width, 1, MAX_WIDTH)
        _check_int(where, "num_heads", self.heads, 1, MAX_HEADS)
        if self.width % self.heads or (self.width // self.heads) % 4:
            # The 2-D rotary embedding splits each head in four (two axes × cos/sin halves).
            raise ConfigError(f"{where}: embed_dim={self.width} / num_heads={self.heads} must be "
                              "a whole head width divisible by 4")
        _check_int(where, "intermediate_size", self.mlp_dim, 1, MAX_MLP)
        _check_int(where, "out_hidden_size", self.out_width, 1, MAX_WIDTH)
        _check_choice(f"{where}: hidden_act", self.act, QWEN_VISION_ACTIVATIONS)
        _check_int(where, "patch_size", self.patch_size, 1, 1024)
        _check_int(where, "temporal_patch_size", self.temporal_patch_size, 1, 64)
        _check_int(where, "spatial_merge_size", self.spatial_merge_size, 1, 64)
        if self.channels != 3 or isinstance(self.channels, bool):
            raise ConfigError(f"{where}: in_chans={self.channels!r} is not supported; images are "
                              "fed as RGB (3 channels)")
        _check_int(where, "window_size", self.window_size, 1, 1 << 16)
        if self.window_size % (self.patch_size * self.spatial_merge_size):
            raise ConfigError(f"{where}: window_size={self.window_size} is not a multiple of "
                              f"patch_size × spatial_merge_size = "
                              f"{self.patch_size * self.spatial_merge_size}")
        for i in self.fullatt_block_indexes:
            _check_int(where, "fullatt_block_indexes", i, 0, self.depth - 1)
        _check_eps(where, "norm_eps", self.norm_eps)

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def windowed(self) -> bool:
        """Whether some blocks attend within windows (Qwen2.5-VL)."""
        return self.variant == QWEN2_5_VL

    @property
    def merge_unit(self) -> int:
        """Patches per merged (visual) token: spatial_merge_size²."""
        return self.spatial_merge_size**2

    @property
    def patch_dim(self) -> int:
        """Values per flattened patch: channels × temporal_patch_size × patch_size²."""
        return self.channels * self.temporal_patch_size * self.patch_size**2

    @property
    def factor(self) -> int:
        """Image sides are resized to multiples of this: patch_size × spatial_merge_size."""
        return self.patch_size * self.spatial_merge_size


@dataclass(frozen=True)
class QwenPreprocess:
    """Qwen2VLImageProcessor's settings (preprocessor_config.json): images are resized so
    their area lies in [min_pixels, max_pixels], sides multiples of 28."""

    min_pixels: int = 56 * 56
    # transformers' defaults when preprocessor_config.json gives none; the published
    # Instruct checkpoints set max_pixels 12845056.
    max_pixels: int = 28 * 28 * 1280
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        _check_int("preprocessor config", "min_pixels", self.min_pixels, 1, 1 << 40)
        _check_int("preprocessor config", "max_pixels", self.max_pixels, self.min_pixels, 1 << 40)


@dataclass(frozen=True)
class QwenVLConfig:
    """A Qwen2-VL / Qwen2.5-VL model: tower, decoder, the special token ids and the image
    preprocessing.

    text: the Qwen2 decoder (q/k/v biases, no output bias, M-RoPE `mrope_section`).
    """

    vision: QwenVisionConfig = field(default_factory=QwenVisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    preprocess: QwenPreprocess = field(default_factory=QwenPreprocess)
    image_token_id: int = 151655
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    video_token_id: int = 151656

    @property
    def variant(self) -> str:
        return self.vision.variant

    @property
    def default_visual_tokens(self) -> int:
        """Visual tokens of a 1024×768 photo, each side rounded to a multiple of 28 (27 ×
        37 = 999 merged patches; the published pixel bounds leave that size as it is):
        what `shortv flops` assumes without --n-visual, since a Qwen model's count follows
        each image's size."""
        return round(768 / self.vision.factor) * round(1024 / self.vision.factor)

    @property
    def image_aspect_ratio(self) -> str:
        """How images are fed, in the zoo's words (LLaVA: pad / anyres): each at its own
        resolution within the pixel bounds."""
        return "native"


# ---------------------------------------------------------------------------------------
# config.json → QwenVLConfig

ARCHITECTURES = {QWEN2_VL: "Qwen2VLForConditionalGeneration",
                 QWEN2_5_VL: "Qwen2_5_VLForConditionalGeneration"}
# transformers' defaults where a (sparsely saved) config.json leaves a field out:
# Qwen2VLTextConfig's and the vision configs' own.
TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 152064, "hidden_size": 8192, "intermediate_size": 29568,
    "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
}
MROPE_SECTION = (16, 24, 24)


def variant_of(raw: dict[str, Any]) -> str:
    """qwen2_vl or qwen2_5_vl, from config.json's model_type (else its architectures)."""
    model_type = raw.get("model_type")
    if model_type in VARIANTS:
        return model_type
    for variant, architecture in ARCHITECTURES.items():
        if architecture in (raw.get("architectures") or []):
            return variant
    raise ConfigError(f"config.json model_type={_show(model_type)} is not a Qwen2-VL model; "
                      f"expected one of {VARIANTS}")


def from_config_json(raw: dict[str, Any], preprocess: QwenPreprocess | None = None) -> QwenVLConfig:
    """A Qwen2-VL / Qwen2.5-VL config.json (Qwen's original layout, or transformers 5's
    with `text_config`) as a config. ConfigError naming the field for a bad value."""
    variant = variant_of(raw)
    text = {k: v for k, v in raw.items() if k not in ("vision_config", "text_config")}
    text.update(_object(raw.get("text_config") or {}, "config.json text_config"))
    vision = _object(raw.get("vision_config") or {}, "config.json vision_config")
    return QwenVLConfig(
        vision=_vision_config(vision, variant),
        text=_text_config(text, raw),
        preprocess=preprocess or QwenPreprocess(),
        image_token_id=_int(raw, "image_token_id", 151655),
        vision_start_token_id=_int(raw, "vision_start_token_id", 151652),
        vision_end_token_id=_int(raw, "vision_end_token_id", 151653),
        video_token_id=_int(raw, "video_token_id", 151656),
    )


def _text_config(d: dict[str, Any], raw: dict[str, Any]) -> TextConfig:
    w = "text config"
    d = {**TEXT_DEFAULTS, **d}
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{w}: hidden_act={_show(act)} is not supported; Qwen2 uses 'silu'")
    if _bool(d, "use_sliding_window", False, w):
        raise ConfigError(f"{w}: use_sliding_window=true is not supported; shortv attends over "
                          "the whole sequence (every published Qwen2-VL / Qwen2.5-VL sets false)")
    rope = _object(d.get("rope_scaling") or d.get("rope_parameters") or {}, "text config: rope_scaling")
    rope_type = rope.get("rope_type", rope.get("type"))
    if rope_type not in (None, "default", "mrope"):
        raise ConfigError(f"{w}: rope type {_show(rope_type)} is not supported; Qwen2-VL uses mrope")
    section = rope.get("mrope_section", MROPE_SECTION)
    if not isinstance(section, (list, tuple)):
        raise ConfigError(f"{w}: mrope_section={_show(section)} is not a list of three sizes")
    # transformers 5 keeps the theta in rope_parameters, Qwen's release at the top level.
    theta = d.get("rope_theta") if d.get("rope_theta") is not None else rope.get("rope_theta", 1e6)
    hidden, heads = _int(d, "hidden_size", 0, w), _int(d, "num_attention_heads", 0, w)
    _check_int(w, "hidden_size", hidden, 1, MAX_WIDTH)
    _check_int(w, "num_attention_heads", heads, 1, MAX_HEADS)
    if hidden % heads:
        raise ConfigError(f"{w}: hidden_size={hidden} is not divisible by num_attention_heads={heads}")
    # transformers 5 keeps the tie at the top level; older saves put it in text_config.
    tied = _bool(raw, "tie_word_embeddings", False, "config") or _bool(d, "tie_word_embeddings", False, w)
    return TextConfig(
        vocab_size=_int(d, "vocab_size", 0, w),
        hidden_size=hidden,
        intermediate_size=_int(d, "intermediate_size", 0, w),
        layers=_int(d, "num_hidden_layers", 0, w),
        heads=heads,
        kv_heads=heads if d.get("num_key_value_heads") is None else _int(d, "num_key_value_heads", 0, w),
        head_dim=hidden // heads,
        rms_norm_eps=_float(d, "rms_norm_eps", 1e-6, w),
        rope_theta=_float({"rope_theta": theta}, "rope_theta", 1e6, w),
        max_position_embeddings=_int(d, "max_position_embeddings", 32768, w),
        attention_bias=True,
        attention_out_bias=False,
        tie_word_embeddings=tied,
        bos_token_id=_optional_int(d, "bos_token_id", None, w),
        eos_token_id=_optional_int(d, "eos_token_id", None, w),
        pad_token_id=_optional_int(d, "pad_token_id", None, w),
        mrope_section=tuple(section),
    )


def _vision_config(d: dict[str, Any], variant: str) -> QwenVisionConfig:
    w = "vision config"
    channels = _int(d, "in_chans", _int(d, "in_channels", 3, w), w)
    common = dict(
        variant=variant,
        depth=_int(d, "depth", 32, w),
        heads=_int(d, "num_heads", 16, w),
        patch_size=_int(d, "patch_size", 14, w),
        temporal_patch_size=_int(d, "temporal_patch_size", 2, w),
        spatial_merge_size=_int(d, "spatial_merge_size", 2, w),
        channels=channels,
    )
    if variant == QWEN2_VL:
        # Qwen2-VL's vision "hidden_size" is the merger's output (the LLM's width).
        width = _int(d, "embed_dim", 1280, w)
        return QwenVisionConfig(
            **common, width=width, mlp_dim=width * _int(d, "mlp_ratio", 4, w),
            out_width=_int(d, "hidden_size", 3584, w),
            act=_str(d, "hidden_act", "quick_gelu", w))
    fullatt = d.get("fullatt_block_indexes", [7, 15, 23, 31])
    if not isinstance(fullatt, (list, tuple)):
        raise ConfigError(f"{w}: fullatt_block_indexes={_show(fullatt)} is not a list")
    return QwenVisionConfig(
        **common, width=_int(d, "hidden_size", 3584, w), mlp_dim=_int(d, "intermediate_size", 3420, w),
        out_width=_int(d, "out_hidden_size", 3584, w), act=_str(d, "hidden_act", "silu", w),
        window_size=_int(d, "window_size", 112, w), fullatt_block_indexes=tuple(fullatt))


def preprocess_from_json(raw: dict[str, Any]) -> QwenPreprocess:
    """preprocessor_config.json's min / max pixels and normalisation (transformers 5 may
    save them as size.shortest_edge / size.longest_edge)."""
    w = "preprocessor_config.json"
    size = _object(raw.get("size") or {}, f"{w} size")
    low = raw.get("min_pixels", size.get("shortest_edge", 56 * 56))
    high = raw.get("max_pixels", size.get("longest_edge", 28 * 28 * 1280))
    mean, std = raw.get("image_mean", CLIP_MEAN), raw.get("image_std", CLIP_STD)
    for name, value in (("image_mean", mean), ("image_std", std)):
        if not isinstance(value, (list, tuple)) or len(value) != 3:
            raise ConfigError(f"{w}: {name}={_show(value)} is not three numbers")
    return QwenPreprocess(min_pixels=_int({"min_pixels": low}, "min_pixels", 0, w),
                          max_pixels=_int({"max_pixels": high}, "max_pixels", 0, w),
                          mean=tuple(float(x) for x in mean),  # type: ignore[arg-type]
                          std=tuple(float(x) for x in std))  # type: ignore[arg-type]
