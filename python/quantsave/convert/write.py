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
from quantsave.checkpoint.writer import (
    CheckpointFiles,
    SaveResult,
    finish_checkpoint,
    progress_bar,
    timed,
    write_checksums,
)
from quantsave.convert.made import run_made
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
    made: list[tuple[Any, ...]] = []  # ops over tensors made in Python (source.derived)
    made_bytes: list[int] = []
    for op in out.ops:
        nbytes = len(op[1]) if op[0] == "bytes" else _core.dtype_nbytes(*source.tensors[op[2]][1:])
        if op[0] != "bytes" and op[2] in source.derived:
            made.append(op)
            made_bytes.append(nbytes)
        else:
            ops.append(_rust_op(op, shard_of, source.names))
            op_bytes.append(nbytes)

    index_meta = {"total_parameters": out.parameters} if family is TRANSFORMERS else {}
    files = CheckpointFiles(meta, index_meta, json_files)
    if ranks is not None:
        result = _write_across(
            ranks, source, out, dst, plan, files, ops, op_bytes, made, made_bytes, progress, checksums
        )
        result.seconds = time.perf_counter() - t0
        return result
    result = SaveResult(directory=dst, files=list(file_names), num_shards=len(plan.shards))
    # Everything is written into a staging folder that replaces `dst` in one atomic step.
    with staged_directory(dst, fsync=fsync_enabled(), rewritten=file_names) as stage:
        bar = _bar(progress, sum(op_bytes) + sum(made_bytes))
        # With made tensors, Python creates the files and writes them into the ones the Rust
        # converter fills (attached); otherwise the converter creates the files itself.
        writers = [
            _core.StreamWriter(stage / fname, tensors, header, shared=True)
            for fname, (tensors, header) in zip(file_names, shard_specs, strict=True)
        ] if made else []  # fmt: skip
        try:
            conversion = _core.Conversion(
                [str(f) for f in source.files],
                [(stage / fname, *spec) for fname, spec in zip(file_names, shard_specs, strict=True)],
                ops,
                chunk_elems=CHUNK_ELEMS,
                fsync=fsync_enabled(),
                temps=[w.temp_path for w in writers] if made else None,  # type: ignore[misc]
            )
            with timed("write"):
                sizes = _run(conversion, bar)
                if made:
                    run_made(source, made, lambda target: writers[shard_of[target]], bar)
                    sizes = [w.finish(fsync=fsync_enabled()) for w in writers]
            result.total_bytes = sum(sizes)
        finally:
            for w in writers:
                w.abort()
            if bar is not None:
                bar.close()
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
    made: list[tuple[Any, ...]],
    made_bytes: list[int],
    progress: bool | None,
    checksums: bool,
) -> SaveResult:
    """The conversion across ranks: the same plan on every rank (checked), the ops split by the
    bytes they read, each rank's ``Conversion`` filling the shared files."""
    from quantsave.distributed.group import balance
    from quantsave.distributed.save import SharedFiles, write_shared

    ranks.agree({"plan": [plan.keys, plan.shards, plan.file_names, plan.total_size]}, "plans")
    owners = balance(op_bytes + made_bytes, ranks.size)
    mine = [op for op, o in zip(ops, owners[: len(ops)], strict=True) if o == ranks.rank]
    mine_made = [op for op, o in zip(made, owners[len(ops) :], strict=True) if o == ranks.rank]
    total = sum(b for b, o in zip(op_bytes + made_bytes, owners, strict=True) if o == ranks.rank)
    shard_of = {k: s for s, (_, names) in enumerate(plan.shard_keys()) for k in names}
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
        bar = _bar(progress if ranks.rank == 0 else False, total)
        try:
            with timed("write"):
                _run(conversion, bar)
                run_made(source, mine_made, lambda target: shared.writer(shard_of[target]), bar)
        finally:
            if bar is not None:
                bar.close()

    return write_shared(ranks, dst, plan, specs, files, checksums, fill)


def _rust_op(op: tuple[Any, ...], shard_of: dict[str, int], names: dict[str, str]) -> _core.ConvertOp:
    """The Rust converter's op for a planned op (see ``convert.output``; ``names``: source keys
    to their tensors' names in the files, where they differ)."""
    kind = op[0]
    if kind != "bytes":
        op = (*op[:2], names.get(op[2], op[2]), *op[3:])
    if kind == "copy":
        _, file, name, target, cast = op
        return _core.ConvertOp.copy(file=file, name=name, shard=shard_of[target], target=target, cast=cast)
    if kind == "bytes":
        _, data, target = op
        return _core.ConvertOp.bytes(data=data, shard=shard_of[target], target=target)
    if kind == "quant4":
        _, file, name, qt, bs, packed, absmax, nested, cast, transposed = op
        return _core.ConvertOp.quant4(
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
    _, file, name, rows, cols, weight, scb, cast, transposed = op
    return _core.ConvertOp.int8(
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


def _bar(progress: bool | None, total: int) -> Any:
    """A byte progress bar over the conversion when asked, or by default on a TTY (or None)."""
    return progress_bar(sys.stderr.isatty() if progress is None else progress, total, "Converting", unit="B")


def _run(conversion: _core.Conversion, bar: Any) -> list[int]:
    """Runs the conversion (without the GIL), updating ``bar`` (a tqdm bar or None) with the bytes read."""
    if bar is None:
        return conversion.run()
    start = bar.n
    sizes: list[int] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            sizes.extend(conversion.run())
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(e)

    thread = threading.Thread(target=work, name="quantsave-convert", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
        bar.update(start + conversion.progress() - bar.n)
    if errors:
        raise errors[0]
    return sizes
