"""Writing a conversion: the planned output cut into shards by ``checkpoint.plan``, the Rust
converter run over typed ``ConvertOp``s (mapped sources, chunks quantized in parallel without the
GIL, each written at its place), then ``checkpoint.writer`` for checksums, index and config files,
all inside one atomic commit."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

from quantsave import _core
from quantsave.backends.bitsandbytes.quantizer import BitsAndBytesQuantizer
from quantsave.checkpoint.commit import fsync_enabled, staged_directory
from quantsave.checkpoint.plan import CheckpointPlan, parse_shard_size, plan_checkpoint
from quantsave.checkpoint.writer import CheckpointFiles, SaveResult, finish_checkpoint, progress_bar, write_checksums
from quantsave.convert.output import Output, natural_key
from quantsave.convert.source import Source
from quantsave.families import TRANSFORMERS, Family

__all__ = ["CHUNK_ELEMS", "write_conversion"]

#: Elements per chunk of work: a few MB per thread in flight.
CHUNK_ELEMS = 1 << 22


def write_conversion(
    source: Source,
    out: Output,
    family: Family,
    dst: Path,
    quantizer: BitsAndBytesQuantizer,
    json_files: dict[str, str],
    max_shard_size: int | str | None,
    progress: bool | None,
    checksums: bool,
    t0: float,
    ranks: Any = None,
) -> SaveResult:
    """Writes the planned conversion into ``dst`` (``ranks``: a ``distributed.group.Ranks`` whose
    ranks share the work, each running the ops it owns into the shared files)."""
    # transformers saves a from_pretrained model in natural key order (its weight conversions
    # reverted), diffusers in state-dict order.
    # (saved_order puts a converted transformers model's keys in that order already.)
    keys = sorted(out.keys, key=natural_key) if family is TRANSFORMERS and not out.ordered else out.keys
    groups = {**quantizer.weight_groups(keys), **out.storages}
    sizes = [out.sizes.get(k, _core.dtype_nbytes(*out.specs[k])) for k in keys]
    limit = parse_shard_size(max_shard_size, family.default_max_shard_size)
    plan = plan_checkpoint(keys, sizes, [groups.get(k) for k in keys], limit, family.weights_name)
    file_names = plan.file_names
    shard_of = {k: s for s, (_, names) in enumerate(plan.shard_keys()) for k in names}
    meta = {"format": "pt"}
    shard_specs = [([(k, *out.specs[k]) for k in names], meta) for _, names in plan.shard_keys()]
    ops: list[_core.ConvertOp] = []
    op_bytes: list[int] = []
    for op in out.ops:
        op_bytes.append(len(op[1]) if op[0] == "bytes" else _core.dtype_nbytes(*source.tensors[op[2]][1:]))
        kind = op[0]
        if kind == "copy":
            _, file, name, target, cast = op
            ops.append(_core.ConvertOp.copy(file=file, name=name, shard=shard_of[target], target=target, cast=cast))
        elif kind == "bytes":
            _, data, target = op
            ops.append(_core.ConvertOp.bytes(data=data, shard=shard_of[target], target=target))
        elif kind == "quant4":
            _, file, name, qt, bs, packed, absmax, nested, cast, transposed = op
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
                    cast=cast,
                    transposed=transposed,
                )
            )
        else:
            _, file, name, rows, cols, weight, scb, cast, transposed = op
            ops.append(
                _core.ConvertOp.int8(
                    file=file,
                    name=name,
                    rows=rows,
                    cols=cols,
                    shard=shard_of[weight],
                    weight=weight,
                    scb=scb,
                    cast=cast,
                    transposed=transposed,
                )
            )

    index_meta = {"total_parameters": out.parameters} if family is TRANSFORMERS else {}
    files = CheckpointFiles(meta, index_meta, json_files)
    if ranks is not None:
        result = _write_across(ranks, source, out, dst, plan, files, ops, op_bytes, progress, checksums)
        result.seconds = time.perf_counter() - t0
        return result
    result = SaveResult(directory=dst, files=list(file_names), num_shards=len(plan.shards))
    # Everything is written into a staging folder that replaces `dst` in one atomic step.
    with staged_directory(dst, fsync=fsync_enabled()) as stage:
        conversion = _core.Conversion(
            [str(f) for f in source.files],
            [(stage / fname, *spec) for fname, spec in zip(file_names, shard_specs, strict=True)],
            ops,
            chunk_elems=CHUNK_ELEMS,
            fsync=fsync_enabled(),
        )
        total_in = sum(_core.dtype_nbytes(d, s) for _, d, s in source.tensors.values())
        result.total_bytes = sum(_run(conversion, progress, total_in))
        hashes = None
        if checksums:
            hashes = dict(zip(file_names, _core.sha256_files([str(stage / f) for f in file_names]), strict=True))
        write_checksums(stage, hashes, result)
        finish_checkpoint(stage, plan, files, result)
    result.seconds = time.perf_counter() - t0
    return result


def _write_across(
    ranks: Any,
    source: Source,
    out: Output,
    dst: Path,
    plan: CheckpointPlan,
    files: CheckpointFiles,
    ops: list[_core.ConvertOp],
    op_bytes: list[int],
    progress: bool | None,
    checksums: bool,
) -> SaveResult:
    """The conversion across ranks: the same plan on every rank (checked), the ops split by the
    bytes they read, each rank's ``Conversion`` filling the shared files."""
    from quantsave.distributed.group import balance
    from quantsave.distributed.save import SharedFiles, write_shared

    ranks.agree({"plan": [plan.keys, plan.shards, plan.file_names, plan.total_size]}, "plans")
    owners = balance(op_bytes, ranks.size)
    mine = [op for op, o in zip(ops, owners, strict=True) if o == ranks.rank]
    total = sum(b for b, o in zip(op_bytes, owners, strict=True) if o == ranks.rank)
    specs = {k: out.specs[k] for k in plan.keys}

    def fill(shared: SharedFiles) -> None:
        names, header = plan.file_names, shared.header
        outputs = [(shared.stage / n, spec, header) for n, spec in zip(names, shared.file_specs, strict=True)]
        conversion = _core.Conversion(
            [str(f) for f in source.files],
            outputs,
            mine,
            chunk_elems=CHUNK_ELEMS,
            fsync=fsync_enabled(),
            temps=[shared.temps[i] for i in range(len(plan.file_names))],
        )
        _run(conversion, progress if ranks.rank == 0 else False, total)

    return write_shared(ranks, dst, plan, specs, files, checksums, fill)


def _run(conversion: _core.Conversion, progress: bool | None, total: int) -> list[int]:
    """Runs the conversion (without the GIL), with a byte progress bar when asked or on a TTY."""

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
