"""scripts/convert.py and scripts/download.py, run as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import shortv
from shortv.flops import sequence_flops
from shortv.methods import VANILLA
from shortv.token_types import TokenType

from . import checkpoints

REPO = Path(shortv.__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=ENV,
                          cwd=REPO, timeout=300)


def test_convert_bin_shards_to_safetensors(tmp_path: Path, hf_llava: Path):
    src = checkpoints.to_original(hf_llava, tmp_path / "bin", fmt="bin", shards=3)
    out = tmp_path / "st"
    done = run("scripts/convert.py", str(src), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert not list(out.glob("*.bin")) and len(list(out.glob("model-*.safetensors"))) == 3
    assert (out / "model.safetensors.index.json").is_file()
    before = shortv.load(src, device="cpu")
    after = shortv.load(out, device="cpu")
    for (name, a), (_, b) in zip(before.module.named_parameters(), after.module.named_parameters(),
                                 strict=True):
        assert torch.equal(a, b), name


def test_convert_in_place_removing_bin(tmp_path: Path, hf_llava: Path):
    src = checkpoints.to_original(hf_llava, tmp_path / "ck", fmt="bin", shards=2)
    reference = {n: p.clone() for n, p in shortv.load(src, device="cpu").module.named_parameters()}
    done = run("scripts/convert.py", str(src), "--remove-bin")
    assert done.returncode == 0, done.stderr
    assert not list(src.glob("*.bin")) and not (src / "pytorch_model.bin.index.json").exists()
    loaded = shortv.load(src, device="cpu")
    assert all(torch.equal(p, reference[n]) for n, p in loaded.module.named_parameters())


def test_convert_without_bin_is_a_one_line_error(tmp_path: Path, hf_llava: Path):
    done = run("scripts/convert.py", str(hf_llava))
    assert done.returncode == 2 and "no .bin weights" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_download_offline_says_where_it_looked(tmp_path: Path):
    env_home = {"HF_HOME": str(tmp_path / "hf"), "SHORTV_WEIGHTS": str(tmp_path / "store")}
    done = subprocess.run([sys.executable, "scripts/download.py", "llava-v1.5-7b"],
                          capture_output=True, text=True, env={**ENV, **env_home}, cwd=REPO,
                          timeout=300)
    assert done.returncode == 2
    assert "offline" in done.stderr and "liuhaotian/llava-v1.5-7b" in done.stderr
    assert "Traceback" not in done.stderr


def test_download_of_the_embedded_demo_is_refused():
    done = run("scripts/download.py", "llava-tiny-demo")
    assert done.returncode == 2 and "ships with shortv" in done.stderr


def test_model_flops_counts_the_encoded_input(original_v15: Path):
    model = shortv.load(original_v15, device="cpu")
    from PIL import Image

    encoded = model.encode("What is it?", [Image.new("RGB", (40, 30), (200, 10, 10))])
    report = model.flops(encoded)
    types = model.prepare([encoded]).types[0]
    n_visual = int((types == TokenType.VISUAL).sum())
    assert report["n_visual"] == n_visual == model.config.vision.num_patches
    assert report["n_text"] == len(encoded.input_ids) - 1
    assert report["ratio"] == 1.0
    model.set_frozen_layers([0, 1])
    frozen = model.flops(encoded)
    assert frozen["vanilla_tflops"] == report["tflops"]
    assert frozen["tflops"] * 1e12 == sequence_flops(model.config.text, model.method, types)
    assert frozen["tflops"] < report["tflops"]
    assert sequence_flops(model.config.text, VANILLA, types) == report["tflops"] * 1e12


def test_bench_hooks_runs_every_case_on_the_demo():
    done = run("scripts/bench_hooks.py", "--repeats", "1", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["rows"][0]["case"] == "logits" and len(report["rows"]) == 5
    assert all(row["ms"] > 0 for row in report["rows"])
