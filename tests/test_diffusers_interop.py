"""diffusers bitsandbytes models: quantsave writes the bytes diffusers writes, diffusers'
``from_pretrained`` loads them as pre-quantized with identical outputs, and quantsave loads
what diffusers saved. diffusers refuses bitsandbytes without a GPU; the ``diffusers_bnb_on_cpu``
fixture lifts only that check."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import quantsave as qs
from conftest import check_against_reference, sd3_kwargs

diffusers = pytest.importorskip("diffusers")

CONFIGS = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "fp4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
    "int8": dict(load_in_8bit=True),
}


def _load(path: Path, **kw):  # type: ignore[no-untyped-def]
    return diffusers.SD3Transformer2DModel.from_pretrained(path, device_map="cpu", torch_dtype=torch.float32, **kw)


def _run(model, inputs):  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return model(**inputs).sample


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("shard", [None, "30KB"])
def test_diffusers_round_trip(name, shard, sd3_dir, sd3_inputs, diffusers_bnb_on_cpu, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = _load(sd3_dir, quantization_config=diffusers.BitsAndBytesConfig(**CONFIGS[name]))
    expected = _run(model, sd3_inputs)
    kw = {"max_shard_size": shard} if shard else {}
    result = qs.save_quantized(model, tmp_path / "qs", **kw)
    assert (result.num_shards > 1) == (shard is not None)
    model.save_pretrained(tmp_path / "hf", **kw)
    # Same bytes as diffusers (config, shards, index) except where diffusers splits a weight.
    check_against_reference(tmp_path / "qs", tmp_path / "hf", "diffusion_pytorch_model.safetensors.index.json")
    # diffusers loads quantsave's folder with no quantization argument.
    reloaded = _load(tmp_path / "qs")
    assert reloaded.config.quantization_config.to_dict() == model.config.quantization_config.to_dict()
    assert torch.equal(_run(reloaded, sd3_inputs), expected)
    # quantsave loads diffusers' folder, building the model from config.json.
    ours = qs.load_quantized(tmp_path / "hf")
    assert type(ours.transformer_blocks[0].attn.to_q).__name__ == ("Linear8bitLt" if name == "int8" else "Linear4bit")
    assert torch.equal(_run(ours, sd3_inputs), expected)


def test_hand_quantized_diffusers_model(sd3_dir, sd3_inputs, diffusers_bnb_on_cpu, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A float diffusers model quantized with quantsave.quantize saves with no arguments and
    loads in diffusers as pre-quantized."""
    model = diffusers.SD3Transformer2DModel.from_pretrained(sd3_dir)
    qs.quantize(model, qs.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    model.eval()
    expected = _run(model, sd3_inputs)
    qs.save_quantized(model, tmp_path / "qs")
    cfg = (tmp_path / "qs" / "config.json").read_text()
    assert '"quant_method": "bitsandbytes"' in cfg and "_pre_quantization_dtype" not in cfg
    reloaded = _load(tmp_path / "qs")
    assert torch.equal(_run(reloaded, sd3_inputs), expected)


def test_meta_skeleton(sd3_dir, sd3_inputs, diffusers_bnb_on_cpu, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = _load(sd3_dir, quantization_config=diffusers.BitsAndBytesConfig(**CONFIGS["nf4"]))
    qs.save_quantized(model, tmp_path / "qs", max_shard_size="30KB")
    with torch.device("meta"):
        skeleton = diffusers.SD3Transformer2DModel(**sd3_kwargs())
    loaded = qs.load_quantized(tmp_path / "qs", skeleton)
    assert torch.equal(_run(loaded, sd3_inputs), _run(model, sd3_inputs))


def test_buffers_take_the_checkpoint_dtype(diffusers_bnb_on_cpu, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A model built from config.json is built under the checkpoint's dtype, as
    ``from_pretrained(torch_dtype=...)`` builds it: ConsistencyDecoderVAE's ``means``/``stds``
    buffers (not in the checkpoint) are bf16 next to its bf16 weights, and it decodes as diffusers' model."""
    tiny = dict(
        encoder_block_out_channels=(32, 64),
        encoder_down_block_types=("DownEncoderBlock2D",) * 2,
        encoder_layers_per_block=1,
        encoder_norm_num_groups=8,
        decoder_block_out_channels=(32, 64),
        decoder_down_block_types=("ResnetDownsampleBlock2D",) * 2,
        decoder_up_block_types=("ResnetUpsampleBlock2D",) * 2,
        decoder_layers_per_block=1,
        decoder_norm_num_groups=8,
        sample_size=16,
    )
    torch.manual_seed(0)
    diffusers.ConsistencyDecoderVAE(**tiny).to(torch.bfloat16).save_pretrained(tmp_path / "src")
    bnb = diffusers.BitsAndBytesConfig(**CONFIGS["nf4"])
    cls = diffusers.ConsistencyDecoderVAE
    cls.from_pretrained(
        tmp_path / "src", quantization_config=bnb, device_map="cpu", torch_dtype=torch.bfloat16
    ).save_pretrained(tmp_path / "hf")
    ref = cls.from_pretrained(tmp_path / "hf", device_map="cpu", torch_dtype=torch.bfloat16)
    ours = qs.load_quantized(tmp_path / "hf")
    assert ours.means.dtype == ours.stds.dtype == torch.bfloat16
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.bfloat16)
    with torch.no_grad():
        expected = ref.decode(z, generator=torch.Generator().manual_seed(1)).sample
        got = ours.decode(z, generator=torch.Generator().manual_seed(1)).sample
    assert torch.equal(got, expected)
