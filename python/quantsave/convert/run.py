"""``convert``: turn a float safetensors checkpoint (one file, a sharded model folder or a
pipeline folder) into a pre-quantized bitsandbytes one, as diffusers/transformers would write
after quantizing on load, tensor by tensor and without materializing the model.

Data flow: the source headers are read (Rust, validated); the layout decides which tensors are
Linear weights to quantize and in which order the state dict lists them; the planner cuts the
output into shards (never splitting a quantized weight); then the Rust converter maps the
sources, quantizes chunk by chunk and writes each chunk at its place in the output files, with
bounded memory and without the GIL; finally ``config.json`` (and the index) are written.

Which tensors are Linear weights comes from, in order of preference:

1. the model passed in (real or on the meta device);
2. for a transformers checkpoint written by the installed transformers version, a static reading
   of the architecture's modeling source (``quantsave.convert.static_layout``) when it is sure: no
   import of the modeling code, which costs seconds;
3. a meta-device skeleton built from ``config.json`` through diffusers or transformers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantsave.checkpoint.writer import SaveResult
from quantsave.convert.dtypes import resolve_dtype
from quantsave.convert.lora import LoraSpec, lora_merge_of
from quantsave.convert.model import bnb_config, convert_model
from quantsave.convert.pipeline import convert_pipeline
from quantsave.distributed.group import Ranks, active_group

__all__ = ["convert"]


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    quantization_config: Any,
    *,
    model: nn.Module | None = None,
    components: list[str] | dict[str, Any] | None = None,
    max_shard_size: int | str | None = None,
    torch_dtype: Any = None,
    progress: bool | None = None,
    checksums: bool = False,
    process_group: Any = None,
    lora: Sequence[LoraSpec] | LoraSpec | None = None,
    lora_merge: str = "float",
    model_class: str | type | None = None,
    model_config: str | os.PathLike[str] | None = None,
) -> SaveResult:
    """Converts the float checkpoint ``src`` into a pre-quantized checkpoint in ``dst``.

    Args:
        src: a ``.safetensors`` file, a model folder (single file or sharded) or a diffusers
            pipeline folder (``model_index.json``).
        dst: the output folder (must differ from the source).
        quantization_config: a bitsandbytes 4-bit (nf4/fp4, double quant or not) or 8-bit
            config (quantsave, diffusers or transformers object, or dict).
        model: the model (real or on the meta device) whose Linear layers are quantized; by
            default learned from ``config.json`` (see the module docstring).
        components: for a pipeline folder, the components to convert (default: every
            component with safetensors weights), or a mapping from component name to its own
            config (as diffusers' ``PipelineQuantizationConfig(quant_mapping=...)``); the other
            folders and files are copied.
        max_shard_size: as for ``save_quantized``.
        torch_dtype: the dtype of the tensors left unquantized (and the dtype the weights are
            cast to before quantizing), as the reference's ``from_pretrained(torch_dtype=...)``:
            a float torch dtype or its name. The default is the reference's: for transformers
            ``"auto"`` (the config's ``dtype``), for diffusers float16 (its bitsandbytes
            quantizer's choice; pass ``torch.bfloat16`` for bf16 models such as Flux). Either
            way the model's ``_keep_in_fp32_modules`` are upcast to float32 as the reference does.
        progress: a progress bar (tqdm) over the bytes converted; default: when stderr is a TTY.
        checksums: record each output weights file's sha256 in ``checksums.sha256`` (see
            ``save_quantized``).
        process_group: the ``torch.distributed`` group whose ranks convert together (default:
            the default group when ``torch.distributed`` is initialized with more than one
            rank). Every rank makes the same call on the same shared filesystem; the work (the
            tensors read, quantized and written) is split by bytes and the output is byte for
            byte the one-process conversion. One model folder or file (not a pipeline folder).
        lora: LoRA adapters merged into their weights as they stream through, before quantizing:
            a path or ``(path, scale)``, or a list of them, merged in order. A path is a PEFT
            adapter folder or its ``adapter_model.safetensors`` (transformers models: as
            ``PeftModel.from_pretrained(...).merge_and_unload()``), or a diffusers LoRA file in
            diffusers, PEFT, kohya or another format the model's diffusers pipeline reads (as
            ``load_lora_weights`` then ``fuse_lora(lora_scale=scale)``); for a pipeline folder,
            each converted component takes the parts its pipeline loads into it (``transformer.``,
            ``unet.``, ``text_encoder.``, ...); see ``convert.lora``.
        lora_merge: ``"float"`` merges into the float weight (the references' merge);
            ``"quantized"`` merges onto dequantize(quantize(W)) and quantizes the sum again (the
            QLoRA-consistent merge, for adapters trained on the quantized model).
        model_class: for an original single-file checkpoint (Flux, SD3, ... as published): the
            diffusers model class (or its name) whose ``from_single_file`` reads it; its keys are
            mapped by diffusers' own conversion function, tensor by tensor while writing.
        model_config: with ``model_class``, the folder holding the diffusers model's
            ``config.json`` (or a pipeline folder with the class's default subfolder), as
            ``from_single_file(config=...)``.

    Returns:
        What was written (for a pipeline, the totals over the converted components).

    Raises:
        ValueError: an unsupported config or ``torch_dtype``, an already quantized source,
            ``dst`` equal to the source, or unknown pipeline components.
        CheckpointError: a corrupt source file, or a source that does not match the model.
        FileNotFoundError: no source weights.
        DistributedError: across ranks, another rank failed (it is named), the ranks' calls
            or sources differ, or a rank stopped answering; nothing is committed.
    """
    path = Path(src)
    dtype = resolve_dtype(torch_dtype)
    group = active_group(process_group)
    single = None
    if model_class is not None:
        if model is not None:
            raise ValueError("model= and model_class= exclude each other (model_class builds the model)")
        if not path.is_file():
            raise ValueError(f"model_class= converts one original .safetensors file; {str(path)!r} is not a file")
        single = (model_class, model_config)
    elif model_config is not None:
        raise ValueError("model_config= goes with model_class= (an original single-file checkpoint)")
    merge = lora_merge_of(lora, lora_merge)
    if group is not None:
        if path.is_dir() and (path / "model_index.json").is_file():
            raise ValueError("a conversion across ranks takes one model; convert a pipeline folder in one process")
        if components is not None:
            raise ValueError("components= applies to pipeline folders")
        ranks = Ranks(group, "convert")
        try:
            call = {
                "src": os.path.abspath(path),
                "dst": os.path.abspath(dst),
                "quantization_config": _config_dict(quantization_config),
                "max_shard_size": max_shard_size,
                "torch_dtype": str(dtype),
                "checksums": checksums,
                "model": None if model is None else type(model).__qualname__,
                "lora": repr(lora),
                "lora_merge": lora_merge,
                "model_class": getattr(model_class, "__name__", model_class),
                "model_config": None if model_config is None else os.path.abspath(model_config),
                # torch's float32 mean (the double-quant offset) depends on its intra-op thread count.
                "torch threads (torch.get_num_threads())": torch.get_num_threads(),
            }
            ranks.agree(call, "arguments")
            config = ranks.step(lambda: bnb_config(quantization_config), "the checks of the config")
            return convert_model(
                path, Path(dst), config, model, max_shard_size, progress, checksums, dtype, ranks, merge, single
            )
        finally:
            ranks.close()
    if path.is_dir() and (path / "model_index.json").is_file():
        if model is not None:
            raise ValueError("model= applies to one model; a pipeline's components come from their folders")
        return convert_pipeline(
            path, Path(dst), quantization_config, components, max_shard_size, progress, checksums, dtype, merge
        )
    if components is not None:
        raise ValueError(f"components= applies to pipeline folders; {str(path)!r} is not one (no model_index.json)")
    config = bnb_config(quantization_config)
    return convert_model(
        path, Path(dst), config, model, max_shard_size, progress, checksums, dtype, lora=merge, single_file=single
    )


def _config_dict(config: Any) -> Any:
    """A config as the ranks compare it."""
    to_dict = getattr(config, "to_dict", None)
    return to_dict() if callable(to_dict) else config
