"""Measures, from the installed bitsandbytes, the decision thresholds of its CPU blockwise
quantizer over the signed dynamic map: for each code k >= 1, the smallest float32 normalized
value that it maps to a code >= k. The Rust codec embeds the result (``DYNAMIC_THRESHOLDS``)
so nested (double) quantization matches bitsandbytes bit for bit.

Usage: python tools/probe_dynamic_thresholds.py > thresholds.txt
"""

from __future__ import annotations

import struct

import bitsandbytes.functional as F
import numpy as np
import torch


def to_key(x: float) -> int:
    """Monotone integer key of a float32 (ordering of the real line)."""
    b = struct.unpack("<I", struct.pack("<f", x))[0]
    return (b ^ 0xFFFFFFFF) if b & 0x80000000 else (b | 0x80000000)


def from_key(k: int) -> float:
    b = (k ^ 0xFFFFFFFF) if not k & 0x80000000 else (k & 0x7FFFFFFF)
    return struct.unpack("<f", struct.pack("<I", b))[0]


def codes_of(zs: np.ndarray) -> np.ndarray:
    """bitsandbytes' code for each normalized value (blocks of 256 with absmax exactly 1)."""
    n = len(zs)
    blocks = np.zeros((n, 256), dtype=np.float32)
    blocks[:, 0] = zs
    blocks[:, 1] = 1.0
    q, _ = F.quantize_blockwise(torch.from_numpy(blocks.reshape(-1)), blocksize=256)
    return q.view(n, 256)[:, 0].numpy().astype(np.int64)


def main() -> None:
    lo_key, hi_key = to_key(-1.0), to_key(1.0)
    thresholds = []
    for k in range(1, 256):
        lo, hi = lo_key, hi_key  # invariant: code(lo) < k <= code(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if codes_of(np.array([from_key(mid)], dtype=np.float32))[0] >= k:
                hi = mid
            else:
                lo = mid
        thresholds.append(from_key(hi))
    # Check monotonicity and the thresholds against random values.
    rng = np.random.default_rng(0)
    zs = np.concatenate([rng.uniform(-1, 1, 200_000), rng.normal(0, 1e-3, 200_000).clip(-1, 1)]).astype(np.float32)
    t = np.array(thresholds, dtype=np.float32)
    predicted = np.searchsorted(t, zs, side="right")
    actual = codes_of(zs)
    assert (predicted == actual).all(), int((predicted != actual).sum())
    for x in thresholds:
        print(f"0x{struct.unpack('<I', struct.pack('<f', x))[0]:08x}")


if __name__ == "__main__":
    main()
