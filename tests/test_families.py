"""Model families: a family is added by registering it, and the loader and the zoo find it
from a checkpoint's config.json and a card's `family`; a config.json no family reads, and a
card whose family is not its checkpoint's, are one clear ConfigError each."""

from __future__ import annotations

import dataclasses
import json
import shutil
import tomllib
from pathlib import Path

import pytest
import torch

import shortv
from shortv import families, loading, zoo
from shortv.llava import LLaVA

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "weights" / "llava-tiny-demo"
DEMO_CARD = REPO / "models" / "llava-tiny-demo.toml"
TEST_MODEL_TYPE = "shortv_test_family"


class TestFamilyModel(LLaVA):
    """The test family's model: LLaVA's session under another class, so that a loaded
    model shows which family made it."""

    __test__ = False  # not a pytest test class


@pytest.fixture
def test_family(monkeypatch: pytest.MonkeyPatch) -> tuple[families.Family, list[Path]]:
    """A second family registered the way any family is (`families.register`), reading
    config.json files of model_type "shortv_test_family" with LLaVA's parser, and building
    and tokenizing through its own functions. The registry is restored afterwards. Also
    returns the directories its tokenizer loader was called with."""
    # A copy of the registry, so that the registration ends with the test.
    monkeypatch.setattr(families, "_FAMILIES", dict(families._FAMILIES))
    llava = families.get("llava")
    tokenized: list[Path] = []

    def load_tokenizer(directory: Path) -> shortv.Tokenizer:
        tokenized.append(directory)
        return llava.load_tokenizer(directory)

    family = dataclasses.replace(
        llava, name="shortv-test", title="ShortvTest", model_types=(TEST_MODEL_TYPE,),
        architectures=("ShortvTestForCausalLM",), session=TestFamilyModel,
        load_tokenizer=load_tokenizer, default_template="plain")
    families.register(family)
    return family, tokenized


def demo_copy(tmp_path: Path, **changes) -> Path:
    """The demo checkpoint (its tower inside it) with config.json fields changed."""
    directory = tmp_path / "checkpoint"
    shutil.copytree(DEMO, directory)
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_a_registered_family_is_loaded_from_its_model_type(tmp_path, test_family):
    _, tokenized = test_family
    directory = demo_copy(tmp_path, model_type=TEST_MODEL_TYPE,
                          architectures=["ShortvTestForCausalLM"])
    model = shortv.load(directory, device="cpu")
    assert type(model) is TestFamilyModel
    assert tokenized == [directory]
    assert model.template.name == "plain"  # the family's default template
    assert isinstance(loading.config_of_directory(directory), shortv.LlavaConfig)
    # The same weights as the demo loaded as LLaVA: the family's parser and key maps ran.
    demo = shortv.load(DEMO, device="cpu")
    assert type(demo) is LLaVA and demo.template.name == "vicuna_v1"
    theirs = demo.module.state_dict()
    ours = model.module.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_registering_a_taken_model_type_is_refused(test_family):
    family, _ = test_family
    with pytest.raises(ValueError, match=TEST_MODEL_TYPE):
        families.register(dataclasses.replace(family, name="another"))
    with pytest.raises(ValueError, match="shortv-test"):
        families.register(dataclasses.replace(family, model_types=("other",)))


@pytest.mark.parametrize("config,shown", [
    ({"model_type": "idefics3", "architectures": ["Idefics3ForConditionalGeneration"]},
     ["'idefics3'", "Idefics3ForConditionalGeneration"]),
    ({"model_type": "idefics3"}, ["'idefics3'"]),
    ({}, ["no model_type"]),
])
def test_a_config_no_family_reads_is_one_config_error(tmp_path, config, shown):
    directory = tmp_path / "checkpoint"
    shutil.copytree(DEMO, directory)
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(shortv.ConfigError) as info:
        shortv.load(directory, device="cpu")
    message = str(info.value)
    assert "\n" not in message
    # Which file, what it says, and every model_type shortv reads.
    for fragment in [str(directory / "config.json"), *shown, "llava_llama", "llava_mistral",
                     "llava", "llava_next", "qwen2_vl", "qwen2_5_vl"]:
        assert fragment in message, (fragment, message)


def test_the_message_lists_a_registered_familys_model_types(tmp_path, test_family):
    directory = demo_copy(tmp_path, model_type="idefics3", architectures=[])
    with pytest.raises(shortv.ConfigError, match=f"{TEST_MODEL_TYPE}"):
        shortv.load(directory, device="cpu")


def test_architectures_name_the_family_of_a_config_without_model_type(tmp_path):
    """As original LLaVA's loader does: LlavaLlamaForCausalLM is LLaVA, model_type or not."""
    config = json.loads((DEMO / "config.json").read_text())
    config.pop("model_type")
    assert families.of_config_json(config) is families.get("llava")
    directory = demo_copy(tmp_path, model_type="not_a_family_name")
    assert shortv.load(directory, device="cpu").num_layers == 8


def test_the_demo_cards_family_reads_its_checkpoint():
    raw = json.loads((DEMO / "config.json").read_text())
    assert zoo.get_card("llava-tiny-demo").family == families.of_config_json(raw).name


def test_a_card_whose_family_is_not_its_checkpoints_is_refused(monkeypatch, test_family):
    """A zoo card naming the test family, over the demo's LLaVA checkpoint."""
    data = tomllib.loads(DEMO_CARD.read_text())
    card = zoo.Card.from_dict({**data, "family": "shortv-test"})
    assert card.family == "shortv-test"
    monkeypatch.setattr(zoo, "card", lambda name: card if name == card.name else None)
    built = []
    monkeypatch.setattr(loading, "build_empty", lambda *args: built.append(args))
    with pytest.raises(shortv.ConfigError) as info:
        shortv.load(card.name, device="cpu")
    message = str(info.value)
    assert "\n" not in message and built == []
    for fragment in ("'shortv-test'", "'llava'", "llava_llama", str(DEMO)):
        assert fragment in message, (fragment, message)


def card_file(tmp_path: Path, family_line: str | None) -> Path:
    """The demo's card with its family line replaced (None: removed)."""
    lines = DEMO_CARD.read_text().splitlines()
    assert sum(line.startswith("family =") for line in lines) == 1
    lines = [line for line in lines if not line.startswith("family =")]
    if family_line is not None:
        lines.insert(0, family_line)
    path = tmp_path / "card.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("family_line,fragments", [
    (None, ["names no model family", "llava"]),
    ('family = "qwen9"', ["'qwen9'", "llava"]),
    ("family = 3", ["3", "llava"]),
])
def test_a_card_without_a_known_family_is_refused(tmp_path, family_line, fragments):
    path = card_file(tmp_path, family_line)
    with pytest.raises(shortv.ConfigError) as info:
        zoo.Card.from_toml(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_a_card_is_read_by_its_familys_card_parser(tmp_path, test_family):
    family, _ = test_family
    seen = []

    def card_config(architecture, preprocess):
        seen.append(architecture["text"]["layers"])
        return families.get("llava").card_config(architecture, preprocess)

    families.register(dataclasses.replace(family, name="shortv-test-cards",
                                          model_types=("shortv_test_cards",), card_config=card_config))
    card = zoo.Card.from_toml(card_file(tmp_path, 'family = "shortv-test-cards"'))
    assert card.family == "shortv-test-cards"
    assert seen == [8] and card.config.text.layers == 8
