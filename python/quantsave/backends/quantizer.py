"""The quantizer interface: what a backend must say about itself (``is_serializable``,
``supports_safetensors``), which tensors form one weight, the config of a model, how to
rebuild its quantized modules on load, and what ``verify`` and ``inspect`` ask of its on-disk
layout (``check_checkpoint``, ``count_parameters``, ``needs_config``; each backend answers from
its ``layout.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from quantsave.backends.config import QuantizationConfig
from quantsave.backends.layout import ParameterCount

if TYPE_CHECKING:
    from quantsave.checkpoint.reader import Checkpoint
    from quantsave.families import Family

__all__ = ["Quantizer"]


class Quantizer:
    """One backend. Subclasses register by setting ``quant_method``."""

    quant_method: ClassVar[str] = ""
    config_cls: ClassVar[type[QuantizationConfig]] = QuantizationConfig
    is_serializable: ClassVar[bool] = True
    #: Why the backend cannot be saved, when ``is_serializable`` is False.
    not_serializable_reason: ClassVar[str] = ""

    def __init__(self, config: QuantizationConfig) -> None:
        # A config of this method held in another form (a plain dict config, another class)
        # becomes this backend's config class, which validates it.
        if self.config_cls is not QuantizationConfig and not isinstance(config, self.config_cls):
            config = self.config_cls.from_dict(config.to_dict())
        self.config = config
        #: Model state-dict keys that ``load_into`` installed under names absent from the files.
        self.loaded_keys: set[str] = set()

    @property
    def supports_safetensors(self) -> bool:
        """False when the backend can only be saved in the pickle form (a subclass may set a
        class attribute, or compute it from the installed library)."""
        return True

    @property
    def safetensors_unsupported_reason(self) -> str:
        """Why it cannot be saved as safetensors, when ``supports_safetensors`` is False."""
        return ""

    @classmethod
    def detect(cls, model: nn.Module) -> bool:
        """True when ``model`` holds modules quantized by this backend."""
        return False

    @classmethod
    def config_from_model(cls, model: nn.Module) -> QuantizationConfig:
        """The config describing an already-quantized ``model``."""
        raise ValueError(f"cannot infer a {cls.quant_method} config from the model; pass quantization_config")

    def state_dict(self, model: nn.Module, family: Family) -> dict[str, torch.Tensor]:
        """The plain tensors to save as safetensors, in the order the reference writes them.

        Called once per save, before ``header_metadata``, ``index_metadata`` and ``weight_groups``
        (a quantizer may keep what it learns here for those)."""
        return dict(model.state_dict())

    def pickle_state_dict(self, model: nn.Module, family: Family) -> dict[str, torch.Tensor]:
        """The tensors to save with ``safe_serialization=False`` (may hold tensor subclasses)."""
        return self.state_dict(model, family)

    def header_metadata(self, state_dict: dict[str, torch.Tensor]) -> dict[str, str]:
        """Extra safetensors header metadata for every shard."""
        return {}

    def index_metadata(self, family: Family) -> dict[str, Any]:
        """Extra entries for the ``metadata`` object of a sharded checkpoint's index."""
        return {}

    def config_dict(self, family: Family) -> dict[str, Any]:
        """The ``quantization_config`` written in ``config.json`` for a model of ``family``."""
        return self.config.to_dict()

    def extra_files(self, model: nn.Module, family: Family) -> dict[str, str]:
        """Extra text files (name -> content) written beside the weights."""
        return {}

    def weight_groups(self, keys: list[str]) -> dict[str, str]:
        """Maps each key that belongs to a multi-tensor quantized weight to its group name."""
        return {}

    @classmethod
    def count_parameters(cls, ckpt: Checkpoint, qconfig: dict[str, Any] | None) -> ParameterCount:
        """The logical parameters of the weights in ``ckpt`` stored in this backend's layout
        (``qconfig``: the checkpoint's raw ``quantization_config``, maybe another method's or none).
        ``inspect`` adds up every backend's answer."""
        return ParameterCount()

    @classmethod
    def needs_config(cls, ckpt: Checkpoint) -> bool:
        """True when ``ckpt`` holds tensors in this backend's layout that no loader reads without a
        ``quantization_config`` (``verify`` reports such a checkpoint that has none)."""
        return False

    def check_checkpoint(self, ckpt: Checkpoint) -> list[str]:
        """Problems with ``ckpt``'s tensors for this quantizer's config, one line each (``verify``)."""
        return []

    def load_into(
        self, model: nn.Module, state_dict: dict[str, torch.Tensor], metadata: dict[str, str], directory: Path
    ) -> dict[str, torch.Tensor]:
        """Swaps in quantized modules built from ``state_dict`` (``metadata``: the shards' merged
        header metadata; ``directory``: the checkpoint folder); returns the tensors left to load
        as they are. Problems with the checkpoint raise ``CheckpointError``."""
        return state_dict

    def describe(self) -> dict[str, Any]:
        return {"quant_method": self.quant_method}
