"""What "unsure" means for the static reading: ``Unsure`` (raised with the reason wherever the
reading cannot settle the answer) and ``UNSURE_ERRORS``, the exceptions the reading may
legitimately hit on source it cannot follow. Anything else is a bug of the reading."""

from __future__ import annotations

__all__ = ["UNSURE_ERRORS", "Unsure"]


class Unsure(Exception):
    """The static reading cannot settle the answer (the message says why)."""


UNSURE_ERRORS: tuple[type[Exception], ...] = (
    Unsure,
    SyntaxError,  # ast.parse of a transformers source file (syntax newer than this Python, null bytes)
    OSError,  # stat or read of a source file: absent (an older transformers), unreadable, replaced meanwhile
    UnicodeDecodeError,  # a source file that is not UTF-8
    RecursionError,  # deeply nested source (ast.parse, the recursive visitors) or checkpoint keys
)
