"""Qwen2-VL's image preprocessing, tokenizer and chat template vs transformers.

Oracles:
- pixels: transformers' PIL-based `Qwen2VLImageProcessorPil` (the "slow" processor; what
  Qwen's qwen-vl-utils + processor path produces) on the same images and pixel bounds, and
  its `smart_resize`;
- tokens: transformers' `AutoTokenizer` (Qwen2Tokenizer) on a tiny byte-level BPE trained
  here with Qwen2's exact pipeline and special tokens, saved as a checkpoint saves them;
- chat text: that tokenizer's `apply_chat_template` with Qwen2-VL-Instruct's chat template
  (QWEN2_VL_CHAT_TEMPLATE below).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tokenizers
import torch
from PIL import Image
from transformers import AutoTokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
    Qwen2VLImageProcessorPil,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
    smart_resize as hf_smart_resize,
)

from shortv.conversation import get_template, place_images
from shortv.errors import CheckpointError, ConfigError, InputError
from shortv.models.qwen_config import QwenPreprocess, QwenVisionConfig
from shortv.qwen_image import QwenImageProcessor, grid_of, smart_resize
from shortv.qwen_tokenizer import QwenTokenizer
from shortv.serve.protocol import with_system
from shortv.tokenizer import IMAGE_TOKEN

from .qwen_checkpoints import make_qwen_tokenizer

# ---- image preprocessing -----------------------------------------------------------------------

EXACT = dict(atol=0, rtol=0)  # bit-exact: the same float32 arithmetic as transformers
DEFAULT = QwenPreprocess()


def hf_pixels(image: Image.Image, min_pixels: int = DEFAULT.min_pixels,
              max_pixels: int = DEFAULT.max_pixels, patch_size: int = 14) -> tuple[torch.Tensor, list]:
    processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels,
                                         patch_size=patch_size)
    out = processor(image, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"].tolist()


def noise(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """Smooth colour gradients with mild noise: resampling errors show on it as on photos."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx / w, yy / h, (xx + yy) / (w + h)], -1) * 255
    return Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))


CASES = {
    # name: (image, min_pixels, max_pixels)
    "square": (noise(224, 224, 1), DEFAULT.min_pixels, DEFAULT.max_pixels),
    "odd-wide": (noise(517, 333, 2), DEFAULT.min_pixels, DEFAULT.max_pixels),  # -> 504x336
    "tiny": (noise(30, 40, 3), DEFAULT.min_pixels, DEFAULT.max_pixels),  # scaled up to min_pixels
    "very-wide": (noise(2000, 60, 4), DEFAULT.min_pixels, DEFAULT.max_pixels),
    "above-max": (noise(640, 480, 5), DEFAULT.min_pixels, 128 * 28 * 28),  # scaled down
    "photo": (photo(640, 480), DEFAULT.min_pixels, DEFAULT.max_pixels),
    "1x1": (noise(1, 1, 6), DEFAULT.min_pixels, DEFAULT.max_pixels),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pixels_match_transformers(case: str):
    image, lo, hi = CASES[case]
    got = QwenImageProcessor(min_pixels=lo, max_pixels=hi)(image)
    want, grid = hf_pixels(image, lo, hi)
    assert got.dtype == torch.float32 and got.dim() == 5 and got.shape[0] == 1
    assert got.shape[3:] == (4, 3 * 2 * 14 * 14)
    assert [list(grid_of(got))] == grid
    torch.testing.assert_close(got.flatten(0, 3), want, **EXACT)


def test_resize_really_changes_the_size():
    """The cases cover each branch of smart_resize: rounding, scaling up and scaling down."""
    def grid(case):
        image, lo, hi = CASES[case]
        return grid_of(QwenImageProcessor(min_pixels=lo, max_pixels=hi)(image))
    assert grid("odd-wide") == (1, 24, 36)  # 333x517 rounded to 336x504
    assert grid("tiny")[1] * grid("tiny")[2] * 14 * 14 >= DEFAULT.min_pixels
    assert grid("above-max")[1] * grid("above-max")[2] * 14 * 14 <= 128 * 28 * 28


def test_transparency_goes_onto_white_as_in_transformers():
    rng = np.random.default_rng(7)
    rgba = Image.fromarray(rng.integers(0, 256, (50, 70, 4), dtype=np.uint8), "RGBA")
    got = QwenImageProcessor()(rgba)
    torch.testing.assert_close(got.flatten(0, 3), hf_pixels(rgba)[0], **EXACT)
    grey = Image.fromarray(rng.integers(0, 256, (50, 70), dtype=np.uint8), "L")
    torch.testing.assert_close(QwenImageProcessor()(grey).flatten(0, 3), hf_pixels(grey)[0], **EXACT)


def test_other_tower_geometry_matches_transformers():
    """patch_size 4 (a tiny test tower): the layout follows the config, not constants."""
    vision = QwenVisionConfig(depth=1, width=16, heads=1, mlp_dim=32, out_width=16, patch_size=4,
                              window_size=8)
    image = noise(45, 29, 8)
    got = QwenImageProcessor(QwenPreprocess(min_pixels=8 * 8), vision)(image)
    want, grid = hf_pixels(image, min_pixels=8 * 8, patch_size=4)
    assert got.shape[3:] == (4, vision.patch_dim)
    assert [list(grid_of(got))] == grid
    torch.testing.assert_close(got.flatten(0, 3), want, **EXACT)


SIZES = [(h, w) for h in (1, 13, 14, 27, 28, 42, 56, 70, 98, 333, 1000, 4321)
         for w in (1, 2, 28, 41, 42, 70, 517, 3000, 9999)]


@pytest.mark.parametrize(("lo", "hi"), [(56 * 56, 14 * 14 * 4 * 1280), (28 * 28, 56 * 56),
                                        (256 * 28 * 28, 1280 * 28 * 28), (1, 10**9)])
def test_smart_resize_matches_transformers(lo: int, hi: int):
    for h, w in SIZES:
        try:
            want = hf_smart_resize(h, w, 28, lo, hi)
        except ValueError:
            with pytest.raises(InputError):
                smart_resize(h, w, 28, lo, hi)
            continue
        assert smart_resize(h, w, 28, lo, hi) == want, (h, w)


@pytest.mark.parametrize("size", [(201, 1), (1, 250), (12100, 60)])
def test_too_elongated_images_are_refused_as_in_transformers(size: tuple[int, int]):
    image = Image.new("RGB", size)
    with pytest.raises(ValueError, match="aspect ratio"):
        hf_pixels(image)
    with pytest.raises(InputError) as caught:
        QwenImageProcessor()(image)
    message = str(caught.value)
    assert "\n" not in message and "aspect ratio" in message and "200" in message


def test_the_200_limit_itself_is_accepted_as_in_transformers():
    image = noise(200, 1, 9)
    torch.testing.assert_close(QwenImageProcessor()(image).flatten(0, 3), hf_pixels(image)[0], **EXACT)


def test_bad_pixel_bounds_and_inputs_are_errors():
    with pytest.raises(ConfigError, match="max_pixels"):
        QwenImageProcessor(min_pixels=5000, max_pixels=4000)
    with pytest.raises(InputError, match="PIL image"):
        QwenImageProcessor()(np.zeros((28, 28, 3), dtype=np.uint8))  # type: ignore[arg-type]
    with pytest.raises(InputError):
        grid_of(torch.zeros(10, 1176))


# ---- tokenizer and chat template ----------------------------------------------------------------

@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_qwen_tokenizer(tmp_path_factory.mktemp("qwen-tokenizer"))


@pytest.fixture(scope="module")
def ours(qwen_dir: Path) -> QwenTokenizer:
    return QwenTokenizer.from_directory(qwen_dir)


@pytest.fixture(scope="module")
def theirs(qwen_dir: Path):
    return AutoTokenizer.from_pretrained(str(qwen_dir))


TEXTS = [
    "What is shown in this image?",
    "  leading spaces, trailing spaces  ",
    "Line one\nline two\r\n\ttab  and   runs\n\n",
    "Cafe\u0301 (decomposed), 東京, 🙂🙂, I'm sure you'll see; 1234567",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "x<|vision_start|><|image_pad|><|vision_end|>y <|endoftext|>z <|im_end",
    "",
]


def test_tokenizer_ids_match_transformers(ours: QwenTokenizer, theirs):
    assert type(theirs).__name__ in ("Qwen2Tokenizer", "Qwen2TokenizerFast")
    for text in TEXTS:
        want = theirs(text)["input_ids"]
        assert ours.encode_text(text) == want, text
        assert ours.encode_prompt(text) == [IMAGE_TOKEN if i == ours.image_pad_id else i
                                            for i in want], text
    assert ours.bos_id is None and theirs.bos_token_id is None and not ours.add_bos
    assert ours.eos_id == theirs.eos_token_id == theirs.convert_tokens_to_ids("<|im_end|>")
    assert ours.vocab_size == len(theirs)
    assert ours.image_pad_id == theirs.convert_tokens_to_ids("<|image_pad|>")
    assert ours.encode_text(TEXTS[3]) != ours.encode_text(TEXTS[0])  # not trivially equal


def test_tokenizer_decode_matches_transformers(ours: QwenTokenizer, theirs):
    for text in TEXTS:
        ids = theirs(text)["input_ids"]
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(
                ids, skip_special_tokens=skip), (text, skip)
    # Cut inside a multi-byte character: the ByteLevel decoder's U+FFFD, as transformers.
    emoji = theirs("🙂🙂")["input_ids"]
    for end in range(1, len(emoji)):
        assert ours.decode(emoji[:end]) == theirs.decode(emoji[:end])
    # IMAGE_TOKEN (not a vocabulary id) is left out, as the special tokens are.
    assert ours.decode(ours.encode_prompt(TEXTS[5])) == theirs.decode(
        theirs(TEXTS[5])["input_ids"], skip_special_tokens=True)


def test_tokenizer_needs_tokenizer_json_and_image_pad(tmp_path: Path, qwen_dir: Path):
    with pytest.raises(CheckpointError, match=r"tokenizer\.json"):
        QwenTokenizer.from_directory(tmp_path)
    plain = tokenizers.Tokenizer.from_file(str(qwen_dir / "tokenizer.json"))
    bare = tokenizers.Tokenizer(tokenizers.models.BPE(plain.get_vocab(with_added_tokens=False), []))
    with pytest.raises(CheckpointError, match="image_pad"):
        QwenTokenizer(bare, eos_id=None)


def as_messages(turns: list[tuple[str, str | None]]) -> list[dict]:
    """shortv turns as transformers chat messages: a user text cut at each `<image>` into
    image and text items (an empty text between two images is no item), replies as strings."""
    messages: list[dict] = []
    for user, reply in turns:
        content: list[dict] = []
        for i, chunk in enumerate(user.split("<image>")):
            if i:
                content.append({"type": "image"})
            if chunk:
                content.append({"type": "text", "text": chunk})
        messages.append({"role": "user", "content": content})
        if reply is not None:
            messages.append({"role": "assistant", "content": reply})
    return messages


CHATS = {
    "text only": ([("What is the capital of France?", None)], 0),
    "one image": ([("<image>What is shown in this image?", None)], 1),
    "two images": ([("<image><image>Compare them.", None)], 2),
    "interleaved": ([("First <image> then <image>, which is bigger?", None)], 2),
    "multi-turn": ([("<image>Describe it.", "A cat on a mat."), ("What colour is the mat?", None)], 1),
    "multi-line": ([("Line one\nline two", "Ok.\nSure"), ("  Spaced  ", None)], 0),
}


@pytest.mark.parametrize("case", list(CHATS))
def test_chat_template_matches_apply_chat_template(case: str, ours: QwenTokenizer, theirs):
    turns, n_images = CHATS[case]
    template = get_template("qwen2_vl")
    text = template.render(turns)
    want = theirs.apply_chat_template(as_messages(turns), tokenize=False, add_generation_prompt=True)
    assert text == want
    ids = ours.encode_prompt(text)
    assert ids == [IMAGE_TOKEN if i == ours.image_pad_id else i for i in theirs(want)["input_ids"]]
    assert ids.count(IMAGE_TOKEN) == n_images


def test_auto_placed_images_render_as_qwen_places_them(theirs):
    """Images given without placeholders go first in the first user message with nothing
    between them and its text, as the usual [image, ..., text] content renders."""
    template = get_template("qwen2_vl")
    users = place_images(["Compare them.", "And now?"], 2, template)
    assert users == ["<image><image>Compare them.", "And now?"]
    text = template.render([(users[0], "They differ."), (users[1], None)])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                             {"type": "text", "text": "Compare them."}]},
                {"role": "assistant", "content": [{"type": "text", "text": "They differ."}]},
                {"role": "user", "content": [{"type": "text", "text": "And now?"}]}]
    assert text == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # LLaVA's templates keep their `<image>` lines.
    assert place_images(["Hi."], 1, get_template("vicuna_v1")) == place_images(["Hi."], 1) \
        == ["<image>\nHi."]
    assert "<image>\nHi." in get_template("vicuna_v1").render([("<image>\nHi.", None)])



def test_a_conversations_own_system_message_matches_apply_chat_template(theirs):
    """The server's system override (`with_system`) on the Qwen template: the template's
    system turn is replaced, as the Jinja template renders a leading system message."""
    template = with_system(get_template("qwen2_vl"), "Answer in one word.")
    text = template.render([("<image>Which animal?", None)])
    messages = [{"role": "system", "content": "Answer in one word."},
                *as_messages([("<image>Which animal?", None)])]
    assert text == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
