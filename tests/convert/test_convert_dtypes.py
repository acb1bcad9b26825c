"""``convert``'s dtypes are quantize-on-load's: ``torch_dtype`` and its defaults (transformers
"auto", the config's dtype; diffusers float16), sources stored in another dtype than the model
loads, and the models' ``_keep_in_fp32_modules`` upcast to float32 (diffusers' Wan family,
transformers' T5 under float16)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import quantsave as qs
from conftest import files_equal

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

CONFIGS = {
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "int8": dict(load_in_8bit=True),
}

TINY_WAN = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=8,
    in_channels=4,
    out_channels=4,
    text_dim=16,
    freq_dim=16,
    ffn_dim=32,
    num_layers=2,
    rope_max_seq_len=32,
)


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bf16 Wan transformer (norms, time embedder and scale-shift tables kept in float32 on load)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("wan")
    diffusers.WanTransformer3DModel(**TINY_WAN).to(torch.bfloat16).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("t5")
    config = transformers.T5Config(
        vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0
    )
    transformers.T5ForConditionalGeneration(config).save_pretrained(path)
    return path


def _diffusers_ref(src: Path, out: Path, name: str, torch_dtype: torch.dtype | None) -> None:
    kwargs = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
    ref = diffusers.WanTransformer3DModel.from_pretrained(
        src, quantization_config=diffusers.BitsAndBytesConfig(**CONFIGS[name]), device_map="cpu", **kwargs
    )
    ref.save_pretrained(out)


@pytest.mark.parametrize("torch_dtype", [None, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_diffusers_dtypes_and_fp32_modules(  # type: ignore[no-untyped-def]
    wan_dir, name, torch_dtype, diffusers_bnb_on_cpu, tmp_path
) -> None:
    _diffusers_ref(wan_dir, tmp_path / "hf", name, torch_dtype)
    qs.convert(wan_dir, tmp_path / "qs", qs.BitsAndBytesConfig(**CONFIGS[name]), torch_dtype=torch_dtype)
    assert files_equal(tmp_path / "qs", tmp_path / "hf") == []
    tensors = load_file(tmp_path / "qs" / "diffusion_pytorch_model.safetensors")
    assert tensors["scale_shift_table"].dtype == torch.float32
    plain = tensors["patch_embedding.weight"].dtype
    assert plain == (torch_dtype or torch.float16)


def test_diffusers_dtype_by_name_and_cli(wan_dir, diffusers_bnb_on_cpu, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from quantsave.cli import main

    _diffusers_ref(wan_dir, tmp_path / "hf", "nf4-dq", torch.bfloat16)
    assert main(["convert", str(wan_dir), str(tmp_path / "cli"), "--quant", "nf4", "--double-quant",
                 "--dtype", "bfloat16", "-q"]) == 0  # fmt: skip
    assert files_equal(tmp_path / "cli", tmp_path / "hf") == []
    with pytest.raises(ValueError, match="torch_dtype"):
        qs.convert(wan_dir, tmp_path / "bad", qs.BitsAndBytesConfig(**CONFIGS["int8"]), torch_dtype="int8")
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_transformers_dtypes(llama_dir, name, dtype, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """An fp32 Llama quantized on load as bf16 or fp16 (weights cast before quantizing)."""
    kwargs = {"device_map": "cpu"} if dtype is None else {"device_map": "cpu", "dtype": dtype}
    bnb = transformers.BitsAndBytesConfig(**CONFIGS[name])
    ref = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=bnb, **kwargs)
    ref.save_pretrained(tmp_path / "hf")
    qs.convert(llama_dir, tmp_path / "qs", qs.BitsAndBytesConfig(**CONFIGS[name]), torch_dtype=dtype)
    assert files_equal(tmp_path / "qs", tmp_path / "hf") == []


def test_transformers_source_dtype_differs_from_config(llama_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """fp32 tensors under a config that says bfloat16: "auto" loads them as bf16."""
    import json
    import shutil

    src = tmp_path / "src"
    shutil.copytree(llama_dir, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["dtype"] = "bfloat16"
    (src / "config.json").write_text(json.dumps(cfg))
    bnb = transformers.BitsAndBytesConfig(**CONFIGS["nf4-dq"])
    ref = transformers.AutoModelForCausalLM.from_pretrained(src, quantization_config=bnb, device_map="cpu")
    ref.save_pretrained(tmp_path / "hf")
    qs.convert(src, tmp_path / "qs", qs.BitsAndBytesConfig(**CONFIGS["nf4-dq"]))
    assert files_equal(tmp_path / "qs", tmp_path / "hf") == []
    assert load_file(tmp_path / "qs" / "model.safetensors")["model.norm.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize("name", list(CONFIGS))
def test_transformers_keep_in_fp32_under_float16(t5_dir, name, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """T5 keeps its ``wo`` projections in float32 when loaded as float16 (and does not quantize them)."""
    bnb = transformers.BitsAndBytesConfig(**CONFIGS[name])
    ref = transformers.T5ForConditionalGeneration.from_pretrained(
        t5_dir, quantization_config=bnb, device_map="cpu", dtype=torch.float16
    )
    ref.save_pretrained(tmp_path / "hf")
    qs.convert(t5_dir, tmp_path / "qs", qs.BitsAndBytesConfig(**CONFIGS[name]), torch_dtype=torch.float16)
    assert files_equal(tmp_path / "qs", tmp_path / "hf") == []
    tensors = load_file(tmp_path / "qs" / "model.safetensors")
    assert tensors["encoder.block.0.layer.1.DenseReluDense.wo.weight"].dtype == torch.float32
    assert tensors["shared.weight"].dtype == torch.float16
