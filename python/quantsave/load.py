"""The load path: find the weights (single file or index + shards), validate and map every
file through the Rust reader, view tensors without copies, and rebuild quantized modules."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantsave import _core
from quantsave.backends.config import QuantizationConfig, resolve_config
from quantsave.backends.registry import get_quantizer
from quantsave.checkpoint.tensors import tensor_from_map
from quantsave.errors import CheckpointError
from quantsave.families import FAMILIES, TRANSFORMERS, family_of

__all__ = ["load_state_dict", "load_checkpoint", "load_model", "read_config", "find_weights"]


def read_config(directory: Path) -> dict[str, Any] | None:
    """``config.json`` as a dict, or None when absent."""
    path = directory / "config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, an over-long integer, deep nesting
        raise CheckpointError(f"invalid checkpoint file {path}: config.json is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"invalid checkpoint file {path}: config.json is not a JSON object")
    return data


def _weights_names(config: dict[str, Any] | None) -> list[str]:
    names = [f.weights_name for f in FAMILIES]
    if config is not None and "_class_name" in config:
        return names
    return sorted(set(names), key=lambda n: n != "model.safetensors")


def find_weights(
    directory: Path, variant: str | None = None
) -> tuple[list[Path], dict[str, str] | None, Path | None]:
    """The shard files of the checkpoint in ``directory`` and, when sharded, its weight map and
    index file.

    Raises:
        FileNotFoundError: no weights file.
        CheckpointError: a broken index (bad JSON, files outside the folder, missing shards).
    """
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint folder {str(directory)!r} does not exist")
    config = read_config(directory)
    for weights_name in dict.fromkeys(_weights_names(config)):
        single = directory / _core.add_variant(weights_name, variant)
        if single.is_file():
            return [single], None, None
        index = directory / _core.index_file_name(weights_name, variant)
        if index.is_file():
            files, weight_map = _read_index(directory, index)
            return files, weight_map, index
    if (directory / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{str(directory)!r} is a pipeline folder (model_index.json): load it with "
            "DiffusionPipeline.from_pretrained, or load one component folder (e.g. its 'transformer' subfolder)"
        )
    raise FileNotFoundError(
        f"no safetensors weights in {str(directory)!r}"
        + (f" for variant {variant!r}" if variant else "")
        + " (expected model.safetensors, diffusion_pytorch_model.safetensors or a sharded index)"
    )


def _read_index(directory: Path, index: Path) -> tuple[list[Path], dict[str, str]]:
    def bad(msg: str) -> CheckpointError:
        return CheckpointError(f"invalid checkpoint file {index}: {msg}")

    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, an over-long integer, deep nesting
        raise bad(f"not valid JSON: {e}") from e
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise bad("no 'weight_map' object")
    files: list[Path] = []
    for key, fname in weight_map.items():
        if not isinstance(fname, str) or not fname or "/" in fname or "\\" in fname or fname in (".", ".."):
            raise bad(f"tensor {key!r} maps to {fname!r}, which is not a file in the checkpoint folder")
        path = directory / fname
        if path not in files:
            if not _is_file(path):
                raise bad(f"shard {fname!r} named for tensor {key!r} does not exist")
            files.append(path)
    return files, weight_map


def _is_file(path: Path) -> bool:
    """``path.is_file()``, False where the name cannot even be looked up (too long, ...)."""
    try:
        return path.is_file()
    except OSError:
        return False


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
    path = Path(directory)
    if path.is_file():
        files, weight_map, index, config = [path], None, None, read_config(path.parent)
    else:
        files, weight_map, index = find_weights(path, variant)
        config = read_config(path)
    state_dict: dict[str, torch.Tensor] = {}
    owner: dict[str, Path] = {}
    metadata: dict[str, str] = {}
    for f in files:
        mf = _core.MappedFile(f)
        metadata.update(mf.header.get("metadata") or {})
        base = torch.frombuffer(mf, dtype=torch.uint8)
        for name, dtype, shape, start, end in mf.header["tensors"]:
            if name in owner:
                raise CheckpointError(f"invalid checkpoint file {f}: tensor {name!r} also appears in {owner[name]}")
            if weight_map is not None and weight_map.get(name, f.name) != f.name:
                raise CheckpointError(
                    f"invalid checkpoint file {f}: holds tensor {name!r} which the index places in {weight_map[name]!r}"
                )
            owner[name] = f
            try:
                state_dict[name] = tensor_from_map(base, dtype, shape, start, end)
            except (ValueError, TypeError, RuntimeError) as e:  # no torch dtype, dims past 2**63 - 1
                raise CheckpointError(
                    f"invalid checkpoint file {f}: tensor {name!r} ({dtype} {list(shape)}) "
                    f"cannot be loaded into torch: {e}"
                ) from e
    if weight_map is not None:
        missing = [k for k in weight_map if k not in state_dict]
        if missing:
            raise CheckpointError(
                f"invalid checkpoint file {index}: it names {len(missing)} tensor(s) absent from their shards, "
                f"e.g. {missing[0]!r} in {weight_map[missing[0]]!r}"
            )
    qconfig = None
    if config is not None and config.get("quantization_config") is not None:
        try:
            qconfig = resolve_config(config["quantization_config"])
        except ValueError as e:
            raise CheckpointError(f"invalid checkpoint file {path / 'config.json'}: quantization_config: {e}") from e
    return state_dict, qconfig, metadata


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
    state_dict, qconfig, metadata = load_checkpoint(path, variant=variant)
    if model is None:
        model = build_skeleton(
            path if path.is_dir() else path.parent, read_config(path if path.is_dir() else path.parent)
        )
    loaded = set(state_dict)
    folder = path if path.is_dir() else path.parent
    if qconfig is None and (folder / "quanto_qmap.json").is_file():
        # optimum-quanto's own layout: the quantization map stands in for quantization_config.
        from quantsave.backends.quanto.quantizer import config_from_qmap

        qconfig = config_from_qmap(folder / "quanto_qmap.json")
    if qconfig is not None:
        try:
            quantizer = get_quantizer(qconfig)
        except ValueError as e:  # a quant_method quantsave does not know
            raise CheckpointError(f"checkpoint in {path}: config.json: {e}") from e
        try:
            rest = quantizer.load_into(model, state_dict, metadata, path if path.is_dir() else path.parent)
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
    missing = [k for k in model.state_dict() if k not in loaded and k not in tied]
    missing += [n for n, p in model.named_parameters() if p.is_meta and n not in tied and n not in missing]
    if missing:
        raise CheckpointError(
            f"checkpoint in {path} lacks {len(missing)} weight(s) the model needs, e.g. {missing[:3]}"
        )
    if qconfig is not None:
        model._quantsave_config = qconfig  # type: ignore[assignment]
    if family_of(model) is TRANSFORMERS and getattr(model, "_weight_conversions", None) is None:
        # As from_pretrained records: the checkpoint's names were used as they are (no renaming or
        # fusing), so a later save orders the tensors as transformers does after from_pretrained.
        model._weight_conversions = []  # type: ignore[assignment]
    if torch.device(device).type != "cpu":
        model = model.to(device)
    return model.eval()
