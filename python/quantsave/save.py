"""The save path: model -> quantizer (state dict, weight groups, config) -> Rust planner ->
Rust writer, then config/index files and removal of stale shards of an earlier save."""

from __future__ import annotations

import itertools
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from quantsave import _core
from quantsave.backends.config import resolve_config
from quantsave.backends.quantizer import Quantizer
from quantsave.backends.registry import detect_quantizer, get_quantizer
from quantsave.checkpoint.checksums import CHECKSUMS_NAME, render_checksums
from quantsave.checkpoint.commit import staged_directory
from quantsave.checkpoint.tensors import byte_view, dtype_name, is_wrapper_subclass, subclass_nbytes
from quantsave.errors import NotSerializableError
from quantsave.families import (
    TRANSFORMERS,
    Family,
    dump_json,
    family_of,
    is_pipeline,
    model_config_files,
    total_parameters,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = [
    "SaveResult",
    "save_model",
    "check_file_name",
    "fsync_enabled",
    "finish_checkpoint",
    "resolve_quantizer",
    "write_checksums",
]

_SHARD_RE = re.compile(r"(.*?)-\d{5}-of-\d{5}")
#: Host bytes gathered per write call for tensors that live on an accelerator.
_DEVICE_BATCH_BYTES = 1 << 30


@dataclass
class SaveResult:
    """What a save wrote."""

    directory: Path
    files: list[str] = field(default_factory=list)
    total_bytes: int = 0
    num_shards: int = 0
    seconds: float = 0.0

    def __repr__(self) -> str:
        return (
            f"SaveResult({self.directory}: {self.num_shards} shard(s), {len(self.files)} files, "
            f"{self.total_bytes} bytes, {self.seconds:.3f} s)"
        )


def fsync_enabled() -> bool:
    """Whether saves fsync files and folders (``QUANTSAVE_FSYNC=1``); off by default, as in the references."""
    return os.environ.get("QUANTSAVE_FSYNC", "0").strip().lower() not in ("", "0", "false", "no")


def check_file_name(value: str, what: str) -> str:
    """Rejects names that would write outside the target folder."""
    if (
        not isinstance(value, str)
        or not value
        or value in (".", "..")
        or "/" in value
        or "\\" in value
        or "\0" in value
        or os.path.isabs(value)
    ):
        raise ValueError(f"{what} {value!r} must be a plain file name (no path separators, not '.' or '..')")
    return value


def resolve_quantizer(model: nn.Module, quantization_config: Any) -> Quantizer | None:
    """The quantizer for ``model``: from the explicit config, the model's own record, or its layers."""
    config = resolve_config(quantization_config)
    if config is None:
        recorded = getattr(model, "_quantsave_config", None)
        hf_quantizer = getattr(model, "hf_quantizer", None)
        if recorded is not None:
            config = resolve_config(recorded)
        elif hf_quantizer is not None:
            config = resolve_config(hf_quantizer.quantization_config)
        else:
            cls = detect_quantizer(model)
            if cls is None:
                return None
            if not cls.is_serializable:
                return cls(cls.config_cls())
            config = cls.config_from_model(model)
    if config is None:
        # Only an hf_quantizer without a quantization_config gets here.
        raise ValueError("the model's hf_quantizer has no quantization_config")
    return get_quantizer(config)


def _check_serializable(q: Quantizer, safe_serialization: bool) -> None:
    if not q.is_serializable:
        raise NotSerializableError(
            f"models quantized with {q.quant_method} cannot be saved: {q.not_serializable_reason}. Nothing was written."
        )
    if safe_serialization and not q.supports_safetensors:
        reason = q.safetensors_unsupported_reason or "pass safe_serialization=False"
        raise NotSerializableError(
            f"{q.quant_method} checkpoints cannot be written as safetensors: {reason}. Nothing was written."
        )


def _transformers_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Prepares a transformers state dict as ``save_pretrained`` does: tied weights removed, and
    load-time weight conversions reverted (which also fixes the key order)."""
    try:
        from transformers.modeling_utils import remove_tied_weights_from_state_dict
    except ImportError:
        return state_dict
    # Called for models of the transformers family only.
    hf_model = cast("PreTrainedModel", model)
    state_dict = dict(remove_tied_weights_from_state_dict(state_dict, hf_model))
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return state_dict
    return dict(revert_weight_conversion(hf_model, state_dict))


def _check_tensors(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Validates every tensor before anything is written; returns their dtype names."""
    names = []
    spans: dict[Any, list[tuple[int, int, str]]] = {}
    for key, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{key!r} is a {type(t).__name__}, not a tensor")
        if t.is_meta or t.device.type == "meta":
            raise ValueError(f"tensor {key!r} is on the meta device and has no data to save; load its weights first")
        if t.layout != torch.strided:
            raise ValueError(
                f"tensor {key!r} has layout {t.layout}; convert sparse tensors with .to_dense() before saving"
            )
        if is_wrapper_subclass(t):
            # A tensor subclass (torchao) in the pickle form: torch.save stores its parts.
            names.append("")
            continue
        names.append(dtype_name(t.dtype, f"tensor {key!r}"))
        if t.numel():
            storage = t.untyped_storage()
            start = int(t.storage_offset()) * t.element_size()
            end = start + _span_bytes(t)
            spans.setdefault((t.device, storage.data_ptr()), []).append((start, end, key))
    for group in spans.values():
        group.sort()
        for (_s0, e0, k0), (s1, _e1, k1) in itertools.pairwise(group):
            if s1 < e0:
                raise ValueError(
                    f"tensors {k0!r} and {k1!r} share memory; safetensors stores each tensor once. "
                    "Untie them (e.g. clone one) or drop one before saving"
                )
    return names


def _span_bytes(t: torch.Tensor) -> int:
    if t.numel() == 0:
        return 0
    last = sum((s - 1) * st for s, st in zip(t.shape, t.stride(), strict=True))
    return (last + 1) * t.element_size()


def _plan_units(
    keys: list[str], tensors: list[torch.Tensor], groups: dict[str, str]
) -> tuple[list[int], list[int | None]]:
    """Sizes and group ids for the planner.

    As the reference, a tensor counts its whole storage, and tensors sharing a storage (all
    empty tensors included) are placed with the first of them and counted once. External memory
    torch did not allocate (non-resizable, e.g. a memory-mapped checkpoint) is the exception:
    each tensor counts its own bytes and stands alone. Tensors of one quantized weight
    (``groups``) are one unit as well.
    """
    parent = list(range(len(keys)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_of: dict[Any, int] = {}
    sizes = []
    for i, (key, t) in enumerate(zip(keys, tensors, strict=True)):
        if is_wrapper_subclass(t):
            sizes.append(subclass_nbytes(t))
            continue
        storage = t.untyped_storage()
        if t.numel() and not storage.resizable():
            sizes.append(t.numel() * t.element_size())
        else:
            sid = (t.device, storage.data_ptr(), storage.nbytes())
            if sid in first_of:
                parent[find(i)] = find(first_of[sid])
                sizes.append(0)
            else:
                first_of[sid] = i
                sizes.append(storage.nbytes())
        if key in groups:
            gid = ("group", groups[key])
            if gid in first_of:
                parent[find(i)] = find(first_of[gid])
            else:
                first_of[gid] = i
    roots = [find(i) for i in range(len(keys))]
    members: dict[int, int] = {}
    for r in roots:
        members[r] = members.get(r, 0) + 1
    return sizes, [r if members[r] > 1 else None for r in roots]


def _parse_shard_size(value: int | str | None, family: Family) -> int:
    if value is None:
        value = family.default_max_shard_size
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"max_shard_size must be an int (bytes) or a string like '5GB', got {value!r}")
    size = _core.parse_size(value) if isinstance(value, str) else value
    if size <= 0:
        raise ValueError(f"max_shard_size must be positive, got {value!r}")
    return size


def _progress_bar(enabled: bool | None, total: int, desc: str) -> Any:
    if enabled is None:
        enabled = total > 1 and sys.stderr.isatty()
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="shard")


def save_model(
    model: nn.Module,
    save_directory: str | os.PathLike[str],
    *,
    quantization_config: Any = None,
    safe_serialization: bool = True,
    max_shard_size: int | str | None = None,
    variant: str | None = None,
    weights_name: str | None = None,
    metadata: dict[str, str] | None = None,
    progress: bool | None = None,
    checksums: bool = False,
) -> SaveResult:
    """Saves one model (see ``quantsave.save_quantized``)."""
    t0 = time.perf_counter()
    if is_pipeline(model):
        raise ValueError("save_model saves one model; save a DiffusionPipeline with quantsave.save_quantized")
    if not isinstance(model, nn.Module):
        raise ValueError(f"expected a torch.nn.Module, got {type(model).__name__}")
    family = family_of(model)
    quantizer = resolve_quantizer(model, quantization_config)
    if quantizer is not None:
        _check_serializable(quantizer, safe_serialization)
    if variant is not None:
        check_file_name(variant, "variant")
    if weights_name is None:
        weights_name = family.weights_name if safe_serialization else family.bin_weights_name
    check_file_name(weights_name, "weights_name")
    suffix = ".safetensors" if safe_serialization else ".bin"
    if not weights_name.endswith(suffix):
        raise ValueError(f"weights_name {weights_name!r} must end with {suffix!r}")
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("metadata must map strings to strings")
    shard_limit = _parse_shard_size(max_shard_size, family)

    if quantizer is None:
        state_dict = dict(model.state_dict())
    elif safe_serialization:
        state_dict = quantizer.state_dict(model, family)
    else:
        state_dict = quantizer.pickle_state_dict(model, family)
    if family is TRANSFORMERS:
        state_dict = _transformers_state_dict(model, state_dict)
    dtypes = _check_tensors(state_dict)
    keys = list(state_dict)
    groups = quantizer.weight_groups(keys) if quantizer is not None else {}
    sizes, plan_groups = _plan_units(keys, [state_dict[k] for k in keys], groups)
    shards, total_size = _core.plan_shards(sizes, plan_groups, shard_limit)
    file_names = _core.shard_file_names(weights_name, variant, len(shards))

    header_meta = {"format": "pt"}
    if quantizer is not None:
        header_meta.update(quantizer.header_metadata(state_dict))
    if metadata:
        header_meta.update(metadata)
    quant_dict = quantizer.config_dict(family) if quantizer is not None else None
    json_files = model_config_files(model, family, quant_dict)
    if quantizer is not None:
        json_files.update(quantizer.extra_files(model, family))

    directory = Path(save_directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"save_directory {str(directory)!r} exists and is not a directory")
    result = SaveResult(directory=directory, num_shards=len(shards))
    # Everything is written into a staging folder that replaces `directory` in one atomic step.
    with staged_directory(directory, fsync=fsync_enabled()) as stage:
        _write_files(
            stage, state_dict, keys, dtypes, shards, file_names, header_meta, json_files, result, progress,
            safe_serialization=safe_serialization, checksums=checksums, weights_name=weights_name, variant=variant,
            total_size=total_size, index_meta_extra=_index_meta(model, family, quantizer, safe_serialization),
        )
    result.seconds = time.perf_counter() - t0
    return result


def _index_meta(
    model: nn.Module, family: Family, quantizer: Quantizer | None, safe_serialization: bool
) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    if family is TRANSFORMERS:
        meta["total_parameters"] = total_parameters(model)
    if quantizer is not None and safe_serialization:
        meta.update(quantizer.index_metadata(family))
    return meta


def _write_files(
    directory: Path,
    state_dict: dict[str, torch.Tensor],
    keys: list[str],
    dtypes: list[str],
    shards: list[list[int]],
    file_names: list[str],
    header_meta: dict[str, str],
    json_files: dict[str, str],
    result: SaveResult,
    progress: bool | None,
    *,
    safe_serialization: bool,
    checksums: bool,
    weights_name: str,
    variant: str | None,
    total_size: int,
    index_meta_extra: dict[str, Any],
) -> None:
    """Writes the shards, checksums, index and config files into ``directory`` (a staging
    folder holding links to the previous checkpoint's files) and drops stale ones."""
    bar = _progress_bar(progress, len(shards), "Writing shards")
    hashes: dict[str, str] = {}
    try:
        if safe_serialization:
            _write_safetensors(
                state_dict,
                keys,
                dtypes,
                shards,
                file_names,
                directory,
                header_meta,
                result,
                bar,
                hashes if checksums else None,
            )
        else:
            for idx, fname in zip(shards, file_names, strict=True):
                shard = {keys[i]: state_dict[keys[i]] for i in idx}
                # torch.save writes in place: never through a link to the previous checkpoint's file.
                (directory / fname).unlink(missing_ok=True)
                torch.save(
                    {k: t if is_wrapper_subclass(t) else t.contiguous() for k, t in shard.items()}, directory / fname
                )
                result.total_bytes += (directory / fname).stat().st_size
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    result.files.extend(file_names)
    if checksums and not safe_serialization:
        hashes.update(zip(file_names, _core.sha256_files([str(directory / f) for f in file_names]), strict=True))
    write_checksums(directory, hashes if checksums else None, result)
    weight_map = {keys[i]: fname for idx, fname in zip(shards, file_names, strict=True) for i in idx}
    finish_checkpoint(
        directory, result, file_names, weight_map, {"total_size": total_size, **index_meta_extra}, json_files,
        weights_name, variant,
    )


def finish_checkpoint(
    directory: Path,
    result: SaveResult,
    file_names: list[str],
    weight_map: dict[str, str],
    index_meta: dict[str, Any],
    json_files: dict[str, str],
    weights_name: str,
    variant: str | None,
) -> None:
    """After the shards: the index (when sharded), the config files, and removal of what an
    earlier save left that this one replaced."""
    sharded = len(file_names) > 1
    index_name = _core.index_file_name(weights_name, variant)
    if sharded:
        text = _core.render_index_json(dump_json(index_meta), weight_map)
        _core.write_bytes_atomic(directory / index_name, text.encode(), fsync=fsync_enabled())
        result.files.append(index_name)
    for name, text in json_files.items():
        _core.write_bytes_atomic(directory / name, text.encode(), fsync=fsync_enabled())
        result.files.append(name)
    _remove_stale(directory, weights_name, variant, set(file_names), sharded, index_name)


def _write_safetensors(
    state_dict: dict[str, torch.Tensor],
    keys: list[str],
    dtypes: list[str],
    shards: list[list[int]],
    file_names: list[str],
    directory: Path,
    header_meta: dict[str, str],
    result: SaveResult,
    bar: Any,
    hashes: dict[str, str] | None = None,
) -> None:
    """Writes the shards, batching calls so accelerator tensors reach the host a batch at a time;
    records each file's sha256 in ``hashes`` when given (hashed while writing)."""
    on_host = all(state_dict[k].device.type == "cpu" for k in keys)
    batch: list[tuple[Path, list[tuple[str, str, list[int], Any]], dict[str, str]]] = []
    batch_bytes = 0

    def flush() -> None:
        nonlocal batch, batch_bytes
        if batch and hashes is not None:
            written = _core.write_shards(batch, fsync=fsync_enabled(), checksums=True)
            result.total_bytes += sum(size for size, _ in written)
            hashes.update((path.name, digest) for (path, _, _), (_, digest) in zip(batch, written, strict=True))
        elif batch:
            result.total_bytes += sum(_core.write_shards(batch, fsync=fsync_enabled()))
            if bar is not None:
                bar.update(len(batch))
        batch, batch_bytes = [], 0

    for idx, fname in zip(shards, file_names, strict=True):
        tensors = []
        for i in idx:
            t = state_dict[keys[i]]
            tensors.append((keys[i], dtypes[i], list(t.shape), byte_view(t)))
            batch_bytes += t.numel() * t.element_size()
        batch.append((directory / fname, tensors, header_meta))
        # Host tensors are written in one call (shards in parallel), or shard by shard when a
        # progress bar is shown; device tensors a batch at a time so host memory stays bounded.
        if (on_host and bar is not None) or (not on_host and batch_bytes >= _DEVICE_BATCH_BYTES):
            flush()
    flush()


def write_checksums(directory: Path, hashes: dict[str, str] | None, result: SaveResult) -> None:
    """Writes ``checksums.sha256`` for ``hashes``, or, when None, removes one left by an earlier
    save (it would no longer match)."""
    path = directory / CHECKSUMS_NAME
    if hashes is None:
        if path.is_file():
            path.unlink()
        return
    _core.write_bytes_atomic(path, render_checksums(hashes).encode(), fsync=fsync_enabled())
    result.files.append(CHECKSUMS_NAME)


def _remove_stale(
    directory: Path, weights_name: str, variant: str | None, keep: set[str], sharded: bool, index_name: str
) -> None:
    """Deletes weights of an earlier save that this save did not rewrite: shards (as the
    references do), a stale index after an unsharded save, and a stale single file after a
    sharded save (the references keep it, and loaders then read the old weights)."""
    base = _core.add_variant(weights_name, variant)
    stem, ext = os.path.splitext(base)
    for entry in directory.iterdir():
        name = entry.name
        if name in keep or not entry.is_file() or not name.endswith(ext) or not name.startswith(stem):
            continue
        if _SHARD_RE.fullmatch(name[: -len(ext)]) is not None:
            entry.unlink()
    stale = directory / (base if sharded else index_name)
    if stale.name not in keep and stale.is_file():
        stale.unlink()
