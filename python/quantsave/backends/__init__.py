"""Quantization configs: one class per backend, serialized in the Hugging Face format."""

from __future__ import annotations

from quantsave.backends.bitsandbytes.config import BitsAndBytesConfig
from quantsave.backends.config import QuantizationConfig, config_class, resolve_config
from quantsave.backends.gguf.config import GGUFQuantizationConfig
from quantsave.backends.quanto.config import QuantoConfig
from quantsave.backends.torchao.config import TorchAoConfig

__all__ = [
    "BitsAndBytesConfig",
    "GGUFQuantizationConfig",
    "QuantizationConfig",
    "QuantoConfig",
    "TorchAoConfig",
    "config_class",
    "resolve_config",
]
