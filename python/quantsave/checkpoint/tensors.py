"""Tensor plumbing between torch and the Rust core: dtype names, byte views of tensors for
writing (no copies for contiguous CPU tensors), and tensors viewing mapped files for reading."""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "DTYPE_TO_NAME",
    "NAME_TO_DTYPE",
    "byte_view",
    "dtype_name",
    "is_wrapper_subclass",
    "subclass_nbytes",
    "tensor_from_map",
]

_PAIRS: list[tuple[str, str]] = [
    ("bool", "BOOL"),
    ("uint8", "U8"),
    ("int8", "I8"),
    ("float8_e5m2", "F8_E5M2"),
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e8m0fnu", "F8_E8M0"),
    ("int16", "I16"),
    ("uint16", "U16"),
    ("float16", "F16"),
    ("bfloat16", "BF16"),
    ("int32", "I32"),
    ("uint32", "U32"),
    ("float32", "F32"),
    ("complex64", "C64"),
    ("float64", "F64"),
    ("int64", "I64"),
    ("uint64", "U64"),
]

DTYPE_TO_NAME: dict[torch.dtype, str] = {
    getattr(torch, t): n for t, n in _PAIRS if isinstance(getattr(torch, t, None), torch.dtype)
}
NAME_TO_DTYPE: dict[str, torch.dtype] = {n: t for t, n in DTYPE_TO_NAME.items()}


def is_wrapper_subclass(t: torch.Tensor) -> bool:
    """True for a tensor subclass made of inner tensors (torchao's quantized tensors), which
    has no storage of its own."""
    return type(t) not in (torch.Tensor, torch.nn.Parameter) and callable(getattr(t, "__tensor_flatten__", None))


def subclass_nbytes(t: torch.Tensor) -> int:
    """Bytes of the inner tensors of a wrapper subclass (recursively)."""
    names, _ = t.__tensor_flatten__()  # type: ignore[attr-defined]
    total = 0
    for name in names:
        inner = getattr(t, name)
        total += subclass_nbytes(inner) if is_wrapper_subclass(inner) else inner.numel() * inner.element_size()
    return total


def dtype_name(dtype: torch.dtype, name: str = "tensor") -> str:
    """The safetensors name of ``dtype``.

    Raises:
        ValueError: safetensors cannot store this dtype.
    """
    try:
        return DTYPE_TO_NAME[dtype]
    except KeyError:
        raise ValueError(
            f"{name}: dtype {dtype} cannot be stored in safetensors; supported: "
            f"{', '.join(str(d).split('.')[1] for d in DTYPE_TO_NAME)}"
        ) from None


def byte_view(tensor: torch.Tensor) -> Any:
    """A uint8 buffer over ``tensor``'s bytes: a view for contiguous CPU tensors, otherwise a
    contiguous CPU copy of that one tensor."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    if not t.is_contiguous():
        t = t.contiguous()
    if type(t) is not torch.Tensor:
        t = t.as_subclass(torch.Tensor)
    return t.reshape(-1).view(torch.uint8).numpy()


def tensor_from_map(base: torch.Tensor, dtype: str, shape: list[int], start: int, end: int) -> torch.Tensor:
    """A tensor viewing bytes ``start:end`` of ``base`` (a uint8 tensor over a mapped file).

    Copies only when the data is not aligned for its dtype.
    """
    raw = base[start:end]
    dt = NAME_TO_DTYPE.get(dtype)
    if dt is None:
        raise ValueError(f"dtype {dtype} has no torch equivalent in this torch version")
    if dt.itemsize > 1 and start % dt.itemsize:
        raw = raw.clone()
    return raw.view(dt).reshape(shape)
