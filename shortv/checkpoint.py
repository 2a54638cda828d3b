"""Reading checkpoint files and filling a model from them, strictly and leanly.

Formats: `.safetensors` and PyTorch `.bin`, single files or shards with an index json.
Both are memory-mapped; each tensor is copied (and cast) once into its parameter and the
mapped pages are released right after, so peak memory stays near the size of the model
rather than model + checkpoint. Key maps turn the published names (original LLaVA,
transformers' Llava/LlavaNext old and new, HF CLIP) into ours; every checkpoint tensor
must be used or be on a short list of known-unused ones, every parameter filled once.
"""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import os
import re
import struct
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}

# ---------------------------------------------------------------------------------------
# Key maps: (pattern, replacement) pairs; replacement None = a known-unused tensor.

CLIP_KEYS: list[tuple[str, str | None]] = [
    (r"embeddings\.patch_embedding\.weight", "patch_embed.weight"),
    (r"embeddings\.class_embedding", "class_embedding"),
    (r"embeddings\.position_embedding\.weight", "position_embedding"),
    (r"embeddings\.position_ids", None),
    (r"pre_layrnorm\.(weight|bias)", r"pre_norm.\1"),
    (r"post_layernorm\.(weight|bias)", None),  # LLaVA reads hidden states, never the head
    (r"encoder\.layers\.(\d+)\.self_attn\.(q|k|v|out)_proj\.(weight|bias)",
     r"layers.\1.attn.\2_proj.\3"),
    (r"encoder\.layers\.(\d+)\.layer_norm([12])\.(weight|bias)", r"layers.\1.norm\2.\3"),
    (r"encoder\.layers\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", r"layers.\1.mlp.\2.\3"),
]

LLAMA_KEYS: list[tuple[str, str | None]] = [
    (r"embed_tokens\.weight", "embed_tokens.weight"),
    (r"layers\.(\d+)\.self_attn\.([qkvo])_proj\.(weight|bias)", r"layers.\1.attn.\2_proj.\3"),
    (r"layers\.(\d+)\.self_attn\.rotary_emb\.inv_freq", None),  # a buffer older versions saved
    (r"layers\.(\d+)\.input_layernorm\.weight", r"layers.\1.attn_norm.weight"),
    (r"layers\.(\d+)\.post_attention_layernorm\.weight", r"layers.\1.mlp_norm.weight"),
    (r"layers\.(\d+)\.mlp\.(gate|up|down)_proj\.(weight|bias)", r"layers.\1.mlp.\2_proj.\3"),
    (r"norm\.weight", "norm.weight"),
    (r"rotary_emb\.inv_freq", None),
]

# (checkpoint prefix regex, our prefix, rules). The first matching rule wins.
ORIGINAL_LAYOUT = [
    (r"model\.vision_tower\.vision_tower\.(?:vision_model\.)?", "vision.", CLIP_KEYS),
    (r"model\.mm_projector\.", "projector.", [(r"(\d+)\.(weight|bias)", r"\1.\2"),
                                              (r"(weight|bias)", r"0.\1")]),
    (r"model\.", "", [(r"image_newline", "image_newline")]),
    (r"model\.", "decoder.", LLAMA_KEYS),
    (r"", "decoder.", [(r"lm_head\.weight", "lm_head.weight")]),
]
TRANSFORMERS_LAYOUT = [
    (r"(?:model\.)?vision_tower\.(?:vision_model\.)?", "vision.", CLIP_KEYS),
    (r"(?:model\.)?multi_modal_projector\.", "projector.", [
        (r"linear_(\d+)\.(weight|bias)", lambda m: f"{2 * (int(m[1]) - 1)}.{m[2]}")]),
    (r"(?:model\.)?", "", [(r"image_newline", "image_newline")]),
    (r"(?:language_model\.model\.|model\.language_model\.)", "decoder.", LLAMA_KEYS),
    (r"(?:language_model\.)?", "decoder.", [(r"lm_head\.weight", "lm_head.weight")]),
]
# A CLIP checkpoint (CLIPModel or CLIPVisionModel) providing the tower of an original v1.5.
CLIP_TOWER_LAYOUT = [
    (r"(?:vision_model\.)?", "vision.", CLIP_KEYS),
    (r"(?:text_model\.|text_projection\.|visual_projection\.|logit_scale$)", "", [(r".*", None)]),
]


# An open_clip (OpenAI-style) VisionTransformer: other names, and q/k/v packed in one
# `in_proj` tensor (target "qkv", split by `open_clip_tower_state`). The pooling head is
# not part of LLaVA's tower.
OPEN_CLIP_KEYS: list[tuple[str, str | None]] = [
    (r"conv1\.weight", "patch_embed.weight"),
    (r"class_embedding", "class_embedding"),
    (r"positional_embedding", "position_embedding"),
    (r"ln_pre\.(weight|bias)", r"pre_norm.\1"),
    (r"ln_post\.(?:weight|bias)|proj", None),
    (r"transformer\.resblocks\.(\d+)\.ln_([12])\.(weight|bias)", r"layers.\1.norm\2.\3"),
    (r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", r"layers.\1.attn.qkv.\2"),
    (r"transformer\.resblocks\.(\d+)\.attn\.out_proj\.(weight|bias)", r"layers.\1.attn.out_proj.\2"),
    (r"transformer\.resblocks\.(\d+)\.mlp\.c_fc\.(weight|bias)", r"layers.\1.mlp.fc1.\2"),
    (r"transformer\.resblocks\.(\d+)\.mlp\.c_proj\.(weight|bias)", r"layers.\1.mlp.fc2.\2"),
]


class KeyMap:
    """Maps checkpoint keys to parameter names of our modules."""

    def __init__(self, layout: list) -> None:
        self.rules = [
            (re.compile(f"{prefix}(?:{pattern})\\Z"), target_prefix, replacement)
            for prefix, target_prefix, rules in layout
            for pattern, replacement in rules
        ]

    def __call__(self, key: str) -> str | bool | None:
        """Our name, None for a known-unused tensor, or False when the key is unknown."""
        for pattern, target_prefix, replacement in self.rules:
            m = pattern.match(key)
            if m is None:
                continue
            if replacement is None:
                return None
            tail = replacement(m) if callable(replacement) else m.expand(replacement)
            return target_prefix + tail
        return False


def open_clip_tower_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Parameters of our CLIPVisionTower (names without the `vision.` prefix) from an
    open_clip VisionTransformer's state dict, or a whole open_clip CLIP model's
    (`visual.*`; its text tower is ignored). Packed q/k/v projections are split. Tensors
    that have no place in a CLIP ViT tower (LayerScale, attentional pooling, ...) raise
    CheckpointError naming them. The tower's shape (heads in particular) is not in the
    state dict: take it from the open_clip model config."""
    prefix = "visual." if any(k.startswith("visual.") for k in state) else ""
    key_map = KeyMap([(re.escape(prefix), "", OPEN_CLIP_KEYS)])
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        name = key_map(key)
        if name is False:
            unknown.append(key)
        elif name is not None and ".attn.qkv." in name:
            for proj, chunk in zip("qkv", value.chunk(3, dim=0), strict=True):
                out[name.replace(".qkv.", f".{proj}_proj.")] = chunk
        elif name is not None:
            out[name] = value
    if unknown:
        raise CheckpointError(f"open_clip tensors with no place in a CLIP ViT tower: {unknown}")
    return out


# ---------------------------------------------------------------------------------------
# Files


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory: an index's shards, or single files."""
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index = directory / index_name
        if index.is_file():
            return _shards(index)
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return [directory / name]
    found = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("*.bin"))
    if found:
        return found
    raise CheckpointError(
        f"no weights in {directory}: expected model.safetensors, pytorch_model.bin, "
        f"or shards with {SAFETENSORS_INDEX} / {BIN_INDEX}"
    )


def _shards(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"cannot read shard index {index}: {e}") from None
    missing = [n for n in names if not (index.parent / n).is_file()]
    if missing:
        raise CheckpointError(f"{index} lists shards that are missing: {', '.join(missing)}")
    return [index.parent / n for n in names]


def read_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, tensor) from one file. Tensors are views of a private memory map: copy
    what you need before asking for the next one; their pages are released after."""
    if path.suffix == ".safetensors":
        yield from _read_safetensors(path)
    else:
        yield from _read_bin(path)


def tensor_keys(path: Path) -> list[str]:
    """The keys of one weight file, cheaply."""
    if path.suffix == ".safetensors":
        return list(_safetensors_header(path)[0])
    return [k for k, _ in _read_bin(path, release=False)]


def _safetensors_header(path: Path) -> tuple[dict, int]:
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("file shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            size = os.fstat(f.fileno()).st_size
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a readable safetensors file: its header is not an object")
    header.pop("__metadata__", None)
    data_start = 8 + n
    for key, info in header.items():
        problem = _header_problem(info, data_start, size)
        if problem:
            raise CheckpointError(f"{path} is truncated or corrupt: tensor {key!r} {problem}")
    return header, data_start


def _header_problem(info: object, data_start: int, size: int) -> str | None:
    """What is wrong with one safetensors header entry, or None."""
    if not isinstance(info, dict):
        return "has no description"
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in SAFETENSORS_DTYPES:
        return f"has unknown dtype {dtype!r}"
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        return f"has an invalid shape {shape!r}"
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(o, int) for o in offsets) and 0 <= offsets[0] <= offsets[1]):
        return f"has invalid data_offsets {offsets!r}"
    itemsize = torch.empty((), dtype=SAFETENSORS_DTYPES[dtype]).element_size()
    begin, end = offsets
    if end - begin != math.prod(shape) * itemsize:
        return f"({dtype}, shape {shape}) does not match its {end - begin} bytes"
    if data_start + end > size:
        return f"(bytes {begin}..{end}) does not fit the file of {size} bytes"
    return None


def _read_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    header, data_start = _safetensors_header(path)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    try:
        for key, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            begin, end = info["data_offsets"]
            shape = info["shape"]
            count = end - begin
            offset = data_start + begin
            if count == 0:
                yield key, torch.empty(shape, dtype=dtype)
                continue
            itemsize = torch.empty((), dtype=dtype).element_size()
            if offset % itemsize:  # unaligned data: copy out rather than view
                raw = torch.frombuffer(bytearray(mm[offset : offset + count]), dtype=torch.uint8)
                tensor = raw.view(dtype).reshape(shape)
            else:
                tensor = torch.frombuffer(mm, dtype=dtype, count=count // itemsize, offset=offset)
                tensor = tensor.reshape(shape)
            yield key, tensor
            _release_pages(tensor)
            del tensor
    finally:
        # Not mm.close(): torch's views keep the map alive through a reference, and a
        # caller still holding one must not be left pointing at unmapped memory.
        del mm


def _read_bin(path: Path, release: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e) and "zip" not in str(e):
                raise
            # Pre-zip (legacy) files cannot be mapped; they are small in practice.
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for broken pickles / zips
        # torch's message goes on to suggest weights_only=False: wrong and unsafe here.
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {first}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict")
    state = state.get("state_dict", state) if "state_dict" in state else state
    for key in list(state):
        tensor = state.pop(key)
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is a {type(tensor).__name__}, not a tensor")
        yield key, tensor
        if release:
            _release_pages(tensor)
        del tensor


_PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_MADV_DONTNEED = 4


def _release_pages(tensor: torch.Tensor) -> None:
    """Let the OS drop the mapped file pages under a tensor we have copied out of."""
    if _libc is None or tensor.device.type != "cpu" or tensor.numel() == 0:
        return
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first = -(-start // _PAGE) * _PAGE  # whole pages only: neighbours may still be needed
    last = end // _PAGE * _PAGE
    if last > first:
        _libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)


# ---------------------------------------------------------------------------------------
# Filling a model


@dataclass
class Filler:
    """Fills the parameters of a model built on the meta device, one tensor at a time.

    Each parameter is allocated on `device` in `dtype` when its tensor arrives, so no
    second copy of the weights ever exists. `finish()` checks that every parameter was
    filled and raises one error naming every missing, unexpected or mis-shaped key.
    """

    model: nn.Module
    device: torch.device
    dtype: torch.dtype
    ignore: Callable[[str], bool] = lambda name: False
    filled: set[str] = field(default_factory=set)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.params = dict(self.model.named_parameters())

    def fill_from(self, files: list[Path], key_map: KeyMap) -> None:
        for path in files:
            for key, tensor in read_tensors(path):
                self.put(key, key_map(key), tensor, path)

    def put(self, key: str, name: str | bool | None, tensor: torch.Tensor, path: Path) -> None:
        if name is None:
            return
        if name is False or name not in self.params:
            if name and self.ignore(name):
                return
            self.unexpected.append(f"{key} (in {path.name})")
            return
        param = self.params[name]
        if tuple(tensor.shape) != tuple(param.shape):
            self.mismatched.append(
                f"{key}: checkpoint {list(tensor.shape)} vs model {list(param.shape)}")
            return
        if name in self.filled:
            self.duplicated.append(key)
            return
        value = torch.empty(param.shape, dtype=self.dtype, device=self.device)
        value.copy_(tensor)
        _set_parameter(self.model, name, value)
        self.filled.add(name)

    def finish(self, source: str) -> None:
        missing = [n for n in self.params if n not in self.filled]
        problems = []
        for label, items in (("missing", missing), ("unexpected", self.unexpected),
                             ("shape mismatch", self.mismatched),
                             ("given twice", self.duplicated)):
            if items:
                shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
                problems.append(f"{label}: {shown}")
        if problems:
            raise CheckpointError(
                f"{source} does not match the model ({'; '.join(problems)}). "
                "Check that config.json belongs to these weights."
            )


def _set_parameter(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
