"""The writer: puts a ``CheckpointPlan`` on disk inside a staging folder — the shards (safetensors
through the Rust writer, shards in parallel, or the pickle form), their checksums, the index,
the config files — and removes what an earlier save left that this one replaced. Knows nothing
about backends: the caller hands it tensors, header metadata and the files' text."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from quantsave import _core
from quantsave.checkpoint.checksums import CHECKSUMS_NAME, render_checksums
from quantsave.checkpoint.commit import fsync_enabled
from quantsave.checkpoint.names import add_variant
from quantsave.checkpoint.plan import CheckpointPlan
from quantsave.checkpoint.tensors import byte_view, is_wrapper_subclass

__all__ = [
    "CheckpointFiles",
    "SaveResult",
    "ShardTensors",
    "finish_checkpoint",
    "progress_bar",
    "timed",
    "timings",
    "write_checksums",
    "write_shards",
]

#: Host bytes gathered per write call for tensors that live on an accelerator.
_DEVICE_BATCH_BYTES = 1 << 30
_SHARD_RE = re.compile(r"(.*?)-\d{5}-of-\d{5}")
#: The phase seconds being collected (see ``timings``), or None.
_TIMINGS: ContextVar[dict[str, float] | None] = ContextVar("quantsave_timings", default=None)


@contextmanager
def timings() -> Iterator[dict[str, float]]:
    """Collects the seconds of the ``timed`` phases run inside the block (``SaveResult.timings``)."""
    collected: dict[str, float] = {}
    token = _TIMINGS.set(collected)
    try:
        yield collected
    finally:
        _TIMINGS.reset(token)


@contextmanager
def timed(phase: str) -> Iterator[None]:
    """Adds the block's seconds to ``phase`` in the ``timings`` being collected, if any."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        collected = _TIMINGS.get()
        if collected is not None:
            collected[phase] = collected.get(phase, 0.0) + time.perf_counter() - t0


@dataclass
class SaveResult:
    """What a save wrote."""

    directory: Path
    files: list[str] = field(default_factory=list)
    total_bytes: int = 0
    num_shards: int = 0
    seconds: float = 0.0
    #: Where a conversion's seconds went, on this process: ``plan`` (reading the source and
    #: planning the output), ``offsets`` (the double-quant pass over the weights), ``write``
    #: (reading, quantizing and writing the tensors), ``commit`` (the rest: completing the
    #: files, the index and config files, the atomic commit). Under ``torch.distributed``,
    #: ``offsets`` and ``write`` time this rank's share of the work; the waits for the other
    #: ranks fall in ``plan`` and ``commit``. Empty for ``save_quantized`` and a pipeline
    #: folder's ``convert``.
    timings: dict[str, float] = field(default_factory=dict)

    def __repr__(self) -> str:
        return (
            f"SaveResult({self.directory}: {self.num_shards} shard(s), {len(self.files)} files, "
            f"{self.total_bytes} bytes, {self.seconds:.3f} s)"
        )


@dataclass
class CheckpointFiles:
    """What a checkpoint holds besides its tensors."""

    #: String metadata of every shard header (``{"format": "pt"}`` first).
    header_metadata: dict[str, str]
    #: The index's ``metadata`` besides ``total_size`` (written only when sharded).
    index_metadata: dict[str, Any]
    #: Text files beside the weights (``config.json``, ...): name -> content.
    json_files: dict[str, str]


def progress_bar(enabled: bool | None, total: int, desc: str, unit: str = "shard") -> Any:
    """A tqdm bar, or None (``enabled=None``: when there is more than one step and stderr is a TTY)."""
    if enabled is None:
        enabled = total > 1 and sys.stderr.isatty()
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B")


@dataclass(frozen=True)
class ShardTensors:
    """The tensors a plan names, their safetensors dtype names and every header's metadata."""

    state_dict: dict[str, torch.Tensor]
    dtypes: dict[str, str]
    header_metadata: dict[str, str]


def write_shards(
    stage: Path,
    plan: CheckpointPlan,
    tensors: ShardTensors,
    result: SaveResult,
    *,
    safe_serialization: bool = True,
    checksums: bool = False,
    progress: bool | None = None,
) -> dict[str, str] | None:
    """Writes the plan's shards into ``stage``; returns each file's sha256 when ``checksums``."""
    bar = progress_bar(progress, len(plan.shards), "Writing shards")
    hashes: dict[str, str] = {}
    try:
        if safe_serialization:
            _write_safetensors(stage, plan, tensors, result, bar, hashes if checksums else None)
        else:
            _write_pickles(stage, plan, tensors.state_dict, result, bar)
            if checksums:
                paths = [str(stage / f) for f in plan.file_names]
                hashes.update(zip(plan.file_names, _core.sha256_files(paths), strict=True))
    finally:
        if bar is not None:
            bar.close()
    result.files.extend(plan.file_names)
    return hashes if checksums else None


def _write_pickles(
    stage: Path, plan: CheckpointPlan, state_dict: dict[str, torch.Tensor], result: SaveResult, bar: Any
) -> None:
    for fname, keys in plan.shard_keys():
        # torch.save writes in place: never through a link to the previous checkpoint's file.
        (stage / fname).unlink(missing_ok=True)
        shard = {k: state_dict[k] if is_wrapper_subclass(state_dict[k]) else state_dict[k].contiguous() for k in keys}
        torch.save(shard, stage / fname)
        result.total_bytes += (stage / fname).stat().st_size
        if bar is not None:
            bar.update(1)


def _write_safetensors(
    stage: Path,
    plan: CheckpointPlan,
    tensors: ShardTensors,
    result: SaveResult,
    bar: Any,
    hashes: dict[str, str] | None,
) -> None:
    """Writes the shards, batching calls so accelerator tensors reach the host a batch at a time;
    records each file's sha256 in ``hashes`` when given (hashed while writing)."""
    state_dict, dtypes, header_metadata = tensors.state_dict, tensors.dtypes, tensors.header_metadata
    on_host = all(t.device.type == "cpu" for t in state_dict.values())
    batch: list[tuple[Path, list[tuple[str, str, list[int], Any]], dict[str, str]]] = []
    batch_bytes = 0

    def flush() -> None:
        nonlocal batch, batch_bytes
        if not batch:
            return
        if hashes is not None:
            written = _core.write_shards(batch, fsync=fsync_enabled(), checksums=True)
            result.total_bytes += sum(size for size, _ in written)
            hashes.update((path.name, digest) for (path, _, _), (_, digest) in zip(batch, written, strict=True))
        else:
            result.total_bytes += sum(_core.write_shards(batch, fsync=fsync_enabled()))
        if bar is not None:
            bar.update(len(batch))
        batch, batch_bytes = [], 0

    for fname, keys in plan.shard_keys():
        views = []
        for k in keys:
            t = state_dict[k]
            views.append((k, dtypes[k], list(t.shape), byte_view(t)))
            batch_bytes += t.numel() * t.element_size()
        batch.append((stage / fname, views, header_metadata))
        # Host tensors are written in one call (shards in parallel), or shard by shard when a
        # progress bar is shown; device tensors a batch at a time so host memory stays bounded.
        if (on_host and bar is not None) or (not on_host and batch_bytes >= _DEVICE_BATCH_BYTES):
            flush()
    flush()


def write_checksums(stage: Path, hashes: dict[str, str] | None, result: SaveResult) -> None:
    """Writes ``checksums.sha256`` for ``hashes``, or, when None, removes one left by an earlier
    save (it would no longer match)."""
    path = stage / CHECKSUMS_NAME
    if hashes is None:
        if path.is_file():
            path.unlink()
        return
    _core.write_bytes_atomic(path, render_checksums(hashes).encode(), fsync=fsync_enabled())
    result.files.append(CHECKSUMS_NAME)


def finish_checkpoint(stage: Path, plan: CheckpointPlan, files: CheckpointFiles, result: SaveResult) -> None:
    """After the shards: the index (when sharded), the config files, and removal of what an
    earlier save left that this one replaced."""
    if plan.sharded:
        index = {"metadata": {"total_size": plan.total_size, **files.index_metadata}, "weight_map": plan.weight_map()}
        text = json.dumps(index, indent=2, sort_keys=True) + "\n"
        _core.write_bytes_atomic(stage / plan.index_name, text.encode(), fsync=fsync_enabled())
        result.files.append(plan.index_name)
    for name, text in files.json_files.items():
        _core.write_bytes_atomic(stage / name, text.encode(), fsync=fsync_enabled())
        result.files.append(name)
    _remove_stale(stage, plan)


def _remove_stale(stage: Path, plan: CheckpointPlan) -> None:
    """Deletes weights of an earlier save that this save did not rewrite: shards, by transformers'
    own rule (a file starting with the weights stem whose name without extension fullmatches
    ``(.*?)-\\d{5}-of-\\d{5}``, so other variants' shards go too, as there), a stale index after an
    unsharded save, and a stale single file after a sharded save (the references keep it, and
    loaders then read the old weights)."""
    base = add_variant(plan.weights_name, plan.variant)
    stem, ext = os.path.splitext(base)
    keep = set(plan.file_names)
    for entry in stage.iterdir():
        name = entry.name
        if name in keep or not entry.is_file() or not name.endswith(ext) or not name.startswith(stem):
            continue
        if _SHARD_RE.fullmatch(name[: -len(ext)]) is not None:
            entry.unlink()
    stale = stage / (base if plan.sharded else plan.index_name)
    if stale.name not in keep and stale.is_file():
        stale.unlink()
