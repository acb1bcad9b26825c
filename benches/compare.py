"""Side-by-side save benchmark: quantsave against the reference in one run.

Each measurement runs in a fresh subprocess (so peak memory is its own) and is repeated; the
script prints medians and the ratios the project targets:

* save of a ~2 GB bf16 state dict to the page cache: quantsave ``save_quantized`` vs
  ``safetensors.torch.save_file`` (target: ratio >= 1.0);
* the same with fsync on: quantsave (``QUANTSAVE_FSYNC=1``) vs a raw ``write`` + ``fsync`` of the
  same bytes (target: >= 0.9);
* extra peak RSS during the save (target: <= 64 MB for quantsave).

Usage: python benches/compare.py [--gb 2] [--runs 5] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

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
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where files are written")
    args = p.parse_args()
    modes = ["quantsave", "safetensors", "quantsave-fsync", "raw-fsync"]
    results: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(args.runs):
        for m in modes:  # interleaved, so machine noise hits every tool alike
            results[m].append(run(m, args.gb, args.dir))
    med = {m: statistics.median(r["seconds"] for r in results[m]) for m in modes}
    mem = {m: statistics.median(r["extra_peak_mb"] for r in results[m]) for m in modes}
    nbytes = results["quantsave"][0]["bytes"]
    print(f"state dict: {nbytes / 1e9:.2f} GB bf16, {args.runs} runs each, medians, files in {args.dir}")
    print(f"{'tool':<18}{'seconds':>10}{'GB/s':>8}{'extra peak MB':>15}")
    for m in modes:
        print(f"{m:<18}{med[m]:>10.3f}{nbytes / 1e9 / med[m]:>8.2f}{mem[m]:>15.1f}")
    print()
    print(f"page cache: quantsave vs safetensors.save_file  {med['safetensors'] / med['quantsave']:.2f}x (target >= 1.0)")
    print(f"fsync:      quantsave vs raw write + fsync      {med['raw-fsync'] / med['quantsave-fsync']:.2f}x (target >= 0.9)")
    print(f"extra peak memory during save: quantsave {mem['quantsave']:.1f} MB (target <= 64 MB), "
          f"safetensors {mem['safetensors']:.1f} MB")


if __name__ == "__main__":
    main()
