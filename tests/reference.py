"""Independent references that the tests compare shortv against.

Everything here is written independently of shortv's own code paths (apart from the key
maps under test and, for the decoder references, the model's weights and `prepare`'s
embeddings), so that a test compares shortv against transformers / open_clip /
sentencepiece / original LLaVA / plain torch rather than against itself:

- images: original LLaVA's `expand2square` + transformers' CLIP processor;
- transformers: inputs as llava-hf's processor builds them, LLaVA-NeXT's counts and logits;
- state dicts renamed with a KeyMap layout;
- original LLaVA-NeXT "anyres", re-implemented from the original code;
- original LLaVA's prompt tokenization (transformers 4.37's slow LlamaTokenizer +
  `tokenizer_image_token`);
- the decoder and the methods' rules: the hooked ShortV reference, an explicit float64
  Llama forward with keys hidden per layer, FastV's kept set from explicit attention,
  greedy decoding by recomputation, FLOPs by torch's counter and in closed form;
- Layer Contribution's building blocks: a hooked vanilla run's last logits, KL(q || p);
- loglikelihood from `model.logits` alone (lmms-eval's requests).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import shortv
from shortv import IMAGE_PLACEHOLDER, IMAGE_TOKEN, Encoded, TokenType, Vanilla
from shortv.generate import GenerationOptions, token_steps

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
T_, V_, P_ = int(TokenType.TEXT), int(TokenType.VISUAL), int(TokenType.PAD)
TOL = dict(atol=1e-5, rtol=1e-5)
SPACE = "\u2581"


# ---- images ---------------------------------------------------------------------------------


def random_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def expand2square(image: Image.Image, mean=OPENAI_CLIP_MEAN) -> Image.Image:
    """Original LLaVA's `expand2square` (llava/mm_utils.py), with the CLIP mean colour."""
    background = tuple(int(x * 255) for x in mean)
    width, height = image.size
    if width == height:
        return image
    if width > height:
        result = Image.new(image.mode, (width, width), background)
        result.paste(image, (0, (width - height) // 2))
        return result
    result = Image.new(image.mode, (height, height), background)
    result.paste(image, ((height - width) // 2, 0))
    return result


def clip_processor(size: int):
    """transformers' CLIP image processor (PIL backend) at `size`, as LLaVA-1.5 uses it."""
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD),
    )


def reference_pixels(image: Image.Image, size: int, *, pad: bool = True) -> torch.Tensor:
    """[3, size, size]: LLaVA-1.5's preprocessing done by transformers on an RGB image."""
    image = expand2square(image) if pad else image
    return clip_processor(size)(image, return_tensors="pt")["pixel_values"][0]


# ---- transformers inputs and outputs --------------------------------------------------------


def hf_input_ids(ids: torch.Tensor, image_token_index: int, tokens_per_image: int) -> torch.Tensor:
    """[1, T]: each -200 placeholder expanded into `tokens_per_image` image tokens, the way
    llava-hf's processor prepares prompts."""
    out: list[int] = []
    for i in ids.tolist():
        out.extend([image_token_index] * tokens_per_image if i == -200 else [i])
    return torch.tensor([out], dtype=torch.long)


def hf_tokens_per_image(config) -> int:
    """Visual tokens per image of a transformers LlavaConfig (LLaVA-1.5: patches, + CLS
    with the 'full' strategy)."""
    vc = config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    return n + (config.vision_feature_select_strategy == "full")


def hf_num_crops(hf, size: tuple[int, int]) -> int:
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    w, h = size
    return image_size_to_num_patches((h, w), hf.config.image_grid_pinpoints,
                                     hf.config.vision_config.image_size)


def hf_visual_count(hf, size: tuple[int, int]) -> int:
    """transformers' own count: pack_image_features on zero features of the right shape."""
    vc = hf.config.vision_config
    side = vc.image_size // vc.patch_size
    w, h = size
    feats = torch.zeros(hf_num_crops(hf, size), side * side, hf.config.text_config.hidden_size)
    with torch.no_grad():
        _, lens = hf.model.pack_image_features([feats], torch.tensor([[h, w]]), "default",
                                               image_newline=hf.model.image_newline)
    return int(lens[0])


def hf_logits(hf, encoded: shortv.Encoded, counts: list[int]) -> torch.Tensor:
    """transformers' logits [T, V]: each -200 expanded into its image's token count,
    pixel_values [images, max crops, 3, S, S] zero-padded, image_sizes (height, width)."""
    return hf_forward(hf, encoded, counts).logits[0]


def hf_forward(hf, encoded: shortv.Encoded, counts: list[int], **options):
    """transformers' output for `encoded` as `hf_logits` feeds it (`options`: e.g.
    output_hidden_states=True)."""
    token = hf.config.image_token_id
    ids: list[int] = []
    it = iter(counts)
    for i in encoded.input_ids.tolist():
        ids.extend([token] * next(it) if i == shortv.IMAGE_TOKEN else [i])
    kwargs = {}
    if encoded.images:
        most = max(im.shape[0] for im in encoded.images)
        pixels = torch.stack([torch.cat((im, im.new_zeros(most - im.shape[0], *im.shape[1:])))
                              for im in encoded.images])
        kwargs = dict(pixel_values=pixels,
                      image_sizes=torch.tensor([[h, w] for w, h in encoded.image_sizes]))
    with torch.no_grad():
        return hf(input_ids=torch.tensor([ids]), **kwargs, **options)


# ---- state dicts ----------------------------------------------------------------------------


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    assert all(k.startswith(prefix) for k in state), [k for k in state if not k.startswith(prefix)]
    return {k[len(prefix):]: v for k, v in state.items()}


def map_state(state: dict[str, torch.Tensor], layout) -> dict[str, torch.Tensor]:
    """Rename a state dict with a shortv KeyMap layout, dropping known-unused tensors and
    failing on unknown ones."""
    from shortv.checkpoint import KeyMap

    key_map = KeyMap(layout)
    out = {}
    for key, value in state.items():
        name = key_map(key)
        assert name is not False, f"unknown key {key}"
        if name is not None:
            out[name] = value
    return out


# ---- original LLaVA-NeXT "anyres" -----------------------------------------------------------
#
# Re-implemented from haotian-liu/LLaVA at c121f04 (the v1.6 release code), `llava/mm_utils.py`
# (select_best_resolution, resize_and_pad_image, divide_to_patches,
# get_anyres_image_grid_shape, process_anyres_image) and `llava/model/llava_arch.py`
# (unpad_image and the `mm_patch_merge_type` branch of prepare_inputs_labels_for_multimodal).
# Nothing in this section uses shortv. Conventions are the original's: image sizes and
# pinpoints are (width, height); PIL's `Image.resize` is called without a filter, as the
# original does (Pillow's default for RGB is bicubic); the CLIP step is transformers'
# CLIPImageProcessor (PIL backend).


def select_best_resolution(original_size, possible_resolutions):
    """(width, height) pinpoint: most effective resolution, then least waste; None when
    every pinpoint scales the image to zero pixels (the original then crashes)."""
    original_width, original_height = original_size
    best_fit = None
    max_effective_resolution = 0
    min_wasted_resolution = float("inf")
    for width, height in possible_resolutions:
        scale = min(width / original_width, height / original_height)
        downscaled_width = int(original_width * scale)
        downscaled_height = int(original_height * scale)
        effective_resolution = min(downscaled_width * downscaled_height,
                                   original_width * original_height)
        wasted_resolution = (width * height) - effective_resolution
        if effective_resolution > max_effective_resolution or (
            effective_resolution == max_effective_resolution
            and wasted_resolution < min_wasted_resolution
        ):
            max_effective_resolution = effective_resolution
            min_wasted_resolution = wasted_resolution
            best_fit = (width, height)
    return best_fit


def resize_and_pad_image(image: Image.Image, target_resolution) -> Image.Image:
    original_width, original_height = image.size
    target_width, target_height = target_resolution
    scale_w = target_width / original_width
    scale_h = target_height / original_height
    if scale_w < scale_h:
        new_width = target_width
        new_height = min(math.ceil(original_height * scale_w), target_height)
    else:
        new_height = target_height
        new_width = min(math.ceil(original_width * scale_h), target_width)
    resized_image = image.resize((new_width, new_height))
    new_image = Image.new("RGB", (target_width, target_height), (0, 0, 0))
    paste_x = (target_width - new_width) // 2
    paste_y = (target_height - new_height) // 2
    new_image.paste(resized_image, (paste_x, paste_y))
    return new_image


def divide_to_patches(image: Image.Image, patch_size: int) -> list[Image.Image]:
    patches = []
    width, height = image.size
    for i in range(0, height, patch_size):
        for j in range(0, width, patch_size):
            patches.append(image.crop((j, i, j + patch_size, i + patch_size)))
    return patches


def get_anyres_image_grid_shape(image_size, grid_pinpoints, patch_size):
    """(columns, rows) of the tile grid."""
    width, height = select_best_resolution(image_size, grid_pinpoints)
    return width // patch_size, height // patch_size


def anyres_crops(image: Image.Image, size: int, grid_pinpoints) -> list[Image.Image]:
    """process_anyres_image up to the CLIP step: the whole image resized to size×size,
    then the tiles of the padded image, row by row."""
    best_resolution = select_best_resolution(image.size, grid_pinpoints)
    image_padded = resize_and_pad_image(image, best_resolution)
    patches = divide_to_patches(image_padded, size)
    image_original_resize = image.resize((size, size))
    return [image_original_resize, *patches]


def anyres_pixels(image: Image.Image, size: int, grid_pinpoints) -> torch.Tensor:
    """process_anyres_image: [1 + tiles, 3, size, size]."""
    processor = clip_processor(size)
    crops = anyres_crops(image, size, grid_pinpoints)
    return torch.stack([processor(c, return_tensors="pt")["pixel_values"][0] for c in crops])


def unpad_image(tensor: torch.Tensor, original_size) -> torch.Tensor:
    """tensor [C, H, W]; original_size (width, height)."""
    original_width, original_height = original_size
    current_height, current_width = tensor.shape[1:]
    original_aspect_ratio = original_width / original_height
    current_aspect_ratio = current_width / current_height
    if original_aspect_ratio > current_aspect_ratio:
        scale_factor = current_width / original_width
        new_height = int(original_height * scale_factor)
        padding = (current_height - new_height) // 2
        return tensor[:, padding:current_height - padding, :]
    scale_factor = current_height / original_height
    new_width = int(original_width * scale_factor)
    padding = (current_width - new_width) // 2
    return tensor[:, :, padding:current_width - padding]


def merge_crops(image_feature: torch.Tensor, image_size, *, merge_type: str, grid_pinpoints,
                tile: int, side: int, image_newline: torch.Tensor | None = None) -> torch.Tensor:
    """One image's projected crop features [C, P, D] → its visual tokens [N, D], as the
    original's `mm_patch_merge_type` branch does (image_aspect_ratio 'anyres')."""
    if merge_type == "flat":
        return image_feature.flatten(0, 1)
    assert merge_type.startswith("spatial"), merge_type
    if image_feature.shape[0] > 1:
        base_image_feature = image_feature[0]
        image_feature = image_feature[1:]
        height = width = side
        assert height * width == base_image_feature.shape[0]
        num_patch_width, num_patch_height = get_anyres_image_grid_shape(
            image_size, grid_pinpoints, tile)
        image_feature = image_feature.view(num_patch_height, num_patch_width, height, width, -1)
        if "unpad" in merge_type:
            image_feature = image_feature.permute(4, 0, 2, 1, 3).contiguous()
            image_feature = image_feature.flatten(1, 2).flatten(2, 3)
            image_feature = unpad_image(image_feature, image_size)
            image_feature = torch.cat((
                image_feature,
                image_newline[:, None, None].expand(*image_feature.shape[:-1], 1),
            ), dim=-1)
            image_feature = image_feature.flatten(1, 2).transpose(0, 1)
        else:
            image_feature = image_feature.permute(0, 2, 1, 3, 4).contiguous()
            image_feature = image_feature.flatten(0, 3)
        return torch.cat((base_image_feature, image_feature), dim=0)
    image_feature = image_feature[0]
    if "unpad" in merge_type:
        image_feature = torch.cat((image_feature, image_newline[None]), dim=0)
    return image_feature


def num_crops(image_size, grid_pinpoints, tile: int) -> int:
    """1 (the base) + the tiles divide_to_patches cuts from the padded image."""
    width, height = select_best_resolution(image_size, grid_pinpoints)
    return 1 + math.ceil(height / tile) * math.ceil(width / tile)


def num_visual_tokens(image_size, *, grid_pinpoints, tile: int, patch: int,
                      merge_type: str = "spatial_unpad") -> int:
    """Visual tokens of one image: merge_crops on zero features of the right shape."""
    side = tile // patch
    crops = num_crops(image_size, grid_pinpoints, tile)
    feats = torch.zeros(crops, side * side, 1)
    newline = torch.zeros(1)
    return merge_crops(feats, image_size, merge_type=merge_type, grid_pinpoints=grid_pinpoints,
                       tile=tile, side=side, image_newline=newline).shape[0]


# ---- original LLaVA's prompt tokenization ---------------------------------------------------
#
# transformers 4.37's slow LlamaTokenizer called through LLaVA's `tokenizer_image_token`.

# ModelProto field 3 (normalizer_spec, length-delimited) holding NormalizerSpec field 3
# (add_dummy_prefix, varint) = 0. Protobuf merges repeated message fields, so appending it
# to a serialized model is `model.normalizer_spec.MergeFrom(NormalizerSpec(add_dummy_prefix=
# False))`, which is what LlamaTokenizer.get_spm_processor did for legacy=False.
NO_DUMMY_PREFIX = bytes([(3 << 3) | 2, 2, (3 << 3) | 0, 0])


class SlowLlamaTokenizer:
    """transformers 4.37 LlamaTokenizer (slow) with the model's own <unk>/<s>/</s> as its
    special tokens (AddedTokens without lstrip/rstrip, as in LLaVA's tokenizer_config)."""

    def __init__(self, model_file: Path, *, legacy: bool, add_bos: bool = True) -> None:
        import sentencepiece as spm  # only the tokenizer tests need it (they skip without it)

        proto = Path(model_file).read_bytes()
        self.sp = spm.SentencePieceProcessor(model_proto=proto if legacy else proto + NO_DUMMY_PREFIX)
        self.legacy = legacy
        self.add_bos = add_bos
        self.unk = self.sp.id_to_piece(self.sp.unk_id())
        self.bos = self.sp.bos_id()
        self.special = (
            self.sp.id_to_piece(self.sp.unk_id()),
            self.sp.id_to_piece(self.sp.bos_id()),
            self.sp.id_to_piece(self.sp.eos_id()),
        )

    def _tokenize(self, text: str) -> list[str]:
        tokens = self.sp.encode(text, out_type=str)
        if self.legacy or not text.startswith((SPACE, " ")):
            return tokens
        tokens = self.sp.encode(self.unk + text, out_type=str)
        unk_token_length = len(self.sp.encode(self.unk, out_type=str))
        return tokens[unk_token_length:] if len(tokens) >= unk_token_length else tokens

    def _base_tokenize(self, text: str) -> list[str]:
        # PreTrainedTokenizer.tokenize: split on the added (special) tokens, then _tokenize.
        pattern = "(" + "|".join(re.escape(s) for s in self.special) + ")"
        out: list[str] = []
        for part in re.split(pattern, text):
            if not part:
                continue
            out += [part] if part in self.special else self._tokenize(part)
        return out

    def tokenize(self, text: str) -> list[str]:
        if self.legacy or len(text) == 0:
            return self._base_tokenize(text)
        tokens = self._base_tokenize(SPACE + text.replace(SPACE, " "))
        if len(tokens) > 1 and tokens[0] == SPACE and tokens[1] in self.special:
            tokens = tokens[1:]
        return tokens

    def __call__(self, text: str) -> list[int]:
        """tokenizer(text).input_ids"""
        ids = [self.sp.piece_to_id(t) for t in self.tokenize(text)]
        return [self.bos, *ids] if self.add_bos else ids


def llava_tokenize(prompt: str, tokenizer: SlowLlamaTokenizer) -> list[int]:
    """llava.mm_utils.tokenizer_image_token, verbatim in substance."""
    prompt_chunks = [tokenizer(chunk) for chunk in prompt.split("<image>")]

    def insert_separator(x, sep):
        return [ele for sublist in zip(x, [sep] * len(x), strict=True) for ele in sublist][:-1]

    input_ids: list[int] = []
    offset = 0
    if prompt_chunks and prompt_chunks[0] and prompt_chunks[0][0] == tokenizer.bos and tokenizer.add_bos:
        offset = 1
        input_ids.append(prompt_chunks[0][0])
    for x in insert_separator(prompt_chunks, [IMAGE_TOKEN] * (offset + 1)):
        input_ids.extend(x[offset:])
    return input_ids


# ---- the decoder: inputs, token types -------------------------------------------------------


def two_image_prompt(model: shortv.LLaVA, images: list[Image.Image]) -> Encoded:
    return model.encode("Compare the first <image> with the second <image>: which is brighter?",
                        images[1:3])


def batch_prompts(model: shortv.LLaVA, images: list[Image.Image]) -> list[Encoded]:
    """Different lengths and image counts (1, 2, 0): left padding, and fillers for gathered rows."""
    return [
        model.encode("What is this?", [images[0]]),
        model.encode("Describe both pictures in detail, left then right, with colors.", images[1:3]),
        model.encode("hello there, what color is the sky today?"),
    ]


def visual_per_image(model: shortv.LLaVA) -> int:
    v = model.config.vision
    return (v.image_size // v.patch_size) ** 2


def expected_types(model: shortv.LLaVA, batch: list[Encoded]) -> torch.Tensor:
    """[B, T] token types rebuilt from the ids: each IMAGE_TOKEN becomes that image's
    visual tokens (flat LLaVA-1.5 merge, 'patch' features), left padding is PAD."""
    n = visual_per_image(model)
    rows = []
    for enc in batch:
        row: list[int] = []
        for t in enc.input_ids.tolist():
            row += [V_] * n if t == IMAGE_TOKEN else [T_]
        rows.append(row)
    width = max(len(r) for r in rows)
    return torch.tensor([[P_] * (width - len(r)) + r for r in rows], dtype=torch.long)


def prepared_and_types(model: shortv.LLaVA, batch: list[Encoded]):
    prepared = model.prepare(batch)
    types = expected_types(model, batch)
    assert torch.equal(prepared.types.long(), types), "prepare() produced unexpected token types"
    return prepared, types


# ---- the decoder: hooked ShortV, explicit float64 forward -----------------------------------


def frozen_reference(model: shortv.LLaVA, prepared, types: torch.Tensor, layers,
                     kind: int = V_) -> torch.Tensor:
    """A VANILLA run in which each layer of `layers` keeps its input for the `kind` rows:
    output[kind] = input[kind], i.e. their attention and MLP updates are zeroed."""
    reset = (types == kind)[..., None]

    def hook(module, args, output):
        x = args[0]
        out, scores = output
        assert out.shape == x.shape == (*types.shape, x.shape[-1])
        return torch.where(reset, x, out), scores

    handles = [model.module.decoder.layers[i].register_forward_hook(hook) for i in layers]
    try:
        with torch.no_grad():
            return model.hidden_states(prepared, method=Vanilla())
    finally:
        for h in handles:
            h.remove()


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


def _rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Llama RoPE (rotate-half convention) on [B, H, T, D] at integer positions [B, T]."""
    d = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = positions.double()[..., None] * inv_freq  # [B, T, D/2]
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _attention_probs(model: shortv.LLaVA, layer: int, x: torch.Tensor, allowed: torch.Tensor,
                     positions: torch.Tensor):
    """(probs [B, H, T, S], v [B, H, S, D]) of one layer, explicitly, in float64.
    allowed: [B, T, S] bool."""
    c = model.config.text
    w = model.module.decoder.layers[layer]
    h = _rms(x.double(), w.attn_norm.weight, c.rms_norm_eps)
    b, t, _ = h.shape

    def heads(proj, n):
        return (h @ proj.weight.double().T).view(b, t, n, c.head_dim).transpose(1, 2)

    q = _rope(heads(w.attn.q_proj, c.heads), positions, c.rope_theta)
    k = _rope(heads(w.attn.k_proj, c.kv_heads), positions, c.rope_theta)
    v = heads(w.attn.v_proj, c.kv_heads)
    group = c.heads // c.kv_heads
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    logits = q @ k.transpose(-1, -2) / math.sqrt(c.head_dim)
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # rows without keys: padding
    return probs, v


def base_mask(types: torch.Tensor) -> torch.Tensor:
    """[B, T, T]: causal, padding keys excluded."""
    t = types.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    return causal[None] & (types != P_)[:, None, :]


def reference_decoder(model: shortv.LLaVA, prepared, types: torch.Tensor,
                      hidden_keys: dict[int, torch.Tensor] | None = None):
    """Explicit float64 forward of the decoder layers. hidden_keys[i]: [B, T] keys that no
    query of layer i may attend to. Returns (output, inputs of every layer)."""
    c = model.config.text
    hidden_keys = hidden_keys or {}
    x = prepared.embeds.double()
    positions = prepared.positions
    mask = base_mask(types)
    inputs = []
    for i, w in enumerate(model.module.decoder.layers):
        inputs.append(x)
        allowed = mask & ~hidden_keys[i][:, None, :] if i in hidden_keys else mask
        probs, v = _attention_probs(model, i, x, allowed, positions)
        b, _, t, _ = probs.shape
        attn = (probs @ v).transpose(1, 2).reshape(b, t, -1) @ w.attn.o_proj.weight.double().T
        y = x + attn
        hm = _rms(y, w.mlp_norm.weight, c.rms_norm_eps)
        gate = torch.nn.functional.silu(hm @ w.mlp.gate_proj.weight.double().T)
        y = y + (gate * (hm @ w.mlp.up_proj.weight.double().T)) @ w.mlp.down_proj.weight.double().T
        x = y
    return x, inputs


def reference_head(model: shortv.LLaVA, hidden: torch.Tensor) -> torch.Tensor:
    d = model.module.decoder
    return _rms(hidden.double(), d.norm.weight, model.config.text.rms_norm_eps) @ \
        d.lm_head.weight.double().T


def assert_rows_close(actual: torch.Tensor, expected: torch.Tensor, rows: torch.Tensor, **tol):
    assert bool(rows.any())
    torch.testing.assert_close(actual[rows].double(), expected[rows].double(), **(tol or TOL))


# ---- Layer Contribution by brute force: a hooked vanilla run per layer and type -------------


def last_logits(model: shortv.LLaVA, prepared, reset: dict[int, torch.Tensor]) -> torch.Tensor:
    """Last-position logits of a VANILLA run where layer i's output rows reset[i] ([B, T])
    are replaced by the layer's input."""

    def hook_for(rows):
        def hook(module, args, output):
            x = args[0]
            out, scores = output
            assert out.shape == x.shape
            return torch.where(rows[..., None], x, out), scores

        return hook

    handles = [model.module.decoder.layers[i].register_forward_hook(hook_for(rows))
               for i, rows in reset.items()]
    try:
        with torch.no_grad():
            hidden = model.hidden_states(prepared, method=Vanilla())[:, -1]
    finally:
        for h in handles:
            h.remove()
    d = model.module.decoder
    h = hidden.double()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + model.config.text.rms_norm_eps)
    return (h * d.norm.weight.double()) @ d.lm_head.weight.double().T


def kl_q_p(q_logits: torch.Tensor, p_logits: torch.Tensor) -> float:
    log_q = torch.log_softmax(q_logits.double(), dim=-1)
    log_p = torch.log_softmax(p_logits.double(), dim=-1)
    return float((log_q.exp() * (log_q - log_p)).sum())


# ---- greedy decoding: cached (the library's) and recomputed ---------------------------------


def cached_tokens(model: shortv.LLaVA, batch: list[Encoded], n: int) -> list[list[int]]:
    """Greedy tokens per sequence from the library's cached generation loop."""
    steps = list(token_steps(model, batch, GenerationOptions(max_new_tokens=n)))[1:]
    assert len(steps) == n
    return [list(seq) for seq in zip(*steps, strict=True)]


def grown(enc: Encoded, new: list[int]) -> Encoded:
    ids = torch.cat((enc.input_ids, torch.tensor(new, dtype=torch.long)))
    return Encoded(ids, enc.images, enc.image_sizes)


def recomputed_tokens(model: shortv.LLaVA, enc: Encoded, n: int) -> list[int]:
    """Greedy decoding by full recomputation of model.logits (model's method) each step."""
    out: list[int] = []
    for _ in range(n):
        logits = model.logits(grown(enc, out))[-1]
        top = logits.topk(2).values
        # fp32 logits agree to ~1e-6; a closer race would make the comparison ambiguous
        assert top[0] - top[1] > 1e-5, "near tie: the greedy comparison would be ambiguous"
        out.append(int(logits.argmax()))
    return out


def pinned_reference_tokens(model: shortv.LLaVA, enc: Encoded, n: int,
                            hidden_keys: Callable[[int], dict[int, torch.Tensor]]) -> list[int]:
    """Greedy tokens by explicit float64 recomputation of the grown prompt at every step,
    with what a method dropped at the prefill pinned: hidden_keys(new) gives, for the prompt
    grown by `new` tokens, the keys each layer may not attend to."""
    out: list[int] = []
    for _ in range(n):
        p, t = prepared_and_types(model, [grown(enc, out)])
        hidden, _ = reference_decoder(model, p, t, hidden_keys(len(out)))
        logits = reference_head(model, hidden[0, -1])
        top = logits.topk(2).values
        assert top[0] - top[1] > 1e-5
        out.append(int(logits.argmax()))
    return out


def pinned_keys(dropped: torch.Tensor, start: int, num_layers: int, extra: int) -> dict[int, torch.Tensor]:
    """`dropped` [1, T] hidden as keys in layers start.., padded for `extra` new tokens."""
    hide = torch.cat((dropped, torch.zeros(1, extra, dtype=torch.bool)), 1)
    return {i: hide for i in range(start, num_layers)}


# ---- FastV's kept set -----------------------------------------------------------------------


def fastv_dropped(model: shortv.LLaVA, prepared, types: torch.Tensor, k: int, r: float):
    """[B, T] visual tokens FastV drops, from explicit attention of layer k-1's last query
    over all keys (mean over heads), its input taken from the reference forward."""
    _, inputs = reference_decoder(model, prepared, types)
    probs, _ = _attention_probs(model, k - 1, inputs[k - 1], base_mask(types), prepared.positions)
    return select_dropped(probs[:, :, -1].mean(dim=1), types, r)[0]


def select_dropped(scores: torch.Tensor, types: torch.Tensor, r: float):
    """Top round((1-r)·n_visual) visual tokens by score are kept; returns (dropped [B, T],
    smallest score gap at the keep/drop boundary)."""
    dropped = torch.zeros_like(types, dtype=torch.bool)
    gap = math.inf
    for b in range(types.shape[0]):
        vis = torch.nonzero(types[b] == V_).flatten()
        n_keep = round((1 - r) * len(vis))
        order = vis[scores[b, vis].argsort(descending=True)]
        dropped[b, order[n_keep:]] = True
        if 0 < n_keep < len(vis):
            gap = min(gap, float(scores[b, order[n_keep - 1]] - scores[b, order[n_keep]]))
    return dropped, gap


# ---- FLOPs on the real forward, and in closed form ------------------------------------------


def counted_flops(model: shortv.LLaVA, prepared, method) -> int:
    """Matmul FLOPs of the decoder layers only (Decoder.forward applies no LM head), with
    SDPA on its math backend so that FlopCounterMode sees the attention matmuls (on CPU the
    fused kernels are not counted at all)."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model.module.decoder(prepared.embeds, prepared.types, prepared.positions, method=method)
    assert out.shape == prepared.embeds.shape  # hidden states, not logits
    return counter.get_total_flops()


def closed_form_layer(c, queries: int, keys: int) -> int:
    """Convention: 2 FLOPs per multiply-add; Q and O for queries, K and V for keys; the
    attention score and value matmuls over the full queries × keys rectangle (SDPA's math
    path computes all of it, masked or not); gate/up/down of the MLP for queries."""
    d, m, q_dim, kv_dim = c.hidden_size, c.intermediate_size, c.heads * c.head_dim, c.kv_heads * c.head_dim
    proj = 2 * queries * d * q_dim + 2 * queries * q_dim * d + 2 * 2 * keys * d * kv_dim
    attn = 2 * 2 * queries * keys * q_dim
    return proj + attn + 2 * 3 * queries * d * m


# ---- loglikelihood --------------------------------------------------------------------------


def reference_loglikelihood(model: shortv.LLaVA, question: str, image: Image.Image,
                            continuation: str) -> tuple[float, bool]:
    """log p(continuation | the chat prompt of question + image) from model.logits alone."""
    context = model.template.render([(IMAGE_PLACEHOLDER + "\n" + question, None)])
    context_ids = model.encode(context, [image], template=False).input_ids
    encoded = model.encode(context + continuation, [image], template=False)
    ids = encoded.input_ids
    assert torch.equal(ids[:len(context_ids)], context_ids)
    target = ids[len(context_ids):]
    assert model.tokenizer.decode(target.tolist()).strip() == continuation.strip()
    logits = model.logits(encoded).double()  # [T after image expansion, vocab]
    predicting = logits[-len(target) - 1:-1]  # each continuation token is predicted one earlier
    logprobs = torch.log_softmax(predicting, dim=-1).gather(-1, target[:, None]).sum()
    return float(logprobs), bool((predicting.argmax(-1) == target).all())


# ---- the authors' single-sequence forward (the methods' oracle tests) -------------------------


def authors_layer(model: shortv.LLaVA, layer: int, x: torch.Tensor, positions: torch.Tensor,
                  cache: tuple[torch.Tensor, torch.Tensor] | None = None):
    """One decoder layer as LLaVA's Llama runs it for a batch of one, in float64: x [T, D]
    at RoPE positions [T], after the cached (rotated) keys and values `cache` ([kv_heads, S,
    head_dim] each), causal. Returns (output [T, D], the cache extended by these tokens)."""
    c = model.config.text
    w = model.module.decoder.layers[layer]
    x = x.double()
    h = _rms(x, w.attn_norm.weight, c.rms_norm_eps)
    t = h.shape[0]

    def heads(proj, n):
        return (h @ proj.weight.double().T).view(1, t, n, c.head_dim).transpose(1, 2)

    q = _rope(heads(w.attn.q_proj, c.heads), positions[None], c.rope_theta)[0]
    k = _rope(heads(w.attn.k_proj, c.kv_heads), positions[None], c.rope_theta)[0]
    v = heads(w.attn.v_proj, c.kv_heads)[0]
    if cache is not None:
        k, v = torch.cat((cache[0], k), dim=1), torch.cat((cache[1], v), dim=1)
    s = k.shape[1]
    group = c.heads // c.kv_heads
    logits = q @ k.repeat_interleave(group, dim=0).transpose(-1, -2) / math.sqrt(c.head_dim)
    allowed = torch.ones(t, s, dtype=torch.bool).tril(diagonal=s - t)
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    attn = (probs @ v.repeat_interleave(group, dim=0)).transpose(0, 1).reshape(t, -1)
    y = x + attn @ w.attn.o_proj.weight.double().T
    hm = _rms(y, w.mlp_norm.weight, c.rms_norm_eps)
    gate = torch.nn.functional.silu(hm @ w.mlp.gate_proj.weight.double().T)
    y = y + (gate * (hm @ w.mlp.up_proj.weight.double().T)) @ w.mlp.down_proj.weight.double().T
    return y, (k, v)


def authors_scores(model: shortv.LLaVA, layer: int, x: torch.Tensor, positions: torch.Tensor,
                   rows: torch.Tensor) -> torch.Tensor:
    """[H, len(rows), T]: layer `layer`'s causal attention probabilities of the query rows
    `rows` over the tokens x [T, D] at positions [T] (its input norm, q/k projections, RoPE)."""
    c = model.config.text
    w = model.module.decoder.layers[layer]
    h = _rms(x.double(), w.attn_norm.weight, c.rms_norm_eps)
    t = h.shape[0]
    q = _rope((h @ w.attn.q_proj.weight.double().T).view(1, t, c.heads, c.head_dim).transpose(1, 2),
              positions[None], c.rope_theta)[0]
    k = _rope((h @ w.attn.k_proj.weight.double().T).view(1, t, c.kv_heads, c.head_dim).transpose(1, 2),
              positions[None], c.rope_theta)[0].repeat_interleave(c.heads // c.kv_heads, dim=0)
    logits = q[:, rows] @ k.transpose(-1, -2) / math.sqrt(c.head_dim)
    allowed = torch.arange(t)[None, :] <= rows[:, None]
    return torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)


class KeepRecorder:
    """Records, for every drop of a method class while active, the columns of the pass's
    input each sequence keeps (`LayerView.origins`; inserted tokens left out), per layer."""

    def __init__(self, method_class: type) -> None:
        self.method_class = method_class
        self.kept: list[tuple[int, list[list[int]]]] = []

    def __enter__(self) -> KeepRecorder:
        original = self.method_class.keep
        recorder = self

        def keep(method, view):
            mask = original(method, view)
            origin = view.origins()
            recorder.kept.append((view.layer, [
                sorted(origin[b][mask[b] & view.visual()[b] & (origin[b] >= 0)].tolist())
                for b in range(mask.shape[0])]))
            return mask

        self._patch = mock.patch.object(self.method_class, "keep", keep)
        self._patch.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._patch.stop()


def authors_dart_retained(last_layer_state: torch.Tensor, any_states: torch.Tensor, start: int, length: int,
                          token_topk: int, pivot_image_token: int = 4,
                          pivot_text_token: int = 4) -> list[int]:
    """Transcribed from ZichenWen1/DART (copy xqy1111111/DART at d6a5af6),
    `get_retained_image_token`, whose body is the same in the LLaVA code
    (llava/model/language_model/modeling_llama_self.py) and the Qwen2-VL code
    (Qwen2-VL/Qwen2VL_DART/modeling_qwen2_vl_self.py) but for how TOKEN_TOPK is computed,
    which the caller does by its code's formula. One sequence of a batch of one:
    last_layer_state [1, T, D] is layer K's input through the final norm; any_states
    [1, heads, T, head_dim] layer K - 1's rotated keys repeated to the query heads. Returns
    the retained image indices, sorted."""
    any_states = any_states.permute(0, 2, 1, 3).reshape(any_states.shape[0], any_states.shape[2], -1)
    k_image = any_states[0][start:start + length, :]
    k_query = any_states[0][start + length:, :]
    image_indices = (torch.norm(k_image, p=1, dim=-1).topk(pivot_image_token).indices + start).tolist()
    query_indices = (torch.norm(k_query, p=1, dim=-1).topk(pivot_text_token).indices
                     + start + length).tolist()
    indices_set = set(image_indices + query_indices)
    valid_indices = set(range(start, start + length)) - set(image_indices)
    valid_indices_list = list(valid_indices)
    for item in list(indices_set):
        valid_vectors = last_layer_state[0][valid_indices_list, :]
        cos_sim = -torch.nn.functional.cosine_similarity(last_layer_state[0][item, :], valid_vectors, dim=-1)
        top_k_real_indices = [valid_indices_list[i] for i in cos_sim.topk(token_topk).indices]
        indices_set.update(top_k_real_indices)
        valid_indices.difference_update(top_k_real_indices)
        valid_indices_list = list(valid_indices)
    indices_set.difference_update(query_indices)
    return sorted(indices_set)


def recomputed_with_hooks(model, enc, hooks, n: int) -> list[int]:
    """Greedy tokens by recomputing the whole grown sequence with the hooks at every step."""
    out: list[int] = []
    for _ in range(n):
        logits = model.run_with_hooks(grown(enc, out), hooks)[-1]
        top = logits.topk(2).values
        assert top[0] - top[1] > 1e-6, "near tie: choose other test data"
        out.append(int(logits.argmax()))
    return out


def reweighting(record: list, visual_scale: float):
    """An attn_pattern hook that records each call's last query row and scales every row's
    attention to visual keys by `visual_scale`, renormalised (row by row, so the same rule
    at a prefill and at a decode step)."""
    def fn(p, types):
        record.append(p[:, :, -1:].clone())
        scaled = p * torch.where(types == V_, visual_scale, 1.0).to(p.dtype)[:, None, None, :]
        return scaled / scaled.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    return fn
