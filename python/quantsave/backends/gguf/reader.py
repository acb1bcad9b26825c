"""A bounded reader of the GGUF container: validates every count, size, offset and type
against the file before anything is read (``gguf.GGUFReader`` loops forever on a corrupt array
count and raises bare ``IndexError``/``ValueError`` on other damage), then maps the file.

File layout (GGUF v3, little-endian; what ``gguf.GGUFWriter`` writes)::

    "GGUF" u32 version | u64 n_tensors | u64 n_kv
    n_kv x  (u64 len, utf-8 key) u32 value_type value
    n_tensors x (u64 len, utf-8 name) u32 n_dims u64 dims[n_dims] (innermost first)
                u32 ggml_type u64 offset (from the data section, a multiple of the alignment)
    zero padding to the alignment (32, or ``general.alignment``) | tensor data
"""

from __future__ import annotations

import itertools
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from quantsave.errors import CheckpointError

__all__ = ["ALIGNMENT_KEY", "MAX_DIMS", "STRING", "TensorInfo", "map_gguf", "parse_gguf"]

ALIGNMENT_KEY = "general.alignment"
MAX_DIMS = 8
_MAX_NESTING = 4
_GGUF_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
# Scalar KV value types: GGUFValueType value -> struct format.
_SCALAR_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, _ARRAY, _UINT32 = 8, 9, 4


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: int
    shape: tuple[int, ...]  # logical, torch order
    start: int  # absolute offset in the file
    nbytes: int


class Cursor:
    """Reads little-endian values from ``buf``, never past its end."""

    def __init__(self, buf: Any, path: Path) -> None:
        self.buf, self.path, self.pos, self.size = buf, path, 0, len(buf)

    def bad(self, msg: str) -> CheckpointError:
        return CheckpointError(f"invalid GGUF file {self.path}: {msg}")

    def take(self, n: int, what: str) -> int:
        if n > self.size - self.pos:
            raise self.bad(f"truncated: {what} needs {n} bytes at offset {self.pos}, the file has {self.size}")
        start, self.pos = self.pos, self.pos + n
        return start

    def unpack(self, fmt: str, what: str) -> tuple[Any, ...]:
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt), what))

    def string(self, what: str, decode: bool = True) -> str:
        (n,) = self.unpack("<Q", what)
        start = self.take(n, what)
        if not decode:
            return ""
        try:
            return bytes(self.buf[start : start + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise self.bad(f"{what} at offset {start} is not UTF-8") from None

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        """One KV value; arrays are skipped (checked, not kept) and read as None."""
        if vtype in _SCALAR_FMT:
            return self.unpack(_SCALAR_FMT[vtype], what)[0]
        if vtype == STRING:
            return self.string(what)
        if vtype != _ARRAY:
            raise self.bad(f"{what} has unknown value type {vtype}")
        if depth >= _MAX_NESTING:
            raise self.bad(f"{what} nests arrays more than {_MAX_NESTING} deep")
        itype, count = self.unpack("<IQ", what)
        if itype in _SCALAR_FMT:
            self.take(count * struct.calcsize(_SCALAR_FMT[itype]), what)
            return None
        least = {STRING: 8, _ARRAY: 12}.get(itype)
        if least is None:
            raise self.bad(f"{what} is an array of unknown value type {itype}")
        if count * least > self.size - self.pos:
            raise self.bad(f"truncated: {what} claims {count} elements, more than the file can hold")
        for _ in range(count):
            if itype == STRING:
                self.string(what, decode=False)
            else:
                self.value(_ARRAY, what, depth + 1)
        return None


def parse_gguf(buf: Any, path: Path, gguf: ModuleType) -> tuple[dict[str, tuple[int, Any]], list[TensorInfo]]:
    """The KV entries (key -> (value type, value)) and tensor infos of a GGUF file, validated."""
    cur = Cursor(buf, path)
    magic = bytes(buf[:4])
    if magic != b"GGUF":
        raise cur.bad(f"bad magic {magic!r} (expected b'GGUF')")
    cur.take(4, "magic")
    (version,) = cur.unpack("<I", "version")
    if version not in _GGUF_VERSIONS:
        raise cur.bad(f"GGUF version {version} is not supported (only {_GGUF_VERSIONS}, little-endian)")
    n_tensors, n_kv = cur.unpack("<QQ", "counts")
    if n_kv * 13 > cur.size - cur.pos or n_tensors * 24 > cur.size - cur.pos:
        raise cur.bad(f"truncated: {n_kv} KV entries and {n_tensors} tensors cannot fit in {cur.size} bytes")
    kv: dict[str, tuple[int, Any]] = {}
    for _ in range(n_kv):
        key = cur.string("a KV key")
        (vtype,) = cur.unpack("<I", f"KV {key!r}")
        if key in kv:
            raise cur.bad(f"duplicate KV key {key!r}")
        kv[key] = (vtype, cur.value(vtype, f"KV {key!r}"))
    alignment = _DEFAULT_ALIGNMENT
    if ALIGNMENT_KEY in kv:
        vtype, alignment = kv[ALIGNMENT_KEY]
        if vtype != _UINT32 or alignment <= 0 or alignment & (alignment - 1):
            raise cur.bad(f"{ALIGNMENT_KEY} must be a u32 power of two, got {alignment!r}")
    raw: list[tuple[str, int, tuple[int, ...], int]] = []
    names: set[str] = set()
    for _ in range(n_tensors):
        name = cur.string("a tensor name")
        (n_dims,) = cur.unpack("<I", f"tensor {name!r}")
        if n_dims > MAX_DIMS:
            raise cur.bad(f"tensor {name!r} has {n_dims} dimensions (at most {MAX_DIMS})")
        dims = cur.unpack(f"<{n_dims}Q", f"tensor {name!r}")
        ggml, offset = cur.unpack("<IQ", f"tensor {name!r}")
        if name in names:
            raise cur.bad(f"duplicate tensor {name!r}")
        names.add(name)
        raw.append((name, ggml, tuple(reversed(dims)), offset))
    data_start = -(-cur.pos // alignment) * alignment
    infos = []
    for name, ggml, shape, offset in raw:
        try:
            qt = gguf.GGMLQuantizationType(ggml)
            block, size = gguf.GGML_QUANT_SIZES[qt]
        except (ValueError, KeyError):
            raise cur.bad(f"tensor {name!r} has unknown GGML type {ggml}") from None
        numel = math.prod(shape)
        if block > 1 and (not shape or shape[-1] % block):
            raise cur.bad(
                f"tensor {name!r} of type {qt.name} has rows of {shape[-1:]} values, not whole {block}-value blocks"
            )
        nbytes = numel // block * size
        if offset % alignment:
            raise cur.bad(
                f"tensor {name!r} starts at data offset {offset}, not a multiple of the alignment {alignment}"
            )
        start = data_start + offset
        if start + nbytes > cur.size:
            raise cur.bad(
                f"tensor {name!r} ({qt.name} {list(shape)}) needs bytes {start}..{start + nbytes}, "
                f"the file has {cur.size}"
            )
        infos.append(TensorInfo(name, ggml, shape, start, nbytes))
    spans = sorted((i.start, i.start + i.nbytes, i.name) for i in infos if i.nbytes)
    for (_, e0, a), (s1, _, b) in itertools.pairwise(spans):
        if s1 < e0:
            raise cur.bad(f"tensors {a!r} and {b!r} overlap")
    return kv, infos


def map_gguf(path: Path, gguf: ModuleType) -> tuple[dict[str, tuple[int, Any]], list[TensorInfo], torch.Tensor]:
    """Validates ``path`` and maps it privately (copy-on-write): KV, tensor infos and a uint8
    tensor over the whole file."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise CheckpointError(f"invalid GGUF file {path}: {size} bytes, shorter than a GGUF header")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    kv, infos = parse_gguf(mm, path, gguf)
    return kv, infos, torch.frombuffer(mm, dtype=torch.uint8)
