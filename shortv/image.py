"""Image preprocessing exactly as original LLaVA does it (docs/design.md §5).

- "pad" (LLaVA-1.5): paste onto a square canvas in the CLIP mean colour, then CLIP's
  processing (bicubic resize of the shortest side, centre crop, scale, normalise).
- "anyres" (LLaVA-NeXT): pick a grid pinpoint, resize keeping the aspect ratio, pad
  centred with black, cut into tiles, and prepend the whole image resized to a square.
- "square": CLIP's processing alone.

Also the anyres geometry (pinpoint choice, grid shape, unpadding) that the feature side
of LLaVA-NeXT shares with the pixel side, and `load_image`, which opens an image from a
file, an http(s) URL or encoded bytes.
"""

from __future__ import annotations

import http.client
import io
import math
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from .errors import InputError
from .models.anyres import select_best_resolution, unpad_slices
from .models.config import LlavaConfig
from .version import __version__

BICUBIC = Image.Resampling.BICUBIC


# Fetching an image from an http(s) URL: the whole download must finish within the timeout
# and stay under the size cap (a photo is a few MiB; the cap only stops runaway bodies).
URL_TIMEOUT = 30.0
URL_MAX_BYTES = 64 * 2**20
URL_SCHEMES = ("http", "https")
_CHUNK = 2**20
# Characters left as they are when percent-encoding a URL: the reserved ones and "%" itself.
URL_SAFE = ":/?#[]@!$&'()*+,;=%~"

ImageSource = str | os.PathLike | bytes | bytearray | memoryview


def is_url(source: object) -> bool:
    """Whether `source` is an http:// or https:// URL (what `load_image` fetches)."""
    if not isinstance(source, str):
        return False
    parts = urllib.parse.urlparse(source)
    return parts.scheme.lower() in URL_SCHEMES and bool(parts.netloc)


def load_image(
    source: ImageSource, *, timeout: float = URL_TIMEOUT, max_bytes: int = URL_MAX_BYTES
) -> Image.Image:
    """Open an image fully (so a broken one fails here, not later) from a file path, an
    http(s) URL, or the encoded bytes of an image file (PNG, JPEG, ...).

    A URL is fetched with the standard library: the download must finish within `timeout`
    seconds and be at most `max_bytes` long. Every failure (missing file, offline, HTTP
    error, too big, not an image) is one InputError naming the source.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode(io.BytesIO(source), "the image bytes")
    if is_url(source):
        return _load_url(source, timeout, max_bytes)
    if not isinstance(source, (str, os.PathLike)):
        raise InputError(f"an image source must be a file path, an http(s) URL or image bytes, "
                         f"got {type(source).__name__}")
    if not os.fspath(source):
        raise InputError("the image path is empty: give an image file, an http(s) URL or image bytes")
    try:
        return _decode(source, source)
    except FileNotFoundError:
        raise InputError(f"image file not found: {source}") from None
    except IsADirectoryError:
        raise InputError(f"image path is a directory, not an image file: {source}") from None


def _decode(file: str | os.PathLike | io.BytesIO, name: object) -> Image.Image:
    """The image in `file` (a path or a buffer), fully loaded; `name` says which in errors.
    A missing path's FileNotFoundError / IsADirectoryError pass through."""
    try:
        with Image.open(file) as im:
            im.load()
            return im.copy()
    except (FileNotFoundError, IsADirectoryError):
        raise
    except Image.DecompressionBombError as e:
        # PIL refuses images over twice MAX_IMAGE_PIXELS to guard against decompression bombs.
        raise InputError(
            f"{name} is too large to open safely ({e}); PIL's limit is "
            f"Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS} pixels (refused above twice that): "
            "downscale the image, or raise the limit with `PIL.Image.MAX_IMAGE_PIXELS = N` "
            "if you trust the file") from None
    except UnidentifiedImageError:
        # PIL's own message names the buffer object, not the source.
        raise InputError(f"cannot read {name} as an image: not in an image format PIL can read "
                         "(PNG, JPEG, WebP, ...)") from None
    except (OSError, SyntaxError) as e:
        raise InputError(f"cannot read {name} as an image ({e.__class__.__name__}: {e})") from None


def _load_url(url: str, timeout: float, max_bytes: int) -> Image.Image:
    data, content_type = _download(url, timeout, max_bytes)
    try:
        return _decode(io.BytesIO(data), f"the image at {url}")
    except InputError:
        if content_type.startswith("image/"):
            raise  # an image that is broken: the decoder's message says how
        # Most likely a web page that shows the image rather than the image itself.
        raise InputError(
            f"could not fetch image {url}: the server sent {content_type or 'a body'} "
            f"({len(data)} bytes), not an image; give the address of the image file itself"
        ) from None


def fetch_url(url: str, *, timeout: float = URL_TIMEOUT, max_bytes: int = URL_MAX_BYTES) -> bytes:
    """The body of an http(s) URL, read in chunks up to `max_bytes`, all within `timeout`
    seconds; InputError "could not fetch image URL: why; download it and pass the file"."""
    return _download(url, timeout, max_bytes)[0]


def _download(url: str, timeout: float, max_bytes: int) -> tuple[bytes, str]:
    """(body, Content-Type) of an http(s) URL; see `fetch_url`."""
    def failed(reason: str) -> InputError:
        return InputError(f"could not fetch image {url}: {reason}; download it and pass the file")

    # Percent-encode spaces and non-ASCII characters (a browser's address bar does; urllib
    # does not).
    quoted = urllib.parse.quote(url, safe=URL_SAFE)
    request = urllib.request.Request(quoted, headers={"User-Agent": f"shortv/{__version__}"})
    deadline = time.monotonic() + timeout
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > max_bytes:
                raise failed(f"it is {int(length)} bytes, over the limit of {max_bytes} bytes")
            data = bytearray()
            while chunk := response.read(_CHUNK):
                data += chunk
                if len(data) > max_bytes:
                    raise failed(f"it is over the limit of {max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise failed(f"the download took longer than {timeout:g} s")
            content_type = response.headers.get("Content-Type") or ""
            return bytes(data), content_type.split(";")[0].strip().lower()
    except InputError:
        raise
    except urllib.error.HTTPError as e:
        raise failed(f"the server answered HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise failed(_network_reason(e.reason, timeout)) from None
    except (TimeoutError, OSError, http.client.HTTPException, ValueError) as e:
        raise failed(_network_reason(e, timeout)) from None


def _network_reason(reason: object, timeout: float) -> str:
    """Why a connection failed, in words (offline, refused, timed out, ...)."""
    if isinstance(reason, TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(reason, socket.gaierror):
        return f"cannot resolve the host name; are you offline? ({reason})"
    if isinstance(reason, ConnectionRefusedError):
        return "the connection was refused"
    text = str(reason) or reason.__class__.__name__
    return text if isinstance(reason, str) else f"{reason.__class__.__name__}: {text}"


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB. Alpha is dropped like LLaVA's `convert('RGB')`;
    16/32-bit integer and float greyscale are scaled to 8 bits rather than clipped."""
    if not isinstance(image, Image.Image):
        raise InputError(f"expected a PIL image, got {type(image).__name__}")
    if image.width < 1 or image.height < 1:
        raise InputError(f"image has no pixels (size {image.size})")
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16"):  # 16-bit by definition, whatever its content
        image = image.convert("I").point(lambda v: v * (255 / 65535)).convert("L")
    elif image.mode in ("I", "F"):
        _, hi = image.getextrema()
        # 32-bit integers wider than 8 bits are read as 16-bit; floats in 0..1 as fractions.
        scale = 255 / 65535 if hi > 255 else (255.0 if image.mode == "F" and hi <= 1 else 1.0)
        image = image.point(lambda v: v * scale).convert("L")
    elif image.mode == "La":  # premultiplied alpha: PIL converts it only via LA
        image = image.convert("LA")
    try:
        return image.convert("RGB")
    except ValueError as e:
        raise InputError(f"cannot convert a {image.mode!r} image to RGB: {e}") from None


def mean_colour(mean: Sequence[float]) -> tuple[int, int, int]:
    r, g, b = (int(m * 255) for m in mean)
    return r, g, b


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Centre the image on a square canvas of its longer side (LLaVA's expand2square)."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def clip_preprocess(
    image: Image.Image, size: int, mean: Sequence[float], std: Sequence[float]
) -> Tensor:
    """CLIP's processing: bicubic resize of the shortest side to `size` (longer side
    truncated like transformers), centre crop `size`×`size`, scale 1/255, normalise.
    Returns [3, size, size] float32."""
    w, h = image.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), resample=BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    if (left, top, new_w, new_h) != (0, 0, size, size):
        image = image.crop((left, top, left + size, top + size))
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3)
    # Scale in float64 then normalise in float32, as transformers' processor does.
    x = (pixels.permute(2, 0, 1).double() * (1 / 255)).float()
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (x - m) / s


def resize_and_pad(image: Image.Image, target: tuple[int, int]) -> Image.Image:
    """Resize keeping the aspect ratio to fit `target` and centre it on black."""
    w, h = image.size
    tw, th = target
    sw, sh = tw / w, th / h
    if sw < sh:
        new_w, new_h = tw, min(math.ceil(h * sw), th)
    else:
        new_w, new_h = min(math.ceil(w * sh), tw), th
    resized = image.resize((new_w, new_h), resample=BICUBIC)
    canvas = Image.new("RGB", (tw, th), (0, 0, 0))
    canvas.paste(resized, ((tw - new_w) // 2, (th - new_h) // 2))
    return canvas


@dataclass(frozen=True)
class ImageProcessor:
    """Turns a PIL image into the tensor a LLaVA model takes: [3, S, S] for "pad" and
    "square", [1 + tiles, 3, S, S] for "anyres" (the whole image first)."""

    size: int = 336
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    aspect_ratio: str = "pad"
    grid_pinpoints: tuple[tuple[int, int], ...] = ()

    @classmethod
    def for_config(cls, config: LlavaConfig) -> ImageProcessor:
        return cls(
            size=config.vision.image_size,
            mean=config.image_mean,
            std=config.image_std,
            aspect_ratio=config.image_aspect_ratio,
            grid_pinpoints=config.image_grid_pinpoints,
        )

    def __call__(self, image: Image.Image) -> Tensor:
        image = to_rgb(image)
        if self.aspect_ratio == "anyres":
            return torch.stack([self._clip(t) for t in self.anyres_crops(image)])
        if self.aspect_ratio == "pad":
            image = expand_to_square(image, mean_colour(self.mean))
        return self._clip(image)

    def anyres_crops(self, image: Image.Image) -> list[Image.Image]:
        """The whole image as a square, then the grid's tiles row by row."""
        target = select_best_resolution(image.size, self.grid_pinpoints)
        padded = resize_and_pad(image, target)
        s = self.size
        tiles = [
            padded.crop((x, y, x + s, y + s))
            for y in range(0, target[1], s)
            for x in range(0, target[0], s)
        ]
        return [image.resize((s, s), resample=BICUBIC), *tiles]

    def _clip(self, image: Image.Image) -> Tensor:
        return clip_preprocess(image, self.size, self.mean, self.std)


# ---- where each visual token comes from ------------------------------------------------------


def llava_token_boxes(size: tuple[int, int], *, image_size: int, patch: int, aspect_ratio: str,
                      merge: str, grid_pinpoints: Sequence[tuple[int, int]] = ()) -> Tensor:
    """The box (x0, y0, x1, y1), in the original image's pixels, that each of an image's
    visual tokens sees, in the order LLaVA lays them out: [n, 4], NaN for a token that
    is no image region (LLaVA-NeXT's row-end token). Boxes are clipped to the image (one
    entirely in padding is empty)."""
    w, h = size
    side = image_size // patch
    if aspect_ratio == "anyres":
        return _anyres_boxes(size, image_size, side, merge, grid_pinpoints)
    if aspect_ratio == "pad":
        # expand_to_square pastes the image at ((s - w) // 2, (s - h) // 2) of an s × s canvas.
        s = max(w, h)
        boxes = _grid_boxes(side, side, s / side, s / side)
        boxes -= torch.tensor([(s - w) // 2, (s - h) // 2] * 2, dtype=boxes.dtype)
    else:
        # clip_preprocess: shortest side to image_size, then a centre crop.
        scale_w, scale_h = ((image_size, int(image_size * h / w)) if w <= h
                            else (int(image_size * w / h), image_size))
        left, top = (scale_w - image_size) // 2, (scale_h - image_size) // 2
        boxes = _grid_boxes(side, side, patch, patch) + torch.tensor([left, top] * 2, dtype=torch.float64)
        boxes *= torch.tensor([w / scale_w, h / scale_h] * 2, dtype=torch.float64)
    return _clipped(boxes, w, h)


def _anyres_boxes(size: tuple[int, int], image_size: int, side: int, merge: str,
                  grid_pinpoints: Sequence[tuple[int, int]]) -> Tensor:
    """LLaVA-NeXT: the base crop (the image resized to a square), then the tiles' feature
    map over `resize_and_pad`'s canvas, unpadded, each row closed by a row-end token."""
    w, h = size
    base = _grid_boxes(side, side, w / side, h / side)
    tw, th = select_best_resolution(size, grid_pinpoints)
    cols, rows = tw // image_size, th // image_size
    # resize_and_pad's placement of the image on the tw × th canvas.
    if tw / w < th / h:
        new_w, new_h = tw, min(math.ceil(h * tw / w), th)
    else:
        new_w, new_h = min(math.ceil(w * th / h), tw), th
    cell = image_size / side
    fmap = _grid_boxes(rows * side, cols * side, cell, cell)
    fmap -= torch.tensor([(tw - new_w) // 2, (th - new_h) // 2] * 2, dtype=fmap.dtype)
    fmap *= torch.tensor([w / new_w, h / new_h] * 2, dtype=fmap.dtype)
    fmap = fmap.view(rows * side, cols * side, 4)
    if merge == "flat":  # crop by crop: each tile's patches row by row
        tiles = fmap.view(rows, side, cols, side, 4).permute(0, 2, 1, 3, 4).reshape(-1, 4)
        return _clipped(torch.cat((base, tiles)), w, h)
    if merge != "spatial_unpad":  # "spatial": the whole feature map row by row
        return _clipped(torch.cat((base, fmap.reshape(-1, 4))), w, h)
    row_slice, col_slice = unpad_slices(size, rows * side, cols * side)
    kept = fmap[row_slice, col_slice]
    newline = torch.full((kept.shape[0], 1, 4), math.nan, dtype=kept.dtype)
    return _clipped(torch.cat((base, torch.cat((kept, newline), dim=1).reshape(-1, 4))), w, h)


def _grid_boxes(rows: int, cols: int, cell_w: float, cell_h: float) -> Tensor:
    """[rows · cols, 4] the cells of a grid, row by row, in float64."""
    r, c = torch.meshgrid(torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64),
                          indexing="ij")
    return torch.stack((c * cell_w, r * cell_h, (c + 1) * cell_w, (r + 1) * cell_h), dim=-1).reshape(-1, 4)


def _clipped(boxes: Tensor, w: int, h: int) -> Tensor:
    limit = torch.tensor([w, h, w, h], dtype=boxes.dtype)
    return torch.minimum(boxes.clamp(min=0), limit)
