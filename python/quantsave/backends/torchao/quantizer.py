"""torchao: models whose weights are torchao tensor subclasses (``Int8Tensor``, ``Float8Tensor``,
``IntxUnpackedToInt8Tensor``, ``Int4Tensor``, ...).

The quantizer: reads the workflow config off a model, flattens its tensor subclasses into plain
tensors plus header metadata for a save (the parts of one weight form one group), and rebuilds
them on load. The checkpoint layout is drawn and defined in ``quantsave.backends.torchao.layout``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from quantsave.backends.config import QuantizationConfig
from quantsave.backends.layout import ParameterCount
from quantsave.backends.quantizer import Quantizer
from quantsave.backends.torchao import layout
from quantsave.backends.torchao.config import TorchAoConfig
from quantsave.checkpoint.tensors import is_wrapper_subclass
from quantsave.errors import CheckpointError, NotSerializableError

if TYPE_CHECKING:
    from quantsave.checkpoint.reader import Checkpoint
    from quantsave.families import Family

__all__ = ["TorchAoQuantizer", "MIN_SAFETENSORS_VERSION"]

#: The first torchao release with ``torchao.prototype.safetensors``.
MIN_SAFETENSORS_VERSION = (0, 16)


def _torchao_version() -> tuple[int, ...] | None:
    try:
        import torchao
    except ImportError:
        return None
    parts = []
    for p in str(getattr(torchao, "__version__", "0")).split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _is_torchao_tensor(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and is_wrapper_subclass(t) and type(t).__module__.startswith("torchao")


def _allowed_subclasses() -> list[str]:
    from torchao.prototype.safetensors.safetensors_utils import ALLOWED_TENSORS_SUBCLASSES

    return list(ALLOWED_TENSORS_SUBCLASSES)


class TorchAoQuantizer(Quantizer):
    quant_method = "torchao"
    config_cls = TorchAoConfig

    config: TorchAoConfig

    def __init__(self, config: QuantizationConfig) -> None:
        super().__init__(config)
        self._metadata: dict[str, str] = {}
        self._groups: dict[str, str] = {}

    @property
    def supports_safetensors(self) -> bool:
        version = _torchao_version()
        return version is None or version[:2] >= MIN_SAFETENSORS_VERSION

    @property
    def safetensors_unsupported_reason(self) -> str:
        version = _torchao_version()
        return (
            f"torchao {'.'.join(map(str, version or ()))} cannot write safetensors checkpoints; "
            f"upgrade to torchao >= {'.'.join(map(str, MIN_SAFETENSORS_VERSION))} "
            "(pip install -U torchao) or pass safe_serialization=False for the pickle form"
        )

    @classmethod
    def detect(cls, model: nn.Module) -> bool:
        return any(_is_torchao_tensor(p) for p in model.parameters())

    @classmethod
    def config_from_model(cls, model: nn.Module) -> TorchAoConfig:
        """The config of the torchao workflow that produces the model's first quantized weight.

        Loaders rebuild the weights from the per-tensor metadata; the config records the
        workflow (and is what a later on-the-fly quantization would use).
        """
        # A torchao tensor subclass: torchao ships no types, so its attributes are Any.
        first: Any = next((p for p in model.parameters() if _is_torchao_tensor(p)), None)
        if first is None:
            raise ValueError("the model has no torchao-quantized weights")
        try:
            from torchao import quantization as q
        except ImportError as e:
            raise ImportError("saving a torchao model needs torchao: pip install 'torchao>=0.16'") from e
        name = type(first).__name__
        block = list(getattr(first, "block_size", []) or [])
        group = block[-1] if block and block[-1] != first.shape[-1] else None
        act = getattr(first, "act_quant_kwargs", None)
        ao: Any
        if name == "Int8Tensor":
            ao = (
                q.Int8DynamicActivationInt8WeightConfig()
                if act is not None
                else q.Int8WeightOnlyConfig(group_size=group)
            )
        elif name == "Float8Tensor":
            ao = q.Float8DynamicActivationFloat8WeightConfig() if act is not None else q.Float8WeightOnlyConfig()
        elif name == "IntxUnpackedToInt8Tensor":
            granularity = q.PerGroup(group) if group else q.PerAxis(0)
            if getattr(first, "activation_quantization", None) is not None:
                ao = q.Int8DynamicActivationIntxWeightConfig(
                    weight_dtype=first.target_dtype, weight_granularity=granularity
                )
            else:
                ao = q.IntxWeightOnlyConfig(weight_dtype=first.target_dtype, granularity=granularity)
        elif name == "Int4Tensor":
            ao = q.Int4WeightOnlyConfig(group_size=group or 128)
        else:
            raise ValueError(
                f"cannot tell which torchao config produced {name} weights; pass "
                "quantization_config=TorchAoConfig(<the torchao config you quantized with>)"
            )
        return TorchAoConfig(ao)

    def config_dict(self, family: Family) -> dict[str, Any]:
        if family.name == "transformers":
            return self.config.to_transformers_dict()
        return self.config.to_dict()

    def _flatten(self, state_dict: dict[str, torch.Tensor], family: Family) -> dict[str, torch.Tensor]:
        """torchao's flattened form, without copying the parts (the reference clones them)."""
        from torchao.prototype.safetensors.safetensors_utils import TensorSubclassAttributeJSONEncoder

        allowed = _allowed_subclasses()
        keep_root = family.name != "transformers"
        flat: dict[str, torch.Tensor] = {}
        metadata: dict[str, str] = {}
        names: list[str] = []
        self._groups = {}
        for key, t in state_dict.items():
            dotted = "." in key
            if _is_torchao_tensor(t):
                cls_name = type(t).__name__
                if cls_name not in allowed:
                    raise NotSerializableError(
                        f"weight {key!r} is a torchao {cls_name}, which torchao's safetensors format does not "
                        f"support (supported: {', '.join(allowed)}); pass safe_serialization=False to write the "
                        "pickle form. Nothing was written."
                    )
                if not dotted:
                    raise ValueError(
                        f"torchao cannot serialize a quantized tensor at the model's root ({key!r}): its flattened "
                        "names need a module prefix"
                    )
                ao_tensor: Any = t  # a torchao tensor subclass (torchao ships no types)
                parts = list(ao_tensor.tensor_data_names) + list(getattr(t, "optional_tensor_data_names", []) or [])
                prefix = layout.flat_prefix(key)
                for part in parts:
                    value = getattr(t, part)
                    if value is None:
                        continue
                    if not isinstance(value, torch.Tensor) or is_wrapper_subclass(value):
                        raise NotSerializableError(
                            f"weight {key!r}: part {part!r} is not a plain tensor. Nothing was written."
                        )
                    flat[prefix + part] = value.detach()
                    self._groups[prefix + part] = key
                metadata[key] = json.dumps(t, cls=TensorSubclassAttributeJSONEncoder)
            elif isinstance(t, torch.Tensor) and not is_wrapper_subclass(t):
                flat[key] = t
                if not dotted and not keep_root:
                    continue
                metadata[key] = json.dumps({"_type": "Tensor"})
            else:
                raise NotSerializableError(
                    f"tensor {key!r} is a {type(t).__name__}, which torchao's safetensors format cannot store. "
                    "Nothing was written."
                )
            names.append(key)
        metadata["tensor_names"] = json.dumps(names)
        self._metadata = metadata
        return flat

    def state_dict(self, model: nn.Module, family: Family) -> dict[str, torch.Tensor]:
        if _torchao_version() is None:
            raise ImportError("saving a torchao model needs torchao: pip install 'torchao>=0.16'")
        return self._flatten(dict(model.state_dict()), family)

    def pickle_state_dict(self, model: nn.Module, family: Family) -> dict[str, torch.Tensor]:
        self._metadata, self._groups = {}, {}
        return dict(model.state_dict())

    def header_metadata(self, state_dict: dict[str, torch.Tensor]) -> dict[str, str]:
        return dict(self._metadata)

    def index_metadata(self, family: Family) -> dict[str, Any]:
        # diffusers repeats the tensor metadata in the index; transformers does not.
        return dict(self._metadata) if family.name == "diffusers" else {}

    def weight_groups(self, keys: list[str]) -> dict[str, str]:
        return {k: self._groups[k] for k in keys if k in self._groups}

    @classmethod
    def count_parameters(cls, ckpt: Checkpoint, qconfig: dict[str, Any] | None) -> ParameterCount:
        return layout.count_parameters(ckpt)

    def check_checkpoint(self, ckpt: Checkpoint) -> list[str]:
        return layout.check(ckpt)

    def load_into(
        self, model: nn.Module, state_dict: dict[str, torch.Tensor], metadata: dict[str, str], directory: Path
    ) -> dict[str, torch.Tensor]:
        """Rebuilds the torchao tensors from their parts and the shards' metadata (through torchao's
        ``unflatten_tensor_state_dict``) and installs them as frozen parameters."""
        names = layout.tensor_names(metadata, list(state_dict))
        if names is None:
            return state_dict
        try:
            from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict
        except ImportError as e:
            raise ImportError("this checkpoint needs torchao >= 0.16: pip install -U torchao") from e
        allowed = set(_allowed_subclasses())
        quantized: dict[str, dict[str, Any]] = {}
        for name in names:
            entry = metadata.get(name)
            info = layout.parse_entry(name, entry)
            kind = info.get("_type")
            if kind == "Tensor":
                continue
            if kind not in allowed:
                raise CheckpointError(f"tensor {name!r} has torchao type {kind!r}, which torchao cannot rebuild")
            if "." not in name:
                raise CheckpointError(f"quantized tensor {name!r} has no module prefix")
            parts = info.get("_tensor_data_names")
            if (
                not isinstance(parts, list)
                or not all(isinstance(p, str) for p in parts)
                or not isinstance(info.get("_data"), dict)
            ):
                raise CheckpointError(
                    f"tensor {name!r}: malformed torchao metadata (no '_tensor_data_names' / '_data')"
                )
            quantized[name] = info
        rest = dict(state_dict)
        flat: dict[str, torch.Tensor] = {}
        for name, info in quantized.items():
            prefix = layout.flat_prefix(name)
            found = {k[len(prefix) :]: k for k in state_dict if k.startswith(prefix)}
            missing = [p for p in info["_tensor_data_names"] if p not in found]
            extra = sorted(set(found) - set(info["_tensor_data_names"]))
            if missing or extra:
                what = f"lacks part(s) {missing}" if missing else f"has unexpected part(s) {extra}"
                raise CheckpointError(f"quantized tensor {name!r} {what}")
            for key in found.values():
                flat[key] = rest.pop(key)
        sub_meta = {n: metadata[n] for n in quantized}
        sub_meta["tensor_names"] = json.dumps(list(quantized))
        try:
            rebuilt, leftover = unflatten_tensor_state_dict(flat, sub_meta)
        except Exception as e:  # torchao raises ValueError/TypeError/KeyError for bad metadata
            raise CheckpointError(f"cannot rebuild the torchao tensors: {type(e).__name__}: {e}") from e
        if leftover or set(rebuilt) != set(quantized):
            raise CheckpointError(f"torchao tensors not rebuilt: {sorted(set(quantized) - set(rebuilt))[:3]}")
        for name, t in rebuilt.items():
            module_name, leaf = layout.split_name(name)
            try:
                module = model.get_submodule(module_name)
            except AttributeError:
                raise CheckpointError(
                    f"checkpoint has quantized weight {name!r} but the model has no module {module_name!r}"
                ) from None
            old = getattr(module, leaf, None)
            if not isinstance(old, torch.Tensor):
                raise CheckpointError(f"checkpoint has quantized weight {name!r} but the model has no such parameter")
            if tuple(t.shape) != tuple(old.shape):
                raise CheckpointError(
                    f"quantized weight {name!r} has shape {list(t.shape)}, the model expects {list(old.shape)}"
                )
            qdata = getattr(t, "qdata", None)
            if type(t).__name__ in ("Int8Tensor", "Float8Tensor", "IntxUnpackedToInt8Tensor") and (
                not isinstance(qdata, torch.Tensor) or tuple(qdata.shape) != tuple(t.shape)
            ):
                raise CheckpointError(
                    f"quantized weight {name!r}: its qdata does not have the weight's shape {list(t.shape)}"
                )
            setattr(module, leaf, nn.Parameter(t, requires_grad=False))
            self.loaded_keys.add(name)
        return rest

