"""The backends' on-disk layouts (``quantsave.backends.<b>.layout``) against what the libraries
themselves write: the tensors ``convert`` plans for a bitsandbytes weight equal a quantized
layer's state dict, byte counts and parameter counts agree, and verify/inspect reach the
layouts through the quantizer registry. Also the recorded config on a model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import quantsave as qs
from quantsave.backends.bitsandbytes import layout as bnb
from quantsave.backends.quanto import layout as quanto
from quantsave.backends.registry import get_quantizer, quantizer_classes, record_config, recorded_config
from quantsave.checkpoint.reader import open_checkpoint
from quantsave.checkpoint.tensors import dtype_name
from quantsave.families import total_parameters

pytest.importorskip("bitsandbytes")

CONFIGS = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "fp4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
    "int8": dict(load_in_8bit=True),
}
SHAPES = [(8, 100), (300, 7), (3, 5), (1, 1)]


def _quantized(rows: int, cols: int, config: qs.BitsAndBytesConfig) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(cols, rows, bias=False).to(torch.bfloat16))
    return qs.quantize(model, config)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_bnb_specs_equal_the_layer_state_dict(name: str, shape: tuple[int, int]) -> None:
    """weight_spec + state_specs (+ quant_state_json) name exactly the tensors bitsandbytes'
    layer saves, with their dtypes, shapes and quant-state bytes; quantized_bytes counts them."""
    config = qs.BitsAndBytesConfig(**CONFIGS[name])
    rows, cols = shape
    sd = _quantized(rows, cols, config).state_dict()
    state = b""
    offset = None
    if config.bits == 4:
        real_state = bytes(sd[bnb.state_key("0.weight", config.bnb_4bit_quant_type)].numpy().tobytes())
        offset = json.loads(real_state).get("nested_offset")
        state = bnb.quant_state_json(config.bnb_4bit_quant_type, "bfloat16", [rows, cols], offset)
        assert state == real_state
    specs = [("0.weight", *bnb.weight_spec(rows, cols, config.bits))]
    specs += bnb.state_specs(
        "0.weight",
        rows,
        cols,
        bits=config.bits,
        quant_type=config.bnb_4bit_quant_type,
        double=offset is not None,
        state_len=len(state),
    )
    assert [(k, dtype_name(t.dtype), list(t.shape)) for k, t in sd.items()] == specs
    on_disk = sum(t.numel() * t.element_size() for t in sd.values())
    bound = bnb.quantized_bytes(rows, cols, "bfloat16", config)
    assert bound == on_disk if offset is None else on_disk <= bound <= on_disk + 24
    assert bnb.weight_groups(list(sd)) == dict.fromkeys(sd, "0")


@pytest.mark.parametrize("name", ["nf4", "int8"])
def test_bnb_parameter_counts(name: str) -> None:
    """transformers' total_parameters: a packed 4-bit weight counts 2 per stored byte."""
    config = qs.BitsAndBytesConfig(**CONFIGS[name])
    model = _quantized(3, 5, config)
    expected = 16 if config.bits == 4 else 15  # 15 values: 8 packed bytes, 2 counted per byte
    if config.bits == 4:
        assert bnb.logical_parameters(bnb.packed_bytes(15)) == expected
    assert bnb.parameter_count(model[0].weight) == expected
    assert total_parameters(model) == expected


def test_inspect_and_verify_reach_the_layouts(tmp_path: Path) -> None:
    """Every registered quantizer answers count_parameters; verify asks the config's quantizer."""
    model = _quantized(8, 100, qs.BitsAndBytesConfig(**CONFIGS["nf4"]))
    qs.save_quantized(model, tmp_path / "ckpt")
    ckpt = open_checkpoint(tmp_path / "ckpt")
    counts = {cls.quant_method: cls.count_parameters(ckpt, None) for cls in quantizer_classes()}
    assert counts["bitsandbytes"].counted == {"0.weight": 800}
    assert counts["bitsandbytes"].float_dtype == "bfloat16"
    assert all(not c.counted for m, c in counts.items() if m != "bitsandbytes")
    assert [cls.quant_method for cls in quantizer_classes() if cls.needs_config(ckpt)] == ["bitsandbytes"]
    assert get_quantizer(qs.BitsAndBytesConfig(**CONFIGS["nf4"])).check_checkpoint(ckpt) == []
    problems = get_quantizer(qs.BitsAndBytesConfig(load_in_8bit=True)).check_checkpoint(ckpt)
    assert problems == ["quant_method 'bitsandbytes' (8-bit) but no '*.SCB' tensors in the shards"]
    assert get_quantizer(qs.QuantoConfig()).check_checkpoint(ckpt) == [
        "quant_method 'quanto' but no '*.weight._data' tensors in the shards"
    ]


def test_quanto_groups_and_owner() -> None:
    keys = ["a.weight._data", "a.weight._scale", "a.input_scale", "a.output_scale", "a.bias", "b.input_scale"]
    assert quanto.owner("a.weight._data._data") == "a"
    assert quanto.owner("a.bias") is None
    assert quanto.weight_groups(keys) == dict.fromkeys(keys[:4], "a")


def test_recorded_config_has_one_home() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    assert recorded_config(model) is None
    config = qs.BitsAndBytesConfig(load_in_8bit=True)
    qs.quantize(model, config)
    assert recorded_config(model) is config
    record_config(model, qs.QuantoConfig("int4"))
    assert recorded_config(model) == qs.QuantoConfig("int4")
