"""Loading: every broken checkpoint gives a clear shortv error naming the problem; dtype and
device are honoured; both published layouts load the same weights; weights are held once.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import shortv

from . import checkpoints


@pytest.fixture(scope="session")
def original_bin(tmp_path_factory: pytest.TempPathFactory, hf_llava: Path) -> Path:
    return checkpoints.original_bin_checkpoint(hf_llava, tmp_path_factory.mktemp("orig-v15-bin"))


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    tower = config.get("mm_vision_tower")
    if tower and Path(tower).is_absolute() and Path(tower).parent == src:
        config["mm_vision_tower"] = str(dst / Path(tower).name)  # the copy's own tower
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def load(directory: Path, **kwargs) -> shortv.LLaVA:
    return shortv.load(directory, device=kwargs.pop("device", "cpu"), **kwargs)


def load_error(directory: Path, kind: type[Exception], *fragments: str, **kwargs) -> str:
    """Loading fails with `kind` (a ShortVError) and a message holding every fragment."""
    assert issubclass(kind, shortv.ShortVError)
    with pytest.raises(kind) as info:
        load(directory, **kwargs)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def header(path: Path) -> dict:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n])


def write_raw_safetensors(path: Path, head: object, data: bytes = b"") -> None:
    text = json.dumps(head).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


def find_key(keys, fragment: str) -> str:
    (key,) = [k for k in keys if fragment in k]
    return key


# ---- damaged weight files ---------------------------------------------------------------------


def test_truncated_safetensors(tmp_path: Path, hf_llava: Path):
    d = copy(hf_llava, tmp_path / "ck")
    path = d / "model.safetensors"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    load_error(d, shortv.CheckpointError, str(path), "truncated")


@pytest.mark.parametrize("content", ["empty", "short", "not-json", "huge-length"])
def test_unreadable_safetensors_header(tmp_path: Path, hf_llava: Path, content: str):
    d = copy(hf_llava, tmp_path / "ck")
    path = d / "model.safetensors"
    path.write_bytes({
        "empty": b"",
        "short": b"\x05\x00\x00",
        "not-json": b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all",
        "huge-length": (2**40).to_bytes(8, "little") + b"{}",
    }[content])
    load_error(d, shortv.CheckpointError, str(path))


@pytest.mark.parametrize("content", ["list-header", "no-offsets", "shape-vs-bytes", "unknown-dtype"])
def test_corrupt_safetensors_header(tmp_path: Path, hf_llava: Path, content: str):
    d = copy(hf_llava, tmp_path / "ck")
    path = d / "model.safetensors"
    key = "language_model.model.norm.weight"
    head = {
        "list-header": [],
        "no-offsets": {key: {"dtype": "F32", "shape": [1]}},
        "shape-vs-bytes": {key: {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4]}},
        "unknown-dtype": {key: {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}},
    }[content]
    write_raw_safetensors(path, head, b"\0" * 4)
    load_error(d, shortv.CheckpointError, str(path))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "not-a-dict"])
def test_corrupt_bin_shard(tmp_path: Path, original_bin: Path, damage: str):
    d = copy(original_bin, tmp_path / "ck")
    shard = d / "pytorch_model-00002-of-00003.bin"
    raw = shard.read_bytes()
    if damage == "truncated":
        shard.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        shard.write_bytes(b"garbage!" * 100)
    elif damage == "empty":
        shard.write_bytes(b"")
    else:
        torch.save([torch.zeros(2)], shard)
    load_error(d, shortv.CheckpointError, str(shard))


def test_shard_index_lists_a_missing_shard(tmp_path: Path, original_bin: Path):
    d = copy(original_bin, tmp_path / "ck")
    (d / "pytorch_model-00003-of-00003.bin").unlink()
    load_error(d, shortv.CheckpointError, "pytorch_model-00003-of-00003.bin", "missing")


def test_sharded_safetensors_index_lists_a_missing_shard(tmp_path: Path, hf_llava: Path):
    d = checkpoints.to_original(hf_llava, tmp_path / "ck", fmt="safetensors", shards=2)
    assert load(d).num_layers == 4  # the intact sharded checkpoint loads
    (d / "model-00001-of-00002.safetensors").unlink()
    load_error(d, shortv.CheckpointError, "model-00001-of-00002.safetensors", "missing")


def test_unreadable_shard_index(tmp_path: Path, original_bin: Path):
    d = copy(original_bin, tmp_path / "ck")
    index = d / "pytorch_model.bin.index.json"
    index.write_text("{")
    load_error(d, shortv.CheckpointError, str(index))


# ---- missing files / broken config ---------------------------------------------------------------


def test_no_weights(tmp_path: Path, hf_llava: Path):
    d = copy(hf_llava, tmp_path / "ck")
    (d / "model.safetensors").unlink()
    load_error(d, shortv.CheckpointError, str(d), "no weights")


def test_no_config(tmp_path: Path, hf_llava: Path):
    d = copy(hf_llava, tmp_path / "ck")
    (d / "config.json").unlink()
    load_error(d, shortv.CheckpointError, str(d), "config.json")


def test_nonexistent_source(tmp_path: Path):
    missing = tmp_path / "nothing-here"
    load_error(missing, shortv.ModelNotFoundError, str(missing))


@pytest.mark.parametrize("content,kind,fragments", [
    ("{oops", shortv.CheckpointError, ["config.json", "JSON"]),
    ("[1, 2]", shortv.CheckpointError, ["config.json", "list"]),
    ('{"architectures": ["BertModel"], "model_type": "bert"}', shortv.ConfigError,
     ["BertModel", "not a LLaVA or Qwen2-VL model"]),
    ('{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}', shortv.ConfigError,
     ["LlamaForCausalLM", "not a LLaVA or Qwen2-VL model"]),
    ("{}", shortv.ConfigError, ["not a LLaVA or Qwen2-VL model"]),
])
def test_broken_config(tmp_path: Path, hf_llava: Path, content: str, kind, fragments):
    d = copy(hf_llava, tmp_path / "ck")
    (d / "config.json").write_text(content)
    load_error(d, kind, *fragments)


def edit_config(d: Path, edit) -> Path:
    config = json.loads((d / "config.json").read_text())
    edit(config)
    (d / "config.json").write_text(json.dumps(config))
    return d


@pytest.mark.parametrize("case", [
    "text_config-not-a-dict", "strategy", "feature-layer", "hidden-size-not-a-number",
])
def test_bad_transformers_config_values(tmp_path: Path, hf_llava: Path, case: str):
    def edit(c):
        if case == "text_config-not-a-dict":
            c["text_config"] = "oops"
        elif case == "strategy":
            c["vision_feature_select_strategy"] = "weird"
        elif case == "feature-layer":
            c["vision_feature_layer"] = -9
        else:
            c["text_config"]["hidden_size"] = "big"

    d = edit_config(copy(hf_llava, tmp_path / "ck"), edit)
    fragment = {"text_config-not-a-dict": "config.json", "strategy": "weird",
                "feature-layer": "-9", "hidden-size-not-a-number": "hidden_size"}[case]
    load_error(d, shortv.ShortVError, fragment)


def test_unsupported_projector_type(tmp_path: Path, original_v15: Path):
    d = edit_config(copy(original_v15, tmp_path / "ck"),
                    lambda c: c.update(mm_projector_type="qformer"))
    load_error(d, shortv.ConfigError, "qformer")


def test_missing_vision_tower(tmp_path: Path, original_v15: Path):
    nowhere = tmp_path / "no-such-tower"
    d = edit_config(copy(original_v15, tmp_path / "ck"),
                    lambda c: c.update(mm_vision_tower=str(nowhere)))
    load_error(d, shortv.ModelNotFoundError, str(nowhere))


def test_vision_tower_repo_not_available_offline(tmp_path: Path, original_v15: Path):
    d = edit_config(copy(original_v15, tmp_path / "ck"),
                    lambda c: c.update(mm_vision_tower="nobody/clip-vit-nothing"))
    load_error(d, shortv.ModelNotFoundError, "nobody/clip-vit-nothing")


# ---- tensors that do not match the model -----------------------------------------------------


def rewrite(path: Path, edit) -> None:
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path), metadata={"format": "pt"})


def test_missing_tensor(tmp_path: Path, hf_llava: Path):
    d = copy(hf_llava, tmp_path / "ck")
    rewrite(d / "model.safetensors",
            lambda s: s.pop(find_key(s, "layers.1.mlp.up_proj.weight")))
    load_error(d, shortv.CheckpointError, "missing", "layers.1.mlp.up_proj.weight")


def test_unexpected_tensor(tmp_path: Path, hf_llava: Path):
    d = copy(hf_llava, tmp_path / "ck")
    rewrite(d / "model.safetensors",
            lambda s: s.update({"language_model.model.layers.0.mlp.bogus.weight": torch.zeros(3)}))
    load_error(d, shortv.CheckpointError, "unexpected",
               "language_model.model.layers.0.mlp.bogus.weight")


def test_misshaped_tensor(tmp_path: Path, hf_llava: Path):
    d = copy(hf_llava, tmp_path / "ck")
    names = list(load_file(str(d / "model.safetensors")))
    key = find_key(names, "model.layers.2.self_attn.k_proj.weight")
    rewrite(d / "model.safetensors", lambda s: s.update({key: torch.zeros(5, 48)}))
    load_error(d, shortv.CheckpointError, "shape", key, "[5, 48]", "[24, 48]")


def test_several_problems_are_named_together(tmp_path: Path, hf_llava: Path):
    d = copy(hf_llava, tmp_path / "ck")

    def edit(s):
        s.pop(find_key(s, "multi_modal_projector.linear_2.bias"))
        s["vision_tower.vision_model.encoder.layers.0.mlp.fc9.weight"] = torch.zeros(1)

    rewrite(d / "model.safetensors", edit)
    message = load_error(d, shortv.CheckpointError, "missing", "unexpected",
                         "vision_tower.vision_model.encoder.layers.0.mlp.fc9.weight")
    assert "projector.2.bias" in message or "linear_2.bias" in message, message


def test_missing_tensor_in_a_bin_shard(tmp_path: Path, original_bin: Path):
    d = copy(original_bin, tmp_path / "ck")
    index = json.loads((d / "pytorch_model.bin.index.json").read_text())
    key = find_key(index["weight_map"], "layers.3.self_attn.o_proj.weight")
    shard = d / index["weight_map"][key]
    state = torch.load(shard, weights_only=True)
    del state[key]
    torch.save(state, shard)
    load_error(d, shortv.CheckpointError, "missing", "layers.3.attn.o_proj.weight")


def test_missing_tensor_in_the_separate_tower(tmp_path: Path, original_v15: Path):
    d = copy(original_v15, tmp_path / "ck")
    tower = Path(json.loads((d / "config.json").read_text())["mm_vision_tower"])
    assert tower.parent == d
    rewrite(tower / "model.safetensors",
            lambda s: s.pop("vision_model.encoder.layers.0.mlp.fc1.weight"))
    load_error(d, shortv.CheckpointError, "missing", "layers.0.mlp.fc1.weight", str(tower))


# ---- dtype, device, no gradients -------------------------------------------------------------


def check_placement(model: shortv.LLaVA, dtype: torch.dtype, device: str) -> None:
    assert list(model.module.parameters()), "no parameters"
    for name, p in model.module.named_parameters():
        assert p.device.type == device, name
        assert not p.is_meta, name
        assert p.dtype == dtype, (name, p.dtype)
        assert not p.requires_grad, name
    for name, b in model.module.named_buffers():
        assert not b.is_meta and b.device.type == device, name


@pytest.mark.parametrize("dtype,expected", [
    (torch.bfloat16, torch.bfloat16), ("bfloat16", torch.bfloat16), ("float16", torch.float16),
    (torch.float32, torch.float32),
])
def test_dtype_is_applied_while_loading(hf_llava: Path, dtype, expected):
    model = load(hf_llava, dtype=dtype)
    check_placement(model, expected, "cpu")
    reference = dict(load(hf_llava, dtype=torch.float32).module.named_parameters())
    for name, p in model.module.named_parameters():
        assert torch.equal(p, reference[name].to(expected)), name


def test_cpu_default_dtype_is_float32(hf_llava: Path):
    check_placement(load(hf_llava), torch.float32, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_placement(hf_llava: Path):
    check_placement(load(hf_llava, device="cuda", dtype=torch.bfloat16), torch.bfloat16, "cuda")
    check_placement(load(hf_llava, device="cuda"), torch.bfloat16, "cuda")  # default on CUDA


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(dtype="int8"), "int8"), (dict(dtype=torch.int64), "int64"),
    (dict(device="tpu9"), "tpu9"),
])
def test_bad_dtype_or_device(hf_llava: Path, kwargs, fragment):
    load_error(hf_llava, shortv.ConfigError, fragment, **kwargs)


# ---- both layouts, the same weights -----------------------------------------------------------


def assert_same_parameters(a: shortv.LLaVA, b: shortv.LLaVA) -> None:
    pa, pb = dict(a.module.named_parameters()), dict(b.module.named_parameters())
    assert sorted(pa) == sorted(pb)
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name


@pytest.mark.parametrize("layout", ["original", "original-bin", "original-sharded-safetensors"])
def test_original_layout_equals_transformers_layout(
    tmp_path: Path, hf_llava: Path, original_v15: Path, original_bin: Path, layout: str
):
    directory = {
        "original": original_v15, "original-bin": original_bin,
        "original-sharded-safetensors": lambda: checkpoints.to_original(
            hf_llava, tmp_path / "sharded", shards=3, relative_tower=True),
    }[layout]
    directory = directory() if callable(directory) else directory
    assert_same_parameters(load(directory), load(hf_llava))


def test_original_v16_equals_transformers_llava_next(original_v16: Path, hf_llava_next: Path):
    ours, theirs = load(original_v16), load(hf_llava_next)
    assert ours.module.image_newline is not None
    assert_same_parameters(ours, theirs)


# ---- weights held once --------------------------------------------------------------------------


def mapped_files() -> set[str]:
    """Paths of the files mapped into this process (Linux)."""
    out = set()
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6:
            out.add(parts[5].strip())
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
@pytest.mark.parametrize("which", ["transformers", "original-bin"])
def test_parameters_are_private_compact_copies(hf_llava: Path, original_bin: Path, which: str):
    """Each parameter owns exactly its bytes (no view into a larger buffer such as a whole
    checkpoint tensor or shard), no two parameters share storage, and no checkpoint file
    stays mapped after loading (a kept memory map is a second copy)."""
    directory = hf_llava if which == "transformers" else original_bin
    files = {str(p.resolve()) for p in directory.rglob("*") if p.suffix in (".bin", ".safetensors")}
    model = load(directory, dtype=torch.bfloat16)
    gc.collect()
    params = list(model.module.parameters())
    storages = {p.untyped_storage().data_ptr() for p in params}
    assert len(storages) == len(params)
    for p in params:
        assert p.untyped_storage().nbytes() == p.numel() * p.element_size()
        assert p.is_contiguous()
    assert not files & mapped_files()


PEAK_SCRIPT = textwrap.dedent("""
    import gc, json, os, sys
    import torch, shortv
    from safetensors.torch import load_file

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024

    def measure(target, dtype, hold=None):
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM)
        base = status("VmRSS")
        # control: a second, resident copy of the weights held meanwhile
        held = [t.clone() for t in load_file(hold).values()] if hold else None
        model = shortv.load(target, device="cpu", dtype=dtype)
        peak, after = status("VmHWM"), status("VmRSS")
        size = sum(p.numel() * p.element_size() for p in model.module.parameters())
        del model, held
        return dict(peak=peak - base, after=after - base, size=size)

    warm, checkpoints = sys.argv[1], json.loads(sys.argv[2])
    shortv.load(warm, device="cpu")  # imports and lazy initialisation
    results = {}
    for which, target in checkpoints.items():
        for dtype in ("float32", "bfloat16"):
            results[f"{which}-{dtype}"] = measure(target, dtype)
    hf = checkpoints["transformers"]
    results["control"] = measure(hf, "float32", hold=os.path.join(hf, "model.safetensors"))
    print(json.dumps(results))
""")


@pytest.fixture(scope="module")
def peak_memory(tmp_path_factory: pytest.TempPathFactory, sp_model: Path, hf_llava: Path):
    """Peak and final RSS growth while loading ~40 MB of fp32 weights (many similar tensors,
    the largest 1 MB) from the transformers layout (one safetensors file) and the original
    layout (3 .bin shards), in fp32 and bf16, measured in a fresh process. Allocations of
    64 KiB and more are mmapped (fixed glibc threshold) so that freed memory is returned
    and every measurement starts clean."""
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/self/status")
    root = tmp_path_factory.mktemp("medium")
    hf = checkpoints.make_llava(root / "hf", sp_model, text=dict(
        hidden_size=256, intermediate_size=1024, num_hidden_layers=10, num_attention_heads=4,
        num_key_value_heads=2))
    targets = {"transformers": str(hf), "original-bin": str(
        checkpoints.to_original(hf, root / "bin", fmt="bin", shards=3))}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MALLOC_MMAP_THRESHOLD_": "65536",
           "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(hf_llava), json.dumps(targets)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


SLACK = 12 * 2**20  # interpreter and allocator noise, one tensor in flight


def test_peak_memory_measurement_sees_a_second_copy(peak_memory):
    """The control run holds the whole checkpoint while loading: the measurement must see it."""
    control = peak_memory["control"]
    assert control["size"] > 30e6
    assert control["peak"] > 1.8 * control["size"], control


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("which", ["transformers", "original-bin"])
def test_peak_memory_is_one_copy(peak_memory, which: str, dtype: str):
    """Peak RSS while loading stays near the size of the loaded model: no second copy of
    the weights (checkpoint dict + model, or fp32 + bf16) is ever held, nor kept after."""
    result = peak_memory[f"{which}-{dtype}"]
    assert result["after"] < result["size"] + SLACK, result
    assert result["peak"] < result["size"] + SLACK, result
