"""The vision-feature cache: an image seen before skips the vision tower and projector.

A chat client sends the same picture with every turn of a conversation, and a benchmark
asks many questions about one image; the tower's answer for it does not change. The
cache keeps each image's visual tokens (what `VisionLanguageModule.image_features`
returns, on the model's device) under a key made from the image's content, least
recently used first out, bounded by the bytes of the stored tensors.

The key (`image_key`) is a SHA-256 digest of the *preprocessed* image tensor's bytes with
its shape and dtype (the same picture gives the same pixels, whether it came as a path, a
PIL image or a file's bytes), the image's original size (LLaVA-NeXT's anyres merge
depends on it), the model's device and dtype, and, for a method that reduces images
(VisionZip), that method: its visual tokens differ from vanilla's and between budgets.
Methods that only act inside the language model (ShortV, FastV, ...) share vanilla's
entries. The digest must resist collisions (a server's clients must not be able to craft an
image that reads another client's image's tokens); SHA-256 rather than BLAKE2b because
hashlib's SHA-256 uses the CPU's SHA extensions where there are any (1.7 against 0.9 GB/s
on the machine we measured).

What a hit returns is the very tensor the tower gave on the miss, so an answer is the same
bit for bit as long as the tower gives an image the same tokens whatever else is in its
batch. A cache serves one model whose weights do not change: after changing weights in
place, `clear()` it. It is not thread-safe: one thread (the server's engine worker, or the
caller of `model.generate`) owns it; other threads may read its counters.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from ..methods import Compose, Hook, Method

MIB = 2**20


class FeatureCache:
    """Visual tokens by image key (`image_key`), least recently used first out once the
    stored tensors pass `max_bytes`. Counters: `hits` (images whose tokens came from the
    cache, or from another copy of the same image in the same batch: the tower did not
    run for them), `misses` (images the tower ran on), `evictions`, `too_large` (results
    bigger than the whole cache, not stored); `bytes` and `entries` say what it holds."""

    def __init__(self, max_bytes: int) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ConfigError("the feature cache's size must be a whole number of bytes >= 0, "
                              f"got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, Tensor] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.too_large = 0

    @classmethod
    def of_mb(cls, max_mb: float) -> FeatureCache:
        """A cache of `max_mb` MiB."""
        if isinstance(max_mb, bool) or not isinstance(max_mb, (int, float)) or not max_mb >= 0:
            raise ConfigError(f"the feature cache's size must be a number of MB >= 0, got {max_mb!r}")
        return cls(int(max_mb * MIB))

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def entries(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def __repr__(self) -> str:
        return (f"FeatureCache({self.bytes / MIB:.1f} of {self.max_bytes / MIB:.1f} MiB, "
                f"{len(self)} entries, hits={self.hits}, misses={self.misses}, evictions={self.evictions})")

    def get(self, key: Hashable) -> Tensor | None:
        """The tokens stored under `key` (now the most recently used), or None. Counts
        nothing: `features` does the counting."""
        tokens = self._entries.get(key)
        if tokens is not None:
            self._entries.move_to_end(key)
        return tokens

    def put(self, key: Hashable, tokens: Tensor) -> Tensor:
        """Store `tokens` under `key`, evicting the least recently used entries to make
        room; returns what is stored (detached, and copied if it was a view of a bigger
        tensor, so that an entry holds only its own bytes). A tensor bigger than the
        whole cache is not stored (counted in `too_large`) and comes back detached, not copied."""
        tokens = tokens.detach()
        size = _nbytes(tokens)
        if size > self.max_bytes:
            self.too_large += 1
            return tokens
        if key in self._entries:
            self.bytes -= _nbytes(self._entries.pop(key))
        if tokens.untyped_storage().nbytes() > size or not tokens.is_contiguous():
            tokens = tokens.clone(memory_format=torch.contiguous_format)
        while self._entries and self.bytes + size > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.bytes -= _nbytes(old)
            self.evictions += 1
        self._entries[key] = tokens
        self.bytes += size
        return tokens

    def features(self, keys: Sequence[Hashable],
                 compute: Callable[[list[int]], list[Tensor]]) -> list[Tensor]:
        """The tokens of every key, in order: stored ones from the cache, the others from
        one call of `compute(indices)` (the indices into `keys` of the distinct keys not
        stored, in order; it returns their tokens), which are then stored."""
        found: dict[Hashable, Tensor] = {}
        missing: dict[Hashable, int] = {}
        for i, key in enumerate(keys):
            if key in found or key in missing:
                self.hits += 1  # another copy of an image of this batch
                continue
            tokens = self.get(key)
            if tokens is None:
                missing[key] = i
                self.misses += 1
            else:
                found[key] = tokens
                self.hits += 1
        if missing:
            computed = compute(list(missing.values()))
            for key, tokens in zip(missing, computed, strict=True):
                found[key] = self.put(key, tokens)
        return [found[key] for key in keys]

    def clear(self) -> None:
        """Drop every entry (the counters stay)."""
        self._entries.clear()
        self.bytes = 0

    def stats(self) -> dict[str, int]:
        """The counters and the current size, for logs and metrics."""
        return {"hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                "too_large": self.too_large, "bytes": self.bytes, "entries": len(self),
                "max_bytes": self.max_bytes}


def image_key(image: Tensor, size: tuple[int, int], method: Method, *, device: torch.device,
              dtype: torch.dtype) -> Hashable:
    """The cache key of one preprocessed image (see the module docstring): its content
    digest, shape and dtype, its original `size`, the model's `device` and `dtype`, and the
    image-reducing part of `method` (None when it reduces nothing)."""
    return (tensor_digest(image), tuple(image.shape), str(image.dtype), tuple(size), str(device),
            str(dtype), image_method_key(method))


def tensor_digest(tensor: Tensor) -> bytes:
    """SHA-256 of a tensor's bytes in row-major order (copied to the CPU first if needed)."""
    flat = tensor.detach().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    flat = flat.contiguous()
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    return hashlib.sha256(flat.view(torch.uint8).numpy()).digest()


def image_method_key(method: Method) -> Any:
    """What of `method` changes an image's visual tokens: its image-reducing part
    (VisionZip, alone or inside a composition), or None for every method that reduces
    nothing. The method object itself (every shortv method is a frozen, hashable
    dataclass; its repr for one that is not)."""
    if not method.reduces_images:
        return None
    if isinstance(method, Compose):
        method = next((p for p in method.parts if Hook.IMAGE in p.hooks), method)
    try:
        hash(method)
    except TypeError:
        return (type(method).__qualname__, repr(method))
    return method


def _nbytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()
