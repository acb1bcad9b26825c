"""Tensor plumbing between torch and the Rust core: dtype names, byte views of tensors for
writing (no copies for contiguous CPU tensors), and tensors viewing mapped files for reading."""

from __future__ import annotations

import itertools
from typing import Any

import torch

__all__ = [
    "DTYPE_TO_NAME",
    "NAME_TO_DTYPE",
    "byte_view",
    "check_tensors",
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


def check_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, str]:
    """Validates every tensor before anything is written; returns their safetensors dtype names
    (empty for a tensor subclass, which only the pickle form stores).

    Raises:
        ValueError: a non-tensor, a meta or sparse tensor, an unsupported dtype, or tensors sharing memory.
    """
    names: dict[str, str] = {}
    spans: dict[Any, list[tuple[int, int, str]]] = {}
    for key, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{key!r} is a {type(t).__name__}, not a tensor")
        if t.is_meta or t.device.type == "meta":
            raise ValueError(f"tensor {key!r} is on the meta device and has no data to save; load its weights first")
        if t.layout != torch.strided:
            raise ValueError(
                f"tensor {key!r} has layout {t.layout}; convert sparse tensors with .to_dense() before saving"
            )
        if is_wrapper_subclass(t):
            # A tensor subclass (torchao) in the pickle form: torch.save stores its parts.
            names[key] = ""
            continue
        names[key] = dtype_name(t.dtype, f"tensor {key!r}")
        if t.numel():
            storage = t.untyped_storage()
            start = int(t.storage_offset()) * t.element_size()
            end = start + _span_bytes(t)
            spans.setdefault((t.device, storage.data_ptr()), []).append((start, end, key))
    for group in spans.values():
        group.sort()
        for (_s0, e0, k0), (s1, _e1, k1) in itertools.pairwise(group):
            if s1 < e0:
                raise ValueError(
                    f"tensors {k0!r} and {k1!r} share memory; safetensors stores each tensor once. "
                    "Untie them (e.g. clone one) or drop one before saving"
                )
    return names


def _span_bytes(t: torch.Tensor) -> int:
    if t.numel() == 0:
        return 0
    last = sum((s - 1) * st for s, st in zip(t.shape, t.stride(), strict=True))
    return (last + 1) * t.element_size()
