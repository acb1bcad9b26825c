"""Per-shard sha256: recorded at save time (``checksums=True``) in ``checksums.sha256``
(``sha256sum`` format), equal to the files' real hashes, checked by ``verify --checksums`` and
``load_quantized(verify=True)``; a flipped byte is caught and named, a stale file removed."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import quantsave as qs
from quantsave import _core
from quantsave.checkpoint.checksums import CHECKSUMS_NAME, read_checksums

pytest.importorskip("bitsandbytes")


def model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.Linear(64, 32))
    return qs.quantize(m, qs.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))


def real_hashes(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.iterdir()
        if p.suffix in (".safetensors", ".bin")
    }


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "quantsave", *args], capture_output=True, text=True, timeout=300)


def flip_weight_byte(path: Path) -> None:
    """Flips a bit inside a packed 4-bit weight: header and layout stay valid."""
    header = _core.read_header(str(path))
    start, end = next(
        (s, e) for name, dtype, _, s, e in header["tensors"] if name.endswith(".weight") and dtype == "U8"
    )
    data = bytearray(path.read_bytes())
    data[(start + end) // 2] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "pickle"])
def test_recorded_hashes_are_the_files_hashes(safe, tmp_path) -> None:  # type: ignore[no-untyped-def]
    result = qs.save_quantized(model(), tmp_path, max_shard_size="5KB", checksums=True, safe_serialization=safe)
    recorded = read_checksums(tmp_path)
    assert recorded == real_hashes(tmp_path) and len(recorded) == result.num_shards > 1
    assert CHECKSUMS_NAME in result.files
    lines = (tmp_path / CHECKSUMS_NAME).read_text().splitlines()
    names = [line.split("  ")[1] for line in lines]
    assert names == sorted(names) and all(len(line.split("  ")) == 2 for line in lines)
    if shutil.which("sha256sum"):
        check = subprocess.run(["sha256sum", "-c", CHECKSUMS_NAME], cwd=tmp_path, capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr


def test_verify_and_load_catch_a_flipped_byte(tmp_path) -> None:  # type: ignore[no-untyped-def]
    m = model()
    qs.save_quantized(m, tmp_path, max_shard_size="5KB", checksums=True)
    ok = cli("verify", str(tmp_path), "--checksums")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    x = torch.randn(2, 64)
    loaded = qs.load_quantized(
        tmp_path, model().__class__(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.Linear(64, 32)), verify=True
    )
    with torch.no_grad():
        assert torch.equal(loaded(x), m(x))
    shard = sorted(tmp_path.glob("*.safetensors"))[1]
    flip_weight_byte(shard)
    bad = cli("verify", str(tmp_path), "--checksums")
    assert bad.returncode == 1 and shard.name in bad.stdout + bad.stderr and "sha256" in bad.stdout + bad.stderr
    # Without --checksums the headers are still sound: only the hash can see the flip.
    assert cli("verify", str(tmp_path)).returncode == 0
    skeleton = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.Linear(64, 32))
    with pytest.raises(qs.CheckpointError, match=shard.name):
        qs.load_quantized(tmp_path, skeleton, verify=True)


def test_missing_or_bad_checksums(tmp_path) -> None:  # type: ignore[no-untyped-def]
    qs.save_quantized(model(), tmp_path, checksums=True)
    assert (tmp_path / CHECKSUMS_NAME).is_file()
    # A later save without checksums removes the stale file (it would no longer match).
    qs.save_quantized(model(), tmp_path)
    assert not (tmp_path / CHECKSUMS_NAME).exists()
    none = cli("verify", str(tmp_path), "--checksums")
    assert none.returncode == 2 and "no checksums" in none.stderr and none.stderr.count("\n") == 1
    skeleton = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.Linear(64, 32))
    with pytest.raises(qs.CheckpointError, match="no checksums"):
        qs.load_quantized(tmp_path, skeleton, verify=True)
    (tmp_path / CHECKSUMS_NAME).write_text("not a checksum line\n")
    with pytest.raises(qs.CheckpointError, match="line 1"):
        qs.load_quantized(tmp_path, skeleton, verify=True)
    (tmp_path / CHECKSUMS_NAME).write_text("0" * 64 + "  ../escape.safetensors\n")
    with pytest.raises(qs.CheckpointError, match="line 1"):
        qs.load_quantized(tmp_path, skeleton, verify=True)
    # A listed file that is gone, and a weights file that is not listed.
    (tmp_path / CHECKSUMS_NAME).write_text("0" * 64 + "  other.safetensors\n")
    out = cli("verify", str(tmp_path), "--checksums")
    assert (
        out.returncode == 1
        and "other.safetensors" in out.stdout + out.stderr
        and "no checksum recorded" in out.stdout + out.stderr
    )


def test_convert_records_checksums(llama_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    result = qs.convert(
        llama_dir, tmp_path, qs.BitsAndBytesConfig(load_in_8bit=True), max_shard_size="100KB", checksums=True
    )
    assert read_checksums(tmp_path) == real_hashes(tmp_path) and len(real_hashes(tmp_path)) == result.num_shards > 1
    assert cli("verify", str(tmp_path), "--checksums").returncode == 0
