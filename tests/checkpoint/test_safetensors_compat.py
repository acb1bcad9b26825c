"""quantsave's safetensors writer and reader against the real ``safetensors`` package: the same
bytes as ``safetensors.torch.save_file`` for every dtype and shape, files written by either
side load in the other with equal tensors, and quantsave's loader views the file without copies."""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import quantsave as qs
from quantsave import _core
from quantsave.checkpoint.tensors import DTYPE_TO_NAME, byte_view

safetensors_torch = pytest.importorskip("safetensors.torch")
from safetensors import safe_open  # noqa: E402

save_file = safetensors_torch.save_file
load_file = safetensors_torch.load_file

#: Every dtype both torch and quantsave know (uint16/32/64 and float8_e8m0fnu where torch has them).
DTYPES = list(DTYPE_TO_NAME)
WANTED = [
    "float32", "float16", "bfloat16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool",
    "float8_e4m3fn", "float8_e5m2", "complex64", "uint16", "uint32", "uint64",
]  # fmt: skip
SHAPES = [[], [0], [0, 3], [3, 0, 2], [1], [7], [3, 5], [2, 3, 5], [1, 1, 1, 1], [13, 1]]

HYP = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_tensor(dtype: torch.dtype, shape: list[int], seed: int) -> torch.Tensor:
    """A tensor of random bit patterns (NaNs and infs included for float types; 0/1 for bool)."""
    g = torch.Generator().manual_seed(seed)
    numel = 1
    for d in shape:
        numel *= d
    if dtype == torch.bool:
        return torch.randint(0, 2, (numel,), generator=g, dtype=torch.uint8).bool().reshape(shape)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (nbytes,), generator=g, dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


def raw_bytes(t: torch.Tensor) -> bytes:
    """The tensor's bytes in row-major order (bit patterns, so NaNs compare equal)."""
    t = t.detach().contiguous().reshape(-1)
    return bytes(t.view(torch.uint8).numpy().tobytes()) if t.numel() else b""


def assert_tensors_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert tuple(a[k].shape) == tuple(b[k].shape), k
        assert raw_bytes(a[k]) == raw_bytes(b[k]), k


def write_with_core(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> int:
    specs = [(name, DTYPE_TO_NAME[t.dtype], list(t.shape), byte_view(t)) for name, t in tensors.items()]
    (size,) = _core.write_shards([(path, specs, metadata)])
    return size


def split_file(path: Path) -> tuple[int, dict, list[str], bytes]:
    """(header length, parsed header, tensor names in header order, data bytes)."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    text = blob[8 : 8 + n].decode("utf-8")
    header = json.loads(text)
    order = [k for k in json.loads(text, object_pairs_hook=lambda kv: [k for k, _ in kv]) if k != "__metadata__"]
    return n, header, order, blob[8 + n :]


def assert_same_file(ours: Path, ref: Path, metadata: dict[str, str] | None) -> None:
    """Byte-identical, except that safetensors writes several metadata entries in hash order:
    then the header length, the parsed header, the tensor order and the data must match."""
    if metadata is None or len(metadata) <= 1:
        assert ours.read_bytes() == ref.read_bytes()
    else:
        assert split_file(ours) == split_file(ref)


# --- writer: byte-identical to save_file ------------------------------------------------------


def test_every_wanted_dtype_is_supported() -> None:
    names = {str(d).split(".")[1] for d in DTYPES}
    missing = [w for w in WANTED if isinstance(getattr(torch, w, None), torch.dtype) and w not in names]
    assert missing == []


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("metadata", [{"format": "pt"}, None, {}], ids=["pt", "none", "empty"])
def test_single_dtype_all_shapes_identical_bytes(dtype: torch.dtype, metadata, tmp_path: Path) -> None:
    tensors = {f"t{i}": make_tensor(dtype, shape, i) for i, shape in enumerate(SHAPES)}
    ref, ours = tmp_path / "ref.safetensors", tmp_path / "ours.safetensors"
    save_file(tensors, ref, metadata=metadata)
    size = write_with_core(ours, tensors, metadata)
    assert size == ref.stat().st_size
    assert ours.read_bytes() == ref.read_bytes()


def test_all_dtypes_in_one_file_identical_bytes(tmp_path: Path) -> None:
    tensors = {}
    for i, dt in enumerate(DTYPES):
        for j, shape in enumerate([[], [0, 3], [5], [3, 7]]):
            tensors[f"{str(dt).split('.')[1]}.{j}"] = make_tensor(dt, shape, 100 * i + j)
    for metadata in ({"format": "pt"}, None):
        save_file(tensors, tmp_path / "ref.safetensors", metadata=metadata)
        write_with_core(tmp_path / "ours.safetensors", tensors, metadata)
        assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_several_shards_in_one_call(tmp_path: Path) -> None:
    shards = [
        {f"s{s}.t{i}": make_tensor(DTYPES[(s * 5 + i) % len(DTYPES)], SHAPES[i], s * 10 + i) for i in range(6)}
        for s in range(4)
    ]
    specs = [
        (
            tmp_path / f"ours{s}.safetensors",
            [(k, DTYPE_TO_NAME[t.dtype], list(t.shape), byte_view(t)) for k, t in d.items()],
            {"format": "pt"},
        )
        for s, d in enumerate(shards)
    ]
    sizes = _core.write_shards(specs)
    for s, d in enumerate(shards):
        save_file(d, tmp_path / f"ref{s}.safetensors", metadata={"format": "pt"})
        assert (tmp_path / f"ours{s}.safetensors").read_bytes() == (tmp_path / f"ref{s}.safetensors").read_bytes()
        assert sizes[s] == (tmp_path / f"ref{s}.safetensors").stat().st_size


NAMES = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12
).filter(lambda s: s != "__metadata__")
TENSOR_SPECS = st.dictionaries(
    NAMES,
    st.tuples(
        st.sampled_from(DTYPES),
        st.lists(st.integers(0, 5), min_size=0, max_size=3),
        st.integers(0, 2**31 - 1),
    ),
    min_size=1,
    max_size=8,
)
METADATA = st.one_of(
    st.none(),
    st.just({"format": "pt"}),
    st.dictionaries(NAMES, st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=10), max_size=3),
)


@HYP
@given(specs=TENSOR_SPECS, metadata=METADATA)
def test_random_dicts_identical_to_save_file(specs, metadata) -> None:
    tensors = {name: make_tensor(dt, shape, seed) for name, (dt, shape, seed) in specs.items()}
    with tempfile.TemporaryDirectory() as d:
        ref, ours = Path(d) / "ref.safetensors", Path(d) / "ours.safetensors"
        save_file(tensors, ref, metadata=metadata)
        write_with_core(ours, tensors, metadata)
        assert_same_file(ours, ref, metadata)
        # And both read back the same through both readers.
        assert_tensors_equal(load_file(ours), tensors)
        loaded, _ = qs.load_state_dict(ref)
        assert_tensors_equal(loaded, tensors)


class Holder(nn.Module):
    """A module whose state dict is exactly ``tensors`` (floats as parameters, the rest as buffers)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for name, t in tensors.items():
            if t.is_floating_point() and t.dtype.itemsize > 1:
                self.register_parameter(name, nn.Parameter(t, requires_grad=False))
            else:
                self.register_buffer(name, t)


@HYP
@given(
    specs=st.dictionaries(
        st.text(alphabet="abcdefgh_XYZ0123456789", min_size=1, max_size=8),
        st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 5), max_size=3), st.integers(0, 2**31 - 1)),
        min_size=1,
        max_size=8,
    ),
    metadata=st.one_of(st.none(), st.just({"note": "x"})),
)
def test_save_quantized_plain_module_identical_to_save_file(specs, metadata) -> None:
    tensors = {name: make_tensor(dt, shape, seed) for name, (dt, shape, seed) in specs.items()}
    model = Holder(tensors)
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "qs"
        result = qs.save_quantized(model, out, metadata=metadata)
        assert result.num_shards == 1
        assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
        header_meta = {"format": "pt", **(metadata or {})}
        save_file(model.state_dict(), Path(d) / "ref.safetensors", metadata=header_meta)
        assert_same_file(out / "model.safetensors", Path(d) / "ref.safetensors", header_meta)
        assert result.total_bytes == (out / "model.safetensors").stat().st_size


# --- non-contiguous tensors -------------------------------------------------------------------


def _non_contiguous() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    base = torch.randn(6, 10)
    return {
        "transposed": base.t(),
        "stepped": torch.arange(40, dtype=torch.int64)[::3],
        "rows_stepped": torch.randn(9, 4, dtype=torch.float64)[1::2],
        "cols": torch.randn(5, 8).to(torch.bfloat16)[:, 2:7],
        "permuted": torch.randn(2, 3, 4).to(torch.float16).permute(2, 0, 1),
        "expanded": torch.tensor([1, 2, 3], dtype=torch.int16).expand(4, 3),
        "bool_t": (torch.randn(4, 3) > 0).t(),
        "complex_t": torch.randn(3, 4, dtype=torch.complex64).t(),
    }


def test_non_contiguous_via_write_shards(tmp_path: Path) -> None:
    tensors = _non_contiguous()
    assert not any(t.is_contiguous() for t in tensors.values())
    write_with_core(tmp_path / "ours.safetensors", tensors, {"format": "pt"})
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    loaded, _ = qs.load_state_dict(tmp_path / "ours.safetensors")
    for k, v in tensors.items():
        assert torch.equal(loaded[k], v), k


def test_non_contiguous_via_save_quantized(tmp_path: Path) -> None:
    tensors = {k: v for k, v in _non_contiguous().items() if k != "expanded"}  # expand: one storage, many views
    model = Holder(tensors)
    qs.save_quantized(model, tmp_path / "qs")
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "qs" / "model.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    for k, v in load_file(tmp_path / "qs" / "model.safetensors").items():
        assert torch.equal(v, tensors[k]), k


# --- reading files safetensors wrote ----------------------------------------------------------


def test_safetensors_file_loads_without_copies(tmp_path: Path) -> None:
    tensors = {}
    for i, dt in enumerate(DTYPES):
        for j, shape in enumerate([[], [0, 3], [7], [3, 5]]):
            tensors[f"{i}.{j}"] = make_tensor(dt, shape, 31 * i + j)
    path = tmp_path / "ref.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    loaded, config = qs.load_state_dict(path)
    assert config is None
    assert_tensors_equal(loaded, tensors)
    # Every tensor views the one mapping of the file, at its own offset.
    header = _core.read_header(path)
    offsets = {name: start for name, _dt, _shape, start, _end in header["tensors"]}
    storages = {t.untyped_storage().data_ptr() for t in loaded.values()}
    assert len(storages) == 1
    base = storages.pop()
    for name, t in loaded.items():
        if t.numel():
            assert t.data_ptr() - base == offsets[name], name
    # The mapping is private: writing through a loaded tensor never reaches the file.
    before = path.read_bytes()
    loaded["0.2"].zero_()
    assert path.read_bytes() == before


def test_two_loads_are_independent(tmp_path: Path) -> None:
    path = tmp_path / "ref.safetensors"
    save_file({"a": torch.arange(10.0)}, path)
    a, _ = qs.load_state_dict(path)
    b, _ = qs.load_state_dict(path)
    a["a"].add_(1)
    assert torch.equal(b["a"], torch.arange(10.0))


def _raw_file(path: Path, entries: list[tuple[str, str, list[int], bytes]], pad_to: int = 8) -> None:
    """Writes a safetensors file by hand, tensors laid out in the given order (so their offsets
    need not be aligned), the header padded with spaces to a multiple of ``pad_to``."""
    header: dict = {}
    data = b""
    for name, dtype, shape, blob in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(blob)]}
        data += blob
    text = json.dumps(header, separators=(",", ":"))
    text += " " * ((-len(text)) % pad_to)
    path.write_bytes(struct.pack("<Q", len(text)) + text.encode() + data)


@pytest.mark.parametrize("pad_to", [8, 1])
def test_misaligned_tensors_load_correctly(tmp_path: Path, pad_to: int) -> None:
    torch.manual_seed(0)
    f32 = torch.randn(3, 2)
    f64 = torch.randn(5, dtype=torch.float64)
    i16 = torch.arange(-3, 4, dtype=torch.int16)
    c64 = torch.randn(2, dtype=torch.complex64)
    bf = torch.randn(3).to(torch.bfloat16)
    entries = [
        ("u8", "U8", [1], b"\x07"),
        ("f32", "F32", [3, 2], f32.numpy().tobytes()),
        ("odd", "I8", [3], b"\x01\x02\x03"),
        ("f64", "F64", [5], f64.numpy().tobytes()),
        ("one", "BOOL", [1], b"\x01"),
        ("i16", "I16", [7], i16.numpy().tobytes()),
        ("c64", "C64", [2], c64.numpy().tobytes()),
        ("u8b", "U8", [2], b"\x09\x0a"),
        ("bf16", "BF16", [3], raw_bytes(bf)),
    ]
    path = tmp_path / "mis.safetensors"
    _raw_file(path, entries, pad_to)
    header = _core.read_header(path)
    starts = {name: start for name, _dt, _shape, start, _end in header["tensors"]}
    if pad_to == 8:
        assert (
            starts["f32"] % 4 and starts["f64"] % 8 and starts["i16"] % 2 and starts["c64"] % 8 and starts["bf16"] % 2
        )
    expected = {
        "u8": torch.tensor([7], dtype=torch.uint8),
        "f32": f32,
        "odd": torch.tensor([1, 2, 3], dtype=torch.int8),
        "f64": f64,
        "one": torch.tensor([True]),
        "i16": i16,
        "c64": c64,
        "u8b": torch.tensor([9, 10], dtype=torch.uint8),
        "bf16": bf,
    }
    loaded, _ = qs.load_state_dict(path)
    assert_tensors_equal(loaded, expected)
    for name, t in loaded.items():
        assert t.data_ptr() % t.element_size() == 0, name
    # Byte-sized tensors still view the mapping; misaligned wider ones are private copies.
    mapped = loaded["u8"].untyped_storage().data_ptr()
    assert loaded["odd"].untyped_storage().data_ptr() == mapped
    for name in ("f32", "f64", "i16", "c64", "bf16"):
        aligned = starts[name] % loaded[name].element_size() == 0
        assert (loaded[name].untyped_storage().data_ptr() == mapped) == aligned, name
    # safetensors reads the same file the same way.
    assert_tensors_equal(load_file(path), expected)


# --- files quantsave wrote, read by safetensors -----------------------------------------------


def test_quantsave_files_load_in_safetensors(tmp_path: Path) -> None:
    tensors = {}
    for i, dt in enumerate(DTYPES):
        for j, shape in enumerate(SHAPES):
            tensors[f"{str(dt).split('.')[1]}/{j}"] = make_tensor(dt, shape, 7 * i + j)
    model = Holder({k.replace("/", "_"): v for k, v in tensors.items()})
    qs.save_quantized(model, tmp_path / "qs", max_shard_size="2KB", metadata={"origin": "test"})
    index = json.loads((tmp_path / "qs" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1
    merged: dict[str, torch.Tensor] = {}
    for fname in files:
        path = tmp_path / "qs" / fname
        part = load_file(path)
        assert set(part) == {k for k, v in index["weight_map"].items() if v == fname}
        with safe_open(path, framework="pt") as f:
            assert f.metadata() == {"format": "pt", "origin": "test"}
            assert set(f.keys()) == set(part)
            for k in f.keys():  # noqa: SIM118 - safe_open is not a dict; keys() is its API
                assert raw_bytes(f.get_tensor(k)) == raw_bytes(part[k]), k
        merged.update(part)
    assert_tensors_equal(merged, dict(model.state_dict()))
    ours, _ = qs.load_state_dict(tmp_path / "qs")
    assert_tensors_equal(ours, merged)


def test_bnb_checkpoint_loads_in_safetensors(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8))
    qs.quantize(
        model, qs.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    )
    qs.save_quantized(model, tmp_path / "qs")
    expected = {k: v.cpu() for k, v in model.state_dict().items()}
    assert_tensors_equal(load_file(tmp_path / "qs" / "model.safetensors"), expected)
    save_file(expected, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "qs" / "model.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
