"""The Qwen2-VL family: Qwen2-VL and Qwen2.5-VL, in Qwen's original release layout
(`visual.*`, `model.*`, `lm_head.*`) and transformers 5's re-saved one (`model.visual.*`,
`model.language_model.*`, `lm_head.*`). `shortv.families` registers it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .checkpoint import LLAMA_KEYS, KeyMap
from .errors import CheckpointError, ConfigError, ShortVError
from .family import Checkpoint, Family, Locate, Shapes, read_json
from .models.config import TextConfig
from .models.qwen_config import (
    ARCHITECTURES,
    VARIANTS,
    QwenPreprocess,
    QwenVisionConfig,
    QwenVLConfig,
    from_config_json,
    preprocess_from_json,
)
from .models.qwen_vl import QwenVLModel
from .qwen_tokenizer import QwenTokenizer
from .qwen_vl import QWEN_TEMPLATE, QwenVL

# The tower's parameters are named as below `visual.` in Qwen's checkpoints.
_TOWER = [(r"(.+)", r"\1")]
_HEAD = [(r"lm_head\.weight", "lm_head.weight")]
KEY_MAP = [
    # Original release.
    (r"visual\.", "vision.", _TOWER),
    (r"model\.(?!visual\.|language_model\.)", "decoder.", LLAMA_KEYS),
    # transformers 5.
    (r"model\.visual\.", "vision.", _TOWER),
    (r"model\.language_model\.", "decoder.", LLAMA_KEYS),
    (r"", "decoder.", _HEAD),
]
TIED_EMBEDDINGS = (("decoder.lm_head.weight", "decoder.embed_tokens.weight"),)


def read_checkpoint(directory: Path, raw: dict[str, Any], shapes: Shapes | None,
                    locate: Locate) -> Checkpoint:
    """A Qwen2-VL / Qwen2.5-VL checkpoint directory in either layout, with the image
    bounds of its preprocessor_config.json (transformers' defaults without one)."""
    try:
        config = from_config_json(raw, _preprocess(directory))
    except ShortVError as e:
        raise type(e)(f"{directory}: {e}") from None
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise ConfigError(f"{directory}/config.json is malformed: {e!r}") from None
    if shapes is not None:
        _check_sizes(directory, config, shapes)
    return Checkpoint(config=config, key_map=KeyMap(KEY_MAP),
                      tied=TIED_EMBEDDINGS if config.text.tie_word_embeddings else ())


def _preprocess(directory: Path) -> QwenPreprocess:
    path = directory / "preprocessor_config.json"
    return preprocess_from_json(read_json(path)) if path.is_file() else QwenPreprocess()


def _check_sizes(directory: Path, config: QwenVLConfig, shapes: Shapes) -> None:
    """The config's vocabulary, width and depth against the weights' shapes, before the
    model is built (one clear line instead of a list of mismatched tensors)."""
    key_map = KeyMap(KEY_MAP)
    ours = {key_map(k): shape for k, shape in shapes.items()}
    embed = ours.get("decoder.embed_tokens.weight")
    want = (config.text.vocab_size, config.text.hidden_size)
    if embed is not None and tuple(embed) != want:
        raise CheckpointError(f"{directory}: config.json says vocab_size × hidden_size = {want}, "
                              f"the checkpoint's embeddings are {tuple(embed)}; config.json does "
                              "not belong to these weights")
    layers = {int(n.split(".")[2]) for n in ours if isinstance(n, str) and n.startswith("decoder.layers.")}
    if layers and max(layers) + 1 != config.text.layers:
        raise CheckpointError(f"{directory}: config.json says num_hidden_layers="
                              f"{config.text.layers}, the checkpoint has {max(layers) + 1} layers")


def card_config(architecture: dict[str, Any], preprocess: dict[str, Any]) -> QwenVLConfig:
    """A Qwen zoo card's [architecture] (text / vision tables as the dataclasses name
    their fields) and [preprocess] tables as a config."""
    text = dict(architecture.get("text", {}))
    text["mrope_section"] = tuple(text.get("mrope_section", (16, 24, 24)))
    vision = dict(architecture.get("vision", {}))
    vision["fullatt_block_indexes"] = tuple(vision.get("fullatt_block_indexes", ()))
    return QwenVLConfig(
        vision=QwenVisionConfig(**vision),
        text=TextConfig(attention_bias=True, attention_out_bias=False, **text),
        preprocess=QwenPreprocess(**{k: v for k, v in preprocess.items()
                                     if k in ("min_pixels", "max_pixels")}),
    )


QWEN = Family(
    name="qwen2_vl",
    title="Qwen2-VL",
    model_types=VARIANTS,
    architectures=tuple(ARCHITECTURES.values()),
    read_checkpoint=read_checkpoint,
    build=QwenVLModel,
    session=QwenVL,
    card_config=card_config,
    tokenizer_files=("tokenizer.json",),
    load_tokenizer=QwenTokenizer.from_directory,
    default_template=QWEN_TEMPLATE,
)
