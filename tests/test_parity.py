"""Numerical parity of shortv with reference implementations on the same weights.

- the whole LLaVA-1.5 model vs transformers' LlavaForConditionalGeneration, for shortv
  loaded from the transformers layout, the original layout (safetensors, tower in a
  separate CLIP directory) and the original layout as sharded `.bin`;
- projector variants transformers cannot build (`linear`, `mlp3x_gelu`) vs an explicit
  torch composition put into transformers' model in place of its projector;
- the CLIP tower vs transformers' CLIPVisionModel and vs open_clip's VisionTransformer;
- the decoder vs transformers' LlamaForCausalLM (GQA, biases, head_dim, RoPE theta),
  left-padded batches, and the KV cache vs full recomputation.

All in fp32. Logits within 1e-4, tower features within 1e-5.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import shortv
from shortv.checkpoint import CLIP_TOWER_LAYOUT, ORIGINAL_LAYOUT
from shortv.models.clip import CLIPVisionTower
from shortv.models.llama import Decoder, KVCache
from shortv.token_types import TYPE_DTYPE, TokenType

from . import checkpoints, reference
from .open_clip_tower import open_clip_tower_state

LOGITS = dict(atol=1e-4, rtol=1e-4)
FEATURES = dict(atol=1e-5, rtol=1e-5)


# ---- whole model vs transformers' Llava ------------------------------------------------------


@pytest.fixture(scope="module")
def hf_reference(hf_llava: Path):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(hf_llava, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def original_bin(tmp_path_factory: pytest.TempPathFactory, hf_llava: Path) -> Path:
    return checkpoints.original_bin_checkpoint(hf_llava, tmp_path_factory.mktemp("orig-v15-bin"))


@pytest.fixture(scope="module", params=["transformers", "original", "original-bin"])
def ours(request, hf_llava: Path, original_v15: Path, original_bin: Path) -> shortv.LLaVA:
    directory = {"transformers": hf_llava, "original": original_v15,
                 "original-bin": original_bin}[request.param]
    model = shortv.load(directory, device="cpu", dtype=torch.float32)
    assert model.dtype == torch.float32
    return model


def reference_logits(ref, encoded: shortv.Encoded) -> torch.Tensor:
    """transformers' logits [T, V] for the same prompt and the same pixels."""
    ids = reference.hf_input_ids(encoded.input_ids, ref.config.image_token_index,
                               reference.hf_tokens_per_image(ref.config))
    kwargs = {}
    if encoded.images:
        kwargs["pixel_values"] = torch.stack(encoded.images)
    with torch.no_grad():
        return ref(input_ids=ids, **kwargs).logits[0]


CASES = {
    "square": ("USER: <image>\nWhat is in the picture? ASSISTANT:", [(40, 40)]),
    "wide": ("USER: <image>\nDescribe the red car. ASSISTANT:", [(61, 23)]),
    "tall": ("<image> What is this?", [(17, 50)]),
    "two-images": ("USER: Left <image> and right <image>\nhow many dogs? ASSISTANT:",
                   [(30, 52), (45, 20)]),
    "text-only": ("USER: hello there, what color is the sky? ASSISTANT:", []),
}


@pytest.mark.parametrize("case", list(CASES))
def test_llava_logits_match_transformers(ours: shortv.LLaVA, hf_reference, case: str):
    prompt, sizes = CASES[case]
    images = [reference.random_rgb(w, h, seed=i + 1) for i, (w, h) in enumerate(sizes)]
    encoded = ours.encode(prompt, images, template=False)
    assert int((encoded.input_ids == shortv.IMAGE_TOKEN).sum()) == len(images)
    got = ours.logits(encoded)
    want = reference_logits(hf_reference, encoded)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, **LOGITS)


def test_llava_logits_depend_on_the_image(hf_llava: Path, hf_reference):
    """The parity above is sensitive to the image: another image changes the logits after
    the image by far more than the tolerance (so a model ignoring pixels would fail)."""
    model = shortv.load(hf_llava, device="cpu", dtype=torch.float32)
    prompt = "USER: <image>\nWhat is it? ASSISTANT:"
    a = model.encode(prompt, [reference.random_rgb(40, 40, seed=1)], template=False)
    b = model.encode(prompt, [reference.random_rgb(40, 40, seed=2)], template=False)
    first = int((a.input_ids == shortv.IMAGE_TOKEN).nonzero()[0])
    la, lb = model.logits(a), model.logits(b)
    torch.testing.assert_close(la[:first], lb[:first], **LOGITS)  # causal: before the image
    assert (la[first:] - lb[first:]).abs().max() > 1e-2
    # ... and transformers agrees on both
    torch.testing.assert_close(lb, reference_logits(hf_reference, b), **LOGITS)


@pytest.fixture(scope="module")
def hf_llava_variant(tmp_path_factory: pytest.TempPathFactory, sp_model: Path) -> Path:
    """Config corners transformers supports: several feature layers concatenated, CLS kept
    ('full'), a projector without biases, gelu tower, a non-default RoPE theta, MHA."""
    return checkpoints.make_llava(
        tmp_path_factory.mktemp("hf-llava-variant"), sp_model, seed=3,
        vision=dict(hidden_act="gelu", num_hidden_layers=4),
        text=dict(num_key_value_heads=4, rope_parameters={"rope_type": "default",
                                                          "rope_theta": 50000.0}),
        vision_feature_layer=[-4, -1], vision_feature_select_strategy="full",
        multimodal_projector_bias=False,
    )


def test_llava_config_variants_match_transformers(hf_llava_variant: Path):
    from transformers import LlavaForConditionalGeneration

    ref = LlavaForConditionalGeneration.from_pretrained(hf_llava_variant, dtype=torch.float32).eval()
    model = shortv.load(hf_llava_variant, device="cpu", dtype=torch.float32)
    assert model.config.vision_select_layers == (-4, -1)
    assert model.config.vision_select_feature == "cls_patch"
    assert model.config.text.rope_theta == 50000.0
    assert model.config.vision.act == "gelu" and not model.config.projector_bias
    assert ref.model.multi_modal_projector.linear_1.bias is None
    encoded = model.encode("USER: <image> and <image>\nsame? ASSISTANT:",
                           [reference.random_rgb(33, 20, seed=5), reference.random_rgb(20, 20, seed=6)],
                           template=False)
    torch.testing.assert_close(model.logits(encoded), reference_logits(ref, encoded), **LOGITS)


# ---- projector types transformers cannot build -------------------------------------------------


class ReferenceProjector(nn.Module):
    """Original LLaVA's projector written out: Linear, then (GELU, Linear) × (depth - 1),
    nn.GELU being exact (erf) GELU."""

    def __init__(self, weights: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        super().__init__()
        self.weights = weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, (w, b) in enumerate(self.weights):
            if i:
                x = 0.5 * x * (1 + torch.erf(x / 2**0.5))
            x = x @ w.T + b
        return x


def projector_checkpoint(original_v15: Path, out: Path, kind: str, seed: int):
    """original_v15 with its projector replaced by a random `kind` one, in original
    LLaVA's key names (`model.mm_projector.weight` for linear, `.{0,2,4}.` for mlp3x)."""
    shutil.copytree(original_v15, out)
    config = json.loads((out / "config.json").read_text())
    state = load_file(str(out / "model.safetensors"))
    state = {k: v for k, v in state.items() if not k.startswith("model.mm_projector.")}
    d_in, d_out = config["mm_hidden_size"], config["hidden_size"]
    g = torch.Generator().manual_seed(seed)
    depth = 1 if kind == "linear" else int(kind[3:-len("x_gelu")])
    weights = []
    for i in range(depth):
        fan_in = d_in if i == 0 else d_out
        w = torch.randn(d_out, fan_in, generator=g) / fan_in**0.5
        b = 0.1 * torch.randn(d_out, generator=g)
        weights.append((w, b))
        name = "model.mm_projector." + ("" if kind == "linear" else f"{2 * i}.")
        state[name + "weight"], state[name + "bias"] = w, b
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config["mm_projector_type"] = kind
    (out / "config.json").write_text(json.dumps(config))
    return weights


@pytest.mark.parametrize("kind", ["linear", "mlp3x_gelu"])
def test_projector_types_match_explicit_reference(
    tmp_path: Path, original_v15: Path, hf_llava: Path, kind: str
):
    from transformers import LlavaForConditionalGeneration

    weights = projector_checkpoint(original_v15, tmp_path / kind, kind, seed=11)
    model = shortv.load(tmp_path / kind, device="cpu", dtype=torch.float32)
    assert model.config.projector == kind
    ref = LlavaForConditionalGeneration.from_pretrained(hf_llava, dtype=torch.float32).eval()
    ref.model.multi_modal_projector = ReferenceProjector(weights)
    encoded = model.encode("USER: <image>\nWhat is it? <image> ASSISTANT:",
                           [reference.random_rgb(30, 40, seed=7), reference.random_rgb(40, 40, seed=8)],
                           template=False)
    torch.testing.assert_close(model.logits(encoded), reference_logits(ref, encoded), **LOGITS)
    # The projector module alone, on random features.
    x = torch.randn(5, model.config.vision_feature_size)
    with torch.no_grad():
        torch.testing.assert_close(model.module.projector(x), ReferenceProjector(weights)(x), **FEATURES)


# ---- CLIP tower vs transformers' CLIPVisionModel ----------------------------------------------


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_clip_tower_matches_transformers(act: str):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=80, num_hidden_layers=4,
                           num_attention_heads=4, image_size=42, patch_size=14,
                           hidden_act=act, layer_norm_eps=1e-5)
    torch.manual_seed(0)
    ref = CLIPVisionModel(cfg).eval()
    checkpoints.randomize(ref, seed=1)
    vision = shortv.VisionConfig.from_hf(cfg.to_dict())
    assert (vision.layers, vision.act, vision.num_patches) == (4, act, 9)
    tower = CLIPVisionTower(vision).eval()
    state = reference.strip_prefix(reference.map_state(ref.state_dict(), CLIP_TOWER_LAYOUT), "vision.")
    tower.load_state_dict(state, strict=True)

    pixels = torch.randn(2, 3, 42, 42)
    with torch.no_grad():
        want = ref(pixel_values=pixels, output_hidden_states=True).hidden_states
        indices = tuple(range(len(want)))
        got = tower(pixels, indices).hidden_states
    assert len(want) == vision.layers + 1
    for i in indices:
        torch.testing.assert_close(got[i], want[i], **FEATURES, msg=f"hidden state {i}")

    # LLaVA's -2 is the penultimate hidden state; a tower built only that deep gives it.
    llava_cfg = shortv.LlavaConfig(vision=vision, vision_select_layers=(-2,))
    (index,) = llava_cfg.vision_hidden_indices
    assert index == len(want) - 2
    short = CLIPVisionTower(vision, depth=llava_cfg.vision_depth).eval()
    short.load_state_dict({k: v for k, v in state.items()
                           if not k.startswith(f"layers.{index}.")}, strict=True)
    with torch.no_grad():
        (penultimate,) = short(pixels, (index,)).hidden_states
    torch.testing.assert_close(penultimate, want[-2], **FEATURES)


# ---- CLIP tower vs open_clip --------------------------------------------------------------------


def test_clip_tower_matches_open_clip():
    from open_clip.transformer import QuickGELU, VisionTransformer

    torch.manual_seed(0)
    ref = VisionTransformer(image_size=28, patch_size=14, width=32, layers=3, heads=4,
                            mlp_ratio=2, output_dim=16, act_layer=QuickGELU).eval()
    checkpoints.randomize(ref, seed=2)
    state = open_clip_tower_state(ref.state_dict())
    vision = shortv.VisionConfig(image_size=28, patch_size=14, width=32, layers=3, heads=4,
                                 mlp_dim=64, act="quick_gelu")
    tower = CLIPVisionTower(vision).eval()
    tower.load_state_dict(state, strict=True)

    pixels = torch.randn(2, 3, 28, 28)
    seen: list[torch.Tensor] = []  # the encoder's input: embeddings after ln_pre
    ref.transformer.resblocks[0].register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    with torch.no_grad():
        out = ref.forward_intermediates(pixels, indices=[0, 1, 2], output_fmt="NLC",
                                        output_extra_tokens=True, intermediates_only=True)
        blocks = [torch.cat((cls, patches), dim=1) for cls, patches in
                  zip(out["image_intermediates_prefix"], out["image_intermediates"], strict=True)]
        got = tower(pixels, (0, 1, 2, 3)).hidden_states
    torch.testing.assert_close(got[0], seen[0], **FEATURES)
    for i, want in enumerate(blocks, start=1):
        torch.testing.assert_close(got[i], want, **FEATURES, msg=f"block {i}")


def test_open_clip_mapping_takes_a_whole_clip_model_and_rejects_unknown_towers():
    from open_clip.transformer import VisionTransformer

    ref = VisionTransformer(image_size=28, patch_size=14, width=32, layers=1, heads=4,
                            mlp_ratio=2, output_dim=16)
    whole = {"visual." + k: v for k, v in ref.state_dict().items()}
    whole["token_embedding.weight"] = torch.zeros(3, 4)  # the text tower
    whole["transformer.resblocks.0.attn.in_proj_weight"] = torch.zeros(12, 4)
    whole["logit_scale"] = torch.zeros(())
    mapped = open_clip_tower_state(whole)
    assert set(mapped) == set(CLIPVisionTower(shortv.VisionConfig(
        image_size=28, patch_size=14, width=32, layers=1, heads=4, mlp_dim=64)).state_dict())
    layer_scaled = VisionTransformer(image_size=28, patch_size=14, width=32, layers=1, heads=4,
                                     mlp_ratio=2, output_dim=16, ls_init_value=0.1)
    with pytest.raises(shortv.CheckpointError, match="ls_1"):
        open_clip_tower_state(layer_scaled.state_dict())


# ---- decoder vs transformers' Llama ---------------------------------------------------------------


LLAMA_CONFIGS = {
    "gqa": dict(vocab_size=113, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                max_position_embeddings=512),
    "bias-headdim-theta": dict(vocab_size=113, hidden_size=48, intermediate_size=80,
                               num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=1, head_dim=16, attention_bias=True,
                               mlp_bias=True, rms_norm_eps=1e-6, max_position_embeddings=512,
                               rope_parameters={"rope_type": "default", "rope_theta": 5e5}),
}


def llama_pair(name: str):
    """(transformers LlamaForCausalLM, our Decoder) with the same random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**LLAMA_CONFIGS[name])
    torch.manual_seed(0)
    ref = LlamaForCausalLM(cfg).eval()
    checkpoints.randomize(ref, seed=4)
    decoder = Decoder(shortv.TextConfig.from_hf(cfg.to_dict())).eval()
    state = reference.strip_prefix(reference.map_state(ref.state_dict(), ORIGINAL_LAYOUT), "decoder.")
    decoder.load_state_dict(state, strict=True)
    return ref, decoder


@pytest.fixture(scope="module", params=list(LLAMA_CONFIGS))
def llama(request):
    return llama_pair(request.param)


def text_types(b: int, t: int) -> torch.Tensor:
    return torch.full((b, t), int(TokenType.TEXT), dtype=TYPE_DTYPE)


def our_logits(decoder: Decoder, ids: torch.Tensor, types=None, positions=None, cache=None):
    b, t = ids.shape
    types = text_types(b, t) if types is None else types
    positions = torch.arange(t).expand(b, t) if positions is None else positions
    with torch.no_grad():
        x = decoder.embed_tokens(ids)
        return decoder.head(decoder(x, types, positions, cache=cache))


def test_decoder_matches_transformers_llama(llama):
    ref, decoder = llama
    ids = torch.randint(0, ref.config.vocab_size, (1, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(input_ids=ids).logits
    torch.testing.assert_close(our_logits(decoder, ids), want, **LOGITS)


def left_padded(seqs: list[torch.Tensor]):
    """ids, types, positions and attention mask [B, T] of left-padded sequences."""
    t = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), t, dtype=torch.long)
    types = torch.full((len(seqs), t), int(TokenType.PAD), dtype=TYPE_DTYPE)
    positions = torch.zeros(len(seqs), t, dtype=torch.long)
    mask = torch.zeros(len(seqs), t, dtype=torch.long)
    for i, s in enumerate(seqs):
        n = len(s)
        ids[i, t - n:] = s
        types[i, t - n:] = int(TokenType.TEXT)
        positions[i, t - n:] = torch.arange(n)
        mask[i, t - n:] = 1
    return ids, types, positions, mask


def test_decoder_left_padded_batch(llama):
    ref, decoder = llama
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, 113, (n,), generator=g) for n in (9, 16, 4)]
    ids, types, positions, mask = left_padded(seqs)
    got = our_logits(decoder, ids, types, positions)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    t = ids.shape[1]
    for i, s in enumerate(seqs):
        n = len(s)
        alone = our_logits(decoder, s[None])[0]
        torch.testing.assert_close(got[i, t - n:], alone, **LOGITS)
        torch.testing.assert_close(got[i, t - n:], want[i, t - n:], **LOGITS)
        assert torch.isfinite(got[i]).all(), "padding rows must stay finite"


# ---- KV cache ------------------------------------------------------------------------------------


def test_kv_cache_decoding_equals_recomputation(llama):
    _, decoder = llama
    ids = torch.randint(0, 113, (1, 20), generator=torch.Generator().manual_seed(3))
    full = our_logits(decoder, ids)
    cache = KVCache(len(decoder.layers))
    prefix = 12
    got = [our_logits(decoder, ids[:, :prefix], cache=cache)]
    for t in range(prefix, ids.shape[1]):
        step = our_logits(decoder, ids[:, t:t + 1], positions=torch.tensor([[t]]), cache=cache)
        got.append(step)
        torch.testing.assert_close(step[:, 0], full[:, t], **FEATURES, msg=f"step {t}")
    torch.testing.assert_close(torch.cat(got, dim=1), full, **FEATURES)


def test_kv_cache_small_capacity_grows(llama):
    """A cache made with a capacity smaller than the sequence grows without changing results."""
    _, decoder = llama
    ids = torch.randint(0, 113, (1, 11), generator=torch.Generator().manual_seed(4))
    full = our_logits(decoder, ids)
    cache = KVCache(len(decoder.layers), capacity=2)
    our_logits(decoder, ids[:, :3], cache=cache)
    for t in range(3, ids.shape[1]):
        step = our_logits(decoder, ids[:, t:t + 1], positions=torch.tensor([[t]]), cache=cache)
        torch.testing.assert_close(step[:, 0], full[:, t], **FEATURES, msg=f"step {t}")


def test_kv_cache_left_padded_batch(llama):
    _, decoder = llama
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, 113, (n,), generator=g) for n in (6, 13)]
    new = torch.randint(0, 113, (2, 5), generator=g)
    ids, types, positions, _ = left_padded(seqs)
    cache = KVCache(len(decoder.layers))
    first = our_logits(decoder, ids, types, positions, cache=cache)
    lengths = torch.tensor([len(s) for s in seqs])
    steps = [first]
    for j in range(new.shape[1]):
        pos = (lengths + j)[:, None]
        steps.append(our_logits(decoder, new[:, j:j + 1], text_types(2, 1), pos, cache=cache))
    got = torch.cat(steps, dim=1)
    # Full recomputation of the padded batch with the new tokens appended ...
    full_ids = torch.cat((ids, new), dim=1)
    full_types = torch.cat((types, text_types(2, new.shape[1])), dim=1)
    full_pos = torch.cat((positions, lengths[:, None] + torch.arange(new.shape[1])), dim=1)
    full = our_logits(decoder, full_ids, full_types, full_pos)
    t = ids.shape[1]
    for i, s in enumerate(seqs):
        real = slice(t - len(s), None)
        torch.testing.assert_close(got[i, real], full[i, real], **FEATURES)
        # ... and each sequence alone, unpadded, without a cache.
        alone = our_logits(decoder, torch.cat((s, new[i]))[None])[0]
        torch.testing.assert_close(got[i, real], alone, **LOGITS)
