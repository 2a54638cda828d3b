"""Mistakes and conveniences of the Python API and the CLI from issue 22: a prompt string
given to `logits`, images given as encoded bytes or http(s) URLs, an empty model name, a
ranking without --n-frozen or without a model name. Images over HTTP come from a local
server (no network beyond localhost)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import shortv
from shortv.errors import ConfigError, InputError

from . import image_server
from .cli_runner import CPU, assert_one_line_error, run_main

REPO = Path(shortv.__file__).resolve().parents[1]
IMAGE = REPO / "weights" / "llava-tiny-demo" / "example.png"


@pytest.fixture(scope="module")
def demo() -> shortv.LLaVA:
    return shortv.load("llava-tiny-demo", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def image_url():
    """The demo's example image served over HTTP on localhost."""
    with image_server.serving({"/view.png": ("image/png", IMAGE.read_bytes(), True)}) as base:
        yield base + "/view.png"


# ---- logits of a string -------------------------------------------------------------------------


def test_logits_of_a_string_names_encode(demo):
    with pytest.raises(InputError) as info:
        demo.logits("hello")
    message = str(info.value)
    assert "got str" in message and "model.logits(model.encode(" in message
    assert "\n" not in message


# ---- images as encoded bytes --------------------------------------------------------------------


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_image_bytes_give_the_logits_of_the_file(demo, tmp_path: Path, fmt: str):
    """The bytes of an image file are that image: one image, not a list of ints."""
    data = encoded(Image.open(IMAGE).convert("RGB"), fmt)
    path = tmp_path / f"image.{fmt.lower()}"
    path.write_bytes(data)
    want = demo.logits(demo.encode("What is this?", path))
    for images in (data, [data], bytearray(data)):
        torch.testing.assert_close(demo.logits(demo.encode("What is this?", images)), want,
                                   rtol=0, atol=0)


def test_bytes_that_are_not_an_image_say_so(demo):
    with pytest.raises(InputError) as info:
        demo.encode("What is this?", b"GIF89a but not really")
    message = str(info.value)
    assert "image bytes" in message and "int" not in message and "\n" not in message


# ---- images from http(s) URLs -------------------------------------------------------------------


def test_chat_with_an_image_url_answers_as_with_the_file(demo, image_url: str):
    want = demo.chat("What is unusual about this image?", IMAGE, max_new_tokens=6)
    assert demo.chat("What is unusual about this image?", image_url, max_new_tokens=6) == want


def test_cli_chat_takes_an_image_url(capsys, demo, image_url: str):
    code, out, err = run_main(["chat", "--model", "llava-tiny-demo", "--image", image_url,
                               "--prompt", "Describe it.", "--max-new-tokens", "6", "--no-stream",
                               *CPU], capsys)
    assert code == 0, err
    assert out == demo.chat("Describe it.", IMAGE, max_new_tokens=6) + "\n"


def test_cli_chat_with_an_unreachable_url_is_one_line(capsys):
    url = f"http://127.0.0.1:{image_server.closed_port()}/view.jpg"
    code, out, err = run_main(["chat", "--model", "llava-tiny-demo", "--image", url,
                               "--prompt", "hi", *CPU], capsys)
    assert_one_line_error(code, err)
    assert f"could not fetch image {url}" in err and out == ""


# ---- model names and rankings -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "  "])
def test_load_of_an_empty_name_says_it_is_empty(name: str):
    with pytest.raises(ConfigError, match="the model name is empty"):
        shortv.load(name)


@pytest.mark.parametrize("argv", [["flops", ""], ["bench", " ", "--n-frozen", "1"], ["download", ""]])
def test_cli_empty_model_name(capsys, argv: list[str]):
    code, out, err = run_main(argv, capsys)
    assert_one_line_error(code, err)
    assert "the model name is empty" in err and out == ""


def test_ranking_report_without_a_model_name(tmp_path: Path):
    """A hand-written report with another layer count: the message has no "(None)"."""
    report = tmp_path / "ranking.json"
    report.write_text(json.dumps({"ranking": [1, 0]}))
    with pytest.raises(ConfigError) as info:
        shortv.load("llava-tiny-demo", n_frozen=1, ranking=report)
    message = str(info.value)
    assert "with 2 layers" in message and "has 8" in message
    assert "None" not in message


@pytest.mark.parametrize("command", [["chat", "--model", "llava-tiny-demo", "--prompt", "hi"],
                                     ["flops", "llava-tiny-demo"]])
def test_ranking_alone_asks_for_n_frozen(capsys, command: list[str]):
    code, out, err = run_main([*command, "--ranking", "7,6,5"], capsys)
    assert_one_line_error(code, err)
    assert "--ranking needs --n-frozen N" in err and out == ""


def test_ranking_with_frozen_layers_says_which_to_drop(capsys):
    code, out, err = run_main(["flops", "llava-tiny-demo", "--ranking", "7,6,5",
                               "--frozen-layers", "1"], capsys)
    assert_one_line_error(code, err)
    assert "--ranking is used with --n-frozen N, not with --frozen-layers" in err and out == ""
