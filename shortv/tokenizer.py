"""Prompt tokenization exactly as original LLaVA did it.

LLaVA's `tokenizer_image_token` splits the prompt on `<image>`, tokenizes each chunk on
its own (so each chunk gets SentencePiece's dummy-prefix "▁"), keeps BOS only at the
start and puts IMAGE_TOKEN (-200) between chunks. The original repos ship only the
SentencePiece `tokenizer.model`, read here without the sentencepiece package
(`shortv.sentencepiece`); a `tokenizer.json` (tokenizers) works too.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import tokenizers

from .errors import CheckpointError

IMAGE_TOKEN = -200
IMAGE_PLACEHOLDER = "<image>"


class Tokenizer:
    """Text ↔ ids for one model, with LLaVA's prompt rules."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_id: int | None,
        eos_id: int | None,
        add_bos: bool = True,
        source: str = "",
    ) -> None:
        self.backend = backend
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.add_bos = add_bos and bos_id is not None
        self.source = source
        added = backend.get_added_tokens_decoder()
        self._special = frozenset(i for i, token in added.items() if token.special)
        # Llama-style vocabularies (SentencePiece pieces, "▁" for spaces, <0xNN> byte
        # pieces) are decoded here, the way SentencePiece does; others by the backend.
        self._pieces = backend.token_to_id("<0x00>") is not None

    @classmethod
    def from_directory(cls, directory: str | Path) -> Tokenizer:
        """tokenizer.model (preferred: it is what original LLaVA used) or tokenizer.json."""
        directory = Path(directory)
        settings = _read_json(directory / "tokenizer_config.json")
        sp_model, fast = directory / "tokenizer.model", directory / "tokenizer.json"
        add_bos = bool(settings.get("add_bos_token", True))
        if sp_model.is_file():
            from .sentencepiece import load_sentencepiece, special_ids

            # The slow Llama tokenizer treated a missing `legacy` as legacy=True.
            legacy = settings.get("legacy")
            backend = load_sentencepiece(sp_model, legacy=True if legacy is None else bool(legacy))
            ids = special_ids(sp_model)
            return cls(backend, bos_id=ids.get("bos"), eos_id=ids.get("eos"), add_bos=add_bos,
                       source=str(sp_model))
        if fast.is_file():
            try:
                backend = tokenizers.Tokenizer.from_file(str(fast))
            except Exception as e:  # tokenizers raises a bare Exception on bad files
                raise CheckpointError(f"cannot read {fast}: {e}") from None
            bos = _special(settings, "bos_token", backend, "<s>")
            eos = _special(settings, "eos_token", backend, "</s>")
            return cls(backend, bos_id=bos, eos_id=eos, add_bos=add_bos, source=str(fast))
        raise CheckpointError(
            f"no tokenizer in {directory}: expected tokenizer.model (SentencePiece) or tokenizer.json"
        )

    def encode_text(self, text: str) -> list[int]:
        """Ids of plain text, without BOS (special tokens such as `</s>` are recognised)."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, prompt: str) -> list[int]:
        """LLaVA's tokenizer_image_token: BOS, chunks between `<image>`, IMAGE_TOKEN between."""
        ids = [self.bos_id] if self.add_bos else []
        for i, chunk in enumerate(prompt.split(IMAGE_PLACEHOLDER)):
            if i:
                ids.append(IMAGE_TOKEN)
            ids.extend(self.encode_text(chunk))
        return ids  # type: ignore[return-value]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ids (IMAGE_TOKEN and other negative ids are left out)."""
        ids = [i for i in ids if i >= 0 and not (skip_special_tokens and i in self._special)]
        if not self._pieces:
            return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return decode_pieces([self.backend.id_to_token(i) or "" for i in ids])

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)


def decode_pieces(pieces: Sequence[str]) -> str:
    """SentencePiece decoding: "▁" is a space, runs of <0xNN> pieces are UTF-8 bytes, and
    the dummy prefix's leading space is dropped. An invalid byte becomes U+FFFD on its
    own, keeping the valid characters around it, so text decoded from a prefix of the
    ids is a prefix of the text decoded from all of them (up to a trailing U+FFFD)."""
    parts: list[str] = []
    run = bytearray()
    for piece in pieces:
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            run.append(int(piece[3:5], 16))
            continue
        if run:
            parts.append(_decode_bytes(run))
            run.clear()
        parts.append(piece.replace("\u2581", " "))
    if run:
        parts.append(_decode_bytes(run))
    text = "".join(parts)
    return text[1:] if text.startswith(" ") else text


def _decode_bytes(data: bytes | bytearray) -> str:
    """UTF-8 as SentencePiece decodes byte pieces: each byte that does not start a valid
    character becomes one U+FFFD."""
    out, i = [], 0
    while i < len(data):
        for size in (1, 2, 3, 4):
            try:
                out.append(bytes(data[i : i + size]).decode("utf-8"))
                i += size
                break
            except UnicodeDecodeError:
                continue
        else:
            out.append("\ufffd")
            i += 1
    return "".join(out)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    return data if isinstance(data, dict) else {}


def _special(settings: dict, key: str, backend: tokenizers.Tokenizer, default: str) -> int | None:
    token = settings.get(key, default)
    if isinstance(token, dict):  # AddedToken serialised as a dict
        token = token.get("content")
    return backend.token_to_id(token) if isinstance(token, str) else None
