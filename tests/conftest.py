"""Shared fixtures: tiny random checkpoints in the published layouts (built once per run)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The test models are tiny: one thread is faster, and CLI subprocesses running beside the
# test process must not oversubscribe the cores (OpenMP busy-waiting slows both 50x).
os.environ.setdefault("OMP_NUM_THREADS", "1")

from . import checkpoints

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
