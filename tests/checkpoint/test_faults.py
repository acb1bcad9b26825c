"""Faults while saving: a file-size limit (as a full disk: the write fails), a target that is a
file, a missing parent, permission denied. Each is a clear ``OSError`` subclass naming the
target's path; nothing half-written is left and the previous checkpoint is intact."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import quantsave as qs


def model(seed: int, width: int = 256) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(24)])


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name != folder.name)


def run_child(code: str) -> subprocess.CompletedProcess[str]:
    # The child imports the same quantsave as this process (the installed one, or the source tree).
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("tool", ["save", "convert"])
def test_file_size_limit(tool, tmp_path, llama_dir) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path / "ckpt"
    if tool == "save":
        qs.save_quantized(model(1), folder, max_shard_size="400KB")
        action = "qs.save_quantized(model, target, max_shard_size='4MB')"
        setup = "torch.manual_seed(2); model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(24)])"
    else:
        qs.convert(llama_dir, folder, qs.BitsAndBytesConfig(load_in_4bit=True))
        action = f"qs.convert({str(llama_dir)!r}, target, qs.BitsAndBytesConfig(load_in_8bit=True))"
        setup = "pass"
    before = snapshot(folder)
    code = f"""
import errno, resource, torch
from torch import nn
import quantsave as qs
target = {str(folder)!r}
{setup}
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
try:
    {action}
except OSError as e:
    assert e.errno == errno.EFBIG, e
    assert target in str(e) and ".quantsave-" not in str(e), str(e)
    print("OSError", type(e).__name__)
"""
    proc = run_child(code)
    assert proc.returncode == 0 and "OSError" in proc.stdout, proc.stderr
    assert snapshot(folder) == before
    assert siblings(folder) == []


def test_target_is_a_file(tmp_path, llama_dir) -> None:  # type: ignore[no-untyped-def]
    target = tmp_path / "file"
    target.write_text("not a folder")
    with pytest.raises(NotADirectoryError, match=str(target)):
        qs.save_quantized(model(1), target)
    with pytest.raises(NotADirectoryError, match=str(target)):
        qs.convert(llama_dir, target, qs.BitsAndBytesConfig(load_in_4bit=True))
    assert target.read_text() == "not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_missing_parents_are_created(tmp_path) -> None:  # type: ignore[no-untyped-def]
    target = tmp_path / "a" / "b" / "ckpt"
    qs.save_quantized(model(1), target, max_shard_size="400KB")  # as save_pretrained does
    assert len(list(target.glob("*.safetensors"))) > 1 and siblings(target) == []


def _immutable(path: Path, on: bool) -> bool:
    """``chattr +i``/``-i``: even root cannot create or remove entries in an immutable folder."""
    if shutil.which("chattr") is None:
        return False
    return subprocess.run(["chattr", "+i" if on else "-i", str(path)], capture_output=True).returncode == 0


def test_permission_denied(tmp_path) -> None:  # type: ignore[no-untyped-def]
    parent = tmp_path / "parent"
    target = parent / "ckpt"
    qs.save_quantized(model(1), target, max_shard_size="400KB")
    before = snapshot(target)
    if os.geteuid() == 0:
        if not _immutable(parent, True):
            pytest.skip("root ignores permissions and this filesystem has no immutable flag (chattr)")
        undo = [parent]
    else:
        os.chmod(parent, 0o555)
        undo = []
    try:
        # The parent refuses a staging folder but the folder itself is writable: written in place.
        qs.save_quantized(model(2), target, max_shard_size="400KB")
        assert snapshot(target) != before
        after = snapshot(target)
        # Both refuse: a PermissionError naming the folder, nothing changed.
        if os.geteuid() == 0:
            assert _immutable(target, True)
            undo.append(target)
        else:
            os.chmod(target, 0o555)
        with pytest.raises(PermissionError, match=str(target)):
            qs.save_quantized(model(3), target, max_shard_size="400KB")
        assert snapshot(target) == after
    finally:
        for p in undo:
            _immutable(p, False)
        os.chmod(parent, 0o755)
        if target.exists():
            os.chmod(target, 0o755)
    assert siblings(target) == []


def test_errno_is_kept_for_callers(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """An OSError from inside the save keeps its type and errno, with the target's path."""
    from quantsave import _core

    folder = tmp_path / "ckpt"
    qs.save_quantized(model(1), folder)

    def full(*a, **k):  # type: ignore[no-untyped-def]
        raise OSError(
            errno.ENOSPC, "No space left on device", str(next(tmp_path.glob(".ckpt.quantsave-*")) / "model.safetensors")
        )

    monkeypatch.setattr(_core, "write_shards", full)
    with pytest.raises(OSError) as info:
        qs.save_quantized(model(2), folder)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(folder / "model.safetensors")
    assert siblings(folder) == []
