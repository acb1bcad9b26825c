"""LoRA adapters merged into their base weights while ``convert`` streams them, before quantizing.

Reading follows the references, through their own helpers:

- a **PEFT adapter** (``adapter_config.json`` + ``adapter_model.safetensors``) for a transformers
  model, as ``PeftModel.from_pretrained(base, adapter).merge_and_unload()`` reads it: peft's
  ``LoraConfig`` (``r``, ``lora_alpha``, rank and alpha patterns matched by peft's
  ``get_pattern_key``, ``use_rslora``, DoRA), keys ``base_model.model.<module>.lora_A.weight``, the
  adapter weights in float32 (peft's ``autocast_adapter_dtype``);
- a **diffusers LoRA file** (diffusers, PEFT, kohya ``lora_unet_...`` or another format) for a
  diffusers model, as ``pipeline.load_lora_weights(file)`` then ``fuse_lora(lora_scale=scale)``:
  the ``lora_state_dict`` of the LoRA loader of the pipelines built on the model class converts
  the keys, diffusers' ``convert_unet_state_dict_to_peft`` and ``_create_lora_config`` make the
  config, the adapter weights take the model's dtype, the scale multiplies peft's scaling.

Each merge runs peft's own ``lora.Linear.merge`` on one weight at a time (the weight, cast to the
dtype it is quantized from, is the base layer's weight), so the arithmetic is the reference's.
``lora_merge="quantized"`` merges onto dequantize(quantize(W)) instead (the QLoRA-consistent merge).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantsave import codec
from quantsave.checkpoint.reader import open_checkpoint
from quantsave.errors import CheckpointError

__all__ = ["LoraMerge", "LoraSpec", "lora_merge_of"]

logger = logging.getLogger("quantsave")

LoraSpec = str | os.PathLike[str] | tuple[str | os.PathLike[str], float]

MERGES = ("float", "quantized")

_ADAPTER = "quantsave"


@dataclass
class _Module:
    """One module's adapter: peft's config for it and its weights as stored."""

    config: Any  # peft.LoraConfig
    r: int
    alpha: float
    down: torch.Tensor  # lora_A: [r, in]
    up: torch.Tensor  # lora_B: [out, r]
    magnitude: torch.Tensor | None
    scale: float
    adapter_dtype: torch.dtype | None  # None: the base weight's dtype (diffusers)
    diffusers: bool
    origin: str


def lora_merge_of(lora: Sequence[LoraSpec] | LoraSpec | None, merge: str) -> LoraMerge | None:
    """The merge ``convert(lora=..., lora_merge=...)`` asks for (None: no adapters).

    Raises:
        ValueError: an unknown ``lora_merge`` or a malformed ``lora``.
    """
    if merge not in MERGES:
        raise ValueError(f"lora_merge must be one of {MERGES}, got {merge!r}")
    if lora is None or (isinstance(lora, list | tuple) and not lora):
        return None
    specs: list[tuple[Path, float]] = []
    items: Sequence[Any] = [lora] if isinstance(lora, str | os.PathLike) or _is_pair(lora) else lora
    for item in items:
        if isinstance(item, str | os.PathLike):
            specs.append((Path(item), 1.0))
        elif _is_pair(item):
            specs.append((Path(item[0]), float(item[1])))
        else:
            raise ValueError(f"lora= takes paths or (path, scale) pairs, got {item!r}")
    return LoraMerge(specs, merge)


def _is_pair(item: Any) -> bool:
    return (
        isinstance(item, tuple)
        and len(item) == 2
        and isinstance(item[0], str | os.PathLike)
        and isinstance(item[1], int | float)
        and not isinstance(item[1], bool)
    )


class LoraMerge:
    """The adapters of one conversion; ``apply`` turns the merged weights of a source into made
    tensors (``Source.derived``)."""

    def __init__(self, specs: list[tuple[Path, float]], merge: str, component: tuple[Any, str] | None = None) -> None:
        self.specs, self.merge = specs, merge
        #: In a pipeline folder: the pipeline's LoRA loader mixin and the component's name (its
        #: prefix in a diffusers LoRA file).
        self.component = component
        #: How many weights the adapters were merged into (a pipeline's components count in
        #: the merge they were made from).
        self.merged = 0
        self._parent: LoraMerge | None = None
        #: In a pipeline folder with a UNet: its config, which the pipeline's LoRA loader reads
        #: (SGM block names are mapped with it).
        self.unet_config: Any = None
        for path, _ in specs:
            if not path.exists():
                raise FileNotFoundError(f"LoRA adapter {str(path)!r} does not exist")

    def __repr__(self) -> str:
        return f"LoraMerge({[(str(p), s) for p, s in self.specs]!r}, {self.merge!r})"

    def for_component(self, pipeline: str | None, name: str, unet_config: Any = None) -> LoraMerge | None:
        """The merge for component ``name`` of a pipeline folder whose ``model_index.json``
        names ``pipeline``: the LoRA files' parts with the component's prefix, as the pipeline's
        ``load_lora_weights`` routes them (None when the pipeline loads no LoRA into it;
        ``unet_config``: the pipeline's UNet config, when it has one)."""
        mixin = _pipeline_mixin(pipeline)
        if name not in getattr(mixin, "_lora_loadable_modules", ()):
            return None
        child = LoraMerge(self.specs, self.merge, (mixin, name))
        child._parent, child.unet_config = self, unet_config
        return child

    def check_pipeline(self, pipeline: str | None, converted: list[str], present: list[str],
                       unet_config: Any = None) -> None:  # fmt: skip
        """Raises when the pipeline loads no LoRAs at all, or when a LoRA has weights for a
        component of ``present`` that the conversion copies rather than converts (the
        reference would change it; the copy would not)."""
        mixin = _pipeline_mixin(pipeline)
        if mixin is None:
            raise ValueError(f"lora=: diffusers' {pipeline} does not load LoRA weights")
        copied = [c for c in getattr(mixin, "_lora_loadable_modules", ()) if c in present and c not in converted]
        for path, _ in self.specs:
            origin = repr(str(path))
            for component in copied:
                parts, _, _ = _load(mixin, _lora_file(path, origin), origin, component, False, unet_config)
                if parts:
                    raise ValueError(
                        f"LoRA {origin} has weights for {component!r}, which this conversion copies unchanged; "
                        f"convert it too (components=[..., {component!r}]) or use a LoRA without them"
                    )

    def apply(self, source: Any, model: nn.Module, diffusers: bool, model_keys: dict[str, str],
              quantization: Any, transposed: set[str], targets: set[str]) -> None:  # fmt: skip
        """Makes every weight an adapter targets a merged tensor of ``source`` (``model_keys``:
        model key -> checkpoint key; ``quantization``: the bitsandbytes config, for
        ``lora_merge="quantized"``, which round-trips only the quantized ``targets`` modules;
        ``transposed``: modules storing their weight ``[in, out]``).

        Raises:
            CheckpointError: an adapter names a module the model does not have or one without a
                2-D weight, or its ranks or shapes do not match.
        """
        merges: dict[str, list[_Module]] = {}
        for path, scale in self.specs:
            if diffusers:
                modules = _read_diffusers(path, model, scale, self.component, self.unet_config)
            elif self.component is not None:
                modules = _read_text_encoder(path, model, scale, self.component, self.unet_config)
            else:
                modules = _read_peft(path, scale)
            for name, m in modules.items():
                key = model_keys.get(f"{name}.weight")
                if key is None:
                    raise CheckpointError(f"LoRA {m.origin}: adapter for {name!r}, which the model has no weight for")
                shape = source.tensors[key][2]
                if len(shape) != 2:
                    raise CheckpointError(
                        f"LoRA {m.origin}: {name!r} has a {len(shape)}-D weight; only Linear weights merge"
                    )
                out_f, in_f = (shape[1], shape[0]) if name in transposed else (shape[0], shape[1])
                if m.down.dim() != 2 or m.up.dim() != 2 or m.down.shape[0] != m.r or m.up.shape[1] != m.r:
                    raise CheckpointError(
                        f"LoRA {m.origin}: {name!r} has lora_A {list(m.down.shape)} and lora_B {list(m.up.shape)}, "
                        f"not rank {m.r} as its config says"
                    )
                if m.down.shape[1] != in_f or m.up.shape[0] != out_f:
                    raise CheckpointError(
                        f"LoRA {m.origin}: {name!r} maps {m.down.shape[1]} -> {m.up.shape[0]} features, "
                        f"the weight {key!r} is [{out_f}, {in_f}]"
                    )
                merges.setdefault(key, []).append(m)
        (self._parent or self).merged += len(merges)
        flipped = {model_keys[f"{m}.weight"] for m in transposed if f"{m}.weight" in model_keys}
        quantized = {model_keys[f"{m}.weight"] for m in targets if f"{m}.weight" in model_keys}
        for key, adapters in merges.items():
            merge = self.merge if key in quantized else "float"  # a weight kept in float merges in float
            source.derived[key] = _merged(source, key, adapters, merge, quantization, key in flipped)
            if merge == "quantized" and quantization.bits == 4:
                source.quantized_as[key] = functools.partial(quantized_merge_dtype, adapters)


def _merged(source: Any, key: str, modules: list[_Module], merge: str, quantization: Any,
            fan_in_fan_out: bool) -> Callable[[torch.dtype | None], torch.Tensor]:  # fmt: skip
    before = source.derived.get(key)

    def make(dtype: torch.dtype | None) -> torch.Tensor:
        weight: torch.Tensor
        if before is not None:
            weight = before(dtype)
        else:
            stored = source.mapped(source.names.get(key, key))
            weight = stored.to(dtype=dtype or stored.dtype, copy=True)
        for m in modules:
            if merge == "quantized":
                weight = _merge_one(_round_trip(weight, quantization, fan_in_fan_out), m, fan_in_fan_out, quantization)
            else:
                weight = _merge_one(weight, m, fan_in_fan_out)
        return weight

    return make


def quantized_merge_dtype(modules: list[Any], weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype a 4-bit weight comes out of ``lora_merge="quantized"`` in, as peft's
    ``Linear4bit.merge`` makes it: the dequantized weight plus each delta, type-promoted
    (float32 adapters, as ``PeftModel`` loads them, make a float32 weight)."""
    dtype = weight_dtype
    for m in modules:
        dtype = torch.promote_types(dtype, m.adapter_dtype or dtype)
    return dtype


def _round_trip(weight: torch.Tensor, config: Any, fan_in_fan_out: bool) -> torch.Tensor:
    """dequantize(quantize(W)) with the conversion's quantization, as bitsandbytes' dequantize
    gives it to peft's merge of a quantized layer: 4-bit in W's dtype, 8-bit in float32."""
    w = weight.t().contiguous() if fan_in_fan_out else weight
    if config.bits == 4:
        packed, state = codec.quantize_4bit(
            w, quant_type=config.bnb_4bit_quant_type, compress_statistics=config.bnb_4bit_use_double_quant
        )
        back = codec.dequantize_4bit(packed, state)
    else:
        q, scb = codec.quantize_8bit(w)
        back = codec.dequantize_8bit(q, scb)
    return back.t().contiguous() if fan_in_fan_out else back


def _merge_one(weight: torch.Tensor, m: _Module, fan_in_fan_out: bool, quantized: Any = None) -> torch.Tensor:
    """``weight`` with the adapter merged by peft's own ``lora.Linear.merge``; ``quantized``
    (the bitsandbytes config): ``weight`` is the dequantized one and the sum is made as peft's
    ``Linear4bit.merge`` / ``Linear8bitLt.merge`` make it (a new tensor, type-promoted)."""
    from peft.tuners.lora import Linear as LoraLinear

    out_f, in_f = m.up.shape[0], m.down.shape[1]
    with torch.device("meta"):
        base = nn.Linear(in_f, out_f, bias=False)
    base.weight = nn.Parameter(weight, requires_grad=False)
    config = m.config
    if getattr(config, "fan_in_fan_out", False) != fan_in_fan_out:
        config = _replace(config, fan_in_fan_out=fan_in_fan_out)
    layer = LoraLinear(base, _ADAPTER, config=config, r=m.r, lora_alpha=m.alpha)  # type: ignore[arg-type]
    dtype = m.adapter_dtype or weight.dtype
    with torch.no_grad():
        layer.lora_A[_ADAPTER].weight.data = m.down.to(dtype)
        layer.lora_B[_ADAPTER].weight.data = m.up.to(dtype)
        if m.magnitude is not None:
            layer.lora_magnitude_vector[_ADAPTER].weight.data = m.magnitude.to(dtype)
        if m.diffusers:
            layer.scale_layer(m.scale)  # diffusers' fuse_lora(lora_scale=...)
        elif m.scale != 1.0:
            layer.set_scale(_ADAPTER, m.scale)
        if quantized is not None:
            variant = layer.lora_variant.get(_ADAPTER)
            if variant is not None:  # DoRA
                out: torch.Tensor = variant.merge_safe(layer, _ADAPTER, weight)
                return out
            delta = layer.get_delta_weight(_ADAPTER)
            if quantized.bits == 4:
                return weight + delta
            return weight.to(delta.dtype) + delta
        layer.merge(adapter_names=[_ADAPTER])
    merged: torch.Tensor = layer.get_base_layer().weight.data  # type: ignore[assignment]
    return merged


def _replace(config: Any, **changes: Any) -> Any:
    import copy

    c = copy.copy(config)
    for k, v in changes.items():
        setattr(c, k, v)
    return c


# -- PEFT adapters (transformers models) ------------------------------------------------------


def _read_peft(path: Path, scale: float) -> dict[str, _Module]:
    """A PEFT adapter folder (or its weights file with ``adapter_config.json`` beside it), keyed
    by the model's module names."""
    try:
        from peft import LoraConfig
    except ImportError as e:
        raise ImportError("merging a LoRA adapter needs peft: pip install peft") from e
    folder = path if path.is_dir() else path.parent
    weights = path if path.is_file() else folder / "adapter_model.safetensors"
    if not (folder / "adapter_config.json").is_file() or not weights.is_file():
        raise ValueError(
            f"LoRA {str(path)!r}: a transformers model takes a PEFT adapter (adapter_config.json and "
            "adapter_model.safetensors)"
        )
    raw = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    if raw.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"LoRA {str(path)!r}: a {raw.get('peft_type')} adapter, not LoRA")
    config = LoraConfig.from_pretrained(str(folder))
    tensors = open_checkpoint(weights).state_dict()
    return _modules(tensors, "base_model.model.", config, scale, torch.float32, False, repr(str(path)))


def _group(tensors: dict[str, torch.Tensor], prefix: str, origin: str) -> dict[str, dict[str, torch.Tensor]]:
    """Adapter tensors by module: ``{module: {"A": ..., "B": ..., "magnitude": ...}}``."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        name = key.removeprefix(prefix)
        for suffix, part in ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_magnitude_vector.weight", "M"),
                             (".lora_magnitude_vector", "M")):  # fmt: skip
            if name.endswith(suffix):
                grouped.setdefault(name[: -len(suffix)], {})[part] = t
                break
        else:
            if ".lora_B.bias" in name:
                raise ValueError(f"LoRA {origin}: lora_bias adapters are not supported yet ({key!r})")
            if ".base_layer." in name or ".modules_to_save." in name or ".lora_embedding_" in name:
                raise ValueError(
                    f"LoRA {origin}: the adapter stores whole weights or embedding adapters ({key!r}: "
                    "modules_to_save, embedding layers); only LoRA on Linear layers is supported yet"
                )
            raise CheckpointError(f"LoRA {origin}: tensor {key!r} is not a LoRA weight (lora_A, lora_B, magnitude)")
    return grouped


def _modules(tensors: dict[str, torch.Tensor], prefix: str, config: Any, scale: float,
             adapter_dtype: torch.dtype | None, diffusers: bool, origin: str) -> dict[str, _Module]:  # fmt: skip
    """The adapter of each module (keys ``<prefix><module>.lora_A.weight``, ...), its rank and
    alpha resolved from ``config``'s patterns as peft's ``LoraModel`` resolves them."""
    from peft.utils.other import get_pattern_key

    if config.lora_bias:
        raise ValueError(f"LoRA {origin}: lora_bias adapters are not supported yet")
    out: dict[str, _Module] = {}
    for name, parts in _group(tensors, prefix, origin).items():
        if "A" not in parts or "B" not in parts:
            missing = "lora_A" if "A" not in parts else "lora_B"
            raise CheckpointError(f"LoRA {origin}: {name!r} has no {missing} weight")
        if getattr(config, "use_dora", False) and "M" not in parts:
            raise CheckpointError(f"LoRA {origin}: {name!r} is a DoRA adapter without its magnitude vector")
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), name), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), name), config.lora_alpha)
        out[name] = _Module(config, int(r), alpha, parts["A"], parts["B"], parts.get("M"), scale, adapter_dtype,
                            diffusers, origin)  # fmt: skip
    return out


# -- diffusers LoRA files (diffusers models) --------------------------------------------------


@functools.cache
def _lora_loaders() -> dict[str, list[tuple[type, str]]]:
    """diffusers model class name -> the LoRA loader mixins of the pipelines built on it, with
    the pipeline component's name (``transformer``, ``unet``, ...)."""
    import diffusers
    from diffusers.loaders import lora_pipeline

    mixins = {c for c in vars(lora_pipeline).values() if isinstance(c, type) and c.__name__.endswith("LoraLoaderMixin")}
    found: dict[str, list[tuple[type, str]]] = {}
    for name in sorted(n for n in dir(diffusers) if n.endswith("Pipeline")):
        try:
            with _quiet("transformers", "diffusers"):  # importing a pipeline warns of its missing extras
                cls = getattr(diffusers, name)
        except (ImportError, AttributeError, RuntimeError, OSError):  # a pipeline whose extras are missing
            continue
        mixin = next((m for m in getattr(cls, "__mro__", ()) if m in mixins), None)
        if mixin is None:
            continue
        params = inspect.signature(cls.__init__).parameters
        for component in ("transformer", "unet", "prior"):
            if component in params:
                for model_cls in _classes(params[component].annotation):
                    entry = (mixin, component)
                    if entry not in found.setdefault(model_cls, []):
                        found[model_cls].append(entry)
    for entries in found.values():
        entries.sort(key=lambda e: e[0].__name__)
    return found


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """The named loggers at ERROR meanwhile."""
    levels = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _classes(annotation: Any) -> list[str]:
    """The class names an ``__init__`` annotation names (a class or a union of classes)."""
    args = getattr(annotation, "__args__", None)
    if args:
        return [a.__name__ for a in args if isinstance(a, type)]
    return [annotation.__name__] if isinstance(annotation, type) else []


def _pipeline_mixin(pipeline: str | None) -> Any:
    """The LoRA loader mixin of diffusers pipeline class ``pipeline`` (None: it has none)."""
    import diffusers
    from diffusers.loaders import lora_pipeline

    cls = getattr(diffusers, pipeline, None) if pipeline else None
    mixins = {c for c in vars(lora_pipeline).values() if isinstance(c, type) and c.__name__.endswith("LoraLoaderMixin")}
    return next((m for m in getattr(cls, "__mro__", ()) if m in mixins), None)


def _lora_file(path: Path, origin: str) -> Path:
    if not path.is_dir():
        return path
    candidates = sorted(path.glob("*.safetensors"))
    if len(candidates) != 1:
        raise ValueError(f"LoRA {origin}: a folder must hold one .safetensors LoRA file, found {len(candidates)}")
    return candidates[0]


def _load(mixin: Any, file: Path, origin: str, prefix: str, bare_is_mine: bool,
          unet_config: Any = None) -> tuple[Any, Any, Any]:  # fmt: skip
    """The LoRA file read by ``mixin.lora_state_dict`` as its ``load_lora_weights`` asks (the
    metadata, the alphas where it returns them apart, and the UNet's config for the pipelines
    with a UNet, which maps SGM block names), cut to the parts for ``prefix`` (``bare_is_mine``:
    a file whose keys have no component prefix is all this model's, as diffusers' model loaders
    take it)."""
    kwargs: dict[str, Any] = {"return_lora_metadata": True}
    if unet_config is not None and "unet" in getattr(mixin, "_lora_loadable_modules", ()):
        kwargs["unet_config"] = unet_config
    if "return_alphas" in inspect.signature(mixin.lora_state_dict).parameters:
        kwargs["return_alphas"] = True
    try:
        loaded = mixin.lora_state_dict(str(file), **kwargs)
    except (ValueError, KeyError, IndexError) as e:
        raise CheckpointError(f"LoRA {origin}: {mixin.__name__} cannot read it ({e})") from e
    state_dict, alphas, metadata = _unpack(loaded)
    if any(k.startswith(f"{prefix}.") for k in state_dict) or not bare_is_mine:
        others = sorted({k.split(".", 1)[0] for k in state_dict if not k.startswith(f"{prefix}.")})
        if others and bare_is_mine:
            logger.warning("LoRA %s: the parts for %s are not this model's, left out", origin, ", ".join(others))
        state_dict = {k.removeprefix(f"{prefix}."): v for k, v in state_dict.items() if k.startswith(f"{prefix}.")}
        if alphas:
            alphas = {k.removeprefix(f"{prefix}."): v for k, v in alphas.items() if k.startswith(f"{prefix}.")}
        if metadata:
            metadata = {k.removeprefix(f"{prefix}."): v for k, v in metadata.items() if k.startswith(f"{prefix}.")}
    return state_dict, alphas, metadata


def _read_diffusers(
    path: Path, model: nn.Module, scale: float, component: tuple[Any, str] | None, unet_config: Any = None
) -> dict[str, _Module]:
    """A diffusers LoRA file for ``model``, keyed by its module names (``component``: the
    pipeline's mixin and the component's name, in a pipeline folder; otherwise learned from the
    pipelines built on the model's class). Empty when a pipeline's LoRA has nothing for it."""
    try:
        from diffusers.utils.peft_utils import _create_lora_config
        from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft
    except ImportError as e:
        raise ImportError("merging a LoRA into a diffusers model needs diffusers and peft: pip install peft") from e
    origin = repr(str(path))
    file = _lora_file(path, origin)
    if component is None:
        loaders: list[tuple[Any, str]] | None = _lora_loaders().get(type(model).__name__)
        if not loaders:
            raise ValueError(f"LoRA {origin}: no diffusers pipeline loads LoRAs into a {type(model).__name__}")
        mixin, name = loaders[0]
        prefix = getattr(mixin, f"{name}_name", name)
    else:
        mixin, prefix = component
    if unet_config is None and prefix == "unet":
        unet_config = getattr(model, "config", None)
    state_dict, alphas, metadata = _load(mixin, file, origin, prefix, component is None, unet_config)
    if not state_dict:
        if component is not None:
            return {}
        raise CheckpointError(f"LoRA {origin}: no adapter weights for the {prefix}")
    if any(".lokr_" in k for k in state_dict):
        raise ValueError(f"LoRA {origin}: LoKr adapters are not supported yet")
    if "lora_A" not in next(iter(state_dict)):
        state_dict = convert_unet_state_dict_to_peft(state_dict)  # type: ignore[no-untyped-call]
    rank = {f"^{k}": v.shape[1] for k, v in state_dict.items() if "lora_B" in k and v.ndim > 1}
    config = _create_lora_config(  # type: ignore[no-untyped-call]
        state_dict, alphas or None, metadata or None, rank, model_state_dict=model.state_dict(), adapter_name=_ADAPTER
    )
    return _modules(state_dict, "", config, scale, None, True, origin)


def _read_text_encoder(
    path: Path, model: nn.Module, scale: float, component: tuple[Any, str], unet_config: Any = None
) -> dict[str, _Module]:
    """The parts of a diffusers LoRA file for a pipeline's text encoder (a transformers model),
    as the pipeline's ``load_lora_into_text_encoder`` reads them and ``fuse_lora`` merges them:
    diffusers' key conversions, its rank rules for text encoders, the adapter weights in the
    model's dtype, the scale multiplying peft's scaling."""
    try:
        from diffusers.utils.peft_utils import _create_lora_config
        from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
    except ImportError as e:
        raise ImportError("merging a LoRA into a pipeline needs diffusers and peft: pip install peft") from e
    mixin, prefix = component
    origin = repr(str(path))
    state_dict, alphas, metadata = _load(mixin, _lora_file(path, origin), origin, prefix, False, unet_config)
    if not state_dict:
        return {}
    state_dict = convert_state_dict_to_peft(convert_state_dict_to_diffusers(state_dict))  # type: ignore[no-untyped-call]
    if not hasattr(model, "text_model"):
        state_dict = {k.removeprefix("text_model."): v for k, v in state_dict.items()}
    rank = {}
    for name, _ in model.named_modules():
        if name.endswith((".q_proj", ".k_proj", ".v_proj", ".out_proj", ".fc1", ".fc2")):
            key = f"{name}.lora_B.weight"
            if key in state_dict:
                rank[key] = state_dict[key].shape[1]
    config = _create_lora_config(state_dict, alphas or None, metadata or None, rank, is_unet=False)  # type: ignore[no-untyped-call]
    return _modules(state_dict, "", config, scale, None, True, origin)


def _unpack(loaded: Any) -> tuple[dict[str, torch.Tensor], dict[str, float] | None, dict[str, Any] | None]:
    """``lora_state_dict(..., return_lora_metadata=True)``'s answer: ``(state_dict, metadata)``
    or ``(state_dict, alphas, metadata)``."""
    if isinstance(loaded, dict):
        return loaded, None, None
    if len(loaded) == 2:
        return loaded[0], None, loaded[1]
    return loaded[0], loaded[1], loaded[2]
