"""Load a SentencePiece BPE ``tokenizer.model`` as a ``tokenizers.Tokenizer``.

Original LLaVA checkpoints (llava-v1.5, v1.6) ship only ``tokenizer.model`` and
were trained with transformers' slow, sentencepiece-based ``LlamaTokenizer``.
shortv must not need the ``sentencepiece`` or ``protobuf`` packages at runtime,
so this module reads the model file with a minimal protobuf wire-format reader
and rebuilds the same tokenization with the Rust ``tokenizers`` library:

* a BPE model whose merges reproduce SentencePiece's score-ordered merging,
* control pieces and the unknown piece as special added tokens, so that
  ``"</s>"`` written in a prompt becomes the EOS id, as it did with the slow
  tokenizer,
* normalizer / pre-tokenizer stages that reproduce the slow tokenizer's
  whitespace handling in its ``legacy=True`` and ``legacy=False`` modes.

No post-processor is attached: callers add BOS themselves. No decoder is
attached either: ids are turned back into text by ``shortv.tokenizer``
(``Tokenizer.decode`` / ``decode_pieces``), the one SentencePiece decoder in
shortv.

Where tokenizers cannot express SentencePiece exactly: ``UNUSED`` pieces are
kept as ordinary pieces (SentencePiece re-splits them after merging); merges
of equal score are ordered by piece id, as in transformers' converted fast
tokenizers, where SentencePiece prefers the leftmost pair; a user-defined piece
loses the lone "▁" SentencePiece puts before it when it starts the text
(``legacy=False``) or makes up a whole segment (``legacy=True``). Llama's
tokenizer has no UNUSED or user-defined pieces.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

from .errors import CheckpointError

__all__ = ["decoding_flags", "load_sentencepiece", "special_ids", "special_pieces"]

SPACE = "\u2581"

# SentencePiece.Type values (sentencepiece_model.proto).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
# TrainerSpec.ModelType values.
_MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}
_BPE = 2


class _WireError(ValueError):
    """Bytes that are not a well-formed protobuf message."""


@dataclass
class _Piece:
    piece: str
    score: float = 0.0
    type: int = _NORMAL


@dataclass
class _TrainerSpec:
    # Defaults are the proto2 declared defaults: a field equal to its default
    # may be absent from the file.
    model_type: int = 1
    byte_fallback: bool = False
    treat_whitespace_as_suffix: bool = False
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = -1


@dataclass
class _NormalizerSpec:
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True


@dataclass
class _Model:
    pieces: list[_Piece] = field(default_factory=list)
    trainer: _TrainerSpec | None = None
    normalizer: _NormalizerSpec | None = None


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= len(data):
            raise _WireError("varint runs past the end of the data")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise _WireError("varint longer than 10 bytes")


def _fields(data: bytes) -> Iterator[tuple[int, int, Any]]:
    """Yield (field number, wire type, value) for each field of a message.

    Values are ints for varints and fixed-width fields, bytes for
    length-delimited fields, and None for skipped groups.
    """
    pos = 0
    end = len(data)
    while pos < end:
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise _WireError("field number 0")
        if wire == 0:
            value, pos = _read_varint(data, pos)
        elif wire == 1:
            if pos + 8 > end:
                raise _WireError("fixed64 runs past the end of the data")
            value = int.from_bytes(data[pos : pos + 8], "little")
            pos += 8
        elif wire == 2:
            length, pos = _read_varint(data, pos)
            if pos + length > end:
                raise _WireError(f"field {number} claims {length} bytes past the end of the data")
            value = data[pos : pos + length]
            pos += length
        elif wire == 5:
            if pos + 4 > end:
                raise _WireError("fixed32 runs past the end of the data")
            value = int.from_bytes(data[pos : pos + 4], "little")
            pos += 4
        elif wire == 3:
            pos = _skip_group(data, pos, number)
            value = None
        else:
            raise _WireError(f"field {number} has invalid wire type {wire}")
        yield number, wire, value


def _skip_group(data: bytes, pos: int, number: int) -> int:
    # Deprecated proto2 groups: nothing in sentencepiece_model.proto uses them,
    # but an unknown field may still be one and must be skipped whole.
    while True:
        key, pos = _read_varint(data, pos)
        inner, wire = key >> 3, key & 7
        if wire == 4:
            if inner != number:
                raise _WireError("mismatched end-group marker")
            return pos
        if wire == 0:
            _, pos = _read_varint(data, pos)
        elif wire == 1:
            pos += 8
        elif wire == 2:
            length, pos = _read_varint(data, pos)
            pos += length
        elif wire == 5:
            pos += 4
        elif wire == 3:
            pos = _skip_group(data, pos, inner)
        else:
            raise _WireError(f"invalid wire type {wire} inside a group")
        if pos > len(data):
            raise _WireError("group runs past the end of the data")


def _expect(wire: int, want: int, what: str) -> None:
    if wire != want:
        raise _WireError(f"{what} has wire type {wire}, expected {want}")


def _int32(value: int) -> int:
    # Negative int32 values are written as 64-bit two's complement varints.
    value &= (1 << 64) - 1
    if value >= 1 << 63:
        value -= 1 << 64
    return value


def _text(value: bytes, what: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _WireError(f"{what} is not valid UTF-8") from exc


def _parse_piece(data: bytes) -> _Piece:
    piece = _Piece("")
    seen = False
    for number, wire, value in _fields(data):
        if number == 1:
            _expect(wire, 2, "piece")
            piece.piece = _text(value, "piece")
            seen = True
        elif number == 2:
            _expect(wire, 5, "score")
            piece.score = struct.unpack("<f", value.to_bytes(4, "little"))[0]
        elif number == 3:
            _expect(wire, 0, "type")
            piece.type = _int32(value)
    if not seen:
        raise _WireError("a vocabulary entry has no piece string")
    return piece


def _parse_trainer(data: bytes) -> _TrainerSpec:
    spec = _TrainerSpec()
    ints = {3: "model_type", 40: "unk_id", 41: "bos_id", 42: "eos_id", 43: "pad_id"}
    bools = {24: "treat_whitespace_as_suffix", 35: "byte_fallback"}
    for number, wire, value in _fields(data):
        if number in ints:
            _expect(wire, 0, ints[number])
            setattr(spec, ints[number], _int32(value))
        elif number in bools:
            _expect(wire, 0, bools[number])
            setattr(spec, bools[number], bool(value))
    return spec


def _parse_normalizer(data: bytes) -> _NormalizerSpec:
    spec = _NormalizerSpec()
    bools = {3: "add_dummy_prefix", 4: "remove_extra_whitespaces", 5: "escape_whitespaces"}
    for number, wire, value in _fields(data):
        if number == 2:
            _expect(wire, 2, "precompiled_charsmap")
            spec.precompiled_charsmap = bytes(value)
        elif number in bools:
            _expect(wire, 0, bools[number])
            setattr(spec, bools[number], bool(value))
    return spec


def _parse_model(data: bytes) -> _Model:
    model = _Model()
    for number, wire, value in _fields(data):
        if number not in (1, 2, 3):
            continue
        what = {1: f"pieces[{len(model.pieces)}]", 2: "trainer_spec", 3: "normalizer_spec"}[number]
        _expect(wire, 2, what)
        try:
            if number == 1:
                model.pieces.append(_parse_piece(value))
            elif number == 2:
                model.trainer = _parse_trainer(value)
            else:
                model.normalizer = _parse_normalizer(value)
        except _WireError as exc:
            raise _WireError(f"{what}: {exc}") from None
    return model


def _load(path: str | os.PathLike) -> tuple[_Model, _TrainerSpec, _NormalizerSpec]:
    name = os.fspath(path)
    try:
        with open(name, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise CheckpointError(f"cannot read SentencePiece model {name}: {exc}") from exc
    try:
        model = _parse_model(data)
    except _WireError as exc:
        raise CheckpointError(
            f"{name} is not a SentencePiece model or is truncated: {exc}"
        ) from exc
    # Pieces come first in the file and the specs after them, so a file cut at
    # a field boundary parses cleanly but lacks the specs.
    if not model.pieces or model.trainer is None or model.normalizer is None:
        missing = [
            what
            for what, ok in (
                ("pieces", model.pieces),
                ("trainer_spec", model.trainer is not None),
                ("normalizer_spec", model.normalizer is not None),
            )
            if not ok
        ]
        raise CheckpointError(
            f"{name} is not a SentencePiece model or is truncated: {', '.join(missing)} missing"
        )
    return model, model.trainer, model.normalizer


def special_ids(path: str | os.PathLike) -> dict[str, int | None]:
    """Return the ``bos``, ``eos``, ``unk`` and ``pad`` ids of a SentencePiece model.

    The ids come from the model's trainer spec; an id the model disables
    (SentencePiece writes -1, e.g. Llama's pad) is None. Raises CheckpointError
    for a file that is not a readable SentencePiece model.
    """
    model, trainer, _ = _load(path)
    size = len(model.pieces)
    ids = {
        "bos": trainer.bos_id,
        "eos": trainer.eos_id,
        "unk": trainer.unk_id,
        "pad": trainer.pad_id,
    }
    return {key: value if 0 <= value < size else None for key, value in ids.items()}


def special_pieces(path: str | os.PathLike) -> dict[str, str | None]:
    """The pieces (strings) of the ``bos``, ``eos``, ``unk`` and ``pad`` ids of
    ``special_ids``; None where the model has no such id."""
    model, _, _ = _load(path)
    return {key: None if index is None else model.pieces[index].piece
            for key, index in special_ids(path).items()}


def decoding_flags(path: str | os.PathLike) -> dict[str, bool]:
    """Return the model's ``add_dummy_prefix`` and ``remove_extra_whitespaces``
    normalizer flags, which decide the leading "▁" SentencePiece's decoder drops
    (the keyword arguments of ``shortv.tokenizer.PieceDecoding``).

    Raises CheckpointError for a file that is not a readable SentencePiece model.
    """
    _, _, spec = _load(path)
    return {
        "add_dummy_prefix": spec.add_dummy_prefix,
        "remove_extra_whitespaces": spec.remove_extra_whitespaces,
    }


def _merges(pieces: list[_Piece]) -> list[tuple[str, str]]:
    # SentencePiece's BPE encoder repeatedly joins the adjacent pair whose
    # concatenation is the highest-scoring vocabulary piece; user-defined
    # pieces never take part (they are matched before merging and frozen) and
    # control, unknown and byte pieces are not merge targets. tokenizers'
    # BPE applies the lowest-ranked merge first, so every split of every
    # mergeable piece becomes a merge ranked by the piece's score.
    mergeable = {p.piece: i for i, p in enumerate(pieces) if p.type in (_NORMAL, _UNUSED)}
    ranked = []
    for piece, index in mergeable.items():
        score = pieces[index].score
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-score, index, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _whitespace_cleanup(
    spec: _NormalizerSpec, *, keep_leading: bool = False
) -> list[normalizers.Normalizer]:
    if not spec.remove_extra_whitespaces:
        return []
    # SentencePiece only treats U+0020 (after the charsmap) as whitespace here;
    # normalizers.Strip would also eat newlines and tabs.
    strip = r" +\z" if keep_leading else r"\A +| +\z"
    return [
        normalizers.Replace(Regex(" {2,}"), " "),
        normalizers.Replace(Regex(strip), ""),
    ]


def _regex_literal(text: str) -> str:
    # Oniguruma gives some escaped punctuation a meaning; \x{...} never has one.
    return "".join(c if c.isascii() and c.isalnum() else f"\\x{{{ord(c):X}}}" for c in text)


def load_sentencepiece(
    path: str | os.PathLike,
    *,
    legacy: bool = True,
    added_tokens: Sequence[tuple[str, bool]] | None = None,
) -> Tokenizer:
    """Build a ``tokenizers.Tokenizer`` equivalent to a SentencePiece BPE model.

    ``legacy`` picks the slow ``LlamaTokenizer`` behaviour around special
    tokens written in the text (transformers 4.31-4.37): with ``legacy=True``
    every piece of text between special tokens gets its own dummy-prefix
    ``▁``, as if SentencePiece encoded each piece alone; with ``legacy=False``
    only the start of the text does, so ``"A</s>B"`` gives ``▁A </s> B``.
    Text without special tokens encodes the same either way, and the same as
    ``SentencePieceProcessor.encode``. (For a model without a dummy prefix,
    ``legacy=False`` prepends nothing.)

    ``added_tokens``: (content, special) of every token the slow tokenizer
    declares (its bos / eos / unk / pad tokens, tokenizer_config.json's
    ``added_tokens_decoder``, ``added_tokens.json``), such as Yi's
    ``<|im_start|>`` and ``<|im_end|>``. The slow tokenizer cuts the raw text at
    each of them before SentencePiece sees it, so the text after one is a new
    segment (with ``legacy=True`` it gets its own dummy prefix); text that spells
    an undeclared control piece is ordinary text to it. Declared tokens that are
    pieces of the model are matched the same way here, keeping their ids; others
    (tokens appended after the vocabulary, such as llava-hf's ``<image>``) are
    left out, since LLaVA's prompts never hand them to the tokenizer. None (the
    default): the model's control and unknown pieces are the special tokens, as
    for Llama, whose slow tokenizer declares exactly those.

    The tokenizer adds no BOS/EOS and has no decoder: decode its ids with
    ``shortv.Tokenizer.decode``.

    Raises CheckpointError when the file cannot be read, is not a SentencePiece
    model (or is truncated), or uses something other than a BPE model.
    """
    model, trainer, spec = _load(path)
    name = os.fspath(path)
    pieces = model.pieces
    if trainer.model_type != _BPE:
        kind = _MODEL_TYPES.get(trainer.model_type, f"type {trainer.model_type}")
        raise CheckpointError(
            f"{name} is a SentencePiece {kind} model; only BPE models are supported"
        )
    if trainer.treat_whitespace_as_suffix or not spec.escape_whitespaces:
        raise CheckpointError(
            f"{name}: SentencePiece models with treat_whitespace_as_suffix or without "
            "escape_whitespaces are not supported"
        )
    vocab: dict[str, int] = {}
    for index, piece in enumerate(pieces):
        if vocab.setdefault(piece.piece, index) != index:
            raise CheckpointError(f"{name}: piece {piece.piece!r} appears twice in the vocabulary")
    unk_id = trainer.unk_id
    if not 0 <= unk_id < len(pieces) or pieces[unk_id].type != _UNKNOWN:
        raise CheckpointError(f"{name}: unk_id {unk_id} is not the model's unknown piece")
    if trainer.byte_fallback:
        absent = [b for b in range(256) if f"<0x{b:02X}>" not in vocab]
        if absent:
            raise CheckpointError(
                f"{name}: byte_fallback is set but {len(absent)} byte pieces are missing"
            )

    tokenizer = Tokenizer(
        BPE(
            vocab=vocab,
            merges=_merges(pieces),
            unk_token=pieces[unk_id].piece,
            fuse_unk=True,
            byte_fallback=trainer.byte_fallback,
            dropout=None,
        )
    )

    charsmap = (
        [normalizers.Precompiled(spec.precompiled_charsmap)] if spec.precompiled_charsmap else []
    )
    if added_tokens is None:
        declared = {p.piece: True for p in pieces if p.type in (_CONTROL, _UNKNOWN)}
    else:
        declared = {content: special for content, special in added_tokens if content in vocab}
    # A declared user-defined piece is cut from the raw text like the other declared tokens,
    # before normalization; the others are matched by SentencePiece in the normalized text.
    user = [p.piece for p in pieces if p.type == _USER_DEFINED and p.piece not in declared]
    if legacy:
        # Normalizers run on each stretch of text between special tokens
        # separately, which is exactly "SentencePiece-encode every segment".
        prefix = [normalizers.Prepend(SPACE)] if spec.add_dummy_prefix else []
        if prefix and user:
            # User-defined pieces are matched in normalized text against their
            # own normalized content, which must not gain the dummy prefix, so
            # the prefix skips a segment that is exactly such a piece.
            alternatives = "|".join(_regex_literal(u) for u in user)
            prefix = [normalizers.Replace(Regex(rf"\A(?=[\s\S])(?!(?:{alternatives})\z)"), SPACE)]
        tokenizer.normalizer = normalizers.Sequence(
            [*charsmap, *_whitespace_cleanup(spec), *prefix, normalizers.Replace(" ", SPACE)]
        )
    else:
        # The slow tokenizer turned a literal "▁" into a space, prepended one
        # "▁" to the whole text, then encoded the segments between special
        # tokens without a dummy prefix. Only Metaspace knows whether a
        # segment starts the text (prepend_scheme="first"), but it adds
        # nothing to a segment that already starts with its replacement
        # character, which would lose the dummy prefix of text starting with
        # a space. So spaces become "▁" in the normalizer, a first Metaspace
        # whose replacement is " " always prepends to the first segment, and
        # a second one turns that " " into "▁".
        spaces = [normalizers.Replace(" ", SPACE)]
        if spec.remove_extra_whitespaces and spec.add_dummy_prefix:
            # Stripping leading spaces would move the segment's start away
            # from offset 0 and hide it from Metaspace. After collapsing, a
            # leading space is a single " " and can itself serve as the
            # prefix, as SentencePiece's stripped text plus dummy prefix does.
            cleanup = _whitespace_cleanup(spec, keep_leading=True)
            spaces = [normalizers.Replace(Regex(r"(?!\A) "), SPACE)]
        else:
            cleanup = _whitespace_cleanup(spec)
        tokenizer.normalizer = normalizers.Sequence(
            [normalizers.Replace(SPACE, " "), *charsmap, *cleanup, *spaces]
        )
        if spec.add_dummy_prefix:
            tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Metaspace(" ", prepend_scheme="first", split=False),
                    pre_tokenizers.Metaspace(SPACE, prepend_scheme="never", split=False),
                ]
            )

    # Ids are kept by the vocabulary, so adding tokens that are already pieces
    # only marks them as matched in raw text before any normalization.
    tokenizer.add_special_tokens(
        [
            AddedToken(piece, special=True, normalized=False, lstrip=False, rstrip=False)
            for piece, special in declared.items()
            if special
        ]
    )
    plain = [c for c, special in declared.items() if not special]
    if plain:
        tokenizer.add_tokens(
            [AddedToken(c, special=False, normalized=False, lstrip=False, rstrip=False)
             for c in plain]
        )
    # SentencePiece matches user-defined pieces in the normalized text, after
    # the dummy prefix and with spaces already "▁", and never merges across
    # them.
    if user:
        tokenizer.add_tokens([AddedToken(p, special=False, normalized=True) for p in user])

    return tokenizer
