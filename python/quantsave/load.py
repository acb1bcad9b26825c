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
from quantsave.backends.quantizer import Quantizer
from quantsave.backends.registry import get_quantizer, record_config
from quantsave.checkpoint.reader import Checkpoint, open_checkpoint
from quantsave.conversions import apply_plan, plan_keys
from quantsave.errors import CheckpointError
from quantsave.families import DIFFUSERS, TRANSFORMERS, family_of

__all__ = ["build_skeleton", "load_checkpoint", "load_model", "load_state_dict", "materialize_buffers"]


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


def build_skeleton(directory: Path, config: dict[str, Any] | None, dtype: torch.dtype | None = None) -> nn.Module:
    """An empty model for ``config.json`` through diffusers or transformers (``dtype``: for
    diffusers, the default dtype it is built under, as ``from_pretrained(torch_dtype=...)``
    builds it, so buffers the checkpoint does not hold take it)."""
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
        previous = torch.get_default_dtype()
        try:
            if dtype is not None:
                torch.set_default_dtype(dtype)
            with _empty_weights():
                return cls.from_config(init)  # type: ignore[no-any-return]
        finally:
            torch.set_default_dtype(previous)
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
        # As transformers reads config.json: {"__float__": "Infinity"} and the like are floats.
        decode = getattr(transformers.PreTrainedConfig, "_decode_special_floats", None)
        if callable(decode):
            init = decode(init)
        if "model_type" in init:
            hf_config = transformers.AutoConfig.for_model(**init)
        else:
            hf_config = transformers.AutoConfig.from_pretrained(directory)
        if hasattr(hf_config, "quantization_config"):
            del hf_config.quantization_config
        return _from_pretrained_skeleton(cls, hf_config)
    raise ValueError(
        f"config.json in {str(directory)!r} names no diffusers or transformers class; pass the model skeleton"
    )


def _from_pretrained_skeleton(cls: Any, hf_config: Any) -> nn.Module:
    """The model as transformers' ``from_pretrained`` builds it before loading: under the
    config's dtype (its default ``dtype="auto"``) and the model class's own init contexts (wholly
    on the meta device, weights not tied yet). The buffers a checkpoint does not hold
    (non-persistent ones, e.g. sinusoidal positions) get their values after loading from the
    model's own initializer (``materialize_buffers``), as there."""
    name = getattr(hf_config, "dtype", None)
    dtype = getattr(torch, name, None) if isinstance(name, str) else name
    if not isinstance(dtype, torch.dtype):
        dtype = torch.get_default_dtype()
    # As from_pretrained's _get_dtype: the config and its sub-configs record the dtype.
    hf_config.dtype = dtype
    for key in getattr(hf_config, "sub_configs", None) or {}:
        sub = getattr(hf_config, key, None)
        if sub is not None and hasattr(sub, "dtype"):
            sub.dtype = dtype
    with contextlib.ExitStack() as stack:
        for context in cls.get_init_context(dtype, True, False, None):
            stack.enter_context(context)
        model = cls(hf_config)
        try:
            from transformers.monkey_patching import patch_output_recorders
        except ImportError:
            pass
        else:
            patch_output_recorders(model)
    return model  # type: ignore[no-any-return]


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
    quantizer = None
    if qconfig is not None:
        try:
            quantizer = get_quantizer(qconfig)
        except ValueError as e:  # a quant_method quantsave does not know
            raise CheckpointError(f"checkpoint in {path}: config.json: {e}") from e
    # Checkpoint key -> its quantized weight's module, for the tensors of multi-tensor weights.
    grouped = quantizer.weight_groups(list(state_dict)) if quantizer is not None else {}
    if model is None:
        model = build_skeleton(ckpt.directory, ckpt.config, _main_dtype(state_dict, grouped))
    if family_of(model) is TRANSFORMERS:
        # transformers' own renamings, fused experts and ignore rules, as from_pretrained applies them.
        state_dict = apply_plan(model, plan_keys(model, state_dict, grouped), state_dict)
    loaded = set(state_dict)
    if quantizer is not None:
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
    materialize_buffers(model, path)
    missing = [k for k in model.state_dict() if k not in loaded and k not in tied]
    missing += [n for n, p in model.named_parameters() if p.is_meta and n not in tied and n not in missing]
    if missing:
        raise CheckpointError(
            f"checkpoint in {path} lacks {len(missing)} weight(s) the model needs, e.g. {missing[:3]}"
        )
    if quantizer is not None:
        record_config(model, quantizer.config)
        _record_on_config(model, quantizer)
    if torch.device(device).type != "cpu":
        model = model.to(device)
    return model.eval()


def _main_dtype(state_dict: dict[str, torch.Tensor], grouped: dict[str, str]) -> torch.dtype | None:
    """The float dtype most of the checkpoint's plain values (not in ``grouped``, the quantized
    weights' tensors) are stored in: what the model was loaded as before it was saved."""
    counts: dict[torch.dtype, int] = {}
    for key, t in state_dict.items():
        if key not in grouped and t.dtype in (torch.float32, torch.bfloat16, torch.float16):
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=lambda d: counts[d]) if counts else None


def _record_on_config(model: nn.Module, quantizer: Quantizer) -> None:
    """As ``from_pretrained`` leaves a pre-quantized model: its config carries the quantization
    config (the library's own config class) and the model says it is quantized (``is_quantized``,
    ``quantization_method``)."""
    family = family_of(model)
    raw = quantizer.config_dict(family)
    try:
        if family is TRANSFORMERS:
            from transformers.quantizers.auto import AutoQuantizationConfig

            config = AutoQuantizationConfig.from_dict(raw)
            model.config.quantization_config = config  # type: ignore[union-attr]
            try:  # every PreTrainedModel's config says it is quantized (Jamba's Mamba mixer reads it)
                from transformers.quantizers.base import _assign_is_quantized
            except ImportError:
                pass
            else:
                _assign_is_quantized(model)  # type: ignore[no-untyped-call]
        elif family is DIFFUSERS:
            from diffusers.quantizers.auto import DiffusersAutoQuantizer

            config = DiffusersAutoQuantizer.from_dict(raw)  # (it returns the config)
            model.register_to_config(quantization_config=config)  # type: ignore[operator]
        else:
            return
    except (ImportError, ValueError):
        # A config the library's own loader cannot read either (e.g. optimum-quanto's, which
        # transformers refuses to serialize): there is no from_pretrained state to match; the
        # config stays recorded for quantsave (save_quantized) only.
        return
    model.is_quantized = True  # type: ignore[assignment]
    model.quantization_method = config.quant_method


def materialize_buffers(model: nn.Module, path: Path) -> None:
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
