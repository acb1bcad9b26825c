"""The load path: find the weights (single file or index + shards), validate and map every
file through the Rust reader, view tensors without copies, and rebuild quantized modules."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantsave.backends.config import QuantizationConfig, resolve_config
from quantsave.backends.registry import get_quantizer, record_config
from quantsave.checkpoint.reader import Checkpoint, open_checkpoint
from quantsave.errors import CheckpointError
from quantsave.families import TRANSFORMERS, family_of

__all__ = ["load_state_dict", "load_checkpoint", "load_model", "build_skeleton"]


def load_state_dict(
    directory: str | os.PathLike[str], *, variant: str | None = None
) -> tuple[dict[str, torch.Tensor], QuantizationConfig | None]:
    """Loads every tensor of a checkpoint folder (or a single ``.safetensors`` file) without copies.

    Returns:
        The state dict (CPU tensors viewing private memory maps of the files) and the
        checkpoint's quantization config (None for an unquantized checkpoint).

    Raises:
        CheckpointError: a corrupt, truncated or inconsistent file, naming the file and the problem.
    """
    state_dict, qconfig, _ = load_checkpoint(directory, variant=variant)
    return state_dict, qconfig


def load_checkpoint(
    directory: str | os.PathLike[str], *, variant: str | None = None
) -> tuple[dict[str, torch.Tensor], QuantizationConfig | None, dict[str, str]]:
    """``load_state_dict`` plus the shards' header metadata, merged (a later shard's entries win,
    as in the references' loaders)."""
    ckpt = open_checkpoint(directory, variant=variant, mapped=True)
    return ckpt.state_dict(), _quantization_config(ckpt), ckpt.metadata


def _quantization_config(ckpt: Checkpoint, *, qmap: bool = False) -> QuantizationConfig | None:
    """The checkpoint's ``quantization_config``; with ``qmap``, for optimum-quanto's own layout
    (no ``quantization_config``), the config its ``quanto_qmap.json`` stands for."""
    raw = ckpt.config.get("quantization_config") if ckpt.config is not None else None
    if raw is None:
        if qmap and (ckpt.directory / "quanto_qmap.json").is_file():
            from quantsave.backends.quanto.quantizer import config_from_qmap

            return config_from_qmap(ckpt.directory / "quanto_qmap.json")
        return None
    try:
        return resolve_config(raw)
    except ValueError as e:
        path = ckpt.directory / "config.json"
        raise CheckpointError(f"invalid checkpoint file {path}: quantization_config: {e}") from e


@contextlib.contextmanager
def _empty_weights() -> Iterator[None]:
    """Creates parameters on the meta device (buffers stay real), so a skeleton costs no memory."""
    original = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(self, name, param)
        p = self._parameters.get(name)
        if p is not None:
            self._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def build_skeleton(directory: Path, config: dict[str, Any] | None) -> nn.Module:
    """An empty model for ``config.json`` through diffusers or transformers."""
    if config is None:
        raise ValueError(
            f"{str(directory)!r} has no config.json to build a model from; pass the model skeleton: "
            "load_quantized(directory, model)"
        )
    if "_class_name" in config:
        try:
            import diffusers
        except ImportError as e:
            raise ImportError("building this diffusers model needs diffusers: pip install diffusers") from e
        cls = getattr(diffusers, config["_class_name"], None)
        if cls is None:
            raise ValueError(f"diffusers has no model class {config['_class_name']!r}")
        init = {k: v for k, v in config.items() if k != "quantization_config"}
        with _empty_weights():
            return cls.from_config(init)  # type: ignore[no-any-return]
    if config.get("architectures"):
        try:
            import transformers
        except ImportError as e:
            raise ImportError("building this transformers model needs transformers: pip install transformers") from e
        name = config["architectures"][0]
        cls = getattr(transformers, name, None)
        if cls is None:
            raise ValueError(f"transformers has no model class {name!r}")
        init = {k: v for k, v in config.items() if k != "quantization_config"}
        if "model_type" in init:
            hf_config = transformers.AutoConfig.for_model(**init)
        else:
            hf_config = transformers.AutoConfig.from_pretrained(directory)
        if hasattr(hf_config, "quantization_config"):
            del hf_config.quantization_config
        with _empty_weights():
            return cls._from_config(hf_config)  # type: ignore[no-any-return]
    raise ValueError(
        f"config.json in {str(directory)!r} names no diffusers or transformers class; pass the model skeleton"
    )


def load_model(
    directory: str | os.PathLike[str],
    model: nn.Module | None = None,
    *,
    device: str | torch.device = "cpu",
    variant: str | None = None,
) -> nn.Module:
    """Loads a checkpoint into ``model`` (see ``quantsave.load_quantized``)."""
    path = Path(directory)
    ckpt = open_checkpoint(path, variant=variant, mapped=True)
    state_dict, qconfig, metadata = ckpt.state_dict(), _quantization_config(ckpt, qmap=True), ckpt.metadata
    if model is None:
        model = build_skeleton(ckpt.directory, ckpt.config)
    loaded = set(state_dict)
    if qconfig is not None:
        try:
            quantizer = get_quantizer(qconfig)
        except ValueError as e:  # a quant_method quantsave does not know
            raise CheckpointError(f"checkpoint in {path}: config.json: {e}") from e
        try:
            rest = quantizer.load_into(model, state_dict, metadata, ckpt.directory)
        except CheckpointError as e:
            raise CheckpointError(f"checkpoint in {path}: {e}") from e
        loaded |= quantizer.loaded_keys
    else:
        rest = state_dict
    expected = model.state_dict()
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    unexpected = [k for k in rest if k not in expected]
    if unexpected:
        raise CheckpointError(
            f"checkpoint in {path} holds {len(unexpected)} tensor(s) the model does not have, e.g. {unexpected[:3]}"
        )
    for k, t in rest.items():
        if tuple(t.shape) != tuple(expected[k].shape):
            raise CheckpointError(
                f"checkpoint in {path}: tensor {k!r} has shape {list(t.shape)}, "
                f"the model expects {list(expected[k].shape)}"
            )
    model.load_state_dict(rest, strict=False, assign=True)
    tie_weights = getattr(model, "tie_weights", None)
    if callable(tie_weights) and hasattr(model, "config"):
        tie_weights()
    _materialize_buffers(model, path)
    missing = [k for k in model.state_dict() if k not in loaded and k not in tied]
    missing += [n for n, p in model.named_parameters() if p.is_meta and n not in tied and n not in missing]
    if missing:
        raise CheckpointError(
            f"checkpoint in {path} lacks {len(missing)} weight(s) the model needs, e.g. {missing[:3]}"
        )
    if qconfig is not None:
        record_config(model, qconfig)
    if family_of(model) is TRANSFORMERS and getattr(model, "_weight_conversions", None) is None:
        # As from_pretrained records: the checkpoint's names were used as they are (no renaming or
        # fusing), so a later save orders the tensors as transformers does after from_pretrained.
        model._weight_conversions = []  # type: ignore[assignment]
    if torch.device(device).type != "cpu":
        model = model.to(device)
    return model.eval()


def _materialize_buffers(model: nn.Module, path: Path) -> None:
    """Gives buffers left on the meta device (non-persistent ones, such as a rotary embedding's
    ``inv_freq``, of a skeleton built on meta) real values the way transformers' ``from_pretrained``
    does: moved off meta, then computed by the model's own ``initialize_weights`` with every
    loaded tensor marked as initialized.

    Raises:
        CheckpointError: a buffer that is still on meta (a model without transformers' initializer).
    """
    meta = [name for name, b in model.named_buffers() if b.is_meta]
    if not meta:
        return
    initialize = getattr(model, "initialize_weights", None)
    if family_of(model) is TRANSFORMERS and callable(initialize):
        for tensor in model.state_dict(keep_vars=True).values():
            tensor._is_hf_initialized = True
        for name in meta:
            parent, _, leaf = name.rpartition(".")
            holder = model.get_submodule(parent) if parent else model
            buffer = holder._buffers[leaf]
            if buffer is not None:
                holder._buffers[leaf] = torch.empty_like(buffer, device="cpu")
        initialize()
        meta = [name for name, b in model.named_buffers() if b.is_meta]
    if meta:
        raise CheckpointError(
            f"checkpoint in {path}: buffer(s) {meta[:3]} of the model are on the meta device and not in the "
            "checkpoint (non-persistent buffers); build the skeleton with real buffers, e.g. under "
            "accelerate.init_empty_weights(include_buffers=False)"
        )
