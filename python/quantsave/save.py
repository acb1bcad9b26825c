"""The save flow for one model: model -> its backend's quantizer (state dict, weight groups,
config) -> ``checkpoint.plan`` -> ``checkpoint.writer`` inside an atomic ``checkpoint.commit``."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from quantsave.backends.config import resolve_config
from quantsave.backends.quantizer import Quantizer
from quantsave.backends.registry import detect_quantizer, get_quantizer, recorded_config
from quantsave.checkpoint.commit import fsync_enabled, staged_directory
from quantsave.checkpoint.names import check_file_name
from quantsave.checkpoint.plan import parse_shard_size, plan_checkpoint, storage_units
from quantsave.checkpoint.tensors import check_tensors
from quantsave.checkpoint.writer import (
    CheckpointFiles,
    SaveResult,
    ShardTensors,
    finish_checkpoint,
    write_checksums,
    write_shards,
)
from quantsave.conversions import converted_quantized
from quantsave.errors import NotSerializableError
from quantsave.families import TRANSFORMERS, Family, family_of, is_pipeline, model_config_files, total_parameters
from quantsave.units import model_units, on_the_way, quantize_unit, quantized_parameters, whole

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from quantsave.backends.bitsandbytes.quantizer import BitsAndBytesQuantizer

__all__ = ["SaveOptions", "SaveResult", "check_serializable", "resolve_quantizer", "save_across_ranks", "save_model"]


def resolve_quantizer(model: nn.Module, quantization_config: Any) -> Quantizer | None:
    """The quantizer for ``model``: from the explicit config, the model's own record, or its layers."""
    config = resolve_config(quantization_config)
    if config is None:
        recorded = recorded_config(model)
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


def check_serializable(q: Quantizer, safe_serialization: bool) -> None:
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


@dataclass(frozen=True)
class SaveOptions:
    """The arguments of ``save_quantized`` that apply to every model a save writes."""

    quantization_config: Any = None
    safe_serialization: bool = True
    max_shard_size: int | str | None = None
    variant: str | None = None
    progress: bool | None = None
    checksums: bool = False


def save_model(
    model: nn.Module,
    save_directory: str | os.PathLike[str],
    options: SaveOptions,
    *,
    weights_name: str | None = None,
    metadata: dict[str, str] | None = None,
) -> SaveResult:
    """Saves one model (see ``quantsave.save_quantized``)."""
    t0 = time.perf_counter()
    if is_pipeline(model):
        raise ValueError("save_model saves one model; save a DiffusionPipeline with quantsave.save_quantized")
    if not isinstance(model, nn.Module):
        raise ValueError(f"expected a torch.nn.Module, got {type(model).__name__}")
    family = family_of(model)
    safe_serialization, variant = options.safe_serialization, options.variant
    quantizer = resolve_quantizer(model, options.quantization_config)
    if quantizer is not None:
        check_serializable(quantizer, safe_serialization)
    weights_name = _weights_name(family, weights_name, variant, metadata, safe_serialization)
    shard_limit = parse_shard_size(options.max_shard_size, family.default_max_shard_size)
    directory = Path(save_directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"save_directory {str(directory)!r} exists and is not a directory")

    state_dict = _state_dict(model, family, quantizer, safe_serialization)
    dtypes = check_tensors(state_dict)
    keys = list(state_dict)
    groups = quantizer.weight_groups(keys) if quantizer is not None else {}
    sizes, units = storage_units(keys, [state_dict[k] for k in keys], groups)
    plan = plan_checkpoint(keys, sizes, units, shard_limit, weights_name, variant)
    files = _checkpoint_files(model, family, quantizer, state_dict, metadata, safe_serialization)

    result = SaveResult(directory=directory, num_shards=len(plan.shards))
    # Everything is written into a staging folder that replaces `directory` in one atomic step.
    with staged_directory(directory, fsync=fsync_enabled(), rewritten=plan.file_names) as stage:
        tensors = ShardTensors(state_dict, dtypes, files.header_metadata)
        hashes = write_shards(
            stage, plan, tensors, result,
            safe_serialization=safe_serialization, checksums=options.checksums, progress=options.progress,
        )  # fmt: skip
        write_checksums(stage, hashes, result)
        finish_checkpoint(stage, plan, files, result)
    result.seconds = time.perf_counter() - t0
    return result


def save_across_ranks(
    model: nn.Module,
    save_directory: str | os.PathLike[str],
    options: SaveOptions,
    group: Any,
    weights_name: str | None = None,
    metadata: dict[str, str] | None = None,
) -> SaveResult:
    """Saves one model on every rank of ``group`` (see ``quantsave.distributed.save``)."""
    from quantsave.distributed.save import save_across_ranks as save

    t0 = time.perf_counter()
    result = save(model, Path(save_directory), options, group, weights_name=weights_name, metadata=metadata)
    result.seconds = time.perf_counter() - t0
    return result


def _weights_name(
    family: Family, weights_name: str | None, variant: str | None, metadata: Any, safe_serialization: bool
) -> str:
    """The weights file name, after checking the naming arguments."""
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
    return weights_name


def _state_dict(
    model: nn.Module, family: Family, quantizer: Quantizer | None, safe_serialization: bool
) -> dict[str, torch.Tensor]:
    targets = on_the_way(model, quantizer)
    if targets:
        # A float model with a bitsandbytes config: its layers quantized on the way, one at a
        # time, into the state dict ``quantize`` + ``save_quantized`` writes.
        config = cast("BitsAndBytesQuantizer", quantizer).config
        state = dict(model.state_dict())
        state_dict = {}
        for unit in model_units(model, state, targets, config):
            if unit.module is None:
                state_dict[unit.keys[0]] = whole(state[unit.keys[0]])
            else:
                state_dict.update(quantize_unit(model, unit, {k: whole(state[k]) for k in unit.sources}, config))
    elif quantizer is None:
        state_dict = dict(model.state_dict())
    elif safe_serialization:
        state_dict = quantizer.state_dict(model, family)
    else:
        state_dict = quantizer.pickle_state_dict(model, family)
    if family is TRANSFORMERS:
        grouped = quantizer.weight_groups(list(state_dict)) if quantizer is not None else {}
        merged = converted_quantized(model, grouped)
        if merged:
            raise NotSerializableError(
                f"transformers loaded {len(merged)} quantized tensor(s), e.g. {merged[:2]}, by splitting one "
                "checkpoint tensor into several quantized Linear layers; saving would concatenate their "
                "quantization states into a folder no loader reads (transformers' own save_pretrained writes "
                "that). Nothing was written."
            )
        state_dict = _transformers_state_dict(model, state_dict)
    return state_dict


def _checkpoint_files(
    model: nn.Module,
    family: Family,
    quantizer: Quantizer | None,
    state_dict: dict[str, torch.Tensor],
    metadata: dict[str, str] | None,
    safe_serialization: bool,
) -> CheckpointFiles:
    """Header metadata, index metadata and config files (called after ``quantizer.state_dict``)."""
    header = {"format": "pt"}
    if quantizer is not None:
        header.update(quantizer.header_metadata(state_dict))
    if metadata:
        header.update(metadata)
    json_files = model_config_files(model, family, quantizer.config_dict(family) if quantizer is not None else None)
    if quantizer is not None:
        json_files.update(quantizer.extra_files(model, family))
    return CheckpointFiles(header, _index_meta(model, family, quantizer, safe_serialization), json_files)


def _index_meta(
    model: nn.Module, family: Family, quantizer: Quantizer | None, safe_serialization: bool
) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    if family is TRANSFORMERS:
        targets = on_the_way(model, quantizer)
        if targets:
            config = cast("BitsAndBytesQuantizer", quantizer).config
            meta["total_parameters"] = quantized_parameters(model, targets, config)
        else:
            meta["total_parameters"] = total_parameters(model)
    if quantizer is not None and safe_serialization:
        meta.update(quantizer.index_metadata(family))
    return meta
