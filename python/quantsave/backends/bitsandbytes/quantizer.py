"""bitsandbytes: 4-bit (nf4/fp4, optional double quant) and 8-bit LLM.int8() Linear layers.

The quantizer: reads the config off a model's layers, checks them before a save, lists the
weight groups and rebuilds the layers on load. The checkpoint layout (keys, dtypes, shapes, the
quant state) is drawn and defined in ``quantsave.backends.bitsandbytes.layout``; the layers are
built in ``quantsave.backends.bitsandbytes.modules``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from quantsave.backends.bitsandbytes import layout
from quantsave.backends.bitsandbytes.config import BitsAndBytesConfig
from quantsave.backends.bitsandbytes.modules import import_bnb, is_bnb_module, linear_4bit, linear_8bit
from quantsave.backends.layout import ParameterCount
from quantsave.backends.modules import linear_at, replace_module
from quantsave.backends.quantizer import Quantizer
from quantsave.errors import CheckpointError

if TYPE_CHECKING:
    from quantsave.checkpoint.reader import Checkpoint
    from quantsave.families import Family

__all__ = ["BitsAndBytesQuantizer", "import_bnb", "is_bnb_module"]


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
        return layout.weight_groups(keys)

    @classmethod
    def count_parameters(cls, ckpt: Checkpoint, qconfig: dict[str, Any] | None) -> ParameterCount:
        return layout.count_parameters(ckpt)

    @classmethod
    def needs_config(cls, ckpt: Checkpoint) -> bool:
        return layout.holds_quantized(ckpt.tensors)

    def check_checkpoint(self, ckpt: Checkpoint) -> list[str]:
        return layout.check(ckpt, self.config)

    def load_into(
        self, model: nn.Module, state_dict: dict[str, torch.Tensor], metadata: dict[str, str], directory: Path
    ) -> dict[str, torch.Tensor]:
        """Replaces each Linear named by a quantized weight in ``state_dict`` with the bitsandbytes
        layer holding those tensors."""
        import_bnb()
        rest = dict(state_dict)
        modules = layout.quantized_modules(list(state_dict))
        members: dict[str, dict[str, torch.Tensor]] = {p: {} for p in modules}
        for k in list(rest):
            owner = layout.member_of(k, modules)
            if owner is not None:
                members[owner][k[len(owner) + 1 :]] = rest.pop(k)
        cfg = self.config
        expected = "int8" if cfg.bits == 8 else cfg.bnb_4bit_quant_type
        for prefix, (bits, qtype) in modules.items():
            if (bits, qtype) != (cfg.bits, expected):
                raise CheckpointError(
                    f"config.json says bitsandbytes {expected}, but the tensors of {prefix!r} are {qtype}"
                )
        for prefix, (bits, _qtype) in modules.items():
            old = linear_at(model, prefix)
            build = self._four_bit if bits == 4 else self._eight_bit
            replace_module(model, prefix, build(prefix, old, members[prefix]))
        return rest

    def _four_bit(self, prefix: str, old: nn.Linear, t: dict[str, torch.Tensor]) -> nn.Module:
        """The ``Linear4bit`` holding the group ``t`` (names relative to the module) of ``prefix``."""
        extra = set(t) - layout.four_bit_members(self.config.bnb_4bit_quant_type)
        if "weight" not in t or extra:
            what = f"unexpected tensors {sorted(extra)}" if extra else "no packed 'weight' tensor"
            raise CheckpointError(f"quantized weight {prefix!r}: {what}")
        stats = dict(t)
        data = stats.pop("weight")
        new = linear_4bit(old, self.config, packed=data, stats=stats, name=prefix)
        weight: Any = new.weight  # a bitsandbytes Params4bit (bitsandbytes ships no types)
        state = weight.quant_state
        shape = tuple(state.shape)
        if shape != (old.out_features, old.in_features):
            raise CheckpointError(
                f"quantized weight {prefix!r} has shape {list(shape)}, the model expects "
                f"{[old.out_features, old.in_features]}"
            )
        problem = layout.quant_state_problem(state, data.numel() * data.element_size())
        if problem is not None:
            raise CheckpointError(f"quantized weight {prefix!r}: {problem}")
        return new

    def _eight_bit(self, prefix: str, old: nn.Linear, t: dict[str, torch.Tensor]) -> nn.Module:
        """The ``Linear8bitLt`` holding the group ``t`` (names relative to the module) of ``prefix``."""
        w, scb = t.get("weight"), t.get("SCB")
        if w is None or scb is None or w.dtype != torch.int8 or tuple(w.shape) != (old.out_features, old.in_features):
            raise CheckpointError(
                f"8-bit weight {prefix!r}: expected int8 weight {[old.out_features, old.in_features]} and SCB"
            )
        return linear_8bit(old, self.config, weight=w, scb=scb)
