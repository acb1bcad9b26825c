"""GGUF: recognized so it can be refused. The Hugging Face format has no place for the
per-tensor GGML type, which lives only in memory, so a save would lose it; ``quantsave.backends.gguf.file``
exports such a model as a ``.gguf`` file instead."""

from __future__ import annotations

from torch import nn

from quantsave.backends.gguf.config import GGUFQuantizationConfig
from quantsave.backends.quantizer import Quantizer

__all__ = ["GGUFQuantizer"]


class GGUFQuantizer(Quantizer):
    quant_method = "gguf"
    config_cls = GGUFQuantizationConfig
    is_serializable = False
    supports_safetensors = False
    not_serializable_reason = (
        "each GGUF tensor's GGML quantization type lives only in memory (on the GGUFParameter), "
        "so a safetensors checkpoint cannot record it and could not be loaded back; "
        "export it with quantsave.save_gguf(model, 'model.gguf') instead, which writes a .gguf file "
        "keeping every tensor's GGML type (load it with quantsave.load_gguf, or diffusers' "
        "from_single_file(..., config=<folder>, quantization_config=GGUFQuantizationConfig(...))), "
        "or quantize the model with bitsandbytes, torchao or optimum-quanto before saving"
    )

    @classmethod
    def detect(cls, model: nn.Module) -> bool:
        for p in model.parameters():
            if type(p).__name__ == "GGUFParameter" or (hasattr(p, "quant_type") and "gguf" in type(p).__module__):
                return True
        return False

    @classmethod
    def config_from_model(cls, model: nn.Module) -> GGUFQuantizationConfig:
        return GGUFQuantizationConfig()
