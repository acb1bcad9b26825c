"""GGUF: ``save_quantized`` refuses a GGUF model; ``save_gguf`` writes a ``.gguf`` file that keeps
every tensor's GGML type, which diffusers' ``from_single_file`` and ``load_gguf`` read back to
the same bytes and outputs; corrupt files are a ``CheckpointError``; a failed write leaves the
target as it was. A reference file is written in the test with ``gguf.GGUFWriter``."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import quantsave as qs
from conftest import tiny_llama_config

os.environ["HF_HUB_OFFLINE"] = "1"
gguf = pytest.importorskip("gguf")
diffusers = pytest.importorskip("diffusers")
from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter  # noqa: E402

T = gguf.GGMLQuantizationType
SD3 = dict(
    sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=32, num_attention_heads=2,
    joint_attention_dim=64, caption_projection_dim=64, pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16,
)  # fmt: skip
#: Linear weights of the reference file take these types in turn.
REF_TYPES = (T.Q4_0, T.Q8_0, T.BF16)


# --- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture(scope="module")
def ref(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A reference .gguf written with gguf's own writer and quantizers (Q4_0, Q8_0 and BF16
    Linear weights, F16 matrices, F32 elsewhere), with config.json beside it."""
    torch.manual_seed(0)
    base = diffusers.SD3Transformer2DModel(**SD3).eval()
    folder = tmp_path_factory.mktemp("gguf-ref")
    base.save_config(folder)
    linear = {n + ".weight" for n, m in base.named_modules() if isinstance(m, nn.Linear)}
    writer = gguf.GGUFWriter(folder / "ref.gguf", arch="sd3")
    count = 0
    for key, value in base.state_dict().items():
        a = value.detach().float().numpy()
        if key in linear and a.shape[-1] % 32 == 0:
            qt = REF_TYPES[count % len(REF_TYPES)]
            count += 1
            writer.add_tensor(key, gguf.quants.quantize(a, qt), raw_dtype=qt)
        elif value.ndim >= 2:
            writer.add_tensor(key, a.astype(np.float16))
        else:
            writer.add_tensor(key, a)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return folder / "ref.gguf"


def from_single_file(path: Path, config: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    return diffusers.SD3Transformer2DModel.from_single_file(  # type: ignore[no-any-return]
        path, config=str(config), quantization_config=diffusers.GGUFQuantizationConfig(compute_dtype=dtype)
    )


@pytest.fixture(scope="module")
def loaded(ref: Path) -> nn.Module:
    """The reference file as diffusers loads it (not to be changed by tests)."""
    return from_single_file(ref, ref.parent)


@pytest.fixture(scope="module")
def exported(loaded: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gguf-out") / "model.gguf"
    result = qs.save_gguf(loaded, out)
    assert result.files == ["model.gguf", "config.json"]
    assert result.total_bytes == out.stat().st_size + (out.parent / "config.json").stat().st_size
    return out


@pytest.fixture
def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return dict(
        hidden_states=torch.randn(1, 4, 8, 8, generator=g),
        encoder_hidden_states=torch.randn(1, 5, 64, generator=g),
        pooled_projections=torch.randn(1, 32, generator=g),
        timestep=torch.tensor([10.0]),
    )


def run(model: nn.Module, inputs: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad():
        return model(**cast).sample  # type: ignore[no-any-return]


def snapshot(model: nn.Module) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """Per tensor: GGML type (or torch dtype), shape and bytes."""
    out = {}
    for key, t in model.state_dict().items():
        kind = t.quant_type.name if isinstance(t, GGUFParameter) else str(t.dtype)
        raw = t.as_tensor() if isinstance(t, GGUFParameter) else t
        out[key] = (kind, tuple(t.shape), raw.contiguous().view(torch.uint8).numpy().tobytes())
    return out


def file_tensors(path: Path) -> dict[str, tuple[str, bytes]]:
    """Per tensor, read with gguf's own reader: GGML type and bytes."""
    return {t.name: (t.tensor_type.name, t.data.tobytes()) for t in gguf.GGUFReader(path).tensors}


def listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.exists() else {}


# --- refusal --------------------------------------------------------------------------------


@pytest.mark.parametrize("existing", [False, True])
def test_save_quantized_refuses_and_names_save_gguf(loaded: nn.Module, existing: bool, tmp_path: Path) -> None:
    target = tmp_path / "out"
    if existing:
        target.mkdir()
    with pytest.raises(qs.NotSerializableError) as info:
        qs.save_quantized(loaded, target)
    msg = str(info.value)
    assert "GGML" in msg and "quantsave.save_gguf" in msg and "Nothing was written" in msg
    assert target.exists() == existing and listing(target) == {}


# --- export read by diffusers, and by load_gguf ---------------------------------------------


def test_reference_model_is_gguf_quantized(loaded: nn.Module) -> None:
    kinds = {m.weight.quant_type for m in loaded.modules() if isinstance(m, GGUFLinear)}
    assert kinds == set(REF_TYPES)


def test_export_loads_in_diffusers(loaded: nn.Module, exported: Path, inputs: dict[str, torch.Tensor]) -> None:
    config = json.loads((exported.parent / "config.json").read_text())
    assert config["_class_name"] == "SD3Transformer2DModel" and "quantization_config" not in config
    again = from_single_file(exported, exported.parent)
    assert snapshot(again) == snapshot(loaded)
    assert torch.equal(run(again, inputs), run(loaded, inputs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_gguf_from_embedded_config(
    loaded: nn.Module, ref: Path, inputs: dict[str, torch.Tensor], dtype: torch.dtype, tmp_path: Path
) -> None:
    out = tmp_path / "alone.gguf"
    result = qs.save_gguf(loaded, out, write_config=False)
    assert result.files == ["alone.gguf"] and listing(tmp_path).keys() == {"alone.gguf"}
    model = qs.load_gguf(out, compute_dtype=dtype)
    assert type(model).__name__ == "SD3Transformer2DModel" and not model.training
    reference = from_single_file(ref, ref.parent, dtype)
    assert snapshot(model) == snapshot(reference)
    assert sum(isinstance(m, GGUFLinear) for m in model.modules()) == sum(
        isinstance(m, GGUFLinear) for m in reference.modules()
    ) > 0
    assert torch.equal(run(model, inputs, dtype), run(reference, inputs, dtype))
    with pytest.raises(qs.NotSerializableError):
        qs.save_quantized(model, tmp_path / "refused")


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_load_gguf_into_given_model(
    loaded: nn.Module, exported: Path, inputs: dict[str, torch.Tensor], device: str
) -> None:
    torch.manual_seed(1)
    with torch.device(device):
        skeleton = diffusers.SD3Transformer2DModel(**SD3)
    model = qs.load_gguf(exported, skeleton)
    assert model is skeleton
    assert snapshot(model) == snapshot(loaded)
    assert torch.equal(run(model, inputs), run(loaded, inputs))
    # A model that is already GGUF-quantized can be loaded into as well.
    assert snapshot(qs.load_gguf(exported, model)) == snapshot(loaded)


def test_reexport_keeps_the_original_bytes(ref: Path, exported: Path, tmp_path: Path) -> None:
    original, ours = file_tensors(ref), file_tensors(exported)
    assert ours.keys() == original.keys()
    quantized = [k for k, (kind, _) in original.items() if kind not in ("F32", "F16")]
    assert len(quantized) >= 3
    for key in quantized:
        assert ours[key] == original[key], key
    for key, (kind, data) in original.items():
        if kind == "F16":  # loaded as float32 by diffusers, exported as F32: the same values
            assert ours[key][0] == "F32"
            assert np.array_equal(
                np.frombuffer(ours[key][1], np.float32), np.frombuffer(data, np.float16).astype(np.float32)
            )
    # Exporting what load_gguf read is a fixed point, byte for byte.
    second = tmp_path / "model.gguf"
    qs.save_gguf(qs.load_gguf(exported), second)
    assert second.read_bytes() == exported.read_bytes()
    assert (tmp_path / "config.json").read_bytes() == (exported.parent / "config.json").read_bytes()


def test_metadata_in_file(loaded: nn.Module, tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    qs.save_gguf(loaded, out, architecture="sd3", metadata={"general.name": "tiny"})
    fields = gguf.GGUFReader(out).fields
    values = {k: fields[k].contents() for k in fields if not k.startswith("GGUF.")}
    assert values["general.architecture"] == "sd3" and values["general.name"] == "tiny"
    assert values["quantsave.library"] == "diffusers"
    assert values["quantsave.class_name"] == "SD3Transformer2DModel"
    assert json.loads(values["quantsave.config"]) == json.loads((tmp_path / "config.json").read_text())
    assert values["general.quantization_version"] == 2


# --- models without GGUF weights -------------------------------------------------------------


def mixed_module() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.LayerNorm(16), nn.Linear(16, 8), nn.Linear(8, 48, bias=False))
    model[1].to(torch.bfloat16)
    model.register_buffer("steps", torch.arange(5, dtype=torch.int64))
    model.register_buffer("table", torch.randn(3, dtype=torch.float64))
    model.register_buffer("fp16", torch.randn(2, 3).half())
    return model


def test_plain_module_round_trip(tmp_path: Path) -> None:
    model = mixed_module()
    out = tmp_path / "plain.gguf"
    result = qs.save_gguf(model, out)
    assert result.files == ["plain.gguf"]  # no config.json for a plain module
    kinds = {k: kind for k, (kind, _) in file_tensors(out).items()}
    assert kinds["0.weight"] == "F32" and kinds["1.weight"] == "F32"  # bfloat16 widened
    assert kinds["steps"] == "I64" and kinds["table"] == "F64" and kinds["fp16"] == "F16"
    fresh = mixed_module()
    for p in fresh.parameters():
        nn.init.zeros_(p)
    loaded = qs.load_gguf(out, fresh)
    for key, value in model.state_dict().items():
        got = loaded.state_dict()[key]
        assert torch.equal(got, value.to(got.dtype)), key
        assert got.dtype == (value.dtype if not value.is_floating_point() else torch.float32), key
    with pytest.raises(ValueError, match="pass the model"):
        qs.load_gguf(out)


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "BF16"])
def test_quantize_linear_weights(name: str, tmp_path: Path) -> None:
    model = mixed_module().float()
    out = tmp_path / "q.gguf"
    qs.save_gguf(model, out, quant_type=name)
    tensors = file_tensors(out)
    w = model[0].weight.detach().numpy()
    assert tensors["0.weight"] == (name, gguf.quants.quantize(w, T[name]).tobytes())
    # Rows of 16 and 8 values are not whole 32-value blocks: those weights stay F32 (BF16 has 1-value blocks).
    short = "BF16" if name == "BF16" else "F32"
    assert tensors["2.weight"][0] == short and tensors["3.weight"][0] == short
    assert tensors["0.bias"][0] == "F32" and tensors["1.weight"][0] == "F32"  # not Linear weights
    loaded = qs.load_gguf(out, mixed_module())
    assert isinstance(loaded[0], GGUFLinear) and loaded[0].weight.quant_type == T[name]
    assert isinstance(loaded[2], GGUFLinear) == (name == "BF16")
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    packed = np.frombuffer(tensors["0.weight"][1], np.uint8).reshape(16, -1)
    weight = torch.from_numpy(gguf.quants.dequantize(packed, T[name]))
    with torch.no_grad():
        assert torch.allclose(loaded[0](x), torch.nn.functional.linear(x, weight, model[0].bias), atol=1e-3)
        assert not torch.equal(weight, model[0].weight)


def test_transformers_model_round_trip(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama_config()).eval()
    out = tmp_path / "llama.gguf"
    assert qs.save_gguf(model, out, quant_type="Q8_0").files == ["llama.gguf"]
    loaded = qs.load_gguf(out)
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, GGUFLinear)
    ids = torch.tensor([[1, 5, 9, 33, 64, 2]])
    with torch.no_grad():
        a, b = model(ids).logits, loaded(ids).logits
    assert torch.allclose(a, b, atol=5e-2) and not torch.equal(a, b)


# --- bad input to save_gguf -------------------------------------------------------------------


def meta_module() -> nn.Module:
    with torch.device("meta"):
        return nn.Linear(4, 4)


def bool_buffer() -> nn.Module:
    m = nn.Linear(4, 4)
    m.register_buffer("mask", torch.ones(4, dtype=torch.bool))
    return m


@pytest.mark.parametrize(
    "make, kwargs, match",
    [
        (lambda: nn.Linear(4, 4), {"name": "model.safetensors"}, ".gguf"),
        (meta_module, {}, "meta"),
        (bool_buffer, {}, "dtype torch.bool"),
        (lambda: nn.Linear(64, 4), {"quant_type": "Q4_K"}, "quant_type"),
        (lambda: nn.Linear(64, 4), {"metadata": {"general.architecture": "x"}}, "architecture="),
        (lambda: nn.Linear(64, 4), {"metadata": {"quantsave.config": "{}"}}, "written by quantsave"),
        (lambda: nn.Linear(64, 4), {"metadata": {"a": 1}}, "metadata"),
        (lambda: {"w": torch.ones(2)}, {}, "nn.Module"),
    ],
)
def test_save_gguf_bad_input(make: Any, kwargs: dict[str, Any], match: str, tmp_path: Path) -> None:
    kwargs = dict(kwargs)
    name = kwargs.pop("name", "m.gguf")
    with pytest.raises(ValueError, match=match):
        qs.save_gguf(make(), tmp_path / "sub" / name, **kwargs)
    assert listing(tmp_path) == {}


# --- atomic writes ----------------------------------------------------------------------------


@pytest.mark.parametrize("error", [OSError("No space left on device"), KeyboardInterrupt()])
@pytest.mark.parametrize("existing", [False, True])
def test_failed_write_leaves_target_intact(
    loaded: nn.Module, error: BaseException, existing: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "model.gguf"
    if existing:
        qs.save_gguf(nn.Linear(2, 2), target)
    before = listing(tmp_path)
    original = gguf.GGUFWriter.write_tensor_data
    calls = []

    def fail_midway(self: Any, tensor: Any, *a: Any, **k: Any) -> None:
        calls.append(1)
        if len(calls) == 5:
            assert any(p.name.endswith(".quantsave.tmp") for p in tmp_path.iterdir())  # really mid-write
            raise error
        original(self, tensor, *a, **k)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", fail_midway)
    with pytest.raises(type(error)):
        qs.save_gguf(loaded, target)
    assert len(calls) == 5
    assert listing(tmp_path) == before


# --- corrupt files ------------------------------------------------------------------------------


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fails a call that does not return in time (a hang) instead of stalling the run."""

    def on_alarm(*_: Any) -> None:
        raise TimeoutError(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def small_module() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.LayerNorm(32), nn.Linear(32, 8))


@pytest.fixture(scope="module")
def small_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, int]:
    """A small quantsave .gguf (Q8_0 Linear weights) and where its last tensor's data ends."""
    path = tmp_path_factory.mktemp("gguf-small") / "small.gguf"
    qs.save_gguf(small_module(), path, quant_type="Q8_0")
    reader = gguf.GGUFReader(path)
    end = max(t.data_offset + t.n_bytes for t in reader.tensors)
    return path.read_bytes(), end


def load_error(path: Path, model: nn.Module | None = None) -> str | None:
    """None when the file loads, else the ``CheckpointError`` message (which must name the
    file); anything else (a crash, another exception, a hang) fails the test."""
    with deadline(10):
        try:
            qs.load_gguf(path, model if model is not None else small_module())
        except qs.CheckpointError as e:
            assert str(path) in str(e), str(e)
            return str(e)
    return None


def load_outcome(path: Path, model: nn.Module | None = None) -> str:
    return "ok" if load_error(path, model) is None else "CheckpointError"


def test_small_file_loads(small_file: tuple[bytes, int], tmp_path: Path) -> None:
    path = tmp_path / "ok.gguf"
    path.write_bytes(small_file[0])
    assert load_outcome(path) == "ok"


def test_truncated_files(small_file: tuple[bytes, int], tmp_path: Path) -> None:
    data, end = small_file
    points = sorted({0, 1, 3, 4, 8, 23, 24, 31, 40, end - 1, end - 34} | set(range(0, end, 13)))
    assert data[:4] == b"GGUF" and end <= len(data)
    path = tmp_path / "cut.gguf"
    for n in points:
        path.write_bytes(data[:n])
        assert load_outcome(path) == "CheckpointError", n


def test_header_bit_flips(small_file: tuple[bytes, int], tmp_path: Path) -> None:
    data, _ = small_file
    path = tmp_path / "flip.gguf"
    path.write_bytes(data)
    header_end = gguf.GGUFReader(path).data_offset
    rng = random.Random(0)
    outcomes = []
    for _ in range(400):
        pos = rng.randrange(header_end)
        flipped = bytearray(data)
        flipped[pos] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(flipped))
        outcomes.append(load_outcome(path))
    assert outcomes.count("CheckpointError") > 250  # most header bits matter (298 of 400 with this seed)


def _s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def gguf_bytes(
    kv: bytes = b"",
    n_kv: int = 0,
    tensors: list[tuple[bytes, list[int], int, int]] | None = None,
    data: bytes = b"",
    version: int = 3,
    n_tensors: int | None = None,
    magic: bytes = b"GGUF",
    alignment: int = 32,
) -> bytes:
    """A hand-made file: ``tensors`` are (name, torch-order dims, GGML type, data offset)."""
    tensors = tensors or []
    infos = b"".join(
        _s(name)
        + struct.pack("<I", len(dims))
        + struct.pack(f"<{len(dims)}Q", *reversed(dims))
        + struct.pack("<IQ", t, off)
        for name, dims, t, off in tensors
    )
    head = magic + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors, n_kv) + kv + infos
    return head + b"\0" * (-len(head) % alignment) + data


def kv_string(key: str, value: str | bytes) -> bytes:
    return _s(key) + struct.pack("<I", 8) + _s(value)


ONES = np.ones(32, np.float32).tobytes()
ALIGN_256 = _s("general.alignment") + struct.pack("<II", 4, 256)


NORM = [(b"weight", [32], 0, 0), (b"bias", [32], 0, 128)]


def norm_file(
    weight: tuple[list[int], int, int] = ([32], 0, 0),
    bias_offset: int = 128,
    more: tuple[tuple[bytes, list[int], int, int], ...] = (),
    data: bytes = ONES * 2,
) -> bytes:
    """A file for ``nn.LayerNorm(32)``: ``weight`` is (dims, GGML type, offset), the F32 bias
    at ``bias_offset``, then ``more`` tensors. Valid with the defaults; each case changes one thing."""
    dims, kind, offset = weight
    return gguf_bytes(tensors=[(b"weight", dims, kind, offset), (b"bias", [32], 0, bias_offset), *more], data=data)


def norm_kv(kv: bytes, n_kv: int = 1, **kw: Any) -> bytes:
    """The valid ``nn.LayerNorm(32)`` file with ``kv`` as its KV section."""
    return gguf_bytes(kv, n_kv, NORM, ONES * 2, **kw)


#: name -> (file, a fragment of the error message).
CASES: dict[str, tuple[bytes, str]] = {
    "empty": (b"", "shorter than a GGUF header"),
    "bad magic": (gguf_bytes(tensors=NORM, data=ONES * 2, magic=b"GGUG"), "bad magic"),
    "version 1": (norm_kv(b"", 0, version=1), "version 1 "),
    "version 4": (norm_kv(b"", 0, version=4), "version 4 "),
    "big-endian": (norm_kv(b"", 0, version=3 << 24), "version 50331648 "),
    "huge tensor count": (gguf_bytes(tensors=NORM, data=ONES * 2, n_tensors=2**63), "cannot fit"),
    "huge kv count": (norm_kv(b"", 2**63 - 1), "cannot fit"),
    "huge array count": (norm_kv(_s("a") + struct.pack("<IIQ", 9, 0, 2**40)), "needs 1099511627776 bytes"),
    "huge string array": (norm_kv(_s("a") + struct.pack("<IIQ", 9, 8, 2**40) + _s("x")), "claims 1099511627776"),
    "deep arrays": (norm_kv(_s("a") + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 5000), "nests arrays"),
    "huge key length": (norm_kv(struct.pack("<Q", 2**62) + b"abc"), "truncated"),
    "unknown value type": (norm_kv(_s("a") + struct.pack("<II", 77, 0)), "unknown value type 77"),
    "duplicate key": (norm_kv(kv_string("a", "x") * 2, 2), "duplicate KV key 'a'"),
    "bad utf-8 key": (norm_kv(kv_string("a", "x").replace(b"a", b"\xff", 1)), "not UTF-8"),
    "alignment 3": (norm_kv(_s("general.alignment") + struct.pack("<II", 4, 3)), "power of two"),
    "alignment string": (norm_kv(kv_string("general.alignment", "32")), "power of two"),
    "huge n_dims": (gguf_bytes(_s("weight") + struct.pack("<I", 2**31), n_tensors=1), "2147483648 dimensions"),
    "huge dims": (norm_file(([2**40, 2**40], 0, 0)), "needs bytes"),
    "unknown type 99": (norm_file(([32], 99, 0)), "unknown GGML type 99"),
    "removed type 4": (norm_file(([32], 4, 0)), "unknown GGML type 4"),
    "partial block": (norm_file(([16], 8, 0)), "not whole 32-value blocks"),
    "misaligned offset": (norm_file(bias_offset=132, data=ONES * 3), "not a multiple of the alignment 32"),
    "offset past end": (norm_file(bias_offset=2**60), "needs bytes"),
    "data past end": (norm_file(data=(ONES * 2)[:-1]), "needs bytes"),
    "overlap": (norm_file(bias_offset=96), "overlap"),
    "duplicate tensor": (norm_file(more=((b"weight", [32], 0, 256),), data=ONES * 3), "duplicate tensor 'weight'"),
    "bad utf-8 name": (norm_file(more=((b"w\xffight", [32], 0, 256),), data=ONES * 3), "not UTF-8"),
    "unknown tensor": (norm_file(more=((b"other", [32], 0, 256),), data=ONES * 3), "does not have"),
    "wrong shape": (norm_file(([16], 0, 0)), "has shape [16]"),
    "int for float": (norm_file(([32], 26, 0)), "is I32"),
    "missing tensor": (gguf_bytes(tensors=NORM[:1], data=ONES), "lacks"),
    # Q8_K (292 bytes per 256 values) has no nn.Linear to keep it and gguf cannot dequantize it.
    "undequantizable": (
        gguf_bytes(tensors=[(b"weight", [256], 15, 0), (b"bias", [256], 0, 320)], data=bytes(320) + ONES * 8),
        "cannot dequantize",
    ),
    "offset not a multiple of general.alignment": (
        gguf_bytes(ALIGN_256, 1, NORM, ONES * 2, alignment=256),
        "not a multiple of the alignment 256",
    ),
}


def test_crafted_valid_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "good.gguf"
    path.write_bytes(norm_file())
    model = qs.load_gguf(path, nn.LayerNorm(32))
    assert torch.equal(model.weight, torch.ones(32)) and torch.equal(model.bias, torch.ones(32))
    # The same tensors aligned to 256 bytes (general.alignment) load as well.
    tensors = [(b"weight", [32], 0, 0), (b"bias", [32], 0, 256)]
    path.write_bytes(gguf_bytes(ALIGN_256, 1, tensors, ONES + bytes(128) + ONES, alignment=256))
    assert load_outcome(path, nn.LayerNorm(32)) == "ok"


@pytest.mark.parametrize("name", list(CASES))
def test_crafted_bad_files(name: str, tmp_path: Path) -> None:
    data, fragment = CASES[name]
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    error = load_error(path, nn.LayerNorm(256 if name == "undequantizable" else 32))
    assert error is not None and fragment in error, error


def test_bad_embedded_config(tmp_path: Path) -> None:
    path = tmp_path / "cfg.gguf"
    path.write_bytes(gguf_bytes(kv_string("quantsave.config", "{not json"), 1))
    with pytest.raises(qs.CheckpointError, match=r"quantsave\.config"):
        qs.load_gguf(path)
    path.write_bytes(gguf_bytes(_s("quantsave.config") + struct.pack("<II", 4, 7), 1))
    with pytest.raises(qs.CheckpointError, match="must be a string"):
        qs.load_gguf(path)


def test_model_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    qs.save_gguf(small_module(), path, quant_type="Q8_0")
    with pytest.raises(qs.CheckpointError, match="shape"):
        qs.load_gguf(path, nn.Sequential(nn.Linear(64, 16), nn.LayerNorm(32), nn.Linear(32, 8)))
    with pytest.raises(qs.CheckpointError, match="does not have"):
        qs.load_gguf(path, nn.Sequential(nn.Linear(64, 32), nn.LayerNorm(32)))
    bigger = nn.Sequential(nn.Linear(64, 32), nn.LayerNorm(32), nn.Linear(32, 8), nn.Linear(2, 2))
    before = {k: v.clone() for k, v in bigger.state_dict().items()}
    with pytest.raises(qs.CheckpointError, match="lacks"):
        qs.load_gguf(path, bigger)
    # A failed load leaves the caller's model as it was.
    assert type(bigger[0]) is nn.Linear and type(bigger[2]) is nn.Linear
    assert all(torch.equal(v, before[k]) for k, v in bigger.state_dict().items())
    with pytest.raises(FileNotFoundError):
        qs.load_gguf(tmp_path / "absent.gguf", small_module())
