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
