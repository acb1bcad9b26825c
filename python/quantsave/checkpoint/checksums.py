"""Per-shard sha256 checksums: recorded at save time (``checksums=True``) in a
``checksums.sha256`` file beside the weights, in ``sha256sum`` format (so ``sha256sum -c
checksums.sha256`` checks them too), and checked by ``quantsave verify --checksums`` and
``load_quantized(..., verify=True)``. Loaders that do not know the file ignore it."""

from __future__ import annotations

import re
from pathlib import Path

from quantsave import _core
from quantsave.errors import CheckpointError

__all__ = ["CHECKSUMS_NAME", "check_checksums", "read_checksums", "render_checksums"]

CHECKSUMS_NAME = "checksums.sha256"
_LINE = re.compile(r"^(?P<hash>[0-9a-f]{64}) [ *](?P<name>[^/\\]+)$")


def render_checksums(hashes: dict[str, str]) -> str:
    """The file's text: one ``<sha256>  <file name>`` line per file, sorted by name."""
    return "".join(f"{hashes[name]}  {name}\n" for name in sorted(hashes))


def read_checksums(directory: Path) -> dict[str, str] | None:
    """File name -> recorded sha256, or None when no checksums were recorded.

    Raises:
        CheckpointError: the file is not in ``sha256sum`` format.
    """
    path = directory / CHECKSUMS_NAME
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"invalid checkpoint file {path}: not UTF-8 text") from e
    out: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        m = _LINE.match(line)
        if m is None or m["name"] in (".", ".."):
            raise CheckpointError(f"invalid checkpoint file {path}: line {n} is not '<sha256>  <file name>'")
        out[m["name"]] = m["hash"]
    return out


def check_checksums(directory: Path, weight_files: list[Path]) -> list[str]:
    """Problems (one line each) found by hashing ``weight_files`` against the recorded sums;
    empty when all match. Every weights file must be listed and every listed file must exist.

    Raises:
        CheckpointError: no checksums recorded, or an unreadable checksums file.
    """
    recorded = read_checksums(directory)
    if recorded is None:
        raise CheckpointError(
            f"no checksums recorded in {directory} (no {CHECKSUMS_NAME}); save with checksums=True to record them"
        )
    names = {f.name for f in weight_files}
    problems = [
        f"{name}: listed in {CHECKSUMS_NAME} but missing"
        for name in sorted(set(recorded) - names)
        if not (directory / name).is_file()
    ]
    unlisted = sorted(names - set(recorded))
    problems += [f"{name}: no checksum recorded" for name in unlisted]
    listed = sorted(f for f in weight_files if f.name in recorded)
    for f, found in zip(listed, _core.sha256_files([str(f) for f in listed]), strict=True):
        if found != recorded[f.name]:
            problems.append(f"{f.name}: sha256 {found} differs from the recorded {recorded[f.name]}")
    return problems
