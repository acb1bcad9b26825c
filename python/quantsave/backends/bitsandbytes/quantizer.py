"""bitsandbytes: 4-bit (nf4/fp4, optional double quant) and 8-bit LLM.int8() Linear layers.

Checkpoint layout for a quantized Linear ``m`` (weight ``[out, in]``, ``n = out * in``)::

    4-bit  m.weight                 uint8 [(n + 1) // 2, 1]   two codes a byte, even element high
           m.weight.absmax          float32 [ceil(n / 64)]    (uint8 with double quant)
           m.weight.quant_map       float32 [16]
           m.weight.nested_absmax   float32                   double quant only
           m.weight.nested_quant_map float32 [256]            double quant only
           m.weight.quant_state.bitsandbytes__nf4  uint8      JSON bytes (type, blocksize, shape...)
    8-bit  m.weight                 int8 [out, in]
           m.SCB                    float32 [out]             row absmax
           m.weight_format          uint8 []                  0 (row-major)

All tensors of one weight form a group that the planner never splits across shards.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from quantsave.backends.bitsandbytes.config import BitsAndBytesConfig
from quantsave.backends.modules import linear_at, replace_module
from quantsave.backends.quantizer import Quantizer
from quantsave.errors import CheckpointError

if TYPE_CHECKING:
    from quantsave.families import Family

__all__ = ["BitsAndBytesQuantizer", "import_bnb", "is_bnb_module"]

_QS_KEY = re.compile(r"^(?P<m>.+)\.weight\.quant_state\.bitsandbytes__(?P<t>nf4|fp4)$")
_SCB_KEY = re.compile(r"^(?P<m>.+)\.SCB$")
_FOUR_BIT_MEMBERS = {"weight"} | {f"weight.{k}" for k in ("absmax", "quant_map", "nested_absmax", "nested_quant_map")}


def import_bnb() -> Any:
    """Imports bitsandbytes or raises an ImportError with the install line."""
    try:
        import bitsandbytes
    except ImportError as e:
        raise ImportError(
            "this checkpoint needs bitsandbytes >= 0.47 (CPU support): pip install 'bitsandbytes>=0.47'"
        ) from e
    return bitsandbytes


def is_bnb_module(module: nn.Module, name: str) -> bool:
    """True when ``module`` is bitsandbytes' ``name`` (``Linear4bit``, ``Linear8bitLt``) or a subclass,
    checked without importing bitsandbytes."""
    return any(c.__name__ == name and c.__module__.startswith("bitsandbytes") for c in type(module).__mro__)


def _groups_of(keys: list[str]) -> dict[str, tuple[int, str]]:
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


def _member_of(key: str, prefixes: dict[str, Any]) -> str | None:
    """The quantized module ``key`` belongs to, if any."""
    for suffix in (".weight", ".SCB", ".weight_format"):
        if key.endswith(suffix) and key[: -len(suffix)] in prefixes:
            return key[: -len(suffix)]
    idx = key.find(".weight.")
    while idx != -1:
        if key[:idx] in prefixes:
            return key[:idx]
        idx = key.find(".weight.", idx + 1)
    return None


def _quant_state_problem(qs: Any, packed: torch.Tensor) -> str | None:
    """What in a 4-bit state contradicts its tensors (bitsandbytes itself would dequantize
    garbage), or None."""
    n = 1
    for d in qs.shape:
        n *= int(d)
    bs = qs.blocksize
    if not isinstance(bs, int) or not 32 <= bs <= 4096 or bs & (bs - 1):
        return f"blocksize {bs!r} is not a power of two in 32..4096"
    if packed.numel() * packed.element_size() != (n + 1) // 2:
        return f"{packed.numel() * packed.element_size()} packed bytes for {n} values (needs {(n + 1) // 2})"
    blocks = (n + bs - 1) // bs
    if qs.absmax.numel() != blocks:
        return f"absmax has {qs.absmax.numel()} entries, {n} values in blocks of {bs} need {blocks}"
    if qs.code.numel() != 16:
        return f"quant_map has {qs.code.numel()} entries, not 16"
    if qs.state2 is not None:
        nbs = qs.state2.blocksize
        if nbs != 256:
            return f"nested blocksize {nbs!r} is not 256"
        if qs.state2.absmax.numel() != (blocks + nbs - 1) // nbs:
            return f"nested_absmax has {qs.state2.absmax.numel()} entries, needs {(blocks + nbs - 1) // nbs}"
        if qs.state2.code.numel() != 256:
            return f"nested_quant_map has {qs.state2.code.numel()} entries, not 256"
    return None


class BitsAndBytesQuantizer(Quantizer):
    quant_method = "bitsandbytes"
    config_cls = BitsAndBytesConfig

    config: BitsAndBytesConfig

    @classmethod
    def detect(cls, model: nn.Module) -> bool:
        return any(is_bnb_module(m, "Linear4bit") or is_bnb_module(m, "Linear8bitLt") for m in model.modules())

    @classmethod
    def config_from_model(cls, model: nn.Module) -> BitsAndBytesConfig:
        """Reads the config off the model's bitsandbytes layers (quant type, double quant, compute
        and storage dtypes, int8 threshold); plain Linear layers left unquantized are listed in
        ``llm_int8_skip_modules``."""
        four = [(n, m) for n, m in model.named_modules() if is_bnb_module(m, "Linear4bit")]
        eight = [(n, m) for n, m in model.named_modules() if is_bnb_module(m, "Linear8bitLt")]
        if four and eight:
            raise ValueError("the model mixes bitsandbytes 4-bit and 8-bit layers; one checkpoint holds one kind")
        skip = sorted(
            n
            for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and not (is_bnb_module(m, "Linear4bit") or is_bnb_module(m, "Linear8bitLt"))
        )
        if four:
            _, first = four[0]
            qs = getattr(first.weight, "quant_state", None)
            if qs is None:
                raise ValueError(f"bitsandbytes layer {four[0][0]!r} is not quantized yet (move it to a device first)")
            return BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=qs.quant_type,
                bnb_4bit_use_double_quant=bool(qs.nested),
                bnb_4bit_compute_dtype=first.compute_dtype or qs.dtype,
                bnb_4bit_quant_storage=first.weight.dtype,
                llm_int8_skip_modules=skip or None,
            )
        if eight:
            _, first = eight[0]
            return BitsAndBytesConfig(
                load_in_8bit=True,
                llm_int8_threshold=float(first.state.threshold),
                llm_int8_has_fp16_weight=bool(first.state.has_fp16_weights),
                llm_int8_skip_modules=skip or None,
            )
        raise ValueError("the model has no bitsandbytes layers")

    def state_dict(self, model: nn.Module, family: Family) -> dict[str, torch.Tensor]:
        for name, m in model.named_modules():
            if is_bnb_module(m, "Linear4bit") and getattr(m.weight, "quant_state", None) is None:
                raise ValueError(
                    f"bitsandbytes layer {name!r} holds unquantized weights; quantize it (move it to a "
                    "device, or use quantsave.quantize) before saving"
                )
            if is_bnb_module(m, "Linear8bitLt") and m.weight.dtype != torch.int8:
                raise ValueError(
                    f"bitsandbytes layer {name!r} holds {m.weight.dtype} weights, not int8; "
                    "quantize it before saving (has_fp16_weights=True layers cannot be saved as int8)"
                )
        return dict(model.state_dict())

    def weight_groups(self, keys: list[str]) -> dict[str, str]:
        prefixes = _groups_of(keys)
        out = {}
        for k in keys:
            owner = _member_of(k, prefixes)
            if owner is not None:
                out[k] = owner
        return out

    def load_into(
        self, model: nn.Module, state_dict: dict[str, torch.Tensor], metadata: dict[str, str], directory: Path
    ) -> dict[str, torch.Tensor]:
        """Replaces each Linear named by a quantized weight in ``state_dict`` with the bitsandbytes
        layer holding those tensors."""
        bnb = import_bnb()
        rest = dict(state_dict)
        prefixes = _groups_of(list(state_dict))
        members: dict[str, dict[str, torch.Tensor]] = {p: {} for p in prefixes}
        for k in list(rest):
            owner = _member_of(k, prefixes)
            if owner is not None:
                members[owner][k[len(owner) + 1 :]] = rest.pop(k)
        cfg = self.config
        for prefix, (bits, qtype) in prefixes.items():
            expected = "int8" if cfg.bits == 8 else cfg.bnb_4bit_quant_type
            if (bits, qtype) != (cfg.bits, expected):
                raise CheckpointError(
                    f"config.json says bitsandbytes {expected}, but the tensors of {prefix!r} are {qtype}"
                )
        for prefix, (bits, _qtype) in prefixes.items():
            old = linear_at(model, prefix)
            t = members[prefix]
            has_bias = old.bias is not None
            if bits == 4:
                extra = set(t) - _FOUR_BIT_MEMBERS - {f"weight.quant_state.bitsandbytes__{_qtype}"}
                if "weight" not in t or extra:
                    what = f"unexpected tensors {sorted(extra)}" if extra else "no packed 'weight' tensor"
                    raise CheckpointError(f"quantized weight {prefix!r}: {what}")
                data = t.pop("weight")
                new = bnb.nn.Linear4bit(
                    old.in_features,
                    old.out_features,
                    bias=has_bias,
                    compute_dtype=cfg.bnb_4bit_compute_dtype,
                    quant_type=_qtype,
                    quant_storage=data.dtype,
                    device="meta",
                )
                try:
                    new.weight = bnb.nn.Params4bit.from_prequantized(
                        data=data, quantized_stats=t, requires_grad=False, device=data.device, module=new
                    )
                except Exception as e:  # bitsandbytes reports bad state with asserts, KeyError, AttributeError...
                    raise CheckpointError(
                        f"quantized weight {prefix!r}: invalid bitsandbytes state: {type(e).__name__}: {e}"
                    ) from e
                shape = tuple(new.weight.quant_state.shape)
                if shape != (old.out_features, old.in_features):
                    raise CheckpointError(
                        f"quantized weight {prefix!r} has shape {list(shape)}, the model expects "
                        f"{[old.out_features, old.in_features]}"
                    )
                problem = _quant_state_problem(new.weight.quant_state, data)
                if problem is not None:
                    raise CheckpointError(f"quantized weight {prefix!r}: {problem}")
            else:
                w, scb = t.get("weight"), t.get("SCB")
                if (
                    w is None
                    or scb is None
                    or w.dtype != torch.int8
                    or tuple(w.shape) != (old.out_features, old.in_features)
                ):
                    raise CheckpointError(
                        f"8-bit weight {prefix!r}: expected int8 weight {[old.out_features, old.in_features]} and SCB"
                    )
                new = bnb.nn.Linear8bitLt(
                    old.in_features,
                    old.out_features,
                    bias=has_bias,
                    has_fp16_weights=False,
                    threshold=cfg.llm_int8_threshold,
                    device="meta",
                )
                new.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False, CB=w, SCB=scb)
            replace_module(model, prefix, new)
        return rest
