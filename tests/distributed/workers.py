"""Rank processes for the distributed tests: each runs a list of scenarios on a gloo group over
the CPU and writes what happened to ``<out>/<scenario>.rank<r>.json``; the models are built
here with fixed seeds so the tests can build the same ones in one process for reference."""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

NF4_DQ = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
          "bnb_4bit_use_double_quant": True}  # fmt: skip
NF4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
INT8 = {"quant_method": "bitsandbytes", "load_in_8bit": True}


def llama(seed: int = 0) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def sd3(seed: int = 0) -> Any:
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
    )  # fmt: skip


def blocks(model: Any) -> list[Any]:
    if hasattr(model, "transformer_blocks"):
        return list(model.transformer_blocks)
    return list(model.model.layers)


def fsdp(model: Any, mesh: Any) -> Any:
    from torch.distributed.fsdp import fully_shard

    for block in blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def tp(model: Any, mesh: Any) -> Any:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan = {
        "model.layers.*.self_attn.q_proj": ColwiseParallel(),
        "model.layers.*.self_attn.k_proj": ColwiseParallel(),
        "model.layers.*.self_attn.v_proj": ColwiseParallel(),
        "model.layers.*.self_attn.o_proj": RowwiseParallel(),
        "model.layers.*.mlp.gate_proj": ColwiseParallel(),
        "model.layers.*.mlp.up_proj": ColwiseParallel(),
        "model.layers.*.mlp.down_proj": RowwiseParallel(),
        "lm_head": ColwiseParallel(),
    }
    return parallelize_module(model, mesh, plan)


#: name -> (model builder, sharding, quantization config, max_shard_size)
CASES: dict[str, tuple[str, str, Any, Any]] = {
    "llama-fsdp-nf4dq": ("llama", "fsdp", NF4_DQ, "40KB"),
    "llama-tp-int8": ("llama", "tp", INT8, "30KB"),
    "llama-fsdp-float": ("llama", "fsdp", None, "50KB"),
    "llama-replicated-nf4": ("llama", "quantized", NF4, "20KB"),
    "sd3-fsdp-nf4": ("sd3", "fsdp", NF4, "15KB"),
    "sd3-fsdp-int8-one-file": ("sd3", "fsdp", INT8, None),
}


#: name -> (source under the output folder, config, max_shard_size, convert's other arguments,
#: with paths under the output folder). The weights a LoRA merge or a single file's key mapping
#: makes are made in Python by the rank that owns them.
CONVERTS: dict[str, tuple[str, Any, Any, dict[str, Any]]] = {
    "convert-llama-nf4dq": ("src-llama", NF4_DQ, "40KB", {}),
    "convert-llama-int8-one-file": ("src-llama", INT8, None, {}),
    "convert-sd3-nf4": ("src-sd3", NF4, "15KB", {}),
    "convert-llama-lora-nf4dq": ("src-llama", NF4_DQ, "40KB", {"lora": ["lora-llama"]}),
    "convert-sd3-single-file-nf4dq": (
        "src-sd3-single/sd3.safetensors", NF4_DQ, "15KB",
        {"model_class": "SD3Transformer2DModel", "model_config": "src-sd3-single/config", "torch_dtype": "float32"},
    ),
}


def convert_arguments(out: Path, extra: dict[str, Any]) -> dict[str, Any]:
    """A case's other arguments with its paths made absolute."""
    args = dict(extra)
    if "lora" in args:
        args["lora"] = [out / name for name in args["lora"]]
    if "model_config" in args:
        args["model_config"] = out / args["model_config"]
    return args


def write_sources(out: Path) -> None:
    """The float checkpoints the conversions read, saved by transformers and diffusers, and a
    PEFT adapter for the Llama."""
    import peft

    llama().save_pretrained(out / "src-llama")
    sd3().save_pretrained(out / "src-sd3")
    torch.manual_seed(5)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    peft.get_peft_model(llama(), config).save_pretrained(out / "lora-llama")
    # The SD3 transformer as an original single file (tests/convert/originals.py).
    import safetensors.torch

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "convert"))
    from originals import sd3_original

    model = sd3()
    model.save_config(out / "src-sd3-single" / "config")
    safetensors.torch.save_file(sd3_original(model.state_dict(), 2), out / "src-sd3-single" / "sd3.safetensors")


def build(case: str, mesh: Any) -> Any:
    import quantsave

    name, sharding, config, _ = CASES[case]
    model = llama() if name == "llama" else sd3()
    if sharding == "fsdp":
        return fsdp(model, mesh)
    if sharding == "tp":
        return tp(model, mesh)
    if sharding == "quantized":
        return quantsave.quantize(model, config)
    return model


def reference(case: str, out: Path) -> None:
    """The single-process save of the case's model."""
    import quantsave

    name, _, config, shard = CASES[case]
    model = llama() if name == "llama" else sd3()
    if config is not None:
        quantsave.quantize(model, config)
    quantsave.save_quantized(model, out, max_shard_size=shard)


def vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _record(out: Path, name: str, rank: int, **info: Any) -> None:
    (out / f"{name}.rank{rank}.json").write_text(json.dumps(info), encoding="utf-8")


def _attempt(out: Path, name: str, rank: int, model: Any, target: Path, **kw: Any) -> None:
    """``save_quantized(model, target, **kw)``, its outcome recorded."""
    import quantsave

    t0 = time.perf_counter()
    try:
        result = quantsave.save_quantized(model, target, **kw)
        _record(out, name, rank, ok=True, files=getattr(result, "files", None), seconds=time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 - recorded for the test to check
        _record(out, name, rank, ok=False, type=type(e).__name__, error=str(e), notes=getattr(e, "__notes__", []),
                trace=traceback.format_exc(), seconds=time.perf_counter() - t0)  # fmt: skip


def _attempt_convert(out: Path, name: str, rank: int, src: Path, dst: Path, config: Any, **kw: Any) -> None:
    """``convert(src, dst, config, **kw)``, its outcome recorded."""
    import quantsave

    t0 = time.perf_counter()
    try:
        result = quantsave.convert(src, dst, config, **kw)
        _record(out, name, rank, ok=True, files=result.files, seconds=time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 - recorded for the test to check
        _record(out, name, rank, ok=False, type=type(e).__name__, error=str(e), notes=getattr(e, "__notes__", []),
                trace=traceback.format_exc(), seconds=time.perf_counter() - t0)  # fmt: skip


def run(rank: int, world: int, port: int, scenarios: list[str], out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import quantsave

    out = Path(out_dir)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    mesh = init_device_mesh("cpu", (world,))
    for scenario in scenarios:
        if scenario in CASES:
            model = build(scenario, mesh)
            _, sharding, config, shard = CASES[scenario]
            qc = None if sharding == "quantized" else config
            _attempt(out, scenario, rank, model, out / scenario, quantization_config=qc, max_shard_size=shard)
        elif scenario in CONVERTS:
            src, config, shard, extra = CONVERTS[scenario]
            _attempt_convert(out, scenario, rank, out / src, out / scenario, config, max_shard_size=shard,
                             **convert_arguments(out, extra))  # fmt: skip
        elif scenario == "convert-hidden-src":
            if rank == 1:
                from quantsave.convert import model as convert_model

                def hidden(path: Path) -> Any:
                    raise FileNotFoundError(f"no such file or folder: {str(path)!r}")

                convert_model.read_source = hidden  # type: ignore[assignment]
            _attempt_convert(out, scenario, rank, out / "src-llama", out / scenario, NF4)
        elif scenario == "mismatch":
            model = fsdp(llama(), mesh)
            shard = "40KB" if rank != 1 else "50KB"
            _attempt(out, scenario, rank, model, out / scenario, quantization_config=NF4, max_shard_size=shard)
        elif scenario == "mismatch-threads":
            # torch's float32 mean (the double-quant offset) depends on the thread count.
            before = torch.get_num_threads()
            torch.set_num_threads(1 if rank == 1 else 2)
            try:
                _attempt_convert(out, scenario, rank, out / "src-llama", out / scenario, NF4_DQ)
            finally:
                torch.set_num_threads(before)
        elif scenario.startswith("kill"):
            # An old checkpoint, then a save in which rank 1 dies while writing.
            model = fsdp(llama(), mesh)
            quantsave.save_quantized(model, out / "kill", quantization_config=NF4, max_shard_size="40KB")
            dist.barrier()
            other = fsdp(llama(seed=1), mesh)
            if rank == 1:
                from quantsave.distributed import save as dsave

                def die(self: Any, i: int) -> Any:
                    os._exit(3)

                dsave.SharedFiles.writer = die  # type: ignore[method-assign]
            _attempt(out, scenario, rank, other, out / "kill", quantization_config=NF4, max_shard_size="40KB")
        elif scenario == "stall":
            model = fsdp(llama(), mesh)
            if rank == 1:
                time.sleep(float(os.environ["QUANTSAVE_DIST_TIMEOUT"]) * 3)
                _record(out, scenario, rank, ok=True, slept=True)
                os._exit(0)
            _attempt(out, scenario, rank, model, out / scenario, quantization_config=NF4)
        elif scenario == "memory":
            _memory(rank, world, mesh, out)
    dist.destroy_process_group()


#: The memory case: 12 Linear layers of 2560 x 2560 float32 (315 MB), FSDP2-sharded.
MEMORY_LAYERS, MEMORY_WIDTH = 12, 2560


def _memory(rank: int, world: int, mesh: Any, out: Path) -> None:
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    import quantsave

    with torch.device("meta"):
        model = nn.Sequential(*[nn.Linear(MEMORY_WIDTH, MEMORY_WIDTH) for _ in range(MEMORY_LAYERS)])
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(rank)
    with torch.no_grad():
        for p in model.parameters():
            p.to_local().uniform_(-0.05, 0.05, generator=g)  # type: ignore[attr-defined]
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    quantsave.quantize(nn.Linear(64, 64), NF4_DQ)  # bitsandbytes' one-time set-up, outside the measure
    rss = vm("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    t0 = time.perf_counter()
    quantsave.save_quantized(model, out / "memory", quantization_config=NF4_DQ, max_shard_size="20MB")
    _record(out, "memory", rank, ok=True, rss_before=rss, hwm=vm("VmHWM"), model_bytes=model_bytes,
            seconds=time.perf_counter() - t0)  # fmt: skip
