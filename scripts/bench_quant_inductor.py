"""A quantized decoder's decode step, eager against torch.compile with inductor's CPU
weight-only GEMM templates (freezing + max-autotune), one scheme and batch per run.

    python scripts/bench_quant_inductor.py --scheme int8 --batch 8 [--layers 8] [--prompt 64]
                                          [--new-tokens 16] [--repeats 3]

Inductor lowers `torch._weight_int8pack_mm` / `aten._weight_int4pack_mm_for_cpu` to its
own C++ micro-kernels (AMX where the CPU has it) when the weights are frozen into the
graph as constants, which it then packs anew. This script measures what that gives and
costs on shortv's decoder: Llama-2-7B width, random weights, the first --layers of 32
layers, `shortv.bench.random_decoder(quantization=)` in bfloat16; greedy decode after a
prompt of --prompt tokens (`bench_llamacpp.ShortvRunner`), the step compiled with
`torch.compile(decoder.step, fullgraph=True, dynamic=True)` and inductor's `freezing` and
`max_autotune` (CPP and ATEN backends). Printed: the compile time (the first decode),
the resident memory before and after it, and eager against compiled ms per step
(interleaved rounds, medians). Each run compiles once: run it once per scheme and batch.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_llamacpp import LLAMA_7B, ShortvRunner

from shortv.bench import random_decoder
from shortv.models.quant import Quantization


def resident_gb() -> float:
    """This process's resident memory now (not its peak), GB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * 4096 / 1e9


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scheme", choices=["int8", "int4", "w8a8"], required=True)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    import torch._inductor.config as inductor

    decoder = random_decoder(replace(LLAMA_7B, layers=args.layers), torch.device("cpu"), torch.bfloat16,
                             seed=0, quantization=Quantization(args.scheme))
    gc.collect()
    runner = ShortvRunner(decoder)
    prompts = [[1, *range(5, 4 + args.prompt)]] * args.batch
    before = resident_gb()
    # Set for the process, not patched around the first call: a later recompilation (none is
    # expected with dynamic shapes) would otherwise go without them.
    inductor.freezing, inductor.max_autotune, inductor.max_autotune_gemm_backends = True, True, "CPP,ATEN"
    compiled = torch.compile(decoder.step, fullgraph=True, dynamic=True)
    start = time.perf_counter()
    runner.run(prompts, 2, step=compiled)
    compile_s = time.perf_counter() - start
    after = resident_gb()
    runner.run(prompts, 2)
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    steps = {"eager": decoder.step, "compiled": compiled}
    for round_ in range(args.repeats):
        for name in steps if round_ % 2 == 0 else reversed(list(steps)):
            times[name].append(runner.run(prompts, args.new_tokens, step=steps[name])[1])
    eager, fast = (statistics.median(times[n]) for n in ("eager", "compiled"))
    print(f"| {args.scheme} | {args.batch} | {compile_s:.0f} | {before:.1f} | {after:.1f} | {eager:.1f} | "
          f"{fast:.1f} | {fast / eager:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
