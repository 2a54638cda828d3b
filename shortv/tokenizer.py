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
from dataclasses import dataclass
from pathlib import Path

import tokenizers

from .errors import CheckpointError

IMAGE_TOKEN = -200
IMAGE_PLACEHOLDER = "<image>"
_SPACE = "\u2581"  # SentencePiece's whitespace symbol


@dataclass(frozen=True)
class PieceDecoding:
    """The two NormalizerSpec flags of a SentencePiece model that its decoder reads:
    they decide which leading "▁" are dropped. The defaults are Llama's."""

    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = False


_LLAMA = PieceDecoding()


class Tokenizer:
    """Text ↔ ids for one model, with LLaVA's prompt rules."""

    # The text that stands for one image in a prompt (encode_prompt turns it into IMAGE_TOKEN).
    image_marker = IMAGE_PLACEHOLDER

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_id: int | None,
        eos_id: int | None,
        add_bos: bool = True,
        source: str = "",
        pieces: PieceDecoding | None = None,
    ) -> None:
        """`pieces`: decode the way SentencePiece does (`decode_pieces`) with these
        flags. None: with Llama's flags when the vocabulary has <0xNN> byte pieces (a
        Llama-style tokenizer.json), otherwise through the backend's own decoder."""
        self.backend = backend
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.add_bos = add_bos and bos_id is not None
        self.source = source
        added = backend.get_added_tokens_decoder()
        self._special = frozenset(i for i, token in added.items() if token.special)
        # SentencePiece vocabularies are decoded here: the backend built from a
        # tokenizer.model has no decoder, and a tokenizer.json's decoder cannot
        # reproduce SentencePiece's (a byte piece at the start keeps its space).
        if pieces is None and backend.token_to_id("<0x00>") is not None:
            pieces = _LLAMA
        self._pieces = pieces

    @classmethod
    def from_directory(cls, directory: str | Path) -> Tokenizer:
        """tokenizer.model (preferred: it is what original LLaVA used) or tokenizer.json."""
        directory = Path(directory)
        settings = _read_json(directory / "tokenizer_config.json")
        # special_tokens_map.json overrides tokenizer_config.json, as in transformers.
        settings = {**settings, **_read_json(directory / "special_tokens_map.json")}
        sp_model, fast = directory / "tokenizer.model", directory / "tokenizer.json"
        add_bos = bool(settings.get("add_bos_token", True))
        if sp_model.is_file():
            from .sentencepiece import (
                decoding_flags,
                load_sentencepiece,
                special_ids,
                special_pieces,
            )

            # The slow Llama tokenizer treated a missing `legacy` as legacy=True.
            legacy = settings.get("legacy")
            ids = special_ids(sp_model)
            # The slow tokenizer's own special tokens default to the model's pieces.
            own = [(piece, True) for key, piece in special_pieces(sp_model).items()
                   if piece is not None and key != "pad"]
            backend = load_sentencepiece(sp_model, legacy=True if legacy is None else bool(legacy),
                                         added_tokens=own + declared_tokens(directory, settings))
            # BOS / EOS are the tokenizer's bos_token / eos_token when it names them (Yi's
            # chat models end a turn with <|im_end|>, not the model's own </s>-like piece).
            bos = _special(settings, "bos_token", backend, None)
            eos = _special(settings, "eos_token", backend, None)
            return cls(backend, bos_id=ids.get("bos") if bos is None else bos,
                       eos_id=ids.get("eos") if eos is None else eos, add_bos=add_bos,
                       source=str(sp_model), pieces=PieceDecoding(**decoding_flags(sp_model)))
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
        """Text of ids, as SentencePiece's `decode` gives it for the ids left after
        skipping special ones (control pieces and <unk>, as the slow LlamaTokenizer's
        `decode(skip_special_tokens=True)` did). IMAGE_TOKEN and other negative ids are
        always left out; with skip_special_tokens=False special pieces are written as
        their own text."""
        ids = [i for i in ids if i >= 0 and not (skip_special_tokens and i in self._special)]
        if self._pieces is None:
            return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return decode_pieces([self.backend.id_to_token(i) or "" for i in ids], self._pieces)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)


def decode_pieces(pieces: Sequence[str], flags: PieceDecoding = _LLAMA) -> str:
    """SentencePiece's decoding of pieces: "▁" is a space and runs of <0xNN> pieces are
    UTF-8 bytes. The first non-byte piece loses one leading "▁", the dummy prefix added,
    unless byte pieces come before it (their text is real text); with
    `remove_extra_whitespaces` so does each next piece while the text is still empty
    ("▁", "▁the" is "the" there, " the" with Llama's flags); with neither flag none does.

    An invalid byte becomes U+FFFD on its own, keeping the valid characters around it,
    so text decoded from a prefix of the pieces is a prefix of the text decoded from all
    of them up to a trailing run of U+FFFD: what streaming generation relies on."""
    parts: list[str] = []
    run = bytearray()
    # Whether the next piece is still at the start of the text, where SentencePiece
    # consumes a "▁" (only if either flag could have put one there).
    at_start = flags.add_dummy_prefix or flags.remove_extra_whitespaces
    for piece in pieces:
        byte = _byte(piece)
        if byte is not None:
            run.append(byte)
            continue
        if run:
            parts.append(_decode_bytes(run))  # never empty: ends the start
            run.clear()
            at_start = False
        if at_start and piece.startswith(_SPACE):
            piece = piece[1:]
            # Without whitespace cleanup a second leading "▁" is a real space.
            at_start = flags.remove_extra_whitespaces
        text = piece.replace(_SPACE, " ")
        if text:
            at_start = False
        parts.append(text)
    if run:
        parts.append(_decode_bytes(run))
    return "".join(parts)


def _byte(piece: str) -> int | None:
    """The byte of a SentencePiece byte piece ("<0x41>"; always upper-case hex), else None."""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        digits = piece[3:5]
        if all(c in "0123456789ABCDEF" for c in digits):
            return int(digits, 16)
    return None


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


def _special(settings: dict, key: str, backend: tokenizers.Tokenizer, default: str | None
             ) -> int | None:
    token = _content(settings.get(key, default))
    return backend.token_to_id(token) if token is not None else None


def _content(token: object) -> str | None:
    """A token as tokenizer_config.json writes it: a string, or an AddedToken as a dict."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) and token else None


SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def declared_tokens(directory: Path, settings: dict | None = None) -> list[tuple[str, bool]]:
    """(content, special) of every token the slow tokenizer adds to its SentencePiece model:
    tokenizer_config.json's added_tokens_decoder (with its "special" flags), added_tokens.json,
    and the special tokens (bos / eos / unk / pad and additional_special_tokens, also from
    special_tokens_map.json). The slow tokenizer cuts the text at these before SentencePiece
    encodes it."""
    if settings is None:
        settings = {**_read_json(directory / "tokenizer_config.json"),
                    **_read_json(directory / "special_tokens_map.json")}
    out: dict[str, bool] = {}
    decoder = settings.get("added_tokens_decoder")
    if isinstance(decoder, dict):
        for entry in decoder.values():
            if (content := _content(entry)) is not None:
                out[content] = bool(entry.get("special", False)) if isinstance(entry, dict) else False
    for content in _read_json(directory / "added_tokens.json"):
        if isinstance(content, str) and content:
            out.setdefault(content, False)
    extra = settings.get("additional_special_tokens")
    special = [settings.get(k) for k in SPECIAL_TOKEN_KEYS]
    special += extra if isinstance(extra, list) else []
    for token in special:
        if (content := _content(token)) is not None:
            out[content] = True
    return list(out.items())
