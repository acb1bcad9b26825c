"""``GGUFQuantizationConfig``: GGUF-quantized weights, which the Hugging Face format cannot
store (the per-tensor GGML type lives only in memory)."""

from __future__ import annotations

from typing import Any

import torch

from quantsave.backends.config import QuantizationConfig

__all__ = ["GGUFQuantizationConfig"]


class GGUFQuantizationConfig(QuantizationConfig):
    """GGUF weights dequantized on the fly; mirrors ``diffusers.GGUFQuantizationConfig``."""

    quant_method = "gguf"

    def __init__(self, compute_dtype: torch.dtype | str | None = None) -> None:
        super().__init__()
        if isinstance(compute_dtype, str):
            compute_dtype = getattr(torch, compute_dtype)
        self.compute_dtype = compute_dtype or torch.float32

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": self.quant_method, "compute_dtype": str(self.compute_dtype).split(".")[1]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GGUFQuantizationConfig:
        unknown = set(data) - {"quant_method", "compute_dtype", "pre_quantized", "modules_to_not_convert"}
        if unknown:
            raise ValueError(f"unknown GGUFQuantizationConfig keys {sorted(unknown)}")
        return cls(compute_dtype=data.get("compute_dtype"))
