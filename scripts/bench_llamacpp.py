"""shortv's decoder against llama.cpp on the CPU, at equal bits: bf16 / F16, int8 / Q8_0,
int4 / Q4_0 (and shortv's w8a8 / Q8_0). Decode ms per token and prefill time, the two
engines interleaved in one process (several rounds, medians).

    pip install -e '.[bench-llamacpp]'   # llama-cpp-python (built from source) and gguf
    python scripts/bench_llamacpp.py [--layers 8] [--prompts 640,64] [--new-tokens 32]
                                     [--precisions bf16,int8,int4] [--repeats 3] [--json]

The decoder has LLaVA-1.5-7B's shape (Llama-2-7B: hidden 4096, MLP 11008, 32 heads,
vocabulary 32000) with random weights; `--layers` keeps the first N of its 32 layers
(default 8; per-token times grow linearly with the layers, and both engines run the same
ones). All 32 fit beside llama.cpp's in int8 / int4 on a 23 GB machine, not in bf16. The
prompt is text tokens only: 640 = LLaVA-1.5's 576 visual + 64 text positions, and a short
64-token one.

shortv: `shortv.bench.random_decoder` (bfloat16; int8 / int4 quantized layer by layer, so
that only one layer is ever dense); prefill into a `KVCache`, then greedy decode steps on
a `SlotCache`, as `shortv.generate` does. llama.cpp: random weights of the same shapes
written as an F16 GGUF (`gguf`; its layers repeat the first layer's values, so that it is
written from one layer's memory), quantized by llama.cpp itself to Q8_0 / Q4_0
(`llama_model_quantize`), run through its C API (`llama_decode`, by llama-cpp-python)
with as many threads as torch has. Each engine feeds the same token ids. Q8_0 / Q4_0
quantize in blocks of 32 (one fp16 scale each; Q4_0 symmetric), shortv's int8 per output
channel and int4 in groups of 128 with an offset: the bits per weight differ slightly.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from shortv.bench import random_decoder
from shortv.methods import VANILLA
from shortv.models.config import TextConfig
from shortv.models.kv_cache import CachePlan, KVCache, SlotCache
from shortv.models.llama import Decoder
from shortv.models.quant import Quantization
from shortv.token_types import TYPE_DTYPE, TokenType

LLAMA_7B = TextConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, layers=32, heads=32,
                      kv_heads=32, head_dim=128, rms_norm_eps=1e-5, max_position_embeddings=4096)
# shortv scheme and llama.cpp file type per precision.
PRECISIONS = {"bf16": (None, "F16"), "int8": ("int8", "Q8_0"), "int4": ("int4", "Q4_0"),
              "w8a8": ("w8a8", "Q8_0")}


# ---- shortv ----------------------------------------------------------------------------------


class ShortvRunner:
    """Prefill and greedy decode of a shortv decoder on token ids: B prompts of one length,
    prefilled together, then decoded in a `SlotCache` of B slots."""

    def __init__(self, decoder: Decoder) -> None:
        self.decoder = decoder

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], room: int = 1) -> tuple[torch.Tensor, SlotCache, int]:
        d, c = self.decoder, self.decoder.config
        b, t = len(prompts), len(prompts[0])
        x = d.embed_tokens(torch.tensor(prompts))
        types = torch.full((b, t), int(TokenType.TEXT), dtype=TYPE_DTYPE)
        positions = torch.arange(t).expand(b, t)
        kv = KVCache(c.layers, capacity=t)
        hidden = d(x, types, positions, cache=kv, method=VANILLA, last_only=True)
        logits = d.head(hidden[:, -1])
        cache = SlotCache(CachePlan(c.layers, b, t + room, c.kv_heads, c.head_dim, x.dtype), "cpu", lazy=True)
        cache.write(list(range(b)), kv)
        return logits, cache, t

    @torch.inference_mode()
    def run(self, prompts: list[list[int]], n: int, step: Callable[..., torch.Tensor] | None = None
            ) -> tuple[float, float]:
        """Prefill, then n greedy decode steps: (prefill s, decode ms per step), each timed
        on its own. `step`: the decode step to run (default `Decoder.step`; a compiled one)."""
        step = self.decoder.step if step is None else step
        start = time.perf_counter()
        logits, cache, position = self.prefill(prompts, n)
        prefilled = time.perf_counter()
        b = len(prompts)
        for _ in range(n):
            tokens = logits.argmax(dim=-1)
            tokens.tolist()  # the host reads each token, as a generation loop does
            logits = step(tokens, torch.full((b, 1), position), cache.view(b), VANILLA)
            cache.advance(b)
            position += 1
        return prefilled - start, (time.perf_counter() - prefilled) / n * 1e3


# ---- llama.cpp -------------------------------------------------------------------------------


def write_gguf(decoder: Decoder, path: Path) -> None:
    """The decoder's weights as a llama-architecture F16 GGUF (norms in F32), with a
    stand-in vocabulary (llama.cpp needs one; the benchmark feeds ids)."""
    import gguf
    import numpy as np

    c = decoder.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.heads)
    w.add_head_count_kv(c.kv_heads)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tokens += [f"\u2581t{i}" for i in range(c.vocab_size - len(tokens))]
    kinds = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    kinds += [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * (c.vocab_size - 259)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * c.vocab_size)
    w.add_token_types(kinds)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    converted: dict[tuple[int, torch.dtype], np.ndarray] = {}  # layers sharing a tensor share its array

    def as_numpy(t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
        key = (id(t), dtype)
        if key not in converted:
            converted[key] = t.detach().to(dtype).numpy()
        return converted[key]

    def half(t: torch.Tensor) -> np.ndarray:
        return as_numpy(t, torch.float16)

    def single(t: torch.Tensor) -> np.ndarray:
        return as_numpy(t, torch.float32)

    w.add_tensor("token_embd.weight", half(decoder.embed_tokens.weight))
    for i, layer in enumerate(decoder.layers):
        a, m = layer.attn, layer.mlp
        for name, t in [("attn_norm", layer.attn_norm.weight), ("ffn_norm", layer.mlp_norm.weight)]:
            w.add_tensor(f"blk.{i}.{name}.weight", single(t))
        for name, lin in [("attn_q", a.q_proj), ("attn_k", a.k_proj), ("attn_v", a.v_proj),
                          ("attn_output", a.o_proj), ("ffn_gate", m.gate_proj), ("ffn_up", m.up_proj),
                          ("ffn_down", m.down_proj)]:
            w.add_tensor(f"blk.{i}.{name}.weight", half(lin.weight))
    w.add_tensor("output_norm.weight", single(decoder.norm.weight))
    w.add_tensor("output.weight", half(decoder.lm_head.weight))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quantize_gguf(source: Path, out: Path, kind: str) -> None:
    """llama.cpp's own quantization of an F16 GGUF to Q8_0 / Q4_0."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    types = {"Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}
    params.ftype = types[kind]
    params.nthread = torch.get_num_threads()
    if llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {source} to {kind}")


class LlamaRunner:
    """Prefill and greedy decode of a GGUF with llama.cpp's C API (through llama-cpp-python):
    B prompts as B sequences of one context, prefilled in batches of 512 tokens, then one
    token per sequence per `llama_decode`. `extra_buffers=False` turns off llama.cpp's
    extra CPU buffer types (AMX, repacked weights), for a build whose kernels crash."""

    def __init__(self, path: Path, sequences: int, context: int, extra_buffers: bool = True) -> None:
        import llama_cpp

        params = llama_cpp.llama_model_default_params()
        params.use_extra_bufts = extra_buffers
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        threads = torch.get_num_threads()
        ctx_params = llama_cpp.llama_context_default_params()
        ctx_params.n_ctx = sequences * context
        ctx_params.n_batch = ctx_params.n_ubatch = 512
        ctx_params.n_seq_max = sequences
        ctx_params.n_threads = ctx_params.n_threads_batch = threads
        self.ctx = llama_cpp.llama_init_from_model(self.model, ctx_params)
        self.batch = llama_cpp.llama_batch_init(512, 0, 1)
        self.vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.api = llama_cpp

    def close(self) -> None:
        self.api.llama_batch_free(self.batch)
        self.api.llama_free(self.ctx)
        self.api.llama_model_free(self.model)

    def _run(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """(token, position, sequence, wants logits) entries, 512 per llama_decode."""
        for start in range(0, len(entries), 512):
            chunk = entries[start: start + 512]
            for i, (token, position, sequence, logits) in enumerate(chunk):
                self.batch.token[i] = token
                self.batch.pos[i] = position
                self.batch.n_seq_id[i] = 1
                self.batch.seq_id[i][0] = sequence
                self.batch.logits[i] = logits
            self.batch.n_tokens = len(chunk)
            if self.api.llama_decode(self.ctx, self.batch) != 0:
                raise RuntimeError("llama_decode failed")

    def prefill(self, prompts: list[list[int]]) -> None:
        self.api.llama_memory_clear(self.api.llama_get_memory(self.ctx), True)
        self._run([(token, position, s, position == len(p) - 1)
                   for s, p in enumerate(prompts) for position, token in enumerate(p)])

    def run(self, prompts: list[list[int]], n: int) -> tuple[float, float]:
        """Prefill, then n greedy decode steps: (prefill s, decode ms per step), each timed
        on its own."""
        import numpy as np

        start = time.perf_counter()
        self.prefill(prompts)
        prefilled = time.perf_counter()
        t = len(prompts[0])
        tokens = [1] * len(prompts)  # the first new token's value does not change the timing
        for step in range(n):
            self._run([(token, t + step, s, True) for s, token in enumerate(tokens)])
            tokens = []
            for s in range(len(prompts)):
                row = self.api.llama_get_logits_ith(self.ctx, s)
                tokens.append(int(np.ctypeslib.as_array(row, shape=(self.vocab,)).argmax()))
        return prefilled - start, (time.perf_counter() - prefilled) / n * 1e3


# ---- timing ----------------------------------------------------------------------------------


@dataclass
class Timings:
    prefill_s: dict[str, list[float]] = field(default_factory=dict)
    decode_ms: dict[str, list[float]] = field(default_factory=dict)


def run_precision(precision: str, decoder: Decoder, f16_gguf: Path, work: Path,
                  cases: list[tuple[int, int]], new_tokens: int, repeats: int, say: Callable[[str], None],
                  extra_buffers: bool = True) -> dict[tuple[int, int], Timings]:
    """Both engines on each (prompt length, batch) case, interleaved rounds."""
    kind = PRECISIONS[precision][1]
    gguf_path = f16_gguf
    if kind != "F16":
        gguf_path = work / f"model-{kind}.gguf"
        if not gguf_path.exists():
            say(f"  llama.cpp quantizing to {kind} ...")
            quantize_gguf(f16_gguf, gguf_path, kind)
    ours = ShortvRunner(decoder)
    generator = torch.Generator().manual_seed(0)
    results = {}
    for t, batch in cases:
        llama = LlamaRunner(gguf_path, batch, context=t + new_tokens + 8, extra_buffers=extra_buffers)
        engines: dict[str, Callable[[list[list[int]], int], tuple[float, float]]] = {
            "shortv": ours.run, "llama.cpp": llama.run}
        prompts = [[1, *torch.randint(3, decoder.config.vocab_size, (t - 1,), generator=generator).tolist()]
                   for _ in range(batch)]
        timings = Timings({e: [] for e in engines}, {e: [] for e in engines})
        for name in engines:  # warm-up: first-touch of the weights, kernel selection
            engines[name](prompts, 2)
        for round_ in range(repeats):
            for name in engines if round_ % 2 == 0 else reversed(list(engines)):
                prefill_s, decode_ms = engines[name](prompts, new_tokens)
                timings.prefill_s[name].append(prefill_s)
                timings.decode_ms[name].append(decode_ms)
            say(f"  {precision} prompt {t} x {batch}, round {round_ + 1}/{repeats}: " + ", ".join(
                f"{e} prefill {timings.prefill_s[e][-1]:.2f} s, "
                f"decode {timings.decode_ms[e][-1]:.0f} ms/step" for e in engines))
        results[t, batch] = timings
        llama.close()
    gc.collect()
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8, help="decoder layers of 32 (default 8)")
    p.add_argument("--prompts", default="640,64", help="prompt lengths in tokens, comma-separated")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--precisions", default="bf16,int8,int4",
                   help="of bf16, int8, int4, w8a8 (int8 weights and activations, against Q8_0)")
    p.add_argument("--batch", type=int, default=8,
                   help="also decode this many sequences at once, at the shortest prompt (1: no)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-extra-buffers", action="store_true",
                   help="llama.cpp without its AMX / repacked weight buffers (where they crash)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    prompts = [int(x) for x in args.prompts.split(",")]
    cases = [(t, 1) for t in prompts] + ([(min(prompts), args.batch)] if args.batch > 1 else [])
    precisions = args.precisions.split(",")
    if unknown := [x for x in precisions if x not in PRECISIONS]:
        p.error(f"unknown precision(s) {unknown}; use {', '.join(PRECISIONS)}")
    say = (lambda msg: None) if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
    import llama_cpp

    config = replace(LLAMA_7B, layers=args.layers)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-llamacpp-") as tmp:
        work = Path(tmp)
        say(f"building {args.layers} random layers at Llama-2-7B width ...")
        f16 = work / "model-F16.gguf"
        # The GGUF's layers repeat the first one's values, so that it is written from one layer's
        # memory; llama.cpp still loads and reads every layer as its own tensors.
        source = random_decoder(config, torch.device("cpu"), torch.bfloat16, seed=0, share_layers=True)
        write_gguf(source, f16)
        del source
        for precision in precisions:
            scheme = PRECISIONS[precision][0]
            decoder = random_decoder(config, torch.device("cpu"), torch.bfloat16, seed=0,
                                     quantization=None if scheme is None else Quantization(scheme))
            say(f"{precision}:")
            results = run_precision(precision, decoder, f16, work, cases, args.new_tokens, args.repeats,
                                    say, extra_buffers=not args.no_extra_buffers)
            del decoder
            gc.collect()
            for (t, batch), timing in results.items():
                med = {e: (statistics.median(timing.prefill_s[e]), statistics.median(timing.decode_ms[e]))
                       for e in timing.prefill_s}
                rows.append({"precision": precision, "llama_cpp": PRECISIONS[precision][1], "prompt": t,
                             "batch": batch,
                             "shortv_prefill_s": round(med["shortv"][0], 3),
                             "llama_prefill_s": round(med["llama.cpp"][0], 3),
                             "prefill_ratio": round(med["shortv"][0] / med["llama.cpp"][0], 3),
                             "shortv_decode_ms": round(med["shortv"][1], 1),
                             "llama_decode_ms": round(med["llama.cpp"][1], 1),
                             "decode_ratio": round(med["shortv"][1] / med["llama.cpp"][1], 3)})
    meta = {"torch": torch.__version__, "llama_cpp_python": llama_cpp.__version__,
            "threads": torch.get_num_threads(), "layers": args.layers, "new_tokens": args.new_tokens,
            "repeats": args.repeats, "llama_extra_buffers": not args.no_extra_buffers,
            "system": llama_cpp.llama_print_system_info().decode().strip(),
            "command": "python " + " ".join(sys.argv)}
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows}, indent=2))
        return
    print(f"{meta['command']}  (torch {meta['torch']}, llama-cpp-python {meta['llama_cpp_python']}, "
          f"{meta['threads']} threads, {args.layers}/32 layers of Llama-2-7B, {args.new_tokens} new tokens, "
          f"median of {args.repeats})")
    print(f"llama.cpp: {meta['system']}" + ("" if meta["llama_extra_buffers"] else " (extra buffers off)"))
    print("| shortv / llama.cpp | prompt x batch | prefill s shortv | llama.cpp | ratio "
          "| decode ms/step shortv | llama.cpp | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['precision']} / {r['llama_cpp']} | {r['prompt']} x {r['batch']} | "
              f"{r['shortv_prefill_s']} | "
              f"{r['llama_prefill_s']} | {r['prefill_ratio']} | {r['shortv_decode_ms']} | "
              f"{r['llama_decode_ms']} | {r['decode_ratio']} |")


if __name__ == "__main__":
    main()
