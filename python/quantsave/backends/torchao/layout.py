"""torchao on disk: what one quantized weight looks like in a checkpoint (the flattened form of
``torchao.prototype.safetensors``, torchao >= 0.16). The one definition read by the quantizer
(flattening, groups, load), ``verify`` (checks) and ``inspect`` (logical parameter counts).

For a quantized weight ``m.weight`` of class ``C`` with inner tensors ``qdata``, ``scale``, ...::

    m._weight_qdata, m._weight_scale, ...      plain tensors (required parts, then optional ones)
    header metadata "m.weight"                 JSON {"_type": C, "_data": {attributes}, "_tensor_data_names": [...]}
    header metadata "tensor_names"             JSON list of every original state-dict key
    header metadata "<plain key>"              JSON {"_type": "Tensor"}

    e.g. Int8WeightOnlyConfig, torchao 0.18, bfloat16 Linear [out, in]:
        m._weight_qdata       int8 [out, in]
        m._weight_scale       float32 [out, 1]
        m._weight_zero_point  int8 [out, 1]
        "m.weight"  {"_type": "Int8Tensor", "_data": {"block_size": [1, in], "dtype":
                     {"_type": "torch.dtype", "_data": "bfloat16"}, ...},
                     "_tensor_data_names": ["zero_point", "qdata", "scale"]}

Every shard carries the full metadata (the loaders merge the shards' metadata, so the last
shard's must be complete); diffusers repeats it in the index metadata. Root-level (dot-less)
names are listed for diffusers models, which route them around torchao, and left out for
transformers models, whose loader cannot parse them. The parts of one weight form one group
that the planner never splits. ``safe_serialization=False`` pickles the subclasses themselves.

Logical parameters: a weight counts the elements of ``m._weight_qdata`` (its other parts none);
the float dtype is the one its metadata entry names.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from quantsave.backends.layout import ParameterCount, numel
from quantsave.errors import CheckpointError, json_object

if TYPE_CHECKING:
    from quantsave.checkpoint.reader import Checkpoint

__all__ = ["check", "count_parameters", "flat_prefix", "parse_entry", "split_name", "tensor_names"]

_QDATA = "._weight_qdata"


def split_name(name: str) -> tuple[str, str]:
    """``m.weight`` -> (``m``, ``weight``)."""
    module, _, leaf = name.rpartition(".")
    return module, leaf


def flat_prefix(name: str) -> str:
    """The prefix of the flattened parts of the quantized tensor ``name`` (``m.weight`` -> ``m._weight_``)."""
    module, leaf = split_name(name)
    return f"{module}._{leaf}_"


def parse_entry(name: str, entry: Any) -> dict[str, Any]:
    """The metadata entry of tensor ``name`` as a JSON object.

    Raises:
        CheckpointError: no entry, or not a JSON object.
    """
    if not isinstance(entry, str):
        raise CheckpointError(f"torchao metadata has no entry for tensor {name!r}")
    return json_object(entry, f"torchao metadata of tensor {name!r}")


def tensor_names(metadata: dict[str, str], keys: list[str]) -> list[str] | None:
    """The ``tensor_names`` list of the shards' metadata; None when the checkpoint (its tensor
    ``keys``) holds no flattened torchao tensors and no metadata (nothing to rebuild).

    Raises:
        CheckpointError: flattened tensors without the metadata, or metadata that is not a list of names.
    """
    raw = metadata.get("tensor_names")
    if raw is None:
        flat = [k for k in keys if k.rpartition(".")[2].startswith("_")]
        if flat:
            raise CheckpointError(
                f"torchao checkpoint without its header metadata ('tensor_names'): cannot rebuild {flat[:3]}"
            )
        return None
    try:
        names = json.loads(raw)
    except (ValueError, RecursionError) as e:  # bad JSON, huge integers, deep nesting
        raise CheckpointError(f"torchao metadata 'tensor_names' is not valid JSON: {e}") from e
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise CheckpointError("torchao metadata 'tensor_names' is not a list of names")
    return names


def count_parameters(ckpt: Checkpoint) -> ParameterCount:
    """The logical parameters of ``ckpt``'s torchao weights (see the module docstring)."""
    tensors, metadata = ckpt.tensors, ckpt.metadata
    count = ParameterCount()
    for name, info in tensors.items():
        if not name.endswith(_QDATA):
            continue
        base = name[: -len(_QDATA)]
        count.counted[name] = numel(info.shape)
        count.helpers.update(k for k in tensors if k.startswith(base + "._weight_") and k != name)
        count.how.add("torchao: qdata elements")
        try:
            entry = json.loads(metadata.get(base + ".weight", "{}"))
            count.float_dtype = count.float_dtype or entry["_data"]["dtype"]["_data"]
        except (ValueError, RecursionError, KeyError, TypeError):
            pass
    return count


def check(ckpt: Checkpoint) -> list[str]:
    """Problems with ``ckpt``'s tensors and metadata for a torchao config (one line each)."""
    if "tensor_names" not in ckpt.metadata:
        return ["quant_method 'torchao' but the shard headers have no 'tensor_names' metadata"]
    if not any(k.endswith(_QDATA) for k in ckpt.tensors):
        return ["quant_method 'torchao' but no '*._weight_qdata' tensors in the shards"]
    return []
