"""shortv.sentencepiece against the sentencepiece package it replaces.

Models are trained here, so every expectation comes from sentencepiece itself
or from a re-implementation of transformers' slow LlamaTokenizer on top of it.
"""

from __future__ import annotations

import io
import random
import re
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from shortv.errors import CheckpointError
from shortv.sentencepiece import load_sentencepiece, special_ids
from shortv.tokenizer import Tokenizer as ShortvTokenizer

spm = pytest.importorskip("sentencepiece")

SPACE = "\u2581"
SPECIAL_PIECES = ("<unk>", "<s>", "</s>")

WORDS = (
    "the a an of to and in is it that with for on as image picture photo shows describe what "
    "where who how many color red blue green large small dog cat person people street car "
    "table window sky tree building sitting standing holding wearing next behind front "
    "question answer assistant user chat helpful detailed polite human artificial"
).split()
ACCENTED = "café naïve résumé über straße façade jalapeño garçon Ångström".split()
RARE = "你好 世界 图像 日本語 テキスト 한국어 Привет".split()
PUNCT = [",", ".", "!", "?", ";", ":", "(", ")", '"', "'s", "-", "..."]


def _corpus(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(3, 16)):
            r = rng.random()
            if r < 0.68:
                parts.append(rng.choice(WORDS))
            elif r < 0.8:
                parts.append(str(rng.randint(0, 10 ** rng.randint(1, 7))))
            elif r < 0.88:
                parts.append(rng.choice(ACCENTED))
            elif r < 0.9:
                parts.append(rng.choice(RARE))
            else:
                parts.append(rng.choice(PUNCT))
        line = rng.choice([" ", " ", " ", "  ", "    ", "\t"]).join(parts)
        if rng.random() < 0.2:
            line = "    " + line
        if rng.random() < 0.4:
            line = line.capitalize()
        lines.append(line)
    return lines


def _train(path: Path, **options) -> Path:
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus(seed=0, n=400)),
        model_writer=buf,
        num_threads=1,
        minloglevel=2,
        hard_vocab_limit=False,
        **options,
    )
    path.write_bytes(buf.getvalue())
    return path


LLAMA_OPTIONS = dict(
    model_type="bpe",
    vocab_size=600,
    byte_fallback=True,
    split_digits=True,
    add_dummy_prefix=True,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,
    character_coverage=0.995,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
)


@pytest.fixture(scope="session")
def llama_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SentencePiece BPE model trained with Llama's options."""
    return _train(tmp_path_factory.mktemp("sp-llama") / "tokenizer.model", **LLAMA_OPTIONS)


@pytest.fixture(scope="session")
def nfkc_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SentencePiece's default normalization (nmt_nfkc charsmap, whitespace cleanup),
    no byte fallback (so unknown characters become <unk>), and user-defined pieces."""
    return _train(
        tmp_path_factory.mktemp("sp-nfkc") / "tokenizer.model",
        model_type="bpe",
        vocab_size=400,
        byte_fallback=False,
        normalization_rule_name="nmt_nfkc",
        remove_extra_whitespaces=True,
        character_coverage=0.98,
        user_defined_symbols=["@@", "<sep>"],
    )


@pytest.fixture(scope="session")
def sp(llama_model: Path):
    return spm.SentencePieceProcessor(model_file=str(llama_model))


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _without_dummy_prefix(model: bytes) -> bytes:
    """The model with NormalizerSpec.add_dummy_prefix set to false: what the slow
    LlamaTokenizer loaded (through protobuf) for legacy=False."""
    out = bytearray()
    pos = 0
    while pos < len(model):
        key, body = _varint(model, pos)
        assert key & 7 == 2, "every top-level ModelProto field is a message"
        length, body = _varint(model, body)
        end = body + length
        if key >> 3 != 3:  # not normalizer_spec
            out += model[pos:end]
        else:
            fields = bytearray()
            inner = body
            while inner < end:
                field, value = _varint(model, inner)
                if field & 7 == 0:
                    _, after = _varint(model, value)
                else:
                    assert field & 7 == 2
                    size, value = _varint(model, value)
                    after = value + size
                if field != 3 << 3:  # drop add_dummy_prefix, re-added below as false
                    fields += model[inner:after]
                inner = after
            fields += bytes([3 << 3, 0])
            out += _encode_varint(key) + _encode_varint(len(fields)) + fields
        pos = end
    return bytes(out)


@pytest.fixture(scope="session")
def sp_no_prefix(llama_model: Path, sp):
    processor = spm.SentencePieceProcessor(
        model_proto=_without_dummy_prefix(llama_model.read_bytes())
    )
    assert sp.encode("the dog", out_type=str)[0].startswith(SPACE)
    assert not processor.encode("the dog", out_type=str)[0].startswith(SPACE)
    # The slow tokenizer's "<unk>" + text trick only strips cleanly when no
    # piece spans the ">" boundary; the corpus has no "<" or ">".
    assert sp.piece_to_id("<") == sp.piece_to_id(">") == sp.unk_id()
    return processor


@pytest.fixture(scope="session")
def fast(llama_model: Path) -> dict[bool, Tokenizer]:
    return {legacy: load_sentencepiece(llama_model, legacy=legacy) for legacy in (True, False)}


def slow_llama_encode(text: str, sp, sp_no_prefix, *, legacy: bool) -> list[int]:
    """transformers' slow LlamaTokenizer (4.31-4.37), tokenize() then
    convert_tokens_to_ids(), for a tokenizer whose special tokens are the
    model's <unk>, <s> and </s>."""
    if not legacy and text:
        text = SPACE + text.replace(SPACE, " ")
    unk_length = len(sp_no_prefix.encode("<unk>"))
    ids: list[int] = []
    for part in re.split("(" + "|".join(map(re.escape, SPECIAL_PIECES)) + ")", text):
        if not part:
            continue
        if part in SPECIAL_PIECES:
            ids.append(sp.piece_to_id(part))
        elif legacy:
            ids += sp.encode(part)
        elif part.startswith((SPACE, " ")):
            ids += sp_no_prefix.encode("<unk>" + part)[unk_length:]
        else:
            ids += sp_no_prefix.encode(part)
    if (
        not legacy
        and len(ids) > 1
        and sp.id_to_piece(ids[0]) == SPACE
        and sp.id_to_piece(ids[1]) in SPECIAL_PIECES
    ):
        ids = ids[1:]
    return ids


PLAIN_TEXTS = [
    "",
    " ",
    "   ",
    "Hello",
    "the dog is sitting next to the car",
    " leading space",
    "   three leading spaces",
    "trailing space ",
    "trailing spaces    ",
    "multiple    inner     spaces",
    "line one\nline two\n",
    "\n",
    "\n\n  \n",
    "tabs\tbetween\twords",
    "\tleading tab",
    "digits 1234567890 and 3.14159 and 2024-01-01",
    "007",
    "emoji 😀🎉 are not in the corpus",
    "😀",
    "unseen CJK 鑫龘 and seen 你好",
    "accents café naïve Ångström",
    "ÿ",
    SPACE,
    SPACE + "literal meta space",
    "a" + SPACE + "b",
    "punctuation!?.,;:()[]{}<>",
    "'single' and \"double\" quotes",
    "a" * 40,
    "the the the the the",
    "USER: <image>\nWhat is shown in the picture? ASSISTANT:",
    *_corpus(seed=7, n=60),
]

SPECIAL_TEXTS = [
    "</s>",
    "A</s>B",
    "the dog</s>the cat",
    "</s>Hello world",
    "Hello world</s>",
    "Hello</s> world",
    "Hello </s>",
    "Hello </s> world",
    "</s></s>",
    "a</s></s>b",
    "</s> </s>",
    " </s>",
    "</s> ",
    "  </s>  two spaces  ",
    "<s>USER: describe the image</s>",
    "<s> ASSISTANT:",
    "x <s> y",
    "<unk>x",
    "x<unk>",
    "你好</s>😀",
    "\n</s>\n",
    SPACE + "</s>" + SPACE + "x",
    "12345</s>678",
    "\t</s>\tindented",
    "USER: What is this? ASSISTANT: A red car.</s>USER: And the color? ASSISTANT:",
]


@pytest.mark.parametrize("legacy", [True, False])
def test_plain_text_matches_sentencepiece(sp, fast, legacy):
    tok = fast[legacy]
    mismatches = [
        (text, sp.encode(text, out_type=str), [tok.id_to_token(i) for i in got])
        for text in PLAIN_TEXTS
        if (got := tok.encode(text, add_special_tokens=False).ids) != sp.encode(text)
    ]
    assert mismatches == []


def test_texts_exercise_byte_fallback_and_whitespace_pieces(sp):
    ids = [i for text in PLAIN_TEXTS for i in sp.encode(text)]
    assert any(sp.is_byte(i) for i in ids)
    assert any(set(sp.id_to_piece(i)) == {SPACE} and len(sp.id_to_piece(i)) > 1 for i in ids)
    assert not any(sp.is_unknown(i) for i in ids)


def test_random_strings_match_sentencepiece(sp, fast):
    rng = random.Random(1)
    pieces = [
        sp.id_to_piece(i)
        for i in range(sp.get_piece_size())
        if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))
    ]
    chars = sorted(set("".join(pieces)) | set(" \n\t😀鑫"))
    texts = []
    for _ in range(1500):
        if rng.random() < 0.5:
            text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 8)))
        else:
            text = "".join(rng.choice(chars) for _ in range(rng.randint(1, 20)))
        texts.append(text.replace(SPACE, rng.choice([" ", SPACE])))
    for legacy in (True, False):
        bad = [t for t in texts if fast[legacy].encode(t).ids != sp.encode(t)]
        assert bad == [], f"legacy={legacy}"


@pytest.mark.parametrize("legacy", [True, False])
def test_special_tokens_in_text_match_slow_llama_tokenizer(sp, sp_no_prefix, fast, legacy):
    tok = fast[legacy]
    mismatches = []
    for text in SPECIAL_TEXTS + PLAIN_TEXTS:
        want = slow_llama_encode(text, sp, sp_no_prefix, legacy=legacy)
        got = tok.encode(text, add_special_tokens=False).ids
        if got != want:
            mismatches.append(
                (text, [sp.id_to_piece(i) for i in want], [tok.id_to_token(i) for i in got])
            )
    assert mismatches == []


def test_legacy_flag_changes_only_text_after_special_tokens(sp, sp_no_prefix, fast):
    def pieces(processor, text):
        return [processor.id_to_piece(i) for i in processor.encode(text)]

    head = [*pieces(sp, "the"), "</s>"]
    assert fast[True].encode("the</s>dog").tokens == head + pieces(sp, "dog")
    assert fast[False].encode("the</s>dog").tokens == head + pieces(sp_no_prefix, "dog")
    assert pieces(sp, "dog")[0].startswith(SPACE)
    assert not pieces(sp_no_prefix, "dog")[0].startswith(SPACE)


def test_no_bos_or_eos_added(sp, fast):
    for tok in fast.values():
        assert tok.encode("the dog", add_special_tokens=True).ids == sp.encode("the dog")
        assert tok.encode("", add_special_tokens=True).ids == []


def _without_special(sp, ids: list[int]) -> list[int]:
    """What the slow LlamaTokenizer handed SentencePiece with skip_special_tokens=True."""
    return [i for i in ids if not (sp.is_control(i) or sp.is_unknown(i))]


@pytest.mark.parametrize("legacy", [True, False])
def test_decode_matches_sentencepiece(llama_model, sp, sp_no_prefix, fast, legacy):
    # The converted tokenizer has no decoder of its own: shortv decodes its ids.
    assert fast[legacy].decoder is None
    tok = ShortvTokenizer.from_directory(llama_model.parent)
    for text in PLAIN_TEXTS + SPECIAL_TEXTS:
        for ids in (sp.encode(text), slow_llama_encode(text, sp, sp_no_prefix, legacy=legacy)):
            assert tok.decode(ids) == sp.decode(_without_special(sp, ids)), repr(text)


def test_vocabulary_and_special_ids(llama_model, sp, fast):
    tok = fast[True]
    assert tok.get_vocab_size() == sp.get_piece_size()
    assert [tok.id_to_token(i) for i in range(sp.get_piece_size())] == [
        sp.id_to_piece(i) for i in range(sp.get_piece_size())
    ]
    want = {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(), "pad": sp.pad_id()}
    assert special_ids(llama_model) == {k: (v if v >= 0 else None) for k, v in want.items()}


def test_tokenizer_survives_serialization(fast):
    for tok in fast.values():
        again = Tokenizer.from_str(tok.to_str())
        for text in SPECIAL_TEXTS:
            assert again.encode(text).ids == tok.encode(text).ids


NFKC_TEXTS = [
    *PLAIN_TEXTS,
    "ＦＵＬＬ　ｗｉｄｔｈ text",
    "ﬁne ligature ① Ⅻ",
    "cafe\u0301 combining",
    "zero\u200bwidth",
    "\u200bleading zero width",
    "a\u00a0b no-break space",
    "a\r\nb",
    "😀😀 two unknown characters",
    "a@@b",
    "x @@ y",
    "the<sep>dog",
    "@@@@ repeated",
    "ends with @@",
]


@pytest.mark.parametrize("legacy", [True, False])
def test_charsmap_whitespace_cleanup_and_user_pieces(nfkc_model, legacy):
    sp2 = spm.SentencePieceProcessor(model_file=str(nfkc_model))
    tok = load_sentencepiece(nfkc_model, legacy=legacy)
    texts = NFKC_TEXTS
    if not legacy:
        # SentencePiece puts a lone "▁" before a user-defined piece that starts
        # the text; with legacy=False the dummy prefix comes from Metaspace,
        # which never sees that position (documented in the module).
        texts = [t for t in texts if not t.startswith("@@")]
    mismatches = [
        (text, sp2.encode(text, out_type=str), [tok.id_to_token(i) for i in got])
        for text in texts
        if (got := tok.encode(text).ids) != sp2.encode(text)
    ]
    assert mismatches == []
    encoded = [sp2.encode(t) for t in texts]
    assert any(sp2.unk_id() in ids for ids in encoded)
    assert any(sp2.piece_to_id("@@") in ids for ids in encoded)
    # No byte pieces here, so only the tokenizer.model path makes shortv decode the
    # SentencePiece way. SentencePiece writes " ⁇ " for <unk>, a special id skipped here.
    ours = ShortvTokenizer.from_directory(nfkc_model.parent)
    for text, ids in zip(texts, encoded, strict=True):
        assert ours.decode(ids) == sp2.decode(_without_special(sp2, ids)), repr(text)


def test_unigram_model_is_rejected(tmp_path):
    path = _train(tmp_path / "unigram.model", model_type="unigram", vocab_size=300)
    with pytest.raises(CheckpointError, match=r"unigram.*only BPE"):
        load_sentencepiece(path)


@pytest.mark.parametrize(
    "cut",
    [lambda n: 3, lambda n: n // 2, lambda n: n * 9 // 10, lambda n: n - 1],
    ids=["3-bytes", "half", "90%", "last-byte-missing"],
)
def test_truncated_model_is_rejected(llama_model, tmp_path, cut):
    data = llama_model.read_bytes()
    path = tmp_path / "truncated.model"
    path.write_bytes(data[: cut(len(data))])
    with pytest.raises(CheckpointError, match=r"truncated\.model"):
        load_sentencepiece(path)


def _field_starts(model: bytes) -> dict[int, int]:
    """Offset of the first top-level ModelProto field of each number."""
    starts: dict[int, int] = {}
    pos = 0
    while pos < len(model):
        key, body = _varint(model, pos)
        starts.setdefault(key >> 3, pos)
        length, body = _varint(model, body)
        pos = body + length
    return starts


@pytest.mark.parametrize("field", [2, 3], ids=["before-trainer-spec", "before-normalizer-spec"])
def test_model_cut_at_a_field_boundary_is_rejected(llama_model, tmp_path, field):
    # Such a file is well-formed protobuf; only the missing specs give it away.
    data = llama_model.read_bytes()
    path = tmp_path / "cut.model"
    path.write_bytes(data[: _field_starts(data)[field]])
    with pytest.raises(CheckpointError, match=r"cut\.model"):
        load_sentencepiece(path)


@pytest.mark.parametrize(
    "content",
    [
        random.Random(0).randbytes(5000),
        b"",
        b'{"version": "1.0", "model": {"type": "BPE"}}',
        b"\x0a\x05hello",
    ],
    ids=["random", "empty", "json", "one-piece"],
)
def test_non_sentencepiece_file_is_rejected(tmp_path, content):
    path = tmp_path / "bogus.model"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"bogus\.model"):
        load_sentencepiece(path)
    with pytest.raises(CheckpointError, match=r"bogus\.model"):
        special_ids(path)


def test_missing_file_is_rejected(tmp_path):
    with pytest.raises(CheckpointError, match=r"absent\.model"):
        load_sentencepiece(tmp_path / "absent.model")
