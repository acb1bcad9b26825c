"""GGUF export and import: ``save_gguf`` writes a ``.gguf`` file that keeps every tensor's GGML
type (what a safetensors checkpoint cannot record), ``load_gguf`` reads one back into
diffusers' ``GGUFParameter``/``GGUFLinear`` with the same bytes.

Owns the file's tensor-type policy and quantsave KV keys and the atomic write; the bounded
reader of the container is ``quantsave.backends.gguf.reader``. ``gguf`` (writer, GGML types, quantizers) and
diffusers (``GGUFParameter``, ``GGUFLinear``) are imported only when a function needs them.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn

from quantsave import _core
from quantsave.backends.gguf.config import GGUFQuantizationConfig
from quantsave.backends.gguf.reader import ALIGNMENT_KEY as _ALIGNMENT
from quantsave.backends.gguf.reader import MAX_DIMS as _MAX_DIMS
from quantsave.backends.gguf.reader import STRING as _STRING
from quantsave.backends.gguf.reader import TensorInfo as _TensorInfo
from quantsave.backends.gguf.reader import map_gguf as _map
from quantsave.backends.modules import replace_module
from quantsave.backends.registry import record_config
from quantsave.checkpoint.commit import fsync_enabled
from quantsave.checkpoint.names import temp_path
from quantsave.checkpoint.reader import read_config
from quantsave.checkpoint.tensors import byte_view, is_wrapper_subclass, tensor_from_map
from quantsave.checkpoint.writer import SaveResult
from quantsave.errors import CheckpointError, json_object
from quantsave.families import DIFFUSERS, PLAIN, family_of, is_pipeline, model_config_files
from quantsave.load import _empty_weights, build_skeleton, materialize_buffers

__all__ = ["QUANTIZE_TYPES", "load_gguf", "save_gguf"]

#: KV keys that make a quantsave file self-describing.
KEY_LIBRARY = "quantsave.library"
KEY_CLASS = "quantsave.class_name"
KEY_CONFIG = "quantsave.config"
KEY_VERSION = "quantsave.version"
_ARCH = "general.architecture"
_QUANT_VERSION = "general.quantization_version"
_RESERVED = {KEY_LIBRARY, KEY_CLASS, KEY_CONFIG, KEY_VERSION, _ARCH, _ALIGNMENT, _QUANT_VERSION}

#: GGML types held as plain tensors (value -> safetensors dtype name); every other type is
#: quantized (BF16 included, as diffusers treats it).
_PLAIN = {0: "F32", 1: "F16", 28: "F64", 24: "I8", 25: "I16", 26: "I32", 27: "I64"}
_TORCH_TO_GGML = {
    torch.float32: 0, torch.float16: 1, torch.float64: 28,
    torch.int8: 24, torch.int16: 25, torch.int32: 26, torch.int64: 27,
}  # fmt: skip
#: Types ``save_gguf(quant_type=...)`` offers: gguf has a quantizer and diffusers a kernel.
QUANTIZE_TYPES = ("BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


def _import_gguf() -> ModuleType:
    if sys.byteorder != "little":
        raise ValueError("GGUF files are little-endian; this host is big-endian, which quantsave does not support")
    try:
        import gguf
    except ImportError as e:
        raise ImportError("GGUF files need the gguf package: pip install gguf") from e
    return gguf


# --- export ---------------------------------------------------------------------------------


@dataclass
class _Entry:
    """One tensor to write: ``mode`` is "raw" (bytes as they are), "float32" (bf16 widened) or
    "quantize" (a float Linear weight quantized to ``ggml_type``)."""

    name: str
    tensor: torch.Tensor
    ggml_type: int
    shape: tuple[int, ...]  # as the writer takes it: bytes per row last for quantized types
    np_dtype: Any
    nbytes: int
    mode: str


def _linear_weights(model: nn.Module) -> dict[str, str]:
    """``"<module>.weight" -> module name`` for every ``nn.Linear`` below the root."""
    return {f"{n}.weight": n for n, m in model.named_modules() if n and isinstance(m, nn.Linear)}


def _plan(model: nn.Module, quant: int | None, gguf: ModuleType) -> list[_Entry]:
    """Decides each tensor's GGML type, validating everything before a byte is written."""
    sizes = gguf.GGML_QUANT_SIZES
    linears = _linear_weights(model)
    entries = []
    for key, t in model.state_dict().items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{key!r} is a {type(t).__name__}, not a tensor")
        if t.is_meta:
            raise ValueError(f"tensor {key!r} is on the meta device and has no data to save; load its weights first")
        if t.layout != torch.strided:
            raise ValueError(f"tensor {key!r} has layout {t.layout}; convert sparse tensors with .to_dense() first")
        if t.dim() > _MAX_DIMS:
            raise ValueError(f"tensor {key!r} has {t.dim()} dimensions; GGUF files here hold at most {_MAX_DIMS}")
        qt = getattr(t, "quant_type", None)
        if qt is not None:
            try:
                ggml = int(gguf.GGMLQuantizationType(int(qt)))
            except (TypeError, ValueError):
                raise ValueError(f"tensor {key!r} has quant_type {qt!r}, which is not a GGML type") from None
            block, size = sizes[gguf.GGMLQuantizationType(ggml)]
            if t.dtype != torch.uint8 or t.dim() == 0 or t.shape[-1] % size:
                raise ValueError(
                    f"tensor {key!r} claims GGML type {qt!r} but holds {t.dtype} {list(t.shape)}, "
                    f"not rows of {size}-byte blocks"
                )
            entries.append(_Entry(key, t, ggml, tuple(t.shape), np.uint8, t.numel(), "raw"))
        elif is_wrapper_subclass(t):
            raise ValueError(
                f"tensor {key!r} is a {type(t).__name__}; save_gguf writes GGUF-quantized and plain tensors only"
            )
        elif quant is not None and key in linears and t.is_floating_point() and t.dim() == 2:
            block, size = sizes[gguf.GGMLQuantizationType(quant)]
            if t.shape[-1] % block:  # rows that are not whole blocks stay unquantized, as in llama.cpp
                entries.append(_plain_entry(key, t))
            else:
                shape = (t.shape[0], t.shape[1] // block * size)
                entries.append(_Entry(key, t, quant, shape, np.uint8, shape[0] * shape[1], "quantize"))
        else:
            entries.append(_plain_entry(key, t))
    return entries


def _plain_entry(key: str, t: torch.Tensor) -> _Entry:
    if t.dtype == torch.bfloat16:
        # diffusers accepts GGML BF16 only on Linear weights; widening to F32 is lossless.
        return _Entry(key, t, 0, tuple(t.shape), np.float32, t.numel() * 4, "float32")
    ggml = _TORCH_TO_GGML.get(t.dtype)
    if ggml is None:
        raise ValueError(
            f"tensor {key!r} has dtype {t.dtype}, which GGUF cannot store; supported: "
            "float32, float16, bfloat16 (written as F32), float64, int8, int16, int32, int64"
        )
    np_dtype = torch.empty(0, dtype=t.dtype).numpy().dtype
    return _Entry(key, t, ggml, tuple(t.shape), np_dtype, t.numel() * t.element_size(), "raw")


def _host_bytes(e: _Entry, gguf: ModuleType) -> Any:
    """The bytes of one entry on the host (a view for contiguous CPU tensors)."""
    if e.mode == "raw":
        return byte_view(e.tensor)
    values = e.tensor.detach().to("cpu", torch.float32)
    if e.mode == "float32":
        return byte_view(values)
    return gguf.quants.quantize(values.numpy(), gguf.GGMLQuantizationType(e.ggml_type))


def _parse_quant_type(value: Any, gguf: ModuleType) -> int | None:
    if value is None:
        return None
    name = value.name if isinstance(value, gguf.GGMLQuantizationType) else value
    if not isinstance(name, str) or name.upper() not in QUANTIZE_TYPES:
        raise ValueError(f"quant_type must be one of {', '.join(QUANTIZE_TYPES)} or None, got {value!r}")
    return int(gguf.GGMLQuantizationType[name.upper()])


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Writes through ``write`` into a temporary sibling, then renames it over ``path``; on any
    failure (Ctrl-C included) the temporary is removed and ``path`` is untouched."""
    tmp = Path(temp_path(path))
    fsync = fsync_enabled()
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if fsync:
        _core.fsync_dir(path.parent)


def save_gguf(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    quant_type: Any = None,
    architecture: str | None = None,
    metadata: dict[str, str] | None = None,
    write_config: bool = True,
) -> SaveResult:
    """Writes ``model`` as one ``.gguf`` file in which every tensor keeps its GGML type.

    ``GGUFParameter`` tensors (a model from diffusers' ``from_single_file`` with a
    ``GGUFQuantizationConfig``) are written byte for byte with their own type; plain tensors as
    F32/F16 (bfloat16 widened to F32, since diffusers accepts BF16 only on Linear weights),
    float64 and integers as F64/I*. The file names each tensor by its ``state_dict`` key and
    records the model class and config, so ``load_gguf(path)`` needs nothing else. For a
    diffusers model ``config.json`` (without ``quantization_config``) is written beside it, so
    ``Model.from_single_file(path, config=<folder>, quantization_config=GGUFQuantizationConfig())``
    loads it offline.

    Args:
        model: a diffusers or transformers model, or any ``nn.Module``.
        path: the file to write; must end with ``.gguf`` (diffusers picks its loader by the
            extension). Parent folders are created.
        quant_type: also quantize plain float ``nn.Linear`` weights to this type (one of
            ``QUANTIZE_TYPES``, by name or ``gguf.GGMLQuantizationType``) with ``gguf.quants``;
            weights whose rows are not whole blocks stay plain. GGUF-quantized weights keep theirs.
        architecture: ``general.architecture`` (default: the class name, lowercased, [a-z0-9]).
        metadata: extra string KV entries (quantsave's own and ``general.architecture`` excluded).
        write_config: write ``config.json`` beside a diffusers model's file.

    Returns:
        A ``SaveResult`` listing the files written (in ``path``'s folder), bytes and seconds.

    Raises:
        ValueError: bad input (tensors on the meta device, dtypes GGUF cannot store, a bad
            ``quant_type`` or metadata), raised before anything is written.
        OSError: the file cannot be written; the path keeps its earlier content, if any.
    """
    t0 = time.perf_counter()
    gguf = _import_gguf()
    path, metadata = _check_save(model, path, metadata)
    family = family_of(model)
    arch = (
        architecture if architecture is not None else re.sub("[^a-z0-9]", "", type(model).__name__.lower()) or "pytorch"
    )
    if not isinstance(arch, str) or not arch:
        raise ValueError(f"architecture must be a non-empty string, got {architecture!r}")
    entries = _plan(model, _parse_quant_type(quant_type, gguf), gguf)

    kv = {KEY_VERSION: _core.__version__, KEY_LIBRARY: family.name, KEY_CLASS: type(model).__name__}
    config_text = model_config_files(model, family, None).get("config.json") if family is not PLAIN else None
    if config_text is not None:
        kv[KEY_CONFIG] = config_text
    kv.update(metadata)

    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, lambda tmp: _write_file(tmp, gguf, arch, kv, entries))
    result = SaveResult(directory=path.parent, files=[path.name], total_bytes=path.stat().st_size, num_shards=1)
    if write_config and family is DIFFUSERS and config_text is not None:
        _core.write_bytes_atomic(path.parent / "config.json", config_text.encode(), fsync=fsync_enabled())
        result.files.append("config.json")
        result.total_bytes += len(config_text.encode())
    result.seconds = time.perf_counter() - t0
    return result


def _check_save(
    model: nn.Module, path: str | os.PathLike[str], metadata: dict[str, str] | None
) -> tuple[Path, dict[str, str]]:
    """The target path and the extra metadata, after checking the arguments of ``save_gguf``."""
    if is_pipeline(model):
        raise ValueError("save_gguf writes one model; export each component of the pipeline")
    if not isinstance(model, nn.Module):
        raise ValueError(f"expected a torch.nn.Module, got {type(model).__name__}")
    path = Path(path)
    if path.suffix != ".gguf":
        raise ValueError(
            f"path {str(path)!r} must end with '.gguf' (diffusers chooses its GGUF loader by the extension)"
        )
    if path.is_dir():
        raise IsADirectoryError(f"path {str(path)!r} is a directory")
    metadata = dict(metadata or {})
    for k, v in metadata.items():
        if not isinstance(k, str) or not k or not isinstance(v, str):
            raise ValueError("metadata must map non-empty strings to strings")
        if k in _RESERVED:
            raise ValueError(f"metadata key {k!r} is written by quantsave; pass architecture= for general.architecture")
    return path, metadata


def _write_file(tmp: Path, gguf: ModuleType, arch: str, kv: dict[str, str], entries: list[_Entry]) -> None:
    """Writes the header, KV data, tensor infos and tensor data (one tensor on the host at a time)."""
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        for key, value in kv.items():
            writer.add_string(key, value)
        if any(e.ggml_type not in _PLAIN for e in entries):
            writer.add_uint32(_QUANT_VERSION, gguf.GGML_QUANT_VERSION)
        for e in entries:
            # A uint8 dtype tells the writer the shape counts bytes per row (quantized types).
            qt = gguf.GGMLQuantizationType(e.ggml_type)
            writer.add_tensor_info(e.name, e.shape, np.dtype(e.np_dtype), e.nbytes, raw_dtype=qt)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for e in entries:
            writer.write_tensor_data(_host_bytes(e, gguf))
    finally:
        writer.close()


# --- import ---------------------------------------------------------------------------------


def _skeleton(path: Path, kv: dict[str, tuple[int, Any]]) -> nn.Module:
    """The model the file's embedded config (or a ``config.json`` beside it) describes."""
    vtype, text = kv.get(KEY_CONFIG, (_STRING, None))
    if vtype != _STRING:
        raise CheckpointError(f"invalid GGUF file {path}: KV {KEY_CONFIG!r} must be a string")
    what = f"invalid GGUF file {path}: {KEY_CONFIG}"
    config = read_config(path.parent) if text is None else json_object(text, what)
    if config is None:
        raise ValueError(
            f"{str(path)!r} records no model config and has no config.json beside it; "
            "pass the model: load_gguf(path, model)"
        )
    return build_skeleton(path.parent, config)


def _compute_dtype(value: Any) -> torch.dtype:
    dtype = torch.float32 if value is None else getattr(torch, value, None) if isinstance(value, str) else value
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"compute_dtype must be a floating torch dtype, got {value!r}")
    return dtype


def _diffusers_gguf() -> ModuleType:
    try:
        from diffusers.quantizers.gguf import utils
    except ImportError as e:
        raise ImportError("GGUF-quantized Linear weights load as diffusers' GGUFLinear: pip install diffusers") from e
    return utils


def _dequantize(raw: torch.Tensor, info: _TensorInfo, path: Path, gguf: ModuleType) -> torch.Tensor:
    qt = gguf.GGMLQuantizationType(info.ggml_type)
    try:
        values = gguf.quants.dequantize(raw.numpy(), qt)
    except NotImplementedError:
        raise CheckpointError(
            f"GGUF file {path}: tensor {info.name!r} has GGML type {qt.name}, which only an nn.Linear weight "
            "can keep and which gguf cannot dequantize"
        ) from None
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(info.shape)


def load_gguf(
    path: str | os.PathLike[str], model: nn.Module | None = None, *, compute_dtype: Any = None
) -> nn.Module:
    """Loads a ``.gguf`` file into ``model``, keeping each quantized tensor's bytes and GGML type.

    ``nn.Linear`` weights of a type diffusers computes with become ``GGUFParameter`` tensors of
    a ``GGUFLinear`` (as diffusers' ``from_single_file`` builds them), sharing the file's bytes.
    Other quantized tensors are dequantized; plain float tensors are cast to ``compute_dtype``
    (as diffusers does when ``torch_dtype`` is not given).

    Args:
        path: the ``.gguf`` file.
        model: the model skeleton (real or on the meta device). When None, it is built from the
            config the file records (``save_gguf`` writes it), or a ``config.json`` beside it.
        compute_dtype: what ``GGUFLinear`` dequantizes to, and the dtype of plain float tensors
            (torch dtype or its name; default float32).

    Raises:
        CheckpointError: a corrupt or truncated file, or tensors that do not match the model
            (names the file and the problem).
        FileNotFoundError: no such file.
        ImportError: gguf, or diffusers for quantized Linear weights, is not installed.
    """
    gguf = _import_gguf()
    path = Path(path)
    dtype = _compute_dtype(compute_dtype)
    kv, infos, base = _map(path, gguf)
    if model is None:
        model = _skeleton(path, kv)
    expected = model.state_dict()
    linears = _linear_weights(model)
    unexpected = [i.name for i in infos if i.name not in expected]
    if unexpected:
        raise CheckpointError(
            f"GGUF file {path} holds {len(unexpected)} tensor(s) the model does not have, e.g. {unexpected[:3]}"
        )
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    names = {i.name for i in infos}
    missing = [k for k in expected if k not in names and k not in tied]
    if missing:
        raise CheckpointError(f"GGUF file {path} lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:3]}")
    plain, quantized = _read_tensors(path, infos, base, expected, set(linears), dtype, gguf)
    for key, param in quantized.items():
        _swap_in_gguf_linear(model, linears[key], param, dtype)
    model.load_state_dict(plain, strict=False, assign=True)
    tie_weights = getattr(model, "tie_weights", None)
    if callable(tie_weights) and hasattr(model, "config"):
        tie_weights()
    materialize_buffers(model, path)
    missing = [n for n, p in model.named_parameters() if p.is_meta and n not in tied]
    if missing:
        raise CheckpointError(f"GGUF file {path} lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:3]}")
    if quantized:
        record_config(model, GGUFQuantizationConfig(compute_dtype=dtype))
    return model.eval()


def _read_tensors(
    path: Path,
    infos: list[_TensorInfo],
    base: torch.Tensor,
    expected: dict[str, torch.Tensor],
    linears: set[str],
    dtype: torch.dtype,
    gguf: ModuleType,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The file's tensors checked against the model's: plain ones (cast to ``dtype``, or
    dequantized), and the ``GGUFParameter`` weights of Linear layers diffusers computes with."""
    plain: dict[str, torch.Tensor] = {}
    quantized: dict[str, torch.Tensor] = {}
    for info in infos:
        want = expected[info.name]
        want_shape = tuple(getattr(want, "quant_shape", want.shape))
        if info.shape != want_shape:
            raise CheckpointError(
                f"GGUF file {path}: tensor {info.name!r} has shape {list(info.shape)}, "
                f"the model expects {list(want_shape)}"
            )
        wants_float = want.is_floating_point() or hasattr(want, "quant_type")
        if wants_float != (_PLAIN.get(info.ggml_type, "F")[0] == "F"):
            kind = gguf.GGMLQuantizationType(info.ggml_type).name
            raise CheckpointError(
                f"GGUF file {path}: tensor {info.name!r} is {kind}, the model expects {want.dtype} there"
            )
        end = info.start + info.nbytes
        if info.ggml_type in _PLAIN:
            t = tensor_from_map(base, _PLAIN[info.ggml_type], list(info.shape), info.start, end)
            plain[info.name] = t.to(dtype) if t.is_floating_point() else t
            continue
        qt = gguf.GGMLQuantizationType(info.ggml_type)
        block, size = gguf.GGML_QUANT_SIZES[qt]
        byte_shape = [*info.shape[:-1], info.shape[-1] // block * size]
        raw = tensor_from_map(base, "U8", byte_shape, info.start, end)
        utils = _diffusers_gguf() if info.name in linears else None
        if utils is not None and qt in utils.SUPPORTED_GGUF_QUANT_TYPES:
            quantized[info.name] = utils.GGUFParameter(raw, quant_type=qt)
        else:
            plain[info.name] = _dequantize(raw, info, path, gguf).to(dtype)
    return plain, quantized


def _swap_in_gguf_linear(model: nn.Module, name: str, weight: torch.Tensor, dtype: torch.dtype) -> None:
    """Replaces the Linear ``name`` by diffusers' ``GGUFLinear`` holding ``weight``, as
    diffusers' ``_replace_with_gguf_linear`` does (its bias is loaded afterwards)."""
    utils = _diffusers_gguf()
    old = model.get_submodule(name)
    with _empty_weights():
        new = utils.GGUFLinear(old.in_features, old.out_features, old.bias is not None, compute_dtype=dtype)
    new.source_cls = getattr(old, "source_cls", type(old))
    new.requires_grad_(False)
    new.weight = weight
    replace_module(model, name, new)
