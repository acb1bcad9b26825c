"""A model's tensors as units of work, for saves that do not hold the whole quantized state
dict at once: a float model saved with a bitsandbytes ``quantization_config`` (its Linear layers
quantized on the way, one at a time) and a save across ranks whose parameters are ``DTensor``s.

A unit is one Linear quantized on the way (its weight and bias in, the quantized layer's
state-dict entries out) or one tensor as it is. Units list the state dict in the model's order,
so the tensors made from them are the state dict ``quantize`` + ``save_quantized`` writes, key
for key and byte for byte: each quantized layer is built by ``linear_4bit``/``linear_8bit``, the
functions ``quantize`` uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
from torch import nn

from quantsave.backends.bitsandbytes.config import BitsAndBytesConfig
from quantsave.backends.bitsandbytes.layout import logical_parameters
from quantsave.backends.bitsandbytes.modules import linear_4bit, linear_8bit
from quantsave.backends.modules import is_conv1d
from quantsave.backends.quantizer import Quantizer

__all__ = [
    "SaveUnit",
    "give_back_memory",
    "is_dtensor",
    "model_units",
    "on_the_way",
    "quantize_unit",
    "quantized_parameters",
    "whole",
]


@dataclass(frozen=True)
class SaveUnit:
    """Keys the save writes (``keys``) made from keys of the model's state dict (``sources``)."""

    keys: tuple[str, ...]
    sources: tuple[str, ...]
    #: The Linear (its module name) quantized on the way; None: the one source as it is.
    module: str | None = None


def is_dtensor(t: Any) -> bool:
    """True for a ``torch.distributed`` ``DTensor`` (FSDP2 or tensor-parallel parameters)."""
    return any(c.__name__ == "DTensor" and c.__module__.startswith("torch.distributed") for c in type(t).__mro__)


def whole(t: torch.Tensor) -> torch.Tensor:
    """The full tensor: a ``DTensor`` gathered (``full_tensor()``, a collective: every rank of
    its mesh calls it) into a storage of its own size, as the parameter of the unsharded model
    (the gather of uneven shards is a view of a padded buffer), anything else itself."""
    if not is_dtensor(t):
        return t
    full: torch.Tensor = t.full_tensor()  # type: ignore[attr-defined]
    if not full.is_contiguous() or full.untyped_storage().nbytes() != full.numel() * full.element_size():
        full = full.clone(memory_format=torch.contiguous_format)
    return full


@cache
def _malloc_trim() -> Any:
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def give_back_memory() -> None:
    """Returns the heap memory freed so far to the system (glibc ``malloc_trim``; elsewhere
    nothing). After each gathered tensor a save across ranks frees, so that the freed buffers of
    one size do not stay in the process as the next ones are allocated (glibc's adaptive mmap
    threshold serves them from the heap, which it does not shrink by itself)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def on_the_way(model: nn.Module, quantizer: Quantizer | None) -> list[str]:
    """The Linear layers a save quantizes on the way: for a bitsandbytes config and a model with
    no bitsandbytes layers, the layers ``quantize`` would replace; otherwise none."""
    from quantsave.backends.bitsandbytes.quantizer import BitsAndBytesQuantizer
    from quantsave.quantize import bnb_targets

    if not isinstance(quantizer, BitsAndBytesQuantizer) or BitsAndBytesQuantizer.detect(model):
        return []
    return bnb_targets(model, quantizer.config)


@cache
def _layer_keys(bits: int, quant_type: str, double: bool, bias: bool) -> tuple[str, ...]:
    """The state-dict names, relative to the layer, of a quantized Linear (learned from a tiny one)."""
    config = BitsAndBytesConfig(
        load_in_4bit=bits == 4,
        load_in_8bit=bits == 8,
        bnb_4bit_quant_type=quant_type or "fp4",
        bnb_4bit_use_double_quant=double,
    )
    like = nn.Linear(64, 64, bias=bias)
    layer = linear_4bit(like, config) if bits == 4 else linear_8bit(like, config)
    return tuple(layer.state_dict())


def model_units(model: nn.Module, state: dict[str, torch.Tensor], targets: list[str], config: Any) -> list[SaveUnit]:
    """``state`` (the model's state dict) as units, in its order; ``targets``: the Linear layers
    quantized on the way with ``config`` (a ``BitsAndBytesConfig``)."""
    chosen = set(targets)
    units: list[SaveUnit] = []
    done: set[str] = set()
    for key in state:
        module = key.rpartition(".")[0]
        if module not in chosen:
            units.append(SaveUnit((key,), (key,)))
            continue
        if module in done:
            continue
        done.add(module)
        sources = tuple(f"{module}.{p}" for p in ("weight", "bias") if f"{module}.{p}" in state)
        bias = f"{module}.bias" in state
        rel = _layer_keys(config.bits, config.bnb_4bit_quant_type, bool(config.bnb_4bit_use_double_quant), bias)
        units.append(SaveUnit(tuple(f"{module}.{k}" for k in rel), sources, module))
    return units


def quantize_unit(
    model: nn.Module, unit: SaveUnit, tensors: dict[str, torch.Tensor], config: Any
) -> dict[str, torch.Tensor]:
    """The quantized layer's state-dict entries for ``unit`` from its full source ``tensors``,
    as ``quantize`` builds the layer (a GPT-2 ``Conv1D`` seen as the Linear it stands for)."""
    assert unit.module is not None
    weight = tensors[f"{unit.module}.weight"].detach()
    bias = tensors.get(f"{unit.module}.bias")
    if is_conv1d(model.get_submodule(unit.module)):
        weight = weight.T
    like = nn.Linear(1, 1, bias=False, device="meta")
    like.in_features, like.out_features = int(weight.shape[1]), int(weight.shape[0])
    like.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        like.bias = nn.Parameter(bias.detach(), requires_grad=False)
    layer = linear_4bit(like, config) if config.bits == 4 else linear_8bit(like, config)
    out = dict(layer.state_dict(prefix=unit.module + "."))
    if tuple(out) != unit.keys:
        raise RuntimeError(f"quantized layer {unit.module!r} has keys {list(out)}, expected {list(unit.keys)}")
    return out


def quantized_parameters(model: nn.Module, targets: list[str], config: Any) -> int:
    """transformers' parameter count of ``model`` once ``targets`` are quantized (a packed 4-bit
    weight counts two values per stored byte, as ``families.total_parameters``)."""
    weights = {id(model.get_submodule(t).weight) for t in targets} if config.bits == 4 else set()
    itemsize = torch.empty(0, dtype=config.bnb_4bit_quant_storage).element_size()
    total = 0
    for p in model.parameters():
        n = int(p.numel())
        if id(p) in weights:
            # bitsandbytes packs n values into (n + 1) // (2 * itemsize) storage elements.
            n = logical_parameters((n + 1) // (2 * itemsize) * itemsize)
        total += n
    return total
