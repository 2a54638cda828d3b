"""The LLaVA family: LLaVA-1.5 and LLaVA-NeXT, in the original (liuhaotian/*) and the
transformers (llava-hf/*) layouts (docs/design.md §4). `shortv.families` registers it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .checkpoint import (
    CLIP_TOWER_LAYOUT,
    ORIGINAL_LAYOUT,
    TRANSFORMERS_LAYOUT,
    KeyMap,
    check_config_against_checkpoint,
    checkpoint_shapes,
    weight_files,
)
from .errors import ConfigError, ModelNotFoundError, ShortVError
from .family import Checkpoint, Family, Locate, Shapes, WeightSource, read_config
from .llava import LLaVA
from .models.config import (
    KNOWN_TOWERS,
    LLAVA_NEXT_PINPOINTS,
    ORIGINAL_ARCHITECTURES,
    ORIGINAL_MODEL_TYPES,
    TRANSFORMERS_ARCHITECTURES,
    LlavaConfig,
    TextConfig,
    VisionConfig,
    detect_layout,
    from_original,
    from_transformers,
)
from .models.llava import LlavaModel
from .tokenizer import Tokenizer

# An original checkpoint that carries its (tuned) tower keeps it under this prefix
# (LLaVA-NeXT); one without it (LLaVA-1.5) names the tower's repo in mm_vision_tower.
TOWER_PREFIX = "model.vision_tower."
KEY_MAPS = {"original": ORIGINAL_LAYOUT, "transformers": TRANSFORMERS_LAYOUT}
TIED_EMBEDDINGS = (("decoder.lm_head.weight", "decoder.embed_tokens.weight"),)


def read_checkpoint(directory: Path, raw: dict[str, Any], shapes: Shapes | None,
                    locate: Locate) -> Checkpoint:
    """A LLaVA checkpoint directory in either layout. With its tensor `shapes`, a separate
    vision tower is located and the config is checked against both before anything is
    built; without them only the config is read (the tower's shape, not its weights)."""
    config, layout, tower_dir = _parse(directory, raw, shapes, locate)
    extra: tuple[WeightSource, ...] = ()
    if tower_dir is not None:
        extra = (WeightSource(tuple(weight_files(tower_dir)), KeyMap(CLIP_TOWER_LAYOUT),
                              f"tower {tower_dir}"),)
    if shapes is not None:
        try:
            # A config that does not describe these tensors must not get to allocate (a
            # layer count of 10**12 would take all memory).
            check_config_against_checkpoint(
                config, shapes, layout, checkpoint_shapes(extra[0].files) if extra else None)
        except ShortVError as e:
            raise type(e)(f"{directory}: {e}") from None
    return Checkpoint(
        config=config,
        key_map=KeyMap(KEY_MAPS[layout]),
        extra=extra,
        skip=_unused(config),
        tied=TIED_EMBEDDINGS if config.text.tie_word_embeddings else (),
    )


def _parse(directory: Path, raw: dict[str, Any], shapes: Shapes | None, locate: Locate
           ) -> tuple[LlavaConfig, str, Path | None]:
    """(config, layout, directory of a separate vision tower to load, if any). Without the
    checkpoint's tensor `shapes` the tower's location is not needed, only its shape."""
    try:
        layout = detect_layout(raw)
        if layout == "transformers":
            return from_transformers(raw), layout, None
        tower_source = raw.get("mm_vision_tower")
        if not tower_source:
            raise ConfigError(f"{directory}/config.json has no mm_vision_tower")
        tower_dir = None
        if shapes is not None and not any(k.startswith(TOWER_PREFIX) for k in shapes):
            tower_dir = _locate_tower(tower_source, directory, locate)
        vision = _tower_config(tower_source, tower_dir, directory, locate)
        return from_original(raw, vision), layout, tower_dir
    except ShortVError:
        raise
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise ConfigError(f"{directory}/config.json is malformed: {e!r}") from None


def _tower_config(source: str, tower_dir: Path | None, directory: Path, locate: Locate
                  ) -> VisionConfig:
    """The tower's shape: from its own directory, a known tower, or its config.json."""
    if tower_dir is None and source in KNOWN_TOWERS:
        return KNOWN_TOWERS[source]
    if tower_dir is None:
        tower_dir = _locate_tower(source, directory, locate)
    return VisionConfig.from_hf(read_config(tower_dir))


def _locate_tower(source: str, directory: Path, locate: Locate) -> Path:
    try:
        return locate(source, directory)
    except ModelNotFoundError as e:
        raise ModelNotFoundError(
            f"the vision tower named by mm_vision_tower in {directory}/config.json is missing: {e}"
        ) from None


def _unused(config: LlavaConfig) -> Callable[[str], bool]:
    """Tower layers after the deepest selected hidden state exist in checkpoints but are
    never run, so they are neither built nor loaded."""
    depth, total = config.vision_depth, config.vision.layers

    def unused(name: str) -> bool:
        parts = name.split(".")
        return (len(parts) > 3 and parts[:2] == ["vision", "layers"] and parts[2].isdigit()
                and depth <= int(parts[2]) < total)

    return unused


def card_config(architecture: dict[str, Any], preprocess: dict[str, Any]) -> LlavaConfig:
    """A LLaVA zoo card's [architecture] and [preprocess] tables as a config."""
    pinpoints = tuple(tuple(p) for p in preprocess.get("grid_pinpoints", ()))
    if preprocess.get("image_aspect_ratio") == "anyres" and not pinpoints:
        pinpoints = LLAVA_NEXT_PINPOINTS
    return LlavaConfig(
        vision=VisionConfig(**architecture.get("vision", {})),
        text=TextConfig(**architecture.get("text", {})),
        projector=architecture.get("projector", "mlp2x_gelu"),
        vision_select_layers=tuple(architecture.get("select_layers", (-2,))),
        vision_select_feature=architecture.get("select_feature", "patch"),
        image_aspect_ratio=preprocess.get("image_aspect_ratio", "pad"),
        image_grid_pinpoints=pinpoints,  # type: ignore[arg-type]
        patch_merge_type=preprocess.get("patch_merge_type", "flat"),
    )


LLAVA = Family(
    name="llava",
    title="LLaVA",
    # Original LLaVA writes llava_llama / llava_mistral (older releases "llava", which
    # transformers' LlavaForConditionalGeneration also writes); llava_next: transformers'
    # LLaVA-NeXT. Which layout a config.json is in is decided by `config.detect_layout`.
    model_types=(*ORIGINAL_MODEL_TYPES, "llava", "llava_next"),
    architectures=(*ORIGINAL_ARCHITECTURES, *TRANSFORMERS_ARCHITECTURES),
    read_checkpoint=read_checkpoint,
    build=LlavaModel,
    session=LLaVA,
    card_config=card_config,
    # Original repos ship tokenizer.model (SentencePiece), llava-hf ones tokenizer.json too.
    tokenizer_files=("tokenizer.model", "tokenizer.json"),
    load_tokenizer=Tokenizer.from_directory,
    # LLaVA-1.5's training template, which LLaVA's evaluation scripts and lmms-eval use too
    # (`shortv chat` follows LLaVA's CLI instead: `cli_template_name`).
    default_template="vicuna_v1",
)
