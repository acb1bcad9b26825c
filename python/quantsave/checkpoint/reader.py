"""The one checkpoint reader: finds a folder's weights (a single file or an index and its shards),
validates every shard header through the Rust reader, and returns every tensor's dtype, shape,
file and byte range, the merged header metadata and ``config.json``. Used by load, inspect,
verify and convert; knows nothing about quantization backends.

``strict=True`` (loading, converting) raises the first problem as a ``CheckpointError``;
``strict=False`` (``quantsave verify``) records every problem and goes on, and also reports what
loaders tolerate (a tensor the index does not list, a header without ``{"format": "pt"}``).
A folder without weights is a ``FileNotFoundError`` in both modes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from quantsave import _core
from quantsave.checkpoint.tensors import tensor_from_map
from quantsave.errors import CheckpointError, json_object
from quantsave.families import FAMILIES

__all__ = ["Checkpoint", "TensorInfo", "open_checkpoint", "read_config", "weights_names"]

Progress = Callable[[Iterable[Path]], Iterable[Path]]


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor of a checkpoint lives: dtype name, shape, file and byte range."""

    name: str
    dtype: str
    shape: list[int]
    file: Path
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass
class Checkpoint:
    """A checkpoint as read from disk; ``problems`` holds what ``strict=False`` found."""

    directory: Path
    files: list[Path]
    index: Path | None = None
    weight_map: dict[str, str] | None = None
    config: dict[str, Any] | None = None
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    #: The shards' header metadata merged in file order (a later shard's entries win, as in
    #: the references' loaders).
    metadata: dict[str, str] = field(default_factory=dict)
    #: Each readable shard's size in bytes.
    file_sizes: dict[Path, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    _maps: dict[Path, Any] = field(default_factory=dict, repr=False)

    def mapped_file(self, path: Path) -> Any:
        """The ``_core.MappedFile`` that ``state_dict`` mapped ``path`` with (None before)."""
        return self._maps.get(path)

    def read_bytes(self, name: str) -> bytes:
        """The bytes of tensor ``name``, through the Rust reader's validated map."""
        info = self.tensors[name]
        mapped = self._maps.get(info.file) or _core.MappedFile(info.file)
        return bytes(memoryview(mapped)[info.start : info.end])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor as a CPU tensor viewing a private memory map of its file (no copies).

        Raises:
            CheckpointError: a tensor torch cannot hold (no torch dtype, impossible dims).
        """
        bases: dict[Path, torch.Tensor] = {}
        out: dict[str, torch.Tensor] = {}
        for name, info in self.tensors.items():
            if info.file not in bases:
                mapped = self._maps.get(info.file) or self._maps.setdefault(info.file, _core.MappedFile(info.file))
                bases[info.file] = torch.frombuffer(mapped, dtype=torch.uint8)
            try:
                out[name] = tensor_from_map(bases[info.file], info.dtype, info.shape, info.start, info.end)
            except (ValueError, TypeError, RuntimeError) as e:  # no torch dtype, dims past 2**63 - 1
                raise CheckpointError(
                    f"invalid checkpoint file {info.file}: tensor {name!r} ({info.dtype} {info.shape}) "
                    f"cannot be loaded into torch: {e}"
                ) from e
        return out


class _Problems:
    """Raises each problem (strict) or records it."""

    def __init__(self, ckpt: Checkpoint, strict: bool) -> None:
        self.ckpt, self.strict = ckpt, strict

    def add(self, message: str, *, fatal: bool = True) -> None:
        if self.strict and fatal:
            raise CheckpointError(message)
        if not self.strict:
            self.ckpt.problems.append(message)


def _invalid(path: Path, message: str) -> str:
    return f"invalid checkpoint file {path}: {message}"


def read_config(directory: Path) -> dict[str, Any] | None:
    """``config.json`` as a dict, or None when absent.

    Raises:
        CheckpointError: it is not a JSON object.
    """
    path = directory / "config.json"
    if not path.is_file():
        return None
    return json_object(path.read_bytes(), _invalid(path, "config.json"))


def weights_names(config: dict[str, Any] | None) -> list[str]:
    """The weights file names to look for, most likely first: a diffusers config (``_class_name``)
    puts diffusers' name first, anything else transformers'."""
    names = list(dict.fromkeys(f.weights_name for f in FAMILIES))
    if config is not None and "_class_name" in config:
        return names
    return sorted(names, key=lambda n: n != "model.safetensors")


def _is_file(path: Path) -> bool:
    """``path.is_file()``, False where the name cannot even be looked up (too long, ...)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def _inside(path: Path, root: Path) -> bool:
    try:
        return path.resolve().parent == root
    except (OSError, ValueError):  # a name the system cannot look up
        return False


def _find(directory: Path, variant: str | None, config: dict[str, Any] | None) -> tuple[list[Path], Path | None]:
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint folder {str(directory)!r} does not exist")
    for weights_name in weights_names(config):
        single = directory / _core.add_variant(weights_name, variant)
        if single.is_file():
            return [single], None
        index = directory / _core.index_file_name(weights_name, variant)
        if index.is_file():
            return [], index
    if (directory / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{str(directory)!r} is a pipeline folder (model_index.json): load it with "
            "DiffusionPipeline.from_pretrained, or load one component folder (e.g. its 'transformer' subfolder)"
        )
    raise FileNotFoundError(
        f"{str(directory)!r} is not a checkpoint: no safetensors weights"
        + (f" for variant {variant!r}" if variant else "")
        + " (expected model.safetensors, diffusion_pytorch_model.safetensors or a sharded index)"
    )


def _read_index(ckpt: Checkpoint, index: Path, problems: _Problems, confined: bool) -> None:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, an over-long integer, deep nesting
        problems.add(_invalid(index, f"not valid JSON: {e}"))
        return
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        problems.add(_invalid(index, "no 'weight_map' object"))
        return
    ckpt.weight_map = {k: v for k, v in weight_map.items() if isinstance(v, str)}
    root = ckpt.directory.resolve() if confined else None
    files: set[Path] = set()
    for key, fname in weight_map.items():
        plain = isinstance(fname, str) and fname not in ("", ".", "..") and not any(c in fname for c in "/\\\0")
        path = ckpt.directory / fname if plain else None
        if path is None or (root is not None and not _inside(path, root)):
            message = f"tensor {key!r} maps to {fname!r}, which is not a file in the checkpoint folder"
            problems.add(_invalid(index, message))
        elif path not in files:
            if _is_file(path):
                files.add(path)
            else:
                problems.add(_invalid(index, f"shard {fname!r} named for tensor {key!r} does not exist"))
    # The references' loaders read the shards in name order.
    ckpt.files = sorted(files)


def _read_shards(ckpt: Checkpoint, problems: _Problems, mapped: bool, progress: Progress) -> set[str]:
    """Reads every shard header; returns the names of the shards whose header was valid."""
    read: set[str] = set()
    for path in progress(ckpt.files):
        try:
            if mapped:
                ckpt._maps[path] = _core.MappedFile(path)
                header = ckpt._maps[path].header
            else:
                header = _core.read_header(path)
        except (ValueError, OSError) as e:
            if problems.strict:
                raise
            problems.add(str(e) if str(path) in str(e) else f"{path}: {e}")
            continue
        read.add(path.name)
        meta = header.get("metadata") or {}
        if meta.get("format") != "pt":
            problems.add(_invalid(path, "header metadata lacks {'format': 'pt'}"), fatal=False)
        ckpt.metadata.update(meta)
        ckpt.file_sizes[path] = header["file_size"]
        wm = ckpt.weight_map
        for name, dtype, shape, start, end in header["tensors"]:
            if name in ckpt.tensors:
                problems.add(_invalid(path, f"tensor {name!r} also appears in {ckpt.tensors[name].file}"))
                continue
            where = wm.get(name) if wm is not None else path.name
            if where != path.name:
                problems.add(
                    _invalid(path, f"holds tensor {name!r} which the index places in {where!r}")
                    if where is not None
                    else _invalid(path, f"holds tensor {name!r} which the index does not list"),
                    fatal=where is not None,
                )
            ckpt.tensors[name] = TensorInfo(name, dtype, list(shape), path, start, end)
    return read


def open_checkpoint(
    path: str | os.PathLike[str],
    *,
    variant: str | None = None,
    strict: bool = True,
    mapped: bool = False,
    confined: bool = False,
    headers: bool = True,
    progress: Progress = iter,
) -> Checkpoint:
    """Reads the checkpoint at ``path``: a folder, or one ``.safetensors`` file (its folder's
    ``config.json`` is read too).

    Args:
        variant: the weights variant (``model.fp16.safetensors``).
        strict: raise the first problem instead of recording it in ``problems``.
        mapped: keep each file memory-mapped for ``state_dict`` (validated once).
        confined: also refuse index entries that resolve outside the folder (symlinks).
        headers: read the shard headers (False: only find the files, through the index).
        progress: wraps the iteration over the shard files (a progress bar).

    Raises:
        FileNotFoundError: no such folder, or no weights in it.
        CheckpointError: (strict) a corrupt config, index or shard, naming the file and problem.
    """
    path = Path(path)
    directory = path.parent if path.is_file() else path
    ckpt = Checkpoint(directory, [])
    problems = _Problems(ckpt, strict)
    try:
        ckpt.config = read_config(directory)
    except CheckpointError as e:
        problems.add(str(e))
    if path.is_file():
        ckpt.files = [path]
    else:
        ckpt.files, ckpt.index = _find(directory, variant, ckpt.config)
        if ckpt.index is not None:
            _read_index(ckpt, ckpt.index, problems, confined)
    if not headers:
        return ckpt
    read = _read_shards(ckpt, problems, mapped, progress)
    if ckpt.weight_map is not None and ckpt.index is not None:
        for key, fname in ckpt.weight_map.items():
            if key not in ckpt.tensors and fname in read:
                problems.add(_invalid(ckpt.index, f"tensor {key!r} is not in its shard {fname!r}"))
    return ckpt
