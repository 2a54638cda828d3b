"""shortv.Tokenizer.decode against the sentencepiece package's decode.

The oracle is `SentencePieceProcessor.decode` of the ids left after dropping special
ones (control pieces, <unk>, negative ids such as IMAGE_TOKEN): what the slow
LlamaTokenizer's decode(skip_special_tokens=True) handed to SentencePiece. Models are
trained here, each with a different rule for the leading "▁" SentencePiece drops.
"""

from __future__ import annotations

import functools
import io
import random
from pathlib import Path

import pytest
import tokenizers

from shortv.sentencepiece import load_sentencepiece
from shortv.tokenizer import IMAGE_TOKEN, Tokenizer, decode_pieces

spm = pytest.importorskip("sentencepiece")

SPACE = "\u2581"
WORDS = (
    "the a of to and in is it dog cat red blue picture image what where who many "
    "café naïve Ångström 你好 世界 Привет x y 42 7"
).split()
SEPARATORS = [" ", " ", " ", "  ", "   ", "    ", "\t", "\n"]


def _corpus(seed: int, n: int) -> list[str]:
    """Lines with runs of spaces, so that whitespace-only and "▁▁word" pieces exist."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 10))]
        lines.append("".join(rng.choice(SEPARATORS) + w for w in words))
    return lines


MODELS = {
    # Llama's options, but pieces may span whitespace ("▁▁x") so that they get decoded.
    "llama": dict(
        byte_fallback=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", split_by_whitespace=False,
        allow_whitespace_only_pieces=True, character_coverage=0.99,
    ),
    # SentencePiece's defaults: whitespace cleanup, no byte pieces (unknown characters
    # become <unk>), and user-defined pieces.
    "cleanup": dict(
        byte_fallback=False, normalization_rule_name="nmt_nfkc", remove_extra_whitespaces=True,
        character_coverage=0.98, user_defined_symbols=["@@", "<sep>"],
    ),
    # Neither flag: SentencePiece's decoder drops no "▁" at all.
    "no-prefix": dict(
        byte_fallback=True, add_dummy_prefix=False, remove_extra_whitespaces=False,
        normalization_rule_name="identity", allow_whitespace_only_pieces=True,
        character_coverage=0.99,
    ),
}


@functools.cache
def _train(kind: str) -> bytes:
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus(seed=0, n=500)), model_writer=buf, num_threads=1,
        minloglevel=2, hard_vocab_limit=False, model_type="bpe", vocab_size=500,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, **MODELS[kind],
    )
    return buf.getvalue()


@pytest.fixture(scope="module", params=sorted(MODELS))
def kind(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def model(kind: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding a freshly trained tokenizer.model."""
    directory = tmp_path_factory.mktemp(f"decode-{kind}")
    (directory / "tokenizer.model").write_bytes(_train(kind))
    return directory


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The "llama" model's directory, for tests of Llama's flags only."""
    directory = tmp_path_factory.mktemp("decode-llama-only")
    (directory / "tokenizer.model").write_bytes(_train("llama"))
    return directory


@pytest.fixture(scope="module")
def sp(model: Path):
    return spm.SentencePieceProcessor(model_file=str(model / "tokenizer.model"))


@pytest.fixture(scope="module")
def ours(model: Path) -> Tokenizer:
    return Tokenizer.from_directory(model)


def reference(sp, ids: list[int]) -> str:
    """SentencePiece's text of ids, special and negative ids skipped."""
    return sp.decode([i for i in ids if i >= 0 and not (sp.is_control(i) or sp.is_unknown(i))])


def _ids(sp, predicate) -> list[int]:
    return [i for i in range(sp.get_piece_size()) if predicate(sp.id_to_piece(i), i)]


def _byte(sp, value: int) -> int:
    return sp.piece_to_id(f"<0x{value:02X}>")


def _random_id_lists(sp, seed: int, count: int) -> list[list[int]]:
    """Id lists biased towards what the start of the text is sensitive to: byte pieces,
    pieces starting with "▁", special ids and IMAGE_TOKEN."""
    rng = random.Random(seed)
    pools = [
        list(range(sp.get_piece_size())),
        _ids(sp, lambda p, i: sp.is_byte(i)) or [sp.unk_id()],
        _ids(sp, lambda p, i: p.startswith(SPACE)),
        _ids(sp, lambda p, i: set(p) == {SPACE}),
        [*_ids(sp, lambda p, i: sp.is_control(i) or sp.is_unknown(i)), IMAGE_TOKEN],
    ]
    weights = [4, 3, 3, 2, 1]
    return [
        [rng.choice(rng.choices(pools, weights)[0]) for _ in range(rng.randint(0, 10))]
        for _ in range(count)
    ]


def test_models_differ_in_their_leading_space_rule():
    """The three models exist because SentencePiece decodes "▁", "▁x" three ways."""
    texts = {}
    for name in MODELS:
        sp = spm.SentencePieceProcessor(model_proto=_train(name))
        texts[name] = sp.decode([sp.piece_to_id(SPACE), sp.piece_to_id(SPACE + "x")])
    assert len(set(texts.values())) == 3, texts


def test_byte_pieces_at_the_start(kind, sp, ours):
    if not MODELS[kind].get("byte_fallback"):  # nothing to decode: the model has no byte pieces
        assert not sp.is_byte(_byte(sp, 0x20))
        return
    word = sp.piece_to_id(SPACE + "the")
    assert not sp.is_unknown(word)
    cases = [
        [_byte(sp, 0x20)],
        [_byte(sp, 0x20), word],
        [_byte(sp, 0x20), _byte(sp, 0x20), word],
        [sp.bos_id(), _byte(sp, 0x20), word],
        [IMAGE_TOKEN, _byte(sp, 0x20)],
        [_byte(sp, 0x41), word],
        [_byte(sp, 0xE2), word],  # an invalid byte still is text
        [*(_byte(sp, b) for b in SPACE.encode()), word],  # "▁" spelled in bytes is no space
        [_byte(sp, 0x20), sp.piece_to_id(SPACE)],
    ]
    assert [ours.decode(ids) for ids in cases] == [reference(sp, ids) for ids in cases]
    assert reference(sp, [_byte(sp, 0x20)]) == " "  # the case, as SentencePiece has it


def test_whitespace_pieces_at_the_start(sp, ours):
    spaces = _ids(sp, lambda p, i: set(p) == {SPACE})
    spaced = _ids(sp, lambda p, i: p.startswith(SPACE * 2) and set(p) != {SPACE})
    word = sp.piece_to_id(SPACE + "the")
    assert spaces and not sp.is_unknown(word)
    leads = [[], [sp.bos_id()], [sp.eos_id(), sp.bos_id()], [sp.unk_id()], [IMAGE_TOKEN]]
    cases = [
        [*lead, *middle, *tail]
        for lead in leads
        for middle in [[s] for s in spaces + spaced] + [[spaces[0], spaces[0]]]
        for tail in ([], [word], [sp.eos_id(), word])
    ]
    mismatches = [(ids, ours.decode(ids), reference(sp, ids)) for ids in cases
                  if ours.decode(ids) != reference(sp, ids)]
    assert mismatches == []


def test_unknown_id_is_skipped(sp, ours):
    word = sp.piece_to_id(SPACE + "the")
    assert sp.decode([sp.unk_id()]) != ""  # SentencePiece itself would write " ⁇ "
    assert ours.decode([sp.unk_id(), word]) == sp.decode([word])
    assert ours.decode([word, sp.unk_id(), word]) == sp.decode([word, word])


def test_random_id_lists_match_sentencepiece(sp, ours):
    mismatches = [
        ([sp.id_to_piece(i) if i >= 0 else i for i in ids], got, want)
        for ids in _random_id_lists(sp, seed=0, count=3000)
        if (got := ours.decode(ids)) != (want := reference(sp, ids))
    ]
    assert mismatches == []


def test_decode_pieces_defaults_are_llamas(llama):
    sp = spm.SentencePieceProcessor(model_file=str(llama / "tokenizer.model"))
    for ids in _random_id_lists(sp, seed=1, count=500):
        kept = [i for i in ids if i >= 0 and not (sp.is_control(i) or sp.is_unknown(i))]
        assert decode_pieces([sp.id_to_piece(i) for i in kept]) == sp.decode(kept), kept


def test_text_of_a_prefix_is_a_prefix(sp, ours):
    """Streaming generation prints text as ids arrive: the text of the first k ids, less
    a trailing run of U+FFFD (an incomplete character), must never be taken back."""
    for ids in _random_id_lists(sp, seed=2, count=600):
        full, want = ours.decode(ids), reference(sp, ids)
        for k in range(len(ids)):
            # SentencePiece has the property too, so it is a fair one to ask for.
            assert want.startswith(reference(sp, ids[:k]).rstrip("\ufffd"))
            assert full.startswith(ours.decode(ids[:k]).rstrip("\ufffd")), (ids, k)


def test_llama_style_tokenizer_json_decodes_like_sentencepiece(llama, tmp_path):
    """A tokenizer.json with byte pieces (here shortv's own conversion, which has no
    decoder) is recognised as Llama-style and decoded like SentencePiece."""
    sp = spm.SentencePieceProcessor(model_file=str(llama / "tokenizer.model"))
    backend = load_sentencepiece(llama / "tokenizer.model")
    assert backend.decoder is None
    backend.save(str(tmp_path / "tokenizer.json"))
    from_json = Tokenizer.from_directory(tmp_path)
    assert from_json.source.endswith("tokenizer.json")
    for ids in _random_id_lists(sp, seed=3, count=500):
        assert from_json.decode(ids) == reference(sp, ids), ids


def test_other_vocabularies_decode_through_their_own_decoder(tmp_path):
    """A tokenizer.json without byte pieces (GPT-2 style byte-level BPE) keeps its
    decoder; byte-level BPE decodes what it encoded back exactly."""
    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(_corpus(seed=4, n=200), trainer)
    backend.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_directory(tmp_path)
    assert tok.backend.token_to_id("<0x00>") is None
    for text in ["the dog", " leading space", "  two", "café 你好 😀", "tabs\tand\nnewlines ", ""]:
        ids = tok.encode_text(text)
        assert tok.decode(ids) == text
        assert tok.decode([tok.bos_id, *ids, IMAGE_TOKEN, tok.eos_id]) == text
