"""What recording per-shard sha256 costs a save: ``save_quantized(..., checksums=True)`` against
the same save without, alternating, medians of several runs (target: at most 10% slower).

The model: bf16 Linear layers of about --gb gigabytes, saved in 5 GB-or-smaller shards into a
fresh folder each time (the page cache absorbs the writes, as for the reference benchmarks).

Usage: python benches/checksum_overhead.py [--gb 1.0] [--shard 500MB] [--runs 7] [--dir /tmp/qs-sum]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import quantsave as qs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=1.0)
    p.add_argument("--shard", default="500MB")
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "qs-sum"))
    args = p.parse_args()
    width = 4096
    layers = max(1, int(args.gb * 1e9 // (2 * width * width)))
    with torch.device("cpu"):
        model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)]).to(torch.bfloat16)
    root = Path(args.dir)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.runs):
        for checksums in (False, True):
            out = root / f"sum-{checksums}"
            shutil.rmtree(out, ignore_errors=True)
            os.sync()  # no writeback of the previous run inside this one's timing
            t0 = time.perf_counter()
            qs.save_quantized(model, out, max_shard_size=args.shard, checksums=checksums)
            times[checksums].append(time.perf_counter() - t0)
    plain, hashed = statistics.median(times[False]), statistics.median(times[True])
    gb = layers * 2 * width * width / 1e9
    print(f"{gb:.2f} GB bf16, shards of {args.shard}, median of {args.runs}:")
    print(f"  save              {plain:.3f} s")
    print(f"  save + sha256     {hashed:.3f} s")
    print(f"  overhead          {100 * (hashed / plain - 1):+.1f}%  (target <= +10%)")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
