"""Fixtures shared by several test files: tiny random checkpoints in the published layouts
(built once per run), the models and images of the method tests, and the lmms-eval run that
the loglikelihood and cal_lc tests check."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The test models are tiny: one thread is faster, and CLI subprocesses running beside the
# test process must not oversubscribe the cores (OpenMP busy-waiting slows both 50x).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import shortv
from shortv.store import locate

from . import checkpoints, lmms_tasks
from .reference import random_rgb

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama-like SentencePiece BPE tokenizer.model trained for the tests."""
    return checkpoints.train_sentencepiece(tmp_path_factory.mktemp("sp") / "tokenizer.model")


@pytest.fixture(scope="session")
def hf_llava(tmp_path_factory: pytest.TempPathFactory, sp_model: Path) -> Path:
    """transformers' LlavaForConditionalGeneration, saved by transformers."""
    return checkpoints.make_llava(tmp_path_factory.mktemp("hf-llava"), sp_model)


@pytest.fixture(scope="session")
def hf_llava_next(tmp_path_factory: pytest.TempPathFactory, sp_model: Path) -> Path:
    """transformers' LlavaNextForConditionalGeneration, saved by transformers."""
    return checkpoints.make_llava(tmp_path_factory.mktemp("hf-llava-next"), sp_model, next_=True)


@pytest.fixture(scope="session")
def original_v15(tmp_path_factory: pytest.TempPathFactory, hf_llava: Path) -> Path:
    """The same weights as hf_llava in original LLaVA-1.5's layout (tower separate)."""
    return checkpoints.to_original(hf_llava, tmp_path_factory.mktemp("orig-v15"))


@pytest.fixture(scope="session")
def original_v16(tmp_path_factory: pytest.TempPathFactory, hf_llava_next: Path) -> Path:
    """The same weights as hf_llava_next in original LLaVA-NeXT's layout (tower inside)."""
    return checkpoints.to_original(hf_llava_next, tmp_path_factory.mktemp("orig-v16"),
                                   tower="inside")


# ---- the method tests (test_methods.py, test_method_*.py, test_compose.py) -------------------
# Module scope, as when each test file defined them: a test file's methods never see another
# file's model state.


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    """The demo's example picture and two noise images of other shapes."""
    example = Image.open(locate("llava-tiny-demo") / "example.png").convert("RGB")
    return [example, random_rgb(70, 50, 1), random_rgb(40, 64, 2)]


@pytest.fixture(scope="module")
def demo_model() -> shortv.LLaVA:
    """The trained demo in float64: its hidden states reach ~150, where fp32 rounding alone
    would differ from the fp64 references by ~3e-4 (the GQA model covers fp32)."""
    model = shortv.load("llava-tiny-demo", device="cpu", dtype=torch.float64)
    assert model.num_layers == 8 and model.dtype == torch.float64
    return model


@pytest.fixture(scope="session")
def gqa_wide_model(tmp_path_factory: pytest.TempPathFactory, sp_model: Path) -> shortv.LLaVA:
    """A tiny random LLaVA-1.5 with grouped-query attention (4 heads, 2 KV heads), 8 layers
    and 36 visual tokens per image (84-pixel tower), in float64: for the methods' checks
    against their authors' code on GQA."""
    path = checkpoints.make_llava(tmp_path_factory.mktemp("gqa-wide"), sp_model, seed=5,
                                  vision=dict(image_size=84), text=dict(num_hidden_layers=8))
    model = shortv.load(path, device="cpu", dtype=torch.float64)
    assert model.config.text.kv_heads < model.config.text.heads
    return model


@pytest.fixture(scope="module")
def gqa_model(hf_llava: Path) -> shortv.LLaVA:
    """A tiny transformers-layout LLaVA with grouped-query attention (4 heads, 2 KV heads)."""
    model = shortv.load(hf_llava, device="cpu", dtype=torch.float32)
    assert model.config.text.kv_heads < model.config.text.heads
    return model


# ---- the lmms-eval run of the loglikelihood tests (test_lmms_loglikelihood.py, test_lmms_cal_lc.py)


@pytest.fixture(scope="session")
def mc_task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The multiple-choice and loglikelihood tasks, written for lmms-eval."""
    return lmms_tasks.write_mc_tasks(tmp_path_factory.mktemp("lmms-mc-task"))


@pytest.fixture(scope="session")
def mc_run(mc_task: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The lmms-eval run of both tasks (with cal_lc), and beside it a run with a bad
    model_arg. Per run: exit status, output and (for the good one) the logged samples by
    task and the LC report path."""
    return lmms_tasks.run_mc_tasks(mc_task, tmp_path_factory.mktemp("lmms-mc-runs"))
