"""Saving a diffusers ``DiffusionPipeline``: ``model_index.json`` as ``pipe.save_pretrained``
writes it, one subfolder per component; quantized models (and those a per-component config
names) through quantsave's model save, everything else (schedulers, tokenizers, processors,
unquantized models) through its own ``save_pretrained``."""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn

from quantsave import _core
from quantsave.backends.config import resolve_config
from quantsave.backends.registry import detect_quantizer, recorded_config
from quantsave.checkpoint.commit import fsync_enabled
from quantsave.checkpoint.names import check_file_name
from quantsave.families import family_of
from quantsave.save import SaveOptions, SaveResult, save_model

__all__ = ["component_configs", "is_component_mapping", "save_pipeline"]


def is_component_mapping(quantization_config: Any) -> bool:
    """True for per-component configs: a diffusers ``PipelineQuantizationConfig``, or a mapping
    from component names to configs (a plain dict config has a ``quant_method`` key instead)."""
    if callable(getattr(quantization_config, "_resolve_quant_config", None)):
        return True
    return isinstance(quantization_config, Mapping) and "quant_method" not in quantization_config


def component_configs(quantization_config: Any, libraries: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Per-component configs from a mapping ``{component: config}`` or a diffusers
    ``PipelineQuantizationConfig``: with ``quant_mapping``, or with ``quant_backend`` /
    ``quant_kwargs`` / ``components_to_quantize``, resolved by diffusers' own rule for each
    component of ``libraries`` (component name -> "diffusers" or "transformers").

    Raises:
        ValueError: anything else (a single config does not say which components it is for).
    """
    if quantization_config is None:
        return {}
    mapping = getattr(quantization_config, "quant_mapping", None)
    resolve = getattr(quantization_config, "_resolve_quant_config", None)
    if mapping is None and callable(resolve):
        # The global form: diffusers decides which components get which backend's config.
        mapping = {}
        for name, library in (libraries or {}).items():
            config = resolve(is_diffusers=library == "diffusers", module_name=name)
            if config is not None:
                mapping[name] = config
    if mapping is None and isinstance(quantization_config, Mapping):
        mapping = quantization_config
    if not isinstance(mapping, Mapping):
        raise ValueError(
            "for a pipeline, quantization_config must map component names to configs "
            "(e.g. {'transformer': BitsAndBytesConfig(...)}) or be a diffusers PipelineQuantizationConfig"
        )
    out = {}
    for name, config in mapping.items():
        if not isinstance(name, str):
            raise ValueError(f"component names must be strings, got {name!r}")
        out[name] = resolve_config(config)
    return out


def _is_quantized(model: nn.Module) -> bool:
    return (
        recorded_config(model) is not None
        or getattr(model, "hf_quantizer", None) is not None
        or detect_quantizer(model) is not None
    )


def _saved_components(pipe: Any) -> dict[str, Any]:
    """The components ``save_pretrained`` would save: registered in the pipeline's config,
    expected by its constructor, and not an absent optional component."""
    expected, _ = pipe._get_signature_keys(pipe)
    optional = set(getattr(pipe, "_optional_components", []) or [])
    out = {}
    for name, value in dict(pipe.config).items():
        if name.startswith("_") or name not in expected:
            continue
        if name in optional and isinstance(value, (list, tuple)) and value and value[0] is None:
            continue
        component = getattr(pipe, name, None)
        if component is not None:
            out[name] = component
    return out


def _own_save(
    component: Any, directory: Path, safe_serialization: bool, variant: str | None, max_shard_size: Any
) -> None:
    """``component.save_pretrained`` with the arguments it accepts, as diffusers passes them."""
    save = getattr(component, "save_pretrained", None)
    if not callable(save):
        raise ValueError(f"pipeline component {type(component).__name__} has no save_pretrained")
    params = inspect.signature(save).parameters
    kwargs: dict[str, Any] = {}
    if "safe_serialization" in params:
        kwargs["safe_serialization"] = safe_serialization
    if "variant" in params:
        kwargs["variant"] = variant
    if "max_shard_size" in params and max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    if "save_peft_format" in params:
        kwargs["save_peft_format"] = False
    save(str(directory), **kwargs)


def save_pipeline(pipe: Any, save_directory: str | os.PathLike[str], options: SaveOptions) -> SaveResult:
    """Saves a ``DiffusionPipeline`` (see ``quantsave.save_quantized``).

    A component named in ``quantization_config`` that holds no quantized layers yet is quantized
    in place with ``quantsave.quantize`` first (as ``PipelineQuantizationConfig`` quantizes it on
    load); for a quantized one, its entry overrides the config read off the model.

    Raises:
        ValueError: a mapping names a component the pipeline does not have, or a component that
            is not a model; bad names or sizes (before anything is written).
        NotSerializableError: a quantized component's backend cannot be saved (nothing is written).
    """
    t0 = time.perf_counter()
    if options.variant is not None:
        check_file_name(options.variant, "variant")
    components = _saved_components(pipe)
    libraries = {name: family_of(c).name for name, c in components.items() if isinstance(c, nn.Module)}
    configs = component_configs(options.quantization_config, libraries)
    quantized = _quantized_components(components, configs, options.safe_serialization)
    directory = Path(save_directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"save_directory {str(directory)!r} exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    result = SaveResult(directory=directory)
    for name, component in components.items():
        target = directory / name
        if name in quantized:
            if name in configs and not _is_quantized(component):
                from quantsave.quantize import quantize

                quantize(component, configs[name])
            sub = save_model(component, target, replace(options, quantization_config=configs.get(name)))
            result.files.extend(f"{name}/{f}" for f in sub.files)
            result.total_bytes += sub.total_bytes
            result.num_shards += sub.num_shards
        else:
            _own_save(component, target, options.safe_serialization, options.variant, options.max_shard_size)
            for f in sorted(target.rglob("*")):
                if f.is_file():
                    result.files.append(str(f.relative_to(directory)))
                    result.total_bytes += f.stat().st_size
    _core.write_bytes_atomic(directory / "model_index.json", pipe.to_json_string().encode(), fsync=fsync_enabled())
    result.files.append("model_index.json")
    result.seconds = time.perf_counter() - t0
    return result


def _quantized_components(
    components: dict[str, Any], configs: dict[str, Any], safe_serialization: bool
) -> dict[str, nn.Module]:
    """The components saved through quantsave (quantized, or named in ``configs``), after checking
    that ``configs`` names models of the pipeline and that every quantized one can be saved."""
    unknown = sorted(set(configs) - set(components))
    if unknown:
        raise ValueError(
            f"quantization_config names {unknown}, which the pipeline does not have; components: {sorted(components)}"
        )
    for name in configs:
        if not isinstance(components[name], nn.Module):
            raise ValueError(
                f"component {name!r} is a {type(components[name]).__name__}, not a model; it cannot be quantized"
            )
    from quantsave.save import check_serializable, resolve_quantizer

    quantized = {
        name: c for name, c in components.items() if isinstance(c, nn.Module) and (name in configs or _is_quantized(c))
    }
    for name, model in quantized.items():
        if name in configs and not _is_quantized(model):
            continue
        q = resolve_quantizer(model, configs.get(name))
        if q is not None:
            check_serializable(q, safe_serialization)
    return quantized
