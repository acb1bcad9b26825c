"""``quantize``: quantize a model's ``nn.Linear`` layers in place and record the config so
``save_quantized`` needs no arguments. bitsandbytes: the layers become bitsandbytes layers (built
by ``quantsave.backends.bitsandbytes.modules``: CPU weights quantized by the Rust codec,
bit-compatible with bitsandbytes, weights on an accelerator by bitsandbytes). torchao: torchao's
``quantize_`` on the same layers; optimum-quanto: its ``quantize`` and ``freeze``."""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from quantsave.backends.bitsandbytes.config import BitsAndBytesConfig
from quantsave.backends.bitsandbytes.modules import import_bnb, linear_4bit, linear_8bit
from quantsave.backends.config import resolve_config
from quantsave.backends.modules import as_linear, is_conv1d, plain_type, replace_module
from quantsave.backends.quanto.config import QuantoConfig
from quantsave.backends.registry import record_config
from quantsave.backends.torchao.config import TorchAoConfig
from quantsave.families import DIFFUSERS, TRANSFORMERS, family_of

__all__ = ["bnb_targets", "quantize", "transformers_should_convert"]


_BOUNDARY = r"(?:(?<=\.)|(?=\.|$))"


def transformers_should_convert(name: str, patterns: list[str]) -> bool:
    """transformers' rule for ``modules_to_not_convert``: a pattern skips ``name`` when it
    matches from the start up to a module boundary (as a regex: ``layers.*`` skips
    ``layers.11.attn``, ``mlp.gate`` does not skip ``mlp.gate_proj``) or is a suffix of it."""
    return not any(re.match(rf"(?:{p}){_BOUNDARY}", name) or name.endswith(p) for p in patterns)


def bnb_targets(
    model: nn.Module, config: BitsAndBytesConfig, modules_to_not_convert: list[str] | None = None
) -> list[str]:
    """The names of the Linear layers bitsandbytes quantization replaces, in module order, by the
    rule of the model's library:

    - transformers: ``plain_type(m) is nn.Linear`` unless a ``modules_to_not_convert`` pattern matches;
      the patterns are the config's ``llm_int8_skip_modules`` (or, when it is None, the tied
      weights, the module of the last parameter and the output embeddings) plus the model's
      ``_keep_in_fp32_modules``. GPT-2 style ``Conv1D`` layers are quantized too, as the Linear
      they stand for (their weight transposed).
    - diffusers: ``isinstance(m, nn.Linear)`` unless its name is listed, or a listed name equals
      the full name or is followed by a dot inside it (``llm_int8_skip_modules`` plus the model's
      ``_keep_in_fp32_modules``).
    - other modules: ``plain_type(m) is nn.Linear`` minus the listed names (exact, prefix, suffix or
      name part) and the output embeddings when the model has ``get_output_embeddings``.

    ``modules_to_not_convert`` adds names to skip in every case.
    """
    extra = list(modules_to_not_convert or [])
    family = family_of(model)
    fp32 = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    if family is TRANSFORMERS:
        skip = config.llm_int8_skip_modules
        patterns = (_transformers_default_skips(model) if skip is None else []) + list(skip or []) + fp32 + extra
        names = []
        for name, m in model.named_modules():
            if not name or not transformers_should_convert(name, patterns):
                continue
            if plain_type(m) is nn.Linear or is_conv1d(m):
                names.append(name)
        return names
    if family is DIFFUSERS:
        listed = [k for k in list(config.llm_int8_skip_modules or []) + fp32 + extra if k is not None]
        return [
            name
            for name, m in model.named_modules()
            if name
            and isinstance(m, nn.Linear)
            and name.rpartition(".")[2] not in listed
            and not any(k + "." in name or k == name for k in listed)
        ]
    skip = _skip_list(model, extra, config.llm_int8_skip_modules, skip_output=True)
    return [
        name for name, m in model.named_modules() if plain_type(m) is nn.Linear and name and not _skipped(name, skip)
    ]


def _transformers_default_skips(model: nn.Module) -> list[str]:
    """transformers' ``get_keys_to_not_convert``: tied weights, the module of the last
    parameter and the output embeddings."""
    keys: set[str] = set()
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    keys |= set(tied) | set(tied.values())
    params = [n for n, _ in model.named_parameters()]
    if params:
        keys.add(params[-1])
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    if output is not None:
        keys |= {n for n, m in model.named_modules() if m is output}
    return sorted({k.removesuffix(".weight") for k in keys})


def _skipped(name: str, skip: list[str]) -> bool:
    return any(name == s or name.startswith(s + ".") or name.endswith("." + s) or s in name.split(".") for s in skip)


def quantize(
    model: nn.Module, quantization_config: Any, *, modules_to_not_convert: list[str] | None = None
) -> nn.Module:
    """Quantizes ``model`` in place and returns it.

    Args:
        model: any module; its ``nn.Linear`` layers are replaced.
        quantization_config: a bitsandbytes or torchao config (quantsave, diffusers or transformers object, or dict).
        modules_to_not_convert: names (or name parts) of Linear layers to keep in float; the config's
            ``llm_int8_skip_modules`` (``modules_to_not_convert``), the model's
            ``_keep_in_fp32_modules`` and, as transformers does, its output embeddings (``lm_head``)
            are skipped too.

    Raises:
        ValueError: a config quantsave cannot apply.
    """
    config = resolve_config(quantization_config)
    if isinstance(config, TorchAoConfig):
        return _quantize_torchao(model, config, list(modules_to_not_convert or []))
    if isinstance(config, QuantoConfig):
        return _quantize_quanto(model, config, list(modules_to_not_convert or []))
    if not isinstance(config, BitsAndBytesConfig) or config.bits == 0:
        method = config.method if config is not None else None
        raise ValueError(
            f"quantize supports bitsandbytes 4-bit and 8-bit, torchao and optimum-quanto configs, got {method!r}"
        )
    import_bnb()
    names = bnb_targets(model, config, modules_to_not_convert)
    # bnb_targets lists nn.Linear layers (and transformers' Conv1D, seen as one).
    targets = [(name, as_linear(model.get_submodule(name))) for name in names]
    for name, lin in targets:
        new = linear_4bit(lin, config) if config.bits == 4 else linear_8bit(lin, config)
        replace_module(model, name, new)
    record_config(model, config)
    return model


def _quantize_torchao(model: nn.Module, config: TorchAoConfig, skip: list[str]) -> nn.Module:
    """torchao's ``quantize_`` over the model's ``nn.Linear`` layers, skipping what diffusers and
    transformers skip: ``modules_to_not_convert``, ``_keep_in_fp32_modules`` and, for
    transformers models, the output embeddings."""
    try:
        from torchao.quantization import quantize_
    except ImportError as e:
        raise ImportError("torchao quantization needs torchao: pip install 'torchao>=0.16'") from e
    skip = _skip_list(
        model, skip, config.modules_to_not_convert, skip_output=not config.include_input_output_embeddings
    )
    quantize_(
        model,
        config.quant_type,
        filter_fn=lambda m, fqn: plain_type(m) is nn.Linear and bool(fqn) and not _skipped(fqn, skip),
    )
    record_config(model, config)
    return model


def _skip_list(model: nn.Module, skip: list[str], config_skip: list[str] | None, *, skip_output: bool) -> list[str]:
    """The caller's and the config's names, the model's ``_keep_in_fp32_modules`` and, as
    transformers does, its output embeddings."""
    skip = skip + list(config_skip or []) + list(getattr(model, "_keep_in_fp32_modules", None) or [])
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    if output is not None and skip_output:
        skip += [n for n, m in model.named_modules() if m is output]
    return skip


def _quantize_quanto(model: nn.Module, config: QuantoConfig, skip: list[str]) -> nn.Module:
    """optimum-quanto weight-only quantization of the model's ``nn.Linear`` layers (only Linear
    layers: the diffusers format has no place for quanto's other layer types), then ``freeze``."""
    from quantsave.backends.quanto.quantizer import QuantoQuantizer, import_quanto, qtype_name

    quanto = import_quanto()
    skip = _skip_list(model, skip, config.modules_to_not_convert, skip_output=True)
    names = [n for n, m in model.named_modules() if plain_type(m) is nn.Linear and n and not _skipped(n, skip)]
    if names:
        quanto.quantize(model, weights=quanto.qtypes[qtype_name(config.weights_dtype)], include=names)
        quanto.freeze(model)
    record_config(model, QuantoQuantizer.config_from_model(model))
    return model
