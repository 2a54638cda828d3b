"""Generation against full recomputation, batching, sampling, stop strings, streaming.

The oracle for every decoding step is `model.logits` on the whole sequence so far
(prompt + generated tokens, images expanded again, no KV cache), with the same method
set; the generated text is checked against the `sentencepiece` package's decoding.
Models: the session's tiny random LLaVA-1.5 in the original layout (fp32, CPU) and the
embedded demo (readable text, for stop strings).
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import shortv
from shortv import FastV, InputError, ShortV, Vanilla
from shortv.generate import loop as gen_module
from shortv.models.batch import Encoded

spm = pytest.importorskip("sentencepiece")

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "weights" / "llava-tiny-demo"
ATOL = 2e-4
EOS = 2  # both test models' SentencePiece eos_id


@pytest.fixture
def tiny(original_v15: Path) -> shortv.LLaVA:
    """A fresh copy per test (loading takes milliseconds), so methods and weight edits
    never leak between tests."""
    model = shortv.load(original_v15, device="cpu", dtype=torch.float32)
    assert model.tokenizer.eos_id == EOS
    return model


@pytest.fixture(scope="module")
def babbler_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random weights in the demo's shapes, with the demo's word-level tokenizer: it
    babbles real words and never ends by itself, which the EOS and stop tests need."""
    sys.path.insert(0, str(Path(shortv.__file__).resolve().parents[1] / "scripts"))
    import random_checkpoint

    out = tmp_path_factory.mktemp("babbler")
    # seed 9: varied answers with spaces (stop strings can be cut from them), different per prompt
    random_checkpoint.write(out, random_checkpoint.TEXT, random_checkpoint.VISION, 1000, seed=9)
    random_checkpoint.tokenizer_from(DEMO, out)
    return out


@pytest.fixture
def babbler(babbler_dir: Path) -> shortv.LLaVA:
    # The demo's template: its word-level tokenizer knows the demo's training text ("human"),
    # and the seed above was chosen for the prompts that template makes.
    return shortv.load(babbler_dir, device="cpu", dtype=torch.float32, template="llava_v1")


@pytest.fixture
def demo() -> shortv.LLaVA:
    model = shortv.load("llava-tiny-demo", device="cpu", dtype=torch.float32)
    assert model.tokenizer.eos_id == EOS
    return model


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


IMG_A, IMG_B, IMG_C = noise_image(40, 30, 1), noise_image(20, 50, 2), noise_image(28, 28, 3)


def sp_decode(model: shortv.LLaVA, ids: list[int]) -> str:
    """What original LLaVA printed: batch_decode(skip_special_tokens=True).strip().
    (For token runs that are valid UTF-8; see test_prompt for invalid byte runs.)"""
    sp = spm.SentencePieceProcessor(model_file=str(model.checkpoint_dir / "tokenizer.model"))
    return sp.decode([i for i in ids if not sp.is_control(i)]).strip()


def decoded(model: shortv.LLaVA, ids: list[int]) -> str:
    """The answer text for some token ids, with the model's own decoder (the tiny model
    emits invalid UTF-8 byte runs, where it differs from sentencepiece: see test_prompt)."""
    return model.tokenizer.decode(ids).strip()


def record_step_logits(monkeypatch) -> list[torch.Tensor]:
    """The next-token logits generation decides on at each step (batch rows together)."""
    seen: list[torch.Tensor] = []
    pick = gen_module.pick

    def recording(logits, options, generator):
        seen.append(logits.detach().float().clone())
        return pick(logits, options, generator)

    monkeypatch.setattr(gen_module, "pick", recording)
    return seen


def recomputed_logits(model: shortv.LLaVA, encoded: Encoded, tokens: list[int]) -> list[torch.Tensor]:
    """For s = 0..len(tokens)-1: next-token logits after prompt + tokens[:s], recomputed
    from scratch over the whole sequence (no cache)."""
    out = []
    for s in range(len(tokens)):
        ids = torch.cat([encoded.input_ids, torch.tensor(tokens[:s], dtype=torch.long)])
        out.append(model.logits(Encoded(ids, encoded.images, encoded.image_sizes))[-1].float())
    return out


def reference_greedy(model: shortv.LLaVA, encoded: Encoded, max_new_tokens: int) -> list[int]:
    """Greedy decoding by full recomputation; ends with EOS if the model chose it."""
    tokens: list[int] = []
    for _ in range(max_new_tokens):
        ids = torch.cat([encoded.input_ids, torch.tensor(tokens, dtype=torch.long)])
        token = int(model.logits(Encoded(ids, encoded.images, encoded.image_sizes))[-1].argmax())
        tokens.append(token)
        if token == model.tokenizer.eos_id:
            break
    return tokens


def assert_greedy_steps(tokens: list[int], reference: list[torch.Tensor]) -> None:
    """Each token is the argmax of the recomputed logits (ties within ATOL allowed)."""
    for s, (token, logits) in enumerate(zip(tokens, reference, strict=True)):
        best = float(logits.max())
        assert float(logits[token]) >= best - ATOL, f"step {s}: token {token} is not the argmax"


def emitted(result) -> list[int]:
    """The tokens the model produced: the result's ids, plus EOS if it ended on one."""
    return result.token_ids + ([EOS] if result.finish_reason == "eos" else [])


@dataclass(frozen=True)
class PinnedFastV(FastV):
    """FastV as defined for generation: the visual tokens kept are chosen once, by the
    prompt's last token in layer k-1; later (recomputed) steps keep the same ones."""

    pinned: dict = field(default_factory=dict, compare=False, hash=False)

    def keep(self, view):
        if "mask" not in self.pinned:
            self.pinned["mask"] = super().keep(view)
        mask = self.pinned["mask"]
        more = torch.ones(mask.shape[0], view.types.shape[1] - mask.shape[1], dtype=torch.bool)
        return torch.cat([mask, more], dim=1)


METHODS = {
    "vanilla": lambda: Vanilla(),
    "shortv": lambda: ShortV((0, 2)),
    "fastv": lambda: FastV(k=1, r=0.5),
    "vtw": lambda: shortv.VTW(k=2),
}
REFERENCE_METHODS = {**METHODS, "fastv": lambda: PinnedFastV(k=1, r=0.5)}


# ---- greedy decoding with the KV cache == full recomputation ------------------------------


@pytest.mark.parametrize(
    ("method", "images"),
    [
        ("vanilla", []),
        ("vanilla", [IMG_A]),
        ("vanilla", [IMG_B, IMG_C]),
        ("shortv", [IMG_A]),
        ("shortv", [IMG_B, IMG_C]),
        ("fastv", [IMG_A]),
        ("fastv", [IMG_B, IMG_C]),
        ("vtw", [IMG_B, IMG_C]),
    ],
)
def test_greedy_with_cache_equals_full_recomputation(tiny, monkeypatch, method, images):
    prompt = "What is unusual about this image?"
    n = 12
    tiny.set_method(METHODS[method]())
    step_logits = record_step_logits(monkeypatch)
    result = tiny.generate([prompt], [images], max_new_tokens=n)[0]
    tokens = emitted(result)
    assert result.finish_reason in ("length", "eos")
    assert len(tokens) == n or result.finish_reason == "eos"
    assert len(set(tokens)) >= 2  # not one token repeated: the steps differ

    encoded = tiny.encode(prompt, images)
    tiny.set_method(REFERENCE_METHODS[method]())
    reference = recomputed_logits(tiny, encoded, tokens)
    assert_greedy_steps(tokens, reference)
    for s, (got, want) in enumerate(zip(step_logits, reference, strict=False)):
        torch.testing.assert_close(got[0], want, atol=ATOL, rtol=1e-4, msg=f"step {s}")
    assert result.text == decoded(tiny, result.token_ids)
    assert result.prompt_tokens == tiny.logits(encoded).shape[0]

    if method != "vanilla" and images:
        # The method changes the computation, so matching its recomputation means
        # generation really used it.
        tiny.set_method(Vanilla())
        assert not torch.allclose(tiny.logits(encoded)[-1], reference[0], atol=1e-3)


def test_frozen_layers_through_set_frozen_layers(tiny):
    tiny.set_frozen_layers([1, 3])
    assert tiny.frozen_layers == (1, 3)
    encoded = tiny.encode("Describe the picture.", [IMG_A])
    result = tiny.generate(["Describe the picture."], [[IMG_A]], max_new_tokens=8)[0]
    assert_greedy_steps(emitted(result), recomputed_logits(tiny, encoded, emitted(result)))
    tiny.set_frozen_layers([])
    assert tiny.frozen_layers == ()


def test_first_step_of_fastv_is_plain_fastv(tiny):
    """The pinned reference agrees with FastV on the prompt itself."""
    encoded = tiny.encode("What is this?", [IMG_B, IMG_C])
    tiny.set_method(FastV(k=1, r=0.5))
    plain = tiny.logits(encoded)[-1]
    tiny.set_method(PinnedFastV(k=1, r=0.5))
    torch.testing.assert_close(tiny.logits(encoded)[-1], plain)


def make_eos_win(model, prompts, images, accept, candidates=None) -> list:
    """Edit the LM head so that EOS wins after a few steps: its row becomes a scaled copy
    of the row of a token the model produces for the first prompt (`candidates`, by
    default any it produces after its first step). Tries a few edits and keeps the first
    whose batch results satisfy `accept`; returns those results."""
    eos = model.tokenizer.eos_id
    head = model.module.decoder.lm_head.weight
    plain = reference_greedy(model, model.encode(prompts[0], images[0]), 12)
    assert eos not in plain
    for token in dict.fromkeys(plain[1:] if candidates is None else candidates):
        for scale in (1.02, 1.05, 1.2, 1.5):
            with torch.no_grad():
                head[eos] = scale * head[token]
            results = model.generate(prompts, images, max_new_tokens=12)
            if accept(results):
                return results
    pytest.fail("no edit of the LM head made EOS win the way this test needs")


def test_generation_ending_with_eos(tiny):
    prompt, images = "What is unusual about this image?", [IMG_A]
    (result,) = make_eos_win(tiny, [prompt], [images],
                             lambda rs: rs[0].finish_reason == "eos" and len(rs[0].token_ids) >= 2)
    reference = reference_greedy(tiny, tiny.encode(prompt, images), 12)
    assert reference[-1] == tiny.tokenizer.eos_id
    assert result.token_ids == reference[:-1]
    assert result.text == decoded(tiny, reference)


def test_length_limit(tiny):
    for n in (1, 5):
        result = tiny.generate(["Hello"], None, max_new_tokens=n)[0]
        assert result.finish_reason == "length" and len(result.token_ids) == n
    result = tiny.generate(["Hello"], None, max_new_tokens=0)[0]
    assert (result.text, result.token_ids, result.finish_reason) == ("", [], "length")


# ---- batches --------------------------------------------------------------------------------

BATCH_PROMPTS = [
    "What is unusual about this image?",
    "Compare the two pictures in detail, please, and say which one is brighter.",
    "Hi",
]
BATCH_IMAGES = [[IMG_A], [IMG_B, IMG_C], None]


@pytest.mark.parametrize("method", ["vanilla", "shortv", "fastv", "vtw"])
def test_batch_equals_one_by_one(tiny, monkeypatch, method):
    tiny.set_method(METHODS[method]())
    step_logits = record_step_logits(monkeypatch)
    batch = tiny.generate(BATCH_PROMPTS, BATCH_IMAGES, max_new_tokens=10)
    batch_logits = list(step_logits)
    assert len({r.prompt_tokens for r in batch}) == 3  # different lengths: left padding
    for i, (prompt, images) in enumerate(zip(BATCH_PROMPTS, BATCH_IMAGES, strict=True)):
        step_logits.clear()
        alone = tiny.generate([prompt], [images], max_new_tokens=10)[0]
        assert batch[i].token_ids == alone.token_ids, f"row {i}"
        assert (batch[i].text, batch[i].finish_reason, batch[i].prompt_tokens) == (
            alone.text, alone.finish_reason, alone.prompt_tokens)
        for s in range(len(emitted(alone))):
            torch.testing.assert_close(batch_logits[s][i], step_logits[s][0], atol=ATOL, rtol=1e-4)
    assert [tiny.chat(p, im, max_new_tokens=10) for p, im in zip(BATCH_PROMPTS, BATCH_IMAGES, strict=True)] \
        == [r.text for r in batch]


def test_batch_with_rows_finishing_early(babbler):
    """A row stops at EOS while the others go on to the length limit; each equals its
    own generation and recomputed greedy decoding."""
    image = [DEMO / "example.png"]
    prompts = ["Describe the picture in detail.", "hi", "How many shapes are there?"]
    images = [image, None, image]
    plain = [reference_greedy(babbler, babbler.encode(p, im), 12)
             for p, im in zip(prompts, images, strict=True)]
    only_first = [t for t in plain[0][1:] if t not in plain[1] + plain[2]]

    def mixed(results):
        first = results[0]
        return (first.finish_reason == "eos" and len(first.token_ids) >= 2
                and any(r.finish_reason == "length" for r in results[1:]))

    batch = make_eos_win(babbler, prompts, images, mixed, candidates=only_first)
    alone = [babbler.generate([p], [im], max_new_tokens=12)[0]
             for p, im in zip(prompts, images, strict=True)]
    assert [r.token_ids for r in batch] == [r.token_ids for r in alone]
    assert [r.finish_reason for r in batch] == [r.finish_reason for r in alone]
    assert [r.text for r in batch] == [r.text for r in alone]
    for r, p, im in zip(batch, prompts, images, strict=True):
        assert emitted(r) == reference_greedy(babbler, babbler.encode(p, im), 12)
        assert r.text == sp_decode(babbler, r.token_ids)  # decoded like SentencePiece


def test_batch_with_a_row_cut_by_a_stop_string(demo):
    """A stop string ends one row early; its later tokens must not leak into its answer."""
    image = [DEMO / "example.png"]
    prompts = ["Describe the picture in detail.", "hi", "How many shapes are there?"]
    images = [image, None, image]
    first = demo.generate(prompts[:1], images[:1], max_new_tokens=16)[0].text
    stop, _ = _middle_stop(first)
    batch = demo.generate(prompts, images, max_new_tokens=16, stop=[stop])
    alone = [demo.generate([p], [im], max_new_tokens=16, stop=[stop])[0]
             for p, im in zip(prompts, images, strict=True)]
    assert batch[0].finish_reason == "stop"
    assert [(r.text, r.token_ids, r.finish_reason) for r in batch] == [
        (r.text, r.token_ids, r.finish_reason) for r in alone]
    assert len(batch[0].token_ids) < max(len(r.token_ids) for r in batch)


def test_generate_argument_errors(tiny):
    with pytest.raises(InputError):
        tiny.generate("a single string", None)
    with pytest.raises(InputError):
        tiny.generate(["a", "b"], [None])


# ---- sampling -------------------------------------------------------------------------------


def test_same_seed_same_sample(tiny):
    kwargs = dict(max_new_tokens=10, temperature=1.0, seed=7)
    a = tiny.generate(["Describe it."], [[IMG_A]], **kwargs)[0]
    b = tiny.generate(["Describe it."], [[IMG_A]], **kwargs)[0]
    assert a.token_ids == b.token_ids
    assert tiny.chat("Describe it.", [IMG_A], **kwargs) == a.text


def test_sampling_differs_from_greedy_and_between_seeds(tiny):
    greedy = tiny.generate(["Describe it."], [[IMG_A]], max_new_tokens=10)[0].token_ids
    samples = [
        tuple(tiny.generate(["Describe it."], [[IMG_A]], max_new_tokens=10,
                                    temperature=1.0, seed=seed)[0].token_ids)
        for seed in range(4)
    ]
    assert any(list(s) != greedy for s in samples)
    assert len(set(samples)) > 1


def test_tiny_top_p_is_greedy(tiny):
    greedy = tiny.generate(["Describe it."], [[IMG_A]], max_new_tokens=10)[0].token_ids
    for seed in range(3):
        sampled = tiny.generate(["Describe it."], [[IMG_A]], max_new_tokens=10,
                                        temperature=1.0, top_p=1e-6, seed=seed)[0].token_ids
        assert sampled == greedy


def _first_token_samples(model, prompt: str, n: int, **options) -> np.ndarray:
    results = model.generate([prompt] * n, None, max_new_tokens=1, seed=0, **options)
    # A row that drew EOS has no token ids and finish_reason "eos".
    return np.array([emitted(r)[0] for r in results])


def _check_samples(samples: np.ndarray, probs: torch.Tensor, logits: torch.Tensor) -> None:
    """Samples against a distribution: no token outside its support, every likely token
    seen, each frequency within 5 sigma, and the mean logit of the samples within 4
    standard errors (a statistic that moves with the temperature)."""
    n = len(samples)
    p = probs.double().numpy()
    counts = np.bincount(samples, minlength=p.size)
    assert counts[p == 0].sum() == 0, "sampled outside the distribution's support"
    assert np.all(counts[p * n >= 10] > 0), "a likely token was never sampled"
    freq = counts / n
    sigma = np.sqrt(p * (1 - p) / n)
    assert np.all(np.abs(freq - p) <= 5 * sigma + 2 / n), (freq[p > 0.02], p[p > 0.02])
    values = logits.double().numpy()
    mean = float((p * values).sum())
    se = float(np.sqrt((p * values**2).sum() - mean**2) / np.sqrt(n))
    assert abs(values[samples].mean() - mean) < 4 * se, (values[samples].mean(), mean, se)


@pytest.mark.parametrize("t", [0.3, 1.0])
def test_temperature_sampling_follows_the_softmax(tiny, t):
    """First tokens of 1000 samples against softmax(logits / T) from recomputation."""
    prompt = "Hello, who are you?"
    logits = tiny.logits(tiny.encode(prompt))[-1].double()
    probs = torch.softmax(logits / t, dim=-1)
    _check_samples(_first_token_samples(tiny, prompt, 1000, temperature=t), probs, logits)


def test_top_p_samples_only_the_nucleus(tiny):
    prompt, t, top_p = "Hello, who are you?", 0.2, 0.6
    logits = tiny.logits(tiny.encode(prompt))[-1].double()
    probs = torch.softmax(logits / t, dim=-1)
    ordered, order = probs.sort(descending=True)
    size = int((ordered.cumsum(0) < top_p).sum()) + 1  # smallest prefix with mass >= top_p
    nucleus = torch.zeros_like(probs)
    nucleus[order[:size]] = probs[order[:size]]
    nucleus /= nucleus.sum()
    assert 3 <= size <= 100
    samples = _first_token_samples(tiny, prompt, 1000, temperature=t, top_p=top_p)
    _check_samples(samples, nucleus, logits)


# ---- stop strings ---------------------------------------------------------------------------


def _middle_stop(text: str) -> tuple[str, int]:
    """A short substring of `text` (no spaces) first occurring well inside it."""
    for at in range(max(3, len(text) // 6), 3 * len(text) // 4):
        for size in (3, 4, 5):
            stop = text[at:at + size]
            if " " not in stop and text.find(stop) == at:
                return stop, at
    pytest.fail(f"no usable stop string in {text!r}")


def test_stop_string_cuts_before_it(babbler):
    prompt, images = "Describe the picture in detail.", [DEMO / "example.png"]
    full = babbler.generate([prompt], [images], max_new_tokens=24)[0]
    assert full.finish_reason == "length" and len(full.text) > 20
    assert full.text == sp_decode(babbler, full.token_ids)
    stop, at = _middle_stop(full.text)
    cut = babbler.generate([prompt], [images], max_new_tokens=24, stop=[stop])[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:at].strip()
    assert len(cut.token_ids) < len(full.token_ids)
    assert full.token_ids[: len(cut.token_ids)] == cut.token_ids
    assert stop in babbler.tokenizer.decode(cut.token_ids)  # stopped at the token completing it
    assert stop not in babbler.tokenizer.decode(cut.token_ids[:-1])
    assert babbler.chat(prompt, images, max_new_tokens=24, stop=[stop]) == cut.text


def test_earliest_of_several_stop_strings_wins(demo):
    prompt, images = "Describe the picture in detail.", [DEMO / "example.png"]
    full = demo.generate([prompt], [images], max_new_tokens=24)[0].text
    early, at = _middle_stop(full)
    # A second stop string occurring only after the first one (not overlapping it).
    late = next(full[i:i + 3] for i in range(at + len(early), len(full) - 2)
                if full.find(full[i:i + 3]) >= at + len(early))
    result = demo.generate([prompt], [images], max_new_tokens=24, stop=[late, early])[0]
    assert result.text == full[:at].strip() and result.finish_reason == "stop"


def test_absent_stop_string_changes_nothing(babbler):
    prompt = "Describe the picture in detail."
    full = babbler.generate([prompt], None, max_new_tokens=12)[0]
    other = babbler.generate([prompt], None, max_new_tokens=12, stop=["@@@"])[0]
    assert (other.text, other.token_ids, other.finish_reason) == (full.text, full.token_ids, "length")


# ---- streaming ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("which", "prompt", "options"),
    [
        ("demo", "Describe the picture in detail.", {}),
        ("demo", "What is unusual about this image?", {"temperature": 1.0, "seed": 3}),
        ("demo", "What is unusual about this image?", {"temperature": 0.8, "top_p": 0.9, "seed": 11}),
        ("babbler", "What is unusual about this image?", {}),  # byte-fallback pieces: partial UTF-8
        ("babbler", "Hi", {"temperature": 1.0, "seed": 5}),
    ],
)
def test_stream_joins_to_chat(request, which, prompt, options):
    model = request.getfixturevalue(which)
    images = [DEMO / "example.png"] if which == "demo" else [IMG_A]
    whole = model.chat(prompt, images, max_new_tokens=20, **options)
    pieces = list(model.chat(prompt, images, max_new_tokens=20, stream=True, **options))
    assert all(pieces) and len(pieces) > 1
    assert "".join(pieces) == whole


def test_stream_survives_text_that_changes_under_later_bytes(demo, monkeypatch):
    """Scripted tokens: "Photo", byte "C", then a byte that starts an invalid sequence,
    then more text. Streaming must still join to the full answer."""
    tok = demo.tokenizer
    script = [*tok.encode_text("Photo"), tok.backend.token_to_id("<0x43>"),
              tok.backend.token_to_id("<0xE2>"), *tok.encode_text(" is red")]
    assert None not in script

    def scripted(model, batch, options):
        yield [1] * len(batch)
        for token in script[: options.max_new_tokens]:
            yield [token] * len(batch)

    monkeypatch.setattr(gen_module, "token_steps", scripted)
    whole = demo.chat("Hi", max_new_tokens=20)
    assert whole.startswith("Photo") and whole.endswith("is red")
    assert "".join(demo.chat("Hi", max_new_tokens=20, stream=True)) == whole


def test_stream_with_a_stop_string_and_history(demo):
    prompt, images = "What is unusual about this image?", [DEMO / "example.png"]
    history = [("Hello", "Hi there.")]
    full = demo.chat(prompt, images, history=history, max_new_tokens=24)
    stop, _ = _middle_stop(full)
    whole = demo.chat(prompt, images, history=history, max_new_tokens=24, stop=[stop])
    pieces = list(demo.chat(prompt, images, history=history, max_new_tokens=24, stop=[stop], stream=True))
    assert "".join(pieces) == whole and all(pieces)
    assert stop not in whole and whole == full[: full.find(stop)].strip()


# ---- context length -------------------------------------------------------------------------


def _with_context(src: Path, dst: Path, context: int) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["max_position_embeddings"] = context
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_prompt_longer_than_the_context(tmp_path, original_v15):
    base = shortv.load(original_v15, device="cpu", dtype=torch.float32)
    n_text = len(base.encode("Hello").input_ids)
    model = shortv.load(_with_context(original_v15, tmp_path / "short", n_text - 1), device="cpu")
    assert model.config.text.max_position_embeddings == n_text - 1
    with pytest.raises(InputError, match="context"):
        model.chat("Hello", max_new_tokens=4)
    with pytest.raises(InputError, match="context"):
        model.logits(model.encode("Hello"))
    with pytest.raises(InputError, match="context"):
        list(model.chat("Hello", max_new_tokens=4, stream=True))


def test_images_pushing_past_the_context(tmp_path, original_v15):
    base = shortv.load(original_v15, device="cpu", dtype=torch.float32)
    encoded = base.encode("Hello", [IMG_A])
    n_text, n_total = len(encoded.input_ids), base.logits(encoded).shape[0]
    assert n_total > n_text
    model = shortv.load(_with_context(original_v15, tmp_path / "short", n_total - 1), device="cpu")
    with pytest.raises(InputError, match="context"):
        model.chat("Hello", [IMG_A], max_new_tokens=4)


def test_generation_stops_at_the_context(tmp_path, original_v15):
    base = shortv.load(original_v15, device="cpu", dtype=torch.float32)
    n_prompt = base.logits(base.encode("Hello", [IMG_A])).shape[0]
    model = shortv.load(_with_context(original_v15, tmp_path / "short", n_prompt + 3), device="cpu")
    result = model.generate(["Hello"], [[IMG_A]], max_new_tokens=12)[0]
    assert len(emitted(result)) <= 3
    reference = reference_greedy(base, base.encode("Hello", [IMG_A]), 3)
    assert emitted(result) == reference


# ---- option validation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"max_new_tokens": -1},
        {"temperature": -0.5},
        {"temperature": 1.0, "top_p": 0.0},
        {"temperature": 1.0, "top_p": 1.5},
        {"temperature": 1.0, "top_p": -0.1},
    ],
)
def test_bad_options_are_input_errors(demo, options):
    with pytest.raises(InputError):
        demo.chat("Hello", **options)
    with pytest.raises(InputError):
        demo.generate(["Hello"], **options)
    with pytest.raises(InputError):
        list(demo.chat("Hello", stream=True, **options))
