"""Quantizer classes, one per backend, found through a registry keyed by ``quant_method``."""

from __future__ import annotations

from quantsave.quantizers.base import Quantizer
from quantsave.quantizers.registry import detect_quantizer, get_quantizer, registered_methods

__all__ = ["Quantizer", "detect_quantizer", "get_quantizer", "registered_methods"]
