"""Model families (diffusers, transformers, plain ``nn.Module``): how each names its files,
its default shard size, and the ``config.json`` it writes. Checked by class hierarchy so neither
library has to be installed."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

from torch import nn

from quantsave.backends.bitsandbytes import layout as bnb_layout
from quantsave.backends.modules import plain_type

__all__ = ["FAMILIES", "Family", "dump_json", "family_of", "is_pipeline", "model_config_files", "total_parameters"]


def dump_json(data: Any) -> str:
    """JSON as diffusers and transformers write it: ``indent=2, sort_keys=True`` plus a newline."""
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


@dataclass(frozen=True)
class Family:
    name: str
    weights_name: str
    bin_weights_name: str
    default_max_shard_size: str


DIFFUSERS = Family("diffusers", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", "10GB")
TRANSFORMERS = Family("transformers", "model.safetensors", "pytorch_model.bin", "50GB")
PLAIN = Family("plain", "model.safetensors", "pytorch_model.bin", "10GB")
FAMILIES = (DIFFUSERS, TRANSFORMERS, PLAIN)


def _derives(obj: Any, module_prefix: str, class_name: str) -> bool:
    return any(c.__name__ == class_name and c.__module__.startswith(module_prefix) for c in type(obj).__mro__)


def family_of(model: nn.Module) -> Family:
    """The family ``model`` belongs to."""
    if _derives(model, "diffusers", "ModelMixin"):
        return DIFFUSERS
    if _derives(model, "transformers", "PreTrainedModel"):
        return TRANSFORMERS
    return PLAIN


def is_pipeline(obj: Any) -> bool:
    """True for a diffusers ``DiffusionPipeline``."""
    return _derives(obj, "diffusers", "DiffusionPipeline")


def model_config_files(
    model: nn.Module, family: Family, quant_dict: dict[str, Any] | None, *, dtype: Any = None
) -> dict[str, str]:
    """The JSON files (name -> text) the family writes beside the weights, with
    ``quantization_config`` set to ``quant_dict`` (removed when None). ``dtype`` stands in for
    the model's dtype (transformers records it) when the weights written are not the model's."""
    files: dict[str, str] = {}
    if family is DIFFUSERS:
        cfg = json.loads(model.to_json_string())  # type: ignore[operator]
        # The class name, not that of FSDP2's wrapper class (``FSDPFluxTransformer2DModel``).
        cfg["_class_name"] = plain_type(model).__name__
        files["config.json"] = dump_json(_with_quant(cfg, quant_dict))
    elif family is TRANSFORMERS:
        # A transformers ``PretrainedConfig``; transformers is optional, so it stays untyped here.
        config: Any = copy.deepcopy(model.config)
        # As transformers' save_pretrained: record the weights dtype and the architecture.
        config.dtype = str(dtype if dtype is not None else model.dtype).split(".")[1]
        config.architectures = [plain_type(model).__name__]
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            # The caller's dict (or none) takes the config's place; the dtype is never written.
            if attr in config.__dict__:
                delattr(config, attr)
        cfg = json.loads(config.to_json_string(use_diff=True))
        files["config.json"] = dump_json(_with_quant(cfg, quant_dict))
        gen = getattr(model, "generation_config", None)
        can_generate = getattr(model, "can_generate", None)
        if gen is not None and callable(can_generate) and can_generate():
            files["generation_config.json"] = gen.to_json_string(use_diff=True)
    elif quant_dict is not None:
        files["config.json"] = dump_json({"quantization_config": quant_dict})
    return files


def total_parameters(model: nn.Module) -> int:
    """The parameter count transformers records in its index: a packed 4-bit weight counts two
    values per stored byte (``bitsandbytes.layout.parameter_count``), whether or not the model
    came from ``from_pretrained``."""
    return sum(bnb_layout.parameter_count(p) for p in model.parameters())


def _with_quant(cfg: dict[str, Any], quant_dict: dict[str, Any] | None) -> dict[str, Any]:
    cfg.pop("_pre_quantization_dtype", None)
    cfg.pop("quantization_config", None)
    if quant_dict is not None:
        cfg["quantization_config"] = quant_dict
    return cfg
