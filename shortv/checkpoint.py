"""Reading checkpoint files and filling a model from them, strictly and leanly.

Formats: `.safetensors` (read with `safetensors.safe_open`) and PyTorch `.bin` (zip
archives memory-mapped by `torch.load(mmap=True)`; legacy pickles read whole), single files
or shards with an index json. Each tensor is a view of a private memory map; it is copied
(and cast) once into its parameter and the mapped pages are released right after, so peak
memory stays near the size of the model rather than model + checkpoint. Key maps turn the
published names (original LLaVA, transformers' Llava/LlavaNext old and new, HF CLIP) into
ours; every checkpoint tensor must be used or be on a short list of known-unused ones,
every parameter filled once. `check_config_against_checkpoint` compares a config with the
checkpoint's shapes (read from headers) before a model is built.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .errors import CheckpointError, ConfigError
from .models.config import LlavaConfig, projector_depth

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
    """Yield (key, tensor) from one weight file, in file order.

    Tensors are views of a private memory map of the file, not copies: copy what you need
    before asking for the next one, because the pages under each tensor are released
    (madvise) as soon as the next is asked for, and reading them again faults them back in
    from disk. An unreadable or corrupt file raises CheckpointError naming it.
    """
    if path.suffix == ".safetensors":
        yield from _read_safetensors(path)
    else:
        yield from _read_bin(path)


def tensor_keys(path: Path) -> list[str]:
    """The keys of one weight file, cheaply (from the header; no tensor data is read)."""
    if path.suffix == ".safetensors":
        with _open_safetensors(path) as f:
            return list(f.keys())
    return [k for k, _ in _read_bin(path, release=False)]


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """{key: shape} of one weight file, cheaply: from the safetensors header, or from a
    memory-mapped `torch.load` of a .bin (legacy non-zip .bin files are read whole)."""
    if path.suffix == ".safetensors":
        with _open_safetensors(path) as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    return {k: tuple(t.shape) for k, t in _read_bin(path, release=False)}


def checkpoint_shapes(files: Iterable[Path]) -> dict[str, tuple[int, ...]]:
    """{key: shape} over all the weight files of a checkpoint (e.g. `weight_files(d)`),
    keys as they are written in the files. A key given twice keeps its first shape (the
    Filler reports duplicates when loading)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        for key, shape in tensor_shapes(path).items():
            shapes.setdefault(key, shape)
    return shapes


@contextmanager
def _open_safetensors(path: Path) -> Iterator[Any]:
    """safe_open on the CPU, its errors as CheckpointError naming the file.

    safe_open validates the whole header when it opens the file (JSON, dtypes, shapes
    against byte counts, offsets contiguous and covering exactly the rest of the file), so
    a truncated or corrupt file fails here, before any tensor is handed out. Its
    SafetensorError does not say which file; ours does. Dtypes that safetensors knows but
    a model parameter cannot be cast from (sub-byte floats, ...) are refused here too.
    """
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except SafetensorError as e:
        raise CheckpointError(f"{path} is truncated or corrupt, not a readable safetensors file: {e}"
                              ) from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    with handle as f:
        for key in f.keys():
            dtype = f.get_slice(key).get_dtype()
            if dtype not in SAFETENSORS_DTYPES:
                raise CheckpointError(f"{path}: tensor {key!r} has dtype {dtype}, which shortv "
                                      f"cannot load (known: {', '.join(SAFETENSORS_DTYPES)})")
        yield f


def _read_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    with _open_safetensors(path) as f:
        # File order: the pages are then read front to back, which the kernel reads ahead.
        # (offset_keys is missing from older safetensors releases; any order is correct.)
        for key in getattr(f, "offset_keys", f.keys)():
            # With the default "mmap" backend, get_tensor returns a view of safe_open's
            # private (copy-on-write) map of the whole file: no bytes are copied here, and
            # the caller's copy_ into its parameter is the only copy (cast included).
            tensor = f.get_tensor(key)
            if tensor.numel() and tensor.data_ptr() % tensor.element_size():
                # Data at an offset that is not a multiple of its element size (a hand-made
                # file; safetensors itself pads): give the caller an aligned copy rather
                # than a misaligned view.
                tensor = tensor.view(torch.uint8).clone().view(tensor.dtype)
            yield key, tensor
            _release_pages(tensor)
            del tensor


# Every file torch.save has written since 1.6 is a zip archive; older ("legacy") files
# are a bare pickle stream, which torch cannot memory-map.
_ZIP_MAGIC = b"PK\x03\x04"


def _read_bin(path: Path, release: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        with open(path, "rb") as f:
            zipped = f.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    try:
        # Legacy files are read whole (they are small in practice); anything that is
        # neither a zip nor a pickle fails in torch.load either way.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
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
    # Parameters whose tensor a loader takes instead of a new parameter (a quantized
    # layer's weight: `QuantizedLinear.load_weight(tensor, dtype, device)`).
    load_into: Mapping[str, Callable[[torch.Tensor, torch.dtype, torch.device], None]] = field(
        default_factory=dict)
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
        if name in self.load_into:
            self.load_into[name](tensor, self.dtype, self.device)
            self.filled.add(name)
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


def tie(model: nn.Module, tied: Iterable[tuple[str, str]]) -> None:
    """Make each (parameter, the one it shares) pair one tensor (tied input and output
    embeddings), after the shared one is filled."""
    for name, shared in tied:
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, model.get_parameter(shared))


def _set_parameter(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    owner._parameters[attr] = nn.Parameter(value, requires_grad=False)


# ---------------------------------------------------------------------------------------
# The config against the checkpoint, before anything is built

_LAYOUTS = {"original": ORIGINAL_LAYOUT, "transformers": TRANSFORMERS_LAYOUT}

# Our parameter names (after the key maps) → the shape each must have, as symbols for the
# config quantities below. Layer indices are matched, not enumerated, so that the table
# stays small and a checkpoint of any depth costs one pass over its keys.
_SHAPE_RULES: list[tuple[re.Pattern[str], tuple[str, ...]]] = [
    (re.compile(p + r"\Z"), symbols) for p, symbols in [
        (r"decoder\.(?:embed_tokens|lm_head)\.weight", ("V", "H")),
        (r"decoder\.(?:norm|layers\.\d+\.(?:attn|mlp)_norm)\.weight", ("H",)),
        (r"decoder\.layers\.\d+\.attn\.q_proj\.weight", ("Q", "H")),
        (r"decoder\.layers\.\d+\.attn\.q_proj\.bias", ("Q",)),
        (r"decoder\.layers\.\d+\.attn\.[kv]_proj\.weight", ("K", "H")),
        (r"decoder\.layers\.\d+\.attn\.[kv]_proj\.bias", ("K",)),
        (r"decoder\.layers\.\d+\.attn\.o_proj\.weight", ("H", "Q")),
        (r"decoder\.layers\.\d+\.(?:attn\.o|mlp\.down)_proj\.bias", ("H",)),
        (r"decoder\.layers\.\d+\.mlp\.(?:gate|up)_proj\.weight", ("I", "H")),
        (r"decoder\.layers\.\d+\.mlp\.(?:gate|up)_proj\.bias", ("I",)),
        (r"decoder\.layers\.\d+\.mlp\.down_proj\.weight", ("H", "I")),
        (r"vision\.patch_embed\.weight", ("W", "C", "P", "P")),
        (r"vision\.class_embedding", ("W",)),
        (r"vision\.position_embedding", ("N", "W")),
        (r"vision\.(?:pre_norm|layers\.\d+\.norm[12])\.(?:weight|bias)", ("W",)),
        (r"vision\.layers\.\d+\.attn\.(?:q|k|v|out)_proj\.weight", ("W", "W")),
        (r"vision\.layers\.\d+\.(?:attn\.(?:q|k|v|out)_proj|mlp\.fc2)\.bias", ("W",)),
        (r"vision\.layers\.\d+\.mlp\.fc1\.weight", ("M", "W")),
        (r"vision\.layers\.\d+\.mlp\.fc1\.bias", ("M",)),
        (r"vision\.layers\.\d+\.mlp\.fc2\.weight", ("W", "M")),
        (r"projector\.0\.weight", ("H", "F")),
        (r"projector\.[1-9]\d*\.weight", ("H", "H")),
        (r"projector\.\d+\.bias", ("H",)),
        (r"image_newline", ("H",)),
    ]
]
# The order in which disagreements are reported: the most telling first.
_SYMBOL_ORDER = "HVQKIWMNPCF"
_LAYER_INDEX = re.compile(r"(decoder|vision)\.layers\.(\d+)\.")
_PROJECTOR_LINEAR = re.compile(r"projector\.(\d+)\.weight\Z")


def check_config_against_checkpoint(
    config: LlavaConfig,
    shapes: Mapping[str, Sequence[int]],
    layout: str,
    tower_shapes: Mapping[str, Sequence[int]] | None = None,
) -> None:
    """Check a parsed config against the tensor shapes of its checkpoint, before a model is
    built: decoder layer count, hidden size, vocabulary, heads × head_dim (query and
    key/value), MLP size, projector depth and widths, and the vision tower's layer count,
    width, MLP size, patch size and position count.

    shapes: {key: shape} of every tensor of the checkpoint directory, keys exactly as in
        its files (`checkpoint_shapes(weight_files(directory))`).
    layout: "original" or "transformers" (as `config.detect_layout` says); it picks the
        key map, ORIGINAL_LAYOUT or TRANSFORMERS_LAYOUT, that names the tensors.
    tower_shapes: the same for a separate CLIP tower directory (original LLaVA-1.5, whose
        checkpoint has no `model.vision_tower.*`), read with CLIP_TOWER_LAYOUT; None when
        the checkpoint carries its tower.

    Only what the files hold is checked: tensors that are missing, unknown or given twice
    are left to `Filler.finish`, which names them all. Reads shapes only and allocates
    nothing. Raises ConfigError naming the config field when the checkpoint's tensors
    agree with each other on a size and the config says another (e.g. "config.json says
    num_hidden_layers=12 but the checkpoint has decoder layers 0..7"), CheckpointError
    when single tensors disagree with an otherwise matching config. Heads alone (as
    opposed to heads × head_dim) leave no trace in the shapes and cannot be checked.
    """
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(_LAYOUTS)}, not {layout!r}")
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}  # our name → (key, shape)
    for source, key_map in ((shapes, KeyMap(_LAYOUTS[layout])),
                            (tower_shapes or {}, KeyMap(CLIP_TOWER_LAYOUT))):
        for key, shape in source.items():
            name = key_map(key)
            if isinstance(name, str):
                tensors.setdefault(name, (key, tuple(shape)))

    says = _config_sayer(layout, separate_tower=tower_shapes is not None)
    problems, late = _layer_problems(config, tensors, says, layout)
    quantities = _quantities(config, says)
    seen: dict[str, Counter[int]] = {s: Counter() for s in quantities}
    example: dict[tuple[str, int], tuple[str, tuple[int, ...]]] = {}
    ruled: list[tuple[str, tuple[int, ...], tuple[str, ...]]] = []
    for name, (key, shape) in tensors.items():
        symbols = next((s for pattern, s in _SHAPE_RULES if pattern.match(name)), None)
        if symbols is None:
            continue
        ruled.append((key, shape, symbols))
        if len(shape) == len(symbols):
            for symbol, size in zip(symbols, shape, strict=True):
                seen[symbol][size] += 1
                example.setdefault((symbol, size), (key, shape))
    for symbol in _SYMBOL_ORDER:
        if not seen[symbol]:
            continue
        expected, description = quantities[symbol]
        # What most tensors say: one odd tensor is a broken checkpoint, not a wrong config.
        size = seen[symbol].most_common(1)[0][0]
        if size != expected:
            key, shape = example[symbol, size]
            problems.append(f"{description} but the checkpoint has {size} "
                            f"({key} is {list(shape)})")
    problems += late
    if problems:
        # The first disagreement is the telling one; the others mostly follow from it.
        more = f" (and {len(problems) - 1} more disagreement(s))" if len(problems) > 1 else ""
        raise ConfigError(f"{problems[0]}{more}. Check that config.json belongs to these weights.")

    mismatched = []
    for key, shape, symbols in ruled:
        want = tuple(quantities[s][0] for s in symbols)
        if shape != want:
            mismatched.append(f"{key}: checkpoint {list(shape)} vs config {list(want)}")
    if mismatched:
        shown = ", ".join(mismatched[:4]) + (f", ... ({len(mismatched)} in all)"
                                             if len(mismatched) > 4 else "")
        raise CheckpointError(f"the checkpoint does not match its config (shape mismatch: {shown})")


def expected_shape(config: LlavaConfig, name: str) -> tuple[int, ...] | None:
    """The shape `config` gives our parameter `name` (e.g. "decoder.layers.0.attn.q_proj.weight"),
    from the same table the checker uses; None for a name the table does not cover."""
    symbols = next((s for pattern, s in _SHAPE_RULES if pattern.match(name)), None)
    if symbols is None:
        return None
    quantities = _quantities(config, lambda where, what: what)
    return tuple(quantities[s][0] for s in symbols)


def _config_sayer(layout: str, separate_tower: bool) -> Callable[[str, str], str]:
    """Where a field lives, for messages: says("text", "hidden_size=4096")."""
    if layout == "transformers":
        places = {"text": "config.json's text_config says", "vision": "config.json's vision_config says"}
    else:
        places = {"text": "config.json says", "vision": "the vision tower's config"
                  + (".json" if separate_tower else "") + " says"}
    return lambda where, what: f"{places[where]} {what}"


def _quantities(config: LlavaConfig, says: Callable[[str, str], str]) -> dict[str, tuple[int, str]]:
    """Symbol → (the size the config implies, how to name it in a message)."""
    t, v = config.text, config.vision
    q, k = t.heads * t.head_dim, t.kv_heads * t.head_dim
    selected = len(config.vision_select_layers)
    return {
        "V": (t.vocab_size, says("text", f"vocab_size={t.vocab_size}")),
        "H": (t.hidden_size, says("text", f"hidden_size={t.hidden_size}")),
        "Q": (q, says("text", f"num_attention_heads × head_dim = {t.heads} × {t.head_dim} = {q}")),
        "K": (k, says("text", f"num_key_value_heads × head_dim = {t.kv_heads} × {t.head_dim} = {k}")),
        "I": (t.intermediate_size, says("text", f"intermediate_size={t.intermediate_size}")),
        "W": (v.width, says("vision", f"hidden_size={v.width}")),
        "M": (v.mlp_dim, says("vision", f"intermediate_size={v.mlp_dim}")),
        "N": (v.num_patches + 1, says("vision", f"image_size={v.image_size} and patch_size="
                                                f"{v.patch_size}, so {v.num_patches + 1} positions")),
        "P": (v.patch_size, says("vision", f"patch_size={v.patch_size}")),
        "C": (v.channels, says("vision", f"num_channels={v.channels}")),
        "F": (config.vision_feature_size, says("vision", f"hidden_size={v.width}") + (
            f" and {selected} layers are selected" if selected > 1 else "")
            + f", so the projector takes {config.vision_feature_size} features"),
    }


def _layer_problems(config: LlavaConfig, tensors: Mapping[str, tuple[str, tuple[int, ...]]],
                    says: Callable[[str, str], str], layout: str) -> tuple[list[str], list[str]]:
    """Layer counts of the decoder, the tower and the projector against the config: the
    problems to report before the sizes', and those to report after them (a too-short
    tower or projector is less telling than a width that disagrees)."""
    indices: dict[str, set[int]] = {"decoder": set(), "vision": set()}
    linears = set()
    for name in tensors:
        if m := _LAYER_INDEX.match(name):
            indices[m[1]].add(int(m[2]))
        elif m := _PROJECTOR_LINEAR.match(name):
            linears.add(int(m[1]))
    problems, late = [], []
    decoder, tower = indices["decoder"], indices["vision"]
    if decoder and max(decoder) + 1 != config.text.layers:
        problems.append(says("text", f"num_hidden_layers={config.text.layers}")
                        + f" but the checkpoint has decoder layers {_spans(decoder)}")
    # A tower may stop after the deepest layer LLaVA reads (the rest is never run), but
    # cannot have more layers than its config says.
    if tower and max(tower) + 1 > config.vision.layers:
        problems.append(says("vision", f"num_hidden_layers={config.vision.layers}")
                        + f" but the checkpoint has tower layers {_spans(tower)}")
    elif tower and max(tower) + 1 < config.vision_depth:
        field = "mm_vision_select_layer" if layout == "original" else "vision_feature_layer"
        selected = ", ".join(map(str, config.vision_select_layers))
        late.append(f"config.json's {field}={selected} of a {config.vision.layers}-layer tower "
                        f"needs tower layers 0..{config.vision_depth - 1} but the checkpoint has "
                        f"{_spans(tower)}")
    depth = projector_depth(config.projector)
    if linears and len(linears) != depth:
        kind = (f"config.json says mm_projector_type={config.projector!r}, {depth} linear layer(s),"
                if layout == "original" else f"transformers' projector has {depth} linear layers")
        late.append(f"{kind} but the checkpoint's projector has {len(linears)}")
    return problems, late


def _spans(indices: set[int]) -> str:
    """{0, 1, 2, 3, 7} → '0..3, 7' (at most a few spans)."""
    spans: list[str] = []
    ordered = sorted(indices)
    start = prev = ordered[0]
    for i in [*ordered[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        spans.append(str(start) if start == prev else f"{start}..{prev}")
        if i is not None:
            start = prev = i
    return ", ".join(spans[:4]) + (", ..." if len(spans) > 4 else "")
