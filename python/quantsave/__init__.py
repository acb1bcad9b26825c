"""quantsave: save quantized PyTorch models as Hugging Face compatible checkpoints, and load them back."""

from __future__ import annotations

from quantsave._core import __version__
from quantsave.api import load_quantized, load_state_dict, save_quantized
from quantsave.backends import (
    BitsAndBytesConfig,
    GGUFQuantizationConfig,
    QuantizationConfig,
    QuantoConfig,
    TorchAoConfig,
)
from quantsave.backends.gguf.file import load_gguf, save_gguf
from quantsave.checkpoint.writer import SaveResult
from quantsave.convert.run import convert
from quantsave.errors import CheckpointError, DistributedError, NotSerializableError
from quantsave.quantize import quantize

__all__ = [
    "BitsAndBytesConfig",
    "CheckpointError",
    "DistributedError",
    "GGUFQuantizationConfig",
    "NotSerializableError",
    "QuantizationConfig",
    "QuantoConfig",
    "SaveResult",
    "TorchAoConfig",
    "__version__",
    "convert",
    "load_gguf",
    "load_quantized",
    "load_state_dict",
    "quantize",
    "save_gguf",
    "save_quantized",
]
