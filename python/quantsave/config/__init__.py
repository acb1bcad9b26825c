"""Quantization configs: one class per backend, serialized in the Hugging Face format."""

from __future__ import annotations

from quantsave.config.base import QuantizationConfig, config_class, resolve_config
from quantsave.config.bnb import BitsAndBytesConfig
from quantsave.config.gguf import GGUFQuantizationConfig
from quantsave.config.quanto import QuantoConfig
from quantsave.config.torchao import TorchAoConfig

__all__ = [
    "BitsAndBytesConfig",
    "GGUFQuantizationConfig",
    "QuantizationConfig",
    "QuantoConfig",
    "TorchAoConfig",
    "config_class",
    "resolve_config",
]
