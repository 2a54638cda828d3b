"""Loading a full-size Qwen2-VL / Qwen2.5-VL checkpoint: peak memory of `shortv.load`
against the checkpoint's size on disk.

    python scripts/bench_qwen_load.py [--dir PARENT] [--card qwen2-vl-2b-instruct]
        [--shards 2] [--dtype bfloat16] [--repeats 3] [--keep] [--json]

Writes a random checkpoint of the zoo card's shapes (Qwen2-VL-2B by default: 2.2 B
parameters, 4.4 GB in bf16) in Qwen's original release layout (flat config.json,
`visual.*` / `model.*` keys, tied embeddings stored once, sharded safetensors with
model.safetensors.index.json) into a temporary directory under --dir, tensor by tensor
with safetensors (no model of that size is built: the key names and shapes come from
transformers' own model class built on the meta device). Then it runs

    python -c "import shortv; shortv.load(DIR, device='cpu', dtype='bfloat16')"

--repeats times, each in a fresh process, and reads each child's peak resident memory
from the kernel's accounting (`os.wait4`'s ru_maxrss, what `/usr/bin/time -v` prints as
"Maximum resident set size"), next to that of `python -c "import shortv"` alone (torch's
own footprint, not the model's).
Target: peak <= 1.3 x the checkpoint's size (the weights are never held twice). The
directory is deleted afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from shortv import zoo
from shortv.models.qwen_config import QWEN2_VL, QwenVLConfig

TARGET = 1.3
LOAD = "import shortv; shortv.load({path!r}, device='cpu', dtype={dtype!r})"
IMPORT = "import shortv"


def hf_config(config: QwenVLConfig) -> Any:
    """transformers' config of the card's shapes (only its key names and shapes are used)."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    t, v = config.text, config.vision
    text = dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                num_hidden_layers=t.layers, num_attention_heads=t.heads, num_key_value_heads=t.kv_heads,
                rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta,
                                 "mrope_section": list(t.mrope_section)},
                bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id)
    common = dict(text_config=text, tie_word_embeddings=t.tie_word_embeddings)
    shape = dict(depth=v.depth, num_heads=v.heads, patch_size=v.patch_size,
                 temporal_patch_size=v.temporal_patch_size, spatial_merge_size=v.spatial_merge_size)
    if v.variant == QWEN2_VL:
        return Qwen2VLConfig(vision_config=dict(shape, embed_dim=v.width, hidden_size=v.out_width,
                                                mlp_ratio=v.mlp_dim // v.width), **common)
    return Qwen2_5_VLConfig(vision_config=dict(shape, hidden_size=v.width, out_hidden_size=v.out_width,
                                               intermediate_size=v.mlp_dim,
                                               fullatt_block_indexes=list(v.fullatt_block_indexes),
                                               window_size=v.window_size), **common)


def original_shapes(config: QwenVLConfig) -> dict[str, tuple[int, ...]]:
    """Every stored tensor's name (Qwen's original layout) and shape, in the model's
    order, from transformers' model class built on the meta device (no memory)."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    qwen2 = config.variant == QWEN2_VL
    cls = Qwen2VLForConditionalGeneration if qwen2 else Qwen2_5_VLForConditionalGeneration
    with torch.device("meta"):
        model = cls(hf_config(config))
    shapes = {}
    for key, value in model.state_dict().items():
        if config.text.tie_word_embeddings and key == "lm_head.weight":
            continue  # tied: stored once, as the embeddings
        key = key.replace("model.visual.", "visual.").replace("model.language_model.", "model.")
        shapes[key] = tuple(value.shape)
    return shapes


def config_json(config: QwenVLConfig) -> dict[str, Any]:
    """config.json as Qwen released it: the decoder's fields flat, `rope_scaling` mrope,
    the tower's fields in vision_config under Qwen's names."""
    t, v = config.text, config.vision
    raw: dict[str, Any] = {
        "architectures": ["Qwen2VLForConditionalGeneration" if v.variant == QWEN2_VL
                          else "Qwen2_5_VLForConditionalGeneration"],
        "model_type": v.variant, "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.layers, "num_attention_heads": t.heads, "num_key_value_heads": t.kv_heads,
        "vocab_size": t.vocab_size, "max_position_embeddings": t.max_position_embeddings,
        "rms_norm_eps": t.rms_norm_eps, "rope_theta": t.rope_theta, "hidden_act": "silu",
        "rope_scaling": {"type": "mrope", "mrope_section": list(t.mrope_section)},
        "sliding_window": 32768, "use_sliding_window": False, "max_window_layers": t.layers,
        "tie_word_embeddings": t.tie_word_embeddings, "bos_token_id": t.bos_token_id,
        "eos_token_id": t.eos_token_id, "image_token_id": config.image_token_id,
        "video_token_id": config.video_token_id, "vision_start_token_id": config.vision_start_token_id,
        "vision_end_token_id": config.vision_end_token_id, "torch_dtype": "bfloat16",
    }
    common = {"depth": v.depth, "num_heads": v.heads, "in_chans": 3, "patch_size": v.patch_size,
              "spatial_patch_size": v.patch_size, "spatial_merge_size": v.spatial_merge_size,
              "temporal_patch_size": v.temporal_patch_size}
    if v.variant == QWEN2_VL:
        raw["vision_config"] = {**common, "embed_dim": v.width, "mlp_ratio": v.mlp_dim // v.width,
                                "hidden_size": v.out_width}
    else:
        raw["vision_config"] = {**common, "hidden_act": v.act, "hidden_size": v.width,
                                "intermediate_size": v.mlp_dim, "out_hidden_size": v.out_width,
                                "window_size": v.window_size, "tokens_per_second": 2,
                                "fullatt_block_indexes": list(v.fullatt_block_indexes)}
    return raw


def shard_plan(shapes: dict[str, tuple[int, ...]], shards: int, itemsize: int) -> list[list[str]]:
    """Keys in order, cut into `shards` runs of about equal bytes."""
    total = sum(math.prod(s) for s in shapes.values()) * itemsize
    per = total / shards
    plan: list[list[str]] = [[]]
    size = 0
    for key, shape in shapes.items():
        if size >= per * len(plan) and len(plan) < shards:
            plan.append([])
        plan[-1].append(key)
        size += math.prod(shape) * itemsize
    return plan


def random_tensor(key: str, shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """Norm weights 1, everything else N(0, 0.02²): a plausible checkpoint; its values do
    not matter for loading."""
    if key.endswith("weight") and len(shape) == 1 and ("norm" in key or "ln_q" in key):
        return torch.ones(shape, dtype=dtype)
    return torch.randn(shape, generator=g, dtype=torch.float32).mul_(0.02).to(dtype)


def write_checkpoint(directory: Path, config: QwenVLConfig, *, shards: int, dtype: torch.dtype,
                     seed: int = 0) -> int:
    """The random checkpoint, shard by shard (one shard's tensors in memory at a time);
    its size on disk in bytes."""
    shapes = original_shapes(config)
    directory.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    plan = shard_plan(shapes, shards, torch.empty((), dtype=dtype).element_size())
    weight_map: dict[str, str] = {}
    for i, keys in enumerate(plan):
        name = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
        part = {k: random_tensor(k, shapes[k], dtype, g) for k in keys}
        save_file(part, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
        del part
    total = sum(math.prod(s) for s in shapes.values()) * torch.empty((), dtype=dtype).element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (directory / "config.json").write_text(json.dumps(config_json(config), indent=2))
    p = config.preprocess
    (directory / "preprocessor_config.json").write_text(json.dumps({
        "min_pixels": p.min_pixels, "max_pixels": p.max_pixels, "patch_size": config.vision.patch_size,
        "temporal_patch_size": config.vision.temporal_patch_size,
        "merge_size": config.vision.spatial_merge_size, "image_mean": list(p.mean),
        "image_std": list(p.std), "image_processor_type": "Qwen2VLImageProcessor"}))
    return weights_size(directory)


def weights_size(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


# Runs one command and prints its peak RSS. The command is started from this small
# process (no torch), not from the benchmark's: Linux counts a child's peak from the
# memory of the process it was forked from, so a child of the benchmark (which held
# gigabytes while writing the checkpoint) would inherit that figure.
MEASURER = r"""
import json, os, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
err = proc.stderr.read().decode(errors="replace")
_, status, usage = os.wait4(proc.pid, 0)
proc.returncode = os.waitstatus_to_exitcode(status)
print(json.dumps({"peak": usage.ru_maxrss * 1024, "seconds": time.perf_counter() - start,
                  "exit": proc.returncode, "stderr": err[-3000:]}))
"""


def peak_rss(code: str) -> tuple[int, float]:
    """(peak resident bytes, wall seconds) of `python -c code` in a fresh process, from
    the kernel's accounting of that child (wait4's ru_maxrss, KiB on Linux)."""
    out = subprocess.run([sys.executable, "-c", MEASURER, sys.executable, "-c", code],
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if out.returncode:
        sys.exit(f"measuring `python -c {code!r}` failed:\n{out.stderr[-3000:]}")
    run = json.loads(out.stdout)
    if run["exit"]:
        sys.exit(f"`python -c {code!r}` failed (exit {run['exit']}):\n{run['stderr']}")
    return run["peak"], run["seconds"]


def measure(directory: Path, dtype: str, repeats: int) -> dict[str, Any]:
    """Peak RSS of the load and of the import alone, medians of `repeats` fresh processes."""
    load = [peak_rss(LOAD.format(path=str(directory), dtype=dtype)) for _ in range(repeats)]
    imports = [peak_rss(IMPORT)[0] for _ in range(repeats)]
    return {"load_peak_bytes": statistics.median(r[0] for r in load),
            "load_peak_runs": [r[0] for r in load],
            "load_seconds": statistics.median(r[1] for r in load),
            "import_peak_bytes": statistics.median(imports)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=None,
                        help="where the temporary checkpoint directory goes (default: the system's)")
    parser.add_argument("--card", default="qwen2-vl-2b-instruct", help="zoo card giving the shapes")
    parser.add_argument("--shards", type=int, default=2, help="safetensors shards (Qwen2-VL-2B: 2)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                        help="stored and loaded dtype")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint (its path is printed)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    card = zoo.get_card(args.card)
    if not isinstance(card.config, QwenVLConfig):
        parser.error(f"--card {args.card} is not a Qwen2-VL / Qwen2.5-VL card")
    if args.shards < 1 or args.repeats < 1:
        parser.error("--shards and --repeats must be >= 1")
    dtype = getattr(torch, args.dtype)
    parent = args.dir or Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    directory = Path(tempfile.mkdtemp(prefix=f"{args.card}-", dir=parent))
    try:
        t0 = time.perf_counter()
        size = write_checkpoint(directory, card.config, shards=args.shards, dtype=dtype)
        written = time.perf_counter() - t0
        result = {"card": args.card, "dir": str(directory), "dtype": args.dtype, "shards": args.shards,
                  "checkpoint_bytes": size, "write_seconds": written, "torch": torch.__version__,
                  "command": f"python -c {LOAD.format(path=str(directory), dtype=args.dtype)!r}",
                  **measure(directory, args.dtype, args.repeats)}
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
    result["peak_over_checkpoint"] = result["load_peak_bytes"] / size
    result["net_over_checkpoint"] = (result["load_peak_bytes"] - result["import_peak_bytes"]) / size
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    gb = 1e9
    kept = f"; kept in {directory}" if args.keep else ""
    print(f"{args.card} (original layout, {args.dtype}, {args.shards} shards, {size / gb:.2f} GB): "
          f"shortv.load peak RSS {result['load_peak_bytes'] / gb:.2f} GB = "
          f"{result['peak_over_checkpoint']:.2f}x the checkpoint (target <= {TARGET}); "
          f"`import shortv` alone {result['import_peak_bytes'] / gb:.2f} GB, so the load's own "
          f"{result['net_over_checkpoint']:.2f}x; load {result['load_seconds']:.1f} s "
          f"(median of {args.repeats}){kept}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
