"""The package's exceptions. Both subclass ``ValueError`` so callers can catch the builtin."""

from __future__ import annotations

from quantsave._core import CheckpointError

__all__ = ["CheckpointError", "NotSerializableError"]


class NotSerializableError(ValueError):
    """The model's quantization backend cannot be written to a checkpoint (nothing was written)."""
