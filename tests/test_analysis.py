"""`shortv.analysis`: the built-in interventions against the same change written out as a
hook (or as the method it equals), and the logit lens against an explicit float64 final
norm and head on the cached residual stream."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import shortv
from shortv import ConfigError, FastV, ShortV, TokenType, Vanilla
from shortv.analysis import heatmap, logit_lens, mean_ablate, patch, steer, token_map, zero_ablate

from .cli_runner import assert_one_line_error, run_main
from .reference import P_, V_, batch_prompts, random_rgb, reference_head


@pytest.fixture
def demo(demo_model: shortv.LLaVA):
    demo_model.set_method(Vanilla())
    yield demo_model
    demo_model.set_method(Vanilla())


def test_zero_ablating_visual_updates_is_shortv(demo, images):
    batch = batch_prompts(demo, images)
    frozen = (0, 3)
    hooks = {(point, i): zero_ablate(TokenType.VISUAL) for i in frozen for point in ("attn_out", "mlp_out")}
    hooked = demo.run_with_hooks(batch, hooks)
    demo.set_method(ShortV(frozen))
    torch.testing.assert_close(hooked, demo.run_with_hooks(batch, {}), atol=1e-9, rtol=0)


def test_mean_ablate_patch_and_steer_equal_the_change_written_out(demo, images):
    batch = batch_prompts(demo, images)
    width = demo.config.text.hidden_size

    def written_mean(x, types):  # each sequence's visual rows replaced by their mean
        out = x.clone()
        for b in range(x.shape[0]):
            rows = types[b] == V_
            if bool(rows.any()):
                out[b, rows] = x[b, rows].mean(dim=0)
        return out

    ablated = demo.run_with_hooks(batch, {("resid_mid", 2): mean_ablate(TokenType.VISUAL)})
    torch.testing.assert_close(ablated, demo.run_with_hooks(batch, {("resid_mid", 2): written_mean}),
                               atol=1e-9, rtol=0)
    given = torch.randn(width, dtype=torch.float64)

    def written_positions(x, types):  # the real tokens at positions 3 and 4 take `given`
        out = x.clone()
        at = torch.arange(x.shape[1])
        out[(types != P_) & (at >= 3) & (at < 5)] = given
        return out

    torch.testing.assert_close(
        demo.run_with_hooks(batch, {("resid_post", 1): mean_ablate(positions=[3, 4], mean=given)}),
        demo.run_with_hooks(batch, {("resid_post", 1): written_positions}), atol=1e-9, rtol=0)
    vector = torch.linspace(-1, 1, width, dtype=torch.float64)
    torch.testing.assert_close(
        demo.run_with_hooks(batch, {("resid_pre", 4): steer(vector, 0.5, TokenType.TEXT)}),
        demo.run_with_hooks(batch, {("resid_pre", 4): lambda x, t: x + 0.5 * (t == int(TokenType.TEXT))[
            ..., None] * vector}), atol=1e-9, rtol=0)


def test_patching_the_image_rows_from_another_run(demo):
    """Patching every row of resid_pre at layer 0 gives the other run's logits; patching
    the visual rows only gives the same here (the prompts differ only in their image)."""
    prompt = "What color is the shape?"
    a = demo.encode(prompt, [random_rgb(60, 40, seed=3)])
    b = demo.encode(prompt, [random_rgb(60, 40, seed=4)])
    _, cache_b = demo.run_with_cache(b, names=["resid_pre"], layers=[0])
    expected = demo.logits(b)
    torch.testing.assert_close(demo.run_with_hooks(a, {("resid_pre", 0): patch(cache_b, "resid_pre", 0)}),
                               expected, atol=1e-9, rtol=0)
    torch.testing.assert_close(
        demo.run_with_hooks(a, {("resid_pre", 0): patch(cache_b, "resid_pre", 0, TokenType.VISUAL)}),
        expected, atol=1e-9, rtol=0)
    longer = demo.encode(prompt + " Answer briefly.", [random_rgb(60, 40, seed=3)])
    with pytest.raises(ConfigError, match="same length"):
        demo.run_with_hooks(longer, {("resid_pre", 0): patch(cache_b, "resid_pre", 0)})


def test_logit_lens_reads_each_layer_through_the_final_norm_and_head(demo, images):
    enc = demo.encode("What is this?", [images[0]])
    lens = logit_lens(demo, enc, top_k=3)
    _, cache = demo.run_with_cache(enc, names=["resid_post"])
    for li, layer in enumerate(lens.layers):
        probs = reference_head(demo, cache["resid_post", layer][0]).softmax(dim=-1)
        top = probs.topk(3, dim=-1)
        assert torch.equal(lens.token_ids[li], top.indices)
        torch.testing.assert_close(lens.probs[li].double(), top.values, atol=1e-6, rtol=1e-6)
    assert int(lens.token_ids[-1, -1, 0]) == int(demo.logits(enc)[-1].argmax())  # the last layer: the model's
    assert bool(lens.present.all())
    visual_only = logit_lens(demo, enc, layers=[1, 5], types=[TokenType.VISUAL], top_k=1)
    assert visual_only.layers == [1, 5]
    assert torch.equal(visual_only.present[0], lens.types == V_)
    data = visual_only.as_dict(demo)
    assert {row["type"] for layer in data["layers"] for row in layer["positions"]} == {"visual"}
    with pytest.raises(ConfigError):
        logit_lens(demo, enc, top_k=0)


def test_logit_lens_under_fastv_marks_dropped_positions_absent(demo, images):
    enc = demo.encode("What is this?", [images[0]])
    demo.set_method(FastV(k=2, r=0.5))
    lens = logit_lens(demo, enc, top_k=1)
    visual = lens.types == V_
    n_visual = int(visual.sum())
    for li, layer in enumerate(lens.layers):
        held = int(lens.present[li][visual].sum())
        assert held == (n_visual if layer < 2 else round(n_visual * 0.5))


# ---- visual tokens on the picture --------------------------------------------------------------


def painted(size: tuple[int, int], box) -> Image.Image:
    """A black image of `size` with `box` (x0, y0, x1, y1) white."""
    image = Image.new("RGB", size, (0, 0, 0))
    x0, y0, x1, y1 = (round(float(v)) for v in box)
    image.paste((255, 255, 255), (x0, y0, x1, y1))
    return image


def cell_brightness(pixels: torch.Tensor, patch: int) -> torch.Tensor:
    """[rows · cols] the mean of a [3, H, W] tensor over each patch × patch cell, row by row."""
    _, h, w = pixels.shape
    return pixels.mean(0).view(h // patch, patch, w // patch, patch).mean(dim=(1, 3)).flatten()


def test_pad_boxes_are_where_the_processor_puts_the_patches(demo):
    """Oracle: the model's own preprocessing. Painting white the box a token is said to see,
    on a black wide picture, makes that token's patch the brightest of the padded square."""
    size = (90, 50)
    boxes = demo.visual_boxes(demo.encode("hi", Image.new("RGB", size)))[0]
    patch = demo.module.config.vision.patch_size
    assert boxes.shape[0] == 36
    inside = [k for k in range(36) if float((boxes[k, 2] - boxes[k, 0]) * (boxes[k, 3] - boxes[k, 1])) > 0]
    assert 0 < len(inside) < 36  # the top and bottom rows are padding
    for k in inside:
        brightness = cell_brightness(demo.processor(painted(size, boxes[k])), patch)
        assert int(brightness.argmax()) == k, k


def test_anyres_boxes_are_where_the_processor_puts_the_patches(hf_llava_next):
    """LLaVA-NeXT (spatial_unpad): a base token's box lights its patch of the base crop; a
    tile token's box lights its patch of its tile, the feature map's unpadded rows and
    columns read row by row, each row closed by a row-end token (no box)."""
    from shortv.models.anyres import grid_shape, unpad_slices

    model = shortv.load(hf_llava_next, device="cpu", dtype=torch.float32)
    c = model.module.config
    size = (60, 25)  # wide
    boxes = model.visual_boxes(model.encode("hi", Image.new("RGB", size)))[0]
    types = model.token_types(model.encode("<image>", Image.new("RGB", size), template=False))
    assert boxes.shape[0] == int((types == V_).sum())
    side, patch = c.vision.patches_per_side, c.vision.patch_size
    for k in range(side * side):  # the base crop
        crops = model.processor(painted(size, boxes[k]))
        assert int(cell_brightness(crops[0], patch).argmax()) == k
    cols, rows = grid_shape(size, c.image_grid_pinpoints, c.vision.image_size)
    row_slice, col_slice = unpad_slices(size, rows * side, cols * side)
    kept_columns = [*range(cols * side)[col_slice], None]  # None: the row-end token
    cells = [(r, col) for r in range(rows * side)[row_slice] for col in kept_columns]
    assert len(cells) == boxes.shape[0] - side * side
    for j, (r, col) in enumerate(cells):
        box = boxes[side * side + j]
        if col is None:
            assert bool(box.isnan().all())  # the row-end token
            continue
        if float((box[2] - box[0]) * (box[3] - box[1])) < 4:
            continue  # a sliver of the picture
        crops = model.processor(painted(size, box))
        tile = 1 + (r // side) * cols + col // side
        brightness = torch.stack([cell_brightness(crop, patch) for crop in crops[1:]])
        assert int(brightness.flatten().argmax()) == (tile - 1) * side * side + (r % side) * side + col % side


def test_heatmap_lights_the_box_of_a_scored_token(demo):
    size = (90, 50)
    enc = demo.encode("hi", Image.new("RGB", size))
    boxes = demo.visual_boxes(enc)[0]
    k = 20
    scores = torch.zeros(36)
    scores[k] = 1.0
    heat = token_map(demo, enc, scores)[0]
    x0, y0, x1, y1 = (round(float(v)) for v in boxes[k])
    lit = torch.nonzero(heat == 1.0)
    ys, xs = lit[:, 0], lit[:, 1]
    assert (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1) == (x0, y0, x1, y1)
    picture = heatmap(demo, enc, scores, Image.new("RGB", size, (0, 0, 255)))[0]
    assert picture.size == size
    assert picture.getpixel(((x0 + x1) // 2, (y0 + y1) // 2)) != picture.getpixel((2, 25))
    with pytest.raises(shortv.InputError, match="35 scores for 36"):
        token_map(demo, enc, torch.zeros(35))
    demo.set_method(shortv.VisionZip(budget=9))
    with pytest.raises(shortv.InputError, match="changes the images"):
        heatmap(demo, enc, scores)


# ---- shortv inspect ----------------------------------------------------------------------------

EXAMPLE = str(Path(__file__).resolve().parent.parent / "weights" / "llava-tiny-demo" / "example.png")


def test_inspect_draws_attention_and_kept_tokens_and_prints_the_lens(tmp_path, capsys):
    out = tmp_path / "map.png"
    code, stdout, err = run_main(["inspect", "llava-tiny-demo", "--image", EXAMPLE, "--prompt", "What is it?",
                                  "--attention", "3:1", "--out", str(out), "--json"], capsys)
    assert code == 0, err
    report = json.loads(stdout)
    assert report["layer"] == 3 and report["head"] == 1 and 0 < report["image_attention"] <= 1
    assert Image.open(out).size == Image.open(EXAMPLE).size
    code, stdout, err = run_main(["inspect", "llava-tiny-demo", "--image", EXAMPLE, "--prompt", "What is it?",
                                  "--kept", "fastv k=2 r=0.75", "--out", str(out), "--json"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["kept"] == 9 and json.loads(stdout)["visual"] == 36
    code, stdout, err = run_main(["inspect", "llava-tiny-demo", "--image", EXAMPLE, "--prompt", "What is it?",
                                  "--logit-lens", "--top-k", "2", "--json"], capsys)
    assert code == 0, err
    assert len(json.loads(stdout)["layers"]) == 8


@pytest.mark.parametrize("argv", [
    ["--attention", "3"],  # no --out
    ["--attention", "3:x", "--out", "m.png"],
    ["--attention", "99", "--out", "m.png"],
    ["--kept", "visionzip budget=9", "--out", "m.png"],
    ["--kept", "bogus", "--out", "m.png"],
    ["--logit-lens", "--top-k", "0"],
])
def test_inspect_bad_arguments_are_one_line(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ["inspect", "llava-tiny-demo", "--image", EXAMPLE, "--prompt", "x"]
    code, _, err = run_main([*base, *argv], capsys)
    assert_one_line_error(code, err)


def test_layer_contribution_is_the_zero_ablation_intervention(demo, images):
    """LC of layer i for a token type is KL(Q ‖ P) where Q is the model with that type's
    attn_out and mlp_out zeroed at layer i (`zero_ablate` hooks) and P the model: LC
    restarts from the layer inputs it keeps at the resid_pre hook point, and gives the
    same numbers."""
    from shortv.lc import kl, layer_contribution

    encs = [demo.encode("What is in this picture?", [images[0]]),
            demo.encode("Describe the colours, please.", [images[1]])]
    report = layer_contribution(demo, encs, batch_size=2, progress=False)
    p = torch.stack([demo.logits(enc)[-1] for enc in encs])
    for name, kind in (("visual", TokenType.VISUAL), ("text", TokenType.TEXT)):
        for i in range(demo.num_layers):
            hooks = {(point, i): zero_ablate(kind) for point in ("attn_out", "mlp_out")}
            q = torch.stack([demo.run_with_hooks(enc, hooks)[-1] for enc in encs])
            expected = float(kl(q, p).mean())
            assert abs(getattr(report, name)[i] - expected) <= 1e-9 + 1e-7 * abs(expected), (name, i)


def test_square_boxes_are_where_the_processor_puts_the_patches():
    """aspect "square" (shortest side resized, centre crop): painting a token's box makes
    its patch the brightest; boxes in the cropped-off sides are empty."""
    from shortv.image import ImageProcessor, llava_token_boxes

    processor = ImageProcessor(size=84, aspect_ratio="square")
    size = (120, 60)  # wide: the left and right are cropped off
    boxes = llava_token_boxes(size, image_size=84, patch=14, aspect_ratio="square", merge="flat")
    assert boxes.shape == (36, 4)
    for k in range(36):
        brightness = cell_brightness(processor(painted(size, boxes[k])), 14)
        assert int(brightness.argmax()) == k, k
    assert float(boxes[:, 0].min()) == 30.0 and float(boxes[:, 2].max()) == 90.0  # the centre 60 x 60
