"""The public API on plain modules: float and hand-built bitsandbytes layers, SaveResult,
progress, memory-mapped loading."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import quantsave as qs


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 64), nn.LayerNorm(64), nn.Linear(64, 8))


def test_public_names() -> None:
    for name in qs.__all__:
        assert hasattr(qs, name), name
    assert issubclass(qs.NotSerializableError, ValueError)
    assert issubclass(qs.CheckpointError, ValueError)


def test_plain_float_round_trip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = _mlp().to(torch.bfloat16)
    result = qs.save_quantized(model, tmp_path / "m")
    assert result.num_shards == 1 and result.files == ["model.safetensors"]
    assert result.total_bytes == (tmp_path / "m" / "model.safetensors").stat().st_size
    assert not (tmp_path / "m" / "config.json").exists()  # nothing to record for a plain float module
    state_dict, config = qs.load_state_dict(tmp_path / "m")
    assert config is None
    for k, v in model.state_dict().items():
        assert torch.equal(state_dict[k], v)
    loaded = qs.load_quantized(tmp_path / "m", _mlp(1).to(torch.bfloat16))
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    assert torch.equal(loaded(x), model.eval()(x))


def test_loaded_tensors_view_the_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    qs.save_quantized(_mlp(), tmp_path / "m")
    state_dict, _ = qs.load_state_dict(tmp_path / "m")
    ptrs = {t.untyped_storage().data_ptr() for t in state_dict.values()}
    assert len(ptrs) == 1  # one mapping per file, no per-tensor copies
    # Writing to a loaded tensor never changes the file (private mapping).
    before = (tmp_path / "m" / "model.safetensors").read_bytes()
    next(iter(state_dict.values())).add_(1)
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("bits", [4, 8])
def test_hand_built_bnb_layers(bits, tmp_path) -> None:  # type: ignore[no-untyped-def]
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    ref = nn.Linear(64, 32)
    if bits == 4:
        layer = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="fp4", compress_statistics=True)
        layer.weight = bnb.nn.Params4bit(
            ref.weight.data.clone(), requires_grad=False, quant_type="fp4", compress_statistics=True
        )
    else:
        layer = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(ref.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    layer.bias = nn.Parameter(ref.bias.data.clone(), requires_grad=False)
    model = nn.Sequential(layer.to("cpu"), nn.ReLU(), nn.Linear(32, 4)).eval()
    qs.save_quantized(model, tmp_path / "m", max_shard_size=1000)
    config = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes"
    if bits == 4:
        assert config["load_in_4bit"] and config["bnb_4bit_quant_type"] == "fp4" and config["bnb_4bit_use_double_quant"]
    else:
        assert config["load_in_8bit"]
    assert config["llm_int8_skip_modules"] == ["2"]  # the float Linear left unquantized
    skeleton = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    loaded = qs.load_quantized(tmp_path / "m", skeleton)
    x = torch.randn(3, 64)
    assert torch.equal(loaded(x), model(x))


def test_quantize_records_config(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("bitsandbytes")
    model = qs.quantize(_mlp(), {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"})
    qs.save_quantized(model, tmp_path / "m")
    _, config = qs.load_state_dict(tmp_path / "m")
    assert isinstance(config, qs.BitsAndBytesConfig) and config.bnb_4bit_quant_type == "nf4"


def test_progress_bar_and_variant(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    result = qs.save_quantized(_mlp(), tmp_path / "m", max_shard_size="10KB", variant="fp16", progress=True)
    assert result.num_shards > 1
    assert "Writing shards" in capsys.readouterr().err
    names = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert "model.safetensors.index.fp16.json" in names
    assert f"model.fp16-00001-of-{result.num_shards:05d}.safetensors" in names
    state_dict, _ = qs.load_state_dict(tmp_path / "m", variant="fp16")
    assert set(state_dict) == set(_mlp().state_dict())
    with pytest.raises(FileNotFoundError):
        qs.load_state_dict(tmp_path / "m")


def test_non_contiguous_tensors_saved_correctly(tmp_path) -> None:  # type: ignore[no-untyped-def]
    module = nn.Module()
    base = torch.arange(48, dtype=torch.float32).reshape(6, 8)
    module.register_buffer("t", base.t())
    module.register_buffer("s", torch.arange(20, dtype=torch.int64)[::3].clone()[::2])
    qs.save_quantized(module, tmp_path / "m")
    state_dict, _ = qs.load_state_dict(tmp_path / "m")
    assert torch.equal(state_dict["t"], base.t()) and torch.equal(state_dict["s"], module.s)
