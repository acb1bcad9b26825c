"""``GGUFQuantizationConfig``: GGUF-quantized weights, which the Hugging Face format cannot
store (the per-tensor GGML type lives only in memory)."""

from __future__ import annotations

from typing import Any

import torch

from quantsave.backends.config import QuantizationConfig, check_config_keys, parse_dtype

__all__ = ["GGUFQuantizationConfig"]

_KEYS = ("quant_method", "compute_dtype", "pre_quantized", "modules_to_not_convert")


class GGUFQuantizationConfig(QuantizationConfig):
    """GGUF weights dequantized on the fly; mirrors ``diffusers.GGUFQuantizationConfig``.

    Args:
        compute_dtype: the floating dtype (or its name) the layers compute in; float32 by default.
        modules_to_not_convert: names of modules kept in float (diffusers' loader reads it;
            its ``__init__`` always sets None, but a config read back keeps what it held).

    Raises:
        ValueError: a ``compute_dtype`` that is not a floating torch dtype or its name, or a
            ``modules_to_not_convert`` that is not a list of names.
    """

    quant_method = "gguf"

    def __init__(
        self, compute_dtype: torch.dtype | str | None = None, *, modules_to_not_convert: list[str] | None = None
    ) -> None:
        super().__init__()
        if modules_to_not_convert is not None and (
            not isinstance(modules_to_not_convert, (list, tuple))
            or not all(isinstance(m, str) for m in modules_to_not_convert)
        ):
            raise ValueError(f"modules_to_not_convert must be a list of module names, got {modules_to_not_convert!r}")
        self.compute_dtype = (
            torch.float32 if compute_dtype is None else parse_dtype(compute_dtype, "compute_dtype", floating=True)
        )
        self.modules_to_not_convert = None if modules_to_not_convert is None else list(modules_to_not_convert)

    def to_dict(self) -> dict[str, Any]:
        """diffusers' ``to_dict()`` (its ``__dict__``), with the dtype written by name."""
        return {
            "quant_method": self.quant_method,
            "compute_dtype": str(self.compute_dtype).split(".")[1],
            "pre_quantized": True,
            "modules_to_not_convert": None
            if self.modules_to_not_convert is None
            else list(self.modules_to_not_convert),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GGUFQuantizationConfig:
        """Builds the config from its dict form (or a diffusers ``to_dict()``).

        Raises:
            ValueError: unknown keys, another ``quant_method`` or a bad value.
        """
        check_config_keys(cls, data, _KEYS)
        return cls(compute_dtype=data.get("compute_dtype"), modules_to_not_convert=data.get("modules_to_not_convert"))
