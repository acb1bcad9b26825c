"""transformers bitsandbytes models: quantsave's files load with ``from_pretrained`` (no
quantization arguments) with identical logits, match transformers' own bytes, and checkpoints
transformers wrote load with quantsave."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import quantsave as qs
from conftest import check_against_reference, files_equal

transformers = pytest.importorskip("transformers")

CONFIGS = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "nf4-dq-bf16": dict(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    ),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "fp4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
    "int8": dict(load_in_8bit=True),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def quantized(request: pytest.FixtureRequest, llama_dir: Path):  # type: ignore[no-untyped-def]
    qc = transformers.BitsAndBytesConfig(**CONFIGS[request.param])
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=qc, device_map="cpu")
    return request.param, model


def _logits(model, ids):  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_quantsave_checkpoint_loads_in_transformers(quantized, shard, tmp_path, llama_ids) -> None:  # type: ignore[no-untyped-def]
    name, model = quantized
    expected = _logits(model, llama_ids)
    result = qs.save_quantized(model, tmp_path / "qs", max_shard_size=shard)
    assert (result.num_shards > 1) == (shard is not None)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "qs")
    assert reloaded.config.quantization_config.to_dict() == model.config.quantization_config.to_dict()
    layer = reloaded.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == ("Linear8bitLt" if name == "int8" else "Linear4bit")
    assert torch.equal(_logits(reloaded, llama_ids), expected)


def test_unsharded_bytes_equal_transformers(quantized, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _, model = quantized
    qs.save_quantized(model, tmp_path / "qs")
    model.save_pretrained(tmp_path / "hf")
    assert files_equal(tmp_path / "qs", tmp_path / "hf") == []


@pytest.mark.parametrize("shard", ["20KB", "60KB"])
def test_sharded_matches_reference_except_split_weights(quantized, shard, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _, model = quantized
    qs.save_quantized(model, tmp_path / "qs", max_shard_size=shard)
    model.save_pretrained(tmp_path / "hf", max_shard_size=shard)
    check_against_reference(tmp_path / "qs", tmp_path / "hf", "model.safetensors.index.json")


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_transformers_checkpoint_loads_in_quantsave(quantized, shard, tmp_path, llama_ids) -> None:  # type: ignore[no-untyped-def]
    _, model = quantized
    model.save_pretrained(tmp_path / "hf", max_shard_size=shard or "50GB")
    expected = _logits(model, llama_ids)
    reloaded = qs.load_quantized(tmp_path / "hf")
    assert torch.equal(_logits(reloaded, llama_ids), expected)
    state_dict, config = qs.load_state_dict(tmp_path / "hf")
    assert config == qs.BitsAndBytesConfig.from_dict(model.config.quantization_config.to_dict())
    ref = model.state_dict()
    assert set(state_dict) == set(ref)
    for k, v in state_dict.items():
        assert torch.equal(v, ref[k].cpu()), k


def test_load_into_meta_skeleton_and_resave(quantized, tmp_path, llama_ids) -> None:  # type: ignore[no-untyped-def]
    from conftest import tiny_llama_config

    _, model = quantized
    qs.save_quantized(model, tmp_path / "a", max_shard_size="30KB")
    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM(tiny_llama_config())
    # Non-persistent buffers (rotary frequencies) must be real: rebuild them on the CPU.
    skeleton.model.rotary_emb = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(skeleton.config)
    loaded = qs.load_quantized(tmp_path / "a", skeleton)
    assert torch.equal(_logits(loaded, llama_ids), _logits(model, llama_ids))
    # Saving what was loaded gives the same tensors, config and index metadata again.
    qs.save_quantized(loaded, tmp_path / "b", max_shard_size="30KB")
    a, ca = qs.load_state_dict(tmp_path / "a")
    b, cb = qs.load_state_dict(tmp_path / "b")
    assert ca == cb and set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    index = "model.safetensors.index.json"
    assert json.loads((tmp_path / "a" / index).read_text())["metadata"] == json.loads(
        (tmp_path / "b" / index).read_text()
    )["metadata"]
    assert (tmp_path / "a" / "config.json").read_bytes() == (tmp_path / "b" / "config.json").read_bytes()


def test_meta_skeleton_buffers_are_recreated(quantized, tmp_path, llama_ids) -> None:  # type: ignore[no-untyped-def]
    """A skeleton built entirely on the meta device (buffers included) runs after loading: its
    non-persistent buffers (rotary ``inv_freq``) are computed as ``from_pretrained`` computes them."""
    from conftest import tiny_llama_config

    _, model = quantized
    qs.save_quantized(model, tmp_path / "a")
    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM(tiny_llama_config())
    loaded = qs.load_quantized(tmp_path / "a", skeleton)
    assert not [n for n, t in [*loaded.named_parameters(), *loaded.named_buffers()] if t.is_meta]
    assert torch.equal(loaded.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)
    assert torch.equal(_logits(loaded, llama_ids), _logits(model, llama_ids))


@pytest.mark.parametrize("name", ["nf4", "nf4-dq-bf16", "int8"])
def test_hand_quantized_llama_matches_from_pretrained(name, llama_dir, tmp_path, llama_ids) -> None:  # type: ignore[no-untyped-def]
    """``quantsave.quantize`` (the Rust codec on the CPU) on a float transformers model writes the
    tensors transformers writes after quantizing with bitsandbytes."""
    qc = transformers.BitsAndBytesConfig(**CONFIGS[name])
    ref = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=qc, device_map="cpu")
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_dir)
    qs.quantize(model, qc, modules_to_not_convert=["lm_head"])
    qs.save_quantized(model, tmp_path / "qs")
    ref.save_pretrained(tmp_path / "hf")
    a, _ = qs.load_state_dict(tmp_path / "qs")
    b, _ = qs.load_state_dict(tmp_path / "hf")
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "qs")
    assert torch.equal(_logits(reloaded, llama_ids), _logits(ref, llama_ids))
