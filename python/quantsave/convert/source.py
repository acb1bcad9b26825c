"""The source side of ``convert``: the float checkpoint as the one reader sees it, and the
static shortcut (``static_layout``) that names a transformers checkpoint's quantized Linear layers
without importing modeling code, taken only when it is exact."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch

from quantsave import _core
from quantsave.backends.bitsandbytes import layout as bnb_layout
from quantsave.backends.bitsandbytes.config import BitsAndBytesConfig
from quantsave.backends.bitsandbytes.quantizer import BitsAndBytesQuantizer
from quantsave.checkpoint.plan import parse_shard_size
from quantsave.checkpoint.reader import Checkpoint, open_checkpoint
from quantsave.families import TRANSFORMERS, dump_json

__all__ = ["FLOATS", "Source", "read_source", "static_config_files", "static_targets", "torch_name"]

FLOATS = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


@dataclass
class Source:
    """A float checkpoint: its files and every tensor's (file index, dtype, shape).

    ``derived`` holds the tensors the conversion makes rather than reads as stored (a single
    file's key conversion, a LoRA merge): key -> a function of the dtype to make it in (None: as
    made) giving a fresh CPU tensor. ``stored`` maps each of them to the stored tensors it reads,
    whose pages are released once it is written; ``names``, a key to its tensor's name in its
    file where they differ (a renamed stored tensor)."""

    folder: Path
    files: list[Path]
    tensors: dict[str, tuple[int, str, list[int]]]
    config: dict[str, Any] | None
    checkpoint: Checkpoint | None = None
    names: dict[str, str] = field(default_factory=dict)
    #: made 4-bit weights quantized from another dtype than they are made in: key -> the dtype
    #: for the one they are made in (``lora_merge="quantized"``, as peft's merge promotes).
    quantized_as: dict[str, Callable[[torch.dtype], torch.dtype]] = field(default_factory=dict)
    derived: dict[str, Callable[[torch.dtype | None], torch.Tensor]] = field(default_factory=dict)
    stored: dict[str, set[str]] = field(default_factory=dict)
    _mapped: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def mapped(self, key: str) -> torch.Tensor:
        """Stored tensor ``key`` (its name in its file) viewing a private map of the file (never
        write into it)."""
        if self._mapped is None:
            assert self.checkpoint is not None
            self._mapped = self.checkpoint.state_dict()
        return self._mapped[key]

    def nbytes(self, key: str) -> int:
        return _core.dtype_nbytes(*self.tensors[key][1:])

    def release(self, key: str) -> None:
        """Drops the pages of the stored tensors ``key`` was made from (a hint; they stay cached)."""
        if self.checkpoint is None:
            return
        for name in self.stored.get(key, {self.names.get(key, key)}):
            info = self.checkpoint.tensors.get(name)
            if info is None:
                continue
            mapped = self.checkpoint.mapped_file(info.file)
            if mapped is not None:
                mapped.release(info.start, info.end)


def read_source(path: Path) -> Source:
    ckpt = open_checkpoint(path)
    number = {f: i for i, f in enumerate(ckpt.files)}
    tensors = {name: (number[t.file], t.dtype, t.shape) for name, t in ckpt.tensors.items()}
    return Source(ckpt.directory, ckpt.files, tensors, ckpt.config, ckpt)


def static_targets(source: Source, config: BitsAndBytesConfig, max_shard_size: int | str | None) -> list[str] | None:
    """The quantized modules of a transformers checkpoint learned without importing
    transformers, when that is exact: the checkpoint was written by the installed transformers
    version (so its config files round-trip unchanged), its float tensors all have the
    config's dtype, no tied output embeddings are stored, and the output is one file (the
    checkpoint does not record the model's tensor order, which sharding needs)."""
    cfg = source.config
    if cfg is None or "_class_name" in cfg or not cfg.get("architectures"):
        return None
    try:
        version = importlib_metadata.version("transformers")
    except importlib_metadata.PackageNotFoundError:
        return None
    gen = source.folder / "generation_config.json"
    if cfg.get("transformers_version") != version or not gen.is_file():
        return None
    try:
        if json.loads(gen.read_text(encoding="utf-8")).get("transformers_version") != version:
            return None
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    dtype = cfg.get("dtype", cfg.get("torch_dtype"))
    floats = {d for _, d, _ in source.tensors.values() if d in FLOATS}
    if len(floats) != 1 or dtype != str(FLOATS[floats.pop()]).removeprefix("torch."):
        return None
    if dtype == "float16":  # quantize-on-load upcasts the model's _keep_in_fp32_modules then
        return None
    if any(isinstance(v, dict) and "model_type" in v for v in cfg.values()):
        return None  # a composite config: from_pretrained records the dtype in its sub-configs too
    if cfg.get("tie_word_embeddings") is not False and any(k.endswith("lm_head.weight") for k in source.tensors):
        return None
    try:
        from quantsave.convert.static_layout import transformers_bnb_targets
    except ImportError:
        return None
    shapes = {k: (d, s) for k, (_, d, s) in source.tensors.items()}
    targets = transformers_bnb_targets(cfg, shapes, config.llm_int8_skip_modules)
    if targets is None:
        return None
    # One file (the bytes of each quantized weight with its state, from its layout).
    total = 0
    for key, (_, dtype, shape) in source.tensors.items():
        if key.removesuffix(".weight") in targets and len(shape) == 2:
            total += bnb_layout.quantized_bytes(shape[0], shape[1], torch_name(dtype), config)
        else:
            total += _core.dtype_nbytes(dtype, shape)
    if total > parse_shard_size(max_shard_size, TRANSFORMERS.default_max_shard_size):
        return None
    return targets


def static_config_files(source: Source, quantizer: BitsAndBytesQuantizer) -> dict[str, str]:
    """config.json with the quantization config added, generation_config.json unchanged (both
    round-trip unchanged through the transformers version that wrote them)."""
    cfg = dict(source.config or {})
    cfg["quantization_config"] = quantizer.config_dict(TRANSFORMERS)
    return {
        "config.json": dump_json(cfg),
        "generation_config.json": (source.folder / "generation_config.json").read_text(encoding="utf-8"),
    }


def torch_name(dtype: str) -> str:
    """The torch name of a source float dtype (``"BF16"`` -> ``"bfloat16"``), as the quant state records it."""
    return str(FLOATS.get(dtype, torch.float32)).removeprefix("torch.")
