"""Tensors a conversion makes rather than reads as stored (``Source.derived``: a single file's
key conversion replayed, a LoRA merged): each is made in Python one at a time, quantized through
the Rust codec (``quantsave.codec``, the converter's own arithmetic) and written at its place in
the files the Rust converter fills, then its source pages are released."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from quantsave import codec
from quantsave.checkpoint.tensors import NAME_TO_DTYPE, byte_view
from quantsave.units import give_back_memory

__all__ = ["made_offset", "made_weight", "run_made"]


def made_weight(source: Any, key: str, cast: str | None, transposed: bool) -> torch.Tensor:
    """The values of made tensor ``key`` in ``cast`` (a dtype name; None: as made), as the
    Linear weight ``[out, in]`` when the checkpoint stores it ``[in, out]``."""
    t: torch.Tensor = source.derived[key](NAME_TO_DTYPE[cast] if cast else None)
    return t.t().contiguous() if transposed else t.contiguous()


def made_offset(source: Any, key: str, blocksize: int, cast: str | None, transposed: bool) -> float:
    """The double-quant offset of a made weight: the mean of its blocks' absmax, as the Rust
    converter computes it for a stored one (float32 absmax, exact; torch's mean)."""
    flat = made_weight(source, key, cast, transposed).reshape(-1)
    if not flat.numel():
        return float("nan")
    short = -flat.numel() % blocksize
    blocks = (torch.nn.functional.pad(flat, (0, short)) if short else flat).view(-1, blocksize)
    absmax = torch.maximum(blocks.amax(dim=1).abs(), blocks.amin(dim=1).abs()).float()  # no copy of the weight
    source.release(key)
    give_back_memory()
    return absmax.mean().item()


def run_made(source: Any, ops: list[tuple[Any, ...]], writer_of: Callable[[str], Any], bar: Any) -> None:
    """Runs the planned ops (see ``convert.output``) whose input is a made tensor, writing each
    output through ``writer_of(target)`` (a ``StreamWriter`` of the target's shard)."""
    for op in ops:
        kind = op[0]
        if kind == "copy":  # (kind, file, name, target, cast)
            _, _, name, target, cast = op
            writer_of(target).write(target, byte_view(made_weight(source, name, cast, False)))
        elif kind == "quant4":  # (kind, file, name, qt, bs, packed, absmax, nested, cast, transposed)
            _, _, name, qt, bs, packed, absmax, nested, cast, flip = op
            weight = made_weight(source, name, cast, flip)
            double = nested is not None
            data, state = codec.quantize_4bit(weight, blocksize=bs, quant_type=qt, compress_statistics=double)
            writer_of(packed).write(packed, byte_view(data))
            writer_of(absmax).write(absmax, byte_view(state.absmax))
            if nested is not None:
                offset, nested_name = nested
                planned, now = torch.tensor(offset, dtype=torch.float32), state.offset.float()
                if not (torch.equal(planned, now) or (planned.isnan() and now.isnan())):
                    raise RuntimeError(f"{name!r} changed between the plan and the writing (its double-quant offset)")
                writer_of(nested_name).write(nested_name, byte_view(state.state2.absmax))
        else:  # int8: (kind, file, name, rows, cols, weight, scb, cast, transposed)
            _, _, name, _, _, target, scb, cast, flip = op
            q, scales = codec.quantize_8bit(made_weight(source, name, cast, flip))
            writer_of(target).write(target, byte_view(q))
            writer_of(scb).write(scb, byte_view(scales))
        source.release(name)
        give_back_memory()  # (the next tensor's buffers would otherwise stack up on the heap)
        if bar is not None:
            bar.update(source.nbytes(name))
