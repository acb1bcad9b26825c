"""Streaming conversion of float checkpoints into pre-quantized ones (``quantsave.convert``)."""

from __future__ import annotations

from quantsave.convert.run import convert

__all__ = ["convert"]
