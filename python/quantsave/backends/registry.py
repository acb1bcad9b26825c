"""The registry of quantizer classes keyed by ``quant_method``, and detection of the backend
of a model."""

from __future__ import annotations

from torch import nn

from quantsave.backends.bitsandbytes.quantizer import BitsAndBytesQuantizer
from quantsave.backends.config import QuantizationConfig
from quantsave.backends.gguf.quantizer import GGUFQuantizer
from quantsave.backends.quantizer import Quantizer
from quantsave.backends.quanto.quantizer import QuantoQuantizer
from quantsave.backends.torchao.quantizer import TorchAoQuantizer

__all__ = ["detect_quantizer", "get_quantizer", "registered_methods"]

_REGISTRY: dict[str, type[Quantizer]] = {
    q.quant_method: q for q in (BitsAndBytesQuantizer, GGUFQuantizer, QuantoQuantizer, TorchAoQuantizer)
}


def registered_methods() -> list[str]:
    """Every ``quant_method`` quantsave knows."""
    return sorted(_REGISTRY)


def get_quantizer(config: QuantizationConfig) -> Quantizer:
    """The quantizer for ``config``.

    Raises:
        ValueError: no quantizer is registered for its ``quant_method`` (lists the known ones).
    """
    cls = _REGISTRY.get(config.method)
    if cls is None:
        raise ValueError(
            f"unknown quantization method {config.method!r}; supported: {', '.join(registered_methods())}"
        )
    return cls(config)


def detect_quantizer(model: nn.Module) -> type[Quantizer] | None:
    """The backend whose quantized modules ``model`` holds, if any."""
    for cls in _REGISTRY.values():
        if cls.detect(model):
            return cls
    return None
