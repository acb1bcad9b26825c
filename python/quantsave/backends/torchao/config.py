"""``TorchAoConfig``: a torchao quantization config (an ``AOBaseConfig`` such as
``Int8WeightOnlyConfig()``), serialized as diffusers and transformers write it:
``{"quant_method": "torchao", "quant_type": {"default": config_to_dict(cfg)}, ...}``. Config
objects are rebuilt only through torchao's allow-listed ``config_from_dict``."""

from __future__ import annotations

import copy
from typing import Any

from quantsave.backends.config import QuantizationConfig, check_config_keys

__all__ = ["TorchAoConfig"]

_KEYS = (
    "quant_method",
    "quant_type",
    "modules_to_not_convert",
    "include_input_output_embeddings",
    "untie_embedding_weights",
)


def _is_ao_config(obj: Any) -> bool:
    return any(c.__name__ == "AOBaseConfig" and c.__module__.startswith("torchao") for c in type(obj).__mro__)


def _check_encoded(data: Any) -> dict[str, Any]:
    """Validates an encoded torchao config (``{"_type", "_version", "_data"}``), through torchao's
    allow-listed decoder when torchao is installed."""
    if not isinstance(data, dict) or not isinstance(data.get("_type"), str) or not isinstance(data.get("_data"), dict):
        raise ValueError(
            "quant_type must be a torchao config object or its encoded form "
            '{"_type": ..., "_version": ..., "_data": {...}}'
        )
    if "_version" not in data:
        raise ValueError(
            f"encoded torchao config {data['_type']!r} has no '_version'; torchao reads a missing version as "
            "1, which current configs reject"
        )
    try:
        from torchao.core.config import config_from_dict
    except ImportError:
        return copy.deepcopy(data)
    try:
        config_from_dict(copy.deepcopy(data))
    except Exception as e:  # torchao raises ValueError, TypeError, KeyError... for bad input
        raise ValueError(f"invalid torchao config {data['_type']!r}: {type(e).__name__}: {e}") from e
    return copy.deepcopy(data)


class TorchAoConfig(QuantizationConfig):
    """torchao quantization; mirrors ``diffusers.TorchAoConfig`` and ``transformers.TorchAoConfig``.

    Args:
        quant_type: a torchao config object (``Int8WeightOnlyConfig()``, ``Float8WeightOnlyConfig()``,
            ...), its encoded dict, or ``{"default": <encoded dict>}``. String shorthands such as
            ``"int8wo"`` were removed from diffusers and transformers and are rejected.
        modules_to_not_convert: modules left unquantized.
        include_input_output_embeddings, untie_embedding_weights: transformers' options, written
            for transformers models only.
    """

    quant_method = "torchao"

    def __init__(
        self,
        quant_type: Any,
        modules_to_not_convert: list[str] | None = None,
        include_input_output_embeddings: bool = False,
        untie_embedding_weights: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(quant_type, str):
            raise ValueError(
                f"string quant types such as {quant_type!r} are no longer supported by diffusers and "
                "transformers; pass a torchao config object, e.g. TorchAoConfig(Int8WeightOnlyConfig())"
            )
        self._config_obj: Any = None
        if isinstance(quant_type, dict):
            if set(quant_type) == {"default"}:
                quant_type = quant_type["default"]
            elif "default" in quant_type or "_type" not in quant_type:
                raise ValueError(
                    f"quant_type must hold exactly one key 'default' (per-module configs are not supported), "
                    f"got keys {sorted(quant_type)}"
                )
            self._encoded = _check_encoded(quant_type)
        elif _is_ao_config(quant_type):
            from torchao.core.config import config_to_dict

            self._encoded = config_to_dict(quant_type)
            self._config_obj = quant_type
        else:
            raise ValueError(f"quant_type must be a torchao AOBaseConfig, got {type(quant_type).__name__}")
        if modules_to_not_convert is not None and (
            not isinstance(modules_to_not_convert, (list, tuple))
            or not all(isinstance(m, str) for m in modules_to_not_convert)
        ):
            raise ValueError("modules_to_not_convert must be a list of module names")
        self.modules_to_not_convert = list(modules_to_not_convert) if modules_to_not_convert is not None else None
        self.include_input_output_embeddings = bool(include_input_output_embeddings)
        self.untie_embedding_weights = bool(untie_embedding_weights)

    @property
    def quant_type(self) -> Any:
        """The torchao config object (rebuilt through torchao's allow-listed ``config_from_dict``)."""
        if self._config_obj is None:
            try:
                from torchao.core.config import config_from_dict
            except ImportError as e:
                raise ImportError("this config needs torchao: pip install 'torchao>=0.16'") from e
            self._config_obj = config_from_dict(copy.deepcopy(self._encoded))
        return self._config_obj

    @property
    def quant_type_name(self) -> str:
        """The torchao config class name, e.g. ``"Int8WeightOnlyConfig"``."""
        return str(self._encoded["_type"])

    def to_dict(self) -> dict[str, Any]:
        """The diffusers form."""
        return {
            "modules_to_not_convert": None
            if self.modules_to_not_convert is None
            else list(self.modules_to_not_convert),
            "quant_method": self.quant_method,
            "quant_type": {"default": copy.deepcopy(self._encoded)},
        }

    def to_transformers_dict(self) -> dict[str, Any]:
        """The transformers form: the diffusers form plus transformers' two embedding options."""
        return {
            **self.to_dict(),
            "include_input_output_embeddings": self.include_input_output_embeddings,
            "untie_embedding_weights": self.untie_embedding_weights,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TorchAoConfig:
        """Builds the config from its ``config.json`` form (or a diffusers/transformers ``to_dict()``).

        Raises:
            ValueError: unknown keys, a missing or invalid ``quant_type``, or another ``quant_method``.
        """
        check_config_keys(cls, data, _KEYS)
        if "quant_type" not in data:
            raise ValueError("TorchAoConfig needs 'quant_type'")
        return cls(
            data["quant_type"],
            modules_to_not_convert=data.get("modules_to_not_convert"),
            include_input_output_embeddings=data.get("include_input_output_embeddings", False),
            untie_embedding_weights=data.get("untie_embedding_weights", False),
        )
