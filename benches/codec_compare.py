"""Side-by-side codec benchmark: quantsave's Rust codec against bitsandbytes' CPU kernels.

For bf16 weights of 4096x4096 and 8192x8192: nf4 and fp4 ``quantize_4bit`` (targets: >= 25x),
``dequantize_4bit`` into a preallocated output (target: >= 2x), and LLM.int8 row quantization.
Medians of several runs, tools alternating in one process.

Usage: python benches/codec_compare.py [--runs 5] [--sizes 4096 8192]
"""

from __future__ import annotations

import argparse
import statistics
import time

import bitsandbytes.functional as F
import torch

from quantsave import codec


def median_time(fn, runs: int) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192])
    args = p.parse_args()
    print(f"torch threads: {torch.get_num_threads()}; medians of {args.runs} runs")
    print(f"{'case':<34}{'bitsandbytes':>14}{'quantsave':>12}{'ratio':>9}{'qs Gelem/s':>12}")
    for size in args.sizes:
        w = torch.randn(size, size, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
        n = w.numel()
        for qt in ("nf4", "fp4"):
            ref = median_time(lambda: F.quantize_4bit(w, blocksize=64, quant_type=qt), args.runs)
            ours = median_time(lambda: codec.quantize_4bit(w, blocksize=64, quant_type=qt), args.runs)
            print(
                f"{f'quantize {qt} bf16 {size}x{size}':<34}{ref:>13.3f}s{ours:>11.3f}s"
                f"{ref / ours:>8.1f}x{n / ours / 1e9:>12.2f}"
            )
            packed, state = F.quantize_4bit(w, blocksize=64, quant_type=qt)
            out = torch.empty_like(w)
            # bitsandbytes has no CPU kernel for dequantize_4bit(out=...): it allocates its result.
            ref = median_time(lambda: F.dequantize_4bit(packed, state), args.runs)
            ours = median_time(lambda: codec.dequantize_4bit(packed, state, out=out), args.runs)
            print(
                f"{f'dequantize {qt} bf16 {size}x{size}':<34}{ref:>13.3f}s{ours:>11.3f}s"
                f"{ref / ours:>8.1f}x{n / ours / 1e9:>12.2f}"
            )
        w16 = w.to(torch.float16)
        ref = median_time(lambda: F.int8_vectorwise_quant(w16), args.runs)
        ours = median_time(lambda: codec.quantize_8bit(w16), args.runs)
        print(
            f"{f'int8 rows f16 {size}x{size}':<34}{ref:>13.3f}s{ours:>11.3f}s{ref / ours:>8.1f}x{n / ours / 1e9:>12.2f}"
        )
    print("targets: quantize >= 25x, dequantize >= 2x")


if __name__ == "__main__":
    main()
