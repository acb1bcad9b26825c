"""``convert``: a float checkpoint becomes what transformers/diffusers write after quantizing on
load (same keys, config and bytes), from a single file or a sharded folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import quantsave as qs
from conftest import check_against_reference, files_equal

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

CONFIGS = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "fp4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
    "int8": dict(load_in_8bit=True),
}


def assert_fp4_differs_only_in_zero_signs(ours: Path, ref: Path) -> None:
    from safetensors.torch import load_file

    a, b = load_file(ours), load_file(ref)
    assert list(a) == list(b)
    for key in a:
        if torch.equal(a[key], b[key]):
            continue
        assert a[key].dtype == torch.uint8 and key.endswith(".weight"), key
        na = torch.stack([a[key] >> 4, a[key] & 0xF], -1).reshape(-1)
        nb = torch.stack([b[key] >> 4, b[key] & 0xF], -1).reshape(-1)
        differ = na != nb
        assert bool(((na[differ] & 7) == 0).all() and ((nb[differ] & 7) == 0).all()), key


@pytest.fixture(scope="module")
def llama_sharded(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("llama-sharded")
    transformers.AutoModelForCausalLM.from_pretrained(llama_dir).save_pretrained(path, max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").is_file()
    return path


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("sharded_source", [False, True])
def test_transformers_convert_equals_quantize_on_load(  # type: ignore[no-untyped-def]
    name, sharded_source, llama_dir, llama_sharded, tmp_path, llama_ids
) -> None:
    src = llama_sharded if sharded_source else llama_dir
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        src, quantization_config=transformers.BitsAndBytesConfig(**CONFIGS[name]), device_map="cpu"
    )
    ref.save_pretrained(tmp_path / "hf")
    result = qs.convert(src, tmp_path / "qs", qs.BitsAndBytesConfig(**CONFIGS[name]))
    assert result.num_shards == 1
    if name.startswith("fp4"):
        # fp4 values that round to zero: quantsave sets the sign bit by bitsandbytes' CUDA rule,
        # its CPU path (which transformers used here) differently; nothing else differs.
        assert files_equal(tmp_path / "qs", tmp_path / "hf") == ["model.safetensors"]
        assert_fp4_differs_only_in_zero_signs(
            tmp_path / "qs" / "model.safetensors", tmp_path / "hf" / "model.safetensors"
        )
    else:
        assert files_equal(tmp_path / "qs", tmp_path / "hf") == []
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "qs")
    with torch.no_grad():
        assert torch.equal(loaded(llama_ids).logits, ref(llama_ids).logits)


def test_sharded_output_and_single_file_source(llama_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    qc = CONFIGS["nf4"]
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        llama_dir, quantization_config=transformers.BitsAndBytesConfig(**qc), device_map="cpu"
    )
    ref.save_pretrained(tmp_path / "hf", max_shard_size="30KB")
    qs.convert(llama_dir, tmp_path / "qs", qs.BitsAndBytesConfig(**qc), max_shard_size="30KB")
    check_against_reference(tmp_path / "qs", tmp_path / "hf", "model.safetensors.index.json")
    # A lone .safetensors file with the model passed in.
    skeleton = transformers.AutoModelForCausalLM.from_config(ref.config)
    qs.convert(
        llama_dir / "model.safetensors", tmp_path / "single", {"quant_method": "bitsandbytes", **qc}, model=skeleton
    )
    assert (tmp_path / "single" / "model.safetensors").is_file()


def test_diffusers_convert(sd3_dir, sd3_inputs, diffusers_bnb_on_cpu, tmp_path) -> None:  # type: ignore[no-untyped-def]
    qc = CONFIGS["nf4"]
    ref = diffusers.SD3Transformer2DModel.from_pretrained(
        sd3_dir, quantization_config=diffusers.BitsAndBytesConfig(**qc), device_map="cpu", torch_dtype=torch.float32
    )
    ref.save_pretrained(tmp_path / "hf")
    qs.convert(sd3_dir, tmp_path / "qs", diffusers.BitsAndBytesConfig(**qc), torch_dtype=torch.float32)
    assert files_equal(tmp_path / "qs", tmp_path / "hf") == []


def test_convert_refuses_bad_input(llama_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="bitsandbytes"):
        qs.convert(llama_dir, tmp_path / "a", qs.QuantoConfig())
    nf4 = qs.BitsAndBytesConfig(**CONFIGS["nf4"])
    qs.convert(llama_dir, tmp_path / "q", nf4)
    with pytest.raises(ValueError, match="already quantized"):
        qs.convert(tmp_path / "q", tmp_path / "b", nf4)
    with pytest.raises(ValueError, match="must differ"):
        qs.convert(llama_dir, llama_dir, nf4)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_result_times_its_phases(llama_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = qs.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True)
    result = qs.convert(llama_dir, tmp_path / "dq", config, max_shard_size="60KB")
    assert set(result.timings) == {"plan", "offsets", "write", "commit"}
    assert all(v >= 0 for v in result.timings.values())
    assert result.timings["offsets"] > 0 and result.timings["write"] > 0
    assert sum(result.timings.values()) == pytest.approx(result.seconds, abs=1e-6)
    # Without double quant there is no offset pass.
    result = qs.convert(llama_dir, tmp_path / "int8", qs.BitsAndBytesConfig(load_in_8bit=True))
    assert "offsets" not in result.timings and result.timings["write"] > 0
    # save_quantized records none.
    assert qs.save_quantized(torch.nn.Linear(4, 4), tmp_path / "plain").timings == {}
