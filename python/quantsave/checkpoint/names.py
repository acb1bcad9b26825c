"""Checkpoint file names, owned by the Rust core (``rust/names.rs``) and re-exported here: the
weights name with its variant, shard names (``model-00001-of-00003.safetensors``), the index name,
the per-file temporaries of atomic writes (the stale-shard rule is transformers' own, in
``checkpoint.writer``); plus the check that a caller's name stays inside the
folder."""

from __future__ import annotations

import os

from quantsave import _core

__all__ = [
    "add_variant",
    "check_file_name",
    "index_file_name",
    "is_temp_name",
    "shard_file_names",
    "temp_path",
]

add_variant = _core.add_variant
index_file_name = _core.index_file_name
shard_file_names = _core.shard_file_names
is_temp_name = _core.is_temp_name
temp_path = _core.temp_path


def check_file_name(value: str, what: str) -> str:
    """Rejects names that would write outside the target folder.

    Raises:
        ValueError: a path separator, ``.``/``..``, an absolute path, a NUL or an empty name.
    """
    if (
        not isinstance(value, str)
        or not value
        or value in (".", "..")
        or "/" in value
        or "\\" in value
        or "\0" in value
        or os.path.isabs(value)
    ):
        raise ValueError(f"{what} {value!r} must be a plain file name (no path separators, not '.' or '..')")
    return value
