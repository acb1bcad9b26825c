"""Bad input to a save gives a clear error before anything is written (nothing under the target
changes): unsavable tensors, bad names and sizes, backends that cannot be saved."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import quantsave as qs
from conftest import tiny_llama_config

safetensors_torch = pytest.importorskip("safetensors.torch")
save_file = safetensors_torch.save_file


def snapshot(folder: Path) -> dict[str, bytes | None] | None:
    """Every entry under ``folder`` (relative name -> bytes, None for folders), or None when it
    does not exist."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


@pytest.fixture(params=["missing", "existing"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A save folder that does not exist yet, or one holding an earlier checkpoint."""
    path = tmp_path / "out"
    if request.param == "existing":
        torch.manual_seed(1)
        qs.save_quantized(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), path, max_shard_size=100)
        (path / "notes.txt").write_text("keep me")
    return path


def refuses(target: Path, exc: type[BaseException], match: str | None, call: Callable[[], Any]) -> pytest.ExceptionInfo:
    """Runs ``call`` expecting ``exc``; checks that nothing under ``target``'s parent changed."""
    before = snapshot(target.parent)
    with pytest.raises(exc, match=match) as info:
        call()
    assert snapshot(target.parent) == before
    assert target.exists() == (before is not None and "out" in before)
    return info


# --- tensors that cannot be saved -------------------------------------------------------------


def test_meta_tensors(target: Path) -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    info = refuses(target, ValueError, "meta", lambda: qs.save_quantized(model, target))
    assert "'0.weight'" in str(info.value)


class Sparse(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Parameter(torch.ones(3))
        self.register_buffer("sp", torch.eye(3).to_sparse())


def test_sparse_tensors(target: Path) -> None:
    info = refuses(target, ValueError, "sparse", lambda: qs.save_quantized(Sparse(), target))
    assert "'sp'" in str(info.value)


class Shared(nn.Module):
    def __init__(self, view: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        x = torch.randn(4, 6)
        self.a = nn.Parameter(x)
        self.register_buffer("b", view(x))


@pytest.mark.parametrize(
    "view",
    [
        lambda x: x,
        lambda x: x[1],
        lambda x: x.t(),
        lambda x: x[:, 2:4],
        lambda x: x.view(-1)[5:9],
        lambda x: x[::3, ::5],
    ],
    ids=["same", "row", "transposed", "cols", "flat-slice", "strided"],
)
def test_shared_memory(view, target: Path) -> None:  # type: ignore[no-untyped-def]
    info = refuses(target, ValueError, "share memory", lambda: qs.save_quantized(Shared(view), target))
    assert "'a'" in str(info.value) and "'b'" in str(info.value)


class PartialOverlap(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        x = torch.arange(10.0)
        self.register_buffer("first", x[:6])
        self.register_buffer("second", x[4:])


def test_partially_overlapping_views(target: Path) -> None:
    info = refuses(target, ValueError, "share memory", lambda: qs.save_quantized(PartialOverlap(), target))
    assert "'first'" in str(info.value) and "'second'" in str(info.value)


class Disjoint(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        x = torch.arange(10.0)
        self.register_buffer("first", x[:5])
        self.register_buffer("second", x[5:])


def test_disjoint_views_of_one_storage_save_fine(tmp_path: Path) -> None:
    qs.save_quantized(Disjoint(), tmp_path)
    loaded, _ = qs.load_state_dict(tmp_path)
    assert torch.equal(loaded["first"], torch.arange(5.0)) and torch.equal(loaded["second"], torch.arange(5.0, 10.0))


def test_tied_llama_saves_like_transformers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = tiny_llama_config()
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    qs.save_quantized(model, tmp_path / "qs")
    model.save_pretrained(tmp_path / "hf")
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "qs" / name).read_bytes() == (tmp_path / "hf" / name).read_bytes(), name
    state_dict, _ = qs.load_state_dict(tmp_path / "qs")
    assert "lm_head.weight" not in state_dict and "model.embed_tokens.weight" in state_dict
    ids = torch.tensor([[1, 5, 9, 33, 64, 2]])
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "qs")
    ours = qs.load_quantized(tmp_path / "qs")
    with torch.no_grad():
        expected = model(ids).logits
        assert torch.equal(reloaded(ids).logits, expected)
        assert torch.equal(ours(ids).logits, expected)
    assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()


# --- names, sizes, folders --------------------------------------------------------------------

BAD_VARIANTS = ["a/b", "..", ".", "/abs", "a\\b", "", "x\0y", "../../evil"]
BAD_WEIGHTS_NAMES = [
    "../model.safetensors",
    "/tmp/model.safetensors",
    "sub/model.safetensors",
    "..",
    "a\\b.safetensors",
    "model.bin",
    "model",
]


@pytest.mark.parametrize("variant", BAD_VARIANTS)
def test_bad_variant(variant: str, target: Path) -> None:
    refuses(target, ValueError, "variant", lambda: qs.save_quantized(nn.Linear(2, 2), target, variant=variant))


@pytest.mark.parametrize("weights_name", BAD_WEIGHTS_NAMES)
def test_bad_weights_name(weights_name: str, target: Path) -> None:
    refuses(
        target,
        ValueError,
        "weights_name",
        lambda: qs.save_quantized(nn.Linear(2, 2), target, weights_name=weights_name),
    )


@pytest.mark.parametrize("size", ["abc", 0, -5, "5XB", "", "KB", "-1KB", "0KB", "1e3", "5 G B", 1.5, True, [10]])
def test_bad_max_shard_size(size, target: Path) -> None:  # type: ignore[no-untyped-def]
    refuses(target, ValueError, None, lambda: qs.save_quantized(nn.Linear(2, 2), target, max_shard_size=size))


@pytest.mark.parametrize("metadata", [{"a": 1}, {1: "a"}, {"a": None}])
def test_bad_metadata(metadata, target: Path) -> None:  # type: ignore[no-untyped-def]
    refuses(target, ValueError, "metadata", lambda: qs.save_quantized(nn.Linear(2, 2), target, metadata=metadata))


def test_not_a_module(target: Path) -> None:
    refuses(target, ValueError, "nn.Module", lambda: qs.save_quantized({"w": torch.ones(2)}, target))  # type: ignore[arg-type]


def test_save_directory_is_a_file(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("precious")
    before = snapshot(tmp_path)
    with pytest.raises(NotADirectoryError):
        qs.save_quantized(nn.Linear(2, 2), path)
    with pytest.raises(OSError):
        qs.save_quantized(nn.Linear(2, 2), path / "sub")
    assert snapshot(tmp_path) == before


# --- backends that cannot be saved ------------------------------------------------------------


class GGUFParameter(nn.Parameter):
    """Stands in for ``diffusers.quantizers.gguf.utils.GGUFParameter`` (which needs the ``gguf``
    package): packed GGML bytes plus the quant type, which lives only on the Python object."""

    def __new__(cls, data: torch.Tensor, requires_grad: bool = False, quant_type: int | None = None):  # type: ignore[no-untyped-def]
        self = torch.Tensor._make_subclass(cls, data, requires_grad)
        self.quant_type = quant_type
        return self


def gguf_model() -> nn.Module:
    model = nn.Sequential(nn.Linear(32, 4), nn.LayerNorm(4))
    model[0].weight = GGUFParameter(torch.randint(0, 255, (4, 18), dtype=torch.uint8), quant_type=8)
    return model


def check_gguf_refusal(info: pytest.ExceptionInfo) -> None:
    assert isinstance(info.value, ValueError)
    msg = str(info.value)
    assert "gguf" in msg.lower() and "GGML" in msg and "Nothing was written" in msg


@pytest.mark.parametrize("safe", [True, False])
def test_gguf_model_refused(safe: bool, target: Path) -> None:
    info = refuses(
        target, qs.NotSerializableError, None, lambda: qs.save_quantized(gguf_model(), target, safe_serialization=safe)
    )
    check_gguf_refusal(info)


def test_real_gguf_parameter_refused(target: Path) -> None:
    pytest.importorskip("gguf")
    from diffusers.quantizers.gguf.utils import GGUFParameter as Real

    model = nn.Linear(32, 4)
    model.weight = Real(torch.randint(0, 255, (4, 18), dtype=torch.uint8), quant_type=8)
    check_gguf_refusal(refuses(target, qs.NotSerializableError, None, lambda: qs.save_quantized(model, target)))


def _gguf_configs() -> list[Any]:
    out: list[Any] = [
        qs.GGUFQuantizationConfig(),
        {"quant_method": "gguf"},
        {"quant_method": "gguf", "compute_dtype": "bfloat16"},
    ]
    try:
        import diffusers

        out.append(diffusers.GGUFQuantizationConfig(compute_dtype=torch.bfloat16))
    except ImportError:
        pass
    return out


@pytest.mark.parametrize(
    "config", _gguf_configs(), ids=lambda c: type(c).__module__.split(".")[0] + "-" + type(c).__name__
)
def test_explicit_gguf_config_refused(config, target: Path) -> None:  # type: ignore[no-untyped-def]
    info = refuses(
        target,
        qs.NotSerializableError,
        None,
        lambda: qs.save_quantized(nn.Linear(2, 2), target, quantization_config=config),
    )
    check_gguf_refusal(info)


@pytest.mark.parametrize("config", [{"quant_method": "awq", "bits": 4}, {"quant_method": "nonexistent"}])
def test_unknown_quant_method(config, target: Path) -> None:  # type: ignore[no-untyped-def]
    info = refuses(
        target, ValueError, None, lambda: qs.save_quantized(nn.Linear(2, 2), target, quantization_config=config)
    )
    msg = str(info.value)
    assert config["quant_method"] in msg and "bitsandbytes" in msg and "gguf" in msg


def test_unknown_quant_method_in_checkpoint(tmp_path: Path) -> None:
    qs.save_quantized(nn.Linear(2, 2), tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "awq"}}))
    _, cfg = qs.load_state_dict(tmp_path)
    assert cfg is not None and cfg.method == "awq"
    with pytest.raises(ValueError, match="awq") as info:
        qs.load_quantized(tmp_path, nn.Linear(2, 2))
    assert "bitsandbytes" in str(info.value)


def test_quantization_config_wrong_type(target: Path) -> None:
    refuses(
        target,
        ValueError,
        "quantization config",
        lambda: qs.save_quantized(nn.Linear(2, 2), target, quantization_config=42),
    )
