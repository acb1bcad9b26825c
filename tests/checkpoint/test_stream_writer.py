"""``_core.StreamWriter``: a safetensors file written tensor by tensor, in any order, with the
bytes ``safetensors.torch.save_file`` writes, committed only when complete."""

from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import save_file

from quantsave import _core
from quantsave.checkpoint.tensors import byte_view, dtype_name


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(16, 8, generator=g).to(torch.bfloat16),
        "a.weight.absmax": torch.rand(2, generator=g),
        "b": torch.randint(0, 255, (33, 1), dtype=torch.uint8, generator=g),
        "c.empty": torch.empty(0, 4),
        "d.scale": torch.randn(3, generator=g).to(torch.float16),
    }


def test_streamed_file_equals_save_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    tensors = _tensors()
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    specs = [(k, dtype_name(t.dtype), list(t.shape)) for k, t in tensors.items()]
    w = _core.StreamWriter(tmp_path / "out.safetensors", specs, {"format": "pt"})
    order = list(tensors)
    random.Random(1).shuffle(order)
    for k in order:
        assert not (tmp_path / "out.safetensors").exists()
        w.write(k, byte_view(tensors[k]))
    assert w.missing() == []
    size = w.finish()
    data = (tmp_path / "out.safetensors").read_bytes()
    assert data == (tmp_path / "ref.safetensors").read_bytes() and size == len(data)
    with pytest.raises(ValueError, match="already finished"):
        w.write("b", byte_view(tensors["b"]))


def test_incomplete_or_bad_writes_commit_nothing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")
    tensors = _tensors()
    specs = [(k, dtype_name(t.dtype), list(t.shape)) for k, t in tensors.items()]
    w = _core.StreamWriter(target, specs)
    with pytest.raises(ValueError, match="no tensor"):
        w.write("zzz", byte_view(tensors["b"]))
    with pytest.raises(ValueError, match="needs"):
        w.write("a.weight", byte_view(tensors["b"]))
    w.write("b", byte_view(tensors["b"]))
    assert "a.weight" in w.missing()
    with pytest.raises(ValueError, match="never written"):
        w.finish()
    assert target.read_bytes() == b"old"
    w2 = _core.StreamWriter(target, specs)
    w2.write("b", byte_view(tensors["b"]))
    w2.abort()
    del w, w2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    with pytest.raises(ValueError, match="dtype"):
        _core.StreamWriter(target, [("x", "F99", [1])])
    with pytest.raises(FileNotFoundError):
        _core.StreamWriter(tmp_path / "missing" / "m.safetensors", specs)


def test_shared_file_filled_by_attached_writers(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A save across ranks: one writer creates the file (``shared=True``), others attach to its
    temporary file and write their tensors; the creator's ``finish`` commits it."""
    tensors = _tensors()
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    specs = [(k, dtype_name(t.dtype), list(t.shape)) for k, t in tensors.items()]
    target = tmp_path / "out.safetensors"
    creator = _core.StreamWriter(target, specs, {"format": "pt"}, shared=True)
    temp = creator.temp_path
    assert temp is not None and temp.is_file()
    names = list(tensors)
    creator.write(names[0], byte_view(tensors[names[0]]))
    others = [_core.StreamWriter.attach(target, temp, specs, {"format": "pt"}) for _ in range(2)]
    for i, k in enumerate(names[1:]):
        others[i % 2].write(k, byte_view(tensors[k]))
    assert others[0].temp_path is None
    for w in others:
        w.finish()
        assert not target.exists() and temp.is_file()  # attached writers never commit
    creator.finish()
    assert target.read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert not temp.exists()


def test_attach_refuses_another_layout(tmp_path) -> None:  # type: ignore[no-untyped-def]
    tensors = _tensors()
    specs = [(k, dtype_name(t.dtype), list(t.shape)) for k, t in tensors.items()]
    target = tmp_path / "out.safetensors"
    creator = _core.StreamWriter(target, specs, {"format": "pt"}, shared=True)
    other = [*specs[:-1], (specs[-1][0], "F32", [3])]
    with pytest.raises(ValueError, match="another layout"):
        _core.StreamWriter.attach(target, creator.temp_path, other, {"format": "pt"})
    with pytest.raises(ValueError, match="another layout"):
        _core.StreamWriter.attach(target, creator.temp_path, specs, {"format": "pt", "x": "y"})
    with pytest.raises(OSError):
        _core.StreamWriter.attach(target, tmp_path / "missing.tmp", specs)
    creator.abort()
    assert list(tmp_path.iterdir()) == []
