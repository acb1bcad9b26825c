"""bitsandbytes on disk: what one quantized Linear looks like in a checkpoint. The one definition
read by the quantizer (groups, load checks), ``convert`` (the tensors it writes), ``verify``
(checks) and ``inspect`` / ``total_parameters`` (logical parameter counts).

For a Linear ``m`` with weight ``[out, in]``, ``n = out * in``, blocks of ``B = 64`` values,
``nb = ceil(n / 64)`` blocks, in state-dict order (a bias, if any, sits between ``m.weight`` and
the rest)::

    4-bit  m.weight                  uint8 [(n + 1) // 2, 1]  two codes a byte, even element high
           m.weight.absmax           float32 [nb]             (uint8 [nb] with double quant)
           m.weight.quant_map        float32 [16]             the nf4 / fp4 code table
           m.weight.nested_absmax    float32 [ceil(nb / 256)] double quant only
           m.weight.nested_quant_map float32 [256]            double quant only (signed dynamic map)
           m.weight.quant_state.bitsandbytes__nf4  uint8 [len] (or __fp4) JSON bytes, see below
    8-bit  m.weight                  int8 [out, in]
           m.SCB                     float32 [out]            row absmax of the fp16 weight
           m.weight_format           uint8 []                 0 (row-major)

    packed byte i of m.weight = code[2i] << 4 | code[2i + 1]      e.g. codes 3, 9 -> 0x39

The quant state is ``json.dumps`` (default separators) of ``{"quant_type", "blocksize",
"dtype", "shape"}`` plus, with double quant, ``"nested_blocksize": 256, "nested_dtype":
"float32", "nested_offset": <mean of absmax>``. No other keys may appear under ``m.weight.``.
All tensors of one weight form a group that the planner never splits across shards.

Logical parameters: a 4-bit weight counts ``prod(shape)`` of its quant state (2 values per
packed byte without one); transformers' ``total_parameters`` counts 2 per stored byte; an
8-bit weight counts its int8 elements; absmax, maps, state, SCB and weight_format count none.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from quantsave.backends.layout import ParameterCount, json_tensor, numel

if TYPE_CHECKING:
    from quantsave.backends.bitsandbytes.config import BitsAndBytesConfig
    from quantsave.checkpoint.reader import Checkpoint

__all__ = [
    "BLOCKSIZE",
    "NESTED_BLOCKSIZE",
    "WEIGHT_FORMAT",
    "check",
    "count_parameters",
    "four_bit_members",
    "holds_quantized",
    "logical_parameters",
    "member_of",
    "packed_bytes",
    "parameter_count",
    "quant_state_json",
    "quant_state_problem",
    "quantized_bytes",
    "quantized_modules",
    "state_key",
    "state_specs",
    "weight_groups",
    "weight_spec",
]

BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256
#: The bytes of ``m.weight_format``: 0, row-major.
WEIGHT_FORMAT = b"\x00"
#: Tensor dtype and shape, as the safetensors header names them.
Spec = tuple[str, list[int]]

_STATE = ".quant_state.bitsandbytes__"
_QS_KEY = re.compile(r"^(?P<m>.+)\.weight\.quant_state\.bitsandbytes__(?P<t>nf4|fp4)$")
_SCB_KEY = re.compile(r"^(?P<m>.+)\.SCB$")
_FOUR_BIT_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_ITEMSIZE = {"U8": 1, "I8": 1, "F32": 4}
#: The longest ``json.dumps`` of a float (for a bound on the quant state's length).
_LONGEST_FLOAT = -2.2250738585072014e-308


def state_key(weight_key: str, quant_type: str) -> str:
    """The quant-state key of the 4-bit weight ``weight_key`` (``m.weight``)."""
    return f"{weight_key}{_STATE}{quant_type}"


def packed_bytes(n: int) -> int:
    """Bytes of a packed 4-bit weight of ``n`` values."""
    return (n + 1) // 2


def logical_parameters(stored_bytes: int) -> int:
    """transformers' ``total_parameters`` of a packed 4-bit weight: two values per stored byte."""
    return 2 * stored_bytes


def parameter_count(param: Any) -> int:
    """transformers' count of one model parameter: a packed ``Params4bit`` counts
    ``logical_parameters`` of its stored bytes, any other tensor its elements."""
    if type(param).__name__ == "Params4bit":
        return logical_parameters(param.numel() * param.element_size())
    return int(param.numel())


def weight_spec(rows: int, cols: int, bits: int) -> Spec:
    """``m.weight`` of a quantized ``[rows, cols]`` weight."""
    return ("I8", [rows, cols]) if bits == 8 else ("U8", [packed_bytes(rows * cols), 1])


def state_specs(
    weight_key: str, rows: int, cols: int, *, bits: int, quant_type: str = "", double: bool = False, state_len: int = 0
) -> list[tuple[str, str, list[int]]]:
    """The tensors a quantized ``[rows, cols]`` weight keeps beside ``m.weight``, in state-dict
    order: name, dtype, shape (``state_len``: the length of a 4-bit weight's quant-state JSON)."""
    module = weight_key.removesuffix(".weight")
    if bits == 8:
        return [(f"{module}.SCB", "F32", [rows]), (f"{module}.weight_format", "U8", [])]
    blocks = (rows * cols + BLOCKSIZE - 1) // BLOCKSIZE
    specs = [
        (f"{weight_key}.absmax", "U8" if double else "F32", [blocks]),
        (f"{weight_key}.quant_map", "F32", [16]),
    ]
    if double:
        specs.append((f"{weight_key}.nested_absmax", "F32", [(blocks + NESTED_BLOCKSIZE - 1) // NESTED_BLOCKSIZE]))
        specs.append((f"{weight_key}.nested_quant_map", "F32", [256]))
    specs.append((state_key(weight_key, quant_type), "U8", [state_len]))
    return specs


def quant_state_json(quant_type: str, dtype: str, shape: list[int], offset: float | None) -> bytes:
    """bitsandbytes' packed quant state (``QuantState.as_dict(packed=True)``): JSON of the
    non-tensor fields in its order (``dtype``: the weight's torch dtype name; ``offset``: the
    double-quant offset, None without double quant)."""
    state: dict[str, Any] = {"quant_type": quant_type, "blocksize": BLOCKSIZE, "dtype": dtype, "shape": shape}
    if offset is not None:
        state.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=offset)
    return json.dumps(state).encode("utf-8")


def quantized_bytes(rows: int, cols: int, dtype: str, config: BitsAndBytesConfig) -> int:
    """Bytes of every tensor of one quantized ``[rows, cols]`` weight of torch dtype ``dtype``
    (exact, or an upper bound with double quant, whose offset is not known yet)."""
    qt, double = config.bnb_4bit_quant_type, config.bits == 4 and config.bnb_4bit_use_double_quant
    state = quant_state_json(qt, dtype, [rows, cols], _LONGEST_FLOAT if double else None)
    specs = [("m.weight", *weight_spec(rows, cols, config.bits))]
    specs += state_specs("m.weight", rows, cols, bits=config.bits, quant_type=qt, double=double, state_len=len(state))
    return sum(numel(shape) * _ITEMSIZE[dt] for _, dt, shape in specs)


def quantized_modules(keys: list[str]) -> dict[str, tuple[int, str]]:
    """Module prefix -> (bits, quant type) for every quantized module named in ``keys``."""
    found: dict[str, tuple[int, str]] = {}
    keyset = set(keys)
    for k in keys:
        m = _QS_KEY.match(k)
        if m:
            found[m["m"]] = (4, m["t"])
            continue
        m = _SCB_KEY.match(k)
        if m and f"{m['m']}.weight" in keyset:
            found[m["m"]] = (8, "int8")
    return found


def member_of(key: str, modules: dict[str, Any]) -> str | None:
    """The quantized module (one of ``modules``) whose weight group ``key`` belongs to, if any."""
    for suffix in (".weight", ".SCB", ".weight_format"):
        if key.endswith(suffix) and key[: -len(suffix)] in modules:
            return key[: -len(suffix)]
    idx = key.find(".weight.")
    while idx != -1:
        if key[:idx] in modules:
            return key[:idx]
        idx = key.find(".weight.", idx + 1)
    return None


def weight_groups(keys: list[str]) -> dict[str, str]:
    """Each key of a quantized weight -> its module (the group the planner keeps together)."""
    modules = quantized_modules(keys)
    return {k: owner for k in keys if (owner := member_of(k, modules)) is not None}


def four_bit_members(quant_type: str) -> set[str]:
    """The names, relative to the module, a 4-bit weight group may hold."""
    return {"weight", state_key("weight", quant_type)} | {f"weight.{p}" for p in _FOUR_BIT_PARTS}


def holds_quantized(keys: Any) -> bool:
    """True when ``keys`` name bitsandbytes tensors (which no loader reads without a config)."""
    return any(_STATE in k or k.endswith(".SCB") for k in keys)


def count_parameters(ckpt: Checkpoint) -> ParameterCount:
    """The logical parameters of ``ckpt``'s bitsandbytes weights (see the module docstring)."""
    tensors = ckpt.tensors
    count = ParameterCount()
    for name in tensors:
        if ".weight" + _STATE in name:
            base = name.split(".quant_state.")[0]
            count.helpers.add(name)
            count.helpers.update(f"{base}.{p}" for p in _FOUR_BIT_PARTS)
            state = json_tensor(ckpt, name)
            if isinstance(state, dict) and isinstance(state.get("shape"), list):
                count.counted[base] = numel(state["shape"])
                count.float_dtype = count.float_dtype or str(state.get("dtype") or "") or None
                count.how.add("bitsandbytes 4-bit: quant_state shape")
            elif base in tensors:
                count.counted[base] = logical_parameters(tensors[base].nbytes)
                count.how.add("bitsandbytes 4-bit: 2 values per packed byte")
        elif name.endswith(".SCB"):
            base = name[: -len("SCB")]
            count.helpers.update({name, base + "weight_format"})
            if base + "weight" in tensors:
                count.counted[base + "weight"] = numel(tensors[base + "weight"].shape)
                count.how.add("bitsandbytes 8-bit: int8 elements")
    return count


def check(ckpt: Checkpoint, config: BitsAndBytesConfig) -> list[str]:
    """Problems with ``ckpt``'s tensors for ``config`` (one line each)."""
    if config.bits == 4:
        return _check_4bit(ckpt, config.bnb_4bit_quant_type, config.bnb_4bit_use_double_quant)
    if config.bits != 8:
        return []
    tensors = ckpt.tensors
    scb = [k for k in tensors if k.endswith(".SCB")]
    if not scb:
        return ["quant_method 'bitsandbytes' (8-bit) but no '*.SCB' tensors in the shards"]
    return [
        f"tensor {k!r} has no int8 weight {k[:-3] + 'weight'!r}"
        for k in scb
        if k[:-3] + "weight" not in tensors or tensors[k[:-3] + "weight"].dtype != "I8"
    ]


def _check_4bit(ckpt: Checkpoint, quant_type: str, double: bool) -> list[str]:
    tensors = ckpt.tensors
    states = [k for k in tensors if ".weight" + _STATE in k]
    if not states:
        return [
            f"quant_method 'bitsandbytes' (4-bit {quant_type}) but no '*.weight.quant_state.bitsandbytes__*' tensors"
        ]
    problems = []
    for key in states:
        base = key.split(".quant_state.")[0]
        if not key.endswith("__" + quant_type):
            problems.append(f"tensor {key!r} is not {quant_type}, which quantization_config names")
        needed = [base] + [f"{base}.{p}" for p in _FOUR_BIT_PARTS[: 4 if double else 2]]
        problems += [f"quantized weight {base!r} lacks tensor {n!r}" for n in needed if n not in tensors]
        if base in tensors and tensors[base].dtype != "U8":
            problems.append(f"tensor {base!r} is {tensors[base].dtype}, expected packed U8")
        state = json_tensor(ckpt, key)
        if not (
            isinstance(state, dict) and state.get("quant_type") == quant_type and isinstance(state.get("shape"), list)
        ):
            problems.append(f"tensor {key!r} is not a valid {quant_type} quant_state JSON")
    return problems


def quant_state_problem(qs: Any, packed_nbytes: int) -> str | None:
    """What in a loaded 4-bit ``QuantState`` contradicts its tensors (bitsandbytes itself would
    dequantize garbage), or None (``packed_nbytes``: the bytes of ``m.weight``)."""
    n = numel(qs.shape)
    bs = qs.blocksize
    if not isinstance(bs, int) or not 32 <= bs <= 4096 or bs & (bs - 1):
        return f"blocksize {bs!r} is not a power of two in 32..4096"
    if packed_nbytes != packed_bytes(n):
        return f"{packed_nbytes} packed bytes for {n} values (needs {packed_bytes(n)})"
    blocks = (n + bs - 1) // bs
    if qs.absmax.numel() != blocks:
        return f"absmax has {qs.absmax.numel()} entries, {n} values in blocks of {bs} need {blocks}"
    if qs.code.numel() != 16:
        return f"quant_map has {qs.code.numel()} entries, not 16"
    if qs.state2 is not None:
        nbs = qs.state2.blocksize
        if nbs != NESTED_BLOCKSIZE:
            return f"nested blocksize {nbs!r} is not 256"
        if qs.state2.absmax.numel() != (blocks + nbs - 1) // nbs:
            return f"nested_absmax has {qs.state2.absmax.numel()} entries, needs {(blocks + nbs - 1) // nbs}"
        if qs.state2.code.numel() != 256:
            return f"nested_quant_map has {qs.state2.code.numel()} entries, not 256"
    return None
