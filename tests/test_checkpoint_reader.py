"""The weight-file readers in shortv.checkpoint: safetensors through `safe_open`, PyTorch
.bin through `torch.load`. Tensors come back equal to what was written, as views of the
file (no copy) unless their data is misaligned; parameters are cast while filled; every
broken file, including 100 randomly mutated headers, is a CheckpointError naming the file.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from shortv.checkpoint import (
    SAFETENSORS_DTYPES,
    Filler,
    KeyMap,
    checkpoint_shapes,
    read_tensors,
    tensor_keys,
    tensor_shapes,
)
from shortv.errors import CheckpointError


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(5, 7, generator=g),
        "f16": torch.randn(3, 3, generator=g).half(),
        "bf16": torch.randn(4, generator=g).bfloat16(),
        "f64": torch.randn(2, 2, generator=g).double(),
        "i64": torch.arange(-3, 6),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 1, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "big": torch.randn(256, 1024, generator=g),  # 1 MiB: spans many pages
    }


def read_all(path: Path) -> dict[str, torch.Tensor]:
    # The reader's tensors are only valid until the next one is asked for: copy as we go.
    return {key: tensor.clone() for key, tensor in read_tensors(path)}


def raw_safetensors(path: Path, header: object, data: bytes = b"", length: int | None = None) -> Path:
    text = json.dumps(header).encode()
    path.write_bytes((len(text) if length is None else length).to_bytes(8, "little") + text + data)
    return path


# ---- safetensors: values, dtypes, shapes -------------------------------------------------------


def test_safetensors_round_trip(tmp_path: Path):
    written = sample_tensors()
    path = tmp_path / "model.safetensors"
    save_file(written, str(path), metadata={"format": "pt"})
    read = read_all(path)
    assert sorted(read) == sorted(written)
    for key, tensor in written.items():
        assert read[key].dtype == tensor.dtype, key
        assert read[key].shape == tensor.shape, key
        assert torch.equal(read[key], tensor), key
    assert sorted(tensor_keys(path)) == sorted(written)
    assert tensor_shapes(path) == {k: tuple(t.shape) for k, t in written.items()}


def test_safetensors_tensors_come_in_file_order(tmp_path: Path):
    path = tmp_path / "model.safetensors"
    save_file({"b": torch.zeros(3), "a": torch.ones(10), "c": torch.zeros(1)}, str(path))
    raw = path.read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    header.pop("__metadata__", None)
    by_offset = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    assert [k for k, _ in read_tensors(path)] == by_offset


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_safetensors_tensors_are_views_of_the_file_not_copies(tmp_path: Path):
    """get_tensor hands out a view of safe_open's memory map (the caller's copy into its
    parameter is then the only copy), and nothing stays mapped once the file is read."""
    path = tmp_path / "model.safetensors"
    save_file({"big": torch.randn(512, 1024), "small": torch.randn(8)}, str(path))

    def mapping_of(address: int) -> str | None:
        for line in Path("/proc/self/maps").read_text().splitlines():
            span, *rest = line.split(maxsplit=5)
            low, high = (int(x, 16) for x in span.split("-"))
            if low <= address < high:
                return rest[-1] if len(rest) == 5 else ""
        return None

    for key, tensor in read_tensors(path):
        assert mapping_of(tensor.data_ptr()) == str(path.resolve()), key
    del tensor
    assert str(path.resolve()) not in Path("/proc/self/maps").read_text()


def test_unaligned_safetensors_data(tmp_path: Path):
    """A hand-made file whose float data sits at an odd offset (safetensors pads its own
    headers to 8 bytes; this one is not padded): values right, and handed out aligned."""
    floats = torch.tensor([1.5, -2.0, 3.25], dtype=torch.float32)
    halves = torch.tensor([0.5, 4.0], dtype=torch.float16)
    header = {
        "u8": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
        "f32": {"dtype": "F32", "shape": [3], "data_offsets": [3, 15]},
        "f16": {"dtype": "F16", "shape": [2], "data_offsets": [15, 19]},
        "none": {"dtype": "F32", "shape": [0, 5], "data_offsets": [19, 19]},
    }
    data = bytes([7, 8, 9]) + floats.numpy().tobytes() + halves.numpy().tobytes()
    path = raw_safetensors(tmp_path / "odd.safetensors", header, data)
    seen = {}
    for key, tensor in read_tensors(path):
        if tensor.numel():
            assert tensor.data_ptr() % tensor.element_size() == 0, key
        seen[key] = tensor.clone()
    assert torch.equal(seen["u8"], torch.tensor([7, 8, 9], dtype=torch.uint8))
    assert torch.equal(seen["f32"], floats)
    assert torch.equal(seen["f16"], halves)
    assert seen["none"].shape == (0, 5) and seen["none"].dtype == torch.float32


def test_empty_file_of_tensors(tmp_path: Path):
    path = tmp_path / "model.safetensors"
    save_file({}, str(path))
    assert read_all(path) == {}
    assert tensor_keys(path) == [] and tensor_shapes(path) == {}


def test_filler_casts_while_copying(tmp_path: Path):
    """Each parameter is allocated in the target dtype and filled by one copy_ from the
    file's tensor, whatever the file's dtype."""
    g = torch.Generator().manual_seed(1)
    written = {"weight": torch.randn(6, 4, generator=g).double(), "bias": torch.randn(6, generator=g)}
    path = tmp_path / "model.safetensors"
    save_file(written, str(path))
    identity = KeyMap([("", "", [(r"(weight|bias)", r"\1")])])
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        with torch.device("meta"):
            model = nn.Linear(4, 6)
        filler = Filler(model, torch.device("cpu"), dtype)
        filler.fill_from([path], identity)
        filler.finish(str(path))
        assert model.weight.dtype == dtype and model.bias.dtype == dtype
        assert torch.equal(model.weight, written["weight"].to(dtype))
        assert torch.equal(model.bias, written["bias"].to(dtype))


def test_checkpoint_shapes_over_shards(tmp_path: Path):
    save_file({"a": torch.zeros(2, 3)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    torch.save({"b": torch.zeros(4), "c": torch.zeros(())}, tmp_path / "pytorch_model.bin")
    files = [tmp_path / "model-00001-of-00002.safetensors", tmp_path / "pytorch_model.bin"]
    assert checkpoint_shapes(files) == {"a": (2, 3), "b": (4,), "c": ()}


# ---- safetensors: broken files -----------------------------------------------------------------


def good_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(4, 3), "b": torch.randn(3).half(), "i": torch.arange(5),
               "z": torch.zeros(0, 2)}, str(path), metadata={"format": "pt"})
    return path


def assert_unreadable(path: Path, *fragments: str) -> str:
    """Every entry point refuses `path` with a CheckpointError naming it."""
    messages = []
    for read in (read_all, tensor_keys, tensor_shapes):
        with pytest.raises(CheckpointError) as info:
            read(path)
        messages.append(str(info.value))
        assert str(path) in messages[-1], messages[-1]
        for fragment in fragments:
            assert fragment in messages[-1], messages[-1]
    return messages[0]


@pytest.mark.parametrize("damage", [
    "empty", "short", "not-json", "huge-length", "truncated-data", "trailing-bytes",
    "list-header", "no-offsets", "shape-vs-bytes", "unknown-dtype", "unsupported-dtype",
    "offsets-past-the-end", "overlapping", "negative-shape",
])
def test_broken_safetensors(tmp_path: Path, damage: str):
    path = tmp_path / "model.safetensors"
    f32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    if damage in ("truncated-data", "trailing-bytes"):
        raw = good_file(tmp_path).read_bytes()
        path.write_bytes(raw[:-5] if damage == "truncated-data" else raw + b"\0" * 8)
    elif damage in ("empty", "short", "not-json", "huge-length"):
        path.write_bytes({
            "empty": b"", "short": b"\x05\x00\x00",
            "not-json": b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all",
            "huge-length": (2**40).to_bytes(8, "little") + b"{}",
        }[damage])
    else:
        header = {
            "list-header": [],
            "no-offsets": {"t": {"dtype": "F32", "shape": [2]}},
            "shape-vs-bytes": {"t": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 8]}},
            "unknown-dtype": {"t": {**f32, "dtype": "Q9"}},
            "unsupported-dtype": {"t": {**f32, "dtype": "U32"}},  # safetensors knows it; we do not
            "offsets-past-the-end": {"t": {**f32, "data_offsets": [0, 80]}},
            "overlapping": {"t": f32, "u": {**f32, "data_offsets": [4, 12]}},
            "negative-shape": {"t": {**f32, "shape": [-2]}},
        }[damage]
        raw_safetensors(path, header, b"\0" * 8)
    message = assert_unreadable(path)
    if damage == "unsupported-dtype":
        assert "U32" in message
    if damage == "truncated-data":
        assert "truncated" in message


def test_missing_or_unreadable_path(tmp_path: Path):
    with pytest.raises(CheckpointError, match=r"nothing\.safetensors"):
        read_all(tmp_path / "nothing.safetensors")
    folder = tmp_path / "folder.safetensors"
    folder.mkdir()
    with pytest.raises(CheckpointError, match=r"folder\.safetensors"):
        tensor_keys(folder)


VALUES = [0, -1, 1, 3, 2**63, 2**64, -(2**63), 1.5, "x", None, [], {}, [1], [0, 0], [0, 2**64],
          True, "F32", "Q9", "U16", "F4", "F8_E8M0", "BOOL", "BF16", [2**40, 2**40], [-1, 3], 10**30]


def mutated(base: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One random mutation of a safetensors file's header (or of its length field / data)."""
    n = int.from_bytes(base[:8], "little")
    header, data = json.loads(base[8 : 8 + n]), base[8 + n :]
    key = rng.choice([k for k in header if k != "__metadata__"])
    length = None
    kind = rng.choice(["dtype", "shape", "offsets", "drop-field", "entry", "metadata", "data",
                       "length", "byte"])
    if kind == "dtype":
        header[key]["dtype"] = rng.choice(VALUES)
    elif kind == "shape":
        header[key]["shape"] = (rng.choice(VALUES) if rng.random() < 0.5 else
                                [rng.choice([0, 1, 2, 3, 4, -1, 2**62]) for _ in range(rng.randrange(4))])
    elif kind == "offsets":
        header[key]["data_offsets"] = (rng.choice(VALUES) if rng.random() < 0.5 else
                                       [rng.randrange(-5, 120), rng.randrange(-5, 120)])
    elif kind == "drop-field":
        del header[key][rng.choice(["dtype", "shape", "data_offsets"])]
    elif kind == "entry":
        header[key] = rng.choice(VALUES)
    elif kind == "metadata":
        header["__metadata__"] = rng.choice(VALUES)
    elif kind == "data":
        data = data[: rng.randrange(len(data))] if rng.random() < 0.7 else data + bytes(rng.randrange(1, 20))
    elif kind == "length":
        length = rng.choice([0, 1, 7, n - 1, n + 1, 2**64 - 1, 2**63, len(base)])
    text = json.dumps(header).encode()
    if kind == "byte":
        i = rng.randrange(len(text))
        text = text[:i] + bytes([rng.randrange(256)]) + text[i + 1 :]
    return (len(text) if length is None else length).to_bytes(8, "little") + text + data, kind


def test_mutated_safetensors_headers_give_only_checkpoint_errors(tmp_path: Path):
    """100 seeded random mutations: each file either reads (values then have the dtypes
    and shapes its header claims) or fails with a CheckpointError naming it."""
    base = good_file(tmp_path).read_bytes()
    path = tmp_path / "mutated.safetensors"
    outcomes = {"read": 0, "refused": 0}
    for seed in range(100):
        raw, kind = mutated(base, random.Random(seed))
        path.write_bytes(raw)
        for read in (read_all, tensor_keys, tensor_shapes):
            try:
                result = read(path)
            except CheckpointError as e:
                assert str(path) in str(e), (seed, kind, str(e))
                outcomes["refused"] += 1
                continue
            except BaseException as e:  # anything else is a bug: say which mutation
                raise AssertionError(f"seed {seed} ({kind}): {type(e).__name__}: {e}") from e
            outcomes["read"] += 1
            if read is read_all:
                shapes = tensor_shapes(path)
                for key, tensor in result.items():
                    assert tuple(tensor.shape) == shapes[key]
                    assert tensor.dtype in SAFETENSORS_DTYPES.values()
    assert outcomes["refused"] > 200  # most mutations break the file


# ---- PyTorch .bin --------------------------------------------------------------------------------


@pytest.mark.parametrize("legacy", [False, True])
def test_bin_round_trip(tmp_path: Path, legacy: bool):
    written = sample_tensors()
    path = tmp_path / "pytorch_model.bin"
    torch.save(written, path, _use_new_zipfile_serialization=not legacy)
    assert (path.read_bytes()[:4] == b"PK\x03\x04") is not legacy
    read = read_all(path)
    assert sorted(read) == sorted(written)
    for key, tensor in written.items():
        assert read[key].dtype == tensor.dtype and torch.equal(read[key], tensor), key
    assert sorted(tensor_keys(path)) == sorted(written)
    assert tensor_shapes(path) == {k: tuple(t.shape) for k, t in written.items()}


@pytest.mark.parametrize("legacy", [False, True])
def test_bin_is_memory_mapped_exactly_when_it_is_a_zip(tmp_path: Path, monkeypatch, legacy: bool):
    """The decision to memory-map comes from the file's magic bytes, not from retrying on
    an error message: zip archives (torch >= 1.6) are mapped, legacy pickles cannot be."""
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(3)}, path, _use_new_zipfile_serialization=not legacy)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("mmap"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    assert torch.equal(read_all(path)["w"], torch.ones(3))
    assert calls == [not legacy]


@pytest.mark.parametrize("content", [b"", b"garbage!" * 100, b"PK\x03\x04" + b"not a zip" * 20,
                                     b"\x80\x02" + b"broken pickle"])
def test_broken_bin(tmp_path: Path, content: bytes):
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(content)
    assert_unreadable(path)


def test_bin_holding_something_else(tmp_path: Path):
    path = tmp_path / "pytorch_model.bin"
    torch.save([torch.zeros(2)], path)
    assert_unreadable(path, "list")
    torch.save({"w": torch.zeros(2), "step": 3}, path)
    with pytest.raises(CheckpointError, match="'step'"):
        read_all(path)
