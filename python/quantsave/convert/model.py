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
from quantsave.backends.modules import is_conv1d
from quantsave.checkpoint.writer import SaveResult, timings
from quantsave.convert.dtypes import tensor_dtypes
from quantsave.convert.lora import LoraMerge
from quantsave.convert.output import (
    Output,
    model_order,
    output_dtype,
    parameter_count,
    plan_output,
    planned_across,
    saved_order,
    stored_dtypes,
)
from quantsave.convert.single_file import read_single_file
from quantsave.convert.source import Source, read_source, static_config_files, static_targets
from quantsave.convert.write import write_conversion
from quantsave.errors import CheckpointError
from quantsave.families import DIFFUSERS, TRANSFORMERS, Family, family_of, model_config_files
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
    torch_dtype: torch.dtype | None = None,
    ranks: Any = None,
    lora: LoraMerge | None = None,
    single_file: tuple[str | type, Any] | None = None,
) -> SaveResult:
    """Converts one model folder (``torch_dtype``: as ``convert``'s, resolved; None is the
    reference's default, see ``convert.dtypes``; ``ranks``: a ``distributed.group.Ranks`` sharing
    the work; ``lora``: the adapters merged on the way, see ``convert.lora``; ``single_file``:
    ``(model_class, model_config)`` for an original single file, see ``convert.single_file``)."""
    t0 = time.perf_counter()
    with timings() as phases:
        named = single_file is None

        def read() -> Source:
            nonlocal model
            if single_file is not None:
                source, model = read_single_file(path, *single_file)
                return source
            return read_source(path)

        if ranks is None:
            source = read()
        else:
            source = ranks.step(read, "the reading of the source")
            # Every rank must read the same files (a shared filesystem).
            seen = [(str(f.resolve()), f.stat().st_size) for f in source.files]
            ranks.agree({"source files": seen, "source tensors": sorted(source.tensors.items())}, "sources")
        quantizer = BitsAndBytesQuantizer(config)

        def plan() -> tuple[Output, Family, dict[str, str]]:
            if source.config is not None and source.config.get("quantization_config") is not None:
                method = source.config["quantization_config"].get("quant_method")
                raise ValueError(f"{str(path)!r} is already quantized ({method})")
            if dst.resolve() == source.folder.resolve():
                raise ValueError("dst must differ from the source folder (the source files are read while writing)")
            if dst.exists() and not dst.is_dir():
                raise NotADirectoryError(f"dst {str(dst)!r} exists and is not a directory")
            # The static reading answers for checkpoints whose tensors stay as stored (torch_dtype "auto").
            static = model is None and torch_dtype is None and lora is None and single_file is None
            layout = static_targets(source, config, max_shard_size) if static else None
            if layout is not None:
                out = plan_output(source, [(k, k) for k in source.tensors], set(layout), config)
                return out, TRANSFORMERS, static_config_files(source, quantizer)
            return _plan_model(path, source, config, quantizer, model, torch_dtype, named, lora)

        if ranks is None:
            out, family, json_files = plan()
        else:
            with planned_across(ranks):
                out, family, json_files = ranks.step(plan, "the planning of the conversion")
        phases["plan"] = time.perf_counter() - t0 - phases.get("offsets", 0.0)
        result = write_conversion(
            source, out, family, dst, quantizer, json_files, max_shard_size, progress, checksums, t0, ranks
        )
        phases["commit"] = max(0.0, result.seconds - sum(phases.values()))
        result.timings = dict(phases)
    return result


def _plan_model(
    path: Path,
    source: Source,
    config: BitsAndBytesConfig,
    quantizer: BitsAndBytesQuantizer,
    model: nn.Module | None,
    torch_dtype: torch.dtype | None,
    named: bool = True,
    lora: LoraMerge | None = None,
) -> tuple[Output, Family, dict[str, str]]:
    """The output planned from the model (the one passed in, or a meta skeleton for the source's
    config): its names for the checkpoint's tensors, its quantized Linear layers, its config files."""
    if model is None:
        model = build_skeleton(source.folder, source.config)
    family = family_of(model)
    if named and family is DIFFUSERS and "_name_or_path" not in model.config:  # type: ignore[operator]
        # diffusers' from_pretrained records the source, and save_pretrained writes it
        # (from_single_file does not).
        model.register_to_config(_name_or_path=str(path))  # type: ignore[operator]
    order = model_order(model, family, source)
    provided = order.model_keys
    targets = {t for t in bnb_targets(model, config) if f"{t}.weight" in provided or f"{t}.weight" in order.plan.fused}
    fused = sorted(t for t in targets if f"{t}.weight" in order.plan.fused)
    if fused:
        raise CheckpointError(
            f"checkpoint in {source.folder}: transformers builds the quantized Linear weight(s) {fused[:3]} by fusing "
            "several checkpoint tensors; convert cannot stream such a weight (load it with from_pretrained)"
        )
    stored = stored_dtypes(source, order)
    dtypes = tensor_dtypes(model, family, source, stored, torch_dtype)
    written = {**stored, **dtypes.tensors}
    json_files = model_config_files(
        model, family, quantizer.config_dict(family), dtype=output_dtype(model, written, targets)
    )
    conv1d = {n for n, m in model.named_modules() if is_conv1d(m)}  # GPT-2's: weights stored [in, out]
    if lora is not None:
        lora.apply(source, model, family is DIFFUSERS, order.model_keys, config, conv1d, targets)
    out = plan_output(source, order.pairs, targets, config, dtypes, conv1d & targets)
    if family is TRANSFORMERS:
        out.parameters = parameter_count(model, targets, config)
        saved_order(model, source, order, out, dtypes)
    return out, family, json_files
