"""Images of a chat request: `data:` URLs always; local files only under the image root
(`--image-root`); http(s) URLs only when the operator allows them (`--allow-image-urls`);
other network URLs never. Sizes are checked before decoding: the encoded bytes, then the
pixel count from the image's header."""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from urllib.parse import unquote, urlparse

from PIL import Image, UnidentifiedImageError

from ..errors import InputError
from .errors import RequestError, bad
from .limits import Limits

NETWORK_SCHEMES = ("http", "https", "ftp", "ftps", "ws", "wss")


def load_image_url(url: str, limits: Limits, where: str = "image") -> Image.Image:
    """The image an `image_url` part names, decoded; RequestError (400) otherwise."""
    if url.startswith("data:"):
        return decode_image(_data_url_bytes(url, limits, where), limits, where)
    scheme = urlparse(url).scheme.lower()
    if scheme in ("http", "https") and limits.allow_urls:
        return decode_image(_fetched_bytes(url, limits, where), limits, where)
    if scheme in NETWORK_SCHEMES:
        raise bad(f"{where}: this server does not fetch images from the network ({url[:60]}); "
                  "send the image inline as a data: URL (data:image/png;base64,...)", "messages")
    if scheme not in ("", "file") and len(scheme) > 1:  # one letter: a Windows drive
        raise bad(f"{where}: unsupported image URL scheme {scheme}:; send a data: URL", "messages")
    path = unquote(urlparse(url).path) if scheme == "file" else url
    return decode_image(_local_bytes(path, limits, where), limits, where)


def _data_url_bytes(url: str, limits: Limits, where: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise bad(f"{where}: a data: URL must be base64, as data:image/png;base64,...", "messages")
    if len(payload) * 3 // 4 > limits.max_image_bytes + 2:
        raise _too_many_bytes(where, limits)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad(f"{where}: the data: URL is not valid base64", "messages") from None
    if len(data) > limits.max_image_bytes:
        raise _too_many_bytes(where, limits)
    return data


def _fetched_bytes(url: str, limits: Limits, where: str) -> bytes:
    """The body of an http(s) image URL (the operator allowed them), within the server's
    download timeout and its image size limit."""
    from ..image import fetch_url

    try:
        return fetch_url(url, timeout=limits.url_timeout, max_bytes=limits.max_image_bytes)
    except InputError as e:
        raise bad(f"{where}: {e}", "messages") from None


def _local_bytes(path: str, limits: Limits, where: str) -> bytes:
    if limits.image_root is None:
        raise bad(f"{where}: local image paths are not served (start the server with --image-root "
                  "DIR to allow them); send the image as a data: URL", "messages")
    root = limits.image_root.resolve()
    target = (root / path).resolve()  # an absolute path stays absolute
    if not target.is_relative_to(root):
        raise bad(f"{where}: {path} is outside the server's image root", "messages")
    if not target.is_file():
        raise bad(f"{where}: no image file {path} under the server's image root", "messages")
    if target.stat().st_size > limits.max_image_bytes:
        raise _too_many_bytes(where, limits)
    return target.read_bytes()


def decode_image(data: bytes, limits: Limits, where: str = "image") -> Image.Image:
    """Decode an image, refusing one with more pixels than the limit before decoding it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > limits.max_image_pixels:
                    raise bad(f"{where} is {width}x{height} = {width * height} pixels, over this "
                              f"server's limit of {limits.max_image_pixels} (--max-image-pixels)",
                              "messages", "image_too_large")
                image.load()
                return image.copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise bad(f"{where} is too large to decode safely ({e})", "messages", "image_too_large") from None
    except UnidentifiedImageError:
        raise bad(f"{where} cannot be read as an image: not a format this server knows (PNG, "
                  "JPEG, GIF, WebP, BMP, ...)", "messages") from None
    except (OSError, SyntaxError, ValueError) as e:
        # PIL's messages can name the buffer object it read from: keep the words only.
        reason = re.sub(r"\s*<[^>]* at 0x[0-9a-f]+>", "", str(e)) or "a broken file"
        raise bad(f"{where} cannot be read as an image: {reason}", "messages") from None


def _too_many_bytes(where: str, limits: Limits) -> RequestError:
    return bad(f"{where} is over this server's limit of {limits.max_image_bytes} bytes "
               "(--max-image-mb)", "messages", "image_too_large")


__all__ = ["decode_image", "load_image_url"]
