"""The quantizer interface: what a backend must say about itself (``is_serializable``,
``supports_safetensors``), which tensors form one weight, the config of a model, and how to
rebuild its quantized modules on load."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from quantsave.config.base import QuantizationConfig

__all__ = ["Quantizer"]


class Quantizer:
    """One backend. Subclasses register by setting ``quant_method``."""

    quant_method: ClassVar[str] = ""
    config_cls: ClassVar[type[QuantizationConfig]] = QuantizationConfig
    is_serializable: ClassVar[bool] = True
    supports_safetensors: ClassVar[bool] = True
    #: Why the backend cannot be saved, when ``is_serializable`` is False.
    not_serializable_reason: ClassVar[str] = ""

    def __init__(self, config: QuantizationConfig) -> None:
        self.config = config

    @classmethod
    def detect(cls, model: nn.Module) -> bool:
        """True when ``model`` holds modules quantized by this backend."""
        return False

    @classmethod
    def config_from_model(cls, model: nn.Module) -> QuantizationConfig:
        """The config describing an already-quantized ``model``."""
        raise ValueError(f"cannot infer a {cls.quant_method} config from the model; pass quantization_config")

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors to save, in the order the reference writes them."""
        return dict(model.state_dict())

    def header_metadata(self, state_dict: dict[str, torch.Tensor]) -> dict[str, str]:
        """Extra safetensors header metadata for every shard."""
        return {}

    def weight_groups(self, keys: list[str]) -> dict[str, str]:
        """Maps each key that belongs to a multi-tensor quantized weight to its group name."""
        return {}

    def load_into(self, model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Swaps in quantized modules built from ``state_dict``; returns the tensors left to load."""
        return state_dict

    def describe(self) -> dict[str, Any]:
        return {"quant_method": self.quant_method}
