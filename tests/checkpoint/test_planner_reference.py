"""Shard planning against ``huggingface_hub.split_torch_state_dict_into_shards``: the same shard
files, weight map and ``total_size`` for plain state dicts; the tensors of one bitsandbytes
weight always in one shard; and re-saving into a folder removes what an earlier save left."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import quantsave as qs
from conftest import split_groups, weight_owner

hub = pytest.importorskip("huggingface_hub")
safetensors_torch = pytest.importorskip("safetensors.torch")

INDEX = "model.safetensors.index.json"
FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


class Tree(nn.Module):
    """A module whose state dict holds ``tensors`` under their dotted names (children created as
    needed); ``params`` says which become parameters rather than buffers."""

    def __init__(self, tensors: dict[str, torch.Tensor], params: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        super().__init__()
        for name, t in tensors.items():
            *path, leaf = name.split(".")
            holder: nn.Module = self
            for part in path:
                if not hasattr(holder, part):
                    holder.add_module(part, nn.Module())
                holder = getattr(holder, part)
            if name in params:
                holder.register_parameter(leaf, nn.Parameter(t, requires_grad=False))
            else:
                holder.register_buffer(leaf, t)


def reference(state_dict: dict[str, torch.Tensor], max_shard_size, stem: str = "model"):  # type: ignore[no-untyped-def]
    return hub.split_torch_state_dict_into_shards(
        state_dict, filename_pattern=stem + "{suffix}.safetensors", max_shard_size=max_shard_size
    )


def weight_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".safetensors"))


def check_matches_reference(  # type: ignore[no-untyped-def]
    folder: Path, state_dict: dict[str, torch.Tensor], max_shard_size, stem: str = "model"
) -> None:
    ref = reference(state_dict, max_shard_size, stem)
    index_name = f"{stem}.safetensors.index.json"
    assert weight_files(folder) == sorted(ref.filename_to_tensors)
    if ref.is_sharded:
        text = (folder / index_name).read_text()
        index = json.loads(text)
        assert index["weight_map"] == ref.tensor_to_filename
        assert index["metadata"] == ref.metadata
        # Written exactly as transformers writes its index.
        expected = {"metadata": ref.metadata, "weight_map": ref.tensor_to_filename}
        assert text == json.dumps(expected, indent=2, sort_keys=True) + "\n"
    else:
        assert not (folder / index_name).exists()
    # Each shard holds exactly its tensors, byte for byte as safetensors writes them.
    for fname, names in ref.filename_to_tensors.items():
        with tempfile.TemporaryDirectory() as d:
            refpath = Path(d) / fname
            safetensors_torch.save_file({k: state_dict[k] for k in names}, refpath, metadata={"format": "pt"})
            assert (folder / fname).read_bytes() == refpath.read_bytes(), fname


SIZES = st.one_of(
    st.integers(1, 6000),
    st.builds(lambda n, u: f"{n}{u}", st.integers(1, 9), st.sampled_from(["KB", "kb", " KB"])),
    st.builds(lambda x: f"{x / 10:.1f}KB", st.integers(1, 60)),
)
SPEC = st.lists(
    st.tuples(
        st.integers(0, 3),  # nesting group: 0 = top level
        st.sampled_from(FLOATS),
        st.lists(st.integers(1, 24), min_size=0, max_size=3),  # no empty tensors (see below)
        st.booleans(),  # parameter or buffer
    ),
    min_size=1,
    max_size=14,
)


def build(spec) -> Tree:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(len(spec))
    tensors, params = {}, set()
    for i, (group, dtype, shape, is_param) in enumerate(spec):
        name = f"t{i}" if group == 0 else f"block{group}.sub.t{i}"
        tensors[name] = torch.randn(shape, generator=g).to(dtype)
        if is_param:
            params.add(name)
    return Tree(tensors, params)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=SPEC, max_shard_size=SIZES)
def test_plain_state_dicts_match_reference(spec, max_shard_size) -> None:  # type: ignore[no-untyped-def]
    model = build(spec)
    state_dict = dict(model.state_dict())
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "qs"
        result = qs.save_quantized(model, out, max_shard_size=max_shard_size)
        ref = reference(state_dict, max_shard_size)
        assert result.num_shards == len(ref.filename_to_tensors)
        check_matches_reference(out, state_dict, max_shard_size)
        loaded, _ = qs.load_state_dict(out)
        assert set(loaded) == set(state_dict)
        assert all(torch.equal(loaded[k], v) for k, v in state_dict.items())


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    names=st.lists(
        st.text(
            alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="."), min_size=1, max_size=8
        ).filter(
            lambda n: not hasattr(nn.Module(), n)  # not an attribute every module has
        ),
        min_size=2,
        max_size=6,
        unique=True,
    )
)
def test_index_text_for_any_tensor_names(names: list[str]) -> None:
    """Non-ASCII, control and astral characters in names: the index is written exactly as
    ``json.dumps(index, indent=2, sort_keys=True)`` writes it (ASCII escapes, code point order)."""
    model = Tree({n: torch.full((100,), float(i)) for i, n in enumerate(names)})
    with tempfile.TemporaryDirectory() as d:
        qs.save_quantized(model, d, max_shard_size=500)
        check_matches_reference(Path(d), dict(model.state_dict()), 500)
        loaded, _ = qs.load_state_dict(d)
        assert all(torch.equal(loaded[n], t) for n, t in model.state_dict().items())


@pytest.mark.parametrize("max_shard_size", [1, 100, 250, 1000, "1KB", "0.5KB", "3KB", "10KB", "10GB"])
def test_fixed_sizes_match_reference(max_shard_size, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4), nn.Linear(4, 40).to(torch.float16))
    qs.save_quantized(model, tmp_path, max_shard_size=max_shard_size)
    check_matches_reference(tmp_path, dict(model.state_dict()), max_shard_size)


def test_oversize_tensor_gets_own_shard_while_current_stays_open(tmp_path: Path) -> None:
    """The reference pushes an oversize tensor as its own shard and keeps filling the open one."""
    tensors = {"a": torch.ones(10), "big": torch.ones(100), "b": torch.ones(10), "c": torch.ones(30)}
    model = Tree(tensors)
    qs.save_quantized(model, tmp_path, max_shard_size=100)
    check_matches_reference(tmp_path, dict(model.state_dict()), 100)
    weight_map = json.loads((tmp_path / INDEX).read_text())["weight_map"]
    assert weight_map["a"] == weight_map["b"] != weight_map["big"]


def test_empty_tensors_placed_like_reference(tmp_path: Path) -> None:
    tensors = {"a": torch.empty(0, 3), "b": torch.ones(100), "c": torch.ones(100), "d": torch.empty(0)}
    model = Tree(tensors)
    qs.save_quantized(model, tmp_path, max_shard_size=500)
    check_matches_reference(tmp_path, dict(model.state_dict()), 500)


# --- file names: variants, weights_name, diffusers --------------------------------------------


def _four_linears() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(8, 8) for _ in range(4)])


def test_variant_names(tmp_path: Path) -> None:
    model = _four_linears()
    state_dict = dict(model.state_dict())
    result = qs.save_quantized(model, tmp_path / "sharded", max_shard_size=300, variant="fp16")
    ref = reference(state_dict, 300, "model.fp16")
    n = len(ref.filename_to_tensors)
    assert n > 1 and result.num_shards == n
    assert weight_files(tmp_path / "sharded") == [f"model.fp16-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(p.name for p in (tmp_path / "sharded").iterdir()) == sorted(
        [*ref.filename_to_tensors, "model.safetensors.index.fp16.json"]
    )
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.fp16.json").read_text())
    assert index["weight_map"] == ref.tensor_to_filename and index["metadata"] == ref.metadata
    loaded, _ = qs.load_state_dict(tmp_path / "sharded", variant="fp16")
    assert all(torch.equal(loaded[k], v) for k, v in state_dict.items())
    with pytest.raises(FileNotFoundError):
        qs.load_state_dict(tmp_path / "sharded")

    qs.save_quantized(model, tmp_path / "single", variant="fp16")
    assert sorted(p.name for p in (tmp_path / "single").iterdir()) == ["model.fp16.safetensors"]


def test_two_shards_variant_name(tmp_path: Path) -> None:
    tensors = {"a": torch.ones(100), "b": torch.ones(100)}
    qs.save_quantized(Tree(tensors), tmp_path, max_shard_size=500, variant="fp16")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model.fp16-00001-of-00002.safetensors",
        "model.fp16-00002-of-00002.safetensors",
        "model.safetensors.index.fp16.json",
    ]


def test_weights_name(tmp_path: Path) -> None:
    model = _four_linears()
    state_dict = dict(model.state_dict())
    qs.save_quantized(model, tmp_path / "a", max_shard_size=300, weights_name="custom.safetensors")
    check_matches_reference(tmp_path / "a", state_dict, 300, stem="custom")
    assert (tmp_path / "a" / "custom.safetensors.index.json").is_file()
    qs.save_quantized(model, tmp_path / "b", weights_name="custom.safetensors", variant="v2")
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["custom.v2.safetensors"]
    qs.save_quantized(model, tmp_path / "c", max_shard_size=300, weights_name="custom.safetensors", variant="v2")
    assert (tmp_path / "c" / "custom.safetensors.index.v2.json").is_file()
    assert all(f.startswith("custom.v2-0000") for f in weight_files(tmp_path / "c"))


def test_diffusers_family_names_match_reference_and_diffusers(sd3_dir: Path, tmp_path: Path) -> None:
    diffusers = pytest.importorskip("diffusers")
    model = diffusers.SD3Transformer2DModel.from_pretrained(sd3_dir)
    state_dict = dict(model.state_dict())
    qs.save_quantized(model, tmp_path / "qs", max_shard_size="30KB")
    ref = reference(state_dict, "30KB", "diffusion_pytorch_model")
    assert ref.is_sharded
    assert weight_files(tmp_path / "qs") == sorted(ref.filename_to_tensors)
    index = json.loads((tmp_path / "qs" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert index["weight_map"] == ref.tensor_to_filename and index["metadata"] == ref.metadata
    model.save_pretrained(tmp_path / "hf", max_shard_size="30KB")
    for name in [*ref.filename_to_tensors, "diffusion_pytorch_model.safetensors.index.json"]:
        assert (tmp_path / "qs" / name).read_bytes() == (tmp_path / "hf" / name).read_bytes(), name


# --- bitsandbytes weight groups ---------------------------------------------------------------

BNB_CONFIGS = {
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "nf4-bf16": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16),
    "nf4-storage-bf16": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_quant_storage=torch.bfloat16),
    "int8": dict(load_in_8bit=True),
}


def float_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 32),
        nn.ReLU(),
        nn.Linear(32, 24),
        nn.LayerNorm(24),
        nn.Linear(24, 24, bias=False),
        nn.GELU(),
        nn.Linear(24, 8),
    )


def bnb_model(name: str) -> nn.Module:
    pytest.importorskip("bitsandbytes")
    model = float_model()
    qs.quantize(model, qs.BitsAndBytesConfig(**BNB_CONFIGS[name]))
    return model.eval()


def weight_map_of(folder: Path) -> dict[str, str]:
    if (folder / INDEX).is_file():
        return json.loads((folder / INDEX).read_text())["weight_map"]
    state_dict, _ = qs.load_state_dict(folder)
    return dict.fromkeys(state_dict, "model.safetensors")


@pytest.mark.parametrize("name", list(BNB_CONFIGS))
@pytest.mark.parametrize("max_shard_size", [1, 500, 1000, 3000, "10KB"])
def test_bnb_groups_stay_together_and_reload(name: str, max_shard_size, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model = bnb_model(name)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x)
    # After the forward pass: bitsandbytes casts a 4-bit layer's bias to its compute dtype there.
    state_dict = dict(model.state_dict())
    result = qs.save_quantized(model, tmp_path, max_shard_size=max_shard_size)
    weight_map = weight_map_of(tmp_path)
    assert set(weight_map) == set(state_dict)
    assert split_groups(weight_map) == []
    for key, fname in weight_map.items():
        owner = weight_owner(key)
        if owner is not None:
            assert weight_map[owner + ".weight"] == fname, key
    # Each shard stays under the limit unless it holds a single weight group or tensor.
    limit = max_shard_size if isinstance(max_shard_size, int) else 10_000
    for fname in set(weight_map.values()):
        keys = [k for k, f in weight_map.items() if f == fname]
        size = sum(state_dict[k].untyped_storage().nbytes() for k in keys)
        owners = {weight_owner(k) for k in keys} - {None}
        units = {weight_owner(k) or (k[: -len(".weight")] if k[: -len(".weight")] in owners else k) for k in keys}
        assert size <= limit or len(units) == 1, (fname, size, units)
    # total_size agrees with the reference (same sizes, only placement differs).
    ref = reference(state_dict, max_shard_size)
    if result.num_shards > 1:
        index = json.loads((tmp_path / INDEX).read_text())
        assert index["metadata"] == ref.metadata
        if not split_groups(ref.tensor_to_filename):
            # Where the reference splits no weight, quantsave plans exactly as it does.
            assert weight_map == ref.tensor_to_filename
    # Reloads into a fresh float skeleton with identical outputs.
    loaded = qs.load_quantized(tmp_path, float_model())
    assert not loaded.training
    kind = "Linear8bitLt" if name == "int8" else "Linear4bit"
    assert [type(m).__name__ for m in loaded if isinstance(m, nn.Linear)] == [kind] * 4
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


def test_bnb_tiny_shards_split_reference_but_not_quantsave(tmp_path: Path) -> None:
    """At 500 bytes the reference planner splits 4-bit weights across files; quantsave does not."""
    model = bnb_model("nf4-dq")
    state_dict = dict(model.state_dict())
    assert split_groups(reference(state_dict, 500).tensor_to_filename) != []
    qs.save_quantized(model, tmp_path, max_shard_size=500)
    assert split_groups(weight_map_of(tmp_path)) == []


# --- stale files of an earlier save -----------------------------------------------------------


def names_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_resave_removes_stale_shards_and_index(tmp_path: Path) -> None:
    model = bnb_model("int8")
    qs.save_quantized(model, tmp_path, max_shard_size=1000)
    first = weight_files(tmp_path)
    assert len(first) >= 4 and (tmp_path / INDEX).is_file()

    qs.save_quantized(model, tmp_path)
    assert names_in(tmp_path) == ["config.json", "model.safetensors"]

    qs.save_quantized(model, tmp_path, max_shard_size=2000)
    fewer = [f for f in weight_files(tmp_path) if f != "model.safetensors"]
    assert 1 < len(fewer) < len(first)
    index = json.loads((tmp_path / INDEX).read_text())
    assert sorted(set(index["weight_map"].values())) == fewer

    # Fewer shards than before: the extra ones go, and the index names only the new ones.
    qs.save_quantized(model, tmp_path, max_shard_size=1000)
    qs.save_quantized(model, tmp_path, max_shard_size=2000)
    assert [f for f in weight_files(tmp_path) if f != "model.safetensors"] == fewer
    assert sorted(set(_index_of(tmp_path)["weight_map"].values())) == fewer
    loaded = qs.load_quantized(tmp_path, float_model())
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def _index_of(folder: Path) -> dict:
    return json.loads((folder / INDEX).read_text())


def test_resave_keeps_unrelated_files(tmp_path: Path) -> None:
    model = _four_linears()
    (tmp_path / "README.md").write_text("hello")
    (tmp_path / "other-00001-of-00002.safetensors").write_bytes(b"not ours")
    qs.save_quantized(model, tmp_path, max_shard_size=300)
    qs.save_quantized(model, tmp_path)
    assert names_in(tmp_path) == ["README.md", "model.safetensors", "other-00001-of-00002.safetensors"]


def test_sharded_resave_after_unsharded_leaves_no_stale_single_file(tmp_path: Path) -> None:
    model = _four_linears()
    qs.save_quantized(model, tmp_path)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1)
    qs.save_quantized(model, tmp_path, max_shard_size=300)
    loaded, _ = qs.load_state_dict(tmp_path)
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    assert "model.safetensors" not in names_in(tmp_path)
