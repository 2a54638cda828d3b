"""Image preprocessing vs transformers' CLIP image processor, PIL modes, and image files.

The oracle for LLaVA-1.5's "pad" preprocessing is what original LLaVA runs:
`expand2square(image.convert('RGB'), mean colour)` (re-implemented in tests/reference.py)
followed by transformers' CLIPImageProcessor (PIL backend). "square" is the processor alone.
"""

from __future__ import annotations

import io
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

import shortv
from shortv.image import ImageProcessor, load_image

from . import image_server, reference

EXACT = dict(atol=1e-6, rtol=0)
SIZES = {
    "square": (40, 40),
    "wide": (64, 30),
    "tall": (30, 64),
    "odd-wide": (337, 335),
    "1x1": (1, 1),
    "extreme-wide": (500, 3),
    "extreme-tall": (3, 500),
}


@pytest.mark.parametrize("side", [336, 28])
@pytest.mark.parametrize("shape", list(SIZES))
def test_pad_matches_transformers(shape: str, side: int):
    w, h = SIZES[shape]
    image = reference.random_rgb(w, h, seed=w * 1000 + h)
    got = ImageProcessor(size=side, aspect_ratio="pad")(image)
    want = reference.reference_pixels(image, side, pad=True)
    assert got.dtype == torch.float32 and got.shape == (3, side, side)
    torch.testing.assert_close(got, want, **EXACT)


@pytest.mark.parametrize("side", [336, 28])
@pytest.mark.parametrize("shape", ["wide", "tall", "odd-wide", "extreme-wide"])
def test_square_matches_transformers(shape: str, side: int):
    w, h = SIZES[shape]
    image = reference.random_rgb(w, h, seed=w + h)
    got = ImageProcessor(size=side, aspect_ratio="square")(image)
    want = reference.reference_pixels(image, side, pad=False)
    torch.testing.assert_close(got, want, **EXACT)


def test_pad_really_pads():
    """'pad' and 'square' differ on a non-square image, and the padding has the CLIP mean
    colour (which normalises to about zero)."""
    image = reference.random_rgb(60, 20, seed=3)
    pad = ImageProcessor(size=28, aspect_ratio="pad")(image)
    square = ImageProcessor(size=28, aspect_ratio="square")(image)
    assert (pad - square).abs().max() > 0.5
    # Rows 0..7 of 28 are canvas only (the image covers rows 9.3..18.7); mean colour is
    # int(m*255)/255, within 1/255 of the mean, i.e. |x| < 1/(255 std) after normalising.
    assert pad[:, :7].abs().max() < 1 / (255 * 0.26)


def test_processor_for_config_uses_model_settings(hf_llava: Path):
    model = shortv.load(hf_llava, device="cpu")
    image = reference.random_rgb(50, 21, seed=9)
    got = model.encode("<image>", [image], template=False).images[0]
    torch.testing.assert_close(got, reference.reference_pixels(image, 28, pad=True), **EXACT)


# ---- PIL modes ------------------------------------------------------------------------------------

W, H = 23, 17  # non-square, so that the padding is exercised too
RNG = np.random.default_rng(12345)
V8 = RNG.integers(0, 256, (H, W), dtype=np.uint8)


def grey_rgb(v: np.ndarray) -> np.ndarray:
    return np.repeat(v[..., None], 3, axis=2)


def mode_cases() -> dict[str, tuple[Image.Image, np.ndarray]]:
    """mode → (an image in that mode, the 8-bit RGB pixels it stands for)."""
    rgba = RNG.integers(0, 256, (H, W, 4), dtype=np.uint8)
    alpha = RNG.integers(0, 256, (H, W), dtype=np.uint8)
    palette = RNG.integers(0, 256, (256, 3), dtype=np.uint8)
    index = RNG.integers(0, 256, (H, W), dtype=np.uint8)
    p_image = Image.frombytes("P", (W, H), index.tobytes())
    p_image.putpalette(palette.flatten().tolist())
    bits = V8 > 127
    cmyk = Image.frombytes("CMYK", (W, H), RNG.integers(0, 256, (H, W, 4), dtype=np.uint8).tobytes())
    v16 = V8.astype(np.uint16) * 257  # k * 257 is exactly k on the 8-bit scale
    pa_image = Image.frombytes("PA", (W, H), np.stack((index, alpha), axis=2).tobytes())
    pa_image.putpalette(palette.flatten().tolist())
    ycbcr = Image.frombytes("YCbCr", (W, H), RNG.integers(0, 256, (H, W, 3), dtype=np.uint8).tobytes())
    return {
        # LLaVA's convert('RGB') drops alpha.
        "RGBA": (Image.fromarray(rgba, "RGBA"), rgba[..., :3]),
        "LA": (Image.fromarray(np.stack((V8, alpha), axis=2), "LA"), grey_rgb(V8)),
        "L": (Image.fromarray(V8, "L"), grey_rgb(V8)),
        "P": (p_image, palette[index]),
        "PA": (pa_image, palette[index]),
        "YCbCr": (ycbcr, np.asarray(ycbcr.convert("RGB"))),
        # CMYK's and YCbCr's colour conversions are PIL's, as in LLaVA's convert('RGB').
        "CMYK": (cmyk, np.asarray(cmyk.convert("RGB"))),
        "1": (Image.fromarray(bits).convert("1"), grey_rgb(bits.astype(np.uint8) * 255)),
        "I;16": (Image.frombytes("I;16", (W, H), v16.astype("<u2").tobytes()), grey_rgb(V8)),
        "I": (Image.fromarray(v16.astype(np.int32), "I"), grey_rgb(V8)),
        "F": (Image.fromarray((V8 / 255).astype(np.float32), "F"), grey_rgb(V8)),
    }


@pytest.mark.parametrize("mode", list(mode_cases()))
def test_modes_match_their_rgb_equivalent(mode: str):
    image, rgb = mode_cases()[mode]
    assert image.mode == mode
    got = ImageProcessor(size=28, aspect_ratio="pad")(image)
    want = reference.reference_pixels(Image.fromarray(rgb, "RGB"), 28, pad=True)
    assert got.shape == (3, 28, 28) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, **EXACT)


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_sixteen_bit_white_is_white(mode: str):
    """Full-scale 16-bit is white (scaled), like 255 in an 8-bit image (not clipped, which
    would also give white, so mid-grey is checked too)."""
    processor = ImageProcessor(size=28, aspect_ratio="pad")
    for value16, value8 in ((65535, 255), (0, 0), (128 * 257, 128), (51 * 257, 51)):
        got = processor(Image.new(mode, (W, H), value16))
        want = reference.reference_pixels(Image.new("RGB", (W, H), (value8,) * 3), 28)
        torch.testing.assert_close(got, want, **EXACT, msg=f"{mode} {value16}")


def test_dark_sixteen_bit_image_stays_dark():
    """An I;16 image is 16-bit whatever its content: a very dark 16-bit image (all values
    <= 255) must come out (nearly) black, not be read as 8-bit."""
    processor = ImageProcessor(size=28, aspect_ratio="pad")
    got = processor(Image.new("I;16", (W, H), 255))  # 255/65535 of white: 0 or 1 in 8 bits
    want = reference.reference_pixels(Image.new("RGB", (W, H), (0, 0, 0)), 28)
    torch.testing.assert_close(got, want, atol=1.5 / (255 * 0.26), rtol=0)


# ---- files ----------------------------------------------------------------------------------------


def write_png(path: Path) -> Image.Image:
    image = reference.random_rgb(31, 19, seed=1)
    image.save(path)
    return image


def test_load_image_reads_fully(tmp_path: Path):
    path = tmp_path / "ok.png"
    image = write_png(path)
    loaded = load_image(path)
    path.unlink()  # fully loaded: no lazy read from the file afterwards
    assert loaded.size == image.size
    np.testing.assert_array_equal(np.asarray(loaded.convert("RGB")), np.asarray(image))


def broken_files(tmp_path: Path) -> dict[str, Path]:
    png = tmp_path / "truncated.png"
    write_png(png)
    png.write_bytes(png.read_bytes()[: len(png.read_bytes()) // 2])
    jpg = tmp_path / "truncated.jpg"
    reference.random_rgb(64, 64, seed=2).save(jpg, quality=95)
    jpg.write_bytes(jpg.read_bytes()[: len(jpg.read_bytes()) // 2])
    text = tmp_path / "notes.png"
    text.write_text("this is not an image\n")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    directory = tmp_path / "folder.png"
    directory.mkdir()
    return {"missing": tmp_path / "nope.png", "directory": directory, "text": text,
            "empty": empty, "truncated-png": png, "truncated-jpg": jpg}


@pytest.mark.parametrize("case", ["missing", "directory", "text", "empty",
                                  "truncated-png", "truncated-jpg"])
def test_load_image_errors_name_the_path(tmp_path: Path, monkeypatch, case: str):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)
    path = broken_files(tmp_path)[case]
    with pytest.raises(shortv.InputError) as info:
        load_image(path)
    assert isinstance(info.value, shortv.ShortVError)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_encode_with_a_bad_path_is_an_input_error(tmp_path: Path, hf_llava: Path):
    model = shortv.load(hf_llava, device="cpu")
    path = tmp_path / "missing.jpg"
    with pytest.raises(shortv.InputError, match=r"missing\.jpg"):
        model.encode("<image>", [path], template=False)


def test_decompression_bomb_is_an_input_error(tmp_path, monkeypatch):
    """PIL's DecompressionBombError (an image over twice MAX_IMAGE_PIXELS) becomes one
    clear InputError naming the limit and how to raise it."""
    from PIL import Image

    from shortv.errors import InputError

    path = tmp_path / "big.png"
    Image.new("RGB", (200, 200)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # 200*200 > 2 * 10_000
    with pytest.raises(InputError) as err:
        load_image(path)
    message = str(err.value)
    assert "MAX_IMAGE_PIXELS = 10000" in message and "big.png" in message and "\n" not in message


# ---- http(s) URLs and encoded bytes ---------------------------------------------------------------


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def image_site():
    """(base URL, the image it serves) on localhost: /photo.png with a Content-Length,
    /stream.png without one, "/café photo.png" (percent-encoded on the wire), /page.html (not
    an image) and 404 for anything else."""
    image = reference.random_rgb(31, 19, seed=3)
    body = png_bytes(image)
    routes = {"/photo.png": ("image/png", body, True), "/stream.png": ("image/png", body, False),
              "/caf%C3%A9%20photo.png": ("image/png", body, True),
              "/page.html": ("text/html", b"<html><img src='photo.png'></html>", True)}
    with image_server.serving(routes) as base:
        yield base, image


@pytest.mark.parametrize("path", ["/photo.png", "/stream.png", "/café photo.png",
                                  "/caf%C3%A9%20photo.png"])
def test_load_image_fetches_an_http_url(image_site, path: str):
    base, image = image_site
    loaded = load_image(base + path)
    np.testing.assert_array_equal(np.asarray(loaded.convert("RGB")), np.asarray(image))


def test_load_image_reads_encoded_bytes(tmp_path: Path):
    image = reference.random_rgb(23, 17, seed=4)
    jpeg = tmp_path / "photo.jpg"
    image.save(jpeg, quality=90)
    from_file = np.asarray(load_image(jpeg))
    for data in (jpeg.read_bytes(), bytearray(jpeg.read_bytes()), memoryview(jpeg.read_bytes())):
        np.testing.assert_array_equal(np.asarray(load_image(data)), from_file)
    with pytest.raises(shortv.InputError, match="image bytes") as info:
        load_image(b"not an image at all")
    assert "\n" not in str(info.value) and "BytesIO" not in str(info.value)


def test_empty_image_path():
    with pytest.raises(shortv.InputError, match="the image path is empty"):
        load_image("")


def assert_fetch_error(url: str, reason: str, **limits) -> None:
    """load_image(url) fails with one InputError line naming the URL and `reason`."""
    with pytest.raises(shortv.InputError) as info:
        load_image(url, **limits)
    message = str(info.value)
    assert message.startswith(f"could not fetch image {url}: "), message
    assert reason in message and "\n" not in message


def test_url_not_found(image_site):
    base, _ = image_site
    assert_fetch_error(base + "/missing.png", "HTTP 404")


def test_url_refused():
    assert_fetch_error(f"http://127.0.0.1:{image_server.closed_port()}/photo.png", "refused")


def test_url_with_no_answer_times_out():
    with image_server.silent_port() as port:
        assert_fetch_error(f"http://127.0.0.1:{port}/photo.png", "0.3 s", timeout=0.3)


def test_url_offline(monkeypatch):
    """No DNS (offline): the host name cannot be resolved."""
    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    assert_fetch_error("https://llava-vl.github.io/static/images/view.jpg", "offline")


@pytest.mark.parametrize("path", ["/photo.png", "/stream.png"])
def test_url_over_the_size_cap(image_site, path: str):
    """Refused by its Content-Length, or while streaming a body without one."""
    base, image = image_site
    size = len(png_bytes(image))
    assert_fetch_error(base + path, f"over the limit of {size - 1} bytes", max_bytes=size - 1)
    assert load_image(base + path, max_bytes=size).size == image.size  # exactly at the cap


def test_url_that_is_not_an_image(image_site):
    base, _ = image_site
    assert_fetch_error(base + "/page.html", "text/html")
