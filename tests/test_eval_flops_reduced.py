"""`shortv eval`'s FLOPs ratio for a method that reduces images before the language model
(VisionZip) is against vanilla on the full images, not on the reduced ones."""

from __future__ import annotations

import json
from pathlib import Path

import shortv
from shortv.eval.runner import evaluate
from shortv.flops import decoder_flops
from shortv.questions import read_questions

REPO = Path(shortv.__file__).resolve().parents[1]
IMAGE = REPO / "weights" / "llava-tiny-demo" / "example.png"


def test_visionzip_ratio_counts_the_full_image_for_vanilla(tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "image": str(IMAGE), "text": "What is it?"}) + "\n")
    model = shortv.load("llava-tiny-demo", method=shortv.VisionZip(budget=9))
    summary = evaluate(model, read_questions(questions), tmp_path / "a.jsonl",
                       options=shortv.GenerationOptions(max_new_tokens=2), progress=False)
    enc = model.encode("What is it?", [IMAGE])
    n_text = int((enc.input_ids != shortv.IMAGE_TOKEN).sum())
    c = model.config.text
    vanilla = decoder_flops(c, shortv.Vanilla(), n_text, 36)  # the demo's 36 patches per image
    reduced = decoder_flops(c, shortv.Vanilla(), n_text, 9)
    assert abs(summary["mean_vanilla_prefill_tflops"] * 1e12 - vanilla) < 1
    assert abs(summary["mean_prefill_tflops"] * 1e12 - reduced) < 1
