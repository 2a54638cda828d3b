"""Quantized checkpoints: a model loaded with `quantize=` saved once and loaded again
without quantizing (or holding the dense weights) again.

A quantized checkpoint is the source checkpoint's directory without its weight files
(config.json, tokenizer, preprocessor files: read as usual), plus one safetensors file,
`QUANTIZED_FILE`, holding the whole module's state under shortv's own parameter names:
the quantized layers' `qweight` and `scales`, everything else in the model's dtype. Its
metadata says the format, the scheme and group size, and the dtype; loading checks them
against what the caller asks and every tensor's shape against the config.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .checkpoint import Filler, read_tensors, tie
from .errors import CheckpointError, ConfigError
from .models.quant import Quantization, QuantizedLinear
from .version import __version__

QUANTIZED_FILE = "shortv-quantized.safetensors"
# The dtypes a quantized model computes in (its scales and dense parameters).
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
           "float64": torch.float64}
FORMAT = "shortv-quantized-1"
# Files of a checkpoint directory that hold weights (not copied into a quantized one).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def is_quantized(directory: Path) -> bool:
    return (directory / QUANTIZED_FILE).is_file()


def saved_quantization(directory: Path) -> tuple[Quantization, torch.dtype]:
    """The scheme and dtype a quantized checkpoint was saved with (from its metadata)."""
    path = directory / QUANTIZED_FILE
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error type, and OSError
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a shortv quantized checkpoint (format "
                              f"{meta.get('format')!r}, expected {FORMAT!r})")
    try:
        dtype = _DTYPES[meta["dtype"]]
        return Quantization.from_metadata(meta), dtype
    except (KeyError, ValueError, ConfigError) as e:
        raise CheckpointError(f"{path} has malformed quantization metadata ({e!r})") from None


def save(model: Any, directory: str | Path) -> Path:
    """Write a quantized model (`shortv.load(..., quantize=)`) to `directory` (created;
    it must not hold a checkpoint already). Returns the directory."""
    quantization = model.quantization
    if quantization is None:
        raise ConfigError("save_quantized saves a quantized model; load it with quantize='int8' or 'int4'")
    source = model.checkpoint_dir
    if source is None:
        raise ConfigError("this model was not loaded from a checkpoint directory; nothing to copy its "
                          "config and tokenizer from")
    out = Path(directory)
    if (out / "config.json").exists():
        raise ConfigError(f"{out} already holds a checkpoint (config.json); choose an empty directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create {out}: {e.strerror or e}") from None
    for item in Path(source).iterdir():
        if item.is_file() and not item.name.endswith(_WEIGHT_SUFFIXES) and item.name not in _WEIGHT_INDEXES:
            shutil.copy2(item, out / item.name)
    _copy_tower_config(Path(source), out)
    state = _unique_state(model.module)
    meta = {"format": FORMAT, **quantization.metadata(), "dtype": str(model.dtype).removeprefix("torch."),
            "shortv_version": __version__}
    save_file(state, str(out / QUANTIZED_FILE), metadata=meta)
    return out


def _copy_tower_config(source: Path, out: Path) -> None:
    """An original LLaVA-1.5 names its CLIP tower by a path beside it: the quantized
    checkpoint carries the tower's weights, but its config still needs the tower's shape."""
    try:
        tower = json.loads((source / "config.json").read_text()).get("mm_vision_tower")
    except (OSError, ValueError, AttributeError):
        return
    if (not isinstance(tower, str) or Path(tower).is_absolute()
            or not (source / tower / "config.json").is_file()):
        return
    target = out / tower
    if not target.resolve().is_relative_to(out.resolve()):
        # A tower outside the checkpoint ("../clip") is not copied: the saved checkpoint
        # finds it the same way only where such a tower sits beside it too.
        return
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source / tower / "config.json", target / "config.json")


def _unique_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's parameters and buffers by name, a tensor shared by two names (tied
    embeddings) once, contiguous (safetensors' requirement)."""
    seen: set[int] = set()
    state = {}
    for name, tensor in module.state_dict(keep_vars=False).items():
        if tensor is None or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        state[name] = tensor.detach().contiguous()
    return state


def fill(module: nn.Module, directory: Path, dtype: torch.dtype, tied: tuple[tuple[str, str], ...],
         skip: Any) -> None:
    """Fill a module built on the meta device (its Linear layers already swapped for
    quantized ones, `quantize_module`) from a quantized checkpoint's file."""
    layers = {name: m for name, m in module.named_modules() if isinstance(m, QuantizedLinear)}
    filler = Filler(module, torch.device("cpu"), dtype, ignore=skip)
    for name in layers:
        filler.params.pop(f"{name}.weight", None)  # the placeholders: quantized tensors come instead
    for name, _ in tied:
        filler.params.pop(name, None)
    buffers: dict[str, dict[str, torch.Tensor]] = {name: {} for name in layers}
    path = directory / QUANTIZED_FILE
    for key, tensor in read_tensors(path):
        owner, _, attr = key.rpartition(".")
        if owner in layers and attr in ("qweight", "scales"):
            buffers[owner][attr] = tensor.clone()
        else:
            filler.put(key, key, tensor, path)
    filler.finish(str(directory))
    problems = []
    for name, layer in layers.items():
        got = buffers[name]
        expected = layer.stored_shapes()
        if set(got) != set(expected):
            problems.append(f"{name}: missing {', '.join(sorted(set(expected) - set(got)))}")
            continue
        for attr, shape in expected.items():
            if tuple(got[attr].shape) != shape:
                problems.append(f"{name}.{attr}: checkpoint {list(got[attr].shape)} vs config {list(shape)}")
        layer.set_quantized(got["qweight"], got["scales"].to(dtype))
    if problems:
        shown = ", ".join(problems[:4]) + (f", ... ({len(problems)} in all)" if len(problems) > 4 else "")
        raise CheckpointError(f"{path} does not match its config ({shown})")
    tie(module, tied)
