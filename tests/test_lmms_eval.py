"""lmms-eval's `--model shortv` (shortv/eval/lmms.py) on the embedded demo.

End to end, `python -m lmms_eval` runs a task that the test writes (a JSON-lines data set
with image files, loaded offline by `dataset_path: json`) and its logged answers must be
the answers shortv gives directly: vanilla in one process, ShortV in two processes under
torchrun (lmms-eval's data parallelism), where `cal_lc` must also write the Layer
Contribution report of `shortv lc` on the same prompts. loglikelihood, the model_args and
the request plumbing are checked in-process on requests built as lmms-eval builds them
(test_lmms_loglikelihood.py runs loglikelihood tasks through lmms-eval's CLI).

lmms-eval comes with the `eval` extra (CI installs it through the `test` extra); without it
these tests fail rather than skip, so a missing extra is never mistaken for a pass.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

import shortv
from shortv import IMAGE_PLACEHOLDER, InputError, ShortVError

from .data import held_out
from .lmms_tasks import assert_same_report
from .reference import reference_loglikelihood

REPO = Path(__file__).resolve().parents[1]
DEMO = "llava-tiny-demo"
GEN_TASK = "shortv_test_shapes"
N_DOCS = 6
MAX_NEW_TOKENS = 24  # the demo's longest answers are ~16 tokens

try:
    from lmms_eval.api.instance import Instance

    from shortv.eval.lmms import BadModelArgs, ShortVLMM, generation_options
except ImportError as e:  # pragma: no cover - reported by the autouse fixture below
    MISSING = (f"lmms-eval is not importable ({e}); install the eval extra: "
               f"pip install -e '.[eval]' (the test extra includes it)")
else:
    MISSING = None


# Module scope: it runs before the module's other fixtures (which start lmms-eval runs).
@pytest.fixture(scope="module", autouse=True)
def _lmms_eval_installed() -> None:
    if MISSING:
        pytest.fail(MISSING, pytrace=False)


# ---- the task, written for lmms-eval --------------------------------------------------------

UTILS = '''\
"""doc_to_visual / doc_to_text of the test task (lmms-eval imports this by path)."""
import os
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent


def doc_to_visual(doc):
    # Which process asked for which document: the data-parallel test reads these files.
    run, rank = os.environ.get("SHORTV_TEST_RUN", "run"), os.environ.get("RANK", "0")
    with open(HERE / f"visits-{run}-{rank}.txt", "a") as f:
        f.write(f"{doc['id']}\\n")
    return [Image.open(HERE / doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]
'''


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generate_until task of N_DOCS held-out scenes: images as files, a JSON-lines data
    file, the task yaml and its utils.py."""
    folder = tmp_path_factory.mktemp("lmms-task")
    (folder / "images").mkdir()
    rows = []
    for i, (image, question, answer) in enumerate(held_out(N_DOCS, seed=11)):
        image.save(folder / "images" / f"{i}.png")
        rows.append({"id": i, "image": f"images/{i}.png", "question": question, "answer": answer})
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "utils.py").write_text(UTILS)
    (folder / f"{GEN_TASK}.yaml").write_text(textwrap.dedent(f"""\
        task: {GEN_TASK}
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        output_type: generate_until
        doc_to_visual: !function utils.doc_to_visual
        doc_to_text: !function utils.doc_to_text
        doc_to_target: answer
        generation_kwargs:
          max_new_tokens: {MAX_NEW_TOKENS}
          temperature: 0
          top_p: 1.0
          num_beams: 1
          do_sample: false
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
        """))
    return folder


def docs(task_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (task_dir / "docs.jsonl").read_text().splitlines()]


def lmms_eval_command(model_args: str, task_dir: Path, out: Path, batch_size: int) -> list[str]:
    return ["-m", "lmms_eval", "--model", "shortv", "--model_args", model_args,
            "--tasks", GEN_TASK, "--include_path", str(task_dir), "--batch_size", str(batch_size),
            "--log_samples", "--output_path", str(out)]


@pytest.fixture(scope="module")
def runs(task_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Two lmms-eval runs, side by side: vanilla in one process (batches of 4), and ShortV
    (n_frozen=4, float64, cal_lc) in two torchrun processes (batches of 2). Per run: the
    logged samples, which documents each process visited, the output and the LC report."""
    scratch = tmp_path_factory.mktemp("lmms-runs")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_HOME": str(scratch / "hf-home"),
           "HF_DATASETS_CACHE": str(scratch / "hf-datasets")}
    commands = {
        "vanilla": [sys.executable, *lmms_eval_command(
            f"pretrained={DEMO},device=cpu", task_dir, scratch / "vanilla", 4)],
        "shortv": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc_per_node", "2", *lmms_eval_command(
                       f"pretrained={DEMO},n_frozen=4,device=cpu,dtype=float64,"
                       f"cal_lc={scratch / 'lc.json'}", task_dir, scratch / "shortv", 2)],
    }
    procs = {name: subprocess.Popen(cmd, cwd=scratch, env={**env, "SHORTV_TEST_RUN": name},
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, cmd in commands.items()}
    out = {}
    for name, proc in procs.items():
        output, _ = proc.communicate(timeout=600)
        # lmms-eval reports a failed evaluation in its log and still exits 0: look for the
        # samples it writes at the end instead.
        samples = sorted((scratch / name).glob(f"**/*_samples_{GEN_TASK}.jsonl"))
        assert proc.returncode == 0 and samples, f"lmms-eval run {name} failed:\n{output[-6000:]}"
        visits = {int(p.stem.rsplit("-", 1)[1]): [int(x) for x in p.read_text().split()]
                  for p in task_dir.glob(f"visits-{name}-*.txt")}
        out[name] = {"samples": [json.loads(line) for line in samples[0].read_text().splitlines()],
                     "visits": visits, "output": output, "report": scratch / "lc.json"}
    return out


def logged_answers(run: dict[str, Any]) -> dict[int, str]:
    answers = {}
    for sample in run["samples"]:
        resp = sample["filtered_resps"]
        answers[sample["doc_id"]] = resp[0] if isinstance(resp, list) else resp
    return answers


@pytest.fixture(scope="module")
def demo() -> shortv.LLaVA:
    return shortv.load(DEMO, device="cpu")


def test_vanilla_run_logs_the_answers_of_model_chat(runs, task_dir: Path, demo: shortv.LLaVA) -> None:
    rows = docs(task_dir)
    expected = {r["id"]: demo.chat(r["question"], [task_dir / r["image"]],
                                   max_new_tokens=MAX_NEW_TOKENS) for r in rows}
    run = runs["vanilla"]
    assert logged_answers(run) == expected
    for sample in run["samples"]:  # lmms-eval's own record of what it asked
        row = rows[sample["doc_id"]]
        assert (sample["input"], sample["target"]) == (row["question"], row["answer"])
    assert sorted(run["visits"]) == [0]  # one process saw every document once
    assert sorted(run["visits"][0]) == list(range(N_DOCS))


def test_shortv_run_in_two_processes_logs_the_answers_of_shortv(runs, task_dir: Path) -> None:
    model = shortv.load(DEMO, n_frozen=4, device="cpu", dtype=torch.float64)
    assert model.frozen_layers and len(model.frozen_layers) == 4
    rows = docs(task_dir)
    expected = model.generate([r["question"] for r in rows], [[task_dir / r["image"]] for r in rows],
                              max_new_tokens=MAX_NEW_TOKENS)
    run = runs["shortv"]
    assert logged_answers(run) == {r["id"]: e.text for r, e in zip(rows, expected, strict=True)}
    # Data parallel: each process loaded its model and answered its own share; the shares
    # are disjoint and cover the task, and rank 0 wrote all of them.
    visits = run["visits"]
    assert sorted(visits) == [0, 1], run["output"][-3000:]
    assert all(visits.values())
    assert sorted(visits[0] + visits[1]) == list(range(N_DOCS))
    assert "2 process(es)" in run["output"]


def test_cal_lc_in_two_processes_writes_the_report_of_shortv_lc(runs, task_dir: Path, tmp_path: Path) -> None:
    # The ranks' shares are summed: the report covers every document once, measured on the
    # unmodified model although ShortV answers, as `shortv lc` measures the same prompts.
    from shortv.cli import main

    calibration = tmp_path / "calib.jsonl"
    calibration.write_text("".join(json.dumps({"image": str(task_dir / r["image"]), "prompt": r["question"]})
                                   + "\n" for r in docs(task_dir)))
    assert main(["lc", DEMO, "--data", str(calibration), "--dtype", "float64", "--device", "cpu",
                 "--quiet", "--out", str(tmp_path / "lc.json")]) == 0
    got = json.loads(runs["shortv"]["report"].read_text())
    assert_same_report(got, json.loads((tmp_path / "lc.json").read_text()))
    assert got["samples"] == N_DOCS


# ---- in process: requests as lmms-eval builds them --------------------------------------------

TASK, SPLIT = "shapes", "test"


@pytest.fixture(scope="module")
def lm() -> ShortVLMM:
    return ShortVLMM.create_from_arg_string(f"pretrained={DEMO},device=cpu",
                                            {"batch_size": 2, "device": None})


def image_doc(image: Image.Image) -> list[Image.Image]:
    return [image]


def instance(request_type: str, arguments: tuple, doc_id: int, idx: int = 0) -> Instance:
    return Instance(request_type=request_type, arguments=arguments, idx=idx,
                    metadata={"task": TASK, "doc_id": doc_id, "repeats": 1})


def doc_image(doc: dict[str, Any]) -> Image.Image:
    return doc["image"]


def colour_items(demo: shortv.LLaVA, n: int) -> list[tuple[Image.Image, str, list[str], int]]:
    """Multiple-choice colour questions the demo answers right: (image, question, the six
    "The SHAPE is COLOUR." choices, index of the true one)."""
    sys.path.insert(0, str(REPO / "scripts"))
    import make_demo

    items = []
    for image, question, answer in held_out(80, seed=12):
        if not question.startswith("What colour") or demo.chat(question, [image]) != answer:
            continue
        shape = question.removeprefix("What colour is the ").rstrip("?")
        choices = [f"The {shape} is {colour}." for colour in make_demo.COLOURS]
        items.append((image, question, choices, choices.index(answer)))
        if len(items) == n:
            break
    assert len(items) == n, "too few colour questions that the demo answers right"
    return items


def pairs(results: list) -> list[tuple[float, bool]]:
    """The (loss, greedy) pairs of loglikelihood results: each in a GenerationResult, the
    one kind of result that lmms-eval 0.7.3's evaluator passes on unchanged."""
    from lmms_eval.api.instance import unwrap_generation_output

    out = []
    for result in results:
        pair, _ = unwrap_generation_output(result)
        assert isinstance(pair, tuple), pair
        out.append(pair)
    return out


def test_loglikelihood_ranks_the_true_answer_first_and_matches_logits(lm: ShortVLMM) -> None:
    items = colour_items(lm.model, 3)
    lm.task_dict = {TASK: {SPLIT: [{"image": image} for image, _, _, _ in items]}}
    # As lmms-eval's multiple_choice builds them: one request per choice, the continuation
    # after its target_delimiter " ".
    requests = [instance("loglikelihood", (question, f" {choice}", doc_image, d, TASK, SPLIT), d, i)
                for d, (_, question, choices, _) in enumerate(items) for i, choice in enumerate(choices)]
    results = pairs(lm.loglikelihood(requests))
    assert len(results) == len(requests)
    assert all(isinstance(v, float) and isinstance(g, bool) for v, g in results)
    k = len(items[0][2])
    for d, (image, question, choices, truth) in enumerate(items):
        scores = results[d * k:(d + 1) * k]
        losses = [v for v, _ in scores]
        # lmms-eval's multiple_choice takes the argmin
        assert min(range(k), key=losses.__getitem__) == truth, (question, choices, losses)
        assert [g for _, g in scores] == [i == truth for i in range(k)]
        for choice, (loss, greedy) in zip(choices, scores, strict=True):
            ref_value, ref_greedy = reference_loglikelihood(lm.model, question, image, f" {choice}")
            assert loss == pytest.approx(-ref_value, abs=1e-4)
            assert loss > 0 and greedy == ref_greedy


def test_loglikelihood_other_request_forms(lm: ShortVLMM) -> None:
    image, question, choices, truth = colour_items(lm.model, 1)[0]
    doc = {"image": image, "answer": choices[truth]}
    lm.task_dict = {TASK: {SPLIT: [doc]}}
    string, = pairs(lm.loglikelihood([instance("loglikelihood", (question, " " + doc["answer"], doc_image,
                                                                0, TASK, SPLIT), 0)]))

    class Task:  # output_type loglikelihood passes the task's doc_to_target method itself
        config = types.SimpleNamespace(target_delimiter=" ")

        def doc_to_target(self, d: dict[str, Any]) -> str:
            return d["answer"]

    target, = pairs(lm.loglikelihood([instance("loglikelihood", (question, Task().doc_to_target,
                                                                doc_image, 0, TASK, SPLIT), 0)]))
    assert target == string
    # acc_mutual_info passes ("", choice): no document, no image, an empty user turn.
    unconditional, = pairs(lm.loglikelihood([instance("loglikelihood", ("", " " + doc["answer"]), 0)]))
    assert unconditional[0] > 0
    with pytest.raises(InputError, match="non-empty string"):
        lm.loglikelihood([instance("loglikelihood", (question, "", doc_image, 0, TASK, SPLIT), 0)])


def test_generate_until_batches_like_model_generate(lm: ShortVLMM) -> None:
    scenes = held_out(5, seed=5)
    lm.task_dict = {TASK: {SPLIT: [{"image": image} for image, _, _ in scenes]}}
    greedy = {"max_new_tokens": MAX_NEW_TOKENS, "temperature": 0, "do_sample": False, "until": ["\n\n"]}
    short = {"max_new_tokens": 3, "until": "never"}
    kwargs = [greedy, short, greedy, greedy, short]  # two settings: two groups of batches
    requests = [instance("generate_until", (q, dict(kw), doc_image, d, TASK, SPLIT), d)
                for d, ((_, q, _), kw) in enumerate(zip(scenes, kwargs, strict=True))]
    got = lm.generate_until(requests)
    want = [lm.model.chat(q, [image], max_new_tokens=kw["max_new_tokens"])
            for (image, q, _), kw in zip(scenes, kwargs, strict=True)]
    assert got == want
    # A context that places the image itself is used as it is.
    placed = instance("generate_until", (f"{IMAGE_PLACEHOLDER}\n{scenes[0][1]}", dict(greedy), doc_image,
                                         0, TASK, SPLIT), 0)
    assert lm.generate_until([placed]) == [want[0]]


def test_generation_options_from_gen_kwargs() -> None:
    options = generation_options({"max_new_tokens": 16, "temperature": 0, "top_p": 0, "num_beams": 1,
                                  "do_sample": False, "until": ["\n\n", ""]})
    assert options == shortv.GenerationOptions(max_new_tokens=16, temperature=0.0, stop=("\n\n",))
    sampled = generation_options({"do_sample": True, "top_p": 0.9, "seed": 3, "until": "Q:"})
    assert (sampled.temperature, sampled.top_p, sampled.seed, sampled.stop) == (1.0, 0.9, 3, ("Q:",))
    assert generation_options({"temperature": 0.7, "do_sample": False}).temperature == 0
    assert generation_options(None) == shortv.GenerationOptions()
    with pytest.raises(InputError, match="num_beams"):
        generation_options({"num_beams": 4})
    with pytest.raises(InputError, match="temperature"):
        generation_options({"temperature": "hot"})
    with pytest.raises(InputError, match="until"):
        generation_options({"until": 3})


def test_multi_round_requests_are_refused_by_name(lm: ShortVLMM) -> None:
    with pytest.raises(InputError, match="generate_until_multi_round"):
        lm.generate_until_multi_round([])


# ---- model_args -------------------------------------------------------------------------------


def test_model_args_build_the_method_as_the_cli_does() -> None:
    make = ShortVLMM.create_from_arg_string
    # lmms-eval turns "5" into an int and leaves "5:2" a string.
    assert make(f"pretrained={DEMO},frozen_layers=5:2,device=cpu").model.frozen_layers == (2, 5)
    assert make(f"pretrained={DEMO},frozen_layers=3,device=cpu").model.frozen_layers == (3,)
    assert make(f'pretrained={DEMO},frozen_layers="[6,1]",device=cpu').model.frozen_layers == (1, 6)
    card = shortv.zoo.card(DEMO)
    paper = make(f"pretrained={DEMO},method=shortv,device=cpu").model
    assert paper.frozen_layers == tuple(sorted(card.ranking[:card.n_frozen]))
    fastv = make(f"pretrained={DEMO},method=fastv,k=1,r=0.25,device=cpu").model.method
    assert isinstance(fastv, shortv.FastV) and (fastv.k, fastv.r) == (1, 0.25)
    vtw = make(f"pretrained={DEMO},method=vtw,k=3,device=cpu").model.method
    assert isinstance(vtw, shortv.VTW) and vtw.k == 3
    lm = make(f"pretrained={DEMO},conv_template=plain,dtype=float64,batch_size=3",
              {"batch_size": "8", "max_batch_size": None, "device": "cpu"})
    assert (lm.model.template.name, lm.model.dtype, lm.batch_size) == ("plain", torch.float64, 3)
    assert (lm.rank, lm.world_size, lm.device.type) == (0, 1, "cpu")
    assert make(f"pretrained={DEMO}", {"batch_size": "8", "device": "cpu"}).batch_size == 8


@pytest.mark.parametrize(("args", "named"), [
    ("n_frozen=abc", "n_frozen"),
    ("n_frozen=-1", "n_frozen"),
    ("n_frozen=99", "n_frozen"),
    ("frozen_layers=1:x", "frozen_layers"),
    ("frozen_layers=1:99", "99"),
    ("method=bogus", "method"),
    ("method=fastv,n_frozen=2", "n_frozen"),
    ("k=2", "k/r are for method=fastv or vtw"),
    ("method=vtw,r=0.5", "r is for method=fastv"),
    ("method=fastv,r=2", "r"),
    ("dtype=fp8", "dtype"),
    ("device=tpu", "device"),
    ("conv_template=chatml", "conv_template"),
    ("batch_size=auto", "batch_size"),
    ("batch_size=0", "batch_size"),
    ("ranking=missing.json,n_frozen=2", "missing.json"),
    ("tempreature=0", "tempreature"),
])
def test_bad_model_args_are_one_clear_error(args: str, named: str) -> None:
    # Where lmms-eval makes the model: an exit with the message (lmms-eval swallows
    # Exceptions); the class itself raises the ShortVError.
    with pytest.raises(BadModelArgs, match=named.replace("?", r"\?")) as info:
        ShortVLMM.create_from_arg_string(f"pretrained={DEMO},{args}", {"batch_size": 1})
    assert "\n" not in str(info.value) and not isinstance(info.value, Exception)
    assert str(info.value).startswith("lmms-eval --model shortv: ")


def test_pretrained_is_required() -> None:
    with pytest.raises(BadModelArgs, match="pretrained"):
        ShortVLMM.create_from_arg_string("n_frozen=4", {"batch_size": 1})
    with pytest.raises(ShortVError, match="pretrained"):
        ShortVLMM(n_frozen=4)


def test_cal_lc_path_is_checked_before_the_load(tmp_path: Path) -> None:
    with pytest.raises(BadModelArgs, match=r"cal_lc=.*does not exist"):
        ShortVLMM.create_from_arg_string(f"pretrained={DEMO},cal_lc={tmp_path}/no/lc.json")


def test_conv_template_defaults_to_the_cards_and_takes_every_name() -> None:
    make = ShortVLMM.create_from_arg_string
    default = make(f"pretrained={DEMO},device=cpu").model.template
    assert default == shortv.load(DEMO, device="cpu").template
    assert default.name == shortv.zoo.card(DEMO).template
    for name in ("vicuna_v1", "v1", "llava_v1", "plain"):
        assert make(f"pretrained={DEMO},device=cpu,conv_template={name}").model.template == \
            shortv.get_template(name)


def test_docstring_lists_every_method_and_model_arg() -> None:
    import inspect

    from shortv.methods import METHODS

    doc = ShortVLMM.__doc__
    assert all(name in doc for name in METHODS)
    unused = {"self", "unknown", "max_batch_size"}
    for arg in set(inspect.signature(ShortVLMM.__init__).parameters) - unused:
        assert f"- {arg}:" in doc or f" {arg}:" in doc or f"{arg}," in doc, arg


# ---- registration -----------------------------------------------------------------------------


def test_lmms_eval_finds_the_model_through_its_entry_point() -> None:
    from importlib.metadata import entry_points

    (point,) = [ep for ep in entry_points(group="lmms_eval.models") if ep.name == "shortv"]
    assert point.value == "shortv.eval.lmms:manifest"
    # shortv.eval.lmms is imported already (above): lmms-eval's registry, initialised now,
    # must still register it.
    from lmms_eval.models import get_model

    assert get_model("shortv") is ShortVLMM
    assert ShortVLMM.is_simple
