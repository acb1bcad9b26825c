"""torchao models: quantsave writes torchao's flattened safetensors form (the tensors and header
metadata diffusers and transformers write), ``from_pretrained`` loads it with no quantization
arguments and identical outputs, and quantsave loads the references' checkpoints, sharded or not.

safetensors writes header metadata in hash order, so a file with several metadata keys differs
from run to run; files are compared as parsed headers plus the data bytes."""

from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import quantsave as qs

warnings.filterwarnings("ignore", message=".*only bfloat16 is supported.*")
torchao = pytest.importorskip("torchao")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from torchao import quantization as aoq  # noqa: E402
from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict  # noqa: E402

from quantsave.backends.torchao import quantizer as qs_torchao  # noqa: E402

# Every torchao workflow that quantizes and runs on the CPU here (Int4 needs CUDA or mslk).
AO_CONFIGS = {
    "int8wo": aoq.Int8WeightOnlyConfig,
    "fp8wo": aoq.Float8WeightOnlyConfig,
    "int8dq": aoq.Int8DynamicActivationInt8WeightConfig,
    "intxwo": aoq.IntxWeightOnlyConfig,
}
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
TRANSFORMERS_INDEX = "model.safetensors.index.json"


def read_safetensors(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def same_files(ours: Path, ref: Path) -> None:
    """Same file names; JSON files byte-identical; safetensors files with equal parsed headers
    (metadata included) and identical data bytes."""
    assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in ref.iterdir())
    for f in ref.iterdir():
        if f.suffix == ".safetensors":
            assert read_safetensors(ours / f.name) == read_safetensors(f), f.name
        else:
            assert (ours / f.name).read_bytes() == f.read_bytes(), f.name


def split_weights(index: dict[str, Any]) -> list[str]:
    """Quantized weights whose parts the index places in more than one shard."""
    owners: dict[str, set[str]] = {}
    for key, fname in index["weight_map"].items():
        module, _, leaf = key.rpartition(".")
        if leaf.startswith("_weight_"):
            owners.setdefault(module, set()).add(fname)
    return sorted(m for m, files in owners.items() if len(files) > 1)


def sd3_inputs_bf16() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return dict(
        hidden_states=torch.randn(1, 4, 8, 8, generator=g).bfloat16(),
        encoder_hidden_states=torch.randn(1, 5, 32, generator=g).bfloat16(),
        pooled_projections=torch.randn(1, 16, generator=g).bfloat16(),
        timestep=torch.tensor([1.0]),
    )


def _sample(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).sample  # type: ignore[no-any-return]


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits  # type: ignore[no-any-return]


@pytest.fixture(scope="module", params=list(AO_CONFIGS))
def ao_sd3(request: pytest.FixtureRequest, sd3_dir: Path) -> tuple[str, nn.Module]:
    """The tiny SD3 transformer quantized on load by diffusers (bf16: diffusers loads torchao
    checkpoints in bf16 unless told otherwise)."""
    cfg = diffusers.TorchAoConfig(AO_CONFIGS[request.param]())
    model = diffusers.SD3Transformer2DModel.from_pretrained(
        sd3_dir, quantization_config=cfg, torch_dtype=torch.bfloat16
    )
    return request.param, model


@pytest.mark.parametrize("shard", [None, "8KB"])
def test_diffusers_round_trip(ao_sd3, shard, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _name, model = ao_sd3
    inputs = sd3_inputs_bf16()
    expected = _sample(model, inputs)
    kw = {"max_shard_size": shard} if shard else {}
    result = qs.save_quantized(model, tmp_path / "qs", **kw)
    model.save_pretrained(tmp_path / "hf", **kw)
    assert (result.num_shards > 1) == (shard is not None)
    assert (tmp_path / "qs" / "config.json").read_bytes() == (tmp_path / "hf" / "config.json").read_bytes()
    if shard is None:
        same_files(tmp_path / "qs", tmp_path / "hf")
    else:
        ours = json.loads((tmp_path / "qs" / DIFFUSERS_INDEX).read_text())
        ref = json.loads((tmp_path / "hf" / DIFFUSERS_INDEX).read_text())
        # diffusers repeats the tensor metadata in the index; the totals and keys agree.
        assert ours["metadata"] == ref["metadata"]
        assert set(ours["weight_map"]) == set(ref["weight_map"])
        assert split_weights(ours) == []
        # Every shard carries the full metadata.
        metas = [read_safetensors(tmp_path / "qs" / f)[0]["__metadata__"] for f in set(ours["weight_map"].values())]
        assert all(m == metas[0] for m in metas) and "tensor_names" in metas[0]
    # diffusers loads quantsave's folder with no quantization argument.
    reloaded = diffusers.SD3Transformer2DModel.from_pretrained(tmp_path / "qs")
    assert (
        reloaded.config.quantization_config.to_dict()["quant_type"]
        == model.config.quantization_config.to_dict()["quant_type"]
    )
    assert type(reloaded.transformer_blocks[0].attn.to_q.weight) is type(model.transformer_blocks[0].attn.to_q.weight)
    assert torch.equal(_sample(reloaded, inputs), expected)
    # quantsave loads diffusers' folder (whose sharded form splits weights across shards).
    if shard is not None:
        assert split_weights(json.loads((tmp_path / "hf" / DIFFUSERS_INDEX).read_text())) != []
    ours_loaded = qs.load_quantized(tmp_path / "hf")
    assert type(ours_loaded.transformer_blocks[0].attn.to_q.weight) is type(
        model.transformer_blocks[0].attn.to_q.weight
    )
    assert torch.equal(_sample(ours_loaded, inputs), expected)


def test_flattening_equals_torchao(ao_sd3) -> None:  # type: ignore[no-untyped-def]
    """quantsave's own flattening (no copies) gives torchao's tensors and metadata."""
    _, model = ao_sd3
    ref_tensors, ref_meta = flatten_tensor_state_dict(model.state_dict())
    q = qs_torchao.TorchAoQuantizer(qs.TorchAoConfig(aoq.Int8WeightOnlyConfig()))
    from quantsave.families import DIFFUSERS

    tensors = q.state_dict(model, DIFFUSERS)
    assert list(tensors) == list(ref_tensors)
    assert all(torch.equal(tensors[k], ref_tensors[k]) for k in tensors)
    assert q.header_metadata(tensors) == ref_meta


def test_pickle_form_loads_in_diffusers(ao_sd3, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _, model = ao_sd3
    inputs = sd3_inputs_bf16()
    qs.save_quantized(model, tmp_path / "qs", safe_serialization=False)
    assert (tmp_path / "qs" / "diffusion_pytorch_model.bin").is_file()
    reloaded = diffusers.SD3Transformer2DModel.from_pretrained(tmp_path / "qs", use_safetensors=False)
    assert torch.equal(_sample(reloaded, inputs), _sample(model, inputs))


@pytest.fixture(scope="module", params=["int8wo", "fp8wo", "int8dq"])
def ao_llama(request: pytest.FixtureRequest, llama_dir: Path) -> tuple[str, nn.Module]:
    cfg = transformers.TorchAoConfig(AO_CONFIGS[request.param]())
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=cfg, dtype=torch.bfloat16)
    return request.param, model


@pytest.mark.parametrize("shard", [None, "40KB"])
def test_transformers_round_trip(ao_llama, shard, tmp_path, llama_ids) -> None:  # type: ignore[no-untyped-def]
    _, model = ao_llama
    expected = _logits(model, llama_ids)
    kw = {"max_shard_size": shard} if shard else {}
    result = qs.save_quantized(model, tmp_path / "qs", **kw)
    model.save_pretrained(tmp_path / "hf", **kw)
    assert (result.num_shards > 1) == (shard is not None)
    for name in ("config.json", "generation_config.json"):
        assert (tmp_path / "qs" / name).read_bytes() == (tmp_path / "hf" / name).read_bytes()
    if shard is None:
        same_files(tmp_path / "qs", tmp_path / "hf")
    else:
        ours = json.loads((tmp_path / "qs" / TRANSFORMERS_INDEX).read_text())
        ref = json.loads((tmp_path / "hf" / TRANSFORMERS_INDEX).read_text())
        assert ours["metadata"] == ref["metadata"]
        assert set(ours["weight_map"]) == set(ref["weight_map"])
        assert split_weights(ours) == []
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "qs")
    assert type(reloaded.model.layers[0].self_attn.q_proj.weight) is type(model.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(_logits(reloaded, llama_ids), expected)
    ours_loaded = qs.load_quantized(tmp_path / "hf")
    assert torch.equal(_logits(ours_loaded, llama_ids), expected)


class RootModel(nn.Module):
    """A plain module with a root-level (dot-less) parameter beside quantized Linears."""

    def __init__(self) -> None:
        super().__init__()
        self.scale_shift_table = nn.Parameter(torch.randn(1, 64))
        self.blocks = nn.ModuleList([nn.Linear(64, 64) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.scale_shift_table
        for b in self.blocks:
            x = b(x)
        return x


def test_plain_module_root_names_and_split_limits(tmp_path) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = RootModel().to(torch.bfloat16)
    aoq.quantize_(model, aoq.Int8WeightOnlyConfig())
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    expected = model(x)
    # A shard limit smaller than one weight: each weight's parts still stay together.
    result = qs.save_quantized(model, tmp_path / "qs", max_shard_size="5KB")
    assert result.num_shards > 1
    index = json.loads((tmp_path / "qs" / "model.safetensors.index.json").read_text())
    assert split_weights(index) == []
    config = json.loads((tmp_path / "qs" / "config.json").read_text())["quantization_config"]
    assert config == qs.TorchAoConfig(aoq.Int8WeightOnlyConfig()).to_dict()
    header = read_safetensors(tmp_path / "qs" / index["weight_map"]["scale_shift_table"])[0]
    assert "scale_shift_table" in json.loads(header["__metadata__"]["tensor_names"])
    loaded = qs.load_quantized(tmp_path / "qs", RootModel())
    assert type(loaded.blocks[0].weight).__name__ == "Int8Tensor"
    assert torch.equal(loaded.scale_shift_table, model.scale_shift_table)
    assert torch.equal(loaded(x), expected)


def test_hand_built_int4_tensor_round_trip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Int4 cannot be quantized on this CPU (it needs CUDA or mslk); its serialization is checked
    with a hand-built Int4Tensor: the parts come back bit for bit."""
    from torchao.quantization import Int4Tensor

    g = torch.Generator().manual_seed(0)
    n, k, gs = 64, 64, 32
    w = Int4Tensor(
        qdata=torch.randint(0, 255, (n, k // 2), dtype=torch.uint8, generator=g),
        scale=torch.randn(k // gs, n, generator=g).bfloat16(),
        zero_point=torch.randn(k // gs, n, generator=g).bfloat16(),
        block_size=[1, gs],
        shape=torch.Size([n, k]),
        activation_dtype=torch.bfloat16,
    )
    model = nn.Sequential(nn.Linear(k, n, bias=False))
    model[0].weight = nn.Parameter(w, requires_grad=False)
    qs.save_quantized(
        model, tmp_path / "qs", quantization_config=qs.TorchAoConfig(aoq.Int4WeightOnlyConfig(group_size=gs))
    )
    _, ref_meta = flatten_tensor_state_dict(model.state_dict())
    header = read_safetensors(tmp_path / "qs" / "model.safetensors")[0]
    assert {k: v for k, v in header["__metadata__"].items() if k != "format"} == ref_meta
    loaded = qs.load_quantized(tmp_path / "qs", nn.Sequential(nn.Linear(k, n, bias=False)))
    got = loaded[0].weight
    assert type(got).__name__ == "Int4Tensor"
    for part in ("qdata", "scale", "zero_point"):
        assert torch.equal(getattr(got, part), getattr(w, part))


@pytest.mark.parametrize("name", list(AO_CONFIGS))
def test_config_dicts_equal_the_references(name) -> None:  # type: ignore[no-untyped-def]
    ao = AO_CONFIGS[name]()
    ours = qs.TorchAoConfig(ao, modules_to_not_convert=["proj_out"])
    assert ours.to_dict() == json.loads(
        json.dumps(diffusers.TorchAoConfig(ao, modules_to_not_convert=["proj_out"]).to_dict(), default=str)
    )
    assert ours.to_transformers_dict() == transformers.TorchAoConfig(ao, modules_to_not_convert=["proj_out"]).to_dict()
    # Round trips through the dict, and resolves from the libraries' config objects.
    assert qs.TorchAoConfig.from_dict(ours.to_dict()) == ours
    from quantsave.backends import resolve_config

    assert resolve_config(diffusers.TorchAoConfig(ao)) == qs.TorchAoConfig(ao)
    assert resolve_config(transformers.TorchAoConfig(ao)).to_dict() == qs.TorchAoConfig(ao).to_dict()
    assert type(qs.TorchAoConfig.from_dict(ours.to_dict()).quant_type) is type(ao)


def test_config_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="no longer supported"):
        qs.TorchAoConfig("int8wo")
    good = qs.TorchAoConfig(aoq.Int8WeightOnlyConfig()).to_dict()
    with pytest.raises(ValueError, match="unknown TorchAoConfig keys"):
        qs.TorchAoConfig.from_dict({**good, "bits": 4})
    with pytest.raises(ValueError, match="exactly one key 'default'"):
        qs.TorchAoConfig.from_dict({**good, "quant_type": {"default": good["quant_type"]["default"], "proj": {}}})
    # Only torchao's allow-listed classes resolve.
    evil = {"_type": "system", "_version": 1, "_data": {}}
    with pytest.raises(ValueError, match="invalid torchao config"):
        qs.TorchAoConfig.from_dict({**good, "quant_type": {"default": evil}})
    no_version = {k: v for k, v in good["quant_type"]["default"].items() if k != "_version"}
    with pytest.raises(ValueError, match="_version"):
        qs.TorchAoConfig.from_dict({**good, "quant_type": {"default": no_version}})


def test_old_torchao_is_refused_for_safetensors(ao_sd3, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    _, model = ao_sd3
    monkeypatch.setattr(qs_torchao, "_torchao_version", lambda: (0, 15, 0))
    with pytest.raises(qs.NotSerializableError, match=r"torchao >= 0\.16.*safe_serialization=False"):
        qs.save_quantized(model, tmp_path / "qs")
    assert not (tmp_path / "qs").exists()


def _rewrite(path: Path, drop: str | None = None, meta: dict[str, str] | None = None) -> None:
    from safetensors.torch import load_file, save_file

    header, _ = read_safetensors(path)
    tensors = load_file(path)
    if drop is not None:
        del tensors[drop]
    save_file(tensors, path, metadata=meta if meta is not None else header["__metadata__"])


def test_corrupt_torchao_checkpoints(tmp_path) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = RootModel().to(torch.bfloat16)
    aoq.quantize_(model, aoq.Int8WeightOnlyConfig())
    qs.save_quantized(model, tmp_path / "good")
    good = tmp_path / "good" / "model.safetensors"
    header, _ = read_safetensors(good)
    meta = header["__metadata__"]
    cases = {
        "no metadata": dict(meta={"format": "pt"}),
        "missing part": dict(drop="blocks.1._weight_scale"),
        "bad json": dict(meta={**meta, "blocks.0.weight": "{not json"}),
        "unknown type": dict(
            meta={**meta, "blocks.0.weight": meta["blocks.0.weight"].replace("Int8Tensor", "EvilTensor")}
        ),
        "bad names": dict(meta={**meta, "tensor_names": '{"a": 1}'}),
        "wrong shape": dict(
            meta={
                **meta,
                "blocks.2.weight": meta["blocks.0.weight"].replace('"block_size": [1, 64]', '"block_size": [1, 32]'),
            }
        ),
    }
    for name, kw in cases.items():
        d = tmp_path / name.replace(" ", "-")
        d.mkdir()
        for f in (tmp_path / "good").iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        _rewrite(d / "model.safetensors", **kw)
        try:
            loaded = qs.load_quantized(d, RootModel())
        except qs.CheckpointError as e:
            assert str(d) in str(e), name
            continue
        # A change torchao accepts must still give a model with the file's values.
        assert name == "wrong shape", f"{name}: loaded without error"
        assert torch.equal(loaded.blocks[2].weight.qdata, model.blocks[2].weight.qdata)


def test_quantize_matches_transformers_and_saves(llama_dir, tmp_path, llama_ids) -> None:  # type: ignore[no-untyped-def]
    """quantsave.quantize with a torchao config quantizes the layers transformers quantizes on
    load (all Linear but lm_head), to the same tensors; the model then saves with no arguments."""
    ao = aoq.Int8WeightOnlyConfig()
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        llama_dir, quantization_config=transformers.TorchAoConfig(ao), dtype=torch.bfloat16
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16)
    qs.quantize(model, qs.TorchAoConfig(ao))
    ours_sd, ref_sd = model.state_dict(), ref.state_dict()
    assert list(ours_sd) == list(ref_sd)
    for k, t in ref_sd.items():
        assert type(ours_sd[k]) is type(t), k
        if type(t).__name__ == "Int8Tensor":
            assert torch.equal(ours_sd[k].qdata, t.qdata) and torch.equal(ours_sd[k].scale, t.scale), k
        else:
            assert torch.equal(ours_sd[k], t), k
    assert type(model.lm_head.weight) is torch.nn.Parameter and type(model.lm_head.weight.data) is torch.Tensor
    qs.save_quantized(model, tmp_path / "qs")
    ref.save_pretrained(tmp_path / "hf")
    same_files(tmp_path / "qs", tmp_path / "hf")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "qs")
    assert torch.equal(_logits(reloaded, llama_ids), _logits(ref, llama_ids))
