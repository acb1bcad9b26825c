"""The dtypes quantize-on-load gives each tensor, which ``convert`` writes:

- transformers (``from_pretrained``'s default ``dtype="auto"``): the model dtype is ``torch_dtype``
  when given, else the config's ``dtype``, else the checkpoint's first float dtype. Every tensor
  is cast to the dtype of the model's own parameter built under it (the model dtype, unless the
  model creates that parameter in another dtype), the model's ``_get_dtype_plan`` (its
  ``_keep_in_fp32_modules`` for float16, ``_keep_in_fp32_modules_strict`` for float16 and
  bfloat16) upcasting its entries to float32; quantized weights are cast to the model dtype
  first.
- diffusers: the model dtype is ``torch_dtype`` when given, else float16 (its bitsandbytes
  quantizer's ``update_torch_dtype``); every float tensor is cast to it, except those of the
  model's ``_keep_in_fp32_modules`` (a name part of the parameter's name), kept in float32;
  quantized weights are cast to the model dtype first.
- a plain module: tensors as stored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from quantsave.checkpoint.tensors import DTYPE_TO_NAME
from quantsave.convert.source import FLOATS, Source
from quantsave.families import DIFFUSERS, TRANSFORMERS, Family

__all__ = ["Dtypes", "resolve_dtype", "tensor_dtypes"]


@dataclass
class Dtypes:
    """``model``: the model dtype (safetensors name) quantized weights are cast to first (None:
    as stored); ``tensors``: model key -> the dtype that tensor is written in, where it differs
    from the stored one."""

    model: str | None = None
    tensors: dict[str, str] = field(default_factory=dict)


def resolve_dtype(value: Any) -> torch.dtype | None:
    """``torch_dtype`` as given: None or ``"auto"`` (the reference's default), a float torch dtype
    or its name (``"bfloat16"``, ``"torch.float16"``).

    Raises:
        ValueError: anything else.
    """
    if value is None or value == "auto":
        return None
    dtype = getattr(torch, value.removeprefix("torch."), None) if isinstance(value, str) else value
    if not isinstance(dtype, torch.dtype) or dtype not in FLOATS.values():
        raise ValueError(f"torch_dtype must be float32, bfloat16, float16 or 'auto', got {value!r}")
    return dtype


def tensor_dtypes(
    model: nn.Module, family: Family, source: Source, stored: dict[str, str], torch_dtype: torch.dtype | None
) -> Dtypes:
    """The dtype of every output tensor (``stored``: model key -> its dtype in the checkpoint)
    by the family's quantize-on-load rule (see the module docstring)."""
    if family is TRANSFORMERS:
        dtype = torch_dtype or _config_dtype(source) or _first_float(source)
        targets = _transformers_targets(model, dtype, stored)
    elif family is DIFFUSERS:
        dtype = torch_dtype or torch.float16
        targets = _diffusers_targets(model, dtype, stored)
    else:
        return Dtypes()
    out = Dtypes(model=DTYPE_TO_NAME[dtype])
    out.tensors = {m: d for m, d in targets.items() if d != stored[m]}
    return out


def _config_dtype(source: Source) -> torch.dtype | None:
    cfg = source.config or {}
    name = cfg.get("dtype", cfg.get("torch_dtype"))
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def _first_float(source: Source) -> torch.dtype:
    """transformers' ``get_state_dict_dtype`` over the first checkpoint file."""
    for file, dtype, _ in source.tensors.values():
        if file == 0 and dtype in FLOATS:
            return FLOATS[dtype]
    return torch.float32


def _transformers_targets(model: nn.Module, dtype: torch.dtype, stored: dict[str, str]) -> dict[str, str]:
    built = getattr(getattr(model, "config", None), "dtype", None)
    built = getattr(torch, built, None) if isinstance(built, str) else built
    params = model.state_dict(keep_vars=True)
    get_plan = getattr(model, "_get_dtype_plan", None)
    plan: dict[str, torch.dtype] = get_plan(dtype) if callable(get_plan) else {}
    pattern = re.compile("|".join(f"({p.replace('*', '.*')})" for p in plan)) if plan else None
    out = {}
    for key, name in stored.items():
        if name not in FLOATS:
            continue
        target = dtype
        own = params[key].dtype if key in params else None
        if own is not None and built is not None and own != built:
            target = own  # the model creates this tensor in a dtype of its own
        if pattern is not None and pattern.search(key):
            target = torch.float32
        out[key] = DTYPE_TO_NAME[target] if target.is_floating_point else name
    return out


def _diffusers_targets(model: nn.Module, dtype: torch.dtype, stored: dict[str, str]) -> dict[str, str]:
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    keep = [keep] if isinstance(keep, str) else list(keep)
    out = {}
    for key, name in stored.items():
        if name not in FLOATS:
            continue
        fp32 = any(m in key.split(".") for m in keep)
        out[key] = DTYPE_TO_NAME[torch.float32 if fp32 else dtype]
    return out
