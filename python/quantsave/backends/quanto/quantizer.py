"""optimum-quanto: frozen ``QLinear`` layers with int8, float8, int4 or int2 weights, saved in the
layout diffusers' ``from_pretrained`` reads, plus ``quanto_qmap.json`` for optimum-quanto's loaders.

The quantizer: checks a model's quanto layers against the format and the config, writes the
config (diffusers' form, or a form transformers refuses) and the map, and rebuilds ``QLinear``
layers on load. The checkpoint layout is drawn and defined in ``quantsave.backends.quanto.layout``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from quantsave.backends.config import QuantizationConfig
from quantsave.backends.layout import ParameterCount
from quantsave.backends.modules import linear_at, replace_module
from quantsave.backends.quantizer import Quantizer
from quantsave.backends.quanto import layout
from quantsave.backends.quanto.config import QuantoConfig
from quantsave.backends.quanto.layout import QMAP_NAME
from quantsave.errors import CheckpointError
from quantsave.families import DIFFUSERS, TRANSFORMERS, Family, family_of

if TYPE_CHECKING:
    from quantsave.checkpoint.reader import Checkpoint

__all__ = ["QMAP_NAME", "QuantoQuantizer", "import_quanto", "is_qmodule"]

_NOT_LINEAR = (
    ": only quantized Linear layers can be loaded (quanto's QConv2d/QLayerNorm are not part "
    "of the diffusers format, and diffusers would load them as NaN)"
)
_QTYPE_OF = {"int8": "qint8", "float8": "qfloat8_e4m3fn", "int4": "qint4", "int2": "qint2"}
_DTYPE_OF = {**{q: d for d, q in _QTYPE_OF.items()}, "qfloat8": "float8"}


def import_quanto() -> Any:
    """Imports optimum.quanto or raises an ImportError with the install line."""
    try:
        import optimum.quanto as quanto
    except ImportError as e:
        raise ImportError("this checkpoint needs optimum-quanto: pip install 'optimum-quanto>=0.2.6'") from e
    return quanto


def _derives(obj: Any, name: str) -> bool:
    return any(c.__name__ == name and c.__module__.startswith("optimum.quanto") for c in type(obj).__mro__)


def is_qmodule(module: nn.Module) -> bool:
    """True for an optimum-quanto quantized module, checked without importing optimum-quanto."""
    return _derives(module, "QModuleMixin")


def _short(name: str) -> str:
    return name.rpartition(".")[2]


def _inspect(model: nn.Module) -> tuple[str, list[str], list[str]]:
    """The ``weights_dtype`` of ``model``'s quanto layers, their names, and the names of its
    unquantized Linear layers.

    Raises:
        ValueError: something the diffusers/transformers quanto format cannot hold.
    """
    quantized: list[str] = []
    plain: list[str] = []
    qtypes: set[str] = set()
    for name, m in model.named_modules():
        if not is_qmodule(m):
            if isinstance(m, nn.Linear):
                plain.append(name)
            continue
        kind = type(m).__name__
        if not isinstance(m, nn.Linear):
            raise ValueError(
                f"{name!r} is a quanto {kind}: the diffusers/transformers quanto format holds quantized "
                "nn.Linear layers only (diffusers quantizes nothing else, and loads other quantized "
                f"layers as NaN). Quantize the float model again with optimum.quanto.quantize(model, "
                f"weights=..., exclude=[{name!r}, ...]) so that only Linear layers are quantized"
            )
        # optimum-quanto ships no types: its qtypes stay Any.
        activation_qtype: Any = getattr(m, "activation_qtype", None)
        weight_qtype: Any = getattr(m, "weight_qtype", None)
        if activation_qtype is not None:
            raise ValueError(
                f"{name!r} quantizes activations ({activation_qtype.name}); the diffusers/transformers "
                "quanto format holds weight-only quantization. Quantize with activations=None, or save "
                "with optimum.quanto's own tools"
            )
        if weight_qtype is None:
            raise ValueError(f"{name!r} is a quanto {kind} without quantized weights; the format cannot hold it")
        if not _derives(m.weight, "QTensor"):
            raise ValueError(
                f"{name!r} holds float weights (the model is not frozen); call optimum.quanto.freeze(model) "
                "before saving"
            )
        quantized.append(name)
        qtypes.add(weight_qtype.name)
    if not quantized:
        raise ValueError("the model has no optimum-quanto layers")
    if len(qtypes) > 1:
        raise ValueError(
            f"the model mixes quanto weight types {sorted(qtypes)}; the diffusers/transformers format "
            "records one weights_dtype per checkpoint"
        )
    qtype = qtypes.pop()
    if qtype not in _DTYPE_OF:
        raise ValueError(
            f"quanto weight type {qtype} has no diffusers/transformers weights_dtype; "
            f"supported: {sorted(_QTYPE_OF.values())}"
        )
    return _DTYPE_OF[qtype], quantized, plain


def _not_converted(model: nn.Module, mnc: list[str] | None, family: Family) -> tuple[set[str], bool]:
    """The names that keep a Linear in float, and whether they are matched by short name only
    (diffusers, which also keeps the class's ``_keep_in_fp32_modules``) or by full or short name."""
    names = set(mnc or [])
    if family is DIFFUSERS:
        names |= set(getattr(model, "_keep_in_fp32_modules", None) or [])
        return names, True
    return names, False


def _matches(name: str, names: set[str], short_only: bool) -> bool:
    return _short(name) in names or (not short_only and name in names)


def _modules_to_not_convert(quantized: list[str], plain: list[str]) -> list[str] | None:
    """Short names of the unquantized Linear layers where they name no quantized layer, else full names."""
    if not plain:
        return None
    short = {_short(n) for n in plain}
    if short & {_short(n) for n in quantized}:
        return sorted(plain)
    return sorted(short)


class QuantoQuantizer(Quantizer):
    quant_method = "quanto"
    config_cls = QuantoConfig

    config: QuantoConfig

    def __init__(self, config: QuantizationConfig) -> None:
        super().__init__(config)
        self._written_mnc: list[str] | None = None

    @classmethod
    def detect(cls, model: nn.Module) -> bool:
        return any(is_qmodule(m) for m in model.modules())

    @classmethod
    def config_from_model(cls, model: nn.Module) -> QuantoConfig:
        """Reads the config off the model's quanto layers: one weight type; the short names of
        the Linear layers left in float as ``modules_to_not_convert`` (for models other than
        diffusers', full names where a short name is shared with a quantized layer).

        Raises:
            ValueError: layers other than QLinear, quantized activations, unfrozen weights, mixed
                or unsupported weight types, or (diffusers models) float layers whose short name a
                quantized layer shares: diffusers matches short names only, so no config could
                describe the model.
        """
        weights_dtype, quantized, plain = _inspect(model)
        if family_of(model) is not DIFFUSERS:
            return QuantoConfig(weights_dtype, _modules_to_not_convert(quantized, plain))
        shared = sorted({_short(n) for n in plain} & {_short(n) for n in quantized})
        if shared:
            example = next(n for n in plain if _short(n) in shared)
            raise ValueError(
                f"Linear {example!r} is not quantized but other layers named {_short(example)!r} are; "
                "diffusers' modules_to_not_convert matches a layer's short name only, so the checkpoint "
                "could not be loaded correctly. Quantize all of them or none"
            )
        return QuantoConfig(weights_dtype, sorted({_short(n) for n in plain}) or None)

    def state_dict(self, model: nn.Module, family: Family) -> dict[str, torch.Tensor]:
        """The model's own state dict (quanto already writes the standard layout), after checking
        the model against the config.

        Raises:
            ValueError: the model cannot be written in this format, or the config does not
                describe it (another weight type; layers the config would quantize, or not).
        """
        weights_dtype, quantized, plain = _inspect(model)
        if weights_dtype != self.config.weights_dtype:
            raise ValueError(
                f"the model's quanto layers hold {_QTYPE_OF[weights_dtype]} weights but quantization_config "
                f"says weights_dtype={self.config.weights_dtype!r}"
            )
        if family is DIFFUSERS:
            names, short_only = _not_converted(model, self.config.modules_to_not_convert, family)
            for name in quantized:
                if _matches(name, names, short_only):
                    raise ValueError(
                        f"quantized Linear {name!r} is matched by modules_to_not_convert/_keep_in_fp32_modules "
                        f"{sorted(names)}; diffusers would load it as a float Linear and drop its weights"
                    )
            for name in plain:
                if not _matches(name, names, short_only):
                    raise ValueError(
                        f"Linear {name!r} is not quantized, but diffusers quantizes every Linear whose short "
                        f"name is not in modules_to_not_convert ({self.config.modules_to_not_convert}) and "
                        "would leave it uninitialized; add its short name there or quantize it"
                    )
            self._written_mnc = self.config.modules_to_not_convert
        else:
            # No reference loader reads these: record exactly which Linear layers stay in float.
            self._written_mnc = _modules_to_not_convert(quantized, plain)
        return dict(model.state_dict())

    def config_dict(self, family: Family) -> dict[str, Any]:
        """diffusers' form; for transformers models, a form transformers refuses to load.

        transformers (5.x) cannot load pre-quantized quanto weights: with ``weights`` or
        ``weights_dtype`` it quantizes on load, finds no float weights and silently keeps random
        ones. ``"activations": "none"`` (quanto's spelling of "not quantized") makes its
        ``QuantoConfig`` raise before any weight is read; quantsave and optimum-quanto load the folder.
        """
        mnc = self._written_mnc if self._written_mnc is not None else self.config.modules_to_not_convert
        if family is TRANSFORMERS:
            return {
                "quant_method": self.quant_method,
                "weights": self.config.weights_dtype,
                "activations": "none",
                "modules_to_not_convert": mnc,
            }
        return QuantoConfig(self.config.weights_dtype, mnc).to_dict()

    def extra_files(self, model: nn.Module, family: Family) -> dict[str, str]:
        """``quanto_qmap.json``: optimum-quanto's quantization map, as its model wrappers write it."""
        qmap: dict[str, dict[str, str]] = {}
        for name, m in model.named_modules():
            if is_qmodule(m):
                w, a = m.weight_qtype, m.activation_qtype
                qmap[name] = {
                    "weights": "none" if w is None else w.name,
                    "activations": "none" if a is None else a.name,
                }
        return {QMAP_NAME: json.dumps(qmap, indent=4)}

    def weight_groups(self, keys: list[str]) -> dict[str, str]:
        return layout.weight_groups(keys)

    @classmethod
    def count_parameters(cls, ckpt: Checkpoint, qconfig: dict[str, Any] | None) -> ParameterCount:
        return layout.count_parameters(ckpt, qconfig)

    def check_checkpoint(self, ckpt: Checkpoint) -> list[str]:
        return layout.check(ckpt)

    def load_into(
        self, model: nn.Module, state_dict: dict[str, torch.Tensor], metadata: dict[str, str], directory: Path
    ) -> dict[str, torch.Tensor]:
        """Replaces each Linear that has quantized tensors in ``state_dict`` with a frozen quanto
        ``QLinear`` holding them (the standard layout, as diffusers builds it). Reads
        ``quanto_qmap.json`` when present; every layer must agree with it and with the config."""
        quanto = import_quanto()
        rest = dict(state_dict)
        members: dict[str, dict[str, torch.Tensor]] = {}
        for k in list(rest):
            owner = layout.owner(k)
            if owner is not None:
                members.setdefault(owner, {})[k[len(owner) + 1 :]] = rest.pop(k)
        if not self.config.from_qmap:
            # With a config.json, layers it does not exclude must be quantized (as diffusers reads
            # it); a folder in quanto's own layout has only the map, which _check_qmap checks.
            self._check_float_layers(model, rest, members)
        self._check_qmap(members, directory)
        qtype = quanto.qtypes[_QTYPE_OF[self.config.weights_dtype]]
        for prefix, tensors in members.items():
            old = linear_at(model, prefix, not_linear=_NOT_LINEAR)
            replace_module(model, prefix, _build_qlinear(quanto, prefix, old, qtype, tensors))
        return rest

    def _check_qmap(self, members: dict[str, dict[str, torch.Tensor]], directory: Path) -> None:
        """``quanto_qmap.json``, when present, names exactly the quantized layers, with the config's
        weight type and no quantized activations."""
        path = directory / QMAP_NAME
        if not path.is_file():
            return
        qmap = read_qmap(path)
        for name, entry in qmap.items():
            if entry.get("activations", "none") != "none":
                raise CheckpointError(
                    f"{path.name}: {name!r} quantizes activations ({entry['activations']}); only weight-only "
                    "quanto checkpoints can be loaded"
                )
            if _DTYPE_OF.get(entry.get("weights", "none")) != self.config.weights_dtype:
                raise CheckpointError(
                    f"{path.name}: {name!r} has weights {entry.get('weights')!r} but config.json says "
                    f"weights_dtype={self.config.weights_dtype!r}"
                )
        if set(qmap) != set(members):
            only_map = sorted(set(qmap) - set(members))
            only_file = sorted(set(members) - set(qmap))
            raise CheckpointError(
                f"{path.name} and the weights disagree: quantized in the map but not in the weights "
                f"{only_map[:3]}, in the weights but not in the map {only_file[:3]}"
            )

    def _check_float_layers(
        self, model: nn.Module, rest: dict[str, torch.Tensor], members: dict[str, dict[str, torch.Tensor]]
    ) -> None:
        """Every Linear is quantized in the file exactly when the config says so."""
        names, short_only = _not_converted(model, self.config.modules_to_not_convert, family_of(model))
        for prefix in members:
            if _matches(prefix, names, short_only):
                raise CheckpointError(
                    f"{prefix!r} holds quantized weights but modules_to_not_convert {sorted(names)} keeps it "
                    "in float"
                )
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and f"{name}.weight" in rest and not _matches(name, names, short_only):
                raise CheckpointError(
                    f"{name!r} holds a plain float weight but the config quantizes every Linear not named in "
                    f"modules_to_not_convert ({self.config.modules_to_not_convert}); diffusers would leave it "
                    "uninitialized"
                )


def _build_qlinear(quanto: Any, prefix: str, old: nn.Linear, qtype: Any, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A frozen ``QLinear`` for ``old`` holding ``tensors`` (names relative to ``prefix``).

    The expected tensors come from the same layer frozen on the meta device, so names, shapes
    and dtypes are exactly what quanto writes; anything else is a ``CheckpointError``."""
    scale = tensors.get("weight._scale")
    if scale is None or not scale.dtype.is_floating_point:
        what = "no 'weight._scale' tensor" if scale is None else f"'weight._scale' is {scale.dtype}, not floating point"
        raise CheckpointError(f"quantized weight {prefix!r}: {what}")
    new = quanto.QLinear(
        old.in_features, old.out_features, bias=old.bias is not None, dtype=scale.dtype, device="meta", weights=qtype
    )
    new.freeze()
    expected = {k[len("weight.") :]: v for k, v in new.state_dict().items() if k.startswith("weight.")}
    got = {k[len("weight.") :]: v for k, v in tensors.items()}
    if set(got) != set(expected):
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        raise CheckpointError(
            f"quantized weight {prefix!r} ({qtype.name}): "
            + "; ".join(
                ([f"missing tensors {['weight.' + k for k in missing]}"] if missing else [])
                + (
                    [f"unexpected tensors {['weight.' + k for k in extra]} (not the standard quanto layout)"]
                    if extra
                    else []
                )
            )
        )
    for k, want in expected.items():
        t = got[k]
        if tuple(t.shape) != tuple(want.shape) or t.dtype != want.dtype:
            raise CheckpointError(
                f"quantized weight {prefix!r} ({qtype.name}): 'weight.{k}' is {str(t.dtype).split('.')[1]} "
                f"{list(t.shape)}, expected {str(want.dtype).split('.')[1]} {list(want.shape)} for a "
                f"Linear({old.in_features}, {old.out_features})"
            )
    flat = dict(tensors)
    size, stride = new.weight.size(), new.weight.stride()
    if qtype.bits == 8:
        weight = quanto.WeightQBytesTensor.load_from_state_dict(
            flat, "weight.", qtype=qtype, axis=0, size=size, stride=stride, activation_qtype=None, missing_keys=[]
        )
    else:
        weight = quanto.WeightQBitsTensor.load_from_state_dict(
            flat, "weight.", qtype=qtype, axis=0, group_size=new.weight_group_size, size=size, stride=stride,
            missing_keys=[],
        )
    # No .optimize(): like diffusers, keep the standard layout (and no JIT-compiled unpack on load).
    new.weight = nn.Parameter(weight, requires_grad=False)
    new.requires_grad_(False)
    return cast(nn.Module, new)  # a quanto QLinear (optimum-quanto ships no types)


def config_from_qmap(path: Path) -> QuantoConfig:
    """The config of a folder in optimum-quanto's own layout (weights plus ``quanto_qmap.json``
    and no ``quantization_config``): one weight type for every quantized layer, no activations.

    Raises:
        CheckpointError: the map is not valid JSON, mixes weight types or quantizes activations.
    """
    qmap = read_qmap(path)
    kinds = {str(v.get("weights", "none")) for v in qmap.values()} - {"none"}
    if any(v.get("activations", "none") != "none" for v in qmap.values()):
        raise CheckpointError(f"{path}: quantized activations cannot be loaded (weight-only checkpoints only)")
    if len(kinds) != 1 or next(iter(kinds)) not in _DTYPE_OF:
        raise CheckpointError(
            f"{path}: expected one weight type among {sorted(_DTYPE_OF)} for every quantized layer, got {sorted(kinds)}"
        )
    return QuantoConfig(weights_dtype=_DTYPE_OF[next(iter(kinds))], from_qmap=True)


def qtype_name(weights_dtype: str) -> str:
    """optimum-quanto's qtype name for a config's ``weights_dtype`` (``"int4"`` -> ``"qint4"``)."""
    return _QTYPE_OF[weights_dtype]


def read_qmap(path: Path) -> dict[str, dict[str, Any]]:
    """``quanto_qmap.json``: ``{module: {"weights": qtype, "activations": qtype}}``.

    Raises:
        CheckpointError: not valid JSON, or not that shape.
    """
    try:
        qmap = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, huge integers, deep nesting
        raise CheckpointError(f"invalid checkpoint file {path}: not valid JSON: {e}") from e
    if not isinstance(qmap, dict) or not all(isinstance(v, dict) for v in qmap.values()):
        raise CheckpointError(f"invalid checkpoint file {path}: expected {{module: {{'weights', 'activations'}}}}")
    return qmap
