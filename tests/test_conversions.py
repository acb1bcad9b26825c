"""transformers' own key rules on real-checkpoint conventions: legacy keys the model ignores
(a sentence-transformers BERT's ``embeddings.position_ids``), mixture-of-experts checkpoints whose
per-expert weights transformers fuses on load and splits back on save, and a model whose float
buffers take the checkpoint's dtype (CodeGen's sinusoidal positions), and GPT-2's Conv1D layers
(quantized as the Linear layers they stand for). For each: ``convert`` writes
what quantize-on-load + ``save_pretrained`` writes, ``load_quantized`` of the reference folder gives
the reference's outputs, and ``save_quantized`` of that model writes the reference's bytes again."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import quantsave as qs
from conftest import check_against_reference

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

CONFIGS = {
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "int8": dict(load_in_8bit=True),
}
SMALL = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)


def _mixtral() -> Any:
    config = transformers.MixtralConfig(
        **SMALL, intermediate_size=64, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        tie_word_embeddings=False,
    )
    return transformers.MixtralForCausalLM(config)


def _qwen3_moe() -> Any:
    config = transformers.Qwen3MoeConfig(
        **SMALL, intermediate_size=64, moe_intermediate_size=32, num_key_value_heads=2, num_experts=4,
        num_experts_per_tok=2, head_dim=16, tie_word_embeddings=False,
    )
    return transformers.Qwen3MoeForCausalLM(config)


def _bert() -> Any:
    config = transformers.BertConfig(**SMALL, intermediate_size=128, max_position_embeddings=32)
    return transformers.BertModel(config, add_pooling_layer=True)


def _codegen() -> Any:
    config = transformers.CodeGenConfig(
        vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, rotary_dim=8, tie_word_embeddings=False
    )
    return transformers.CodeGenForCausalLM(config).to(torch.bfloat16)


def _gpt2() -> Any:
    """GPT-2's attention and MLP are Conv1D layers (weights stored [in, out])."""
    config = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=32)
    return transformers.GPT2LMHeadModel(config)


def _add_legacy_position_ids(folder: Path) -> None:
    """As sentence-transformers BERT checkpoints on the Hub hold: the old persistent buffer."""
    path = folder / "model.safetensors"
    tensors = load_file(path)
    tensors["embeddings.position_ids"] = torch.arange(32).unsqueeze(0)
    save_file(tensors, path, metadata={"format": "pt"})


MODELS: dict[str, tuple[Callable[[], Any], Any, Callable[[Path], None] | None]] = {
    "mixtral": (_mixtral, "AutoModelForCausalLM", None),
    "qwen3_moe": (_qwen3_moe, "AutoModelForCausalLM", None),
    "bert-legacy-keys": (_bert, "AutoModel", _add_legacy_position_ids),
    "codegen-bf16": (_codegen, "AutoModelForCausalLM", None),
    "gpt2-conv1d": (_gpt2, "AutoModelForCausalLM", None),
}


@pytest.fixture(scope="module", params=list(MODELS))
def source(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    build, _, patch = MODELS[request.param]
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(request.param)
    build().save_pretrained(path)
    if patch is not None:
        patch(path)
    return request.param, path


def _outputs(model: Any) -> torch.Tensor:
    ids = torch.tensor([[1, 5, 9, 33, 64, 2, 7, 100]])
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("shard", [None, "40KB"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_reference_rules(source: tuple[str, Path], name: str, shard: str | None, tmp_path: Path) -> None:
    model_name, src = source
    auto = getattr(transformers, MODELS[model_name][1])
    bnb = transformers.BitsAndBytesConfig(**CONFIGS[name])
    ref = auto.from_pretrained(src, quantization_config=bnb, device_map="cpu")
    ref.save_pretrained(tmp_path / "hf", max_shard_size=shard or "5GB")
    index = "model.safetensors.index.json"
    if shard is not None:
        assert (tmp_path / "hf" / index).is_file()

    qs.convert(src, tmp_path / "qs", qs.BitsAndBytesConfig(**CONFIGS[name]), max_shard_size=shard)
    check_against_reference(tmp_path / "qs", tmp_path / "hf", index)

    loaded = qs.load_quantized(tmp_path / "hf")
    assert not [n for n, t in [*loaded.named_parameters(), *loaded.named_buffers()] if t.is_meta]
    assert loaded.config.quantization_config.to_dict() == ref.config.quantization_config.to_dict()
    # (Saved before running: bitsandbytes' Linear4bit.forward casts its bias to the input's dtype.)
    qs.save_quantized(loaded, tmp_path / "again", max_shard_size=shard)
    check_against_reference(tmp_path / "again", tmp_path / "hf", index)
    assert torch.equal(_outputs(loaded), _outputs(ref))


def test_moe_experts_are_fused_on_load(tmp_path: Path) -> None:
    """The loaded MoE model holds transformers' fused expert parameters, not per-expert tensors."""
    torch.manual_seed(0)
    _mixtral().save_pretrained(tmp_path / "src")
    assert any(".experts.0." in k for k in load_file(tmp_path / "src" / "model.safetensors"))
    qs.convert(tmp_path / "src", tmp_path / "qs", qs.BitsAndBytesConfig(**CONFIGS["nf4-dq"]))
    loaded = qs.load_quantized(tmp_path / "qs")
    names = dict(loaded.named_parameters())
    assert "model.layers.0.mlp.experts.gate_up_proj" in names
    assert not any(".experts.0." in n for n in names)


def test_unknown_key_is_still_refused(tmp_path: Path) -> None:
    """Only the model's own ignore rules drop a key: any other stray tensor is an error, and
    nothing is written."""
    torch.manual_seed(0)
    _bert().save_pretrained(tmp_path / "src")
    path = tmp_path / "src" / "model.safetensors"
    tensors = load_file(path)
    tensors["embeddings.stray"] = torch.zeros(3)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(qs.CheckpointError, match="does not have"):
        qs.convert(tmp_path / "src", tmp_path / "qs", qs.BitsAndBytesConfig(**CONFIGS["int8"]))
    assert not (tmp_path / "qs").exists()
    cfg = json.loads((tmp_path / "src" / "config.json").read_text())
    assert "quantization_config" not in cfg


@pytest.mark.parametrize("name", list(CONFIGS))
def test_conv1d_quantized_in_process(name: str, tmp_path: Path) -> None:
    """``quantize`` of a float GPT-2 quantizes its Conv1D layers as transformers does on load."""
    torch.manual_seed(0)
    _gpt2().save_pretrained(tmp_path / "src")
    bnb = transformers.BitsAndBytesConfig(**CONFIGS[name])
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "src", quantization_config=bnb, device_map="cpu")
    ref.save_pretrained(tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "src")
    qs.save_quantized(qs.quantize(model, qs.BitsAndBytesConfig(**CONFIGS[name])), tmp_path / "qs")
    check_against_reference(tmp_path / "qs", tmp_path / "hf", "model.safetensors.index.json")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_base_model_checkpoint_into_head_model(name: str, tmp_path: Path) -> None:
    """A checkpoint saved from the base model (no ``model.`` prefix) loads into the head model
    (tied output embeddings), the prefix added as from_pretrained adds it: same outputs."""
    config = transformers.LlamaConfig(
        **SMALL, intermediate_size=128, num_key_value_heads=2, tie_word_embeddings=True
    )
    torch.manual_seed(0)
    transformers.LlamaModel(config).save_pretrained(tmp_path / "base")
    bnb = transformers.BitsAndBytesConfig(**CONFIGS[name])
    base = transformers.LlamaModel.from_pretrained(tmp_path / "base", quantization_config=bnb, device_map="cpu")
    base.save_pretrained(tmp_path / "hf")
    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", device_map="cpu")
    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM(config)
    loaded = qs.load_quantized(tmp_path / "hf", skeleton)
    assert torch.equal(_outputs(loaded), _outputs(ref))


def test_split_quantized_layers_are_refused(tmp_path: Path) -> None:
    """Sarvam-MoE's checkpoint holds one ``query_key_value`` tensor that transformers splits into
    q/k/v Linear layers on load. Its quantized save concatenates their quantization states (a
    folder transformers cannot load back), so quantsave refuses to save or convert such a model,
    writing nothing, and names the problem when asked to load such a folder."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    import sweep_models

    torch.manual_seed(0)
    sweep_models.build_transformers("sarvam_moe").save_pretrained(tmp_path / "src")
    bnb = transformers.BitsAndBytesConfig(**CONFIGS["nf4-dq"])
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "src", quantization_config=bnb, device_map="cpu")
    ref.save_pretrained(tmp_path / "hf")
    with pytest.raises(Exception, match="conversion"):  # the reference cannot read its own folder
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", device_map="cpu")
    with pytest.raises(qs.NotSerializableError, match="splitting one checkpoint tensor"):
        qs.save_quantized(ref, tmp_path / "save")
    with pytest.raises(qs.CheckpointError, match="splits"):
        qs.convert(tmp_path / "src", tmp_path / "convert", qs.BitsAndBytesConfig(**CONFIGS["nf4-dq"]))
    assert not (tmp_path / "save").exists() and not (tmp_path / "convert").exists()
    with pytest.raises(qs.CheckpointError, match="conversion of"):
        qs.load_quantized(tmp_path / "hf")
