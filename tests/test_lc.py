"""Layer Contribution (docs/design.md §7) against brute force, reports, calibration data, and the
`shortv lc` command line.

The brute-force reference is independent of shortv's LC and frozen paths: for each layer i
and token type τ, a full VANILLA forward with a forward hook on layer i that resets the τ
rows of its output to its input (its attention and MLP updates removed for τ), then
KL(Q ‖ P) = Σ Q (log Q − log P) at the last position, written out here. float64 model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import shortv
from shortv import IMAGE_TOKEN, InputError, TokenType
from shortv.errors import ConfigError
from shortv.lc import LCReport, Sample, layer_contribution, read_samples
from shortv.store import locate

from .reference import kl_q_p, last_logits

DEMO = "llava-tiny-demo"
T_, V_, P_ = int(TokenType.TEXT), int(TokenType.VISUAL), int(TokenType.PAD)
REPO = Path(shortv.__file__).resolve().parents[1]
EXAMPLE = locate(DEMO) / "example.png"


def noise_png(path: Path, width: int, height: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB").save(path)
    return path


CALIBRATION = [
    {"image": str(EXAMPLE), "prompt": "What is in the image?"},
    {"image": ["a.png", "b.png"], "prompt": "Compare the two pictures: which one is brighter?"},
    {"image": "b.png", "prompt": "Describe the colors in detail."},
    {"image": ["a.png"], "prompt": "Is there a cat <image> here?"},
]


@pytest.fixture(scope="module")
def calib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A calibration JSONL: the demo's example image (absolute path), generated PNGs
    (relative paths), a two-image sample and a blank line."""
    d = tmp_path_factory.mktemp("calib")
    noise_png(d / "a.png", 70, 50, 1)
    noise_png(d / "b.png", 40, 64, 2)
    lines = [json.dumps(r) for r in CALIBRATION]
    lines.insert(2, "")
    (d / "calib.jsonl").write_text("\n".join(lines) + "\n")
    return d / "calib.jsonl"


@pytest.fixture(scope="module")
def model64() -> shortv.LLaVA:
    model = shortv.load(DEMO, device="cpu", dtype=torch.float64)
    assert model.dtype == torch.float64 and model.num_layers == 8
    return model


# ---- the brute-force reference --------------------------------------------------------------


def types_from_ids(model: shortv.LLaVA, enc: shortv.Encoded) -> torch.Tensor:
    v = model.config.vision
    n = (v.image_size // v.patch_size) ** 2
    out: list[int] = []
    for t in enc.input_ids.tolist():
        out += [V_] * n if t == IMAGE_TOKEN else [T_]
    return torch.tensor([out])


def brute_force_lc(model: shortv.LLaVA, encoded: list[shortv.Encoded]) -> dict[str, list[float]]:
    n_layers = model.num_layers
    totals = {"visual": [0.0] * n_layers, "text": [0.0] * n_layers}
    for enc in encoded:
        prepared = model.prepare([enc])
        types = types_from_ids(model, enc)
        assert torch.equal(prepared.types.long(), types)
        assert types[0, -1] == T_
        p = last_logits(model, prepared, {})
        for name, kind in (("visual", V_), ("text", T_)):
            for i in range(n_layers):
                q = last_logits(model, prepared, {i: types == kind})
                totals[name][i] += kl_q_p(q, p)
    return {k: [v / len(encoded) for v in vals] for k, vals in totals.items()}


@pytest.fixture(scope="module")
def samples(calib: Path):
    return read_samples(calib)


@pytest.fixture(scope="module")
def encoded(model64, samples):
    return [model64.encode(s.prompt, list(s.images)) for s in samples]


@pytest.fixture(scope="module")
def reference(model64, encoded) -> dict[str, list[float]]:
    return brute_force_lc(model64, encoded)


@pytest.fixture(scope="module")
def report(model64, samples) -> LCReport:
    return layer_contribution(model64, samples, progress=False)


def assert_lc_close(actual: list[float], expected: list[float], rtol: float = 1e-6, atol: float = 1e-13):
    assert len(actual) == len(expected)
    torch.testing.assert_close(torch.tensor(actual, dtype=torch.float64),
                               torch.tensor(expected, dtype=torch.float64), rtol=rtol, atol=atol)


# ---- 1. LC == brute force ---------------------------------------------------------------------


def test_samples_cover_two_images(encoded):
    counts = [int((e.input_ids == IMAGE_TOKEN).sum()) for e in encoded]
    assert len(encoded) >= 3 and 2 in counts


def test_lc_equals_brute_force(report, reference):
    assert report.samples == 4 and report.model == DEMO
    assert_lc_close(report.visual, reference["visual"])
    assert_lc_close(report.text, reference["text"])
    # non-vacuous: values span orders of magnitude above the absolute tolerance
    assert max(reference["visual"]) > 1e-6 and max(reference["text"]) > 1e-3


def test_lc_accepts_encoded_inputs(model64, encoded, reference):
    rep = layer_contribution(model64, encoded, progress=False)
    assert_lc_close(rep.visual, reference["visual"])
    assert_lc_close(rep.text, reference["text"])


def test_lc_one_type(model64, encoded, reference):
    rep = layer_contribution(model64, encoded[:3], tokens=("visual",), progress=False)
    assert rep.text is None
    three = brute_force_lc(model64, encoded[:3])
    assert_lc_close(rep.visual, three["visual"])


def test_naive_layer_contribution_agrees(model64, encoded, reference):
    """The benchmark's baseline (scripts/naive_lc.py) is right too."""
    sys.path.insert(0, str(REPO / "scripts"))
    from naive_lc import naive_layer_contribution

    rep = naive_layer_contribution(model64, encoded)
    assert_lc_close(rep.visual, reference["visual"])
    assert_lc_close(rep.text, reference["text"])


@pytest.mark.parametrize("batch_size", [2, 3])
def test_batched_lc_equals_unbatched(model64, samples, report, batch_size):
    """Left-padded batches (samples of different lengths and image counts) give the same LC."""
    rep = layer_contribution(model64, samples, batch_size=batch_size, progress=False)
    assert_lc_close(rep.visual, report.visual)
    assert_lc_close(rep.text, report.text)


def test_lc_argument_errors(model64, encoded):
    with pytest.raises(ConfigError):
        layer_contribution(model64, encoded[:1], tokens=("audio",), progress=False)
    with pytest.raises(ConfigError):
        layer_contribution(model64, encoded[:1], tokens=(), progress=False)
    with pytest.raises(ConfigError):
        layer_contribution(model64, encoded[:1], batch_size=0, progress=False)
    with pytest.raises(InputError):
        layer_contribution(model64, [], progress=False)


# ---- 2. sanity ---------------------------------------------------------------------------------


def test_lc_sanity(report, reference):
    n = 8
    assert len(report.visual) == len(report.text) == n
    # The last position is text, so removing visual updates in the last layer changes
    # nothing there: exactly 0 by brute force, 0 up to float64 rounding in the library.
    assert reference["visual"][-1] == 0.0
    assert abs(report.visual[-1]) < 1e-12
    assert all(v > -1e-12 for v in report.visual + report.text)  # KL >= 0
    assert sum(t > 0 for t in report.text) >= n - 1
    assert sum(v > 0 for v in report.visual[:-1]) >= n - 2


# ---- 3. ranking and reports ----------------------------------------------------------------------


def test_ranking_ascending_visual_ties_by_id():
    rep = LCReport(model="m", samples=2, visual=[0.5, 0.1, 0.1, 0.0, 0.5, 0.1],
                   text=[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    assert rep.ranking == [3, 1, 2, 5, 0, 4]
    d = rep.to_dict()
    assert {"visual", "text", "ranking", "ranking_str", "samples", "model"} <= set(d)
    assert d["ranking_str"] == "3,1,2,5,0,4"
    assert d["ranking"] == [3, 1, 2, 5, 0, 4]
    with pytest.raises(ConfigError):
        _ = LCReport(model="m", samples=1, text=[1.0]).ranking


def test_report_ranking_matches_lc(report):
    order = report.ranking
    assert sorted(order) == list(range(8))
    values = [report.visual[i] for i in order]
    assert values == sorted(values)


def test_report_round_trip(report, tmp_path):
    path = tmp_path / "report.json"
    report.save(path)
    loaded = LCReport.load(path)
    assert loaded.visual == report.visual and loaded.text == report.text  # exact floats
    assert loaded.model == report.model and loaded.samples == report.samples
    assert loaded.ranking == report.ranking
    on_disk = json.loads(path.read_text())
    assert on_disk["ranking_str"] == ",".join(map(str, report.ranking))
    assert on_disk["ranking"] == report.ranking
    (tmp_path / "broken.json").write_text("{}")
    with pytest.raises(ConfigError):
        LCReport.load(tmp_path / "broken.json")


def test_load_freezes_first_n_of_report_ranking(report, tmp_path):
    path = tmp_path / "report.json"
    report.save(path)
    model = shortv.load(DEMO, n_frozen=3, ranking=path)
    assert model.frozen_layers == tuple(sorted(report.ranking[:3]))
    tied = LCReport(model="m", samples=1, visual=[0.3, 0.1, 0.1, 0.0, 0.2, 0.2, 0.2, 0.9])
    tied.save(path)
    assert shortv.load(DEMO, n_frozen=3, ranking=path).frozen_layers == (1, 2, 3)
    assert shortv.load(DEMO, n_frozen=5, ranking=str(path)).frozen_layers == (1, 2, 3, 4, 5)


# ---- 4. calibration files -------------------------------------------------------------------------


def test_read_samples(calib, samples):
    assert len(samples) == 4
    d = calib.parent
    assert samples[0].images == (EXAMPLE,)
    assert samples[1].images == (d / "a.png", d / "b.png")
    assert samples[2].images == (d / "b.png",)  # relative to the file, after a blank line
    assert [s.prompt for s in samples] == [r["prompt"] for r in CALIBRATION]
    assert samples[2].where.endswith("calib.jsonl:4")
    assert len(read_samples(calib, limit=2)) == 2


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def bad_files(directory: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, text the error must contain)."""
    good = json.dumps({"image": str(EXAMPLE), "prompt": "ok"})
    return {
        "missing-image": (write_lines(directory / "missing.jsonl", [
            good, json.dumps({"image": "nope.png", "prompt": "where?"})]), "missing.jsonl:2"),
        "bad-json": (write_lines(directory / "badjson.jsonl", [
            good, "", '{"image": "x.png", "prompt": '
        ]), "badjson.jsonl:3"),
        "no-prompt": (write_lines(directory / "noprompt.jsonl", [
            json.dumps({"image": str(EXAMPLE)})]), "noprompt.jsonl:1"),
        "bad-image-field": (write_lines(directory / "badimage.jsonl", [
            good, good, json.dumps({"image": 3, "prompt": "x"})]), "badimage.jsonl:3"),
        "no-image-key": (write_lines(directory / "noimage.jsonl", [
            good, json.dumps({"prompt": "Say hello."})]), "noimage.jsonl:2"),
        "empty-image-list": (write_lines(directory / "emptylist.jsonl", [
            json.dumps({"image": [], "prompt": "x"})]), "emptylist.jsonl:1"),
        "unknown-key": (write_lines(directory / "unknown.jsonl", [
            good, json.dumps({"img": str(EXAMPLE), "prompt": "x"})]), "unknown.jsonl:2"),
        "empty": (write_lines(directory / "empty.jsonl", []), "empty.jsonl"),
        "blank": (write_lines(directory / "blank.jsonl", ["", "   "]), "blank.jsonl"),
    }


@pytest.mark.parametrize("case", ["missing-image", "bad-json", "no-prompt", "bad-image-field",
                                  "no-image-key", "empty-image-list", "unknown-key", "empty", "blank"])
def test_read_samples_errors_name_the_line(tmp_path, case):
    path, where = bad_files(tmp_path)[case]
    with pytest.raises(InputError) as err:
        read_samples(path)
    assert where in str(err.value)
    assert "\n" not in str(err.value)
    if case == "missing-image":
        assert "nope.png" in str(err.value)
    if case == "unknown-key":
        assert "'img'" in str(err.value)


@pytest.mark.parametrize("sample", [
    {"prompt": "Say hello."},
    {"image": [], "prompt": "Say hello."},
    {"img": str(EXAMPLE), "prompt": "Say hello."},
    Sample("Say hello."),
])
def test_api_samples_without_images_are_refused(model64, sample):
    with pytest.raises(InputError, match="sample 1"):
        layer_contribution(model64, [sample], progress=False)


def test_encoded_sample_without_images_is_refused(model64):
    enc = model64.encode("Say hello.")
    with pytest.raises(InputError, match="no image"):
        layer_contribution(model64, [enc], progress=False)


def test_noise_level_lc_is_flagged():
    """A report whose visual LC is rounding noise says so; a real one does not."""
    noise = LCReport(model="m", samples=1, visual=[1e-15, -1e-15, 0.0, 3e-16])
    real = LCReport(model="m", samples=1, visual=[1e-15, 2e-3, 0.0, 3e-16])
    assert noise.visual_is_noise and noise.to_dict()["visual_is_noise"] is True
    assert not real.visual_is_noise


def test_report_from_another_model(tmp_path):
    """Freezing with a report measured on a model with another layer count is refused; one
    measured on a model of another name (same depth) warns and is used."""
    deeper = LCReport(model=DEMO, samples=1, visual=[0.1 * i for i in range(12)])
    deeper.save(tmp_path / "deeper.json")
    with pytest.raises(ConfigError, match="12 layers"):
        shortv.load(DEMO, n_frozen=2, ranking=tmp_path / "deeper.json")
    other = LCReport(model="someone/other-llava", samples=1, visual=[0.8 - 0.1 * i for i in range(8)])
    other.save(tmp_path / "other.json")
    with pytest.warns(UserWarning, match="other-llava"):
        model = shortv.load(DEMO, n_frozen=2, ranking=tmp_path / "other.json")
    assert model.frozen_layers == (6, 7)


def test_read_samples_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_samples(tmp_path / "absent.jsonl")


# ---- 5. the command line ----------------------------------------------------------------------------


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("SHORTV_DEBUG", None)
    return env


def run_all(commands: dict[str, list[str]], cwd: Path) -> dict[str, subprocess.CompletedProcess]:
    """Run several commands at once (they are dominated by interpreter start-up)."""
    procs = {name: subprocess.Popen(cmd, cwd=cwd, env=cli_env(), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
             for name, cmd in commands.items()}
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        out[name] = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    return out


SHORTV = [sys.executable, "-m", "shortv"]


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_cli(calib, tmp_path, reference):
    bad = bad_files(tmp_path)
    no_matplotlib = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from shortv.cli import main\n"
        f"sys.exit(main(['lc', {DEMO!r}, '--data', {str(calib)!r}, '--quiet', "
        f"'--plot', {str(tmp_path / 'none.png')!r}]))\n"
    )
    lc = [*SHORTV, "lc", DEMO, "--data"]
    results = run_all({
        "lc": [*lc, str(calib), "--out", "r.json", "--json", "--quiet", "--plot", "lc.png"],
        "no-matplotlib": [sys.executable, "-c", no_matplotlib],
        **{name: [*lc, str(bad[name][0]), "--json", "--quiet"]
           for name in ("missing-image", "bad-json", "empty")},
    }, cwd=tmp_path)

    ok = results["lc"]
    assert ok.returncode == 0, ok.stderr
    printed = json.loads(ok.stdout)  # one JSON object, nothing else on stdout
    assert len(printed["visual"]) == len(printed["text"]) == 8
    assert sorted(printed["ranking"]) == list(range(8))
    assert printed["ranking_str"] == ",".join(map(str, printed["ranking"]))
    assert printed["samples"] == 4 and printed["model"] == DEMO
    assert json.loads((tmp_path / "r.json").read_text()) == printed
    # the fp32 command line agrees with the float64 brute force
    assert_lc_close(printed["visual"], reference["visual"], rtol=1e-2, atol=1e-7)
    assert_lc_close(printed["text"], reference["text"], rtol=1e-2, atol=1e-7)
    assert (tmp_path / "lc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "plot written to lc.png" in ok.stderr  # stdout is the JSON alone

    assert_one_line_error(results["no-matplotlib"], "matplotlib", "pip install")
    assert not (tmp_path / "none.png").exists()
    assert_one_line_error(results["missing-image"], "missing.jsonl:2", "nope.png")
    assert_one_line_error(results["bad-json"], "badjson.jsonl:3")
    assert_one_line_error(results["empty"], "empty.jsonl")

    chat = [*SHORTV, "chat", "--model", DEMO, "--prompt", "hi", "--max-new-tokens", "3"]
    results = run_all({
        "chat": [*chat, "--ranking", "r.json", "--n-frozen", "3"],
        # The demo's directory, not its zoo name: no card, so no ranking to fall back on.
        "chat-no-ranking": [*SHORTV, "chat", "--model", str(locate(DEMO)), "--prompt", "hi",
                            "--max-new-tokens", "3", "--n-frozen", "3"],
    }, cwd=tmp_path)
    assert results["chat"].returncode == 0, results["chat"].stderr
    assert "Traceback" not in results["chat"].stderr
    assert_one_line_error(results["chat-no-ranking"], "ranking")


def test_cli_table_says_where_the_plot_went(calib, tmp_path, capsys):
    from shortv.cli import main

    plot = tmp_path / "lc.png"
    assert main(["lc", DEMO, "--data", str(calib), "--limit", "1", "--quiet", "--plot", str(plot)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"plot written to {plot}"
    assert plot.read_bytes()[:4] == b"\x89PNG"
    # `shortv lc` takes no --ranking: it computes the ranking.
    with pytest.raises(SystemExit):
        main(["lc", DEMO, "--data", str(calib), "--ranking", "r.json"])


def test_demo_cards_ranking_is_lc_on_the_scenes_it_names():
    """The demo card's ranking is what LC gives on the 40 held-out scenes that
    scripts/make_demo.py calibrates on (its provenance says so)."""
    sys.path.insert(0, str(REPO / "scripts"))
    import make_demo

    model = shortv.load(DEMO, device="cpu")
    samples = [Sample(q, (image,), f"calibration {i}")
               for i, (image, q, _) in enumerate(make_demo.held_out(40, seed=7))]
    report = layer_contribution(model, samples, tokens=("visual",), progress=False)
    card = shortv.zoo.get_card(DEMO)
    assert tuple(report.ranking) == card.ranking
    assert "40 held-out synthetic scenes" in card.ranking_source
