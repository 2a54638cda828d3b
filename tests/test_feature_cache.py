"""The vision-feature cache (`shortv.models.feature_cache`): an image seen before skips the
vision tower and projector, and nothing else changes.

Oracles: the same model without the cache (its logits and prepared embeddings, bit for
bit: a hit hands back the very tensor the tower gave), the tower's own forward calls
(counted with a forward hook on `module.vision`: how many runs, on how many images), and
the cache's byte accounting against the tensors' sizes. Models: the embedded LLaVA demo
and a tiny random Qwen2-VL checkpoint saved by transformers; the server's engine and app
in-process, with /metrics read over Starlette's test client.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
import torch
from PIL import Image

import shortv
from shortv import ShortV, VisionZip, compose
from shortv.errors import ConfigError
from shortv.methods import VANILLA
from shortv.models.feature_cache import MIB, FeatureCache, image_key

from .cli_runner import run_main
from .data import PROMPTS, picture
from .qwen_checkpoints import build_model, save_transformers
from .reference import random_rgb

MODEL = "llava-tiny-demo"


@pytest.fixture(scope="module")
def demo() -> shortv.LLaVA:
    """The demo without a cache: the reference."""
    return shortv.load(MODEL, device="cpu", dtype=torch.float32)


@pytest.fixture
def cached() -> shortv.LLaVA:
    """A fresh demo with the cache on (each test starts empty)."""
    return shortv.load(MODEL, device="cpu", dtype=torch.float32).cache_features(64)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("qwen2-vl")
    save_transformers(build_model("qwen2_vl", root), root)
    return root


class TowerCalls:
    """The images each forward call of a vision tower received (its first input's rows:
    CLIP crops [N, 3, S, S]; Qwen patches [N, patch_dim])."""

    def __init__(self, tower: torch.nn.Module) -> None:
        self.rows: list[int] = []
        self.handle = tower.register_forward_hook(
            lambda module, args, out: self.rows.append(args[0].shape[0]))

    def __len__(self) -> int:
        return len(self.rows)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ---- answers do not change ------------------------------------------------------------------


def test_a_hit_gives_the_same_logits_without_the_tower(demo, cached, tmp_path):
    """Miss, then hits (the same picture as PIL, as a file path, as PNG bytes): logits equal
    the uncached model's bit for bit, and the tower runs for the miss only."""
    image = picture(3)
    path = tmp_path / "three.png"
    image.save(path)
    want = demo.logits(demo.encode(PROMPTS[0], [image]))
    calls = TowerCalls(cached.module.vision)
    for given in (image, str(path), png_bytes(image)):
        assert torch.equal(cached.logits(cached.encode(PROMPTS[0], [given])), want)
    assert calls.rows == [1]
    cache = cached.feature_cache
    assert (cache.hits, cache.misses, cache.entries) == (2, 1, 1)
    # The entry is the image's visual tokens [36, hidden] on the model's device and dtype.
    assert cache.bytes == 36 * demo.config.text.hidden_size * 4
    # Another picture misses.
    cached.logits(cached.encode(PROMPTS[0], [picture(4)]))
    assert calls.rows == [1, 1] and (cache.hits, cache.misses, cache.entries) == (2, 2, 2)


def test_generation_is_unchanged(demo, cached):
    prompts, images = PROMPTS[:3], [[picture(1)], [picture(2)], [picture(1)]]
    want = demo.generate(prompts, images, max_new_tokens=12)
    calls = TowerCalls(cached.module.vision)
    first = cached.generate(prompts, images, max_new_tokens=12)
    again = cached.generate(prompts, images, max_new_tokens=12)
    assert [r.token_ids for r in first] == [r.token_ids for r in again] == [r.token_ids for r in want]
    # One tower run, on the two distinct pictures (picture 1 twice in the batch); none after.
    assert calls.rows == [2]
    assert (cached.feature_cache.misses, cached.feature_cache.hits) == (2, 1 + 3)


def test_a_mixed_batch_runs_the_tower_once_on_the_new_images(demo, cached):
    """A batch with a cached image, a new one twice, and text alone: one tower call on the
    new image alone; each sequence's embeddings are those of its image's tokens computed
    alone (bit for bit), and equal the uncached batch's (to rounding: the uncached tower
    ran both images in one batch)."""
    old, new = picture(5), picture(6)
    cached.logits(cached.encode(PROMPTS[0], [old]))
    calls = TowerCalls(cached.module.vision)
    batch = [cached.encode(PROMPTS[1], [old]), cached.encode(PROMPTS[2], [new]),
             cached.encode(PROMPTS[3], [new, old]), cached.encode(PROMPTS[0])]
    got = cached.prepare(batch)
    assert calls.rows == [1]
    assert (cached.feature_cache.hits, cached.feature_cache.misses) == (3, 2)
    alone = [demo.prepare([e]) for e in batch]
    for row, one in enumerate(alone):
        n = one.lengths[0]
        assert got.lengths[row] == n
        assert torch.equal(got.embeds[row, -n:], one.embeds[0])
        assert torch.equal(got.types[row, -n:], one.types[0])
    uncached = demo.prepare(batch)
    torch.testing.assert_close(got.embeds, uncached.embeds, atol=1e-6, rtol=1e-6)
    assert torch.equal(got.types, uncached.types)


def test_qwen_hit_gives_the_same_logits_without_the_tower(qwen_dir):
    """A second family: Qwen2-VL's ViT + merger are skipped on a hit; logits (M-RoPE
    positions come from the image's grid, not from its tokens) equal the uncached model's."""
    plain = shortv.load(str(qwen_dir), device="cpu", dtype="float32")
    model = shortv.load(str(qwen_dir), device="cpu", dtype="float32").cache_features(8)
    images = [random_rgb(280, 170, seed=1), random_rgb(120, 200, seed=2)]
    want = plain.logits(plain.encode("Describe both.", images))
    calls = TowerCalls(model.module.vision)
    for _ in range(2):
        assert torch.equal(model.logits(model.encode("Describe both.", images)), want)
    # One run, with both images' patches (the 280x170 image: 20x12 patches, the other 8x14).
    assert calls.rows == [20 * 12 + 8 * 14]
    assert (model.feature_cache.misses, model.feature_cache.hits, model.feature_cache.entries) == (2, 2, 2)
    # Swapped images: both hits, and the logits are the uncached model's for that order.
    swapped = plain.logits(plain.encode("Describe both.", images[::-1]))
    assert torch.equal(model.logits(model.encode("Describe both.", images[::-1])), swapped)
    assert len(calls) == 1


# ---- what the key holds -----------------------------------------------------------------------


def test_image_reducing_methods_have_their_own_entries(demo, cached):
    """VisionZip at two budgets: two entries, apart from vanilla's; a method acting in the
    decoder only (ShortV) shares vanilla's, and a composition shares its VisionZip part's.
    Every answer equals the uncached model's under the same method."""
    image = picture(7)
    calls = TowerCalls(cached.module.vision)
    cases = [(VANILLA, 1), (ShortV((2, 3)), 1), (VisionZip(9), 2), (VisionZip(18), 3),
             (compose(ShortV((2, 3)), VisionZip(9)), 3), (VisionZip(9), 3)]
    for method, entries in cases:
        cached.set_method(method)
        demo.set_method(method)
        try:
            want = demo.logits(demo.encode(PROMPTS[1], [image]))
        finally:
            demo.set_method(VANILLA)
        assert torch.equal(cached.logits(cached.encode(PROMPTS[1], [image])), want), method
        assert cached.feature_cache.entries == entries, method
    assert len(calls) == 3  # vanilla, budget 9, budget 18
    hidden = demo.config.text.hidden_size * 4
    assert cached.feature_cache.bytes == (36 + 9 + 18) * hidden


def test_the_key_holds_the_size_shape_dtype_and_model():
    """The same pixels under another original size (LLaVA-NeXT's merge depends on it),
    another shape or dtype of the same bytes, or another model dtype: other keys."""
    pixels = torch.rand(3, 8, 8)
    cpu = torch.device("cpu")
    key = image_key(pixels, (30, 20), VANILLA, device=cpu, dtype=torch.float32)
    assert key == image_key(pixels.clone(), (30, 20), VANILLA, device=cpu, dtype=torch.float32)
    others = [image_key(pixels, (20, 30), VANILLA, device=cpu, dtype=torch.float32),
              image_key(pixels.view(3, 64), (30, 20), VANILLA, device=cpu, dtype=torch.float32),
              image_key(pixels.view(torch.int32), (30, 20), VANILLA, device=cpu, dtype=torch.float32),
              image_key(pixels, (30, 20), VANILLA, device=cpu, dtype=torch.float64),
              image_key(pixels, (30, 20), VisionZip(9), device=cpu, dtype=torch.float32)]
    changed = pixels.clone()
    changed[2, 7, 7] += 1e-6
    others.append(image_key(changed, (30, 20), VANILLA, device=cpu, dtype=torch.float32))
    assert len({key, *others}) == 1 + len(others)
    # A strided view hashes its own elements in order, like a contiguous copy.
    wide = torch.rand(3, 8, 16)
    assert image_key(wide[:, :, ::2], (1, 1), VANILLA, device=cpu, dtype=torch.float32) == \
        image_key(wide[:, :, ::2].contiguous(), (1, 1), VANILLA, device=cpu, dtype=torch.float32)


# ---- the LRU by bytes ---------------------------------------------------------------------------


def test_least_recently_used_entries_go_first_by_bytes():
    cache = FeatureCache(3 * 400)
    a, b, c, d = (torch.full((10, 10), float(i)) for i in range(4))  # 400 bytes each
    runs: list[list[int]] = []

    def lookup(keys, tensors):
        def compute(indices):
            runs.append(indices)
            return [tensors[i] for i in indices]
        return cache.features(keys, compute)

    lookup(["a", "b", "c"], [a, b, c])
    assert (cache.bytes, cache.entries, cache.evictions) == (1200, 3, 0)
    assert lookup(["a"], [None])[0] is cache.get("a")  # a is now the most recently used
    lookup(["d"], [d])  # evicts b, the least recently used
    assert [k in cache for k in "abcd"] == [True, False, True, True]
    assert (cache.bytes, cache.evictions) == (1200, 1)
    out = lookup(["b", "a"], [b, None])
    assert runs[-1] == [0] and torch.equal(out[0], b) and torch.equal(out[1], a)
    assert [k in cache for k in "abcd"] == [True, True, False, True]  # c went
    assert (cache.hits, cache.misses, cache.evictions) == (2, 5, 2)
    # Bigger than the whole cache: used, not stored, nothing evicted.
    big = torch.zeros(20, 20)
    assert lookup(["big"], [big])[0].data_ptr() == big.data_ptr()
    assert "big" not in cache and cache.too_large == 1 and cache.entries == 3
    cache.clear()
    assert (cache.bytes, cache.entries) == (0, 0)


def test_an_entry_holds_only_its_own_bytes():
    """The tower's output for a batch is split per image: a stored view would keep the
    whole batch's buffer alive, so it is copied (and detached)."""
    cache = FeatureCache(10_000)
    batch = torch.arange(600, dtype=torch.float32).view(6, 100).requires_grad_(True) * 1.0
    stored = cache.put("x", batch[2:3])
    assert stored.untyped_storage().nbytes() == 400 and cache.bytes == 400
    assert not stored.requires_grad and torch.equal(stored, batch[2:3].detach())


def test_model_cache_evicts_by_bytes(cached):
    """A cache that fits one image's tokens: the second picture evicts the first, which
    then runs through the tower again."""
    tokens = 36 * cached.config.text.hidden_size * 4
    cached.feature_cache = FeatureCache(tokens)
    calls = TowerCalls(cached.module.vision)
    for i in (1, 2, 1, 1):
        cached.token_types(cached.encode(PROMPTS[0], [picture(i)]))
    assert calls.rows == [1, 1, 1]
    cache = cached.feature_cache
    assert (cache.misses, cache.hits, cache.evictions, cache.bytes) == (3, 1, 2, tokens)


def test_cache_features_turns_it_on_and_off(cached):
    assert cached.feature_cache.max_bytes == 64 * MIB
    assert cached.cache_features(0.5).feature_cache.max_bytes == MIB // 2
    assert cached.cache_features(None).feature_cache is None
    assert cached.cache_features(0).feature_cache is None
    with pytest.raises(ConfigError, match="number of MB >= 0"):
        cached.cache_features(-1)
    # The library's default is off.
    assert shortv.load(MODEL, device="cpu", dtype=torch.float32).feature_cache is None


# ---- the server ----------------------------------------------------------------------------------


def _body(image: Image.Image, text: str) -> dict:
    url = "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()
    return {"model": MODEL, "max_tokens": 12, "messages": [{"role": "user", "content": [
        {"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]}]}


def _metrics(client) -> dict[str, float]:
    text = client.get("/metrics").text
    return {name: float(value) for name, value in
            (line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))}


def test_the_server_reports_hits_after_the_same_image_twice(demo):
    """The engine and app in-process: the same picture in two requests (as a client resends
    a conversation's image) is a miss then a hit in /metrics and in the stats line, and
    both answers equal `model.chat`'s."""
    from starlette.testclient import TestClient

    from shortv.serve import Engine
    from shortv.serve.app import create_app

    model = shortv.load(MODEL, device="cpu", dtype=torch.float32).cache_features(16)
    engine = Engine(model, max_batch=4, stats_interval=0)
    calls = TowerCalls(model.module.vision)
    with TestClient(create_app(engine)) as client:
        assert "shortv_feature_cache_hits_total" in _metrics(client)
        answers = []
        for prompt in PROMPTS[:2]:
            response = client.post("/v1/chat/completions", json=_body(picture(8), prompt))
            assert response.status_code == 200, response.text
            answers.append(response.json()["choices"][0]["message"]["content"])
        metrics = _metrics(client)
    assert answers == [demo.chat(p, [picture(8)], max_new_tokens=12) for p in PROMPTS[:2]]
    assert calls.rows == [1]
    assert metrics["shortv_feature_cache_hits_total"] == 1
    assert metrics["shortv_feature_cache_misses_total"] == 1
    assert metrics["shortv_feature_cache_evictions_total"] == 0
    assert metrics["shortv_feature_cache_entries"] == 1
    assert metrics["shortv_feature_cache_bytes"] == 36 * demo.config.text.hidden_size * 4
    assert metrics["shortv_feature_cache_capacity_bytes"] == 16 * MIB
    assert "feature_cache_hits=1 feature_cache_misses=1" in engine.stats_line()


def test_the_server_without_a_cache_reports_none(demo):
    from shortv.serve import Engine

    engine = Engine(demo, stats_interval=0)
    assert engine.feature_cache is None and "feature_cache" not in engine.stats_line()


@pytest.mark.parametrize(("args", "want"), [([], 512 * MIB), (["--feature-cache-mb", "2.5"], int(2.5 * MIB)),
                                            (["--feature-cache-mb", "0"], None)])
def test_serve_turns_the_cache_on_by_default(capsys, monkeypatch, args, want):
    import shortv.serve.app as app

    seen = {}

    def serve_in_process(app_, engine, sock, *, shutdown_timeout):  # instead of uvicorn
        cache = engine.model.feature_cache
        seen["max_bytes"] = None if cache is None else cache.max_bytes

    monkeypatch.setattr(app, "run_server", serve_in_process)
    code, _, err = run_main(["serve", MODEL, "--port", "0", "--device", "cpu", *args], capsys)
    assert code == 0, err
    assert seen == {"max_bytes": want}


def test_a_negative_cache_size_is_refused(capsys):
    code, _, err = run_main(["serve", MODEL, "--feature-cache-mb", "-1"], capsys)
    assert code == 2 and "--feature-cache-mb" in err and "must be in [0.0" in err
