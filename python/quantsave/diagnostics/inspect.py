"""What ``quantsave inspect`` and ``quantsave verify`` compute: a summary of a checkpoint folder
(tensors, dtypes, bytes, shards, quantization config, compression ratio) and a list of the
problems found in it. Every shard header is read and validated by the Rust reader.

Logical parameters (the numerator of the compression ratio) are counted per quantized weight
by the backend whose layout stores it (each quantizer's ``count_parameters``, which its
``layout.py`` defines: unpacked elements of the weight, none for its scales, maps and state);
every other tensor counts its elements. This module knows no backend.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from quantsave.backends.layout import ParameterCount
from quantsave.backends.registry import quantizer_classes
from quantsave.checkpoint.reader import Checkpoint, open_checkpoint

__all__ = ["RATIO_METHOD", "summarize"]

#: How ``compression_ratio`` is computed (printed by ``inspect`` and stored under ``ratio_method``).
RATIO_METHOD = (
    "logical parameters x bytes per element of the model's float dtype, divided by the bytes of "
    "the shard files on disk; quantized weights count their unpacked elements (bitsandbytes "
    "quant_state shape, 2 values per packed uint8 byte for 4-bit, quanto/torchao data shapes), "
    "their scales and maps count none"
)

_FLOAT = {"F16", "BF16", "F32", "F64"}


def _count_parameters(ckpt: Checkpoint, qconfig: dict[str, Any] | None) -> tuple[int, str | None, list[str]]:
    """Logical parameters, the float dtype the quantization metadata names, and how each kind
    of weight was counted (every backend counts the weights in its layout)."""
    count = ParameterCount()
    for cls in quantizer_classes():
        count.merge(cls.count_parameters(ckpt, qconfig))
    return count.total({k: t.shape for k, t in ckpt.tensors.items()}), count.float_dtype, sorted(count.how)


def summarize(
    directory: Path, *, variant: str | None = None, progress: Callable[[Iterable[Path]], Iterable[Path]] = iter
) -> dict[str, Any]:
    """The summary ``quantsave inspect --json`` prints (keys documented in ``cli.INSPECT_EPILOG``).

    Raises:
        FileNotFoundError: not a checkpoint folder.
        CheckpointError: a corrupt shard, index or config (``quantsave verify`` lists them all).
    """
    ckpt = open_checkpoint(directory, variant=variant, progress=progress)
    config = ckpt.config
    qconfig = config.get("quantization_config") if config else None
    tensors = ckpt.tensors
    per_file = Counter(t.file for t in tensors.values())
    shards: list[dict[str, object]] = [
        {"file": path.name, "tensors": per_file[path], "bytes": ckpt.file_sizes[path]} for path in ckpt.files
    ]
    disk = sum(ckpt.file_sizes.values())
    dtypes: dict[str, dict[str, int]] = {}
    for t in tensors.values():
        d = dtypes.setdefault(t.dtype, {"tensors": 0, "bytes": 0})
        d["tensors"] += 1
        d["bytes"] += t.nbytes
    params, float_dtype, how = _count_parameters(ckpt, qconfig if isinstance(qconfig, dict) else None)
    if float_dtype is None and config is not None:
        cfg_dtype = config.get("torch_dtype") or config.get("dtype")
        float_dtype = cfg_dtype if isinstance(cfg_dtype, str) else None
    if float_dtype is None:
        # the floating dtype holding the most bytes (biases, norms, unquantized layers)
        floats = {k: v["bytes"] for k, v in dtypes.items() if k in _FLOAT}
        widest = max(floats, key=floats.__getitem__) if floats else ""
        float_dtype = {"F16": "float16", "BF16": "bfloat16", "F64": "float64"}.get(widest, "float32")
    try:
        itemsize = torch.empty(0, dtype=getattr(torch, float_dtype)).element_size()
    except (AttributeError, TypeError):
        float_dtype, itemsize = "float32", 4
    return {
        "directory": str(directory),
        "index": ckpt.index.name if ckpt.index else None,
        "shards": shards,
        "tensor_count": len(tensors),
        "tensor_bytes": sum(t.nbytes for t in tensors.values()),
        "disk_bytes": disk,
        "dtypes": dict(sorted(dtypes.items())),
        "quant_method": qconfig.get("quant_method") if isinstance(qconfig, dict) else None,
        "quantization_config": qconfig,
        "parameters": params,
        "float_dtype": float_dtype,
        "float_bytes": params * itemsize,
        "compression_ratio": round(params * itemsize / disk, 4) if disk else None,
        "ratio_method": RATIO_METHOD + (f" ({'; '.join(how)})" if how else ""),
        "tensors": [
            {"name": k, "dtype": t.dtype, "shape": t.shape, "bytes": t.nbytes, "file": t.file.name}
            for k, t in tensors.items()
        ],
    }
