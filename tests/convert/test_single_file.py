"""``convert(file, dst, config, model_class=..., model_config=...)`` for original single files,
against diffusers' ``from_single_file(file, config=..., quantization_config=...)`` +
``save_pretrained``; a tiny SD3 original file made in the test (``originals.sd3_original``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

import quantsave as qs
from conftest import files_equal, quantized_on_load, sd3_kwargs
from quantsave.convert import recipes
from quantsave.errors import CheckpointError

diffusers = pytest.importorskip("diffusers")

from originals import sd3_original  # noqa: E402

NF4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)


@pytest.fixture(scope="module")
def sd3_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny SD3 transformer as an original bf16 single file, and its diffusers config folder."""
    torch.manual_seed(0)
    model = diffusers.SD3Transformer2DModel(**sd3_kwargs()).to(torch.bfloat16)
    path = tmp_path_factory.mktemp("sd3-single")
    model.save_config(path / "config")
    safetensors.torch.save_file(sd3_original(model.state_dict(), 2), path / "sd3.safetensors")
    return path / "sd3.safetensors", path / "config"


@pytest.fixture
def single_file_bnb(diffusers_bnb_on_cpu, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """diffusers 0.42's from_single_file makes its quantizer with ``pre_quantized=True`` (so a float
    file fails with "Missing quantization component"); the reference here is that call with the
    flag from_pretrained passes for a float checkpoint (``pre_quantized=False``)."""
    from diffusers.loaders import single_file_model

    make = single_file_model.DiffusersAutoQuantizer.from_config

    class Fixed:
        @staticmethod
        def from_config(config, **kwargs):  # type: ignore[no-untyped-def]
            return make(config, pre_quantized=False, **kwargs)

    monkeypatch.setattr(single_file_model, "DiffusersAutoQuantizer", Fixed)


@pytest.mark.parametrize("qc", [NF4, dict(load_in_8bit=True)], ids=["nf4-dq", "int8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_sd3_single_file_equals_from_single_file(sd3_file, single_file_bnb, tmp_path, qc, dtype, sd3_inputs) -> None:  # type: ignore[no-untyped-def]
    file, config = sd3_file
    bnb = diffusers.BitsAndBytesConfig(**qc)
    ref = diffusers.SD3Transformer2DModel.from_single_file(
        str(file), config=str(config), quantization_config=bnb, torch_dtype=dtype
    )
    ref.save_pretrained(tmp_path / "hf")
    qs.convert(file, tmp_path / "qs", bnb, torch_dtype=dtype, model_class="SD3Transformer2DModel", model_config=config)
    # Tensors identical; config.json the reference's plus the quantization_config that
    # from_single_file leaves out (without it from_pretrained would not see the folder as quantized).
    assert files_equal(tmp_path / "qs", tmp_path / "hf") == ["config.json"]
    ours = json.loads((tmp_path / "qs" / "config.json").read_text())
    theirs = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert ours.pop("quantization_config")["quant_method"] == "bitsandbytes"
    assert ours == theirs
    loaded = diffusers.SD3Transformer2DModel.from_pretrained(tmp_path / "qs", torch_dtype=dtype, device_map="cpu")
    with torch.no_grad():
        inputs = {k: v.to(dtype) for k, v in sd3_inputs.items()}
        assert torch.equal(loaded(**inputs).sample, ref(**inputs).sample)


def test_single_file_with_a_lora(sd3_file, single_file_bnb, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A single file and a diffusers LoRA in one pass equal from_single_file + fuse_lora."""
    peft = pytest.importorskip("peft")
    file, config = sd3_file
    torch.manual_seed(4)
    model = diffusers.SD3Transformer2DModel.from_single_file(str(file), config=str(config), torch_dtype=torch.bfloat16)
    lora_config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "add_k_proj"], init_lora_weights=False)
    model.add_adapter(lora_config)
    diffusers.StableDiffusion3Pipeline.save_lora_weights(
        tmp_path / "lora", transformer_lora_layers=peft.utils.get_peft_model_state_dict(model)
    )
    lora = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    ref = diffusers.SD3Transformer2DModel.from_single_file(str(file), config=str(config), torch_dtype=torch.bfloat16)
    ref.load_lora_adapter(lora, prefix="transformer")
    ref.fuse_lora()
    ref.unload_lora()
    bnb = diffusers.BitsAndBytesConfig(**NF4)
    quantized_on_load(ref, tmp_path, bnb, torch.bfloat16)
    qs.convert(file, tmp_path / "qs", bnb, torch_dtype=torch.bfloat16, lora=lora,
               model_class=diffusers.SD3Transformer2DModel, model_config=config)  # fmt: skip
    assert files_equal(tmp_path / "qs", tmp_path / "hf") == ["config.json"]


def test_single_file_errors(sd3_file, tmp_path) -> None:  # type: ignore[no-untyped-def]
    file, config = sd3_file
    bnb = qs.BitsAndBytesConfig(**NF4)
    with pytest.raises(ValueError, match=r"not a diffusers class from_single_file reads"):
        qs.convert(file, tmp_path / "a", bnb, model_class="NoSuchModel", model_config=config)
    with pytest.raises(ValueError, match="needs model_config"):
        qs.convert(file, tmp_path / "a", bnb, model_class="SD3Transformer2DModel")
    with pytest.raises(ValueError, match=r"no config\.json"):
        qs.convert(file, tmp_path / "a", bnb, model_class="SD3Transformer2DModel", model_config=tmp_path)
    with pytest.raises(ValueError, match="goes with model_class"):
        qs.convert(file, tmp_path / "a", bnb, model_config=config)
    # A file that is not an original SD3 checkpoint.
    safetensors.torch.save_file({"something.weight": torch.zeros(2, 2)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="does not understand this checkpoint"):
        qs.convert(tmp_path / "other.safetensors", tmp_path / "a", bnb, model_class="SD3Transformer2DModel",
                   model_config=config)  # fmt: skip
    assert not (tmp_path / "a").exists()


def test_recipes_replay_the_conversion_exactly() -> None:
    """The recording follows views, copies, concatenations, casts and in-place writes."""

    def convert(ck: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        q, k, v = torch.chunk(ck.pop("qkv"), 3, dim=0)
        shift, scale = ck.pop("mod").chunk(2, dim=0)
        y = ck.pop("y").clone()
        y[0] = 5
        return {
            "q": torch.cat([q]), "k": k, "v": v.T.contiguous(), "mod": torch.cat([scale, shift]),
            "x": ck.pop("x"), "y": y, "z": ck.pop("z").to(torch.float32) * 2,
        }  # fmt: skip

    g = torch.Generator().manual_seed(0)
    src = {
        "qkv": torch.randn(6, 4, generator=g), "mod": torch.randn(4, 2, generator=g), "x": torch.randn(3, generator=g),
        "y": torch.randn(3, generator=g), "z": torch.randn(2, generator=g).half(),
    }  # fmt: skip
    recorded = recipes.record(convert, {k: (v.dtype, list(v.shape)) for k, v in src.items()})
    expected = convert(dict(src))
    for key, (recipe, dtype, shape) in recorded.items():
        made = recipes.evaluate(recipe, src.__getitem__)
        assert torch.equal(made, expected[key]) and made.dtype == dtype and list(made.shape) == shape
    assert isinstance(recorded["x"][0], recipes.Leaf)
    assert recipes.leaves(recorded["q"][0]) == {"qkv"}
    # The sources are never written (the in-place write was replayed on a copy).
    assert src["y"][0] != 5

    def looks(ck: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"a": ck["x"]} if ck["x"].sum().item() > 0 else {}

    with pytest.raises(recipes.Unrecordable):
        recipes.record(looks, {"x": (torch.float32, [3])})


def test_command_line_single_file_and_lora(sd3_file, tmp_path) -> None:  # type: ignore[no-untyped-def]
    peft = pytest.importorskip("peft")
    from quantsave.cli import main

    file, config = sd3_file
    model = diffusers.SD3Transformer2DModel.from_single_file(str(file), config=str(config), torch_dtype=torch.bfloat16)
    model.add_adapter(peft.LoraConfig(r=2, lora_alpha=2, target_modules=["to_k"], init_lora_weights=False))
    diffusers.StableDiffusion3Pipeline.save_lora_weights(
        tmp_path / "lora", transformer_lora_layers=peft.utils.get_peft_model_state_dict(model)
    )
    lora = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    args = ["convert", str(file), str(tmp_path / "cli"), "--quant", "nf4", "--double-quant", "--dtype", "bfloat16",
            "--model-class", "SD3Transformer2DModel", "--model-config", str(config), "--lora", f"{lora}:0.5",
            "-q"]  # fmt: skip
    assert main(args) == 0
    qs.convert(file, tmp_path / "api", qs.BitsAndBytesConfig(**NF4), torch_dtype=torch.bfloat16, lora=[(lora, 0.5)],
               model_class="SD3Transformer2DModel", model_config=config)  # fmt: skip
    assert files_equal(tmp_path / "cli", tmp_path / "api") == []
    assert main([*args[:3], "--quant", "nf4", "--lora", f"{lora}:half", "-q"]) != 0


def test_recipes_refuse_writes_into_views() -> None:
    def convert(ck: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        w = ck.pop("w")
        w.narrow(0, 0, 1).mul_(2)  # changes w through a view: not followed
        return {"w": w}

    with pytest.raises(recipes.Unrecordable, match="view"):
        recipes.record(convert, {"w": (torch.float32, [2, 2])})

    def sub(ck: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        w = ck.pop("w")
        w -= 1  # __isub__: replayed on a copy
        return {"w": w}

    src = {"w": torch.ones(2, 2)}
    (recipe, _, _) = recipes.record(sub, {"w": (torch.float32, [2, 2])})["w"]
    assert torch.equal(recipes.evaluate(recipe, src.__getitem__), torch.zeros(2, 2))
    assert torch.equal(src["w"], torch.ones(2, 2))
