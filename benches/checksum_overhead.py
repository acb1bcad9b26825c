"""What recording per-shard sha256 costs a save: ``save_quantized(..., checksums=True)`` against
the same save without, alternating, medians of several runs (target: at most 10% slower).

Two regimes are measured:

* ``page cache``: the default save, which returns once the bytes are in the page cache. It is
  CPU-bound (a memory copy per byte), so hashing can only hide on idle cores.
* ``fsync``: ``QUANTSAVE_FSYNC=1``, a save that returns once the bytes are on the disk; the hash
  runs while the writer waits on the device.

To tell the implementation from the machine, the bench also hashes the same bytes with
``hashlib`` (OpenSSL) on one core and prints the best a save with hashes could do on this
machine's cores: the plain save's CPU time plus the hash's, spread over every core, and never
less than the plain save.

The model: bf16 Linear layers of about --gb gigabytes, saved in --shard shards into a fresh
folder each time (``os.sync()`` before each run so no writeback of an earlier run lands in it).

Usage: python benches/checksum_overhead.py [--gb 2.0] [--shard 500MB] [--runs 5] [--dir /tmp/qs-sum]
                                           [--regimes cache fsync]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import quantsave as qs


def hash_alone(model: nn.Module) -> float:
    """Seconds OpenSSL's sha256 takes over the model's bytes on one core (best of three)."""
    views = [p.detach().contiguous().view(torch.uint8).numpy() for p in model.parameters()]
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        h = hashlib.sha256()
        for v in views:
            h.update(v)
        best = min(best, time.perf_counter() - t0)
    return best


def run_regime(model: nn.Module, root: Path, shard: str, runs: int, fsync: bool) -> dict[bool, tuple[float, float]]:
    """Median (wall, cpu) seconds of the save without and with checksums."""
    os.environ["QUANTSAVE_FSYNC"] = "1" if fsync else "0"
    wall: dict[bool, list[float]] = {False: [], True: []}
    cpu: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(runs):
        for checksums in (False, True):
            out = root / f"sum-{checksums}"
            shutil.rmtree(out, ignore_errors=True)
            os.sync()
            t0, c0 = time.perf_counter(), time.process_time()
            qs.save_quantized(model, out, max_shard_size=shard, checksums=checksums)
            wall[checksums].append(time.perf_counter() - t0)
            cpu[checksums].append(time.process_time() - c0)
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in (False, True)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=2.0)
    p.add_argument("--shard", default="500MB")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "qs-sum"))
    p.add_argument("--regimes", nargs="+", choices=("cache", "fsync"), default=["cache", "fsync"])
    args = p.parse_args()
    width = 4096
    layers = max(1, int(args.gb * 1e9 // (2 * width * width)))
    with torch.device("cpu"):
        model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)]).to(torch.bfloat16)
    gb = layers * 2 * width * width / 1e9
    cores = len(os.sched_getaffinity(0))
    alone = hash_alone(model)
    print(f"{gb:.2f} GB bf16, shards of {args.shard}, medians of {args.runs}, {cores} cores")
    print(f"  sha256 alone (hashlib, one core): {alone:.3f} s, {gb / alone:.2f} GB/s")
    root = Path(args.dir)
    saved = os.environ.get("QUANTSAVE_FSYNC")
    try:
        for regime in args.regimes:
            res = run_regime(model, root, args.shard, args.runs, fsync=regime == "fsync")
            (plain, plain_cpu), (hashed, hashed_cpu) = res[False], res[True]
            bound = max(plain, (plain_cpu + alone) / cores)
            label = "page cache" if regime == "cache" else "fsync (QUANTSAVE_FSYNC=1)"
            print(f"{label}:")
            print(f"  save              {plain:.3f} s  (cpu {plain_cpu:.3f} s)")
            print(f"  save + sha256     {hashed:.3f} s  (cpu {hashed_cpu:.3f} s)")
            print(f"  overhead          {100 * (hashed / plain - 1):+.1f}%  (target <= +10%)")
            print(f"  best possible     {100 * (bound / plain - 1):+.1f}%  on {cores} cores at the sha256 rate above")
    finally:
        if saved is None:
            os.environ.pop("QUANTSAVE_FSYNC", None)
        else:
            os.environ["QUANTSAVE_FSYNC"] = saved
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
