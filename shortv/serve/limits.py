"""What one request may ask of the server (`Limits`), as the operator set it on the command line."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server.

    max_body_bytes: the request body. max_image_bytes: one image's encoded bytes (a data:
    URL's decoded payload, or a local file). max_image_pixels: width × height of one image,
    checked from its header before it is decoded. max_images: images in one request.
    max_tokens: the most `max_tokens` a request may ask for, and what it gets without one.
    image_root: local image paths are served only from under this folder (None: never).
    allow_urls: fetch http(s) image URLs (off by default: a client could make the server
    fetch from its own network). url_timeout: seconds one image download may take.
    """

    max_body_bytes: int = 32 * 2**20
    max_image_bytes: int = 20 * 2**20
    max_image_pixels: int = 4096 * 4096
    max_images: int = 8
    max_tokens: int = 512
    image_root: Path | None = None
    allow_urls: bool = False
    url_timeout: float = 10.0
