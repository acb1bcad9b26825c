"""The output side of ``convert``: every output tensor in state-dict order, its dtype and shape
(bitsandbytes' layout, from ``backends/bitsandbytes/layout``) and the op producing it; the
source's order against the model's; what transformers records (dtype, parameter count)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from quantsave import _core
from quantsave.backends.bitsandbytes import layout as bnb_layout
from quantsave.backends.bitsandbytes.config import BitsAndBytesConfig
from quantsave.convert.source import FLOATS, Source, torch_name
from quantsave.errors import CheckpointError
from quantsave.families import TRANSFORMERS, Family

__all__ = ["Output", "model_order", "natural_key", "output_dtype", "parameter_count", "plan_output"]


@dataclass
class Output:
    """The planned output: tensors in state-dict order with their dtype and shape, the ops
    producing them (output names, shard filled in later) and the quantized weight groups."""

    keys: list[str] = field(default_factory=list)
    specs: dict[str, tuple[str, list[int]]] = field(default_factory=dict)
    ops: list[tuple[Any, ...]] = field(default_factory=list)
    parameters: int = 0


def model_order(model: nn.Module, family: Family, source: Source) -> list[str]:
    """The source tensors in the model's state-dict order; checks that they match the model."""
    expected = model.state_dict(keep_vars=True)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {}) if family is TRANSFORMERS else set()
    unexpected = [k for k in source.tensors if k not in expected]
    if unexpected:
        hint = (
            "; transformers renames or fuses some architectures' weights on load (e.g. MoE experts), "
            "which convert does not support yet"
            if family is TRANSFORMERS
            else ""
        )
        raise CheckpointError(
            f"checkpoint in {source.folder} holds {len(unexpected)} tensor(s) the model does not have, "
            f"e.g. {unexpected[:3]}{hint}"
        )
    missing = [k for k in expected if k not in source.tensors and k not in tied]
    if missing:
        raise CheckpointError(
            f"checkpoint in {source.folder} lacks {len(missing)} weight(s) the model needs, e.g. {missing[:3]}"
        )
    for k, (_, _, shape) in source.tensors.items():
        if list(expected[k].shape) != shape:
            raise CheckpointError(
                f"checkpoint in {source.folder}: tensor {k!r} has shape {shape}, "
                f"the model expects {list(expected[k].shape)}"
            )
    # transformers does not save tied weights.
    return [k for k in expected if k in source.tensors and k not in tied]


def output_dtype(model: nn.Module, source: Source, targets: set[str]) -> torch.dtype:
    """The dtype transformers records: its model's first floating parameter once loaded (the
    quantized weights are uint8 then)."""
    for name, _ in model.named_parameters():
        entry = source.tensors.get(name)
        if entry is not None and entry[1] in FLOATS and name.removesuffix(".weight") not in targets:
            return FLOATS[entry[1]]
    return torch.float32


def parameter_count(model: nn.Module, source: Source, targets: set[str], config: BitsAndBytesConfig) -> int:
    """transformers' ``total_parameters`` of the quantized model: a packed 4-bit weight counts
    two values per stored byte."""
    total = 0
    for name, p in model.named_parameters():
        n = p.numel()
        if config.bits == 4 and name.endswith(".weight") and name[: -len(".weight")] in targets:
            n = bnb_layout.logical_parameters(bnb_layout.packed_bytes(n))
        total += n
    return total


def natural_key(name: str) -> list[tuple[Any, ...]]:
    """transformers' ``dot_natural_key``: dot-separated parts, numbers (whole or trailing)
    compared as numbers."""
    parts: list[tuple[Any, ...]] = []
    for part in name.split("."):
        if part.isdigit():
            parts.append((0, int(part)))
            continue
        text = part.rstrip("0123456789")
        digits = part[len(text) :]
        parts.append((1, text, int(digits)) if digits else (1, text))
    return parts


def plan_output(source: Source, order: list[str], targets: set[str], config: BitsAndBytesConfig) -> Output:
    """Every output tensor in state-dict order (a quantized Linear's weight, bias, then its
    quantization state, as bitsandbytes' layers list them) and the op producing it."""
    out = Output()

    def add(name: str, dtype: str, shape: list[int]) -> None:
        out.keys.append(name)
        out.specs[name] = (dtype, shape)

    pending: dict[str, str] = {}  # module -> its weight key, until its bias (if any) is listed
    for key in order:
        file, dtype, shape = source.tensors[key]
        module, _, leaf = key.rpartition(".")
        if leaf == "weight" and module in targets:
            if dtype not in FLOATS or len(shape) != 2:
                raise ValueError(f"{key!r} is {dtype} {shape}; only 2-D F32/BF16/F16 Linear weights can be quantized")
            _add_weight(out, add, source, key, config)
            bias = f"{module}.bias"
            if bias in source.tensors and bias in order and bias not in out.specs:
                pending[module] = key
            else:
                _add_state(out, add, source, key, config)
            continue
        add(key, dtype, list(shape))
        out.ops.append(("copy", file, key, key))
        if leaf == "bias" and module in pending:
            _add_state(out, add, source, pending.pop(module), config)
    return out


def _add_weight(out: Output, add: Any, source: Source, key: str, config: BitsAndBytesConfig) -> None:
    _file, _dtype, (rows, cols) = source.tensors[key]
    add(key, *bnb_layout.weight_spec(rows, cols, config.bits))


def _add_state(out: Output, add: Any, source: Source, key: str, config: BitsAndBytesConfig) -> None:
    """The tensors a quantized weight keeps beside itself (``bnb_layout.state_specs``), and the
    op producing them all."""
    file, dtype, (rows, cols) = source.tensors[key]
    qt, bs, offset = config.bnb_4bit_quant_type, bnb_layout.BLOCKSIZE, None
    if config.bits == 4 and config.bnb_4bit_use_double_quant:
        absmax = torch.frombuffer(bytearray(_core.absmax_4bit(source.files[file], key, bs)), dtype=torch.float32)
        offset = absmax.mean().item() if absmax.numel() else float("nan")
    state = bnb_layout.quant_state_json(qt, torch_name(dtype), [rows, cols], offset) if config.bits == 4 else b""
    specs = bnb_layout.state_specs(
        key, rows, cols, bits=config.bits, quant_type=qt, double=offset is not None, state_len=len(state)
    )
    for spec in specs:
        add(*spec)
    # 8-bit: SCB, weight_format; 4-bit: absmax, quant_map[, nested_absmax, nested_quant_map], quant state.
    names = [name for name, _, _ in specs]
    if config.bits == 8:
        out.ops.append(("int8", file, key, rows, cols, key, names[0]))
        out.ops.append(("bytes", bnb_layout.WEIGHT_FORMAT, names[1]))
        return
    out.ops.append(("bytes", bytes(_core.code_4bit(qt)), names[1]))
    nested = None
    if offset is not None:
        nested = (offset, names[2])
        out.ops.append(("bytes", bytes(_core.dynamic_map()), names[3]))
    out.ops.append(("bytes", state, names[-1]))
    out.ops.append(("quant4", file, key, qt, bs, key, names[0], nested))
