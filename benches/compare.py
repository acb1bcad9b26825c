"""Side-by-side save benchmark: quantsave against the reference in one run.

Each measurement runs in a fresh subprocess (so peak memory is its own) and is repeated; the
script prints medians and the ratios the project targets:

* save of a ~2 GB bf16 state dict to the page cache: quantsave ``save_quantized`` vs
  ``safetensors.torch.save_file`` (target: ratio >= 1.0). Written to a tmpfs (``--cache-dir``,
  default /dev/shm) so that disk writeback of earlier runs does not throttle the writers;
* the same with fsync on, to disk (``--disk-dir``): quantsave (``QUANTSAVE_FSYNC=1``) vs a raw
  ``write`` + ``fsync`` of the same bytes (target: >= 0.9);
* extra peak RSS during the save (target: <= 64 MB for quantsave).

Dirty pages are flushed (``sync``) before every run. A last section repeats the page-cache
comparison inside one warm process (tools in random order, files deleted after each run): on a
virtual machine the first touch of fresh memory pages dominates cold runs, for every tool alike.

Usage: python benches/compare.py [--gb 2] [--runs 5] [--cache-dir /dev/shm] [--disk-dir /tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import json, os, resource, sys, time
import torch
gb, mode, target = float(sys.argv[1]), sys.argv[2], sys.argv[3]
n_layers = 16
numel = int(gb * 1e9 / 2 / n_layers)
rows = 4096
cols = numel // rows
g = torch.Generator().manual_seed(0)
tensors = {f"layers.{i}.weight": torch.randn(rows, cols, generator=g, dtype=torch.bfloat16) for i in range(n_layers)}
nbytes = sum(t.numel() * t.element_size() for t in tensors.values())

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

if mode.startswith("quantsave"):
    import quantsave
    module = torch.nn.Module()
    for k, v in tensors.items():
        module.register_buffer(k.replace(".", "_"), v)
    if mode == "quantsave-fsync":
        os.environ["QUANTSAVE_FSYNC"] = "1"
elif mode == "safetensors":
    from safetensors.torch import save_file
base = peak_mb()
t0 = time.perf_counter()
if mode.startswith("quantsave"):
    quantsave.save_quantized(module, target)
elif mode == "safetensors":
    os.makedirs(target, exist_ok=True)
    save_file(tensors, os.path.join(target, "model.safetensors"), metadata={"format": "pt"})
elif mode == "raw-fsync":
    os.makedirs(target, exist_ok=True)
    fd = os.open(os.path.join(target, "raw.bin"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for t in tensors.values():
        os.write(fd, memoryview(t.view(torch.uint8).numpy()))
    os.fsync(fd)
    os.close(fd)
    dfd = os.open(target, os.O_RDONLY)
    os.fsync(dfd)
    os.close(dfd)
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "bytes": nbytes, "extra_peak_mb": peak_mb() - base}))
"""


WARM = r"""
import json, os, statistics, sys, time
import torch
import quantsave
from safetensors.torch import save_file
gb, runs, where = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
n_layers = 16
numel = int(gb * 1e9 / 2 / n_layers)
g = torch.Generator().manual_seed(0)
tensors = {
    f"layers.{i}.weight": torch.randn(4096, numel // 4096, generator=g, dtype=torch.bfloat16) for i in range(n_layers)
}
module = torch.nn.Module()
for k, v in tensors.items():
    module.register_buffer(k.replace(".", "_"), v)
import random
rng = random.Random(0)
times = {"quantsave": [], "safetensors": []}
for i in range(runs + 1):
    for tool in rng.sample(sorted(times), 2):
        target = os.path.join(where, f"warm-{tool}")
        os.makedirs(target, exist_ok=True)
        t0 = time.perf_counter()
        if tool == "quantsave":
            quantsave.save_quantized(module, target)
        else:
            save_file(tensors, os.path.join(target, "model.safetensors"), metadata={"format": "pt"})
        dt = time.perf_counter() - t0
        os.unlink(os.path.join(target, "model.safetensors"))
        os.rmdir(target)
        if i:  # the first round warms the page allocator
            times[tool].append(dt)
print(json.dumps({k: statistics.median(v) for k, v in times.items()}))
"""


def run(mode: str, gb: float, where: str) -> dict:
    target = tempfile.mkdtemp(prefix=f"qs-bench-{mode}-", dir=where)
    try:
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(gb), mode, target], check=True, capture_output=True, text=True
        )
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(target, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=2.0, help="state dict size in GB (default 2)")
    p.add_argument("--runs", type=int, default=5, help="runs per tool (default 5)")
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    p.add_argument("--cache-dir", default=shm, help="page-cache runs write here (default: /dev/shm)")
    p.add_argument("--disk-dir", default=tempfile.gettempdir(), help="fsync runs write here (default: $TMPDIR)")
    args = p.parse_args()
    modes = ["quantsave", "safetensors", "quantsave-fsync", "raw-fsync"]
    results: dict[str, list[dict]] = {m: [] for m in modes}
    rng = random.Random(0)
    for _ in range(args.runs):
        # Interleaved in a fresh random order each round, so machine noise (and whatever the
        # previous run left the page allocator in) hits every tool alike.
        for m in rng.sample(modes, len(modes)):
            os.sync()
            results[m].append(run(m, args.gb, args.disk_dir if m.endswith("fsync") else args.cache_dir))
    med = {m: statistics.median(r["seconds"] for r in results[m]) for m in modes}
    mem = {m: statistics.median(r["extra_peak_mb"] for r in results[m]) for m in modes}
    nbytes = results["quantsave"][0]["bytes"]
    print(
        f"state dict: {nbytes / 1e9:.2f} GB bf16, {args.runs} runs each, medians; "
        f"page cache in {args.cache_dir}, fsync to {args.disk_dir}"
    )
    print(f"{'tool':<18}{'seconds':>10}{'GB/s':>8}{'extra peak MB':>15}")
    for m in modes:
        print(f"{m:<18}{med[m]:>10.3f}{nbytes / 1e9 / med[m]:>8.2f}{mem[m]:>15.1f}")
    print()
    print(
        f"page cache: quantsave vs safetensors.save_file  {med['safetensors'] / med['quantsave']:.2f}x (target >= 1.0)"
    )
    print(
        f"fsync:      quantsave vs raw write + fsync      {med['raw-fsync'] / med['quantsave-fsync']:.2f}x "
        "(target >= 0.9)"
    )
    print(f"extra peak memory during save: quantsave {mem['quantsave']:.1f} MB (target <= 64 MB), "
          f"safetensors {mem['safetensors']:.1f} MB")
    os.sync()
    out = subprocess.run(
        [sys.executable, "-c", WARM, str(args.gb), str(args.runs), args.cache_dir],
        check=True,
        capture_output=True,
        text=True,
    )
    warm = json.loads(out.stdout.strip().splitlines()[-1])
    print(
        f"warm process: quantsave {warm['quantsave']:.3f} s, safetensors {warm['safetensors']:.3f} s, "
        f"quantsave vs safetensors.save_file {warm['safetensors'] / warm['quantsave']:.2f}x (target >= 1.0)"
    )


if __name__ == "__main__":
    main()
