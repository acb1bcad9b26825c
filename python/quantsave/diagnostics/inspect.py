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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from quantsave import _core
from quantsave.families import FAMILIES

__all__ = ["Checkpoint", "RATIO_METHOD", "find_checkpoint", "summarize"]

#: How ``compression_ratio`` is computed (printed by ``inspect`` and stored under ``ratio_method``).
RATIO_METHOD = (
    "logical parameters x bytes per element of the model's float dtype, divided by the bytes of "
    "the shard files on disk; quantized weights count their unpacked elements (bitsandbytes "
    "quant_state shape, 2 values per packed uint8 byte for 4-bit, quanto/torchao data shapes), "
    "their scales and maps count none"
)

_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
    "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}
_FLOAT = {"F16", "BF16", "F32", "F64"}
_BNB_PARTS = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")
_QUANTO_PARTS = (".weight._scale", ".weight._shift", ".weight._scale_shift", ".input_scale", ".output_scale")


@dataclass
class Checkpoint:
    """The weight files of a checkpoint folder, as found on disk (nothing validated yet)."""

    directory: Path
    shards: list[Path]
    index: Path | None = None
    problems: list[str] = field(default_factory=list)


def _index_names(variant: str | None) -> Iterable[tuple[str, str]]:
    for weights_name in dict.fromkeys(f.weights_name for f in FAMILIES):
        yield _core.add_variant(weights_name, variant), _core.index_file_name(weights_name, variant)


def find_checkpoint(directory: Path, variant: str | None = None) -> Checkpoint:
    """Finds the single weights file or the index of ``directory``; a broken index is recorded
    in ``problems`` rather than raised, so ``verify`` can report it.

    Raises:
        FileNotFoundError: the folder does not exist or holds no safetensors weights.
    """
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint folder {str(directory)!r} does not exist")
    for single, index in _index_names(variant):
        if (directory / single).is_file():
            return Checkpoint(directory, [directory / single])
        if (directory / index).is_file():
            return _read_index(directory, directory / index)
    raise FileNotFoundError(
        f"{str(directory)!r} is not a checkpoint: no model.safetensors, diffusion_pytorch_model.safetensors "
        "or sharded index" + (f" for variant {variant!r}" if variant else "")
    )


def _read_index(directory: Path, index: Path) -> Checkpoint:
    ckpt = Checkpoint(directory, [], index)
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, huge integers, deep nesting
        ckpt.problems.append(f"{index}: not valid JSON: {e}")
        return ckpt
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        ckpt.problems.append(f"{index}: no 'weight_map' object")
        return ckpt
    root = directory.resolve()
    for key, fname in weight_map.items():
        path = directory / fname if isinstance(fname, str) and fname and "\0" not in fname else None
        if path is None or "/" in fname or "\\" in fname or fname in (".", "..") or _parent(path) != root:
            ckpt.problems.append(
                f"{index}: tensor {key!r} maps to {fname!r}, which is not a file in the checkpoint folder"
            )
        elif path not in ckpt.shards:
            if _is_file(path):
                ckpt.shards.append(path)
            else:
                ckpt.problems.append(f"{index}: shard {fname!r} named for tensor {key!r} does not exist")
    ckpt.shards.sort()
    return ckpt


def _parent(path: Path) -> Path | None:
    try:
        return path.resolve().parent
    except (OSError, ValueError):  # a name the system cannot look up
        return None


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def weight_map_of(ckpt: Checkpoint) -> dict[str, str] | None:
    """The index's weight map (None for a single file or an unreadable index)."""
    if ckpt.index is None:
        return None
    try:
        data = json.loads(ckpt.index.read_text(encoding="utf-8"))
    except (ValueError, RecursionError):  # bad UTF-8 or JSON, huge integers, deep nesting
        return None
    wm = data.get("weight_map") if isinstance(data, dict) else None
    return {k: v for k, v in wm.items() if isinstance(v, str)} if isinstance(wm, dict) else None


def read_bytes(path: Path, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of a shard, through the Rust reader's validated map."""
    return bytes(memoryview(_core.MappedFile(path))[start:end])


def _quant_state(path: Path, start: int, end: int) -> dict[str, Any] | None:
    try:
        data = json.loads(read_bytes(path, start, end).decode("utf-8"))
    except (OSError, ValueError, RecursionError):  # bad UTF-8 or JSON included
        return None
    return data if isinstance(data, dict) else None


def _count_parameters(
    tensors: dict[str, tuple[str, list[int], int, Path, int, int]],
    metadata: dict[str, str],
    qconfig: dict[str, Any] | None,
) -> tuple[int, str | None, list[str]]:
    """Logical parameters, the float dtype the quantization metadata names, and how each kind
    of weight was counted."""
    helper: set[str] = set()
    counted: dict[str, int] = {}
    float_dtype: str | None = None
    how: set[str] = set()
    for name, (_dt, shape, _n, path, start, end) in tensors.items():
        if ".weight.quant_state.bitsandbytes__" in name:
            base = name.split(".quant_state.")[0]
            state = _quant_state(path, start, end)
            helper.add(name)
            helper.update(base + p for p in _BNB_PARTS)
            if state is not None and isinstance(state.get("shape"), list):
                counted[base] = math.prod(int(s) for s in state["shape"])
                float_dtype = float_dtype or str(state.get("dtype") or "") or None
                how.add("bitsandbytes 4-bit: quant_state shape")
            elif base in tensors:
                counted[base] = 2 * math.prod(tensors[base][1])
                how.add("bitsandbytes 4-bit: 2 values per packed byte")
        elif name.endswith(".SCB"):
            base = name[: -len("SCB")]
            helper.update({name, base + "weight_format"})
            if base + "weight" in tensors:
                counted[base + "weight"] = math.prod(tensors[base + "weight"][1])
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
            rows = scale[1][0] if scale and scale[1] else shape[0] * per_byte
            counted[name] = rows * math.prod(shape[1:])
            how.add("quanto int4/int2: scale rows x columns")
        elif name.endswith(".weight._data"):
            counted[name] = math.prod(shape)
            how.add("quanto: data elements")
        if name.endswith((".weight._data", ".weight._data._data")):
            base = name.split(".weight._data")[0]
            helper.update(base + p for p in _QUANTO_PARTS)
    total = sum(counted.values())
    total += sum(math.prod(s) for k, (_d, s, *_r) in tensors.items() if k not in helper and k not in counted)
    return total, float_dtype, sorted(how)


def summarize(
    directory: Path, *, variant: str | None = None, progress: Callable[[Iterable[Path]], Iterable[Path]] = iter
) -> dict[str, Any]:
    """The summary ``quantsave inspect --json`` prints (keys documented in ``cli.INSPECT_EPILOG``).

    Raises:
        FileNotFoundError: not a checkpoint folder.
        CheckpointError: a corrupt shard, index or config (``quantsave verify`` lists them all).
    """
    from quantsave.errors import CheckpointError
    from quantsave.load import read_config

    ckpt = find_checkpoint(directory, variant)
    if ckpt.problems:
        raise CheckpointError(ckpt.problems[0])
    config = read_config(directory)
    qconfig = config.get("quantization_config") if config else None
    tensors: dict[str, tuple[str, list[int], int, Path, int, int]] = {}
    metadata: dict[str, str] = {}
    shards: list[dict[str, object]] = []
    disk = 0
    for path in progress(ckpt.shards):
        header = _core.read_header(path)
        metadata.update(header.get("metadata") or {})
        for name, dt, shape, start, end in header["tensors"]:
            tensors[name] = (dt, list(shape), end - start, path, start, end)
        shards.append({"file": path.name, "tensors": len(header["tensors"]), "bytes": header["file_size"]})
        disk += header["file_size"]
    dtypes: dict[str, dict[str, int]] = {}
    for dt, _s, n, *_r in tensors.values():
        d = dtypes.setdefault(dt, {"tensors": 0, "bytes": 0})
        d["tensors"] += 1
        d["bytes"] += n
    params, float_dtype, how = _count_parameters(tensors, metadata, qconfig if isinstance(qconfig, dict) else None)
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
        "tensor_bytes": sum(v[2] for v in tensors.values()),
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
            {"name": k, "dtype": v[0], "shape": v[1], "bytes": v[2], "file": v[3].name} for k, v in tensors.items()
        ],
    }
