"""shortv's int8 against torchao's int8 weight-only quantization of the same decoder.

    pip install torchao          # benchmark-only; not a dependency of shortv
    python scripts/bench_torchao.py [--layers 8] [--prompts 640,64] [--batch 8] [--new-tokens 32]
                                    [--repeats 3]

Both run shortv's own decoder (Llama-2-7B width, random weights, the first --layers of 32
layers) through the same prefill and decode loop (`bench_llamacpp.ShortvRunner`), in
bfloat16. shortv's layers are `QuantizedLinear` (`quantize_decoder(..., "int8")`).
torchao's are the same `Linear` modules after `torchao.quantization.quantize_(decoder,
Int8WeightOnlyConfig())`, which swaps each weight for torchao's int8 tensor subclass.
Rounds interleave the two (medians).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_llamacpp import LLAMA_7B, ShortvRunner

from shortv.bench import random_decoder
from shortv.models.quant import Quantization, quantize_decoder


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--prompts", default="640,64")
    p.add_argument("--batch", type=int, default=8,
                   help="also decode this many sequences at the shortest prompt")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    import torchao
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    config = replace(LLAMA_7B, layers=args.layers)
    ours = random_decoder(config, torch.device("cpu"), torch.bfloat16, seed=0)
    quantize_decoder(ours, Quantization("int8"))
    theirs = random_decoder(config, torch.device("cpu"), torch.bfloat16, seed=0)
    quantize_(theirs, Int8WeightOnlyConfig())
    runners = {"shortv": ShortvRunner(ours), "torchao": ShortvRunner(theirs)}
    prompts = [int(x) for x in args.prompts.split(",")]
    cases = [(t, 1) for t in prompts] + ([(min(prompts), args.batch)] if args.batch > 1 else [])
    generator = torch.Generator().manual_seed(0)
    print(f"python {' '.join(sys.argv)}  (torch {torch.__version__}, torchao {torchao.__version__}, "
          f"{torch.get_num_threads()} threads, {args.layers}/32 layers of Llama-2-7B, "
          f"median of {args.repeats})")
    print("| prompt x batch | prefill s shortv | torchao | ratio | decode ms/step shortv | torchao | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for t, batch in cases:
        ids = [[1, *torch.randint(3, config.vocab_size, (t - 1,), generator=generator).tolist()]
               for _ in range(batch)]
        prefill: dict[str, list[float]] = {name: [] for name in runners}
        decode: dict[str, list[float]] = {name: [] for name in runners}
        for runner in runners.values():
            runner.run(ids, 2)  # warm-up
        for round_ in range(args.repeats):
            for name in runners if round_ % 2 == 0 else reversed(list(runners)):
                prefill_s, decode_ms = runners[name].run(ids, args.new_tokens)
                prefill[name].append(prefill_s)
                decode[name].append(decode_ms)
        (pa, pb), (da, db) = ([statistics.median(v[n]) for n in runners] for v in (prefill, decode))
        print(f"| {t} x {batch} | {pa:.2f} | {pb:.2f} | {pa / pb:.2f} | {da:.1f} | {db:.1f} | "
              f"{da / db:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
