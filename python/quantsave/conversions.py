"""transformers' own key rules, applied to checkpoint names without loading the tensors: the
renamings and weight conversions of ``get_model_conversion_mapping`` (legacy names,
``base_model_prefix`` added or stripped, per-expert weights fused into one parameter) forward for
loading and converting, reversed (``revert_weight_conversion``) for the names and order a save
writes, and the model's ``_keys_to_ignore_on_load_unexpected`` rules for keys it drops."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from quantsave.errors import CheckpointError

__all__ = ["Fused", "KeyPlan", "apply_plan", "converted_quantized", "plan_keys", "realize", "saved_layout"]


@dataclass
class Fused:
    """One model parameter built from several checkpoint tensors (e.g. every expert's
    ``gate_proj``/``up_proj`` weight stacked and concatenated into ``experts.gate_up_proj``) by
    transformers' ``WeightConverter``: the converter and its sources, in the order it collects them."""

    converter: Any
    sources: list[tuple[str, str]] = field(default_factory=list)  # (checkpoint key, source pattern)


def converted_quantized(model: nn.Module, grouped: Iterable[str]) -> list[str]:
    """The tensors of quantized weights (``grouped``: state-dict keys of multi-tensor weights)
    that one of the model's load-time converters would merge back on save. transformers' save
    then concatenates quantization states (a checkpoint tensor split into several quantized
    Linear layers on load, e.g. a fused ``qkv`` or ``in_proj``), and the folder it writes does
    not load back, so such a save is refused."""
    conversions = getattr(model, "_weight_conversions", None)
    if not conversions or not _transformers_model(model):
        return []
    from transformers.core_model_loading import WeightConverter, apply_converters

    reversed_ = [r for c in conversions[::-1] if isinstance(r := c.reverse_transform(), WeightConverter)]
    return [k for k in grouped if apply_converters(k, reversed_)[1] is not None]


@dataclass
class KeyPlan:
    """Where each checkpoint key goes in the model, as ``from_pretrained`` decides."""

    renamed: dict[str, str] = field(default_factory=dict)  # checkpoint key -> model key (1:1)
    fused: dict[str, Fused] = field(default_factory=dict)  # model key -> its sources
    ignored: list[str] = field(default_factory=list)  # keys the model's rules drop on load
    unexpected: list[str] = field(default_factory=list)  # keys the model has no place for
    used: list[Any] = field(default_factory=list)  # the transforms that matched (the model's _weight_conversions)


def _transformers_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


def _natural_key(name: str) -> Any:
    from transformers.core_model_loading import dot_natural_key

    return dot_natural_key(name)


def plan_keys(model: nn.Module, keys: Iterable[str], owners: Mapping[str, str] | None = None) -> KeyPlan:
    """Maps checkpoint ``keys`` onto ``model``'s state dict the way transformers' loader does
    (``rename_source_key`` with the model's conversion mapping, then its ignore rules).

    ``owners`` maps the tensors of a quantized weight (``m.weight``, ``m.weight.absmax``, ...)
    to their module ``m``: they follow the module's float weight (renamed with it, never fused)."""
    plan = KeyPlan()
    keys = list(keys)
    if not _transformers_model(model):
        plan.renamed = {k: k for k in keys}
        return plan
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    mapping = get_model_conversion_mapping(model)  # type: ignore[arg-type]
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    expected = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None) or None
    owners = owners or {}

    def rename(key: str) -> tuple[str, str | None]:
        new, pattern = rename_source_key(key, renamings, converters, prefix, expected)
        if new not in expected and key in expected:  # as the loader: keep the name, fix the prefix only
            new, pattern = rename_source_key(key, [], [], prefix, expected)
        return new, pattern

    for key in sorted(keys, key=_natural_key):
        module = owners.get(key)
        if module is not None:
            new, pattern = rename(f"{module}.weight")
            if pattern is None and new.endswith(".weight") and new in expected:
                plan.renamed[key] = new.removesuffix(".weight") + key[len(module) :]
                continue
        new, pattern = rename(key)
        if new not in expected:
            if pattern is None and _quantized_state_of(new, expected):
                plan.renamed[key] = new  # the quantization state of a weight the model has
                continue
            plan.unexpected.append(key)
        elif pattern is not None:
            fused = plan.fused.setdefault(new, Fused(copy.deepcopy(by_pattern[pattern])))
            fused.sources.append((key, pattern))
        else:
            plan.renamed[key] = new
    plan.used = [t for t in mapping if t.was_used()]
    if plan.unexpected:
        from transformers.utils.loading_report import LoadStateDictInfo

        info = LoadStateDictInfo(
            missing_keys=set(),
            unexpected_keys=set(plan.unexpected),
            mismatched_keys=set(),
            error_msgs=[],
            conversion_errors={},
            skipped_pp_keys=set(),
        )
        model._adjust_missing_and_unexpected_keys(info)  # type: ignore[operator]
        plan.ignored = [k for k in plan.unexpected if k not in info.unexpected_keys]
        plan.unexpected = [k for k in plan.unexpected if k in info.unexpected_keys]
    return plan


def _quantized_state_of(key: str, expected: Mapping[str, Any]) -> bool:
    """True when ``key`` (a model name) is a tensor a quantized weight keeps beside itself: under
    ``m.weight.`` (bitsandbytes' 4-bit state, quanto's parts) or ``m.SCB`` / ``m.weight_format``
    (bitsandbytes' int8), for a weight ``m.weight`` the model has."""
    at = key.find(".weight.")
    while at != -1:
        if key[: at + len(".weight")] in expected:
            return True
        at = key.find(".weight.", at + 1)
    module, _, leaf = key.rpartition(".")
    return leaf in ("SCB", "weight_format") and f"{module}.weight" in expected


def realize(model: nn.Module, key: str, fused: Fused, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The fused parameter ``key`` built from its checkpoint tensors by transformers' converter."""
    converter = copy.deepcopy(fused.converter)
    for source, pattern in fused.sources:
        converter.add_tensor(key, source, pattern, tensors[source])
    realized = converter.convert(key, model=model, config=getattr(model, "config", None))
    value = realized[key]
    return value[0] if isinstance(value, list) else value  # type: ignore[no-any-return]


def apply_plan(model: nn.Module, plan: KeyPlan, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under the model's names (renamed, fused, ignored ones dropped;
    unexpected ones kept under their own names for the caller to report), and the model's
    ``_weight_conversions`` recorded as ``from_pretrained`` records them, so that a later save
    writes the checkpoint's names again."""
    out = {plan.renamed.get(k, k): t for k, t in state_dict.items() if k in plan.renamed or k in plan.unexpected}
    for key, fused in plan.fused.items():
        try:
            out[key] = realize(model, key, fused, state_dict)
        except (RuntimeError, ValueError, KeyError) as e:
            sources = [k for k, _ in fused.sources]
            raise CheckpointError(
                f"transformers' conversion of {sources[:3]} into {key!r} fails on these tensors: {e}"
            ) from e
    if _transformers_model(model):
        model._weight_conversions = list(plan.used)  # type: ignore[assignment]
    return out


def saved_layout(
    model: nn.Module, plan: KeyPlan, keys: Mapping[str, tuple[torch.dtype, list[int]]]
) -> list[tuple[str, str | None, int, int]]:
    """What transformers' ``save_pretrained`` of the loaded model writes for the model-named
    tensors ``keys`` (name -> dtype, shape): in its order (``revert_weight_conversion``), each entry
    ``(saved name, model key, storage id, storage bytes)``. The model key is None for a tensor
    its converters split back out of a fused parameter (such tensors share a storage, which
    huggingface_hub's shard splitter counts once and keeps in one shard). Computed on the meta
    device."""
    from transformers.core_model_loading import revert_weight_conversion

    tensors = {k: torch.empty(shape, dtype=dtype, device="meta") for k, (dtype, shape) in keys.items()}
    owner = {id(t): k for k, t in tensors.items()}
    saved_conversions = getattr(model, "_weight_conversions", None)
    model._weight_conversions = list(plan.used)  # type: ignore[assignment]
    try:
        reverted = revert_weight_conversion(model, dict(tensors))  # type: ignore[arg-type]
    finally:
        model._weight_conversions = saved_conversions  # type: ignore[assignment]
    layout = []
    for name, t in reverted.items():
        storage = t.untyped_storage()
        layout.append((name, owner.get(id(t)), storage._cdata, storage.nbytes()))
    return layout
