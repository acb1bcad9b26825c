"""``quantsave.BitsAndBytesConfig`` against transformers' and diffusers' classes: the same
``to_dict()`` for the same arguments, round trips through ``from_dict``, ``resolve_config`` of
every accepted form, clear errors, and the ``quantization_config`` written to ``config.json``."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import quantsave as qs
from quantsave.backends import resolve_config

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")


def plain(d: dict[str, Any]) -> dict[str, Any]:
    """A config dict with enum values (diffusers' and transformers' quant_method) as strings."""
    return {k: getattr(v, "value", v) for k, v in d.items()}


MODES = {
    "4bit": dict(load_in_4bit=True),
    "8bit": dict(load_in_8bit=True),
    "none": dict(),
}
GRID = dict(
    bnb_4bit_quant_type=["nf4", "fp4"],
    bnb_4bit_use_double_quant=[False, True],
    bnb_4bit_compute_dtype=[None, torch.float16, torch.bfloat16, torch.float32, "bfloat16"],
    bnb_4bit_quant_storage=[None, torch.uint8, torch.bfloat16, "float16"],
    llm_int8_skip_modules=[None, ["lm_head"], ["proj_out", "norm"]],
    llm_int8_threshold=[6.0, 3.5],
)


def grid() -> list[dict[str, Any]]:
    keys = list(GRID)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*GRID.values())]


@pytest.mark.parametrize("mode", list(MODES))
def test_to_dict_matches_transformers_and_diffusers(mode: str) -> None:
    cases = grid()
    cases += [dict(llm_int8_has_fp16_weight=True), dict(llm_int8_enable_fp32_cpu_offload=True)]
    for extra in cases:
        kwargs = {**MODES[mode], **extra}
        ours = qs.BitsAndBytesConfig(**kwargs).to_dict()
        hf = transformers.BitsAndBytesConfig(**kwargs).to_dict()
        df = diffusers.BitsAndBytesConfig(**kwargs).to_dict()
        assert ours == plain(hf), kwargs
        assert ours == plain(df), kwargs
        assert list(ours) == list(plain(hf)), kwargs  # same key order too
        assert json.dumps(ours, sort_keys=True) == json.dumps(plain(hf), sort_keys=True)


@pytest.mark.parametrize("mode", list(MODES))
def test_round_trips(mode: str) -> None:
    for extra in grid()[::7]:
        kwargs = {**MODES[mode], **extra}
        ours = qs.BitsAndBytesConfig(**kwargs)
        d = ours.to_dict()
        back = qs.BitsAndBytesConfig.from_dict(d)
        assert back == ours and back.to_dict() == d
        assert qs.BitsAndBytesConfig.from_dict(json.loads(json.dumps(d))) == ours
        for other in (transformers.BitsAndBytesConfig(**kwargs), diffusers.BitsAndBytesConfig(**kwargs)):
            assert qs.BitsAndBytesConfig.from_dict(other.to_dict()) == ours, kwargs
            assert qs.BitsAndBytesConfig.from_dict(plain(other.to_dict())) == ours, kwargs
            # And the other libraries accept ours.
            assert plain(type(other).from_dict(d).to_dict()) == d, kwargs


KWARGS = dict(
    load_in_4bit=True,
    bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True,
    bnb_4bit_compute_dtype=torch.bfloat16,
    llm_int8_skip_modules=["lm_head"],
)


@pytest.mark.parametrize(
    "make",
    [
        lambda: qs.BitsAndBytesConfig(**KWARGS),
        lambda: transformers.BitsAndBytesConfig(**KWARGS),
        lambda: diffusers.BitsAndBytesConfig(**KWARGS),
        lambda: qs.BitsAndBytesConfig(**KWARGS).to_dict(),
        lambda: transformers.BitsAndBytesConfig(**KWARGS).to_dict(),
        lambda: diffusers.BitsAndBytesConfig(**KWARGS).to_dict(),
        lambda: json.loads(json.dumps(qs.BitsAndBytesConfig(**KWARGS).to_dict())),
    ],
    ids=["quantsave", "transformers", "diffusers", "dict", "transformers-dict", "diffusers-dict", "json"],
)
def test_resolve_config_accepts_every_form(make) -> None:  # type: ignore[no-untyped-def]
    cfg = resolve_config(make())
    assert isinstance(cfg, qs.BitsAndBytesConfig)
    assert cfg == qs.BitsAndBytesConfig(**KWARGS)
    assert cfg.method == "bitsandbytes" and cfg.bits == 4


def test_resolve_config_none_and_identity() -> None:
    assert resolve_config(None) is None
    cfg = qs.BitsAndBytesConfig(load_in_8bit=True)
    assert resolve_config(cfg) is cfg


def test_resolve_config_gguf_forms() -> None:
    for form in (qs.GGUFQuantizationConfig(), {"quant_method": "gguf"}, diffusers.GGUFQuantizationConfig()):
        cfg = resolve_config(form)
        assert isinstance(cfg, qs.GGUFQuantizationConfig) and cfg.method == "gguf"


@pytest.mark.parametrize("dtype", ["float17", "nn", "int8", 3, torch.int8])
def test_gguf_bad_compute_dtype_is_value_error(dtype) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="compute_dtype"):
        qs.GGUFQuantizationConfig(compute_dtype=dtype)
    with pytest.raises(ValueError, match="compute_dtype"):
        resolve_config({"quant_method": "gguf", "compute_dtype": dtype})


def test_gguf_config_keeps_modules_to_not_convert() -> None:
    """``to_dict`` has the keys of diffusers' (its ``__dict__``), ``modules_to_not_convert`` kept."""
    ref = plain(diffusers.GGUFQuantizationConfig(compute_dtype=torch.bfloat16).to_dict())
    ours = qs.GGUFQuantizationConfig(compute_dtype="bfloat16").to_dict()
    assert ours == {**ref, "compute_dtype": "bfloat16"}
    cfg = resolve_config({**ours, "modules_to_not_convert": ["proj_out"]})
    assert isinstance(cfg, qs.GGUFQuantizationConfig) and cfg.modules_to_not_convert == ["proj_out"]
    assert cfg.to_dict()["modules_to_not_convert"] == ["proj_out"]
    assert resolve_config(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="modules_to_not_convert"):
        qs.GGUFQuantizationConfig(modules_to_not_convert="proj_out")  # type: ignore[arg-type]


def test_quanto_from_qmap_is_a_declared_field() -> None:
    cfg = qs.QuantoConfig("int4", from_qmap=True)
    assert cfg.from_qmap and not qs.QuantoConfig("int4").from_qmap
    assert "from_qmap" not in cfg.to_dict() and cfg == qs.QuantoConfig("int4")
    assert not qs.QuantoConfig.from_dict(cfg.to_dict()).from_qmap


def test_resolve_config_rejects_non_configs() -> None:
    for bad in (42, "bitsandbytes", ["quant_method"], object()):
        with pytest.raises(ValueError, match="quantization config"):
            resolve_config(bad)
    with pytest.raises(ValueError, match="quant_method"):
        resolve_config({"load_in_4bit": True})


def test_unknown_method_is_kept_as_plain_config() -> None:
    cfg = resolve_config({"quant_method": "awq", "bits": 4})
    assert type(cfg) is qs.QuantizationConfig
    assert cfg.method == "awq" and cfg.to_dict() == {"quant_method": "awq", "bits": 4}


@pytest.mark.parametrize("key", ["load_in_3bit", "bnb_4bit_foo", "_pre_quantization_dtype", "blocksize"])
def test_unknown_keys_name_the_key(key: str) -> None:
    d = {**qs.BitsAndBytesConfig(load_in_4bit=True).to_dict(), key: 1}
    with pytest.raises(ValueError, match=key):
        qs.BitsAndBytesConfig.from_dict(d)
    with pytest.raises(ValueError, match=key):
        resolve_config(d)


def test_from_dict_rejects_other_method() -> None:
    d = {**qs.BitsAndBytesConfig(load_in_4bit=True).to_dict(), "quant_method": "gguf"}
    with pytest.raises(ValueError, match="gguf"):
        qs.BitsAndBytesConfig.from_dict(d)


def test_both_modes_rejected() -> None:
    with pytest.raises(ValueError, match="load_in_4bit and load_in_8bit"):
        qs.BitsAndBytesConfig(load_in_4bit=True, load_in_8bit=True)
    d = {**qs.BitsAndBytesConfig(load_in_4bit=True).to_dict(), "load_in_8bit": True, "_load_in_8bit": True}
    with pytest.raises(ValueError, match="only one"):
        qs.BitsAndBytesConfig.from_dict(d)
    with pytest.raises(ValueError):
        resolve_config(d)


@pytest.mark.parametrize("quant_type", ["nf3", "int4", "NF4", "", None])
def test_bad_quant_type(quant_type) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="bnb_4bit_quant_type"):
        qs.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type)
    d = {**qs.BitsAndBytesConfig(load_in_4bit=True).to_dict(), "bnb_4bit_quant_type": quant_type}
    with pytest.raises(ValueError, match="bnb_4bit_quant_type"):
        qs.BitsAndBytesConfig.from_dict(d)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(bnb_4bit_compute_dtype="float17"),
        dict(bnb_4bit_compute_dtype=3),
        dict(bnb_4bit_quant_storage="not_a_dtype"),
        dict(llm_int8_threshold="6"),
        dict(llm_int8_threshold=True),
        dict(llm_int8_skip_modules="lm_head"),
        dict(llm_int8_skip_modules=[1, 2]),
    ],
)
def test_bad_field_values(kwargs) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError):
        qs.BitsAndBytesConfig(load_in_4bit=True, **kwargs)


def test_bad_quantization_config_in_checkpoint_is_checkpoint_error(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"weight": torch.ones(2, 2), "bias": torch.ones(2)}, tmp_path / "model.safetensors")
    bad = {**qs.BitsAndBytesConfig(load_in_4bit=True).to_dict(), "bogus_key": 1}
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": bad}))
    with pytest.raises(qs.CheckpointError, match="bogus_key") as e:
        qs.load_state_dict(tmp_path)
    assert "config.json" in str(e.value)


# --- config.json written by save_quantized ----------------------------------------------------


@pytest.fixture(scope="module")
def llama_4bit(llama_dir: Path):  # type: ignore[no-untyped-def]
    pytest.importorskip("bitsandbytes")
    qc = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    return transformers.AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=qc, device_map="cpu")


def test_explicit_config_forms_give_same_config_json(llama_4bit, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model = llama_4bit
    hf_cfg = model.config.quantization_config
    qs.save_quantized(model, tmp_path / "auto")
    expected = (tmp_path / "auto" / "config.json").read_text()
    forms = {
        "dict": hf_cfg.to_dict(),
        "plain-dict": plain(hf_cfg.to_dict()),
        "transformers": hf_cfg,
        "transformers-new": transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True
        ),
        "quantsave": qs.BitsAndBytesConfig.from_dict(hf_cfg.to_dict()),
    }
    for name, form in forms.items():
        qs.save_quantized(model, tmp_path / name, quantization_config=form)
        assert (tmp_path / name / "config.json").read_text() == expected, name
    saved = json.loads(expected)["quantization_config"]
    assert saved == plain(hf_cfg.to_dict())
    model.save_pretrained(tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"] == saved


def test_pre_quantization_dtype_never_saved_transformers(llama_4bit, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model = llama_4bit
    # transformers < 5 recorded this on the config of a quantized model; a string form is what a
    # config read back from JSON carries.
    model.config._pre_quantization_dtype = "float16"
    try:
        qs.save_quantized(model, tmp_path / "a")
        qs.save_quantized(model, tmp_path / "b", quantization_config=model.config.quantization_config.to_dict())
    finally:
        del model.config._pre_quantization_dtype
    for name in ("a", "b"):
        text = (tmp_path / name / "config.json").read_text()
        assert "_pre_quantization_dtype" not in text
        assert json.loads(text)["quantization_config"]["quant_method"] == "bitsandbytes"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert type(reloaded.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"


def test_pre_quantization_dtype_never_saved_diffusers(sd3_dir: Path, diffusers_bnb_on_cpu, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("bitsandbytes")
    model = diffusers.SD3Transformer2DModel.from_pretrained(
        sd3_dir,
        quantization_config=diffusers.BitsAndBytesConfig(load_in_8bit=True),
        device_map="cpu",
        torch_dtype=torch.float16,
    )
    assert model.config._pre_quantization_dtype == torch.float16
    qs.save_quantized(model, tmp_path / "qs")
    qs.save_quantized(
        model, tmp_path / "qs-dict", quantization_config={"quant_method": "bitsandbytes", "load_in_8bit": True}
    )
    for name in ("qs", "qs-dict"):
        cfg = json.loads((tmp_path / name / "config.json").read_text())
        assert "_pre_quantization_dtype" not in cfg
        assert cfg["quantization_config"] == plain(model.config.quantization_config.to_dict())
    model.save_pretrained(tmp_path / "hf")
    assert (tmp_path / "qs" / "config.json").read_bytes() == (tmp_path / "hf" / "config.json").read_bytes()


def test_plain_module_config_json(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    cfg = qs.BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=4.0)
    qs.quantize(model, cfg)
    qs.save_quantized(model, tmp_path / "auto")
    qs.save_quantized(model, tmp_path / "dict", quantization_config=cfg.to_dict())
    qs.save_quantized(
        model,
        tmp_path / "hf",
        quantization_config=transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=4.0),
    )
    text = (tmp_path / "auto" / "config.json").read_text()
    assert json.loads(text) == {"quantization_config": cfg.to_dict()}
    assert text == json.dumps({"quantization_config": cfg.to_dict()}, indent=2, sort_keys=True) + "\n"
    for name in ("dict", "hf"):
        assert (tmp_path / name / "config.json").read_text() == text
    _, loaded_cfg = qs.load_state_dict(tmp_path / "auto")
    assert loaded_cfg == cfg


def test_config_read_off_hand_quantized_model(tmp_path: Path) -> None:
    """Without a recorded config, the config comes from the layers; plain Linear layers left
    unquantized are listed in llm_int8_skip_modules."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    q = bnb.nn.Linear4bit(
        16, 8, compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="fp4", device="meta"
    )
    q.weight = bnb.nn.Params4bit(
        lin.weight.detach(), requires_grad=False, compress_statistics=True, quant_type="fp4", module=q
    )
    q.bias = nn.Parameter(lin.bias.detach(), requires_grad=False)
    q = q.to("cpu")
    model = nn.Sequential(q, nn.Linear(8, 4))
    qs.save_quantized(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    expected = qs.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="fp4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        llm_int8_skip_modules=["1"],
    ).to_dict()
    assert cfg == expected
