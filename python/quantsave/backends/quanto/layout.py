"""optimum-quanto on disk (the diffusers layout): what one quantized Linear looks like in a
checkpoint. The one definition read by the quantizer (groups, load), ``verify`` (checks) and
``inspect`` (logical parameter counts).

For a quantized Linear ``P`` (weight ``[out, in]``, ``D`` the model dtype)::

    int8    P.weight._data        int8 [out, in]
    float8  P.weight._data        float8_e4m3fn [out, in]
            P.weight._scale       D [out, 1]           (per-tensor [] when out == 1)
    int4    P.weight._data._data  uint8 [ceil(R / 2), C]
    int2    P.weight._data._data  uint8 [ceil(R / 4), C]
            P.weight._scale       D [R, 1]
            P.weight._shift       D [R, 1]             w = code * scale - shift
    all     P.input_scale, P.output_scale   D []       1.0 (weight-only quantization)

``(R, C)`` is ``(out, in)``, or ``(out * in / g, g)`` with quanto's group size ``g``. The 2/4-bit
codes are packed planar along dim 0, not in adjacent nibbles (int4 shown, ``rd = ceil(R / 2)``)::

    byte[r, c] = code[r, c] | code[r + rd, c] << 4        e.g. codes 3 (row r), 9 (row r+rd) -> 0x93

optimum-quanto picks the in-memory int4 layout by device and dtype (TinyGemm for bfloat16 on CPU
or recent CUDA, AWQ for float16 on CUDA, Marlin for float8 on CUDA); its state dict converts
back, so files always hold the standard layout above, and loading builds that standard layout.

The tensors of one Linear (``weight.*``, ``input_scale``, ``output_scale``) form a group that the
planner never splits across shards. Logical parameters: ``P.weight._data`` counts its elements;
a packed ``P.weight._data._data`` counts ``R * C`` (``R`` the rows of ``P.weight._scale``); the
scales and shifts count none. ``quanto_qmap.json`` (optimum-quanto's own map) sits beside the
weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from quantsave.backends.layout import ParameterCount, numel

if TYPE_CHECKING:
    from quantsave.checkpoint.reader import Checkpoint

__all__ = ["QMAP_NAME", "check", "count_parameters", "owner", "weight_groups"]

#: The file optimum-quanto's ``QuantizedDiffusersModel``/``QuantizedTransformersModel`` read.
QMAP_NAME = "quanto_qmap.json"
#: Key suffixes of a quantized weight (longest first); ``_scale_shift`` is TinyGemm's in-memory
#: form, never valid in a file, listed so it is reported instead of ignored.
_WEIGHT_SUFFIXES = (".weight._data._data", ".weight._scale_shift", ".weight._data", ".weight._scale", ".weight._shift")
_SCALE_SUFFIXES = (".input_scale", ".output_scale")
_HELPERS = (".weight._scale", ".weight._shift", ".weight._scale_shift", *_SCALE_SUFFIXES)


def owner(key: str) -> str | None:
    """The module whose quantized weight ``key`` belongs to, if it is one."""
    for suffix in _WEIGHT_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return None


def weight_groups(keys: list[str]) -> dict[str, str]:
    """Each key of a quantized Linear (weight parts and its activation scales) -> its module."""
    owners = {o for o in map(owner, keys) if o is not None}
    out: dict[str, str] = {}
    for k in keys:
        found = owner(k)
        if found is None:
            for suffix in _SCALE_SUFFIXES:
                if k.endswith(suffix) and k[: -len(suffix)] in owners:
                    found = k[: -len(suffix)]
        if found is not None:
            out[k] = found
    return out


def count_parameters(ckpt: Checkpoint, qconfig: dict[str, Any] | None) -> ParameterCount:
    """The logical parameters of ``ckpt``'s quanto weights (``qconfig``: the raw
    ``quantization_config``, whose ``weights_dtype`` says how many codes a byte packs when a
    weight has no scale to tell)."""
    tensors = ckpt.tensors
    count = ParameterCount()
    for name, info in tensors.items():
        shape = info.shape
        if name.endswith(".weight._data._data"):
            base = name[: -len("._data._data")]
            scale = tensors.get(base + "._scale") or tensors.get(base + "._scale_shift")
            per_byte = 4 if (qconfig or {}).get("weights_dtype") == "int2" else 2
            rows = scale.shape[0] if scale and scale.shape else shape[0] * per_byte
            count.counted[name] = rows * numel(shape[1:])
            count.how.add("quanto int4/int2: scale rows x columns")
        elif name.endswith(".weight._data"):
            count.counted[name] = numel(shape)
            count.how.add("quanto: data elements")
        else:
            continue
        module = name.split(".weight._data")[0]
        count.helpers.update(module + p for p in _HELPERS)
    return count


def check(ckpt: Checkpoint) -> list[str]:
    """Problems with ``ckpt``'s tensors for a quanto config (one line each)."""
    if not any(".weight._data" in k for k in ckpt.tensors):
        return ["quant_method 'quanto' but no '*.weight._data' tensors in the shards"]
    return []
