"""What ``quantsave verify`` checks: every shard header (through the Rust reader), the index
against the shards, ``config.json`` and its ``quantization_config``, and that the tensors have
the layout of the config's method. Problems are collected as one line each, never raised."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from quantsave.backends.config import QuantizationConfig, resolve_config
from quantsave.backends.registry import get_quantizer
from quantsave.checkpoint.reader import Checkpoint, open_checkpoint

__all__ = ["verify_checkpoint"]


def verify_checkpoint(
    directory: Path, *, variant: str | None = None, progress: Callable[[Iterable[Path]], Iterable[Path]] = iter
) -> tuple[list[str], int]:
    """Checks the checkpoint in ``directory``.

    Returns:
        One line per problem found (empty when the checkpoint is sound) and the tensor count.

    Raises:
        FileNotFoundError: the folder does not exist or is not a checkpoint.
    """
    try:
        ckpt = open_checkpoint(directory, variant=variant, strict=False, confined=True, progress=progress)
    except RecursionError as e:  # json gives up on an index nested this deep
        return [f"{directory}: the shard index is not valid JSON: {e}"], 0
    return ckpt.problems + _check_config(ckpt), len(ckpt.tensors)


def _check_config(ckpt: Checkpoint) -> list[str]:
    path = ckpt.directory / "config.json"
    tensors = ckpt.tensors
    if ckpt.config is None and path.is_file():
        return []  # config.json itself is broken: the reader reported it
    raw = ckpt.config.get("quantization_config") if ckpt.config else None
    if raw is None:
        if tensors and any(".quant_state.bitsandbytes__" in k or k.endswith(".SCB") for k in tensors):
            return [f"{path}: the tensors are bitsandbytes-quantized but config.json has no quantization_config"]
        return []
    try:
        qconfig = resolve_config(raw)
    except ValueError as e:
        return [f"{path}: quantization_config: {e}"]
    if qconfig is None:
        return []
    try:
        get_quantizer(qconfig)
    except ValueError as e:
        return [f"{path}: quantization_config: {e}"]
    return [f"{path}: {p}" for p in _check_method(qconfig, ckpt)]


def _check_method(qconfig: QuantizationConfig, ckpt: Checkpoint) -> list[str]:
    """Problems with the tensors' layout for the config's ``quant_method``."""
    tensors, metadata = ckpt.tensors, ckpt.metadata
    method = qconfig.method
    if method == "bitsandbytes":
        if getattr(qconfig, "load_in_4bit", False):
            return _check_bnb4(qconfig, ckpt)
        if getattr(qconfig, "load_in_8bit", False):
            scb = [k for k in tensors if k.endswith(".SCB")]
            if not scb:
                return ["quant_method 'bitsandbytes' (8-bit) but no '*.SCB' tensors in the shards"]
            return [
                f"tensor {k!r} has no int8 weight {k[:-3] + 'weight'!r}"
                for k in scb
                if k[:-3] + "weight" not in tensors or tensors[k[:-3] + "weight"].dtype != "I8"
            ]
        return []
    if method == "torchao":
        if "tensor_names" not in metadata:
            return ["quant_method 'torchao' but the shard headers have no 'tensor_names' metadata"]
        if not any(k.endswith("._weight_qdata") for k in tensors):
            return ["quant_method 'torchao' but no '*._weight_qdata' tensors in the shards"]
        return []
    if method == "quanto" and not any(".weight._data" in k for k in tensors):
        return ["quant_method 'quanto' but no '*.weight._data' tensors in the shards"]
    return []


def _check_bnb4(qconfig: Any, ckpt: Checkpoint) -> list[str]:
    tensors = ckpt.tensors
    quant_type = getattr(qconfig, "bnb_4bit_quant_type", "fp4")
    double = bool(getattr(qconfig, "bnb_4bit_use_double_quant", False))
    states = [k for k in tensors if ".weight.quant_state.bitsandbytes__" in k]
    if not states:
        return [
            f"quant_method 'bitsandbytes' (4-bit {quant_type}) but no '*.weight.quant_state.bitsandbytes__*' tensors"
        ]
    problems = []
    for key in states:
        base = key.split(".quant_state.")[0]
        if not key.endswith("__" + quant_type):
            problems.append(f"tensor {key!r} is not {quant_type}, which quantization_config names")
        needed = [base, base + ".absmax", base + ".quant_map"]
        if double:
            needed += [base + ".nested_absmax", base + ".nested_quant_map"]
        problems += [f"quantized weight {base!r} lacks tensor {n!r}" for n in needed if n not in tensors]
        if base in tensors and tensors[base].dtype != "U8":
            problems.append(f"tensor {base!r} is {tensors[base].dtype}, expected packed U8")
        try:
            state = json.loads(ckpt.read_bytes(key).decode("utf-8"))
            ok = (
                isinstance(state, dict)
                and state.get("quant_type") == quant_type
                and isinstance(state.get("shape"), list)
            )
        except (ValueError, OSError, RecursionError):  # bad UTF-8 or JSON included
            ok = False
        if not ok:
            problems.append(f"tensor {key!r} is not a valid {quant_type} quant_state JSON")
    return problems
