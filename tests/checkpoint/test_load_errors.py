"""Corrupt checkpoints (headers, indexes, config.json) and checkpoints that do not fit the skeleton
give a ``CheckpointError`` naming the file and the problem, through the one reader, never another
exception type or a crash."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import quantsave as qs

safetensors_torch = pytest.importorskip("safetensors.torch")
save_file = safetensors_torch.save_file


# --- corrupt checkpoints ----------------------------------------------------------------------


def float_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8), nn.LayerNorm(8))


def quantized(kind: str) -> nn.Module:
    model = float_model()
    if kind == "int8":
        pytest.importorskip("bitsandbytes")
        qs.quantize(model, qs.BitsAndBytesConfig(load_in_8bit=True))
    elif kind == "nf4":
        pytest.importorskip("bitsandbytes")
        qs.quantize(
            model, qs.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
        )
    return model.eval()


X = torch.randn(3, 16, generator=torch.Generator().manual_seed(5))


def outputs(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(X)


LOADERS: dict[str, Callable[[Path], Any]] = {
    "load_state_dict": lambda p: qs.load_state_dict(p),
    "load_quantized": lambda p: qs.load_quantized(p, float_model()),
}


@pytest.fixture(params=list(LOADERS))
def loader(request: pytest.FixtureRequest) -> Callable[[Path], Any]:
    return LOADERS[request.param]


@pytest.fixture(params=["plain", "int8"])
def single(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """An unsharded checkpoint."""
    path = tmp_path / "ckpt"
    qs.save_quantized(quantized(request.param), path)
    if request.param == "plain":
        (path / "config.json").write_text("{}")
    return path


@pytest.fixture
def sharded(tmp_path: Path) -> Path:
    path = tmp_path / "sharded"
    qs.save_quantized(quantized("int8"), path, max_shard_size=300)
    assert len(list(path.glob("model-*.safetensors"))) >= 3
    return path


def corrupt(loader: Callable[[Path], Any], folder: Path, names: str, match: str | None = None) -> qs.CheckpointError:
    with pytest.raises(qs.CheckpointError, match=match) as info:
        loader(folder)
    assert isinstance(info.value, ValueError)
    assert names in str(info.value), (names, str(info.value))
    return info.value


def parts(path: Path) -> tuple[dict, bytes]:
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def write_parts(path: Path, header: dict | bytes, data: bytes, pad: bool = True) -> None:
    text = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    if pad:
        text += b" " * ((-len(text)) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def first_shard(folder: Path) -> Path:
    return sorted(folder.glob("model*.safetensors"))[0]


@pytest.mark.parametrize("keep", [0, 4, 8, 20, -1, -100])
def test_truncated_file(single: Path, loader, keep: int) -> None:  # type: ignore[no-untyped-def]
    f = single / "model.safetensors"
    blob = f.read_bytes()
    f.write_bytes(blob[:keep] if keep >= 0 else blob[: len(blob) + keep])
    corrupt(loader, single, str(f))


def test_truncated_shard(sharded: Path, loader) -> None:  # type: ignore[no-untyped-def]
    f = sorted(sharded.glob("model-*.safetensors"))[1]
    f.write_bytes(f.read_bytes()[:-3])
    corrupt(loader, sharded, str(f), "truncated")


def test_trailing_garbage(single: Path, loader) -> None:  # type: ignore[no-untyped-def]
    f = single / "model.safetensors"
    f.write_bytes(f.read_bytes() + b"\0" * 8)
    corrupt(loader, single, str(f))


@pytest.mark.parametrize("length", [2**64 - 1, 2**63, 100_000_001, 0, "size-7", "size"])
def test_header_length_field(single: Path, loader, length) -> None:  # type: ignore[no-untyped-def]
    f = single / "model.safetensors"
    blob = f.read_bytes()
    n = {"size-7": len(blob) - 7, "size": len(blob)}.get(length, length)  # type: ignore[call-overload]
    f.write_bytes(struct.pack("<Q", n) + blob[8:])
    corrupt(loader, single, str(f))


def _edit_header(f: Path, edit: Callable[[bytes], bytes]) -> None:
    blob = f.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    text = edit(blob[8 : 8 + n])
    assert len(text) == n
    f.write_bytes(blob[:8] + text + blob[8 + n :])


HEADER_EDITS = {
    "invalid-utf8": lambda t: t[:3] + b"\xff" + t[4:],
    "lone-continuation": lambda t: t[:20] + b"\x80" + t[21:],
    "not-object": lambda t: b"[" + t[1:],
    "truncated-json": lambda t: t.rstrip()[:-1] + b" " * (len(t) - len(t.rstrip()) + 1),
    "nul": lambda t: t[:10] + b"\0" + t[11:],
    "garbage": lambda t: b"\x00" * len(t),
    "last-byte": lambda t: t[:-1] + b"x",  # trailing text after the object, or its '}' replaced
}


@pytest.mark.parametrize("edit", list(HEADER_EDITS))
def test_header_json_broken(single: Path, loader, edit: str) -> None:  # type: ignore[no-untyped-def]
    f = single / "model.safetensors"
    _edit_header(f, HEADER_EDITS[edit])
    corrupt(loader, single, str(f))


def _mutate(key: str, header: dict) -> None:
    names = [k for k in header if k != "__metadata__"]
    first = min(names, key=lambda k: header[k]["data_offsets"][0])
    second = min((k for k in names if k != first), key=lambda k: header[k]["data_offsets"][0])
    f32 = next(k for k in names if header[k]["dtype"] == "F32" and header[k]["shape"])
    if key == "overlap":
        s = header[first]["data_offsets"][0]
        s2, e2 = header[second]["data_offsets"]
        header[second]["data_offsets"] = [s + 4, s + 4 + (e2 - s2)]
    elif key == "same-range":
        header[second]["data_offsets"] = list(header[first]["data_offsets"])
        header[second]["dtype"], header[second]["shape"] = header[first]["dtype"], header[first]["shape"]
    elif key == "gap":
        s, e = header[second]["data_offsets"]
        header[second]["data_offsets"] = [s + 4, e + 4]
    elif key == "end-before-start":
        s, e = header[first]["data_offsets"]
        header[first]["data_offsets"] = [e, s]
    elif key == "beyond-file":
        header[first]["data_offsets"] = [
            2**40,
            2**40 + (header[first]["data_offsets"][1] - header[first]["data_offsets"][0]),
        ]
    elif key == "dtype-size":
        header[f32]["dtype"] = "F16"
    elif key == "dtype-unknown":
        header[f32]["dtype"] = "F33"
    elif key == "shape":
        header[f32]["shape"] = [header[f32]["shape"][0] + 1, *header[f32]["shape"][1:]]
    elif key == "shape-overflow":
        header[f32]["shape"] = [2**40, 2**40]
    elif key == "shape-negative":
        header[f32]["shape"] = [-1]
    elif key == "shape-type":
        header[f32]["shape"] = "32"
    elif key == "missing-field":
        del header[f32]["data_offsets"]
    elif key == "metadata-not-strings":
        header["__metadata__"] = {"format": 1}
    elif key == "entry-not-object":
        header[f32] = 5
    else:
        raise AssertionError(key)


MUTATIONS = [
    "overlap", "same-range", "gap", "end-before-start", "beyond-file", "dtype-size", "dtype-unknown", "shape",
    "shape-overflow", "shape-negative", "shape-type", "missing-field", "metadata-not-strings", "entry-not-object",
]  # fmt: skip


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_inconsistent_header(single: Path, loader, mutation: str) -> None:  # type: ignore[no-untyped-def]
    f = single / "model.safetensors"
    header, data = parts(f)
    _mutate(mutation, header)
    write_parts(f, header, data)
    corrupt(loader, single, str(f))


def test_duplicate_header_key(single: Path, loader) -> None:  # type: ignore[no-untyped-def]
    f = single / "model.safetensors"
    header, data = parts(f)
    text = json.dumps(header, separators=(",", ":"))
    name = next(k for k in header if k != "__metadata__")
    entry = json.dumps({name: header[name]}, separators=(",", ":"))[1:-1]
    write_parts(f, (text[:-1] + "," + entry + "}").encode(), data)
    corrupt(loader, single, str(f), "duplicate")


def _sweep(
    folder: Path, loader: Callable[[Path], Any], check_ok: Callable[[Any], None], bits: Callable[[int], list[int]]
) -> dict[str, int]:
    """Flips bits in the header (length prefix included) one at a time; every load must raise
    CheckpointError or succeed and pass ``check_ok``."""
    f = folder / "model.safetensors"
    original = f.read_bytes()
    (n,) = struct.unpack("<Q", original[:8])
    counts = {"error": 0, "ok": 0}
    try:
        for pos in range(8 + n):
            for bit in bits(pos):
                blob = bytearray(original)
                blob[pos] ^= 1 << bit
                f.write_bytes(bytes(blob))
                try:
                    result = loader(folder)
                except qs.CheckpointError as e:
                    # The file, or for tensors that do not fit the model, the checkpoint folder.
                    assert str(folder) in str(e), (pos, bit, str(e))
                    counts["error"] += 1
                except Exception as e:  # noqa: BLE001 - the point of the sweep
                    pytest.fail(f"flipping bit {bit} of byte {pos} gave {type(e).__name__}: {e}")
                else:
                    check_ok(result)
                    counts["ok"] += 1
    finally:
        f.write_bytes(original)
    return counts


@pytest.mark.parametrize("kind", ["plain", "int8"])
def test_header_bit_flips_load_state_dict(kind: str, tmp_path: Path) -> None:
    model = quantized(kind)
    qs.save_quantized(model, tmp_path)
    counts = _sweep(tmp_path, LOADERS["load_state_dict"], lambda r: None, lambda pos: [pos % 8, (pos + 3) % 8, 7])
    assert counts["error"] > 0 and counts["ok"] > 0  # the metadata can change harmlessly


@pytest.mark.parametrize(
    "kind",
    [
        "plain",
        "int8",
        "nf4",
    ],
)
def test_header_bit_flips_load_quantized(kind: str, tmp_path: Path) -> None:
    model = quantized(kind)
    expected = outputs(model)
    qs.save_quantized(model, tmp_path)

    def same_outputs(loaded: nn.Module) -> None:
        assert torch.equal(outputs(loaded), expected)

    counts = _sweep(tmp_path, LOADERS["load_quantized"], same_outputs, lambda pos: [pos % 8, (pos + 5) % 8])
    assert counts["error"] > 0


def test_nf4_header_bit_flips_load_state_dict(tmp_path: Path) -> None:
    qs.save_quantized(quantized("nf4"), tmp_path)
    _sweep(tmp_path, LOADERS["load_state_dict"], lambda r: None, lambda pos: [pos % 8])


# --- broken indexes and config.json -----------------------------------------------------------

INDEX = "model.safetensors.index.json"


def _index(folder: Path) -> dict:
    return json.loads((folder / INDEX).read_text())


def _write_index(folder: Path, index: dict) -> None:
    (folder / INDEX).write_text(json.dumps(index))


def test_index_names_missing_shard(sharded: Path, loader) -> None:  # type: ignore[no-untyped-def]
    victim = sorted(sharded.glob("model-*.safetensors"))[-1]
    victim.unlink()
    corrupt(loader, sharded, str(sharded / INDEX), victim.name)


@pytest.mark.parametrize(
    "name", ["../outside.safetensors", "/abs/outside.safetensors", "sub/x.safetensors", "..", ".", "", 7, None]
)
def test_index_names_file_outside_folder(sharded: Path, loader, name) -> None:  # type: ignore[no-untyped-def]
    # A valid checkpoint file really is there, so only the name check can stop it.
    shutil.copy(first_shard(sharded), sharded.parent / "outside.safetensors")
    index = _index(sharded)
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = name
    _write_index(sharded, index)
    corrupt(loader, sharded, str(sharded / INDEX))


def test_index_names_tensor_absent_from_shard(sharded: Path, loader) -> None:  # type: ignore[no-untyped-def]
    index = _index(sharded)
    index["weight_map"]["ghost.weight"] = first_shard(sharded).name
    _write_index(sharded, index)
    corrupt(loader, sharded, str(sharded), "ghost.weight")


def test_index_absent_tensor_message_names_a_file(sharded: Path) -> None:
    index = _index(sharded)
    index["weight_map"]["ghost.weight"] = first_shard(sharded).name
    _write_index(sharded, index)
    with pytest.raises(qs.CheckpointError) as info:
        qs.load_state_dict(sharded)
    assert INDEX in str(info.value) or first_shard(sharded).name in str(info.value)


def test_index_places_tensor_in_other_shard(sharded: Path, loader) -> None:  # type: ignore[no-untyped-def]
    index = _index(sharded)
    shards = sorted(set(index["weight_map"].values()))
    key = next(k for k, v in index["weight_map"].items() if v == shards[0])
    index["weight_map"][key] = shards[1]
    _write_index(sharded, index)
    corrupt(loader, sharded, shards[0], repr(key))


def test_tensor_in_two_shards(sharded: Path, loader) -> None:  # type: ignore[no-untyped-def]
    index = _index(sharded)
    shards = sorted(set(index["weight_map"].values()))
    extra = safetensors_torch.load_file(sharded / shards[0])
    name = next(iter(extra))
    both = {**safetensors_torch.load_file(sharded / shards[1]), name: extra[name]}
    save_file(both, sharded / shards[1], metadata={"format": "pt"})
    del index["weight_map"][name]
    index["weight_map"] = {**index["weight_map"], **{k: shards[1] for k in both if k != name}}
    _write_index(sharded, index)
    corrupt(loader, sharded, shards[1], "also appears")


@pytest.mark.parametrize(
    "text",
    ["{not json", "\xff\xfe", "[]", '{"weight_map": []}', '{"weight_map": {}}', '{"metadata": {}}', "null"],
)
def test_index_not_valid(sharded: Path, loader, text: str) -> None:  # type: ignore[no-untyped-def]
    (sharded / INDEX).write_bytes(text.encode("latin-1"))
    corrupt(loader, sharded, str(sharded / INDEX))


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '"str"', "\xff{}", ""])
@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_config_json_not_valid(text: str, layout: str, loader, single: Path, sharded: Path) -> None:  # type: ignore[no-untyped-def]
    folder = single if layout == "single" else sharded
    (folder / "config.json").write_bytes(text.encode("latin-1"))
    corrupt(loader, folder, str(folder / "config.json"))
    # A single .safetensors file path reads the config beside it too.
    if loader is LOADERS["load_state_dict"]:
        corrupt(loader, first_shard(folder), "config.json")


def test_missing_weights_is_file_not_found(tmp_path: Path, loader) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(FileNotFoundError):
        loader(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError):
        loader(tmp_path / "empty")


# --- checkpoints that do not fit the skeleton -------------------------------------------------


def _save(kind: str, folder: Path) -> Path:
    qs.save_quantized(quantized(kind), folder)
    return folder


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("shape", [(16, 64, 8), (16, 32, 4), (8, 32, 8), (17, 32, 8)])
def test_bnb_into_skeleton_of_other_shapes(kind: str, shape: tuple[int, int, int], tmp_path: Path) -> None:
    folder = _save(kind, tmp_path)
    a, b, c = shape
    skeleton = nn.Sequential(nn.Linear(a, b), nn.ReLU(), nn.Linear(b, c), nn.LayerNorm(8))
    with pytest.raises(qs.CheckpointError, match=r"'[02]'"):
        qs.load_quantized(folder, skeleton)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_bnb_into_skeleton_without_that_module(kind: str, tmp_path: Path) -> None:
    folder = _save(kind, tmp_path)
    with pytest.raises(qs.CheckpointError, match="'2'"):
        qs.load_quantized(folder, nn.Sequential(nn.Linear(16, 32), nn.ReLU()))
    with pytest.raises(qs.CheckpointError, match=r"Conv1d|not Linear"):
        qs.load_quantized(folder, nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Conv1d(32, 8, 1), nn.LayerNorm(8)))


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_bnb_into_skeleton_with_extra_weights(kind: str, tmp_path: Path) -> None:
    folder = _save(kind, tmp_path)
    skeleton = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    with pytest.raises(qs.CheckpointError, match="lacks"):
        qs.load_quantized(folder, skeleton)


@pytest.mark.parametrize("kind", ["plain", "nf4", "int8"])
def test_mismatched_float_tensor_is_checkpoint_error(kind: str, tmp_path: Path) -> None:
    folder = _save(kind, tmp_path)
    skeleton = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8), nn.LayerNorm(6))
    with pytest.raises(qs.CheckpointError):
        qs.load_quantized(folder, skeleton)


def _rewrite_state(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    f = folder / "model.safetensors"
    tensors = {k: v.clone() for k, v in safetensors_torch.load_file(f).items()}
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def _qs_json(tensors: dict[str, torch.Tensor]) -> tuple[str, dict]:
    key = next(k for k in tensors if ".quant_state.bitsandbytes__" in k)
    return key, json.loads(bytes(tensors[key].tolist()))


def _set_qs_json(tensors: dict[str, torch.Tensor], key: str, data: dict) -> None:
    tensors[key] = torch.tensor(list(json.dumps(data).encode()), dtype=torch.uint8)


def _drop_weight(t: dict[str, torch.Tensor]) -> None:
    del t["0.weight"]


def _extra_member(t: dict[str, torch.Tensor]) -> None:
    t["0.weight.bogus"] = torch.zeros(3)


def _bad_dtype_name(t: dict[str, torch.Tensor]) -> None:
    key, data = _qs_json(t)
    _set_qs_json(t, key, {**data, "dtype": "float33"})


def _extra_json_key(t: dict[str, torch.Tensor]) -> None:
    key, data = _qs_json(t)
    _set_qs_json(t, key, {**data, "bogus": 1})


def _not_json(t: dict[str, torch.Tensor]) -> None:
    key, _ = _qs_json(t)
    t[key] = torch.tensor(list(b"{not json"), dtype=torch.uint8)


def _drop_absmax(t: dict[str, torch.Tensor]) -> None:
    del t["0.weight.absmax"]


def _drop_quant_map(t: dict[str, torch.Tensor]) -> None:
    del t["0.weight.quant_map"]


def _wrong_shape(t: dict[str, torch.Tensor]) -> None:
    key, data = _qs_json(t)
    _set_qs_json(t, key, {**data, "shape": [32, 15]})


@pytest.mark.parametrize(
    "edit",
    [
        _drop_weight,
        _extra_member,
        _extra_json_key,
        _bad_dtype_name,
        _not_json,
        _drop_absmax,
        _drop_quant_map,
        _wrong_shape,
    ],
)
def test_malformed_4bit_state_is_checkpoint_error(edit, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    folder = _save("nf4", tmp_path)
    _rewrite_state(folder, edit)
    with pytest.raises(qs.CheckpointError, match="'0'"):
        qs.load_quantized(folder, float_model())


@pytest.mark.parametrize("edit", ["drop-scb", "scb-only", "float-weight", "transposed"])
def test_malformed_8bit_state_is_checkpoint_error(edit: str, tmp_path: Path) -> None:
    folder = _save("int8", tmp_path)

    def change(t: dict[str, torch.Tensor]) -> None:
        if edit == "drop-scb":
            del t["0.SCB"]
        elif edit == "scb-only":
            del t["0.weight"]
        elif edit == "float-weight":
            t["0.weight"] = t["0.weight"].float()
        else:
            t["0.weight"] = t["0.weight"].t().contiguous()

    _rewrite_state(folder, change)
    with pytest.raises(qs.CheckpointError):
        qs.load_quantized(folder, float_model())


class _WithScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("scale", torch.ones(4), persistent=False)


def test_meta_buffer_the_checkpoint_cannot_fill_is_named(tmp_path: Path) -> None:
    qs.save_quantized(_WithScale(), tmp_path)
    with torch.device("meta"):
        skeleton = _WithScale()
    with pytest.raises(qs.CheckpointError, match=r"'scale'.*meta device"):
        qs.load_quantized(tmp_path, skeleton)
