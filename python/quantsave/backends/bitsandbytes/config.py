"""``BitsAndBytesConfig``: the bitsandbytes config, with ``to_dict()`` equal to diffusers' and
transformers' for the same arguments."""

from __future__ import annotations

from typing import Any

import torch

from quantsave.backends.config import QuantizationConfig, parse_dtype

__all__ = ["BitsAndBytesConfig"]

_QUANT_TYPES = ("nf4", "fp4")
_FIELDS = (
    "load_in_8bit",
    "load_in_4bit",
    "llm_int8_threshold",
    "llm_int8_skip_modules",
    "llm_int8_enable_fp32_cpu_offload",
    "llm_int8_has_fp16_weight",
    "bnb_4bit_quant_type",
    "bnb_4bit_use_double_quant",
    "bnb_4bit_compute_dtype",
    "bnb_4bit_quant_storage",
)


class BitsAndBytesConfig(QuantizationConfig):
    """bitsandbytes quantization: 8-bit LLM.int8() or 4-bit nf4/fp4 (optionally double quantized).

    Args mirror ``transformers.BitsAndBytesConfig``.
    """

    quant_method = "bitsandbytes"

    def __init__(
        self,
        load_in_8bit: bool = False,
        load_in_4bit: bool = False,
        llm_int8_threshold: float = 6.0,
        llm_int8_skip_modules: list[str] | None = None,
        llm_int8_enable_fp32_cpu_offload: bool = False,
        llm_int8_has_fp16_weight: bool = False,
        bnb_4bit_quant_type: str = "fp4",
        bnb_4bit_use_double_quant: bool = False,
        bnb_4bit_compute_dtype: torch.dtype | str | None = None,
        bnb_4bit_quant_storage: torch.dtype | str | None = None,
    ) -> None:
        super().__init__()
        if load_in_4bit and load_in_8bit:
            raise ValueError("load_in_4bit and load_in_8bit are both True, but only one can be used at a time")
        if bnb_4bit_quant_type not in _QUANT_TYPES:
            raise ValueError(f"bnb_4bit_quant_type must be one of {_QUANT_TYPES}, got {bnb_4bit_quant_type!r}")
        if not isinstance(llm_int8_threshold, (int, float)) or isinstance(llm_int8_threshold, bool):
            raise ValueError(f"llm_int8_threshold must be a float, got {llm_int8_threshold!r}")
        if llm_int8_skip_modules is not None and (
            not isinstance(llm_int8_skip_modules, (list, tuple))
            or not all(isinstance(m, str) for m in llm_int8_skip_modules)
        ):
            raise ValueError("llm_int8_skip_modules must be a list of module names")
        self.load_in_8bit = bool(load_in_8bit)
        self.load_in_4bit = bool(load_in_4bit)
        self.llm_int8_threshold = float(llm_int8_threshold)
        self.llm_int8_skip_modules = list(llm_int8_skip_modules) if llm_int8_skip_modules is not None else None
        self.llm_int8_enable_fp32_cpu_offload = bool(llm_int8_enable_fp32_cpu_offload)
        self.llm_int8_has_fp16_weight = bool(llm_int8_has_fp16_weight)
        self.bnb_4bit_quant_type = bnb_4bit_quant_type
        self.bnb_4bit_use_double_quant = bool(bnb_4bit_use_double_quant)
        self.bnb_4bit_compute_dtype = (
            torch.float32
            if bnb_4bit_compute_dtype is None
            else parse_dtype(bnb_4bit_compute_dtype, "bnb_4bit_compute_dtype")
        )
        self.bnb_4bit_quant_storage = (
            torch.uint8
            if bnb_4bit_quant_storage is None
            else parse_dtype(bnb_4bit_quant_storage, "bnb_4bit_quant_storage")
        )

    @property
    def bits(self) -> int:
        """4, 8, or 0 when neither mode is on."""
        return 4 if self.load_in_4bit else 8 if self.load_in_8bit else 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": self.quant_method,
            "_load_in_8bit": self.load_in_8bit,
            "_load_in_4bit": self.load_in_4bit,
            "llm_int8_threshold": self.llm_int8_threshold,
            "llm_int8_skip_modules": None if self.llm_int8_skip_modules is None else list(self.llm_int8_skip_modules),
            "llm_int8_enable_fp32_cpu_offload": self.llm_int8_enable_fp32_cpu_offload,
            "llm_int8_has_fp16_weight": self.llm_int8_has_fp16_weight,
            "bnb_4bit_quant_type": self.bnb_4bit_quant_type,
            "bnb_4bit_use_double_quant": self.bnb_4bit_use_double_quant,
            "bnb_4bit_compute_dtype": str(self.bnb_4bit_compute_dtype).split(".")[1],
            "bnb_4bit_quant_storage": str(self.bnb_4bit_quant_storage).split(".")[1],
            "load_in_4bit": self.load_in_4bit,
            "load_in_8bit": self.load_in_8bit,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BitsAndBytesConfig:
        """Builds the config from its ``config.json`` form (or a diffusers/transformers ``to_dict()``).

        Raises:
            ValueError: unknown keys or a different ``quant_method``.
        """
        kwargs: dict[str, Any] = {}
        unknown = []
        for key, value in data.items():
            if key == "quant_method":
                method = getattr(value, "value", value)
                if method != cls.quant_method:
                    raise ValueError(f"expected quant_method {cls.quant_method!r}, got {method!r}")
            elif key.lstrip("_") in _FIELDS:
                kwargs[key.lstrip("_")] = value
            else:
                unknown.append(key)
        if unknown:
            raise ValueError(
                f"unknown BitsAndBytesConfig keys {sorted(unknown)}; known keys: {sorted(_FIELDS)}"
            )
        return cls(**kwargs)
