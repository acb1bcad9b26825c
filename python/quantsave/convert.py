"""``convert``: turn a float safetensors checkpoint (one file or a sharded model folder) into a
pre-quantized one, as diffusers/transformers would write after quantizing on load.

This version maps the source files (no copies), builds the model on the meta device from
``config.json`` (or takes the model passed in), quantizes its Linear layers with the Rust codec
and saves through the normal save path. The float weights stay memory-mapped; the quantized
ones are held in memory until the save (a streaming, bounded-memory path is planned).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from quantsave.config.base import resolve_config
from quantsave.config.bnb import BitsAndBytesConfig
from quantsave.families import DIFFUSERS, family_of
from quantsave.load import build_skeleton, load_model, read_config
from quantsave.quantize import quantize
from quantsave.save import SaveResult, save_model

__all__ = ["convert"]


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    quantization_config: Any,
    *,
    model: nn.Module | None = None,
    max_shard_size: int | str | None = None,
    progress: bool | None = None,
) -> SaveResult:
    """Converts the float checkpoint ``src`` into a pre-quantized checkpoint in ``dst``.

    Args:
        src: a ``.safetensors`` file or a model folder (single file or sharded).
        dst: the output folder.
        quantization_config: a bitsandbytes 4-bit (nf4/fp4, double quant or not) or 8-bit config.
        model: the model skeleton (real or on the meta device); by default built from
            ``config.json`` through diffusers or transformers.
        max_shard_size: as for ``save_quantized``.
        progress: as for ``save_quantized``.

    Raises:
        ValueError: an unsupported config, an already quantized source, a pipeline folder, or a
            source that does not match the model.
        CheckpointError: a corrupt source file.
    """
    config = resolve_config(quantization_config)
    if not isinstance(config, BitsAndBytesConfig) or config.bits == 0:
        method = config.method if config is not None else None
        raise ValueError(f"convert supports bitsandbytes 4-bit and 8-bit configs, got {method!r}")
    path = Path(src)
    folder = path if path.is_dir() else path.parent
    if path.is_dir() and (path / "model_index.json").is_file():
        raise ValueError(
            f"{str(path)!r} is a pipeline folder; converting whole pipelines is not supported yet: "
            "convert its component folders (e.g. 'transformer') one by one"
        )
    source_config = read_config(folder)
    if source_config is not None and source_config.get("quantization_config") is not None:
        raise ValueError(f"{str(path)!r} is already quantized ({source_config['quantization_config'].get('quant_method')})")
    if Path(dst).resolve() == folder.resolve():
        raise ValueError("dst must differ from the source folder (the source files are read while writing)")
    if model is None:
        model = build_skeleton(folder, source_config)
    model = load_model(path, model)
    if family_of(model) is DIFFUSERS and "_name_or_path" not in model.config:  # type: ignore[operator]
        # diffusers' from_pretrained records the source, and save_pretrained writes it.
        model.register_to_config(_name_or_path=str(src))  # type: ignore[operator]
    quantize(model, config)
    return save_model(model, dst, max_shard_size=max_shard_size, progress=progress)
