"""optimum-quanto: quantsave writes the bytes and config diffusers writes, diffusers loads them with
no quantization arguments, quantsave loads diffusers' and quanto's own folders, transformers and
plain-module models round-trip through quantsave, and bad models or files get clear errors."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import quantsave as qs
from conftest import files_equal

quanto = pytest.importorskip("optimum.quanto")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

DTYPES = ["int8", "float8", "int4", "int2"]
QTYPES = {"int8": "qint8", "float8": "qfloat8_e4m3fn", "int4": "qint4", "int2": "qint2"}
SD3_WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(autouse=True)
def _no_quanto_jit(monkeypatch: pytest.MonkeyPatch) -> None:
    """quanto's CPU ``unpack`` (int4/int2 forward) JIT-compiles a C++ extension for minutes on first
    use; route it to the same computation in Python."""
    from optimum.quanto.library.extensions.cpp import ext

    def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
        parts = [(packed & (2 ** (bits * (i + 1)) - 1)) >> (bits * i) for i in range(8 // bits)]
        return torch.cat(parts).to(torch.uint8)

    monkeypatch.setattr(ext, "_lib", types.SimpleNamespace(unpack=unpack))


def _run_sd3(model, inputs):  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return model(**inputs).sample


def _logits(model, ids):  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return model(ids).logits


def _owner(key: str) -> str | None:
    """The quantized Linear a quanto key belongs to (bias excluded), written independently of quantsave."""
    if ".weight._" in key:
        return key.split(".weight._")[0]
    for suffix in (".input_scale", ".output_scale"):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return None


def _split_groups(weight_map: dict[str, str]) -> list[str]:
    files: dict[str, set[str]] = {}
    for key, fname in weight_map.items():
        owner = _owner(key)
        if owner is not None:
            files.setdefault(owner, set()).add(fname)
    return sorted(o for o, f in files.items() if len(f) > 1)


def _quantize_sd3(sd3_dir: Path, wd: str):  # type: ignore[no-untyped-def]
    return diffusers.SD3Transformer2DModel.from_pretrained(
        sd3_dir, quantization_config=diffusers.QuantoConfig(weights_dtype=wd)
    )


# --- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize("wd", DTYPES)
@pytest.mark.parametrize("mnc", [None, ["proj_out", "to_q"]])
def test_config_dict_equals_diffusers(wd: str, mnc: list[str] | None) -> None:
    ours = qs.QuantoConfig(wd, modules_to_not_convert=mnc).to_dict()
    theirs = diffusers.QuantoConfig(weights_dtype=wd, modules_to_not_convert=mnc).to_dict()
    assert ours == theirs and list(ours) == list(theirs)
    assert type(ours["quant_method"]) is str and ours["quant_method"] == "quanto"
    assert json.dumps(ours, sort_keys=True) == json.dumps(theirs, sort_keys=True)
    assert qs.QuantoConfig.from_dict(theirs) == qs.QuantoConfig(wd, mnc)


def test_config_from_dict_forms_and_errors() -> None:
    from quantsave.backends import resolve_config

    tf = transformers.QuantoConfig(weights="int4", modules_to_not_convert=["lm_head"])
    assert resolve_config(tf) == qs.QuantoConfig("int4", ["lm_head"])
    assert resolve_config(diffusers.QuantoConfig(weights_dtype="int2")) == qs.QuantoConfig("int2")
    assert (
        qs.QuantoConfig.from_dict({"quant_method": "quanto", "weights": "float8", "activations": "none"}).weights_dtype
        == "float8"
    )
    with pytest.raises(ValueError, match=r"unknown QuantoConfig keys \['group_size'\]; known keys: \['activations'"):
        qs.QuantoConfig.from_dict({"quant_method": "quanto", "weights_dtype": "int8", "group_size": 64})
    with pytest.raises(
        ValueError, match=r"weights_dtype must be one of \['float8', 'int8', 'int4', 'int2'\], got 'int3'"
    ):
        qs.QuantoConfig.from_dict({"quant_method": "quanto", "weights_dtype": "int3"})
    with pytest.raises(ValueError, match="activations='int8': quantized activations cannot be saved"):
        qs.QuantoConfig.from_dict({"quant_method": "quanto", "weights": "int8", "activations": "int8"})
    with pytest.raises(ValueError, match="weights_dtype='int8' but weights='int4'"):
        qs.QuantoConfig.from_dict({"quant_method": "quanto", "weights_dtype": "int8", "weights": "int4"})
    with pytest.raises(ValueError, match="expected quant_method 'quanto'"):
        qs.QuantoConfig.from_dict({"quant_method": "torchao", "weights_dtype": "int8"})


# --- diffusers ------------------------------------------------------------------------------


@pytest.mark.parametrize("wd", DTYPES)
def test_diffusers_round_trip_and_bytes(wd, sd3_dir, sd3_inputs, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = _quantize_sd3(sd3_dir, wd)
    assert type(model.transformer_blocks[0].attn.to_q).__name__ == "QLinear"
    expected = _run_sd3(model, sd3_inputs)
    result = qs.save_quantized(model, tmp_path / "qs")
    assert result.files == [SD3_WEIGHTS, "config.json", "quanto_qmap.json"]
    model.save_pretrained(tmp_path / "hf")
    # (d) the same config.json and safetensors bytes as diffusers' own save.
    assert files_equal(tmp_path / "qs", tmp_path / "hf") == []
    written = json.loads((tmp_path / "qs" / "config.json").read_text())["quantization_config"]
    assert written == {"modules_to_not_convert": None, "quant_method": "quanto", "weights_dtype": wd}
    qmap = json.loads((tmp_path / "qs" / "quanto_qmap.json").read_text())
    assert qmap == quanto.quantization_map(model)
    assert qmap["transformer_blocks.0.attn.to_q"] == {"weights": QTYPES[wd], "activations": "none"}
    # (a) diffusers loads quantsave's folder with no quantization argument.
    reloaded = diffusers.SD3Transformer2DModel.from_pretrained(tmp_path / "qs")
    assert reloaded.config.quantization_config.to_dict() == model.config.quantization_config.to_dict()
    assert torch.equal(_run_sd3(reloaded, sd3_inputs), expected)
    # (b) quantsave loads diffusers' folder, building the model from config.json.
    ours = qs.load_quantized(tmp_path / "hf")
    layer = ours.transformer_blocks[0].attn.to_q
    assert type(layer).__name__ == "QLinear" and layer.weight_qtype.name == QTYPES[wd]
    assert type(layer.weight).__name__ == ("WeightQBytesTensor" if wd in ("int8", "float8") else "WeightQBitsTensor")
    assert torch.equal(_run_sd3(ours, sd3_inputs), expected)


#: Shard sizes at which diffusers keeps every quantized weight in one shard (then all bytes match).
WHOLE_SHARDS = {"int8": "8KB", "float8": "8KB", "int4": "16KB", "int2": "10KB"}


@pytest.mark.parametrize("wd", DTYPES)
@pytest.mark.parametrize("reference_splits", [True, False])
def test_diffusers_sharded(wd, reference_splits, sd3_dir, sd3_inputs, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = _quantize_sd3(sd3_dir, wd)
    expected = _run_sd3(model, sd3_inputs)
    shard = "6KB" if reference_splits else WHOLE_SHARDS[wd]
    result = qs.save_quantized(model, tmp_path / "qs", max_shard_size=shard)
    assert result.num_shards > 2
    index_name = SD3_WEIGHTS + ".index.json"
    index = json.loads((tmp_path / "qs" / index_name).read_text())
    weight_map = index["weight_map"]
    # (c) no quantized weight's tensors spread over two shards.
    assert any(k.endswith("weight._scale") for k in weight_map) and _split_groups(weight_map) == []
    model.save_pretrained(tmp_path / "hf", max_shard_size=shard)
    ref = json.loads((tmp_path / "hf" / index_name).read_text())
    assert (_split_groups(ref["weight_map"]) != []) == reference_splits
    if reference_splits:
        assert index["metadata"] == ref["metadata"] and set(weight_map) == set(ref["weight_map"])
        # Shards holding the same tensors as diffusers' have the same bytes.
        for f in set(weight_map.values()):
            if {k for k, v in weight_map.items() if v == f} == {k for k, v in ref["weight_map"].items() if v == f}:
                assert (tmp_path / "qs" / f).read_bytes() == (tmp_path / "hf" / f).read_bytes()
    else:
        assert files_equal(tmp_path / "qs", tmp_path / "hf") == []
    reloaded = diffusers.SD3Transformer2DModel.from_pretrained(tmp_path / "qs")
    assert torch.equal(_run_sd3(reloaded, sd3_inputs), expected)
    assert torch.equal(_run_sd3(qs.load_quantized(tmp_path / "qs"), sd3_inputs), expected)


def test_quanto_wrapper_loads_quantsave_folder(sd3_dir, sd3_inputs, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """optimum-quanto's own diffusers loader reads quantsave's folder through quanto_qmap.json."""
    from optimum.quanto.models.diffusers_models import QuantizedDiffusersModel

    class QuantizedSD3(QuantizedDiffusersModel):
        base_class = diffusers.SD3Transformer2DModel

    model = _quantize_sd3(sd3_dir, "int4")
    qs.save_quantized(model, tmp_path / "qs")
    loaded = QuantizedSD3.from_pretrained(tmp_path / "qs")
    assert torch.equal(_run_sd3(loaded, sd3_inputs), _run_sd3(model, sd3_inputs))


def test_int4_bf16_tinygemm_saves_standard_layout(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """bfloat16 int4 with group size 128 is TinyGemm-packed in memory on the CPU; the file and the
    reloaded layer hold quanto's standard planar layout with the same dequantized values."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 128)).to(torch.bfloat16)
    quanto.quantize(model, weights=quanto.qint4)
    quanto.freeze(model)
    assert type(model[0].weight).__name__ == "TinyGemmWeightQBitsTensor"
    qs.save_quantized(model, tmp_path / "m")
    sd, _ = qs.load_state_dict(tmp_path / "m")
    assert sorted(sd) == [
        "0.bias",
        "0.input_scale",
        "0.output_scale",
        "0.weight._data._data",
        "0.weight._scale",
        "0.weight._shift",
    ]
    assert sd["0.weight._data._data"].shape == (128, 128) and sd["0.weight._scale"].shape == (256, 1)
    loaded = qs.load_quantized(tmp_path / "m", nn.Sequential(nn.Linear(256, 128)))
    assert type(loaded[0].weight).__name__ == "WeightQBitsTensor" and loaded[0].weight.dtype == torch.bfloat16
    assert torch.equal(loaded[0].weight.dequantize(), model[0].weight.dequantize())


# --- plain modules and quanto's own layout ----------------------------------------------------


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(32, 64)
        self.act = nn.GELU()
        self.down = nn.Linear(64, 16)
        self.head = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.down(self.act(self.up(x))))


class _Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = _Net()
        self.b = _Net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


def _quanto_net(wd: str, exclude: str | None = "head") -> nn.Module:
    torch.manual_seed(1)
    net = _Net().eval()
    quanto.quantize(net, weights=QTYPES[wd], exclude=exclude)
    quanto.freeze(net)
    return net


X = torch.randn(3, 32, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("wd", DTYPES)
def test_plain_module_round_trip(wd, tmp_path) -> None:  # type: ignore[no-untyped-def]
    net = _quanto_net(wd)
    expected = net(X)
    qs.save_quantized(net, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config == {
        "quantization_config": {"modules_to_not_convert": ["head"], "quant_method": "quanto", "weights_dtype": wd}
    }
    qmap_text = (tmp_path / "m" / "quanto_qmap.json").read_text()
    assert qmap_text == json.dumps(quanto.quantization_map(net), indent=4)
    loaded = qs.load_quantized(tmp_path / "m", _Net())
    assert type(loaded.up).__name__ == "QLinear" and type(loaded.head) is nn.Linear
    assert torch.equal(loaded(X), expected)
    # optimum-quanto's own path: safetensors + quantization map -> requantize.
    state_dict = safetensors_torch.load_file(tmp_path / "m" / "model.safetensors")
    fresh = _Net()
    quanto.requantize(fresh, state_dict, json.loads(qmap_text))
    assert torch.equal(fresh.eval()(X), expected)


@pytest.mark.parametrize("wd", DTYPES)
def test_quanto_own_layout_loads(wd, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A folder written with safetensors' save_file and quanto's quantization map, as optimum-quanto
    documents it (no config.json; the map says which layers are quantized), loads with quantsave."""
    for exclude in (None, "head"):
        net = _quanto_net(wd, exclude=exclude)
        folder = tmp_path / f"native-{exclude}"
        folder.mkdir()
        safetensors_torch.save_file(net.state_dict(), folder / "model.safetensors")
        (folder / "quanto_qmap.json").write_text(json.dumps(quanto.quantization_map(net)))
        loaded = qs.load_quantized(folder, _Net())
        assert type(loaded.up).__name__ == "QLinear"
        assert (type(loaded.head).__name__ == "QLinear") == (exclude is None)
        assert torch.equal(loaded(X), net(X))


# --- transformers -----------------------------------------------------------------------------


@pytest.mark.parametrize("wd", DTYPES)
def test_transformers_llama(wd, llama_dir, llama_ids, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = transformers.AutoModelForCausalLM.from_pretrained(
        llama_dir, quantization_config=transformers.QuantoConfig(weights=wd)
    ).eval()
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "QLinear"
    expected = _logits(model, llama_ids)
    with pytest.raises(ValueError, match="quanto and is not serializable"):
        model.save_pretrained(tmp_path / "hf")
    qs.save_quantized(model, tmp_path / "qs")
    config = json.loads((tmp_path / "qs" / "config.json").read_text())
    assert config["quantization_config"] == {
        "activations": "none",
        "modules_to_not_convert": ["lm_head"],
        "quant_method": "quanto",
        "weights": wd,
    }
    # transformers cannot load pre-quantized quanto weights; it refuses instead of keeping random ones.
    with pytest.raises(ValueError, match="but found none"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "qs")
    loaded = qs.load_quantized(tmp_path / "qs")
    assert type(loaded.model.layers[1].mlp.down_proj).__name__ == "QLinear" and type(loaded.lm_head) is nn.Linear
    assert torch.equal(_logits(loaded, llama_ids), expected)
    if wd == "int4":
        from optimum.quanto.models import QuantizedModelForCausalLM

        assert torch.equal(_logits(QuantizedModelForCausalLM.from_pretrained(tmp_path / "qs"), llama_ids), expected)


# --- bad input --------------------------------------------------------------------------------


def _assert_refused(model: nn.Module, path: Path, match: str, **kw) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=match):
        qs.save_quantized(model, path, **kw)
    assert not path.exists()


def test_unsavable_models_are_refused_before_writing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    conv = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 4))
    quanto.quantize(conv, weights=quanto.qint8)
    quanto.freeze(conv)
    _assert_refused(conv, tmp_path / "conv", r"'0' is a quanto QConv2d: .* holds quantized nn.Linear layers only")

    acts = _Net()
    quanto.quantize(acts, weights=quanto.qint8, activations=quanto.qint8)
    quanto.freeze(acts)
    _assert_refused(acts, tmp_path / "acts", r"'up' quantizes activations \(qint8\)")

    unfrozen = _Net()
    quanto.quantize(unfrozen, weights=quanto.qint4)
    _assert_refused(unfrozen, tmp_path / "unfrozen", r"call optimum.quanto.freeze\(model\) before saving")

    mixed = _Net()
    quanto.quantize(mixed, weights=quanto.qint8, include="up")
    quanto.quantize(mixed, weights=quanto.qint4, include="down")
    quanto.freeze(mixed)
    _assert_refused(mixed, tmp_path / "mixed", r"mixes quanto weight types \['qint4', 'qint8'\]")

    e5m2 = _Net()
    quanto.quantize(e5m2, weights=quanto.qfloat8_e5m2)
    quanto.freeze(e5m2)
    _assert_refused(e5m2, tmp_path / "e5m2", "qfloat8_e5m2 has no diffusers/transformers weights_dtype")

    _assert_refused(
        _quanto_net("int8"),
        tmp_path / "wrong",
        r"hold qint8 weights but quantization_config says weights_dtype='int4'",
        quantization_config=qs.QuantoConfig("int4", ["head"]),
    )


def test_diffusers_model_the_config_does_not_describe(sd3_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A float Linear in a diffusers model whose config quantizes it would load uninitialized."""
    model = diffusers.SD3Transformer2DModel.from_pretrained(
        sd3_dir, quantization_config=diffusers.QuantoConfig(weights_dtype="int8", modules_to_not_convert=["proj_out"])
    )
    assert type(model.proj_out) is nn.Linear
    _assert_refused(
        model, tmp_path / "bad", r"Linear 'proj_out' is not quantized, but diffusers quantizes every Linear",
        quantization_config=qs.QuantoConfig("int8"),
    )
    qs.save_quantized(model, tmp_path / "ok")
    written = json.loads((tmp_path / "ok" / "config.json").read_text())["quantization_config"]
    assert written["modules_to_not_convert"] == ["proj_out"]
    assert type(qs.load_quantized(tmp_path / "ok").proj_out) is nn.Linear


def test_float_layer_sharing_a_short_name(sd3_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """diffusers' modules_to_not_convert matches short names only: a diffusers model with one float
    ``to_q`` among quantized ones cannot be described and is refused. A plain module gets full names."""
    model = diffusers.SD3Transformer2DModel.from_pretrained(sd3_dir)
    quanto.quantize(model, weights=quanto.qint8, exclude=["pos_embed.proj", "transformer_blocks.0.attn.to_q"])
    quanto.freeze(model)
    _assert_refused(
        model,
        tmp_path / "sd3",
        r"Linear 'transformer_blocks.0.attn.to_q' is not quantized but other layers named 'to_q' are",
    )

    torch.manual_seed(2)
    shared = _Pair()
    quanto.quantize(shared, weights=quanto.qint8, exclude=["a.head", "b.head", "b.up"])
    quanto.freeze(shared)
    qs.save_quantized(shared, tmp_path / "plain")
    written = json.loads((tmp_path / "plain" / "config.json").read_text())["quantization_config"]
    assert written["modules_to_not_convert"] == ["a.head", "b.head", "b.up"]
    loaded = qs.load_quantized(tmp_path / "plain", _Pair())
    assert type(loaded.a.up).__name__ == "QLinear" and type(loaded.b.up) is nn.Linear
    assert torch.equal(loaded(X), shared(X))


# --- corrupted checkpoints --------------------------------------------------------------------


def _replace_prefix(sd: dict[str, torch.Tensor], prefix: str, new: dict[str, torch.Tensor]) -> None:
    for key in [k for k in sd if k.startswith(prefix)]:
        del sd[key]
    sd.update(new)


def _corrupt(src: Path, dst: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    dst.mkdir()
    sd = dict(safetensors_torch.load_file(src / "model.safetensors"))
    edit(sd)
    safetensors_torch.save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    for name in ("config.json", "quanto_qmap.json"):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


@pytest.mark.parametrize(
    ("name", "edit", "match"),
    [
        ("no-shift", lambda sd: sd.pop("up.weight._shift"), r"'up' \(qint4\): missing tensors \['weight._shift'\]"),
        ("no-scale", lambda sd: sd.pop("down.weight._scale"), r"'down': no 'weight._scale' tensor"),
        ("no-data", lambda sd: sd.pop("up.weight._data._data"), r"missing tensors \['weight._data._data'\]"),
        (
            "shape",
            lambda sd: sd.update({"up.weight._data._data": sd["up.weight._data._data"][:-1]}),
            r"'weight._data._data' is uint8 \[31, 32\], expected uint8 \[32, 32\] for a Linear\(32, 64\)",
        ),
        (
            "dtype",
            lambda sd: sd.update({"down.weight._data._data": sd["down.weight._data._data"].to(torch.int8)}),
            r"'weight._data._data' is int8",
        ),
        (
            "tinygemm",
            lambda sd: sd.update({"up.weight._scale_shift": torch.zeros(1)}),
            r"unexpected tensors \['weight._scale_shift'\] \(not the standard quanto layout\)",
        ),
        (
            "plain-weight",
            lambda sd: _replace_prefix(sd, "down.weight.", {"down.weight": torch.zeros(16, 64)}),
            r"'down' holds a plain float weight but the config quantizes every Linear",
        ),
        (
            "quantized-skipped",
            lambda sd: sd.update({"head.weight._data._data": torch.zeros(4, 16, dtype=torch.uint8)}),
            r"'head' holds quantized weights but modules_to_not_convert \['head'\] keeps it",
        ),
    ],
)
def test_corrupted_checkpoint(name, edit, match, tmp_path) -> None:  # type: ignore[no-untyped-def]
    qs.save_quantized(_quanto_net("int4"), tmp_path / "good")
    bad = _corrupt(tmp_path / "good", tmp_path / name, edit)
    with pytest.raises(qs.CheckpointError, match=match):
        qs.load_quantized(bad, _Net())


def test_corrupted_qmap_and_qconv(tmp_path) -> None:  # type: ignore[no-untyped-def]
    qs.save_quantized(_quanto_net("int8"), tmp_path / "good")
    qmap_path = tmp_path / "good" / "quanto_qmap.json"
    qmap = json.loads(qmap_path.read_text())
    qmap["up"]["weights"] = "qint4"
    qmap_path.write_text(json.dumps(qmap))
    with pytest.raises(qs.CheckpointError, match=r"'up' has weights 'qint4' but config.json says weights_dtype='int8'"):
        qs.load_quantized(tmp_path / "good", _Net())
    qmap["up"] = {"weights": "qint8", "activations": "qint8"}
    qmap_path.write_text(json.dumps(qmap))
    with pytest.raises(qs.CheckpointError, match=r"'up' quantizes activations \(qint8\)"):
        qs.load_quantized(tmp_path / "good", _Net())
    del qmap["up"]
    qmap_path.write_text(json.dumps(qmap))
    with pytest.raises(qs.CheckpointError, match=r"in the weights but not in the map \['up'\]"):
        qs.load_quantized(tmp_path / "good", _Net())
    qmap_path.unlink()

    # QConv2d tensors (what optimum.quanto.quantize makes of a Conv2d) for a model's Conv2d.
    conv = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 4))
    q = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 4))
    quanto.quantize(q, weights=quanto.qint8)
    quanto.freeze(q)
    folder = tmp_path / "qconv"
    folder.mkdir()
    safetensors_torch.save_file(q.state_dict(), folder / "model.safetensors")
    (folder / "config.json").write_text(
        json.dumps({"quantization_config": {"quant_method": "quanto", "weights_dtype": "int8"}})
    )
    with pytest.raises(
        qs.CheckpointError, match=r"quantizes '0' but the model's module there is Conv2d: only quantized Linear"
    ):
        qs.load_quantized(folder, conv)


def test_weight_groups() -> None:
    from quantsave.backends.quanto.quantizer import QuantoQuantizer

    keys = [
        "a.weight._data._data", "a.weight._scale", "a.weight._shift", "a.bias", "a.input_scale", "a.output_scale",
        "b.weight._data", "b.weight._scale", "b.input_scale", "c.weight", "c.input_scale", "norm.weight",
    ]
    groups = QuantoQuantizer(qs.QuantoConfig("int4")).weight_groups(keys)
    assert groups == {
        "a.weight._data._data": "a", "a.weight._scale": "a", "a.weight._shift": "a", "a.input_scale": "a",
        "a.output_scale": "a", "b.weight._data": "b", "b.weight._scale": "b", "b.input_scale": "b",
    }


@pytest.mark.parametrize("wd", DTYPES)
def test_quantize_matches_diffusers_on_load(wd, sd3_dir, sd3_inputs, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """quantsave.quantize with a quanto config gives the tensors diffusers' on-load quantization
    gives, and the model saves with no arguments into the bytes diffusers writes."""
    ref = _quantize_sd3(sd3_dir, wd)
    model = diffusers.SD3Transformer2DModel.from_pretrained(sd3_dir)
    qs.quantize(model, qs.QuantoConfig(weights_dtype=wd))
    ours_sd, ref_sd = model.state_dict(), ref.state_dict()
    assert list(ours_sd) == list(ref_sd)
    assert all(torch.equal(ours_sd[k], ref_sd[k]) for k in ref_sd)
    qs.save_quantized(model, tmp_path / "qs")
    ref.save_pretrained(tmp_path / "hf")
    assert files_equal(tmp_path / "qs", tmp_path / "hf") == []
    reloaded = diffusers.SD3Transformer2DModel.from_pretrained(tmp_path / "qs")
    assert torch.equal(_run_sd3(reloaded, sd3_inputs), _run_sd3(ref, sd3_inputs))
