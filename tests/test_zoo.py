"""The zoo: cards against docs/design.md §5/§7 (typed in here), where weights are found, and a
wheel built from the repo that still finds the cards and the demo weights."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import torch

import shortv
from shortv import ModelNotFoundError, hub, zoo
from shortv.store import locate

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "weights" / "llava-tiny-demo"

# docs/design.md §7, the paper's rankings (first N frozen).
PAPER = {
    "llava-v1.5-7b": (19, [31, 29, 30, 28, 0, 26, 27, 25, 24, 22, 23, 21, 2, 3, 20, 18, 17, 12, 19]),
    "llava-v1.5-13b": (24, [39, 32, 28, 36, 27, 37, 29, 30, 1, 38, 25, 31, 2, 26, 23, 34, 0, 33, 35,
                            22, 24, 21, 20, 17]),
    "llava-v1.6-vicuna-7b": (19, [31, 29, 30, 28, 26, 27, 22, 24, 21, 23, 25, 20, 19, 17, 18, 15,
                                  12, 0, 2]),
    "llava-v1.6-vicuna-13b": (24, [39, 32, 29, 36, 27, 30, 37, 23, 25, 31, 26, 2, 28, 22, 33, 35,
                                   34, 24, 38, 21, 20, 18, 1, 17]),
}
# docs/design.md §5: Vicuna v1.5 decoders (layers, hidden, heads, MLP) and CLIP ViT-L/14-336.
VICUNA = {"7b": (32, 4096, 32, 11008), "13b": (40, 5120, 40, 13824)}
QWEN = ("qwen2-vl-2b-instruct", "qwen2-vl-7b-instruct", "qwen2.5-vl-3b-instruct", "qwen2.5-vl-7b-instruct")
NEXT_PINPOINTS = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]


def test_every_card_parses():
    files = sorted((REPO / "models").glob("*.toml"))
    raw = {tomllib.loads(f.read_text())["name"]: f for f in files}
    assert len(raw) == len(files) == 11
    assert set(raw) == {*PAPER, "llava-tiny-demo", "llava-v1.6-mistral-7b", "llava-v1.6-34b", *QWEN}
    assert [c.name for c in zoo.cards()] == sorted(raw)
    # The demo: the text scripts/make_demo.py trained it with; the rest: LLaVA's own choice.
    templates = {"llava-v1.6-mistral-7b": "mistral_instruct", "llava-v1.6-34b": "chatml_direct",
                 "llava-tiny-demo": "llava_v1", **dict.fromkeys(QWEN, "qwen2_vl")}
    for name, path in raw.items():
        card = zoo.get_card(name)
        assert card == zoo.Card.from_toml(path)
        assert card.template == templates.get(name, "vicuna_v1")
        shortv.get_template(card.template)  # a template that exists


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_rankings(name):
    n, ranking = PAPER[name]
    card = zoo.get_card(name)
    assert card.n_frozen == n
    assert list(card.ranking) == ranking
    assert len(ranking) == n == len(set(ranking))
    assert all(0 <= i < card.config.text.layers for i in ranking)
    assert card.ranking_source  # says where the ranking came from


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_architectures(name):
    card = zoo.get_card(name)
    raw = tomllib.loads(card.path.read_text())["architecture"]
    layers, hidden, heads, mlp = VICUNA["13b" if "13b" in name else "7b"]
    # Stated in the card itself (human-readable), and what the parsed config holds.
    text = raw["text"]
    assert (text["layers"], text["hidden_size"], text["heads"], text["intermediate_size"],
            text["vocab_size"]) == (layers, hidden, heads, mlp, 32000)
    t = card.config.text
    assert (t.layers, t.hidden_size, t.heads, t.kv_heads, t.intermediate_size, t.vocab_size) == (
        layers, hidden, heads, heads, mlp, 32000)
    assert t.head_dim * t.heads == hidden
    assert (t.rms_norm_eps, t.rope_theta, t.max_position_embeddings) == (1e-5, 10000.0, 4096)
    v = card.config.vision
    assert (raw["vision"]["layers"], raw["vision"]["width"], raw["vision"]["heads"],
            raw["vision"]["mlp_dim"], raw["vision"]["patch_size"], raw["vision"]["image_size"]) == (
        24, 1024, 16, 4096, 14, 336)
    assert (v.layers, v.width, v.heads, v.mlp_dim, v.patch_size, v.image_size, v.act, v.norm_eps) == (
        24, 1024, 16, 4096, 14, 336, "quick_gelu", 1e-5)
    assert v.num_patches == 576
    c = card.config
    assert (c.projector, c.vision_select_layers, c.vision_select_feature) == ("mlp2x_gelu", (-2,), "patch")
    assert card.vision_tower == "openai/clip-vit-large-patch14-336"
    assert card.repo == f"liuhaotian/{name}"
    if name.startswith("llava-v1.6"):
        assert (c.image_aspect_ratio, c.patch_merge_type) == ("anyres", "spatial_unpad")
        assert [tuple(p) for p in c.image_grid_pinpoints] == NEXT_PINPOINTS
    else:
        assert (c.image_aspect_ratio, c.patch_merge_type) == ("pad", "flat")


def test_demo_card_matches_its_checkpoint():
    card = zoo.get_card("llava-tiny-demo")
    config = json.loads((DEMO / "config.json").read_text())
    t = card.config.text
    assert (t.layers, t.hidden_size, t.heads, t.intermediate_size, t.vocab_size) == (
        config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
        config["intermediate_size"], config["vocab_size"])
    assert sorted(card.ranking) == list(range(t.layers)) and 0 < card.n_frozen < t.layers
    from shortv.loading import config_of_directory

    fields = ("layers", "hidden_size", "heads", "kv_heads", "head_dim", "intermediate_size",
              "vocab_size", "rms_norm_eps", "rope_theta", "max_position_embeddings")
    checkpoint = config_of_directory(DEMO)
    assert {f: getattr(checkpoint.text, f) for f in fields} == {f: getattr(t, f) for f in fields}
    assert checkpoint.vision == card.config.vision


def test_unknown_card_name():
    with pytest.raises(ModelNotFoundError, match="zoo"):
        zoo.get_card("llava-v9")


# ---- where weights are found ----------------------------------------------------------------


@pytest.fixture
def no_hub(monkeypatch):
    """Fail the test if anything asks the Hub (or the HF cache)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"the Hub was asked: {args} {kwargs}")

    monkeypatch.setattr(hub, "hub_snapshot", refuse)


@pytest.fixture
def empty_hf(tmp_path, monkeypatch):
    """Offline, with an empty Hugging Face cache and no extra weight store."""
    home = tmp_path / "hf-home"
    home.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.delenv("SHORTV_WEIGHTS", raising=False)
    import huggingface_hub.constants as constants  # read at import time: patch them too

    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return home


def test_zoo_name_uses_the_local_store_first(no_hub, monkeypatch):
    monkeypatch.delenv("SHORTV_WEIGHTS", raising=False)
    assert locate("llava-tiny-demo").resolve() == DEMO.resolve()
    model = shortv.load("llava-tiny-demo", device="cpu")
    assert model.name == "llava-tiny-demo"
    assert model.checkpoint_dir.resolve() == DEMO.resolve()
    assert model.dtype == torch.float32 and model.num_layers == 8


def test_directory_path_wins(no_hub, tmp_path, monkeypatch):
    # A directory named like a zoo model, given as a path (absolute and relative).
    (tmp_path / "llava-v1.5-7b").symlink_to(DEMO, target_is_directory=True)
    assert locate(str(tmp_path / "llava-v1.5-7b")) == tmp_path / "llava-v1.5-7b"
    monkeypatch.chdir(tmp_path)
    assert locate("llava-v1.5-7b") == Path("llava-v1.5-7b")
    model = shortv.load(tmp_path / "llava-v1.5-7b", device="cpu")
    assert model.num_layers == 8  # the demo's weights, not a download of the 7B


def test_shortv_weights_store_comes_first(no_hub, tmp_path, monkeypatch):
    store = tmp_path / "store"
    store.mkdir()
    (store / "llava-tiny-demo").symlink_to(DEMO, target_is_directory=True)
    (store / "llava-v1.5-7b").symlink_to(DEMO, target_is_directory=True)
    (store / "someorg--some-llava").symlink_to(DEMO, target_is_directory=True)
    monkeypatch.setenv("SHORTV_WEIGHTS", str(store))
    assert locate("llava-tiny-demo") == store / "llava-tiny-demo"  # before the repo's weights/
    assert locate("llava-v1.5-7b") == store / "llava-v1.5-7b"  # before the Hub
    assert locate("someorg/some-llava") == store / "someorg--some-llava"  # a repo id
    model = shortv.load("llava-tiny-demo", device="cpu")
    assert model.checkpoint_dir == store / "llava-tiny-demo"


def test_unknown_name_offline(empty_hf):
    with pytest.raises(ModelNotFoundError) as info:
        shortv.load("no-such-model")
    message = str(info.value)
    assert "no-such-model" in message
    assert str(REPO / "weights" / "no-such-model") in message  # where it looked
    assert "shortv zoo" in message


def test_unknown_repo_id_offline(empty_hf):
    with pytest.raises(ModelNotFoundError) as info:
        shortv.load("someorg/no-such-llava")
    message = str(info.value)
    assert "someorg/no-such-llava" in message and "offline" in message
    assert str(REPO / "weights" / "someorg--no-such-llava") in message
    assert "cache" in message and "download" in message
    assert "\n" not in message


def test_zoo_model_not_downloaded_offline(empty_hf):
    with pytest.raises(ModelNotFoundError) as info:
        shortv.load("llava-v1.5-7b")
    message = str(info.value)
    assert "llava-v1.5-7b" in message and "liuhaotian/llava-v1.5-7b" in message
    assert str(REPO / "weights" / "llava-v1.5-7b") in message
    assert "offline" in message and "download" in message


def test_download_hint_names_the_shortv_command(empty_hf):
    """The hint must work from a wheel too, which ships no scripts/: `shortv download NAME`."""
    with pytest.raises(ModelNotFoundError) as info:
        shortv.load("llava-v1.5-7b")
    message = str(info.value)
    assert "`shortv download llava-v1.5-7b`" in message
    assert ".py" not in message.replace("llava-v1.5-7b", "")
    assert str(empty_hf / "hub") in message  # the HF cache actually in use


# ---- the wheel ------------------------------------------------------------------------------


def _pip(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    return subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from the repo (offline with --no-build-isolation when hatchling is
    installed; otherwise pip fetches hatchling into an isolated build environment)."""
    out = tmp_path_factory.mktemp("wheel")
    offline_build = importlib.util.find_spec("hatchling") is not None
    args = ["wheel", "--no-deps", "-q", "-w", str(out), str(REPO)]
    if offline_build:
        args.insert(1, "--no-build-isolation")
    done = _pip(*args, cwd=out)
    if done.returncode != 0:
        unreachable = ("matching distribution found for hatchling", "satisfies the requirement hatchling",
                       "new connection", "network is unreachable", "name resolution")
        if not offline_build and any(u in done.stderr.lower() for u in unreachable):
            pytest.skip("building the wheel needs hatchling: `pip install hatchling` (or network); "
                        f"pip said: {done.stderr.strip().splitlines()[-1:]}")
        pytest.fail(f"pip wheel failed:\n{done.stdout}\n{done.stderr}")
    (built,) = out.glob("shortv-*.whl")
    return built


def test_wheel_carries_cards_and_demo_weights(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    cards = {n for n in names if n.startswith("shortv/_data/models/") and n.endswith(".toml")}
    assert cards == {f"shortv/_data/models/{p.name}" for p in (REPO / "models").glob("*.toml")}
    for f in DEMO.rglob("*"):
        if f.is_file():
            assert f"shortv/_data/weights/llava-tiny-demo/{f.relative_to(DEMO).as_posix()}" in names
    assert "shortv/__init__.py" in names and {"shortv/cli.py", "shortv/cli/__init__.py"} & names
    assert not any(n.startswith(("tests/", "weights/", "models/")) for n in names)


def test_installed_wheel_finds_cards_and_demo(wheel, tmp_path):
    """Installed away from the repo, the package alone loads the demo and lists the zoo."""
    target = tmp_path / "site"
    done = _pip("install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheel),
                cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    work = tmp_path / "elsewhere"
    work.mkdir()
    script = (
        "import json, shortv\n"
        "m = shortv.load('llava-tiny-demo', device='cpu')\n"
        "print(json.dumps({'file': shortv.__file__, 'name': m.name, 'dir': str(m.checkpoint_dir),"
        " 'cards': [c.name for c in shortv.zoo.cards()],"
        " 'answer': m.chat('Hi', max_new_tokens=3)}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}
    env.pop("SHORTV_WEIGHTS", None)
    run = subprocess.run([sys.executable, "-c", script], cwd=work, env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert Path(report["file"]).is_relative_to(target)
    assert report["name"] == "llava-tiny-demo"
    assert Path(report["dir"]).is_relative_to(target / "shortv" / "_data" / "weights")
    assert sorted(report["cards"]) == sorted(p.stem for p in (REPO / "models").glob("*.toml"))
    assert isinstance(report["answer"], str)
