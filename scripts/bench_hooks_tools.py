"""The residual stream of every decoder layer, cached by shortv, by TransformerLens and by
nnsight on the same llava-hf checkpoint: time (interleaved, medians) and agreement with
transformers' own hidden states.

    python -m venv /tmp/tlv && /tmp/tlv/bin/pip install torch transformers transformer-lens nnsight
    PYTHONPATH=. /tmp/tlv/bin/python scripts/bench_hooks_tools.py [HF_DIR] [--repeats 7]

TransformerLens and nnsight are installed for this benchmark only (never a dependency of
shortv). HF_DIR: a llava-hf checkpoint (default: the demo's, weights/llava-tiny-demo-hf).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

import shortv

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_hooks import interleaved_ms  # the sibling script's timing loop

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", default=str(ROOT / "weights" / "llava-tiny-demo-hf"))
    parser.add_argument("--image", default=str(ROOT / "weights" / "llava-tiny-demo" / "example.png"))
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    from nnsight import NNsight
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import LlavaForConditionalGeneration

    ours = shortv.load(args.checkpoint, device="cpu", dtype=torch.float32)
    enc = ours.encode("What is in this picture?", args.image)
    hf = LlavaForConditionalGeneration.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
    n_image = int((ours.token_types(enc) == int(shortv.TokenType.VISUAL)).sum())
    ids: list[int] = []
    for i in enc.input_ids.tolist():
        ids += [hf.config.image_token_id] * n_image if i == shortv.IMAGE_TOKEN else [i]
    input_ids, pixels = torch.tensor([ids]), enc.images[0][None]
    bridge = TransformerBridge.boot_transformers(args.checkpoint, hf_model=hf, device="cpu")
    traced = NNsight(hf)
    layers = ours.num_layers

    def transformers_states():
        out = hf(input_ids=input_ids, pixel_values=pixels, output_hidden_states=True)
        return [out.hidden_states[i + 1][0] for i in range(layers - 1)]  # the last one is normed

    def shortv_states():
        _, cache = ours.run_with_cache(enc, names=["resid_post"])
        return [cache["resid_post", i][0] for i in range(layers - 1)]

    def lens_states():
        _, cache = bridge.run_with_cache(input_ids, pixel_values=pixels,
                                         names_filter=lambda name: name.startswith("blocks.")
                                         and name.endswith("hook_resid_post"))
        return [cache[f"blocks.{i}.hook_resid_post"][0] for i in range(layers - 1)]

    def nnsight_states():
        saved: list = []  # filled inside the trace (nnsight runs the block's own source)
        with traced.trace(input_ids=input_ids, pixel_values=pixels):
            for layer in traced.model.language_model.layers:
                saved.append(layer.output.save())
        return [(s[0] if isinstance(s, tuple) else s)[0] for s in saved[: layers - 1]]

    cases = {"transformers (output_hidden_states)": transformers_states,
             "shortv run_with_cache": shortv_states,
             "TransformerLens 4.3 TransformerBridge.run_with_cache": lens_states,
             "nnsight 0.8 trace + save": nnsight_states}
    with torch.no_grad():
        reference = transformers_states()
        agreement = {name: max(float((a - b).abs().max()) for a, b in zip(fn(), reference, strict=True))
                     for name, fn in cases.items()}
        times = interleaved_ms(cases, args.repeats)
    rows = [{"case": name, "ms": statistics.median(runs), "runs_ms": [round(r, 1) for r in runs],
             "max_abs_diff_vs_transformers": agreement[name]} for name, runs in times.items()]
    report = {"checkpoint": args.checkpoint, "tokens": len(ids), "layers": layers, "rows": rows}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
