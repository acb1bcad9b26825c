"""``convert``: turn a float safetensors checkpoint (one file, a sharded model folder or a
pipeline folder) into a pre-quantized bitsandbytes one, as diffusers/transformers would write
after quantizing on load, tensor by tensor and without materializing the model.

Data flow: the source headers are read (Rust, validated); the layout decides which tensors are
Linear weights to quantize and in which order the state dict lists them; the planner cuts the
output into shards (never splitting a quantized weight); then the Rust converter maps the
sources, quantizes chunk by chunk and writes each chunk at its place in the output files, with
bounded memory and without the GIL; finally ``config.json`` (and the index) are written.

Which tensors are Linear weights comes from, in order of preference:

1. the model passed in (real or on the meta device);
2. for a transformers checkpoint written by the installed transformers version, a static reading
   of the architecture's modeling source (``quantsave.convert.static_layout``) when it is sure: no
   import of the modeling code, which costs seconds;
3. a meta-device skeleton built from ``config.json`` through diffusers or transformers.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantsave import _core
from quantsave.backends.bitsandbytes import layout as bnb_layout
from quantsave.backends.bitsandbytes.config import BitsAndBytesConfig
from quantsave.backends.bitsandbytes.quantizer import BitsAndBytesQuantizer
from quantsave.backends.config import resolve_config
from quantsave.checkpoint.commit import fsync_enabled, staged_directory
from quantsave.checkpoint.plan import parse_shard_size, plan_checkpoint
from quantsave.checkpoint.reader import open_checkpoint, read_config
from quantsave.checkpoint.writer import (
    CheckpointFiles,
    SaveResult,
    finish_checkpoint,
    progress_bar,
    write_checksums,
)
from quantsave.errors import CheckpointError
from quantsave.families import DIFFUSERS, TRANSFORMERS, Family, dump_json, family_of, model_config_files
from quantsave.load import build_skeleton
from quantsave.quantize import bnb_targets

__all__ = ["convert"]

_FLOATS = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
#: Elements per chunk of work: a few MB per thread in flight.
_CHUNK_ELEMS = 1 << 22


@dataclass
class _Source:
    """A float checkpoint: its files and every tensor's (file index, dtype, shape)."""

    folder: Path
    files: list[Path]
    tensors: dict[str, tuple[int, str, list[int]]]
    config: dict[str, Any] | None


@dataclass
class _Output:
    """The planned output: tensors in state-dict order with their dtype and shape, the ops
    producing them (output names, shard filled in later) and the quantized weight groups."""

    keys: list[str] = field(default_factory=list)
    specs: dict[str, tuple[str, list[int]]] = field(default_factory=dict)
    ops: list[tuple[Any, ...]] = field(default_factory=list)
    parameters: int = 0


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    quantization_config: Any,
    *,
    model: nn.Module | None = None,
    components: list[str] | dict[str, Any] | None = None,
    max_shard_size: int | str | None = None,
    progress: bool | None = None,
    checksums: bool = False,
) -> SaveResult:
    """Converts the float checkpoint ``src`` into a pre-quantized checkpoint in ``dst``.

    Args:
        src: a ``.safetensors`` file, a model folder (single file or sharded) or a diffusers
            pipeline folder (``model_index.json``).
        dst: the output folder (must differ from the source).
        quantization_config: a bitsandbytes 4-bit (nf4/fp4, double quant or not) or 8-bit
            config (quantsave, diffusers or transformers object, or dict).
        model: the model (real or on the meta device) whose Linear layers are quantized; by
            default learned from ``config.json`` (see the module docstring).
        components: for a pipeline folder, the components to convert (default: every
            component with safetensors weights), or a mapping from component name to its own
            config (as diffusers' ``PipelineQuantizationConfig(quant_mapping=...)``); the other
            folders and files are copied.
        max_shard_size: as for ``save_quantized``.
        progress: a progress bar (tqdm) over the bytes converted; default: when stderr is a TTY.
        checksums: record each output weights file's sha256 in ``checksums.sha256`` (see
            ``save_quantized``).

    Returns:
        What was written (for a pipeline, the totals over the converted components).

    Raises:
        ValueError: an unsupported config, an already quantized source, ``dst`` equal to the
            source, or unknown pipeline components.
        CheckpointError: a corrupt source file, or a source that does not match the model.
        FileNotFoundError: no source weights.
    """
    path = Path(src)
    if path.is_dir() and (path / "model_index.json").is_file():
        if model is not None:
            raise ValueError("model= applies to one model; a pipeline's components come from their folders")
        return _convert_pipeline(path, Path(dst), quantization_config, components, max_shard_size, progress, checksums)
    if components is not None:
        raise ValueError(f"components= applies to pipeline folders; {str(path)!r} is not one (no model_index.json)")
    return _convert_model(path, Path(dst), _bnb_config(quantization_config), model, max_shard_size, progress, checksums)


def _bnb_config(quantization_config: Any) -> BitsAndBytesConfig:
    config = resolve_config(quantization_config)
    if not isinstance(config, BitsAndBytesConfig) or config.bits == 0:
        method = config.method if config is not None else None
        raise ValueError(f"convert supports bitsandbytes 4-bit and 8-bit configs, got {method!r}")
    if config.bits == 4 and config.bnb_4bit_quant_storage != torch.uint8:
        raise ValueError(
            "convert writes 4-bit weights with uint8 storage; got "
            f"bnb_4bit_quant_storage={config.bnb_4bit_quant_storage}"
        )
    if config.bits == 8 and config.llm_int8_has_fp16_weight:
        raise ValueError("llm_int8_has_fp16_weight=True keeps float weights; there is nothing to convert")
    return config


def _read_source(path: Path) -> _Source:
    ckpt = open_checkpoint(path)
    number = {f: i for i, f in enumerate(ckpt.files)}
    tensors = {name: (number[t.file], t.dtype, t.shape) for name, t in ckpt.tensors.items()}
    return _Source(ckpt.directory, ckpt.files, tensors, ckpt.config)


def _convert_model(
    path: Path,
    dst: Path,
    config: BitsAndBytesConfig,
    model: nn.Module | None,
    max_shard_size: int | str | None,
    progress: bool | None,
    checksums: bool = False,
) -> SaveResult:
    t0 = time.perf_counter()
    source = _read_source(path)
    if source.config is not None and source.config.get("quantization_config") is not None:
        method = source.config["quantization_config"].get("quant_method")
        raise ValueError(f"{str(path)!r} is already quantized ({method})")
    if dst.resolve() == source.folder.resolve():
        raise ValueError("dst must differ from the source folder (the source files are read while writing)")
    if dst.exists() and not dst.is_dir():
        raise NotADirectoryError(f"dst {str(dst)!r} exists and is not a directory")
    quantizer = BitsAndBytesQuantizer(config)

    layout = None if model is not None else _static_layout(source, config, max_shard_size)
    if layout is not None:
        family, targets, order = TRANSFORMERS, layout, list(source.tensors)
        json_files = _static_config_files(source, quantizer)
    else:
        if model is None:
            model = build_skeleton(source.folder, source.config)
        family = family_of(model)
        if family is DIFFUSERS and "_name_or_path" not in model.config:  # type: ignore[operator]
            # diffusers' from_pretrained records the source, and save_pretrained writes it.
            model.register_to_config(_name_or_path=str(path))  # type: ignore[operator]
        order = _model_order(model, family, source)
        targets = [t for t in bnb_targets(model, config) if f"{t}.weight" in source.tensors]
        json_files = model_config_files(
            model, family, quantizer.config_dict(family), dtype=_output_dtype(model, source, set(targets))
        )
    out = _plan_output(source, order, set(targets), config)
    if model is not None and family is TRANSFORMERS:  # built above whenever there is no static layout
        out.parameters = _parameter_count(model, source, set(targets), config)
    return _write(source, out, family, dst, quantizer, json_files, max_shard_size, progress, checksums, t0)


def _static_layout(source: _Source, config: BitsAndBytesConfig, max_shard_size: int | str | None) -> list[str] | None:
    """The quantized modules of a transformers checkpoint learned without importing
    transformers, when that is exact: the checkpoint was written by the installed transformers
    version (so its config files round-trip unchanged), its float tensors all have the
    config's dtype, no tied output embeddings are stored, and the output is one file (the
    checkpoint does not record the model's tensor order, which sharding needs)."""
    cfg = source.config
    if cfg is None or "_class_name" in cfg or not cfg.get("architectures"):
        return None
    try:
        version = importlib_metadata.version("transformers")
    except importlib_metadata.PackageNotFoundError:
        return None
    gen = source.folder / "generation_config.json"
    if cfg.get("transformers_version") != version or not gen.is_file():
        return None
    try:
        if json.loads(gen.read_text(encoding="utf-8")).get("transformers_version") != version:
            return None
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    dtype = cfg.get("dtype", cfg.get("torch_dtype"))
    floats = {d for _, d, _ in source.tensors.values() if d in _FLOATS}
    if len(floats) != 1 or dtype != str(_FLOATS[floats.pop()]).removeprefix("torch."):
        return None
    if cfg.get("tie_word_embeddings") is not False and any(k.endswith("lm_head.weight") for k in source.tensors):
        return None
    try:
        from quantsave.convert.static_layout import transformers_bnb_targets
    except ImportError:
        return None
    shapes = {k: (d, s) for k, (_, d, s) in source.tensors.items()}
    targets = transformers_bnb_targets(cfg, shapes, config.llm_int8_skip_modules)
    if targets is None:
        return None
    # One file (the bytes of each quantized weight with its state, from its layout).
    total = 0
    for key, (_, dtype, shape) in source.tensors.items():
        if key.removesuffix(".weight") in targets and len(shape) == 2:
            total += bnb_layout.quantized_bytes(shape[0], shape[1], _torch_name(dtype), config)
        else:
            total += _core.dtype_nbytes(dtype, shape)
    if total > parse_shard_size(max_shard_size, TRANSFORMERS.default_max_shard_size):
        return None
    return targets


def _static_config_files(source: _Source, quantizer: BitsAndBytesQuantizer) -> dict[str, str]:
    """config.json with the quantization config added, generation_config.json unchanged (both
    round-trip unchanged through the transformers version that wrote them)."""
    cfg = dict(source.config or {})
    cfg["quantization_config"] = quantizer.config_dict(TRANSFORMERS)
    return {
        "config.json": dump_json(cfg),
        "generation_config.json": (source.folder / "generation_config.json").read_text(encoding="utf-8"),
    }


def _model_order(model: nn.Module, family: Family, source: _Source) -> list[str]:
    """The source tensors in the model's state-dict order; checks that they match the model."""
    expected = model.state_dict(keep_vars=True)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {}) if family is TRANSFORMERS else set()
    unexpected = [k for k in source.tensors if k not in expected]
    if unexpected:
        hint = (
            "; transformers renames or fuses some architectures' weights on load (e.g. MoE experts), "
            "which convert does not support yet"
            if family is TRANSFORMERS
            else ""
        )
        raise CheckpointError(
            f"checkpoint in {source.folder} holds {len(unexpected)} tensor(s) the model does not have, "
            f"e.g. {unexpected[:3]}{hint}"
        )
    missing = [k for k in expected if k not in source.tensors and k not in tied]
    if missing:
        raise CheckpointError(
            f"checkpoint in {source.folder} lacks {len(missing)} weight(s) the model needs, e.g. {missing[:3]}"
        )
    for k, (_, _, shape) in source.tensors.items():
        if list(expected[k].shape) != shape:
            raise CheckpointError(
                f"checkpoint in {source.folder}: tensor {k!r} has shape {shape}, "
                f"the model expects {list(expected[k].shape)}"
            )
    # transformers does not save tied weights.
    return [k for k in expected if k in source.tensors and k not in tied]


def _output_dtype(model: nn.Module, source: _Source, targets: set[str]) -> torch.dtype:
    """The dtype transformers records: its model's first floating parameter once loaded (the
    quantized weights are uint8 then)."""
    for name, _ in model.named_parameters():
        entry = source.tensors.get(name)
        if entry is not None and entry[1] in _FLOATS and name.removesuffix(".weight") not in targets:
            return _FLOATS[entry[1]]
    return torch.float32


def _parameter_count(model: nn.Module, source: _Source, targets: set[str], config: BitsAndBytesConfig) -> int:
    """transformers' ``total_parameters`` of the quantized model: a packed 4-bit weight counts
    two values per stored byte."""
    total = 0
    for name, p in model.named_parameters():
        n = p.numel()
        if config.bits == 4 and name.endswith(".weight") and name[: -len(".weight")] in targets:
            n = bnb_layout.logical_parameters(bnb_layout.packed_bytes(n))
        total += n
    return total


def _natural_key(name: str) -> list[tuple[Any, ...]]:
    """transformers' ``dot_natural_key``: dot-separated parts, numbers (whole or trailing)
    compared as numbers."""
    parts: list[tuple[Any, ...]] = []
    for part in name.split("."):
        if part.isdigit():
            parts.append((0, int(part)))
            continue
        text = part.rstrip("0123456789")
        digits = part[len(text) :]
        parts.append((1, text, int(digits)) if digits else (1, text))
    return parts


def _torch_name(dtype: str) -> str:
    """The torch name of a source float dtype (``"BF16"`` -> ``"bfloat16"``), as the quant state records it."""
    return str(_FLOATS.get(dtype, torch.float32)).removeprefix("torch.")


def _plan_output(source: _Source, order: list[str], targets: set[str], config: BitsAndBytesConfig) -> _Output:
    """Every output tensor in state-dict order (a quantized Linear's weight, bias, then its
    quantization state, as bitsandbytes' layers list them) and the op producing it."""
    out = _Output()

    def add(name: str, dtype: str, shape: list[int]) -> None:
        out.keys.append(name)
        out.specs[name] = (dtype, shape)

    pending: dict[str, str] = {}  # module -> its weight key, until its bias (if any) is listed
    for key in order:
        file, dtype, shape = source.tensors[key]
        module, _, leaf = key.rpartition(".")
        if leaf == "weight" and module in targets:
            if dtype not in _FLOATS or len(shape) != 2:
                raise ValueError(f"{key!r} is {dtype} {shape}; only 2-D F32/BF16/F16 Linear weights can be quantized")
            _add_weight(out, add, source, key, config)
            bias = f"{module}.bias"
            if bias in source.tensors and bias in order and bias not in out.specs:
                pending[module] = key
            else:
                _add_state(out, add, source, key, config)
            continue
        add(key, dtype, list(shape))
        out.ops.append(("copy", file, key, key))
        if leaf == "bias" and module in pending:
            _add_state(out, add, source, pending.pop(module), config)
    return out


def _add_weight(out: _Output, add: Any, source: _Source, key: str, config: BitsAndBytesConfig) -> None:
    _file, _dtype, (rows, cols) = source.tensors[key]
    add(key, *bnb_layout.weight_spec(rows, cols, config.bits))


def _add_state(out: _Output, add: Any, source: _Source, key: str, config: BitsAndBytesConfig) -> None:
    """The tensors a quantized weight keeps beside itself (``bnb_layout.state_specs``), and the
    op producing them all."""
    file, dtype, (rows, cols) = source.tensors[key]
    qt, bs, offset = config.bnb_4bit_quant_type, bnb_layout.BLOCKSIZE, None
    if config.bits == 4 and config.bnb_4bit_use_double_quant:
        absmax = torch.frombuffer(bytearray(_core.absmax_4bit(source.files[file], key, bs)), dtype=torch.float32)
        offset = absmax.mean().item() if absmax.numel() else float("nan")
    state = bnb_layout.quant_state_json(qt, _torch_name(dtype), [rows, cols], offset) if config.bits == 4 else b""
    specs = bnb_layout.state_specs(
        key, rows, cols, bits=config.bits, quant_type=qt, double=offset is not None, state_len=len(state)
    )
    for spec in specs:
        add(*spec)
    # 8-bit: SCB, weight_format; 4-bit: absmax, quant_map[, nested_absmax, nested_quant_map], quant state.
    names = [name for name, _, _ in specs]
    if config.bits == 8:
        out.ops.append(("int8", file, key, rows, cols, key, names[0]))
        out.ops.append(("bytes", bnb_layout.WEIGHT_FORMAT, names[1]))
        return
    out.ops.append(("bytes", bytes(_core.code_4bit(qt)), names[1]))
    nested = None
    if offset is not None:
        nested = (offset, names[2])
        out.ops.append(("bytes", bytes(_core.dynamic_map()), names[3]))
    out.ops.append(("bytes", state, names[-1]))
    out.ops.append(("quant4", file, key, qt, bs, key, names[0], nested))


def _write(
    source: _Source,
    out: _Output,
    family: Family,
    dst: Path,
    quantizer: BitsAndBytesQuantizer,
    json_files: dict[str, str],
    max_shard_size: int | str | None,
    progress: bool | None,
    checksums: bool,
    t0: float,
) -> SaveResult:
    # transformers saves a from_pretrained model in natural key order (its weight conversions
    # reverted), diffusers in state-dict order.
    keys = sorted(out.keys, key=_natural_key) if family is TRANSFORMERS else out.keys
    groups = quantizer.weight_groups(keys)
    sizes = [_core.dtype_nbytes(*out.specs[k]) for k in keys]
    limit = parse_shard_size(max_shard_size, family.default_max_shard_size)
    plan = plan_checkpoint(keys, sizes, [groups.get(k) for k in keys], limit, family.weights_name)
    file_names = plan.file_names
    shard_of = {k: s for s, (_, names) in enumerate(plan.shard_keys()) for k in names}
    meta = {"format": "pt"}
    shard_specs = [([(k, *out.specs[k]) for k in names], meta) for _, names in plan.shard_keys()]
    ops: list[_core.ConvertOp] = []
    for op in out.ops:
        kind = op[0]
        if kind == "copy":
            _, file, name, target = op
            ops.append(_core.ConvertOp.copy(file=file, name=name, shard=shard_of[target], target=target))
        elif kind == "bytes":
            _, data, target = op
            ops.append(_core.ConvertOp.bytes(data=data, shard=shard_of[target], target=target))
        elif kind == "quant4":
            _, file, name, qt, bs, packed, absmax, nested = op
            ops.append(
                _core.ConvertOp.quant4(
                    file=file,
                    name=name,
                    quant_type=qt,
                    blocksize=bs,
                    shard=shard_of[packed],
                    packed=packed,
                    absmax=absmax,
                    nested=nested,
                )
            )
        else:
            _, file, name, rows, cols, weight, scb = op
            ops.append(
                _core.ConvertOp.int8(
                    file=file, name=name, rows=rows, cols=cols, shard=shard_of[weight], weight=weight, scb=scb
                )
            )

    result = SaveResult(directory=dst, files=list(file_names), num_shards=len(plan.shards))
    # Everything is written into a staging folder that replaces `dst` in one atomic step.
    with staged_directory(dst, fsync=fsync_enabled()) as stage:
        conversion = _core.Conversion(
            [str(f) for f in source.files],
            [(stage / fname, *spec) for fname, spec in zip(file_names, shard_specs, strict=True)],
            ops,
            chunk_elems=_CHUNK_ELEMS,
            fsync=fsync_enabled(),
        )
        total_in = sum(_core.dtype_nbytes(d, s) for _, d, s in source.tensors.values())
        result.total_bytes = sum(_run(conversion, progress, total_in))
        hashes = None
        if checksums:
            hashes = dict(zip(file_names, _core.sha256_files([str(stage / f) for f in file_names]), strict=True))
        write_checksums(stage, hashes, result)
        index_meta = {"total_parameters": out.parameters} if family is TRANSFORMERS else {}
        finish_checkpoint(stage, plan, CheckpointFiles(meta, index_meta, json_files), result)
    result.seconds = time.perf_counter() - t0
    return result


def _run(conversion: _core.Conversion, progress: bool | None, total: int) -> list[int]:
    """Runs the conversion (without the GIL), with a byte progress bar when asked or on a TTY."""
    import sys

    bar = progress_bar(sys.stderr.isatty() if progress is None else progress, total, "Converting", unit="B")
    if bar is None:
        return conversion.run()
    sizes: list[int] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            sizes.extend(conversion.run())
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(e)

    thread = threading.Thread(target=work, name="quantsave-convert", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.2)
            bar.update(conversion.progress() - bar.n)
    finally:
        bar.close()
    if errors:
        raise errors[0]
    return sizes


def _convert_pipeline(
    src: Path,
    dst: Path,
    quantization_config: Any,
    components: list[str] | dict[str, Any] | None,
    max_shard_size: int | str | None,
    progress: bool | None,
    checksums: bool,
) -> SaveResult:
    """Converts the named components of a pipeline folder and copies everything else."""
    t0 = time.perf_counter()
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise ValueError("dst must not be the source pipeline folder or inside it")
    index = json.loads((src / "model_index.json").read_text(encoding="utf-8"))
    names = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v and v[0] is not None]
    with_weights = [n for n in names if (src / n).is_dir() and _has_weights(src / n)]
    if isinstance(components, dict):
        configs = {name: _bnb_config(c) for name, c in components.items()}
    else:
        chosen = with_weights if components is None else list(components)
        if quantization_config is None:
            raise ValueError("pass a quantization config (or a components mapping of configs)")
        shared = _bnb_config(quantization_config)
        configs = dict.fromkeys(chosen, shared)
    unknown = [n for n in configs if n not in with_weights]
    if unknown:
        raise ValueError(
            f"pipeline components {unknown} are not in {str(src)!r} or have no safetensors weights; "
            f"components with weights: {with_weights}"
        )
    for name in configs:
        cfg = read_config(src / name)
        if cfg is not None and cfg.get("quantization_config") is not None:
            raise ValueError(f"pipeline component {name!r} is already quantized")
    result = SaveResult(directory=dst)
    # The whole pipeline folder is staged and swapped in at once (see quantsave.checkpoint.commit).
    with staged_directory(dst, fsync=fsync_enabled()) as stage:
        for entry in sorted(src.iterdir()):
            target = stage / entry.name
            if entry.name in configs:
                r = _convert_model(entry, target, configs[entry.name], None, max_shard_size, progress, checksums)
                result.files.extend(f"{entry.name}/{f}" for f in r.files)
                result.total_bytes += r.total_bytes
                result.num_shards += r.num_shards
                continue
            # Copied as it is, replacing what an earlier conversion left (links to the old
            # folder's files are removed first, never written through).
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif os.path.lexists(target):
                target.unlink()
            if entry.is_dir():
                shutil.copytree(entry, target)
            elif entry.is_file():
                shutil.copy2(entry, target)
                result.files.append(entry.name)
    result.seconds = time.perf_counter() - t0
    return result


def _has_weights(folder: Path) -> bool:
    try:
        open_checkpoint(folder, headers=False)
    except (FileNotFoundError, CheckpointError):
        return False
    return True

