"""CPU quantization kernels from the Rust core, as drop-ins for bitsandbytes' functional API.

``quantize_4bit`` / ``dequantize_4bit`` take the same arguments as
``bitsandbytes.functional.quantize_4bit`` / ``dequantize_4bit`` and give the same results on the
CPU (a bitsandbytes ``QuantState`` when bitsandbytes is installed, an equivalent
``quantsave.codec.QuantState`` otherwise). Packed layout: element ``2k`` in the high nibble of
byte ``k``, element ``2k + 1`` in the low nibble::

    values  x0  x1  x2          (odd count: the last low nibble holds the code of 0.0)
    bytes   [x0 << 4 | x1] [x2 << 4 | code(0.0)]

One deliberate difference: fp4 values that round to zero get the sign bit when ``x < 0``
(bitsandbytes' CUDA rule, applied to the scaled value: an ``x / absmax`` that underflows to -0.0
gets no sign bit); bitsandbytes' CPU path sets it for tiny positive values instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from quantsave import _core
from quantsave.checkpoint.tensors import byte_view, dtype_name

__all__ = ["QuantState", "dequantize_4bit", "dequantize_8bit", "quantize_4bit", "quantize_8bit"]

_FLOAT = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


@dataclass
class QuantState:
    """The fields of bitsandbytes' ``QuantState`` that 4-bit (de)quantization uses."""

    absmax: torch.Tensor
    shape: torch.Size
    code: torch.Tensor
    blocksize: int
    quant_type: str | None
    dtype: torch.dtype
    offset: torch.Tensor | None = None
    state2: QuantState | None = None

    @property
    def nested(self) -> bool:
        return self.state2 is not None


def _quant_state_cls() -> Any:
    try:
        from bitsandbytes.functional import QuantState as BnbQuantState
    except ImportError:
        return QuantState
    return BnbQuantState


def _code(quant_type: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(_core.code_4bit(quant_type)), dtype=torch.float32)


def _dynamic_map() -> torch.Tensor:
    return torch.frombuffer(bytearray(_core.dynamic_map()), dtype=torch.float32)


def _cpu_contiguous(t: torch.Tensor) -> torch.Tensor:
    if t.device.type != "cpu":
        raise ValueError(f"quantsave.codec runs on the CPU; got a tensor on {t.device}")
    return t.detach().contiguous()


def quantize_4bit(
    A: torch.Tensor,
    absmax: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    blocksize: int | None = None,
    compress_statistics: bool = False,
    quant_type: str = "fp4",
    quant_storage: torch.dtype = torch.uint8,
) -> tuple[torch.Tensor, Any]:
    """Blockwise 4-bit quantization (nf4 or fp4); see ``bitsandbytes.functional.quantize_4bit``.

    Raises:
        ValueError: unsupported dtype, blocksize or quant type, or NaN/infinite values.
    """
    blocksize = 64 if blocksize is None else blocksize
    if A.dtype not in _FLOAT:
        raise ValueError(f"Blockwise 4bit quantization only supports 16/32-bit floats, but got {A.dtype}")
    x = _cpu_contiguous(A).reshape(-1)
    n = x.numel()
    packed = torch.empty(((n + 1) // 2,), dtype=torch.uint8)
    amax = torch.empty(((n + blocksize - 1) // blocksize,), dtype=torch.float32)
    if n:
        _core.quantize_4bit(byte_view(x), _FLOAT[A.dtype], byte_view(packed), byte_view(amax), blocksize, quant_type)
    packed = packed.unsqueeze(1)
    if quant_storage != torch.uint8:
        packed = packed.squeeze().view(quant_storage).unsqueeze(1)
    cls = _quant_state_cls()
    code = _code(quant_type)
    if compress_statistics:
        offset = amax.mean()
        codes, nested = _core.quantize_dynamic(byte_view(amax), float(offset), 256)
        qabsmax = torch.frombuffer(bytearray(codes), dtype=torch.uint8)
        state2 = cls(
            absmax=torch.frombuffer(bytearray(nested), dtype=torch.float32),
            code=_dynamic_map(),
            blocksize=256,
            dtype=torch.float32,
        )
        state = cls(
            absmax=qabsmax, shape=A.shape, dtype=A.dtype, blocksize=blocksize, code=code,
            quant_type=quant_type, offset=offset, state2=state2,
        )
    else:
        state = cls(absmax=amax, shape=A.shape, dtype=A.dtype, blocksize=blocksize, code=code, quant_type=quant_type)
    if out is not None:
        packed = out.copy_(packed)
    if absmax is not None:
        state.absmax = absmax.copy_(state.absmax)
    return packed, state


def dequantize_4bit(
    A: torch.Tensor,
    quant_state: Any = None,
    absmax: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    blocksize: int | None = None,
    quant_type: str = "fp4",
) -> torch.Tensor:
    """Undoes ``quantize_4bit``; see ``bitsandbytes.functional.dequantize_4bit``."""
    if quant_state is None:
        if absmax is None or out is None:
            raise ValueError("pass quant_state, or both absmax and out")
        shape, dtype, bs, qt = out.shape, out.dtype, blocksize or 64, quant_type
        amax = absmax
    else:
        shape, dtype, bs, qt = quant_state.shape, quant_state.dtype, quant_state.blocksize, quant_state.quant_type
        amax = quant_state.absmax
        if quant_state.state2 is not None:
            s2 = quant_state.state2
            raw = _core.dequantize_dynamic(
                byte_view(_cpu_contiguous(amax)),
                byte_view(_cpu_contiguous(s2.absmax)),
                float(quant_state.offset),
                s2.blocksize,
            )
            amax = torch.frombuffer(bytearray(raw), dtype=torch.float32)
    if dtype not in _FLOAT:
        raise ValueError(f"cannot dequantize to {dtype}")
    packed = _cpu_contiguous(A).reshape(-1).view(torch.uint8)
    result = out if out is not None and out.is_contiguous() else torch.empty(shape, dtype=dtype)
    if result.numel():
        _core.dequantize_4bit(
            byte_view(packed), byte_view(_cpu_contiguous(amax).float()), byte_view(result), _FLOAT[dtype], bs, qt
        )
    if out is not None and result is not out:
        out.copy_(result)
        return out
    return result


def quantize_8bit(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM.int8() row-wise quantization of a 2-D weight (converted to float16 first, as
    bitsandbytes does): ``(int8 weight, float32 SCB)``."""
    if A.dim() != 2:
        raise ValueError(f"quantize_8bit expects a 2-D weight, got shape {list(A.shape)}")
    dtype_name(A.dtype)
    x = _cpu_contiguous(A).to(torch.float16)
    rows, cols = x.shape
    q = torch.empty((rows, cols), dtype=torch.int8)
    scb = torch.empty((rows,), dtype=torch.float32)
    if x.numel():
        _core.quantize_int8_rows(byte_view(x), rows, cols, byte_view(q), byte_view(scb))
    else:
        scb.zero_()  # rows of no values: absmax 0
    return q, scb


def dequantize_8bit(q: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    """Undoes ``quantize_8bit`` in float32, with bitsandbytes' arithmetic
    (``int8_vectorwise_dequant``: times the row's SCB, times 1/127)."""
    return q * scb.float().view(-1, 1) * 7.874015718698502e-3
