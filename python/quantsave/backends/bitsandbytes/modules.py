"""The one place that builds bitsandbytes layers: ``linear_4bit`` and ``linear_8bit`` make the
layer that stands in for an ``nn.Linear``, either from its float weight (``quantsave.quantize``)
or from the packed tensors of a checkpoint (``BitsAndBytesQuantizer.load_into``). Also the
bitsandbytes import and a check of layer classes that needs no import."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from quantsave import codec
from quantsave.backends.bitsandbytes.layout import BLOCKSIZE
from quantsave.errors import CheckpointError

if TYPE_CHECKING:
    from quantsave.backends.bitsandbytes.config import BitsAndBytesConfig

__all__ = ["import_bnb", "is_bnb_module", "linear_4bit", "linear_8bit"]


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


def linear_4bit(
    like: nn.Linear,
    config: BitsAndBytesConfig,
    *,
    packed: torch.Tensor | None = None,
    stats: dict[str, torch.Tensor] | None = None,
    name: str = "",
) -> nn.Module:
    """A ``Linear4bit`` with ``like``'s features and ``config``'s settings.

    Without ``packed``: holds ``like``'s weight quantized (on the CPU by the Rust codec, bit for
    bit bitsandbytes' result; elsewhere by bitsandbytes as the layer moves to the device) and its
    bias, on ``like``'s device. With ``packed`` (``m.weight``) and ``stats`` (the rest of the
    group, names relative to ``m.weight``, as bitsandbytes' ``from_prequantized`` takes them):
    those tensors, the bias left on the meta device for the caller to load.

    Raises:
        CheckpointError: ``stats`` bitsandbytes cannot read (``name`` is the module's).
    """
    bnb = import_bnb()
    storage = config.bnb_4bit_quant_storage if packed is None else packed.dtype
    new: Any = bnb.nn.Linear4bit(
        like.in_features,
        like.out_features,
        bias=like.bias is not None,
        compute_dtype=config.bnb_4bit_compute_dtype,
        compress_statistics=config.bnb_4bit_use_double_quant,
        quant_type=config.bnb_4bit_quant_type,
        quant_storage=storage,
        device="meta",
    )
    if packed is not None:
        try:
            new.weight = bnb.nn.Params4bit.from_prequantized(
                data=packed, quantized_stats=dict(stats or {}), requires_grad=False, device=packed.device, module=new
            )
        except Exception as e:  # bitsandbytes reports bad state with asserts, KeyError, AttributeError...
            raise CheckpointError(
                f"quantized weight {name!r}: invalid bitsandbytes state: {type(e).__name__}: {e}"
            ) from e
        return cast(nn.Module, new)
    device, weight = like.weight.device, like.weight.detach()
    kwargs = dict(
        requires_grad=False,
        compress_statistics=config.bnb_4bit_use_double_quant,
        quant_type=config.bnb_4bit_quant_type,
        quant_storage=config.bnb_4bit_quant_storage,
        module=new,
    )
    if device.type == "cpu":
        # The Rust codec: bitsandbytes' CPU result, bit for bit, at a fraction of the time.
        data, state = codec.quantize_4bit(
            weight,
            blocksize=BLOCKSIZE,
            compress_statistics=config.bnb_4bit_use_double_quant,
            quant_type=config.bnb_4bit_quant_type,
            quant_storage=config.bnb_4bit_quant_storage,
        )
        new.weight = bnb.nn.Params4bit(data, quant_state=state, blocksize=BLOCKSIZE, bnb_quantized=True, **kwargs)
        new.quant_state = state
    else:
        new.weight = bnb.nn.Params4bit(weight, **kwargs)
    return _with_bias(new, like).to(device)


def linear_8bit(
    like: nn.Linear,
    config: BitsAndBytesConfig,
    *,
    weight: torch.Tensor | None = None,
    scb: torch.Tensor | None = None,
) -> nn.Module:
    """A ``Linear8bitLt`` with ``like``'s features and ``config``'s threshold.

    Without ``weight``: holds ``like``'s weight (row-wise int8 by the Rust codec on the CPU, by
    bitsandbytes elsewhere, or kept in float with ``llm_int8_has_fp16_weight``) and its bias, on
    ``like``'s device. With the int8 ``weight`` and its ``scb`` from a checkpoint: those, the bias
    left on the meta device for the caller to load.
    """
    bnb = import_bnb()
    fp16 = config.llm_int8_has_fp16_weight and weight is None
    new: Any = bnb.nn.Linear8bitLt(
        like.in_features,
        like.out_features,
        bias=like.bias is not None,
        has_fp16_weights=fp16,
        threshold=config.llm_int8_threshold,
        device="meta",
    )
    if weight is not None:
        new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False, CB=weight, SCB=scb)
        return cast(nn.Module, new)
    device, float_weight = like.weight.device, like.weight.detach()
    if device.type == "cpu" and not fp16:
        q, row_scale = codec.quantize_8bit(float_weight)
        new.weight = bnb.nn.Int8Params(q, requires_grad=False, has_fp16_weights=False, CB=q, SCB=row_scale)
    else:
        new.weight = bnb.nn.Int8Params(float_weight, requires_grad=False, has_fp16_weights=fp16)
    return _with_bias(new, like).to(device)


def _with_bias(new: nn.Module, like: nn.Linear) -> nn.Module:
    """``new`` holding ``like``'s bias (frozen, not copied), if it has one."""
    if like.bias is not None:
        new.bias = nn.Parameter(like.bias.detach(), requires_grad=False)
    return new
