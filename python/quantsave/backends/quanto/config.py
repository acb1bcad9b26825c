"""``QuantoConfig``: the optimum-quanto config, with ``to_dict()`` equal to diffusers' for the
same arguments; ``from_dict`` also reads transformers' form (``weights``/``activations``)."""

from __future__ import annotations

from typing import Any

from quantsave.backends.config import QuantizationConfig, check_config_keys

__all__ = ["QuantoConfig", "WEIGHTS_DTYPES"]

#: The ``weights_dtype`` values diffusers and transformers accept.
WEIGHTS_DTYPES = ("float8", "int8", "int4", "int2")
_KEYS = ("quant_method", "weights_dtype", "modules_to_not_convert", "weights", "activations")


class QuantoConfig(QuantizationConfig):
    """optimum-quanto weight-only quantization of ``nn.Linear`` layers; mirrors
    ``diffusers.QuantoConfig``.

    Args:
        weights_dtype: ``"float8"`` (float8_e4m3fn), ``"int8"``, ``"int4"`` or ``"int2"``.
        modules_to_not_convert: short names of Linear layers kept in float (diffusers matches
            a layer's own attribute name, not its dotted path).
        from_qmap: True for the config of a folder in optimum-quanto's own layout, read from its
            ``quanto_qmap.json`` (no ``config.json`` to check the float layers against); not part
            of ``to_dict`` nor of equality.
    """

    quant_method = "quanto"

    def __init__(
        self, weights_dtype: str = "int8", modules_to_not_convert: list[str] | None = None, *, from_qmap: bool = False
    ) -> None:
        super().__init__()
        if weights_dtype not in WEIGHTS_DTYPES:
            raise ValueError(f"weights_dtype must be one of {list(WEIGHTS_DTYPES)}, got {weights_dtype!r}")
        if modules_to_not_convert is not None and (
            not isinstance(modules_to_not_convert, (list, tuple))
            or not all(isinstance(m, str) for m in modules_to_not_convert)
        ):
            raise ValueError(f"modules_to_not_convert must be a list of module names, got {modules_to_not_convert!r}")
        self.weights_dtype = weights_dtype
        self.modules_to_not_convert = None if modules_to_not_convert is None else list(modules_to_not_convert)
        self.from_qmap = bool(from_qmap)

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": self.quant_method,
            "weights_dtype": self.weights_dtype,
            "modules_to_not_convert": None
            if self.modules_to_not_convert is None
            else list(self.modules_to_not_convert),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantoConfig:
        """Builds the config from diffusers' form (``weights_dtype``) or transformers' form
        (``weights``, ``activations``).

        Raises:
            ValueError: unknown keys, another ``quant_method``, a bad dtype, or quantized
                activations (which neither format can load).
        """
        check_config_keys(cls, data, _KEYS)
        activations = data.get("activations")
        # quanto's own quantization map spells "not quantized" as the string "none".
        if activations is not None and activations != "none":
            raise ValueError(
                f"activations={activations!r}: quantized activations cannot be saved or loaded in the "
                "diffusers/transformers quanto format (it holds weight-only quantization); "
                "use optimum.quanto's own save/requantize for activation quantization"
            )
        weights_dtype = data.get("weights_dtype")
        weights = data.get("weights")
        if weights_dtype is not None and weights is not None and weights_dtype != weights:
            raise ValueError(f"quanto config has weights_dtype={weights_dtype!r} but weights={weights!r}")
        return cls(
            weights_dtype=weights_dtype if weights_dtype is not None else weights if weights is not None else "int8",
            modules_to_not_convert=data.get("modules_to_not_convert"),
        )
