"""Mutation tests over whole checkpoints: a tiny nf4 model saved sharded (index + 4 shards) and as
one file, then truncated, bit-flipped, given impossible headers, broken indexes and configs that
do not match the tensors. Every trial must end in ``CheckpointError`` or a successful load: never
another exception, a crash or a hang. The command line ``verify`` must answer every corrupted
folder with exit code 1 or 2 and one line on stderr, never a traceback."""

from __future__ import annotations

import faulthandler
import json
import random
import shutil
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import quantsave as qs
from quantsave.diagnostics.verify import verify_checkpoint

pytest.importorskip("bitsandbytes")

INDEX = "model.safetensors.index.json"
TRIAL_SECONDS = 5.0  # one load of these ~15 KB checkpoints takes ~20 ms
X = torch.randn(3, 32, generator=torch.Generator().manual_seed(5))


def skeleton() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.LayerNorm(32),
    )  # fmt: skip


def quantized(kind: str) -> nn.Module:
    model = skeleton()
    if kind == "int8":
        config = qs.BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = qs.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_use_double_quant=True)
    return qs.quantize(model, config).eval()


def outputs(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(X)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Pristine checkpoints (never modified: tests work on copies)."""
    root = tmp_path_factory.mktemp("pristine")
    out = {}
    for kind in ("nf4", "int8"):
        model = quantized(kind)
        qs.save_quantized(model, root / f"{kind}-sharded", max_shard_size="5KB")
        qs.save_quantized(model, root / f"{kind}-single")
        torch.save(outputs(model), root / f"{kind}.pt")
        for name in (f"{kind}-sharded", f"{kind}-single", f"{kind}.pt"):
            out[name] = root / name
    assert len(list(out["nf4-sharded"].glob("model-*.safetensors"))) == 4
    assert (out["nf4-sharded"] / INDEX).is_file()
    return out


@pytest.fixture
def copy(saved: dict[str, Path], tmp_path: Path) -> Callable[[str], Path]:
    def make(name: str) -> Path:
        return Path(shutil.copytree(saved[name], tmp_path / name))

    return make


@pytest.fixture(autouse=True)
def watchdog() -> Iterator[None]:
    """A hang anywhere (Rust included, with the GIL released) dumps the stacks and ends the run."""
    faulthandler.dump_traceback_later(120, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def attempt(folder: Path, label: str) -> str:
    """Loads ``folder``: returns "ok" or "error" (a CheckpointError); anything else fails the test."""
    start = time.monotonic()
    try:
        qs.load_quantized(folder, skeleton())
        result = "ok"
    except qs.CheckpointError as e:
        assert isinstance(e, ValueError) and str(e), label
        result = "error"
    except Exception as e:  # noqa: BLE001 - the point of the test
        pytest.fail(f"{label}: load_quantized raised {type(e).__name__}: {e}")
    try:
        verify_checkpoint(folder)
    except (ValueError, OSError):  # what the command line reports as a one-line error (exit 2)
        pass
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"{label}: verify_checkpoint raised {type(e).__name__}: {e}")
    elapsed = time.monotonic() - start
    assert elapsed < TRIAL_SECONDS, f"{label}: took {elapsed:.1f} s"
    return result


def must_fail(folder: Path, label: str, *names: str) -> str:
    with pytest.raises(qs.CheckpointError) as info:
        qs.load_quantized(folder, skeleton())
    for name in names:
        assert name in str(info.value), (label, str(info.value))
    assert attempt(folder, label) == "error"
    return str(info.value)


def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("model*.safetensors"))


def split(path: Path) -> tuple[dict, bytes]:
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def write(path: Path, header: dict | bytes, data: bytes) -> None:
    text = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def header_end(blob: bytes) -> int:
    """The first byte after the header of a safetensors file's bytes."""
    return 8 + struct.unpack("<Q", blob[:8])[0]


# --- truncation and bit flips -------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["sharded", "single"])
def test_truncation_at_many_offsets(layout: str, copy: Callable[[str], Path]) -> None:
    folder = copy(f"nf4-{layout}")
    counts: Counter[str] = Counter()
    for f in [*shards(folder), folder / "config.json", *([folder / INDEX] if layout == "sharded" else [])]:
        original = f.read_bytes()
        n = len(original)
        cuts = set(range(17)) | set(range(0, n, max(1, n // 24))) | {n - 1, n - 2, n - 8}
        if f.suffix == ".safetensors":
            end = header_end(original)
            cuts |= {end - 1, end, end + 1, end - 8}
        for cut in sorted(c for c in cuts if 0 <= c < n):
            f.write_bytes(original[:cut])
            result = attempt(folder, f"{f.name} cut to {cut} of {n} bytes")
            counts[result] += 1
            if f.suffix == ".safetensors":
                assert result == "error", f"{f.name} cut to {cut} loaded"
        f.write_bytes(original)
    assert counts["error"] > (100 if layout == "sharded" else 30), counts


def _flip_trials(folder: Path, trials: int, seed: int, header_bias: float) -> Counter[str]:
    """Flips 1-3 random bits of one random file per trial (weighted by size; with probability
    ``header_bias`` inside a shard's header), loads, restores."""
    rng = random.Random(seed)
    files = [*shards(folder), folder / "config.json", *([folder / INDEX] if (folder / INDEX).exists() else [])]
    originals = {f: f.read_bytes() for f in files}
    counts: Counter[str] = Counter()
    for trial in range(trials):
        f = rng.choices(files, weights=[len(originals[f]) for f in files])[0]
        blob = bytearray(originals[f])
        flips = []
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            if f.suffix == ".safetensors" and rng.random() < header_bias:
                pos = rng.randrange(header_end(originals[f]))
            else:
                pos = rng.randrange(len(blob))
            bit = rng.randrange(8)
            blob[pos] ^= 1 << bit
            flips.append((pos, bit))
        f.write_bytes(bytes(blob))
        counts[attempt(folder, f"trial {trial}: {f.name} bits flipped at {flips}")] += 1
        f.write_bytes(originals[f])
    return counts


def test_bit_flips_sharded(copy: Callable[[str], Path]) -> None:
    counts = _flip_trials(copy("nf4-sharded"), trials=500, seed=1234, header_bias=0.5)
    assert counts["error"] > 50 and counts["ok"] > 50, counts


def test_bit_flips_single_file(copy: Callable[[str], Path]) -> None:
    counts = _flip_trials(copy("nf4-single"), trials=250, seed=99, header_bias=0.8)
    assert counts["error"] > 50 and counts["ok"] > 10, counts


def test_loaded_checkpoint_is_the_saved_one(saved: dict[str, Path], copy: Callable[[str], Path]) -> None:
    # The baseline the mutations are measured against.
    for layout in ("sharded", "single"):
        loaded = qs.load_quantized(copy(f"nf4-{layout}"), skeleton())
        assert torch.equal(outputs(loaded), torch.load(saved["nf4.pt"]))


# --- impossible headers -------------------------------------------------------------------------


@pytest.mark.parametrize("length", [2**64 - 1, 2**63, 2**40, 100_000_001, 100_000_000, "file", "file-7", 0, 1, 7])
def test_huge_or_wrong_declared_header_length(length: int | str, copy: Callable[[str], Path]) -> None:
    folder = copy("nf4-sharded")
    f = shards(folder)[1]
    blob = f.read_bytes()
    n = {"file": len(blob), "file-7": len(blob) - 7}.get(length, length)  # type: ignore[call-overload]
    f.write_bytes(struct.pack("<Q", n) + blob[8:])
    must_fail(folder, f"header length {n}", str(f))


def _first_two(header: dict) -> tuple[str, str]:
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    return names[0], names[1]


def _edit(kind: str, header: dict) -> dict | bytes:
    a, b = _first_two(header)
    f32 = next(k for k in header if k != "__metadata__" and header[k]["dtype"] == "F32" and header[k]["shape"])
    if kind == "overlap":
        s, e = header[b]["data_offsets"]
        header[b]["data_offsets"] = [s - 4, e - 4]
    elif kind == "same-range":
        header[b] = dict(header[a])
    elif kind == "out-of-bounds":
        s, e = header[b]["data_offsets"]
        header[b]["data_offsets"] = [s + 2**40, e + 2**40]
    elif kind == "offset-past-u64":
        header[b]["data_offsets"] = [0, 2**64]
    elif kind == "dtype-size":
        header[f32]["dtype"] = "F16"
    elif kind == "shape-size":
        header[f32]["shape"] = [header[f32]["shape"][0] * 2]
    elif kind == "shape-overflow":
        header[f32]["shape"] = [2**32, 2**32, *header[f32]["shape"]]
    elif kind == "shape-wraps-to-size":  # (2**63 + 1)**2 = 1 mod 2**64
        header[f32]["shape"] = [*header[f32]["shape"], 2**63 + 1, 2**63 + 1]
    elif kind == "unknown-dtype":
        header[f32]["dtype"] = "F32X"
    elif kind == "metadata-not-string":
        header["__metadata__"] = {"format": ["pt"]}
    elif kind == "not-object":
        return json.dumps(list(header.items())).encode()
    elif kind == "invalid-utf8":
        return json.dumps(header).encode().replace(b'"format"', b'"\xff\xfeormat"')
    elif kind == "lone-surrogate":
        return json.dumps(header).encode().replace(b'"format"', b'"\\ud800ormat"')
    elif kind == "deep-json":
        header["__metadata__"] = {"format": "pt", "x": json.loads("[" * 100 + "]" * 100)}
        return json.dumps(header).replace("[]", "[" * 5000 + "]" * 5000).encode()
    elif kind == "duplicate-name":
        text = json.dumps(header, separators=(",", ":"))
        return (text[:-1] + "," + json.dumps({a: header[a]})[1:-1] + "}").encode()
    else:
        raise AssertionError(kind)
    return header


HEADER_EDITS = [
    "overlap", "same-range", "out-of-bounds", "offset-past-u64", "dtype-size", "shape-size", "shape-overflow",
    "shape-wraps-to-size", "unknown-dtype", "metadata-not-string", "not-object", "invalid-utf8", "lone-surrogate",
    "deep-json", "duplicate-name",
]  # fmt: skip


@pytest.mark.parametrize("kind", HEADER_EDITS)
def test_impossible_header(kind: str, copy: Callable[[str], Path]) -> None:
    folder = copy("nf4-sharded")
    f = shards(folder)[2]
    header, data = split(f)
    write(f, _edit(kind, header), data)
    must_fail(folder, kind, str(f))


@pytest.mark.parametrize(
    "entry",
    [
        {"dtype": "F4", "shape": [2], "data_offsets": [0, 0]},  # no torch dtype
        {"dtype": "F6_E2M3", "shape": [4], "data_offsets": [0, 0]},
        {"dtype": "U8", "shape": [2**63, 0], "data_offsets": [0, 0]},  # torch shapes stop at 2**63 - 1
        {"dtype": "U8", "shape": [0, 2**64 - 1], "data_offsets": [0, 0]},
    ],
)
def test_valid_file_torch_cannot_hold(entry: dict, copy: Callable[[str], Path]) -> None:
    folder = copy("nf4-single")
    f = shards(folder)[0]
    header, data = split(f)
    entry = dict(entry)
    size = {"F4": 1, "F6_E2M3": 3}.get(entry["dtype"], 0)
    entry["data_offsets"] = [len(data), len(data) + size]
    header["odd"] = entry
    write(f, header, data + b"\0" * size)
    for load in (lambda: qs.load_state_dict(folder), lambda: qs.load_quantized(folder, skeleton())):
        with pytest.raises(qs.CheckpointError, match="odd"):
            load()


@pytest.mark.parametrize("blocksize", [b"32", b"-1", b" 0"])
def test_quant_state_blocksize_must_match_absmax(blocksize: bytes, copy: Callable[[str], Path]) -> None:
    # A valid file whose 4-bit state contradicts its tensors: absmax holds 64 blocks of 64.
    # bitsandbytes alone would load it and dequantize garbage (NaN for small block sizes).
    folder = copy("nf4-sharded")
    f = shards(folder)[1]
    blob = f.read_bytes()
    assert blob.count(b'"blocksize": 64') == 1
    f.write_bytes(blob.replace(b'"blocksize": 64', b'"blocksize": ' + blocksize))
    with pytest.raises(qs.CheckpointError):
        qs.load_quantized(folder, skeleton())


# --- shards, index and config -------------------------------------------------------------------


def test_duplicate_tensor_across_shards(copy: Callable[[str], Path]) -> None:
    folder = copy("nf4-sharded")
    first, second = shards(folder)[:2]
    h1, d1 = split(first)
    h2, d2 = split(second)
    name = next(k for k in h1 if k != "__metadata__")
    s, e = h1[name]["data_offsets"]
    h2[name] = {**h1[name], "data_offsets": [len(d2), len(d2) + e - s]}
    write(second, h2, d2 + d1[s:e])
    must_fail(folder, "duplicate across shards", repr(name))


def _set_index(folder: Path, edit: Callable[[dict], None]) -> None:
    index = json.loads((folder / INDEX).read_text())
    edit(index)
    (folder / INDEX).write_text(json.dumps(index))


def _point_first(name: object) -> Callable[[dict], None]:
    def edit(index: dict) -> None:
        key = next(iter(index["weight_map"]))
        index["weight_map"][key] = name

    return edit


def test_index_names_missing_shard(copy: Callable[[str], Path]) -> None:
    folder = copy("nf4-sharded")
    victim = shards(folder)[-1]
    victim.unlink()
    must_fail(folder, "missing shard", str(folder / INDEX), victim.name)


@pytest.mark.parametrize(
    "where", ["parent", "absolute", "subfolder", "directory", "too-long", "nul", "empty", "number"]
)
def test_index_names_file_outside_the_folder(where: str, copy: Callable[[str], Path]) -> None:
    folder = copy("nf4-sharded")
    # A valid shard really is there, so only the name check can stop it.
    outside = folder.parent / "outside.safetensors"
    shutil.copy(shards(folder)[0], outside)
    (folder / "sub").mkdir()
    shutil.copy(shards(folder)[0], folder / "sub" / "x.safetensors")
    name = {
        "parent": "../outside.safetensors",
        "absolute": str(outside),
        "subfolder": "sub/x.safetensors",
        "directory": "sub",
        "too-long": "x" * 300 + ".safetensors",
        "nul": "model\0.safetensors",
        "empty": "",
        "number": 7,
    }[where]
    _set_index(folder, _point_first(name))
    must_fail(folder, where, str(folder / INDEX))


@pytest.mark.parametrize(
    "text",
    [
        b"{not json",
        b"",
        b"\xff\xfe{}",
        b"\xef\xbb\xbf{}",
        b"[]",
        b'{"weight_map": {}}',
        b'{"weight_map": []}',
        b"[" * 100_000 + b"]" * 100_000,
        b'{"weight_map": {"a": ' + b"[" * 50_000 + b"]" * 50_000 + b"}}",
        b'{"metadata": {"total_size": ' + b"9" * 5000 + b"}, ",
        b'{"metadata": {"total_size": ' + b"9" * 5000 + b'}, "weight_map": {"a": "b"}}',
    ],
    ids=lambda t: t[:24].decode("latin-1"),
)
def test_invalid_index_json(text: bytes, copy: Callable[[str], Path]) -> None:
    folder = copy("nf4-sharded")
    (folder / INDEX).write_bytes(text)
    must_fail(folder, repr(text[:40]), str(folder / INDEX))


@pytest.mark.parametrize(
    "text",
    [b"{", b"", b"[" * 100_000, b'{"a": ' + b"1" * 5000 + b"}", b"\xff{}", b'{"quantization_config": 5}'],
    ids=lambda t: t[:16].decode("latin-1"),
)
def test_invalid_config_json(text: bytes, copy: Callable[[str], Path]) -> None:
    folder = copy("nf4-sharded")
    (folder / "config.json").write_bytes(text)
    must_fail(folder, repr(text[:40]), "config.json")


def _set_quantization_config(folder: Path, config: dict) -> None:
    path = folder / "config.json"
    data = json.loads(path.read_text())
    data["quantization_config"] = config
    path.write_text(json.dumps(data))


CONFIGS = {
    "int8": qs.BitsAndBytesConfig(load_in_8bit=True).to_dict(),
    "nf4": qs.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True
    ).to_dict(),
    "fp4": qs.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4").to_dict(),
    "quanto": {"quant_method": "quanto", "weights_dtype": "int8"},
    "gguf": {"quant_method": "gguf"},
    "unknown": {"quant_method": "bitsandbytez"},
}


@pytest.mark.parametrize(
    ("tensors", "config"),
    [("nf4", "int8"), ("nf4", "fp4"), ("int8", "nf4"), ("nf4", "quanto"), ("nf4", "gguf"), ("nf4", "unknown")],
)
def test_config_does_not_match_the_tensors(
    tensors: str, config: str, saved: dict[str, Path], copy: Callable[[str], Path]
) -> None:
    folder = copy(f"{tensors}-sharded")
    _set_quantization_config(folder, CONFIGS[config])
    # Either refused, or the tensors load as what they are (bitsandbytes reads the layout from
    # the tensor names), giving the saved model's outputs.
    try:
        loaded = qs.load_quantized(folder, skeleton())
    except qs.CheckpointError:
        pass
    else:
        assert torch.equal(outputs(loaded), torch.load(saved[f"{tensors}.pt"]))
    if config != "gguf":  # verify has no check for a gguf config beside safetensors weights
        problems, _ = verify_checkpoint(folder)
        assert problems, "verify passed a config that does not match the tensors"


@pytest.mark.parametrize(("tensors", "config"), [("nf4", "int8"), ("nf4", "fp4"), ("int8", "nf4")])
def test_bitsandbytes_config_must_name_the_tensors_kind(tensors: str, config: str, copy: Callable[[str], Path]) -> None:
    """bitsandbytes reads the layout from the tensor names; quantsave refuses a config that says
    otherwise instead of recording a wrong config on the loaded model."""
    folder = copy(f"{tensors}-sharded")
    _set_quantization_config(folder, CONFIGS[config])
    with pytest.raises(qs.CheckpointError, match=r"config\.json says bitsandbytes"):
        qs.load_quantized(folder, skeleton())


# --- the command line ---------------------------------------------------------------------------


@pytest.fixture
def corrupted(saved: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    edits: dict[str, tuple[str, Callable[[Path], None]]] = {
        "truncated-shard": ("nf4-sharded", lambda p: shards(p)[1].write_bytes(shards(p)[1].read_bytes()[:-5])),
        "huge-header-length": (
            "nf4-single",
            lambda p: shards(p)[0].write_bytes(struct.pack("<Q", 2**64 - 1) + shards(p)[0].read_bytes()[8:]),
        ),
        "deep-index": ("nf4-sharded", lambda p: (p / INDEX).write_text("[" * 100_000)),
        "long-int-index": ("nf4-sharded", lambda p: (p / INDEX).write_text('{"metadata": {"total_size": '
                                                                           '' + "9" * 5000 + "}}")),
        "config-int8": ("nf4-sharded", lambda p: _set_quantization_config(p, CONFIGS["int8"])),
    }  # fmt: skip
    out = {}
    for label, (source, edit) in edits.items():
        path = Path(shutil.copytree(saved[source], tmp_path / label))
        edit(path)
        out[label] = path
    return out


def _verify_command(path: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "quantsave", "verify", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_verify_command_on_corrupted_folders(corrupted: dict[str, Path]) -> None:
    labels = list(corrupted)
    procs = {}
    for i, label in enumerate(labels):  # two at a time
        procs[label] = _verify_command(corrupted[label])
        if i >= 1:
            procs[labels[i - 1]].wait(timeout=120)
    for label, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode in (1, 2), (label, proc.returncode, out, err)
        assert "Traceback" not in err and "Traceback" not in out, (label, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("quantsave:"), (label, err)


@pytest.mark.parametrize(
    "edit",
    [
        lambda wm: wm.update({next(iter(wm)): "model-00001\x00.safetensors"}),
        lambda wm: wm.update({next(iter(wm)): "x" * 300 + ".safetensors"}),
    ],
    ids=["nul-byte", "name-too-long"],
)
def test_verify_reports_unlookupable_index_names(edit: Callable[[dict], None], copy: Callable[[str], Path]) -> None:
    """Names the system cannot even look up are problems in verify's report, not exceptions."""
    folder = copy("nf4-sharded")
    _set_index(folder, lambda index: edit(index["weight_map"]))
    problems, _ = verify_checkpoint(folder)
    assert any("not a file in the checkpoint folder" in p or "does not exist" in p for p in problems), problems
