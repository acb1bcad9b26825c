"""Converting one model: the quantization config checked, the quantized Linear layers found (the
model passed in, the static reading, or a meta skeleton), the output planned and written."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantsave.backends.bitsandbytes.config import BitsAndBytesConfig
from quantsave.backends.bitsandbytes.quantizer import BitsAndBytesQuantizer
from quantsave.backends.config import resolve_config
from quantsave.checkpoint.writer import SaveResult
from quantsave.convert.output import model_order, output_dtype, parameter_count, plan_output
from quantsave.convert.source import read_source, static_config_files, static_targets
from quantsave.convert.write import write_conversion
from quantsave.families import DIFFUSERS, TRANSFORMERS, family_of, model_config_files
from quantsave.load import build_skeleton
from quantsave.quantize import bnb_targets

__all__ = ["bnb_config", "convert_model"]


def bnb_config(quantization_config: Any) -> BitsAndBytesConfig:
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


def convert_model(
    path: Path,
    dst: Path,
    config: BitsAndBytesConfig,
    model: nn.Module | None,
    max_shard_size: int | str | None,
    progress: bool | None,
    checksums: bool = False,
) -> SaveResult:
    t0 = time.perf_counter()
    source = read_source(path)
    if source.config is not None and source.config.get("quantization_config") is not None:
        method = source.config["quantization_config"].get("quant_method")
        raise ValueError(f"{str(path)!r} is already quantized ({method})")
    if dst.resolve() == source.folder.resolve():
        raise ValueError("dst must differ from the source folder (the source files are read while writing)")
    if dst.exists() and not dst.is_dir():
        raise NotADirectoryError(f"dst {str(dst)!r} exists and is not a directory")
    quantizer = BitsAndBytesQuantizer(config)

    layout = None if model is not None else static_targets(source, config, max_shard_size)
    if layout is not None:
        family, targets, order = TRANSFORMERS, layout, list(source.tensors)
        json_files = static_config_files(source, quantizer)
    else:
        if model is None:
            model = build_skeleton(source.folder, source.config)
        family = family_of(model)
        if family is DIFFUSERS and "_name_or_path" not in model.config:  # type: ignore[operator]
            # diffusers' from_pretrained records the source, and save_pretrained writes it.
            model.register_to_config(_name_or_path=str(path))  # type: ignore[operator]
        order = model_order(model, family, source)
        targets = [t for t in bnb_targets(model, config) if f"{t}.weight" in source.tensors]
        json_files = model_config_files(
            model, family, quantizer.config_dict(family), dtype=output_dtype(model, source, set(targets))
        )
    out = plan_output(source, order, set(targets), config)
    if model is not None and family is TRANSFORMERS:  # built above whenever there is no static layout
        out.parameters = parameter_count(model, source, set(targets), config)
    return write_conversion(source, out, family, dst, quantizer, json_files, max_shard_size, progress, checksums, t0)
