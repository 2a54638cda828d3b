"""Where a quantized layer should switch from torch's weight-only kernels to dequantize +
GEMM: both paths timed per number of rows, next to the dense bfloat16 layer, on 7B's
weight shapes (interleaved, median of --repeats).

    python scripts/bench_quant_kernels.py [--rows 1,4,8,16,32,64,128,640] [--repeats 5]
    python scripts/bench_quant_kernels.py --bandwidth [--repeats 5]

`shortv.models.quant.KERNEL_MAX_ROWS` is the last row count where the kernel wins.

--bandwidth: the rate at which one row's product reads a weight too large for any cache
(1 GiB: a 7B decode step streams 7-13 GB of weights), in GB of stored weight per second,
for the bf16 GEMV and each weight-only kernel, next to a 1 GiB copy (read + write). A
decode step's speedup over bf16 is at most the ratio of bytes per weight times the ratio
of these rates.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch

import shortv.models.quant as quant
from shortv.ops import Linear

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (out, in): attention, MLP up / gate, MLP down


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def bandwidth(repeats: int) -> None:
    """GB/s of weight read by a 1-row product over a 1 GiB weight, per kernel (random
    stored values: the kernels' speed does not depend on them)."""
    width, size = 4096, 1 << 30
    x = torch.randn(1, width, dtype=torch.bfloat16)
    print("| product | weight GB | ms | GB/s of weight |")
    print("| --- | --- | --- | --- |")
    cases: list[tuple[str, Callable[[], object], int]] = []
    dense = torch.randn(size // 2 // width, width, dtype=torch.bfloat16)
    cases.append(("bf16 GEMV (F.linear)", lambda: torch.nn.functional.linear(x, dense), size))
    q8 = torch.randint(-127, 128, (size // width, width), dtype=torch.int8)
    s8 = torch.rand(size // width, dtype=torch.bfloat16)
    cases.append(("int8 `_weight_int8pack_mm`", lambda: torch._weight_int8pack_mm(x, q8, s8), size))
    q4 = torch.randint(0, 256, (size * 2 // width, width // 2), dtype=torch.uint8)
    p4 = torch.rand(width // 128, size * 2 // width, 2, dtype=torch.bfloat16)
    cases.append(("int4 `_weight_int4pack_mm_for_cpu`",
                  lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, q4, 128, p4), size))
    source, target = torch.empty(size, dtype=torch.uint8).fill_(1), torch.empty(size, dtype=torch.uint8)
    cases.append(("copy (reads and writes 1 GiB)", lambda: target.copy_(source), 2 * size))
    for name, fn, nbytes in cases:
        ms = median_ms(fn, repeats)
        print(f"| {name} | {size / 1e9:.2f} | {ms:.1f} | {nbytes / ms / 1e6:.1f} |", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1,4,8,16,32,64,128,640")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--bandwidth", action="store_true", help="only the weight-reading rates (docstring)")
    args = p.parse_args()
    if args.bandwidth:
        bandwidth(args.repeats)
        return 0
    rows = [int(r) for r in args.rows.split(",")]
    torch.manual_seed(0)
    print(f"python {' '.join(sys.argv)}  (torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"KERNEL_MAX_ROWS = {quant.KERNEL_MAX_ROWS})")
    print("| weight (out x in) | scheme | rows | kernel ms | dequantize + GEMM ms | bf16 dense ms |")
    print("| --- | --- | --- | --- | --- | --- |")
    saved = dict(quant.KERNEL_MAX_ROWS)
    try:
        for out, width in SHAPES:
            dense = Linear(width, out, bias=False).to(torch.bfloat16)
            for scheme in ("int8", "int4"):
                layer = quant.QuantizedLinear.from_linear(dense, quant.Quantization(scheme))
                for r in rows:
                    x = torch.randn(r, width, dtype=torch.bfloat16)
                    quant.KERNEL_MAX_ROWS[scheme] = 10**9
                    kernel = median_ms(lambda layer=layer, x=x: layer(x), args.repeats)
                    quant.KERNEL_MAX_ROWS[scheme] = 0
                    dequant = median_ms(lambda layer=layer, x=x: layer(x), args.repeats)
                    bf16 = median_ms(lambda x=x, dense=dense: dense(x), args.repeats)
                    print(f"| {out} x {width} | {scheme} | {r} | {kernel:.2f} | {dequant:.2f} | {bf16:.2f} |",
                          flush=True)
    finally:
        quant.KERNEL_MAX_ROWS.update(saved)
    return 0


if __name__ == "__main__":
    with torch.inference_mode():
        sys.exit(main())
