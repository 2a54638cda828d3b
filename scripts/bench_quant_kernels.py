"""Where a quantized layer should switch from torch's weight-only kernels to dequantize +
GEMM: both paths timed per number of rows, next to the dense bfloat16 layer, on 7B's
weight shapes (interleaved, median of --repeats).

    python scripts/bench_quant_kernels.py [--rows 1,4,8,16,32,64,128,640] [--repeats 5]

`shortv.models.quant.KERNEL_MAX_ROWS` is the last row count where the kernel wins.
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1,4,8,16,32,64,128,640")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
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
