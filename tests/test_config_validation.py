"""A config.json is input, not trusted: every field is validated when it is parsed, and the
sizes are checked against the checkpoint's tensor shapes before any model is built.

The demo's config (weights/llava-tiny-demo, original layout with its CLIP tower in
clip-vit-tiny/) is mutated one field at a time, in its own layout and rewritten into
transformers' layout; each bad value must be a ConfigError naming the field, and a
property-style loop over random mutations asserts that nothing but ShortVError subclasses
ever comes out of parsing + checking, and that neither allocates anything.
"""

from __future__ import annotations

import copy
import json
import math
import random
import re
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

from shortv.checkpoint import (
    check_config_against_checkpoint,
    checkpoint_shapes,
    expected_shape,
    weight_files,
)
from shortv.errors import CheckpointError, ConfigError, ShortVError
from shortv.models.config import (
    KNOWN_TOWERS,
    ORIGINAL_REQUIRED,
    LlavaConfig,
    TextConfig,
    VisionConfig,
    detect_layout,
    from_original,
    from_transformers,
)
from shortv.models.llava import LlavaModel

DEMO = Path(__file__).resolve().parent.parent / "weights" / "llava-tiny-demo"
TOWER = DEMO / "clip-vit-tiny"


# ---- the demo in both layouts ----------------------------------------------------------------


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


DEMO_CONFIG = read_json(DEMO / "config.json")
TOWER_CONFIG = read_json(TOWER / "config.json")
DEMO_SHAPES = checkpoint_shapes(weight_files(DEMO))
TOWER_SHAPES = checkpoint_shapes(weight_files(TOWER))
TEXT_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "rms_norm_eps", "rope_theta", "max_position_embeddings",
               "hidden_act", "bos_token_id", "eos_token_id", "pad_token_id",
               "tie_word_embeddings", "vocab_size")


def transformers_config(original: dict[str, Any], tower: dict[str, Any]) -> dict[str, Any]:
    """The demo's config.json as transformers' LlavaConfig would write it."""
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "text_config": {k: original[k] for k in TEXT_FIELDS if k in original} | {"model_type": "llama"},
        "vision_config": dict(tower),
        "vision_feature_layer": original["mm_vision_select_layer"],
        "vision_feature_select_strategy": "default",
        "projector_hidden_act": "gelu",
    }


def transformers_key(key: str) -> str:
    """An original-layout key of the demo (or its tower) as transformers (v4 names) saves it."""
    if key.startswith("vision_model."):
        return "vision_tower." + key
    if key == "lm_head.weight":
        return "language_model.lm_head.weight"
    if m := re.fullmatch(r"model\.mm_projector\.(\d+)\.(weight|bias)", key):
        return f"multi_modal_projector.linear_{int(m[1]) // 2 + 1}.{m[2]}"
    return "language_model." + key


HF_CONFIG = transformers_config(DEMO_CONFIG, TOWER_CONFIG)
HF_SHAPES = {transformers_key(k): s for k, s in (DEMO_SHAPES | TOWER_SHAPES).items()}


def parse_and_check(raw: dict[str, Any], tower_raw: dict[str, Any] | None = None,
                    shapes: dict | None = None, tower_shapes: dict | None = None) -> LlavaConfig:
    """What shortv.loading does with a directory's config.json and weights, before it
    builds the model: detect the layout, parse (the original layout's tower config from
    the tower's own config.json), check against the headers' shapes. Defaults: the demo."""
    layout = detect_layout(raw)
    if layout == "transformers":
        config = from_transformers(raw)
        check_config_against_checkpoint(config, HF_SHAPES if shapes is None else shapes, layout)
        return config
    tower_raw = TOWER_CONFIG if tower_raw is None else tower_raw
    config = from_original(raw, VisionConfig.from_hf(tower_raw))
    check_config_against_checkpoint(config, DEMO_SHAPES if shapes is None else shapes, layout,
                                    TOWER_SHAPES if tower_shapes is None else tower_shapes)
    return config


def check_directory(directory: Path) -> LlavaConfig:
    """parse_and_check for a checkpoint directory on disk, either layout, tower inside or
    in its own directory (as loading finds it)."""
    raw = read_json(directory / "config.json")
    shapes = checkpoint_shapes(weight_files(directory))
    layout = detect_layout(raw)
    if layout == "transformers":
        config = from_transformers(raw)
        check_config_against_checkpoint(config, shapes, layout)
        return config
    source = raw["mm_vision_tower"]
    tower_dir = Path(source) if Path(source).is_absolute() else directory / source
    inside = any(k.startswith("model.vision_tower.") for k in shapes)
    vision = (KNOWN_TOWERS[source] if source in KNOWN_TOWERS
              else VisionConfig.from_hf(read_json(tower_dir / "config.json")))
    config = from_original(raw, vision)
    tower_shapes = None if inside else checkpoint_shapes(weight_files(tower_dir))
    check_config_against_checkpoint(config, shapes, layout, tower_shapes)
    return config


def with_field(d: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of `d` with d[a][b]... = value for path "a.b..." (value DELETE removes it)."""
    out = copy.deepcopy(d)
    *parents, last = path.split(".")
    target = out
    for p in parents:
        target = target[p]
    if value is DELETE:
        target.pop(last, None)
    else:
        target[last] = value
    return out


DELETE = object()


def config_error(fn, *args, field: str, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert field in message, f"{field!r} not in {message!r}"
    assert len(message) < 400, message
    return message


# ---- the unmodified configs pass ----------------------------------------------------------------


def test_the_demo_passes_in_both_layouts():
    ours, theirs = parse_and_check(DEMO_CONFIG), parse_and_check(HF_CONFIG)
    assert ours.text == theirs.text
    assert ours.vision == theirs.vision
    assert ours.text.layers == 8 and ours.vision.layers == 3


def test_the_published_fixtures_pass(hf_llava: Path, hf_llava_next: Path, original_v15: Path,
                                     original_v16: Path, tmp_path: Path):
    """No false alarms on checkpoints saved by transformers and their original-layout
    rewrites (tower separate, tower inside, sharded .bin)."""
    from . import checkpoints

    sharded_bin = checkpoints.to_original(hf_llava, tmp_path / "bin", fmt="bin", shards=3)
    for directory in (hf_llava, hf_llava_next, original_v15, original_v16, sharded_bin, DEMO):
        check_directory(directory)


def test_the_shape_table_matches_the_model():
    """The checker's expected shapes are those of the modules LLaVA builds, for every
    parameter, in both projector kinds and with GQA / an explicit head_dim."""
    variants = [
        parse_and_check(DEMO_CONFIG),
        from_transformers(with_field(with_field(HF_CONFIG, "text_config.num_key_value_heads", 2),
                                     "text_config.head_dim", 48)),
        from_original(with_field(DEMO_CONFIG, "mm_projector_type", "mlp3x_gelu"),
                      VisionConfig.from_hf(TOWER_CONFIG)).replace(
            patch_merge_type="spatial_unpad", image_aspect_ratio="anyres",
            image_grid_pinpoints=((84, 168),), vision_select_layers=(-2, -1)),
    ]
    for config in variants:
        with torch.device("meta"):
            model = LlavaModel(config)
        for name, param in model.named_parameters():
            assert expected_shape(config, name) == tuple(param.shape), name


# ---- one field at a time: parsing ----------------------------------------------------------------

SIZES = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
         "num_key_value_heads", "vocab_size", "max_position_embeddings"]
BAD_SIZES = [0, -1, -200, 10**12, 3.7e38, 2**64, 1.5, "big", None, [128], {"n": 1}, True,
             math.nan, math.inf]


@pytest.mark.parametrize("value", BAD_SIZES, ids=repr)
@pytest.mark.parametrize("field", SIZES)
def test_bad_decoder_size(field: str, value: Any):
    if field == "num_key_value_heads" and value is None:  # transformers: as many as the heads
        assert TextConfig.from_hf(with_field(HF_CONFIG["text_config"], field, None)).kv_heads == 4
        return
    config_error(from_original, with_field(DEMO_CONFIG, field, value),
                 VisionConfig.from_hf(TOWER_CONFIG), field=field)
    config_error(from_transformers, with_field(HF_CONFIG, f"text_config.{field}", value), field=field)
    config_error(TextConfig.from_hf, with_field(HF_CONFIG["text_config"], field, value), field=field)


@pytest.mark.parametrize("value", BAD_SIZES, ids=repr)
@pytest.mark.parametrize("field", ["hidden_size", "intermediate_size", "num_hidden_layers",
                                   "num_attention_heads", "image_size", "patch_size"])
def test_bad_tower_size(field: str, value: Any):
    config_error(VisionConfig.from_hf, with_field(TOWER_CONFIG, field, value), field=field)
    config_error(from_transformers, with_field(HF_CONFIG, f"vision_config.{field}", value), field=field)


@pytest.mark.parametrize("field,value", [
    ("rms_norm_eps", 0), ("rms_norm_eps", -1e-5), ("rms_norm_eps", 2.0), ("rms_norm_eps", math.nan),
    ("rms_norm_eps", "1e-5"), ("rope_theta", 0), ("rope_theta", -10000.0), ("rope_theta", math.inf),
    ("rope_theta", None), ("head_dim", 0), ("head_dim", -32), ("head_dim", 33), ("head_dim", 10**9),
    ("head_dim", "32"), ("hidden_act", "gelu"), ("tie_word_embeddings", "false"),
    ("attention_bias", 1), ("mlp_bias", "no"), ("bos_token_id", "1"), ("eos_token_id", -7),
    ("pad_token_id", 2**40), ("eos_token_id", [math.nan]), ("rope_scaling", "linear"),
    ("rope_scaling", {"type": "linear", "factor": 2.0}), ("rope_parameters", 7),
])
def test_bad_decoder_value(field: str, value: Any):
    config_error(from_original, with_field(DEMO_CONFIG, field, value),
                 VisionConfig.from_hf(TOWER_CONFIG), field=field.split("_")[0])
    config_error(TextConfig.from_hf, with_field(HF_CONFIG["text_config"], field, value),
                 field=field.split("_")[0])


@pytest.mark.parametrize("field,value", [
    ("layer_norm_eps", 0), ("layer_norm_eps", math.nan), ("hidden_act", "relu"),
    ("hidden_act", None), ("num_channels", 1), ("num_channels", 0), ("num_channels", "3"),
    ("image_size", 90),  # not a multiple of the 14-pixel patches
    ("patch_size", 168),  # larger than the image
    ("num_attention_heads", 5),  # does not divide hidden_size=64
])
def test_bad_tower_value(field: str, value: Any):
    config_error(VisionConfig.from_hf, with_field(TOWER_CONFIG, field, value), field=field)


@pytest.mark.parametrize("field,value", [
    ("mm_projector_type", "qformer"), ("mm_projector_type", "mlp0x_gelu"),
    ("mm_projector_type", "mlp1000000x_gelu"), ("mm_projector_type", "mlp²x_gelu"),
    ("mm_projector_type", 2), ("mm_vision_select_layer", -9), ("mm_vision_select_layer", 4),
    ("mm_vision_select_layer", []), ("mm_vision_select_layer", [-2] * 100),
    ("mm_vision_select_layer", "penultimate"), ("mm_vision_select_layer", 1.5),
    ("mm_vision_select_feature", "cls"), ("image_aspect_ratio", "stretch"),
    ("mm_patch_merge_type", "unpad9"), ("image_grid_pinpoints", "[[336, 672]"),
    ("image_grid_pinpoints", [[336, -672]]), ("image_grid_pinpoints", [[336]]),
    ("image_grid_pinpoints", [[336, 10**9]]), ("image_grid_pinpoints", [[336, 672]] * 5000),
    ("image_grid_pinpoints", "[" * 5000), ("image_grid_pinpoints", 7),
    ("mm_vision_tower", 42), ("architectures", "LlavaLlamaForCausalLM"),
])
def test_bad_llava_value(field: str, value: Any):
    raw = with_field(DEMO_CONFIG, field, value)
    fragment = field
    config_error(lambda: from_original(raw, VisionConfig.from_hf(TOWER_CONFIG))
                 if field != "architectures" else detect_layout(raw), field=fragment)


@pytest.mark.parametrize("field,value", [
    ("text_config", "oops"), ("text_config", [1]), ("vision_config", "oops"),
    ("vision_feature_layer", -9), ("vision_feature_layer", []), ("vision_feature_select_strategy", "weird"),
    ("multimodal_projector_bias", "yes"), ("projector_hidden_act", "relu"),
    ("projector_hidden_act", None),
])
def test_bad_transformers_value(field: str, value: Any):
    fragment = field if field == "vision_feature_layer" else field.split("_")[0]
    config_error(from_transformers, with_field(HF_CONFIG, field, value), field=fragment)


def test_heads_must_divide_hidden_size_unless_head_dim_is_given():
    message = config_error(TextConfig.from_hf, with_field(HF_CONFIG["text_config"], "num_attention_heads", 3),
                           field="num_attention_heads")
    assert "head_dim" in message
    given = TextConfig.from_hf(with_field(with_field(HF_CONFIG["text_config"], "num_attention_heads", 3),
                                          "num_key_value_heads", 3) | {"head_dim": 32})
    assert (given.heads, given.head_dim) == (3, 32)
    config_error(TextConfig.from_hf, with_field(HF_CONFIG["text_config"], "num_key_value_heads", 3),
                 field="num_key_value_heads")  # 4 query heads cannot share 3 key/value heads


def test_configs_built_in_code_are_validated_too():
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        TextConfig(layers=10**12)
    with pytest.raises(ConfigError, match="num_attention_heads"):
        VisionConfig(heads=0)
    with pytest.raises(ConfigError, match="hidden_size"):
        VisionConfig(width=-1)
    with pytest.raises(ConfigError, match="image_grid_pinpoints"):
        LlavaConfig(image_grid_pinpoints=((336, 0),))


# ---- one field at a time: required fields and defaults -------------------------------------------


@pytest.mark.parametrize("field", ORIGINAL_REQUIRED)
def test_original_layout_requires_the_decoder_sizes(field: str):
    message = config_error(from_original, with_field(DEMO_CONFIG, field, DELETE),
                           VisionConfig.from_hf(TOWER_CONFIG), field=field)
    assert "config.json" in message


@pytest.mark.parametrize("field", ORIGINAL_REQUIRED)
def test_transformers_layout_defaults_a_missing_field_and_the_checker_names_it(field: str):
    """transformers saves text_config sparsely, so a missing field is LlamaConfig's default
    (as in transformers); against the demo's weights that default is wrong, and the checker
    says which field disagrees, before anything is built."""
    raw = with_field(HF_CONFIG, f"text_config.{field}", DELETE)
    parsed = from_transformers(raw)
    assert getattr(parsed.text, {"num_hidden_layers": "layers", "num_attention_heads": "heads"}
                   .get(field, field)) == {"hidden_size": 4096, "num_hidden_layers": 32,
                                           "num_attention_heads": 32, "intermediate_size": 11008,
                                           "vocab_size": 32000}[field]
    fragment = "head_dim" if field == "num_attention_heads" else field
    message = config_error(parse_and_check, raw, field=fragment)
    assert "text_config" in message


def test_transformers_defaults_are_transformers_defaults():
    """Sparse and missing sub-configs read as transformers reads them."""
    from transformers import LlavaConfig as HFLlavaConfig

    for raw in ({"model_type": "llava"}, {"model_type": "llava", "vision_config": {}, "text_config": {}},
                {"model_type": "llava", "text_config": {"hidden_size": 128, "num_attention_heads": 4}},
                HF_CONFIG):
        ours, theirs = from_transformers(copy.deepcopy(raw)), HFLlavaConfig.from_dict(copy.deepcopy(raw))
        tv, tt = theirs.vision_config, theirs.text_config
        assert (ours.vision.image_size, ours.vision.patch_size, ours.vision.width, ours.vision.layers,
                ours.vision.heads, ours.vision.mlp_dim) == (
            tv.image_size, tv.patch_size, tv.hidden_size, tv.num_hidden_layers,
            tv.num_attention_heads, tv.intermediate_size), raw
        assert (ours.text.vocab_size, ours.text.hidden_size, ours.text.intermediate_size,
                ours.text.layers, ours.text.heads, ours.text.kv_heads, ours.text.head_dim,
                ours.text.rms_norm_eps, ours.text.max_position_embeddings) == (
            tt.vocab_size, tt.hidden_size, tt.intermediate_size, tt.num_hidden_layers,
            tt.num_attention_heads, tt.num_key_value_heads, tt.head_dim, tt.rms_norm_eps,
            tt.max_position_embeddings), raw


# ---- one field at a time: the checker --------------------------------------------------------------


@pytest.mark.parametrize("field,value,fragments", [
    ("num_hidden_layers", 12, ["num_hidden_layers=12", "decoder layers 0..7"]),
    ("num_hidden_layers", 4, ["num_hidden_layers=4", "decoder layers 0..7"]),
    ("hidden_size", 256, ["hidden_size=256", "128"]),
    ("vocab_size", 2000, ["vocab_size=2000", "1000"]),
    ("intermediate_size", 512, ["intermediate_size=512", "256"]),
    ("num_key_value_heads", 2, ["num_key_value_heads", "64", "128"]),
    ("num_attention_heads", 8, ["num_key_value_heads", "head_dim"]),  # 8 heads of 16 vs kv 4 × 16
    ("head_dim", 64, ["num_attention_heads × head_dim", "256", "128"]),
    ("mm_projector_type", "linear", ["mm_projector_type='linear'", "2"]),
    ("mm_projector_type", "mlp3x_gelu", ["mm_projector_type='mlp3x_gelu'", "2"]),
])
def test_checker_names_the_field_that_disagrees(field: str, value: Any, fragments: list[str]):
    message = config_error(parse_and_check, with_field(DEMO_CONFIG, field, value), field=fragments[0])
    for fragment in fragments[1:]:
        assert fragment in message, message
    if field in TEXT_FIELDS or field == "head_dim":  # the same in transformers' layout
        config_error(parse_and_check, with_field(HF_CONFIG, f"text_config.{field}", value),
                     field=fragments[0])


@pytest.mark.parametrize("field,value,fragments", [
    ("num_hidden_layers", 2, ["num_hidden_layers=2", "tower layers 0..2"]),
    ("num_hidden_layers", 6, ["select_layer", "0..4", "0..2"]),  # -2 of 6 needs layer 4
    ("hidden_size", 128, ["hidden_size=128", "64"]),
    ("intermediate_size", 64, ["intermediate_size=64", "128"]),
    ("image_size", 56, ["image_size=56", "37"]),
    ("patch_size", 12, ["patch_size=12"]),
])
def test_checker_names_the_tower_field_that_disagrees(field: str, value: Any, fragments: list[str]):
    message = config_error(parse_and_check, DEMO_CONFIG, with_field(TOWER_CONFIG, field, value),
                           field=fragments[0])
    for fragment in fragments[1:]:
        assert fragment in message, message
    hf_fragment = fragments[0].replace("select_layer", "vision_feature_layer")
    config_error(parse_and_check, with_field(HF_CONFIG, f"vision_config.{field}", value),
                 field=hf_fragment)


def test_a_truncated_tower_is_fine():
    """Tower layers after the deepest one LLaVA reads are never run: a checkpoint may leave
    them out (here the third of three, with mm_vision_select_layer=-2)."""
    shapes = {k: s for k, s in TOWER_SHAPES.items() if ".layers.2." not in k}
    parse_and_check(DEMO_CONFIG, tower_shapes=shapes)


def test_one_odd_tensor_is_a_checkpoint_error():
    """When the tensors agree with the config except one, the checkpoint is at fault: a
    CheckpointError naming the tensor and both shapes (as the Filler would)."""
    shapes = dict(DEMO_SHAPES)
    shapes["model.layers.2.self_attn.k_proj.weight"] = (5, 128)
    with pytest.raises(CheckpointError) as info:
        parse_and_check(DEMO_CONFIG, shapes=shapes)
    message = str(info.value)
    for fragment in ("shape", "model.layers.2.self_attn.k_proj.weight", "[5, 128]", "[128, 128]"):
        assert fragment in message, message


def test_unknown_and_missing_tensors_are_left_to_the_filler():
    shapes = {k: s for k, s in DEMO_SHAPES.items() if "layers.3.mlp" not in k}
    shapes["model.layers.0.mlp.bogus.weight"] = (3,)
    parse_and_check(DEMO_CONFIG, shapes=shapes)


def test_huge_layer_counts_never_reach_the_model():
    """The bug report: num_hidden_layers=10**12 (or 3.7e38) grew shortv.load to all memory."""
    for value in (10**12, 3.7e38):
        config_error(parse_and_check, with_field(DEMO_CONFIG, "num_hidden_layers", value),
                     field="num_hidden_layers")
        config_error(parse_and_check, with_field(HF_CONFIG, "text_config.num_hidden_layers", value),
                     field="num_hidden_layers")
        config_error(parse_and_check, DEMO_CONFIG, with_field(TOWER_CONFIG, "num_hidden_layers", value),
                     field="num_hidden_layers")


# ---- property: random mutations give only ShortVErrors, and allocate nothing ------------------------

POOL = [0, 1, 2, 3, -1, -200, 7, 64, 127, 128, 129, 256, 1000, 10**12, 2**63, 10**40, 3.7e38,
        0.5, 1e-5, -1e-6, math.nan, math.inf, -math.inf, "", "x", "silu", "gelu", "linear",
        "mlp2x_gelu", "pad", "anyres", "spatial_unpad", "patch", "cls_patch", None, True, False,
        [], [1], [-2, -1], [[84, 168]], {}, {"type": "linear"}, {"rope_type": "default"}]


class NoTorch(TorchFunctionMode):
    """Fails on any torch call: checking must run before (and without) any tensor."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        raise AssertionError(f"torch was called while checking a config: {func}")


def random_mutation(rng: random.Random) -> tuple[dict, dict, str]:
    """(config.json, tower config.json, what was done): 1-3 fields of the demo (in either
    layout, or its tower config) set to a random value or removed."""
    transformers = rng.random() < 0.4
    raw = copy.deepcopy(HF_CONFIG if transformers else DEMO_CONFIG)
    tower = copy.deepcopy(TOWER_CONFIG)
    done = []
    for _ in range(rng.randint(1, 3)):
        if transformers:
            section = rng.choice(["text_config", "vision_config", None])
            target = raw if section is None else raw.get(section)
            if not isinstance(target, dict):
                continue
        else:
            section = rng.choice(["tower", None, None])
            target = tower if section == "tower" else raw
        fields = [*target, "head_dim", "rope_scaling", "image_grid_pinpoints"]
        name = rng.choice(fields)
        if rng.random() < 0.15:
            target.pop(name, None)
            done.append(f"del {section}.{name}")
        else:
            target[name] = rng.choice(POOL)
            done.append(f"{section}.{name}={target[name]!r}")
    return raw, tower, "; ".join(done)


def test_random_mutations_give_only_shortv_errors_and_allocate_nothing():
    outcomes: dict[str, int] = {}
    tracemalloc.start()
    try:
        for seed in range(400):
            raw, tower, done = random_mutation(random.Random(seed))
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            try:
                with NoTorch():
                    parse_and_check(raw, tower)
                outcome = "ok"
            except ShortVError as e:
                outcome = type(e).__name__
                assert len(str(e)) < 600, (seed, done, str(e))
            except BaseException as e:
                raise AssertionError(f"seed {seed} ({done}): {type(e).__name__}: {e}") from e
            peak = tracemalloc.get_traced_memory()[1] - before
            assert peak < 2**20, (seed, done, peak)  # no list of 10**12 layers, no huge string
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    finally:
        tracemalloc.stop()
    assert outcomes.get("ConfigError", 0) > 100, outcomes
    assert outcomes.get("ok", 0) > 10, outcomes  # some mutations are harmless (token ids, ...)
