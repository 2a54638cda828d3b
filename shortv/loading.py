"""`shortv.load`: from a zoo name, a directory or a Hub repo id to a ready `LLaVA`."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from . import store, zoo
from .checkpoint import (
    CLIP_TOWER_LAYOUT,
    ORIGINAL_LAYOUT,
    TRANSFORMERS_LAYOUT,
    Filler,
    KeyMap,
    check_config_against_checkpoint,
    checkpoint_shapes,
    weight_files,
)
from .config import (
    KNOWN_TOWERS,
    LlavaConfig,
    VisionConfig,
    detect_layout,
    from_original,
    from_transformers,
)
from .conversation import DEFAULT_TEMPLATE, get_template
from .errors import (
    CheckpointError,
    ConfigError,
    ModelNotFoundError,
    ShortVError,
    require_model_name,
)
from .llava import LLaVA
from .methods import Method
from .ranking import RankingLike, choose_method
from .tokenizer import Tokenizer

TOWER_PREFIX = "model.vision_tower."
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")


def load(
    source: str | Path,
    *,
    n_frozen: int | None = None,
    frozen_layers: Sequence[int] | None = None,
    ranking: RankingLike | None = None,
    method: Method | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    template: str | None = None,
) -> LLaVA:
    """Load a LLaVA model.

    source: a zoo name (`shortv zoo`), a local checkpoint directory, or a Hub repo id.
    n_frozen: freeze visual tokens in the first N layers of the ranking (the card's, or
        `ranking`: an LC report file or a list of layer ids); frozen_layers: exact ids.
    method: any shortv method (Vanilla, ShortV, FastV, VTW, PDrop, VisionZip, DART, SparseVLM,
        or `shortv.compose(...)`); with n_frozen / frozen_layers it is composed with that ShortV.
    device: default "cuda" when available, else "cpu"; dtype: default bfloat16 on CUDA,
        float32 on CPU. Weights are cast to dtype while loading.
    template: the conversation template's name (`shortv.conversation.TEMPLATES`); default
        the zoo card's, else `vicuna_v1` (LLaVA-1.5's training and evaluation template).
    """
    if not isinstance(source, (str, Path)):
        raise ConfigError(f"source must be a zoo name, a directory or a repo id, got {source!r}")
    require_model_name(source)
    source = str(source)
    card = zoo.card(source)
    if template is None:
        template = card.template if card is not None else DEFAULT_TEMPLATE
    conversation = get_template(template)  # a bad name fails before the weights are looked for

    def chosen(num_layers: int) -> Method:
        return choose_method(
            num_layers, n_frozen=n_frozen, frozen_layers=frozen_layers, ranking=ranking,
            method=method, default_ranking=card.ranking if card is not None else (),
            model_name=card.name if card is not None else source,
        )

    # A zoo card knows the depth: a method that cannot work is refused before the weights
    # are looked for (or downloaded).
    fitted = chosen(card.config.text.layers) if card is not None else None
    model = load_directory(store.locate(source), device=device, dtype=dtype)
    model.name = card.name if card is not None else source
    model.template = conversation
    model.set_method(fitted if fitted is not None else chosen(model.num_layers))
    return model


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}; use e.g. 'cpu' or 'cuda'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but no CUDA GPU is available")
    return device


# Names accepted for dtypes (the CLI's --dtype choices too).
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float64": torch.float64, "fp64": torch.float64}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ConfigError(f"dtype {dtype} is not a floating-point type")
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory} has no config.json; is it a model checkpoint directory?")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} holds a {type(config).__name__}, not a JSON object")
    return config


def load_directory(
    directory: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> LLaVA:
    """Build a model from a checkpoint directory in either published layout (docs/design.md §4)."""
    directory = Path(directory)
    target = resolve_device(device)
    target_dtype = resolve_dtype(dtype, target)
    raw = read_config(directory)
    files = weight_files(directory)
    shapes = checkpoint_shapes(files)
    config, layout, tower_dir = _parse(directory, raw, shapes)
    tower_files = weight_files(tower_dir) if tower_dir is not None else None
    try:
        # Before anything is built: a config that does not describe these tensors must not
        # get to allocate (a layer count of 10**12 would take all memory).
        check_config_against_checkpoint(
            config, shapes, layout, checkpoint_shapes(tower_files) if tower_files else None)
    except ShortVError as e:
        raise type(e)(f"{directory}: {e}") from None

    model = build_empty(config)
    filler = Filler(model, target, target_dtype, ignore=_unused(config))
    if config.text.tie_word_embeddings:
        filler.params.pop("decoder.lm_head.weight", None)
    filler.fill_from(files, KeyMap(ORIGINAL_LAYOUT if layout == "original" else TRANSFORMERS_LAYOUT))
    if tower_dir is not None:
        filler.fill_from(tower_files, KeyMap(CLIP_TOWER_LAYOUT))
    filler.finish(str(directory) + (f" + tower {tower_dir}" if tower_dir else ""))
    if config.text.tie_word_embeddings:
        model.decoder.lm_head.weight = model.decoder.embed_tokens.weight
    if any((directory / name).is_file() for name in TOKENIZER_FILES):
        model.tokenizer = Tokenizer.from_directory(directory)
    else:
        # The model still runs on token ids; text needs a tokenizer, so say which file is
        # missing now and again (via encode) at the first call that needs it.
        model.missing_tokenizer = (
            f"{directory} has no {' or '.join(TOKENIZER_FILES)}; copy the tokenizer files of "
            "the model's original repository into it")
        warnings.warn(f"loaded without a tokenizer: {model.missing_tokenizer}", stacklevel=3)
    model.name = directory.name
    model.checkpoint_dir = directory
    return model


class _SkipRandomInit(TorchFunctionMode):
    """Skips the in-place random initialisers modules run in their constructors."""

    SKIPPED = frozenset({"uniform_", "normal_", "trunc_normal_", "kaiming_uniform_"})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.SKIPPED:
            return args[0] if args else (kwargs or {})["tensor"]
        return func(*args, **(kwargs or {}))


@contextmanager
def meta_device() -> Iterator[None]:
    """Build modules on the meta device (no memory, no values) without running their
    random initialisers: the values come from a checkpoint anyway, and the first random
    op on the meta device imports ~900 Python modules (~150 MB, seconds) for nothing."""
    with torch.device("meta"), _SkipRandomInit():
        yield


def build_empty(config: LlavaConfig) -> LLaVA:
    """The model's modules on the meta device, ready to be filled from a checkpoint."""
    with meta_device():
        return LLaVA(config)


def config_of_directory(directory: str | Path) -> LlavaConfig:
    """A checkpoint directory's LlavaConfig, without reading its weights."""
    directory = Path(directory)
    return _parse(directory, read_config(directory), None)[0]


def _parse(directory: Path, raw: dict[str, Any], shapes: dict[str, tuple[int, ...]] | None
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
            tower_dir = _locate_tower(tower_source, directory)
        vision = _tower_config(tower_source, tower_dir, directory)
        return from_original(raw, vision), layout, tower_dir
    except ShortVError:
        raise
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise ConfigError(f"{directory}/config.json is malformed: {e!r}") from None


def _tower_config(source: str, tower_dir: Path | None, directory: Path) -> VisionConfig:
    """The tower's shape: from its own directory, a known tower, or its config.json."""
    if tower_dir is None and source in KNOWN_TOWERS:
        return KNOWN_TOWERS[source]
    if tower_dir is None:
        tower_dir = _locate_tower(source, directory)
    return VisionConfig.from_hf(read_config(tower_dir))


def _locate_tower(source: str, directory: Path) -> Path:
    try:
        return store.locate(source, relative_to=directory)
    except ModelNotFoundError as e:
        raise ModelNotFoundError(
            f"the vision tower named by mm_vision_tower in {directory}/config.json is missing: {e}"
        ) from None


def _unused(config: LlavaConfig):
    """Tower layers after the deepest selected hidden state exist in checkpoints but are
    never run, so they are neither built nor loaded."""
    depth, total = config.vision_depth, config.vision.layers

    def unused(name: str) -> bool:
        parts = name.split(".")
        return (len(parts) > 3 and parts[:2] == ["vision", "layers"] and parts[2].isdigit()
                and depth <= int(parts[2]) < total)

    return unused


__all__ = ["ShortVError", "load", "load_directory"]
