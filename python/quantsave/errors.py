"""The package's exceptions. ``CheckpointError`` and ``NotSerializableError`` subclass ``ValueError``
so callers can catch the builtin; ``DistributedError`` (a rank failed or stopped answering) is a
``RuntimeError``."""

from __future__ import annotations

import json
from typing import Any

from quantsave._core import CheckpointError

__all__ = ["CheckpointError", "DistributedError", "NotSerializableError", "json_object"]


class NotSerializableError(ValueError):
    """The model's quantization backend cannot be written to a checkpoint (nothing was written)."""


class DistributedError(RuntimeError):
    """A save or convert across ranks failed on another rank (named in the message), the ranks
    disagreed, or a rank stopped answering within the timeout; nothing was committed."""


def json_object(text: str | bytes, what: str) -> dict[str, Any]:
    """``text`` (bytes: strict UTF-8, as the references read JSON files) parsed as a JSON object.

    Raises:
        CheckpointError: ``"<what> is not valid JSON: ..."`` (bad UTF-8 or JSON, an over-long
            integer, deep nesting) or ``"<what> is not a JSON object"``.
    """
    try:
        data = json.loads(text.decode("utf-8") if isinstance(text, bytes) else text)
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{what} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} is not a JSON object")
    return data
