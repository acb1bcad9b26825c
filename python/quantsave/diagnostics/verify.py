"""What ``quantsave verify`` checks: every shard header (through the Rust reader), the index
against the shards, ``config.json`` and its ``quantization_config``, and that the tensors have
the layout of the config's method (asked of its quantizer: ``check_checkpoint``; this module
knows no backend). Problems are collected as one line each, never raised."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from quantsave.backends.config import resolve_config
from quantsave.backends.registry import get_quantizer, quantizer_classes
from quantsave.checkpoint.reader import Checkpoint, open_checkpoint

__all__ = ["verify_checkpoint"]


def verify_checkpoint(
    directory: Path, *, variant: str | None = None, progress: Callable[[Iterable[Path]], Iterable[Path]] = iter
) -> tuple[list[str], int]:
    """Checks the checkpoint in ``directory``.

    Returns:
        One line per problem found (empty when the checkpoint is sound) and the tensor count.

    Raises:
        FileNotFoundError: the folder does not exist or is not a checkpoint.
    """
    try:
        ckpt = open_checkpoint(directory, variant=variant, strict=False, confined=True, progress=progress)
    except RecursionError as e:  # json gives up on an index nested this deep
        return [f"{directory}: the shard index is not valid JSON: {e}"], 0
    return ckpt.problems + _check_config(ckpt), len(ckpt.tensors)


def _check_config(ckpt: Checkpoint) -> list[str]:
    path = ckpt.directory / "config.json"
    tensors = ckpt.tensors
    if ckpt.config is None and path.is_file():
        return []  # config.json itself is broken: the reader reported it
    raw = ckpt.config.get("quantization_config") if ckpt.config else None
    if raw is None:
        unread = [cls.quant_method for cls in quantizer_classes() if tensors and cls.needs_config(ckpt)]
        if unread:
            return [f"{path}: the tensors are {unread[0]}-quantized but config.json has no quantization_config"]
        return []
    try:
        qconfig = resolve_config(raw)
    except ValueError as e:
        return [f"{path}: quantization_config: {e}"]
    if qconfig is None:
        return []
    try:
        quantizer = get_quantizer(qconfig)
    except ValueError as e:
        return [f"{path}: quantization_config: {e}"]
    return [f"{path}: {p}" for p in quantizer.check_checkpoint(ckpt)]
