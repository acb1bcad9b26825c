"""What ``quantsave inspect`` and ``quantsave verify`` compute: a summary of a checkpoint folder
(tensors, dtypes, bytes, shards, quantization config, compression ratio) and a list of the
problems found in it. Every shard header is read and validated by the Rust reader.

Logical parameters (the numerator of the compression ratio) are counted per quantized weight:

    bitsandbytes 4-bit  m.weight.quant_state.bitsandbytes__nf4 -> prod(shape), dtype
                        (without it: a packed uint8 m.weight holds 2 values per byte)
    bitsandbytes 8-bit  m.SCB present -> m.weight int8 holds 1 value per element
    torchao             header metadata "m.weight" -> m._weight_qdata elements, "_data.dtype"
    optimum-quanto      m.weight._data elements; int4/int2 m.weight._data._data [ceil(R/k), C]
                        -> R*C with R = rows of m.weight._scale (k = 2 or 4)

The helper tensors of a quantized weight (absmax, quant_map, SCB, scales, ...) count no
parameters; every other tensor counts its elements.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

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
_BNB_PARTS = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")
_QUANTO_PARTS = (".weight._scale", ".weight._shift", ".weight._scale_shift", ".input_scale", ".output_scale")


def _quant_state(ckpt: Checkpoint, name: str) -> dict[str, Any] | None:
    try:
        data = json.loads(ckpt.read_bytes(name).decode("utf-8"))
    except (OSError, ValueError, RecursionError):  # bad UTF-8 or JSON included
        return None
    return data if isinstance(data, dict) else None


def _count_parameters(ckpt: Checkpoint, qconfig: dict[str, Any] | None) -> tuple[int, str | None, list[str]]:
    """Logical parameters, the float dtype the quantization metadata names, and how each kind
    of weight was counted."""
    tensors, metadata = ckpt.tensors, ckpt.metadata
    helper: set[str] = set()
    counted: dict[str, int] = {}
    float_dtype: str | None = None
    how: set[str] = set()
    for name, info in tensors.items():
        shape = info.shape
        if ".weight.quant_state.bitsandbytes__" in name:
            base = name.split(".quant_state.")[0]
            state = _quant_state(ckpt, name)
            helper.add(name)
            helper.update(base + p for p in _BNB_PARTS)
            if state is not None and isinstance(state.get("shape"), list):
                counted[base] = math.prod(int(s) for s in state["shape"])
                float_dtype = float_dtype or str(state.get("dtype") or "") or None
                how.add("bitsandbytes 4-bit: quant_state shape")
            elif base in tensors:
                counted[base] = 2 * math.prod(tensors[base].shape)
                how.add("bitsandbytes 4-bit: 2 values per packed byte")
        elif name.endswith(".SCB"):
            base = name[: -len("SCB")]
            helper.update({name, base + "weight_format"})
            if base + "weight" in tensors:
                counted[base + "weight"] = math.prod(tensors[base + "weight"].shape)
                how.add("bitsandbytes 8-bit: int8 elements")
        elif name.endswith("._weight_qdata"):
            base = name[: -len("._weight_qdata")]
            counted[name] = math.prod(shape)
            helper.update(k for k in tensors if k.startswith(base + "._weight_") and k != name)
            how.add("torchao: qdata elements")
            try:
                entry = json.loads(metadata.get(base + ".weight", "{}"))
                float_dtype = float_dtype or entry["_data"]["dtype"]["_data"]
            except (ValueError, RecursionError, KeyError, TypeError):
                pass
        elif name.endswith(".weight._data._data"):
            base = name[: -len("._data._data")]
            scale = tensors.get(base + "._scale") or tensors.get(base + "._scale_shift")
            per_byte = 4 if (qconfig or {}).get("weights_dtype") == "int2" else 2
            rows = scale.shape[0] if scale and scale.shape else shape[0] * per_byte
            counted[name] = rows * math.prod(shape[1:])
            how.add("quanto int4/int2: scale rows x columns")
        elif name.endswith(".weight._data"):
            counted[name] = math.prod(shape)
            how.add("quanto: data elements")
        if name.endswith((".weight._data", ".weight._data._data")):
            base = name.split(".weight._data")[0]
            helper.update(base + p for p in _QUANTO_PARTS)
    total = sum(counted.values())
    total += sum(math.prod(t.shape) for k, t in tensors.items() if k not in helper and k not in counted)
    return total, float_dtype, sorted(how)


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
