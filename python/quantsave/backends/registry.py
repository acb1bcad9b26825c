"""The registry of quantizer classes keyed by ``quant_method``, detection of the backend of a
model, and the config recorded on a quantized model.

The recorded config is the one home of "how this model was quantized": ``quantize``,
``load_quantized`` and ``load_gguf`` record it with ``record_config``; ``save_quantized`` reads it
with ``recorded_config`` so that it needs no ``quantization_config`` argument. It lives in the
model's ``_quantsave_config`` attribute (a plain attribute, so it survives ``.to()`` and
``.eval()``, and is not part of the state dict).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from quantsave.backends.bitsandbytes.quantizer import BitsAndBytesQuantizer
from quantsave.backends.config import QuantizationConfig, resolve_config
from quantsave.backends.gguf.quantizer import GGUFQuantizer
from quantsave.backends.quantizer import Quantizer
from quantsave.backends.quanto.quantizer import QuantoQuantizer
from quantsave.backends.torchao.quantizer import TorchAoQuantizer

__all__ = [
    "detect_quantizer",
    "get_quantizer",
    "quantizer_classes",
    "record_config",
    "recorded_config",
    "registered_methods",
]

#: The attribute of a model that holds its recorded config.
_RECORD = "_quantsave_config"

_REGISTRY: dict[str, type[Quantizer]] = {
    q.quant_method: q for q in (BitsAndBytesQuantizer, GGUFQuantizer, QuantoQuantizer, TorchAoQuantizer)
}


def registered_methods() -> list[str]:
    """Every ``quant_method`` quantsave knows."""
    return sorted(_REGISTRY)


def quantizer_classes() -> list[type[Quantizer]]:
    """Every registered quantizer class, in registration order."""
    return list(_REGISTRY.values())


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


def record_config(model: nn.Module, config: QuantizationConfig) -> None:
    """Records ``config`` as the way ``model`` was quantized (replacing an earlier record)."""
    setattr(model, _RECORD, config)


def recorded_config(model: nn.Module) -> QuantizationConfig | None:
    """The config recorded on ``model``, if any (a record in another accepted form, such as a
    diffusers config or a dict, is resolved).

    Raises:
        ValueError: the record is not a quantization config.
    """
    record: Any = getattr(model, _RECORD, None)
    return resolve_config(record)
