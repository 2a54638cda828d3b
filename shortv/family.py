"""What a model family tells the loader, and the reading of a checkpoint's config.json.

A family (LLaVA, later Qwen2-VL) is one `Family` value: which config.json files are its
own, how to read one into a config and key maps, how to build the model, how to load its
tokenizer, and its default conversation template. The loader (`shortv.loading`) and the
zoo (`shortv.zoo`) only call these; `shortv.families` holds the registered families.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .checkpoint import KeyMap
from .errors import CheckpointError

# A checkpoint's tensors: key (as its files spell it) → shape.
Shapes = Mapping[str, tuple[int, ...]]
# Finds a checkpoint another one names (a path, also relative to the naming checkpoint's
# directory, a zoo name or a repo id): (name, naming directory) → directory. The loader
# passes `shortv.store.locate`; a family does not import the store, which reads the zoo,
# which reads the families.
Locate = Callable[[str, Path], Path]


@dataclass(frozen=True)
class WeightSource:
    """Checkpoint files holding some of a model's tensors, and the key map naming them.

    label: the source in messages ("DIR", "tower DIR")."""

    files: tuple[Path, ...]
    key_map: KeyMap
    label: str


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint directory as its family reads it.

    config: the family's config object (what `Family.build` takes).
    key_map: names the tensors of the directory's own weight files.
    extra: other directories holding the rest of the tensors (original LLaVA-1.5's
        separate CLIP tower), read after the directory's own files.
    skip: parameter names that checkpoints hold but the model neither builds nor loads.
    tied: (parameter, the parameter it shares) pairs: not loaded, set after loading
        (tied input and output embeddings).
    """

    config: Any
    key_map: KeyMap
    extra: tuple[WeightSource, ...] = ()
    skip: Callable[[str], bool] = lambda name: False
    tied: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Family:
    """Everything model-specific the loader and the zoo need. Register one with
    `shortv.families.register`; nothing else names a family.

    name: what zoo cards say (`family = "llava"`).
    title: how messages name the family ("LLaVA").
    model_types: the config.json `model_type` values that are this family's.
    architectures: config.json `architectures` names that are this family's, for a
        config.json whose model_type no family claims (or that has none).
    read_checkpoint: (directory, config.json as a dict, the directory's tensor shapes or
        None, locate) → Checkpoint. With shapes it checks the config against them
        (ConfigError / CheckpointError before anything is built); without, only the
        config is needed (`config_of_directory`).
    build: config → the torch module (weights and forward passes only), which the
        loader fills from the checkpoint.
    session: (module, *, tokenizer, template, name, checkpoint_dir, missing_tokenizer) →
        the loaded model `shortv.load` returns (it has `num_layers`, `set_method`, and
        prepares its own images from the module's config).
    card_config: a zoo card's [architecture] and [preprocess] tables → config.
    tokenizer_files: the files a checkpoint directory keeps its tokenizer in (any one).
    load_tokenizer: directory → tokenizer, when one of `tokenizer_files` is there.
    default_template: the conversation template of a model without a zoo card.
    """

    name: str
    title: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    read_checkpoint: Callable[[Path, dict[str, Any], Shapes | None, Locate], Checkpoint]
    build: Callable[[Any], nn.Module]
    session: Callable[..., Any]
    card_config: Callable[[dict[str, Any], dict[str, Any]], Any]
    tokenizer_files: tuple[str, ...]
    load_tokenizer: Callable[[Path], Any]
    default_template: str


def read_config(directory: Path) -> dict[str, Any]:
    """A checkpoint directory's config.json as a dict; CheckpointError when it is missing
    or not a JSON object."""
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory} has no config.json; is it a model checkpoint directory?")
    return read_json(path)


def read_json(path: Path) -> dict[str, Any]:
    """A checkpoint's JSON file (config.json, preprocessor_config.json) as a dict;
    CheckpointError when it is not valid JSON or not a JSON object."""
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} holds a {type(config).__name__}, not a JSON object")
    return config
