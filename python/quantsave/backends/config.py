"""The config base class, the registry of config classes by ``quant_method``, and
``resolve_config``, which accepts a quantsave config, a diffusers/transformers config object or
a plain dict wherever a config is taken, and ``parse_dtype`` for the configs' dtype fields."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, ClassVar

import torch

__all__ = [
    "QuantizationConfig",
    "check_config_keys",
    "config_class",
    "parse_dtype",
    "resolve_config",
]

_CONFIGS: dict[str, type[QuantizationConfig]] = {}


class QuantizationConfig:
    """Base class of every quantization config.

    Subclasses set ``quant_method`` and implement ``to_dict``/``from_dict``. A config of a
    ``quant_method`` quantsave has no class for is kept as a plain dict in this base class.
    """

    quant_method: ClassVar[str] = ""

    def __init__(self, data: dict[str, Any] | None = None) -> None:
        self._data = dict(data or {})

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.quant_method:
            _CONFIGS[cls.quant_method] = cls

    @property
    def method(self) -> str:
        """The ``quant_method`` this config stands for."""
        return self.quant_method or str(self._data.get("quant_method", ""))

    def to_dict(self) -> dict[str, Any]:
        """The dict written under ``quantization_config`` in ``config.json``."""
        return dict(self._data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantizationConfig:
        """Builds the config from its ``config.json`` form."""
        return cls(data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, QuantizationConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"


def parse_dtype(value: Any, field: str, *, floating: bool = False) -> torch.dtype:
    """``value`` as a torch dtype: a ``torch.dtype`` or its name (``"bfloat16"``, ``"torch.bfloat16"``).

    Raises:
        ValueError: anything else, or (``floating``) a dtype that is not floating point.
    """
    dtype = value
    if isinstance(value, str):
        dtype = getattr(torch, value.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or (floating and not dtype.is_floating_point):
        kind = "a floating torch.dtype" if floating else "a torch.dtype"
        raise ValueError(f"{field} must be {kind} or its name, got {value!r}")
    return dtype


def config_class(quant_method: str) -> type[QuantizationConfig] | None:
    """The config class registered for ``quant_method``, if any."""
    return _CONFIGS.get(quant_method)


def _method_of(data: dict[str, Any]) -> str:
    method = data.get("quant_method")
    # diffusers and transformers store an enum whose value is the string.
    method = getattr(method, "value", method)
    if not isinstance(method, str) or not method:
        raise ValueError(
            f"quantization config has no 'quant_method'; supported methods: {sorted(_CONFIGS)}"
        )
    return method


def resolve_config(config: Any) -> QuantizationConfig | None:
    """Turns ``config`` (quantsave config, diffusers/transformers config object or dict) into a
    quantsave config. ``None`` stays ``None``.

    Raises:
        ValueError: the object is not a quantization config.
    """
    if config is None or isinstance(config, QuantizationConfig):
        return config
    if isinstance(config, dict):
        data = dict(config)
    elif callable(getattr(config, "to_dict", None)):
        data = dict(config.to_dict())
    else:
        raise ValueError(
            "expected a quantization config (quantsave, diffusers or transformers config, or dict), "
            f"got {type(config).__name__}"
        )
    method = _method_of(data)
    data["quant_method"] = method
    cls = _CONFIGS.get(method)
    if cls is None:
        return QuantizationConfig(data)
    return cls.from_dict(data)


def check_config_keys(cls: type[QuantizationConfig], data: dict[str, Any], known: Iterable[str]) -> None:
    """Refuses a ``config.json`` form with keys ``cls`` does not know or another ``quant_method``
    (diffusers and transformers store an enum whose value is the string).

    Raises:
        ValueError: naming the unknown keys and the known ones, or both methods.
    """
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; known keys: {sorted(known)}")
    method = data.get("quant_method", cls.quant_method)
    method = getattr(method, "value", method)
    if method != cls.quant_method:
        raise ValueError(f"expected quant_method {cls.quant_method!r}, got {method!r}")
