"""``save_quantized(float_model, quantization_config=bitsandbytes config)`` quantizes the Linear
layers on the way, one at a time: the folder is byte for byte ``quantize`` + ``save_quantized``,
and the float model is left as it was."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

import quantsave as qs
from conftest import sd3_kwargs, tiny_llama_config

CONFIGS = {
    "nf4-dq": dict(quant_method="bitsandbytes", load_in_4bit=True, bnb_4bit_quant_type="nf4",
                   bnb_4bit_use_double_quant=True),
    "fp4": dict(quant_method="bitsandbytes", load_in_4bit=True),
    "int8": dict(quant_method="bitsandbytes", load_in_8bit=True),
}  # fmt: skip


def _llama() -> nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config())


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=16))


def _sd3() -> nn.Module:
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(**sd3_kwargs())


def _plain() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32, bias=False))


MODELS = {"llama": _llama, "gpt2": _gpt2, "sd3": _sd3, "plain": _plain}


def _same_folder(a: Path, b: Path) -> None:
    assert sorted(os.listdir(a)) == sorted(os.listdir(b))
    for name in os.listdir(a):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("shard", [None, "20KB"])
def test_float_model_is_quantized_on_the_way(model: str, config: str, shard: str | None, tmp_path: Path) -> None:
    float_model = MODELS[model]()
    before = {k: v.clone() for k, v in float_model.state_dict().items()}
    qs.save_quantized(float_model, tmp_path / "on-the-way", quantization_config=CONFIGS[config], max_shard_size=shard)
    # The model itself is not changed.
    assert all(type(m) is not nn.Module and "bitsandbytes" not in type(m).__module__ for m in float_model.modules())
    after = float_model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)

    reference = qs.quantize(MODELS[model](), CONFIGS[config])
    qs.save_quantized(reference, tmp_path / "reference", max_shard_size=shard)
    _same_folder(tmp_path / "on-the-way", tmp_path / "reference")
