"""What every backend's ``layout.py`` shares: ``ParameterCount`` (how one layout counts the
logical parameters of a checkpoint's quantized weights, for ``quantsave inspect``) and the small
readers the layouts use on a ``Checkpoint``. Each backend draws its own layout in its
``layout.py``; this module knows none of them."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from quantsave.checkpoint.reader import Checkpoint

__all__ = ["ParameterCount", "json_tensor", "numel"]


@dataclass
class ParameterCount:
    """The quantized weights one layout found in a checkpoint, and how it counted them."""

    #: Tensor key -> the logical parameters that tensor stands for (its unpacked elements).
    counted: dict[str, int] = field(default_factory=dict)
    #: Keys that hold no parameters of their own (absmax, maps, scales, quant state).
    helpers: set[str] = field(default_factory=set)
    #: The float dtype the quantization metadata names (``"bfloat16"``), if any.
    float_dtype: str | None = None
    #: One line per kind of weight counted (``"bitsandbytes 8-bit: int8 elements"``).
    how: set[str] = field(default_factory=set)

    def merge(self, other: ParameterCount) -> None:
        """Adds what another layout found (the first float dtype named wins)."""
        self.counted.update(other.counted)
        self.helpers |= other.helpers
        self.float_dtype = self.float_dtype or other.float_dtype
        self.how |= other.how

    def total(self, shapes: dict[str, list[int]]) -> int:
        """Every logical parameter: the counted weights plus the elements of every tensor in
        ``shapes`` that is neither counted nor a helper."""
        plain = sum(numel(s) for k, s in shapes.items() if k not in self.helpers and k not in self.counted)
        return sum(self.counted.values()) + plain


def numel(shape: Iterable[int]) -> int:
    """The element count of ``shape`` (1 for a scalar)."""
    return math.prod(int(s) for s in shape)


def json_tensor(ckpt: Checkpoint, name: str) -> Any:
    """The JSON a uint8 tensor of ``ckpt`` holds, or None when it is not valid UTF-8 JSON."""
    try:
        return json.loads(ckpt.read_bytes(name).decode("utf-8"))
    except (OSError, ValueError, RecursionError):  # bad UTF-8 or JSON, huge integers, deep nesting
        return None
