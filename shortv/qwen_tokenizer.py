"""Qwen2-VL / Qwen2.5-VL tokenization: the checkpoint's byte-level BPE (tokenizer.json) read
with the `tokenizers` library, as transformers' Qwen2Tokenizer reads it.

Differences from LLaVA's rules (`shortv.tokenizer.Tokenizer`): no BOS; the prompt is
tokenized in one piece with the special tokens (`<|im_start|>`, `<|vision_start|>`, ...)
recognised; an image is `<|vision_start|><|image_pad|><|vision_end|>` in the text, and its
one `<|image_pad|>` id becomes IMAGE_TOKEN, which the model expands to the image's visual
tokens (transformers' processor expands it in the text instead).
"""

from __future__ import annotations

from pathlib import Path

import tokenizers

from .errors import CheckpointError
from .tokenizer import IMAGE_TOKEN, Tokenizer, _read_json, _special

IMAGE_PAD = "<|image_pad|>"
# An image in a Qwen2-VL prompt, as the chat template writes it.
IMAGE_MARKER = "<|vision_start|>" + IMAGE_PAD + "<|vision_end|>"
# Qwen2Tokenizer's eos_token when tokenizer_config.json names none (the base models').
DEFAULT_EOS = "<|endoftext|>"


class QwenTokenizer(Tokenizer):
    """Text ↔ ids for a Qwen2-VL model; the interface of `Tokenizer`."""

    image_marker = IMAGE_MARKER

    def __init__(self, backend: tokenizers.Tokenizer, *, eos_id: int | None,
                 source: str = "") -> None:
        super().__init__(backend, bos_id=None, eos_id=eos_id, add_bos=False, source=source)
        # Byte-level BPE: the backend's ByteLevel decoder is the right one, never
        # SentencePiece's piece rules (the base class guesses those from the vocabulary).
        self._pieces = None
        image_pad = backend.token_to_id(IMAGE_PAD)
        if image_pad is None:
            raise CheckpointError(f"tokenizer {source or '(in memory)'} has no {IMAGE_PAD} token: "
                                  "it is not a Qwen2-VL / Qwen2.5-VL tokenizer")
        self.image_pad_id: int = image_pad

    @classmethod
    def from_directory(cls, directory: str | Path) -> QwenTokenizer:
        """tokenizer.json, with the EOS named by tokenizer_config.json (`<|im_end|>` for the
        Instruct models; special_tokens_map.json overrides it, as in transformers)."""
        directory = Path(directory)
        fast = directory / "tokenizer.json"
        if not fast.is_file():
            raise CheckpointError(f"no tokenizer in {directory}: expected tokenizer.json "
                                  "(Qwen2-VL's byte-level BPE)")
        try:
            backend = tokenizers.Tokenizer.from_file(str(fast))
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise CheckpointError(f"cannot read {fast}: {e}") from None
        settings = {**_read_json(directory / "tokenizer_config.json"),
                    **_read_json(directory / "special_tokens_map.json")}
        eos = _special(settings, "eos_token", backend, DEFAULT_EOS)
        return cls(backend, eos_id=eos, source=str(fast))

    def encode_prompt(self, prompt: str) -> list[int]:
        """Ids of a rendered prompt, no BOS; each `<|image_pad|>` (one per image, in
        `image_marker`) is IMAGE_TOKEN."""
        return [IMAGE_TOKEN if i == self.image_pad_id else i for i in self.encode_text(prompt)]
