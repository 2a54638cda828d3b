"""The shortv-vs-transformers benchmark scripts on tiny shapes: they run, print a table with
every cell and finite positive ratios, and their logits agreement check is a real one.

scripts/bench_vs_transformers.py --grid tiny (LLaVA, and Qwen2.5-VL: window attention)
and scripts/bench_gpu.py --device cpu --tiny --quick run as subprocesses, started together
(each on one thread) so that they cost the wall-clock time of the slowest one. Qwen2-VL's
agreement check runs in process; scripts/bench_qwen_load.py's checkpoint writer is checked
against the tests' own original-layout Qwen checkpoints.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

import shortv

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
COMMANDS = {
    "vs_transformers": [str(SCRIPTS / "bench_vs_transformers.py"), "--grid", "tiny"],
    "vs_transformers_qwen": [str(SCRIPTS / "bench_vs_transformers.py"), "--family", "qwen2_5_vl",
                             "--grid", "tiny"],
    "gpu": [str(SCRIPTS / "bench_gpu.py"), "--device", "cpu", "--tiny", "--quick"],
}


def _script(name: str) -> ModuleType:
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))  # bench_gpu imports its sibling
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def outputs() -> dict[str, subprocess.CompletedProcess]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    procs = {name: subprocess.Popen([sys.executable, *cmd], cwd=ROOT, env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, cmd in COMMANDS.items()}
    done = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return done


def table_rows(stdout: str) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the one markdown table in the output."""
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    assert len(lines) >= 3, stdout
    split = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert all(c == "---" for c in split[1])
    return split[0], split[2:]


def positive(cell: str) -> float:
    value = float(cell)
    assert math.isfinite(value) and value > 0, cell
    return value


def assert_rounded_ratio(cells: list[str], *, inverse: bool = False) -> None:
    """cells = (ours, theirs, ratio), printed rounded (values to 0.1, the ratio to 0.01):
    the ratio (ours / theirs, or theirs / ours when `inverse`) must lie in the range the
    unrounded values allow, widened by 5 % (the ratio is of unrounded medians)."""
    ours, theirs, ratio = (positive(c) for c in cells)
    if inverse:
        ours, theirs = theirs, ours
    low = max(ours - 0.05, 1e-9) / (theirs + 0.05)
    high = (ours + 0.05) / max(theirs - 0.05, 1e-9)
    assert low * 0.95 - 0.005 <= ratio <= high * 1.05 + 0.005, cells


def test_vs_transformers_tiny_grid_table(outputs):
    run = outputs["vs_transformers"]
    assert run.returncode == 0, run.stderr
    header, rows = table_rows(run.stdout)
    assert header[header.index("prefill ms shortv") + 2] == "ratio"
    assert len(rows) == 4  # LLaVA-1.5 and LLaVA-NeXT, batch 1 and 4
    assert {(r[0], r[6]) for r in rows} == {("llava-1.5", "1"), ("llava-1.5", "4"),
                                            ("llava-next", "1"), ("llava-next", "4")}
    at = header.index("prefill ms shortv")
    for row in rows:
        assert_rounded_ratio(row[at:at + 3])
        assert_rounded_ratio(row[at + 3:at + 6], inverse=True)  # tok/s: theirs / ours
        assert float(row[at + 6]) <= 1e-3  # the fp32 logits agreement
    assert "torch " + torch.__version__ in run.stdout
    assert "scripts/bench_vs_transformers.py --grid tiny" in run.stdout


def test_vs_transformers_qwen_tiny_grid_table(outputs):
    """Qwen2.5-VL: the ViT's own columns next to prefill and decode, GQA in the shapes."""
    run = outputs["vs_transformers_qwen"]
    assert run.returncode == 0, run.stderr
    header, rows = table_rows(run.stdout)
    assert len(rows) == 2  # batch 1 and 4
    assert {(r[0], r[6]) for r in rows} == {("qwen2_5_vl", "1"), ("qwen2_5_vl", "4")}
    assert {r[header.index("heads (kv) x dim")] for r in rows} == {"4 (1)x16"}
    assert {r[header.index("prompt (text+visual)")] for r in rows} == {"24+16 (1 img 112 px)"}
    for first in ("ViT ms shortv", "prefill ms shortv", "decode tok/s shortv"):
        at = header.index(first)
        assert header[at + 1:at + 3] == ["transformers", "ratio"]
        for row in rows:
            assert_rounded_ratio(row[at:at + 3], inverse=first.startswith("decode"))
    for row in rows:
        assert float(row[header.index("max abs diff fp32")]) <= 1e-3
    assert "scripts/bench_vs_transformers.py --family qwen2_5_vl --grid tiny" in run.stdout
    assert "window 56 px, full attention in blocks [1]" in run.stdout


def test_gpu_script_tiny_on_cpu(outputs):
    run = outputs["gpu"]
    assert run.returncode == 0, run.stderr
    header, rows = table_rows(run.stdout)
    assert len(rows) == 10  # 2 models x (4 methods + transformers)
    variants = [r[header.index("variant")] for r in rows]
    for prefix in ("vanilla", "ShortV N=", "FastV k=2 r=50%", "VTW k=2", "transformers"):
        assert sum(v.startswith(prefix) for v in variants) == 2, variants
    assert {r[header.index("visual tokens")] for r in rows} == {"16", "88"}
    for row in rows:
        positive(row[header.index("first-token ms")])
        positive(row[header.index("decode tok/s eager")])
        positive(row[header.index("first token vs transformers")])
        positive(row[header.index("decode vs transformers")])
        compiled = row[header.index("decode tok/s compiled")]
        assert compiled.startswith(("n/a", "eager only")) or positive(compiled)


def test_gpu_script_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    run = subprocess.run([sys.executable, str(SCRIPTS / "bench_gpu.py"), "--quick"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "no CUDA GPU" in run.stderr and "--device cpu --tiny" in run.stderr


def test_gpu_peaks_by_device_name():
    gpu = _script("bench_gpu")
    assert gpu.peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert gpu.peak_tflops("NVIDIA H200") == 989
    assert gpu.peak_tflops("NVIDIA H100 PCIe") == 756
    assert gpu.peak_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert gpu.peak_tflops("Some Future GPU") is None


def test_agreement_check_flags_a_perturbed_model(tmp_path: Path):
    """Same checkpoint, same inputs: agreement; a slightly changed weight or different
    pixels for one model: AgreementError."""
    bvt = _script("bench_vs_transformers")
    cell = bvt.Cell("llava-1.5", bvt.llama_like(64, 2, vocab=512), bvt.Prompt("llava-1.5", 24),
                    2, "float32")
    tower = bvt.TINY_TOWER
    path = bvt.write_checkpoint(tmp_path / "ckpt", cell.arch, cell.decoder, tower)
    pair = bvt.load_pair(path, cell.arch, tower, torch.device("cpu"), torch.float32)
    inputs = bvt.make_inputs(cell, tower, pair.theirs.config.image_token_index, torch.device("cpu"))
    assert bvt.prefill_agreement(pair, inputs) < 1e-5

    other = bvt.make_inputs(cell, tower, pair.theirs.config.image_token_index,
                            torch.device("cpu"), seed=1)
    changed = bvt.Inputs(other.encoded, inputs.hf)  # other pixels and ids for shortv only
    with pytest.raises(bvt.AgreementError, match="disagree"):
        bvt.prefill_agreement(pair, changed)

    _check_flags_other_pixels_and_a_changed_weight(bvt, pair, inputs)


def _check_flags_other_pixels_and_a_changed_weight(bvt, pair, inputs) -> None:
    """The agreement check fails when shortv alone sees other pixels, and when a decoder
    weight of shortv's model changes (the weight stays changed)."""
    pixels_only = bvt.Inputs([shortv.Encoded(e.input_ids, tuple(im + 0.05 for im in e.images),
                                             e.image_sizes) for e in inputs.encoded], inputs.hf)
    with pytest.raises(bvt.AgreementError):
        bvt.prefill_agreement(pair, pixels_only)
    with torch.no_grad():
        pair.ours.module.decoder.layers[1].mlp.down_proj.weight.mul_(1.02)
    with pytest.raises(bvt.AgreementError, match="max abs diff"):
        bvt.prefill_agreement(pair, inputs)


def test_qwen_agreement_check_flags_a_perturbed_model(tmp_path: Path):
    """Qwen2-VL, batch 2 (left-padded): shortv's and transformers' prefill logits and
    visual tokens (what the ViT columns time) agree; other pixels for shortv only, or a
    changed decoder weight: AgreementError."""
    bvt = _script("bench_vs_transformers")
    cell = bvt.grid("tiny", ["float32"], "qwen2_vl")[1]
    assert cell.batch == 4
    cell = bvt.Cell(cell.arch, cell.decoder, cell.prompt, 2, "float32")
    tower = bvt.tower_for("qwen2_vl", "tiny")
    path = bvt.write_checkpoint(tmp_path / "ckpt", cell.arch, cell.decoder, tower)
    pair = bvt.load_pair(path, cell.arch, tower, torch.device("cpu"), torch.float32)
    image_token = bvt.image_token_of(pair.theirs.config)
    inputs = bvt.make_inputs(cell, tower, image_token, torch.device("cpu"))
    assert int((inputs.hf["input_ids"] == image_token).sum()) == 2 * 16
    assert bvt.prefill_agreement(pair, inputs) < 1e-5
    ours = torch.cat(bvt.vision_ours(pair, inputs))
    theirs = torch.cat(bvt.vision_theirs(pair, inputs).pooler_output)
    assert ours.shape == (2 * 16, cell.decoder.hidden)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)

    _check_flags_other_pixels_and_a_changed_weight(bvt, pair, inputs)


def test_qwen_load_checkpoint_matches_the_original_layout(tmp_path: Path):
    """bench_qwen_load writes, from a config alone, the tensors (names, shapes) and
    config.json that the tests' original-layout Qwen checkpoints (a transformers model
    saved as Qwen released it) have; shortv reads both as the same config."""
    import json

    from safetensors import safe_open

    from shortv.loading import config_of_directory

    from .qwen_checkpoints import build_model, save_original

    load = _script("bench_qwen_load")

    def tensors(directory: Path) -> dict[str, tuple[int, ...]]:
        index = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
        found = {}
        for name in set(index.values()):
            with safe_open(str(directory / name), "pt") as f:
                found.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        assert set(found) == set(index)
        return found

    for variant, tied in (("qwen2_vl", True), ("qwen2_5_vl", False)):
        reference = save_original(build_model(variant, tmp_path / f"{variant}-hf", tied=tied),
                                  tmp_path / f"{variant}-ref")
        config = config_of_directory(reference)
        out = tmp_path / f"{variant}-bench"
        size = load.write_checkpoint(out, config, shards=3, dtype=torch.bfloat16)
        assert tensors(out) == tensors(reference)
        assert len(list(out.glob("*.safetensors"))) == 3
        assert config_of_directory(out) == config
        with pytest.warns(UserWarning, match="without a tokenizer"):
            model = shortv.load(str(out), device="cpu", dtype="bfloat16")
        stored = sum(p.numel() for p in model.module.parameters()) * 2  # tied: counted once
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert index["metadata"]["total_size"] == stored
        assert stored < size < stored + 3 * 16384  # the data, and each shard's JSON header


def test_check_agreement_edge_cases():
    bvt = _script("bench_vs_transformers")
    a = torch.zeros(2, 5)
    assert bvt.check_agreement(a, a + 5e-4) == pytest.approx(5e-4)
    with pytest.raises(bvt.AgreementError):
        bvt.check_agreement(a, a + 2e-3)
    with pytest.raises(bvt.AgreementError, match="shape"):
        bvt.check_agreement(a, torch.zeros(1, 5))
    with pytest.raises(bvt.AgreementError):
        bvt.check_agreement(a, torch.full((2, 5), float("nan")))


def test_grids():
    bvt = _script("bench_vs_transformers")
    quick = bvt.grid("quick", ["float32"])
    assert len(quick) == 8
    assert {(c.decoder.hidden, c.decoder.layers) for c in quick} == {(256, 2), (256, 8), (1024, 2), (1024, 8)}
    assert {c.tokens(bvt.SMALL_TOWER) for c in quick} == {640}
    full = bvt.grid("full", ["float32", "bfloat16"])
    shapes = {(c.decoder.hidden, c.decoder.heads, c.decoder.head_dim, c.decoder.mlp) for c in full}
    assert (4096, 32, 128, 11008) in shapes and (5120, 40, 128, 13824) in shapes
    assert (256, 4, 64, 688) in shapes
    assert max(c.decoder.layers for c in full) == 40
    assert max(c.tokens(bvt.SMALL_TOWER) for c in full) == 64 + 2928
    assert bvt.Prompt("llava-next", 64).visual(bvt.REAL_TOWER) == 2928
    for family in ("qwen2_vl", "qwen2_5_vl"):
        quick = bvt.grid("quick", ["float32", "bfloat16"], family)
        assert len(quick) == 16 and {c.arch for c in quick} == {family}
        assert {c.tokens(bvt.tower_for(family, "quick")) for c in quick} == {64 + 576}
        assert {(c.decoder.hidden, c.decoder.heads, c.decoder.kv, c.decoder.vocab) for c in quick} == {
            (256, 4, 1, 151936), (1024, 8, 2, 151936)}
        full = bvt.grid("full", ["float32"], family)
        assert (1536, 28, 12, 2, 8960) in {(c.decoder.hidden, c.decoder.layers, c.decoder.heads,
                                            c.decoder.kv, c.decoder.mlp) for c in full}  # Qwen2-VL-2B
        assert max(c.tokens(bvt.tower_for(family, "full")) for c in full) == 64 + 54 * 54
    assert bvt.mrope_section(128) == [16, 24, 24]
    assert sum(bvt.mrope_section(16)) == 8
