"""Pipelines: ``save_quantized(pipe, dir)`` writes ``model_index.json`` as ``pipe.save_pretrained``
does and one folder per component; ``DiffusionPipeline.from_pretrained(dir)`` loads it with no
quantization arguments and identical outputs. A tiny pipeline with a diffusers UNet, a
transformers CLIP text encoder and a scheduler, built in the test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import quantsave as qs
from conftest import TINY_UNET, files_equal

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
quanto = pytest.importorskip("optimum.quanto")
aoq = pytest.importorskip("torchao.quantization")


class TinyPipeline(diffusers.DiffusionPipeline):  # type: ignore[misc,name-defined]
    def __init__(self, unet, text_encoder, scheduler) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, scheduler=scheduler)


def _pipe() -> TinyPipeline:
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**TINY_UNET)
    config = transformers.CLIPTextConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
    )
    return TinyPipeline(unet.eval(), transformers.CLIPTextModel(config).eval(), diffusers.DDPMScheduler())


X = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
IDS = torch.tensor([[0, 5, 9, 33, 1]])


def _outputs(pipe) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return pipe.unet(X, 10).sample, pipe.text_encoder(IDS).last_hidden_state


def test_quantized_components_and_the_rest(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Components quantized on load by diffusers (quanto UNet) and transformers (torchao text
    encoder), as a user gets them from ``from_pretrained``; the references can save these too."""
    _pipe().save_pretrained(tmp_path / "float")
    mapping = {
        "unet": diffusers.QuantoConfig(weights_dtype="int8"),
        "text_encoder": transformers.TorchAoConfig(aoq.Int8WeightOnlyConfig()),
    }
    pipe = TinyPipeline.from_pretrained(
        tmp_path / "float", quantization_config=diffusers.PipelineQuantizationConfig(quant_mapping=mapping)
    )
    unet_out, text_out = _outputs(pipe)
    result = qs.save_quantized(pipe, tmp_path / "qs")
    assert "model_index.json" in result.files and "unet/diffusion_pytorch_model.safetensors" in result.files
    pipe.save_pretrained(tmp_path / "hf")
    assert (tmp_path / "qs" / "model_index.json").read_bytes() == (tmp_path / "hf" / "model_index.json").read_bytes()
    # diffusers' own save of the quanto UNet and the scheduler: the same bytes.
    assert files_equal(tmp_path / "qs" / "unet", tmp_path / "hf" / "unet") == []
    assert files_equal(tmp_path / "qs" / "scheduler", tmp_path / "hf" / "scheduler") == []
    assert (tmp_path / "qs" / "text_encoder" / "config.json").read_bytes() == (
        tmp_path / "hf" / "text_encoder" / "config.json"
    ).read_bytes()
    loaded = TinyPipeline.from_pretrained(tmp_path / "qs")
    assert type(loaded.unet.conv_in).__name__ == "Conv2d" and "QLinear" in {
        type(m).__name__ for m in loaded.unet.modules()
    }
    assert type(loaded.text_encoder.encoder.layers[0].mlp.fc1.weight).__name__ == "Int8Tensor"
    assert isinstance(loaded.scheduler, diffusers.DDPMScheduler)
    got_unet, got_text = _outputs(loaded)
    assert torch.equal(got_unet, unet_out) and torch.equal(got_text, text_out)
    # quantsave loads one component folder; the pipeline folder gets a pointer to it.
    with pytest.raises(FileNotFoundError, match="pipeline folder"):
        qs.load_quantized(tmp_path / "qs")
    unet = qs.load_quantized(tmp_path / "qs" / "unet")
    with torch.no_grad():
        assert torch.equal(unet(X, 10).sample, unet_out)


def test_per_component_configs_quantize_on_save(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A mapping (or diffusers' PipelineQuantizationConfig) quantizes the named float components
    as diffusers would on load; the others are saved as they are."""
    pipe = _pipe()
    float_text = _outputs(pipe)[1]
    mapping = diffusers.PipelineQuantizationConfig(quant_mapping={"unet": diffusers.QuantoConfig(weights_dtype="int4")})
    qs.save_quantized(pipe, tmp_path / "qs", max_shard_size="20KB")
    assert not (tmp_path / "qs" / "unet" / "quanto_qmap.json").exists()  # nothing quantized yet
    qs.save_quantized(pipe, tmp_path / "qs", quantization_config=mapping, max_shard_size="20KB")
    config = json.loads((tmp_path / "qs" / "unet" / "config.json").read_text())
    assert config["quantization_config"] == {
        "modules_to_not_convert": None,
        "quant_method": "quanto",
        "weights_dtype": "int4",
    }
    assert (tmp_path / "qs" / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    ref = diffusers.UNet2DModel.from_pretrained(
        _save_float_unet(tmp_path), quantization_config=diffusers.QuantoConfig(weights_dtype="int4")
    )
    loaded = TinyPipeline.from_pretrained(tmp_path / "qs")
    ours_sd, ref_sd = loaded.unet.state_dict(), ref.state_dict()
    assert set(ours_sd) == set(ref_sd) and all(torch.equal(ours_sd[k], ref_sd[k]) for k in ref_sd)
    assert torch.equal(_outputs(loaded)[1], float_text)


def test_global_pipeline_config_resolved_by_diffusers(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``PipelineQuantizationConfig(quant_backend=..., components_to_quantize=...)`` gives each
    named component the config diffusers' own rule builds for it: the same folder as the mapping."""
    pytest.importorskip("bitsandbytes")
    kwargs = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    mapping = {"unet": diffusers.BitsAndBytesConfig(**kwargs)}
    qs.save_quantized(_pipe(), tmp_path / "mapping", quantization_config=mapping)
    pqc = diffusers.PipelineQuantizationConfig(
        quant_backend="bitsandbytes_4bit", quant_kwargs=kwargs, components_to_quantize="unet"
    )
    qs.save_quantized(_pipe(), tmp_path / "global", quantization_config=pqc)
    for sub in ("unet", "text_encoder", "scheduler"):
        assert files_equal(tmp_path / "global" / sub, tmp_path / "mapping" / sub) == [], sub
    assert "quantization_config" in json.loads((tmp_path / "global" / "unet" / "config.json").read_text())


def _save_float_unet(tmp_path: Path) -> Path:
    path = tmp_path / "float-unet"
    _pipe().unet.save_pretrained(path)
    return path


def test_bad_pipeline_input_writes_nothing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pipe = _pipe()
    with pytest.raises(ValueError, match="does not have"):
        qs.save_quantized(pipe, tmp_path / "a", quantization_config={"vae": qs.QuantoConfig()})
    with pytest.raises(ValueError, match="not a model"):
        qs.save_quantized(pipe, tmp_path / "b", quantization_config={"scheduler": qs.QuantoConfig()})
    with pytest.raises(ValueError, match="map component names"):
        qs.save_quantized(pipe, tmp_path / "c", quantization_config=qs.QuantoConfig())
    with pytest.raises(ValueError, match="single model"):
        qs.save_quantized(pipe, tmp_path / "d", weights_name="x.safetensors")
    assert not any((tmp_path / n).exists() for n in "abcd")
