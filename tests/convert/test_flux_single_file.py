"""An original Flux file at Flux's real widths (diffusers' converter fixes them; 1 double and 1
single block, about 1.1 GB in bf16) with a kohya Flux LoRA, converted in one pass to an nf4
diffusers folder, against the reference: ``from_single_file`` + the pipeline's
``load_lora_weights`` steps + ``fuse_lora`` + quantize-on-load + ``save_pretrained``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

import quantsave as qs
from conftest import files_equal, quantized_on_load

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from originals import FLUX_H, FLUX_MLP, write_flux_original  # noqa: E402

NF4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)


@pytest.fixture(scope="module")
def flux(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """The Flux file, its config folder and a kohya LoRA (fused qkv, linear1 and an mlp layer)."""
    folder = tmp_path_factory.mktemp("flux-single")
    file = write_flux_original(folder, 1, 1)
    g = torch.Generator().manual_seed(6)
    lora: dict[str, torch.Tensor] = {}
    for name, out in (("double_blocks_0_img_attn_qkv", 3 * FLUX_H), ("double_blocks_0_txt_mlp_0", FLUX_MLP),
                      ("single_blocks_0_linear1", 3 * FLUX_H + FLUX_MLP)):  # fmt: skip
        lora[f"lora_unet_{name}.lora_down.weight"] = torch.randn(4, FLUX_H, generator=g).to(torch.bfloat16) * 0.1
        lora[f"lora_unet_{name}.lora_up.weight"] = torch.randn(out, 4, generator=g).to(torch.bfloat16) * 0.1
        lora[f"lora_unet_{name}.alpha"] = torch.tensor(2.0)
    safetensors.torch.save_file(lora, folder / "kohya.safetensors")
    return file, folder / "config", folder / "kohya.safetensors"


def test_flux_file_and_kohya_lora_equal_the_reference(flux, diffusers_bnb_on_cpu, tmp_path) -> None:  # type: ignore[no-untyped-def]
    file, config, lora = flux
    bf16 = torch.bfloat16
    ref = diffusers.FluxTransformer2DModel.from_single_file(str(file), config=str(config), torch_dtype=bf16)
    # FluxPipeline.load_lora_weights's steps for the transformer.
    state_dict, alphas, metadata = diffusers.FluxPipeline.lora_state_dict(
        str(lora), return_alphas=True, return_lora_metadata=True
    )
    diffusers.FluxPipeline.load_lora_into_transformer(state_dict, network_alphas=alphas, transformer=ref,
                                                      metadata=metadata)  # fmt: skip
    ref.fuse_lora(lora_scale=0.8)
    ref.unload_lora()
    bnb = diffusers.BitsAndBytesConfig(**NF4)
    quantized_on_load(ref, tmp_path, bnb, bf16)
    del ref
    qs.convert(file, tmp_path / "qs", bnb, torch_dtype=bf16, model_class="FluxTransformer2DModel",
               model_config=config, lora=[(lora, 0.8)])  # fmt: skip
    assert files_equal(tmp_path / "qs", tmp_path / "hf") == ["config.json"]
    ours = json.loads((tmp_path / "qs" / "config.json").read_text())
    theirs = json.loads((tmp_path / "hf" / "config.json").read_text())
    theirs.pop("_name_or_path")  # the merged copy's folder; from_single_file records none
    assert ours == theirs
