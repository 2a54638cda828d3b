"""LLaVA's conversation templates under their own names, and which one each command uses.

The oracle is original LLaVA (haotian-liu/LLaVA): its templates' fields typed in from
llava/conversation.py, its Conversation.get_prompt written out again here, and its CLI's
template rule (llava/serve/cli.py, llava/eval/run_llava.py) as a table of model names with
the mode LLaVA picks for each, worked out by hand. Token ids: LLaVA's tokenizer_image_token
over transformers' slow Llama tokenizer (tests/reference.py).
"""

from __future__ import annotations

import functools
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import shortv
from shortv import ConfigError, zoo
from shortv.conversation import cli_template_name, get_template

from .cli_runner import run_main
from .reference import SlowLlamaTokenizer, llava_tokenize

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "weights" / "llava-tiny-demo"
IMAGE = DEMO / "example.png"
CPU = ["--device", "cpu", "--dtype", "float32"]
DEMO_ANSWER = "A red circle and a blue square."  # README's demo answer

# ---- LLaVA's templates, typed in from llava/conversation.py ------------------------------------

HUMAN = ("A chat between a curious human and an artificial intelligence assistant. "
         "The assistant gives helpful, detailed, and polite answers to the human's questions.")
LLAVA = {
    # name: (system, roles, sep_style, sep, sep2)
    "vicuna_v1": ("A chat between a curious user and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the user's questions.",
                  ("USER", "ASSISTANT"), "TWO", " ", "</s>"),
    "llava_v1": (HUMAN, ("USER", "ASSISTANT"), "TWO", " ", "</s>"),
    "llava_v0": (HUMAN, ("Human", "Assistant"), "SINGLE", "###", None),
    "llava_llama_2": ("You are a helpful language and vision assistant. You are able to understand "
                      "the visual content that the user provides, and assist the user with a variety "
                      "of tasks using natural language.",
                      ("USER", "ASSISTANT"), "LLAMA_2", "<s>", "</s>"),
    "mpt": ("<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. "
            "The assistant gives helpful and honest answers.",
            ("<|im_start|>user\n", "<|im_start|>assistant\n"), "MPT", "<|im_end|>", None),
}
LLAVA["v1"] = LLAVA["vicuna_v1"]  # conv_templates["v1"] is conv_vicuna_v1


def llava_get_prompt(name: str, turns: list[tuple[str, str | None]]) -> str:
    """Conversation.get_prompt of LLaVA's template `name` after append_message of each
    (user, reply) turn, the open reply None."""
    system, roles, style, sep, sep2 = LLAVA[name]
    messages = [(roles[i % 2], m) for turn in turns for i, m in enumerate(turn)]
    if style == "SINGLE":
        ret = system + sep
        for role, message in messages:
            ret += role + ": " + message + sep if message else role + ":"
    elif style == "TWO":
        seps = [sep, sep2]
        ret = system + seps[0]
        for i, (role, message) in enumerate(messages):
            ret += role + ": " + message + seps[i % 2] if message else role + ":"
    elif style == "MPT":
        ret = system + sep
        for role, message in messages:
            ret += role + message + sep if message else role
    else:  # LLAMA_2
        ret = ""
        for i, (_, message) in enumerate(messages):
            if message:
                if i == 0:
                    message = (f"<<SYS>>\n{system}\n<</SYS>>\n\n" if system else "") + message
                ret += sep + f"[INST] {message} [/INST]" if i % 2 == 0 else " " + message + " " + sep2
        ret = ret.lstrip(sep)
    return ret


CONVERSATIONS = {
    "one-image": [("<image>\nWhat is unusual about this image?", None)],
    "multi-turn": [("<image>\nWhat is it?", "A red car."), ("And the sky?", "Blue, clear."),
                   ("Anything else?", None)],
    "two-images": [("<image>\n<image>\nWhat differs?", None)],
    "text-only": [("hello there, what colour is the sky?", None)],
}


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("name", list(LLAVA))
def test_templates_render_as_llava(name, conversation):
    turns = CONVERSATIONS[conversation]
    assert get_template(name).render(turns) == llava_get_prompt(name, turns)


def test_vicuna_v1_and_llava_v1_differ_in_one_word():
    """The exact single-turn prompts (typed in), and `v1` is `vicuna_v1`."""
    turn = [("<image>\nWhat is it?", None)]
    assert get_template("vicuna_v1").render(turn) == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions. USER: <image>\nWhat is it? "
        "ASSISTANT:")
    assert get_template("llava_v1").render(turn) == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the human's questions. USER: <image>\n"
        "What is it? ASSISTANT:")
    assert get_template("v1") == get_template("vicuna_v1")
    assert get_template("llava_v0").render(turn) == HUMAN + "###Human: <image>\nWhat is it?###Assistant:"


def test_stop_strings_are_llavas():
    """LLaVA's CLI stops at sep2 for style TWO, else at sep."""
    stops = {name: get_template(name).stop_strings for name in LLAVA}
    assert stops == {"vicuna_v1": ("</s>",), "v1": ("</s>",), "llava_v1": ("</s>",),
                     "llava_v0": ("###",), "llava_llama_2": ("<s>",), "mpt": ("<|im_end|>",)}


def test_unknown_template_lists_the_names():
    with pytest.raises(ConfigError, match=r"llava_v1.*v1 \(= vicuna_v1\)"):
        get_template("vicuna_v2")


@pytest.fixture(scope="module")
def demo():
    return shortv.load("llava-tiny-demo", device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("name", ["vicuna_v1", "v1", "llava_v1"])
def test_token_ids_are_llavas(name):
    """encode = LLaVA's tokenizer_image_token of LLaVA's prompt (the CLI's `<image>\\n` first)."""
    reference = SlowLlamaTokenizer(DEMO / "tokenizer.model", legacy=False)
    model = shortv.load("llava-tiny-demo", device="cpu", template=name)
    history = [("What is it?", "A red car.")]
    encoded = model.encode("And the sky?", [IMAGE], history=history)
    prompt = llava_get_prompt(name, [("<image>\nWhat is it?", "A red car."), ("And the sky?", None)])
    assert encoded.prompt == prompt
    assert encoded.input_ids.tolist() == llava_tokenize(prompt, reference)


# ---- which template each entry point uses ------------------------------------------------------

# LLaVA's CLI: get_model_name_from_path (last path component; "parent_checkpoint-N" for a
# training checkpoint), lowercased, then "llama-2", "mistral", "v1.6-34b", "v1", "mpt", in order.
CLI_RULE = {
    "liuhaotian/llava-v1.5-7b": "llava_v1",
    "/models/llava-v1.5-13b/": "llava_v1",
    "liuhaotian/llava-v1.6-vicuna-13b": "llava_v1",
    "liuhaotian/llava-v1.6-mistral-7b": "mistral_instruct",  # "mistral" before "v1"
    "liuhaotian/llava-v1.6-34b": "chatml_direct",  # "v1.6-34b" before "v1"
    "LLaVA-V1.6-34B": "chatml_direct",  # lowercased first
    "liuhaotian/llava-llama-2-13b-chat-lightning-preview": "llava_llama_2",
    "llava-llama-2-7b-v1-mistral": "llava_llama_2",  # "llama-2" first of all
    "liuhaotian/LLaVA-Lightning-MPT-7B-preview": "mpt",
    "runs/llava-v1.5-7b-finetune/checkpoint-500": "llava_v1",  # "llava-v1.5-7b-finetune_checkpoint-500"
    "runs/llava-mpt/checkpoint-v1": "llava_v1",  # "llava-mpt_checkpoint-v1": "v1" before "mpt"
    "llava-hf/llava-1.5-7b-hf": "llava_v0",  # no "v1" in it
    "./my-llava": "llava_v0",
    "weights/llava-tiny-demo": "llava_v0",
}


@pytest.mark.parametrize("path", list(CLI_RULE))
def test_cli_rule_is_llavas(path):
    assert cli_template_name(path) == CLI_RULE[path]


def test_cards_name_their_templates():
    """The demo: the text it was trained with (scripts/make_demo.py); LLaVA-1.5 and
    NeXT-Vicuna: vicuna_v1, what LLaVA trained and evaluates them with."""
    assert zoo.get_card("llava-tiny-demo").template == "llava_v1"
    for name in ("llava-v1.5-7b", "llava-v1.5-13b", "llava-v1.6-vicuna-7b", "llava-v1.6-vicuna-13b"):
        assert zoo.get_card(name).template == "vicuna_v1", name


def test_a_card_must_name_its_template(tmp_path):
    text = (REPO / "models" / "llava-tiny-demo.toml").read_text()
    lines = [line for line in text.splitlines() if not line.startswith("template")]
    (tmp_path / "card.toml").write_text("\n".join(lines))
    with pytest.raises(ConfigError, match="template"):
        zoo.Card.from_toml(tmp_path / "card.toml")


def test_load_uses_the_card_else_vicuna_v1(demo, tmp_path):
    assert demo.template.name == "llava_v1"
    (tmp_path / "llava-v1.5-7b").symlink_to(DEMO, target_is_directory=True)
    assert shortv.load(tmp_path / "llava-v1.5-7b", device="cpu").template.name == "vicuna_v1"
    assert shortv.load("llava-tiny-demo", device="cpu", template="v1").template.name == "vicuna_v1"


def test_load_refuses_an_unknown_template_before_looking_for_weights(tmp_path):
    with pytest.raises(ConfigError, match="vicuna_v2"):
        shortv.load(str(tmp_path / "no-such-model"), template="vicuna_v2")


def chat_spy(monkeypatch) -> list:
    """The models `shortv chat` loads, in a list filled as it runs."""
    loaded = []
    real = shortv.load

    def load(*args, **kwargs):
        loaded.append(real(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(shortv, "load", load)
    return loaded


@pytest.mark.parametrize(("model", "extra", "template", "hint"), [
    ("llava-tiny-demo", [], "llava_v1", False),  # the card's
    ("llava-tiny-demo", ["--template", "v1"], "vicuna_v1", False),  # --template wins
    ("{tmp}/llava-v1.5-7b", [], "llava_v1", False),  # no card: LLaVA's CLI rule
    ("{tmp}/llava-v1.5-7b", ["--template", "vicuna_v1"], "vicuna_v1", False),
    ("{tmp}/tiny", [], "llava_v0", True),  # the rule's fallback, with a hint
])
def test_chat_picks_the_template(capsys, monkeypatch, tmp_path, model, extra, template, hint):
    for name in ("llava-v1.5-7b", "tiny"):
        (tmp_path / name).symlink_to(DEMO, target_is_directory=True)
    loaded = chat_spy(monkeypatch)
    code, out, err = run_main(["chat", "--model", model.format(tmp=tmp_path), "--prompt", "Hi",
                               "--max-new-tokens", "3", "--no-stream", *CPU, *extra], capsys)
    assert code == 0, err
    assert [m.template.name for m in loaded] == [template]
    assert out == loaded[0].chat("Hi", max_new_tokens=3) + "\n"
    assert ("--template vicuna_v1" in err) == hint and len(err.splitlines()) == hint


def test_chat_rejects_an_unknown_template_in_one_line(capsys):
    code, out, err = run_main(["chat", "--model", "llava-tiny-demo", "--template", "vicuna", "--prompt",
                               "Hi", *CPU], capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "vicuna_v1" in err


def test_chat_answers_about_an_image_url(capsys, monkeypatch):
    """`--image http://...` reaches the image loader (here a server on this machine)."""
    for variable in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(variable, raising=False)
    handler = functools.partial(QuietHandler, directory=str(DEMO))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            url = f"http://127.0.0.1:{server.server_address[1]}/example.png"
            code, out, err = run_main(["chat", "--model", "llava-tiny-demo", "--image", url, "--prompt",
                                       "What is in this picture?", *CPU], capsys)
        finally:
            server.shutdown()
    assert code == 0, err
    assert out == DEMO_ANSWER + "\n"


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


# ---- chat --compile: what it did, and nothing inside the streamed answer ------------------------

# `shortv chat` with two warnings: one from the compiler backend, raised while the decode step
# compiles, and one raised while the answer's second token is picked. Both must land outside
# the answer's line in the one stream that stdout and stderr share here.
NOISY_CHAT = """
import sys, warnings
import shortv.generate.loop as loop
import shortv.llava as llava

def noisy_backend(graph, example_inputs):
    warnings.warn("a warning from the compiler")
    return graph.forward

compile = llava.LLaVA.compile
llava.LLaVA.compile = lambda self, **options: compile(self, backend=noisy_backend, **options)
pick, picks = loop.pick, []

def noisy_pick(*args, **kwargs):
    picks.append(1)
    if len(picks) == 4:
        warnings.warn("a warning while the answer streams")
    return pick(*args, **kwargs)

loop.pick = noisy_pick
from shortv.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_chat_compile_says_what_it_did_and_keeps_warnings_out_of_the_answer():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "default"}
    run = subprocess.run(
        [sys.executable, "-c", NOISY_CHAT, "chat", "--model", "llava-tiny-demo", "--image", str(IMAGE),
         "--prompt", "What is in this picture?", "--compile", *CPU],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env, timeout=300)
    merged = run.stdout
    assert run.returncode == 0, merged
    lines = merged.splitlines()
    assert DEMO_ANSWER in lines, merged  # one unbroken line
    answer = lines.index(DEMO_ANSWER)
    compiled = [i for i, line in enumerate(lines) if "compiled the decode step with torch.compile" in line]
    assert len(compiled) == 1 and "CPU" in lines[compiled[0]] and compiled[0] < answer, merged
    compiler = [i for i, line in enumerate(lines) if "a warning from the compiler" in line]
    streaming = [i for i, line in enumerate(lines) if "a warning while the answer streams" in line]
    assert compiler and compiler[0] < answer and streaming and streaming[0] > answer, merged
