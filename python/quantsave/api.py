"""The public functions: ``save_quantized``, ``load_quantized``, ``load_state_dict``."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from quantsave.backends.config import QuantizationConfig
from quantsave.checkpoint.checksums import check_checksums
from quantsave.checkpoint.reader import open_checkpoint
from quantsave.distributed.group import active_group
from quantsave.errors import CheckpointError
from quantsave.families import is_pipeline
from quantsave.load import load_model
from quantsave.load import load_state_dict as _load_state_dict
from quantsave.pipeline import save_pipeline
from quantsave.save import SaveOptions, SaveResult, save_across_ranks, save_model

__all__ = ["save_quantized", "load_quantized", "load_state_dict"]


def save_quantized(
    model_or_pipeline: nn.Module,
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
    process_group: Any = None,
) -> SaveResult:
    """Saves a quantized (or plain) model as a checkpoint ``from_pretrained`` loads as pre-quantized.

    Args:
        model_or_pipeline: a diffusers or transformers model, any ``nn.Module``, or a diffusers
            ``DiffusionPipeline`` (``model_index.json`` plus one subfolder per component:
            quantized models through quantsave, the rest through their own ``save_pretrained``).
        save_directory: target folder (created if missing).
        quantization_config: overrides the config read off the model (quantsave, diffusers or
            transformers config object, or dict). For a pipeline: a mapping from component
            name to config, or a diffusers ``PipelineQuantizationConfig`` with ``quant_mapping``;
            a named component that is not quantized yet is quantized in place first.
        safe_serialization: safetensors (default) or the pickle ``.bin`` form.
        max_shard_size: bytes or a string like ``"5GB"`` (decimal units); default ``"10GB"`` for
            diffusers and plain modules, ``"50GB"`` for transformers models.
        variant: inserted before the extension (``model.fp16.safetensors``).
        weights_name: the weights file name (default by family).
        metadata: extra string metadata for every shard header.
        progress: show a progress bar (default: when writing several shards to a terminal).
        checksums: also record each weights file's sha256 (hashed while writing) in
            ``checksums.sha256``, checked by ``load_quantized(..., verify=True)`` and
            ``quantsave verify --checksums``; for a pipeline, in each component folder quantsave
            writes.
        process_group: the ``torch.distributed`` group whose ranks save together (default: the
            default group, when ``torch.distributed`` is initialized with more than one rank).
            Every rank of the group makes the same call; parameters may be ``DTensor``s (FSDP2,
            tensor parallel) or replicated tensors; each tensor is written by one rank and the
            folder is byte for byte the single-process one. A float model with a bitsandbytes
            ``quantization_config`` is quantized on the way. Exchanges between ranks time out
            after ``QUANTSAVE_DIST_TIMEOUT`` seconds (default 600).

    Returns:
        A ``SaveResult`` listing the files written, bytes, shards and seconds.

    Raises:
        NotSerializableError: the quantization backend cannot be saved (nothing is written).
        DistributedError: across ranks, another rank failed (it is named), the ranks' calls
            differ, or a rank stopped answering; nothing is committed.
        ValueError: bad input (meta, sparse or shared tensors, bad names or sizes), before writing.
        OSError: the folder cannot be written; no partial file is left behind.
    """
    options = SaveOptions(quantization_config, safe_serialization, max_shard_size, variant, progress, checksums)
    group = active_group(process_group)
    if group is not None:
        return save_across_ranks(model_or_pipeline, save_directory, options, group, weights_name, metadata)
    if is_pipeline(model_or_pipeline):
        if weights_name is not None or metadata is not None:
            raise ValueError("weights_name and metadata apply to a single model, not to a pipeline")
        return save_pipeline(model_or_pipeline, save_directory, options)
    return save_model(model_or_pipeline, save_directory, options, weights_name=weights_name, metadata=metadata)


def load_quantized(
    directory: str | os.PathLike[str],
    model: nn.Module | None = None,
    *,
    device: str | torch.device = "cpu",
    variant: str | None = None,
    verify: bool = False,
) -> nn.Module:
    """Loads a checkpoint into ``model``, swapping in the quantized modules its config calls for.

    Args:
        directory: the checkpoint folder.
        model: an un-quantized skeleton (real or on the meta device). When None, it is built
            from ``config.json`` through diffusers or transformers.
        device: where the loaded model goes.
        variant: the weights variant to load.
        verify: first check every weights file against the sha256 recorded at save time
            (``checksums=True``).

    Raises:
        CheckpointError: a corrupt file, tensors that do not match the model, or with
            ``verify=True`` a checksum mismatch or no recorded checksums.
    """
    if verify:
        found = open_checkpoint(directory, variant=variant, headers=False)
        problems = check_checksums(found.directory, found.files)
        if problems:
            raise CheckpointError(f"checkpoint in {found.directory} fails its checksums: " + "; ".join(problems))
    return load_model(directory, model, device=device, variant=variant)


def load_state_dict(
    directory: str | os.PathLike[str], *, variant: str | None = None
) -> tuple[dict[str, torch.Tensor], QuantizationConfig | None]:
    """Every tensor of a checkpoint (memory-mapped, no copies) and its quantization config."""
    return _load_state_dict(directory, variant=variant)
