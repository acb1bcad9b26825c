"""``convert`` of a diffusers pipeline folder: the named components converted, everything else
copied, the whole folder staged and swapped in at once."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from quantsave.checkpoint.commit import fsync_enabled, staged_directory
from quantsave.checkpoint.reader import open_checkpoint, read_config
from quantsave.checkpoint.writer import SaveResult
from quantsave.convert.lora import LoraMerge
from quantsave.convert.model import bnb_config, convert_model
from quantsave.errors import CheckpointError
from quantsave.pipeline import component_configs, is_component_mapping

__all__ = ["convert_pipeline", "has_weights"]


def convert_pipeline(
    src: Path,
    dst: Path,
    quantization_config: Any,
    components: list[str] | dict[str, Any] | None,
    max_shard_size: int | str | None,
    progress: bool | None,
    checksums: bool,
    torch_dtype: torch.dtype | None = None,
    lora: LoraMerge | None = None,
) -> SaveResult:
    """Converts the named components of a pipeline folder and copies everything else
    (``torch_dtype``: as for each component, see ``convert.dtypes``; ``lora``: merged into the
    converted components the pipeline's ``load_lora_weights`` would load it into)."""
    t0 = time.perf_counter()
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise ValueError("dst must not be the source pipeline folder or inside it")
    index = json.loads((src / "model_index.json").read_text(encoding="utf-8"))
    names = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v and v[0] is not None]
    with_weights = [n for n in names if (src / n).is_dir() and has_weights(src / n)]
    if is_component_mapping(quantization_config):
        if components is not None:
            raise ValueError("pass per-component configs either as quantization_config or as components=, not both")
        libraries = {k: v[0] for k, v in index.items() if k in with_weights}
        components = component_configs(quantization_config, libraries)
    if isinstance(components, dict):
        configs = {name: bnb_config(c) for name, c in components.items()}
    else:
        chosen = with_weights if components is None else list(components)
        if quantization_config is None:
            raise ValueError("pass a quantization config (or a components mapping of configs)")
        shared = bnb_config(quantization_config)
        configs = dict.fromkeys(chosen, shared)
    unknown = [n for n in configs if n not in with_weights]
    if unknown:
        raise ValueError(
            f"pipeline components {unknown} are not in {str(src)!r} or have no safetensors weights; "
            f"components with weights: {with_weights}"
        )
    for name in configs:
        cfg = read_config(src / name)
        if cfg is not None and cfg.get("quantization_config") is not None:
            raise ValueError(f"pipeline component {name!r} is already quantized")
    pipeline, unet_config = index.get("_class_name"), None
    if lora is not None:
        # The pipeline's LoRA loader maps SGM block names with its UNet's config.
        unet_config = read_config(src / "unet") if (src / "unet" / "config.json").is_file() else None
        lora.check_pipeline(pipeline, list(configs), with_weights, unet_config)
    result = SaveResult(directory=dst)
    # The whole pipeline folder is staged and swapped in at once (see quantsave.checkpoint.commit).
    with staged_directory(dst, fsync=fsync_enabled()) as stage:
        for entry in sorted(src.iterdir()):
            target = stage / entry.name
            if entry.name in configs:
                merge = lora.for_component(pipeline, entry.name, unet_config) if lora is not None else None
                r = convert_model(
                    entry, target, configs[entry.name], None, max_shard_size, progress, checksums, torch_dtype,
                    lora=merge,
                )  # fmt: skip
                result.files.extend(f"{entry.name}/{f}" for f in r.files)
                result.total_bytes += r.total_bytes
                result.num_shards += r.num_shards
                continue
            # Copied as it is, replacing what an earlier conversion left (links to the old
            # folder's files are removed first, never written through).
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif os.path.lexists(target):
                target.unlink()
            if entry.is_dir():
                shutil.copytree(entry, target)
            elif entry.is_file():
                shutil.copy2(entry, target)
                result.files.append(entry.name)
        if lora is not None and not lora.merged:
            raise ValueError(
                f"lora=: no LoRA weights for the converted components {sorted(configs)} of this {pipeline}"
            )
    result.seconds = time.perf_counter() - t0
    return result


def has_weights(folder: Path) -> bool:
    try:
        open_checkpoint(folder, headers=False)
    except (FileNotFoundError, CheckpointError):
        return False
    return True
