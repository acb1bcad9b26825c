"""Type stubs for the Rust extension ``quantsave._core``."""

import builtins
import sys
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Any, Literal, TypedDict, final, overload, type_check_only

__all__ = [
    "CheckpointError",
    "__version__",
    "write_shards",
    "write_bytes_atomic",
    "plan_shards",
    "shard_file_names",
    "index_file_name",
    "add_variant",
    "is_shard_name",
    "is_temp_name",
    "temp_path",
    "parse_size",
    "dtype_nbytes",
    "read_header",
    "MappedFile",
    "StreamWriter",
    "ConvertOp",
    "Conversion",
    "absmax_4bit",
    "sha256_files",
    "exchange_paths",
    "fsync_dir",
    "quantize_4bit",
    "dequantize_4bit",
    "quantize_dynamic",
    "dequantize_dynamic",
    "dynamic_map",
    "code_4bit",
    "quantize_int8_rows",
]

__version__: str

class CheckpointError(ValueError):
    """A checkpoint file or folder is corrupt, truncated or inconsistent."""

@type_check_only
class Header(TypedDict):
    """What ``read_header`` returns (a plain dict at runtime)."""

    metadata: dict[str, str] | None
    tensors: list[tuple[str, str, list[int], int, int]]
    data_start: int
    file_size: int

_Tensor = tuple[str, str, Sequence[int], Any]
_Shard = tuple[str | PathLike[str], Sequence[_Tensor], dict[str, str] | None]

@overload
def write_shards(
    shards: Sequence[_Shard],
    *,
    fsync: bool = False,
    checksums: Literal[False] = False,
) -> list[int]: ...
@overload
def write_shards(
    shards: Sequence[_Shard],
    *,
    fsync: bool = False,
    checksums: Literal[True],
) -> list[tuple[int, str]]: ...
def sha256_files(paths: Sequence[str | PathLike[str]]) -> list[str]: ...
def exchange_paths(a: str | PathLike[str], b: str | PathLike[str]) -> bool: ...
def fsync_dir(path: str | PathLike[str]) -> None: ...
def write_bytes_atomic(path: str | PathLike[str], data: bytes, *, fsync: bool = False) -> None: ...
def plan_shards(
    sizes: Sequence[int], groups: Sequence[int | None], max_shard_size: int
) -> tuple[list[list[int]], int]: ...
def shard_file_names(weights_name: str, variant: str | None, count: int) -> list[str]: ...
def index_file_name(weights_name: str, variant: str | None) -> str: ...
def add_variant(add_variant_name: str, variant: str | None) -> str: ...
def is_shard_name(file_name: str, weights_name: str, variant: str | None) -> bool: ...
def is_temp_name(file_name: str) -> bool: ...
def temp_path(path: str | PathLike[str]) -> str: ...
def parse_size(text: str) -> int: ...
def dtype_nbytes(dtype: str, shape: Sequence[int]) -> int: ...
def read_header(path: str | PathLike[str]) -> Header: ...

@final
class MappedFile:
    def __new__(cls, path: str | PathLike[str]) -> MappedFile: ...
    @property
    def header(self) -> Header: ...
    @property
    def path(self) -> str: ...
    def __len__(self) -> int: ...
    def release(self, start: int, end: int) -> None: ...
    if sys.version_info >= (3, 12):
        def __buffer__(self, flags: int, /) -> memoryview: ...
        def __release_buffer__(self, buffer: memoryview, /) -> None: ...
    else:
        # Before 3.12 the buffer protocol is a C slot with no ``__buffer__`` method; declared so
        # that type checkers accept a MappedFile where a buffer is expected (``memoryview(...)``).
        @type_check_only
        def __buffer__(self, flags: int, /) -> memoryview: ...

@final
class StreamWriter:
    def __new__(
        cls,
        path: str | PathLike[str],
        tensors: list[tuple[str, str, list[int]]],
        metadata: dict[str, str] | None = None,
        *,
        shared: bool = False,
    ) -> StreamWriter: ...
    @staticmethod
    def attach(
        path: str | PathLike[str],
        temp: str | PathLike[str],
        tensors: list[tuple[str, str, list[int]]],
        metadata: dict[str, str] | None = None,
    ) -> StreamWriter: ...
    @property
    def temp_path(self) -> Path | None: ...
    def write(self, name: str, data: Any) -> None: ...
    def missing(self) -> list[str]: ...
    def finish(self, *, fsync: bool = False) -> int: ...
    def abort(self) -> None: ...

def quantize_4bit(input: Any, dtype: str, packed: Any, absmax: Any, blocksize: int, quant_type: str) -> None: ...
def dequantize_4bit(packed: Any, absmax: Any, out: Any, out_dtype: str, blocksize: int, quant_type: str) -> None: ...
def quantize_dynamic(values: Any, offset: float, blocksize: int) -> tuple[bytes, bytes]: ...
def dequantize_dynamic(codes: Any, absmax: Any, offset: float, blocksize: int) -> bytes: ...
def dynamic_map() -> bytes: ...
def code_4bit(quant_type: str) -> bytes: ...
def quantize_int8_rows(input: Any, rows: int, cols: int, q: Any, scb: Any) -> None: ...

_ConvertShard = tuple[str | PathLike[str], Sequence[tuple[str, str, Sequence[int]]], dict[str, str] | None]

@final
class ConvertOp:
    """One tensor group a ``Conversion`` produces; built only by the static constructors.
    ``file`` indexes the conversion's sources, ``shard`` its shards; ``name`` is a source
    tensor, the other names are tensors of that shard. ``cast`` (``"F32"``, ``"BF16"`` or
    ``"F16"``) reads the source as that dtype, rounded as torch's ``.to(dtype)``;
    ``transposed`` (quantizing ops) reads a 2-D source as its transpose (a ``Conv1D`` weight)."""

    @staticmethod
    def copy(*, file: int, name: str, shard: int, target: str, cast: str | None = None) -> ConvertOp: ...
    @staticmethod
    def bytes(*, data: builtins.bytes, shard: int, target: str) -> ConvertOp: ...
    @staticmethod
    def quant4(
        *,
        file: int,
        name: str,
        quant_type: Literal["nf4", "fp4"],
        blocksize: int,
        shard: int,
        packed: str,
        absmax: str,
        nested: tuple[float, str] | None = None,
        cast: str | None = None,
        transposed: bool = False,
    ) -> ConvertOp: ...
    @staticmethod
    def int8(
        *,
        file: int,
        name: str,
        rows: int,
        cols: int,
        shard: int,
        weight: str,
        scb: str,
        cast: str | None = None,
        transposed: bool = False,
    ) -> ConvertOp: ...
    @property
    def kind(self) -> Literal["copy", "bytes", "quant4", "int8"]: ...

@final
class Conversion:
    """A streaming conversion of ``sources`` into ``shards``, one ``ConvertOp`` per produced
    tensor group."""

    def __new__(
        cls,
        sources: Sequence[str | PathLike[str]],
        shards: Sequence[_ConvertShard],
        ops: Sequence[ConvertOp],
        chunk_elems: int = ...,  # 4194304 (1 << 22)
        fsync: bool = False,
        temps: Sequence[str | PathLike[str]] | None = None,
    ) -> Conversion: ...
    def run(self) -> list[int]: ...
    def progress(self) -> int: ...

# chunk_elems defaults to 4194304 (1 << 22); the runtime signature shows the default as ``...``.
def absmax_4bit(
    path: str | PathLike[str],
    name: str,
    blocksize: int = 64,
    chunk_elems: int = ...,
    cast: str | None = None,
    transposed: bool = False,
) -> bytes: ...
