"""Module replacement shared by every backend: find the Linear a checkpoint names (a GPT-2 style
``Conv1D`` seen as the Linear it stands for), and swap a quantized module in its place (keeping
the replaced module's train/eval mode)."""

from __future__ import annotations

import torch
from torch import nn

from quantsave.errors import CheckpointError

__all__ = ["as_linear", "is_conv1d", "linear_at", "plain_type", "replace_module"]


def plain_type(module: nn.Module) -> type:
    """The module's class, seen through the class FSDP2's ``fully_shard`` makes for it
    (``FSDPLinear``, a subclass of ``FSDPModule`` and ``nn.Linear``)."""
    cls = type(module)
    bases = cls.__bases__
    if len(bases) == 2 and bases[0].__name__ == "FSDPModule" and cls.__name__ == "FSDP" + bases[1].__name__:
        return bases[1]
    return cls


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' GPT-2 style ``Conv1D`` (a Linear with its weight stored ``[in, out]``)."""
    return any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers") for c in type(module).__mro__)


def as_linear(module: nn.Module) -> nn.Linear:
    """``module`` as an ``nn.Linear``: itself, or for a ``Conv1D`` a Linear viewing its weight
    transposed (``[out, in]``, no copy) and its bias, as transformers' bitsandbytes integration
    quantizes it."""
    if not is_conv1d(module):
        return module  # type: ignore[return-value]
    weight: torch.Tensor = module.weight  # type: ignore[assignment]
    bias: torch.Tensor | None = module.bias  # type: ignore[assignment]
    view = nn.Linear(1, 1, bias=False, device="meta")
    view.in_features, view.out_features = int(weight.shape[0]), int(weight.shape[1])
    view.weight = nn.Parameter(weight.detach().T, requires_grad=False)
    if bias is not None:
        view.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return view


def linear_at(model: nn.Module, name: str, *, not_linear: str = ", not Linear") -> nn.Linear:
    """The ``nn.Linear`` at ``name`` in ``model``, which a checkpoint quantizes (a ``Conv1D``
    there is seen through ``as_linear``).

    Raises:
        CheckpointError: no module there, or one that is not a Linear (``not_linear`` ends the
            message).
    """
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise CheckpointError(f"checkpoint has quantized weight {name!r} but the model has no such module") from None
    if not isinstance(module, nn.Linear) and not is_conv1d(module):
        raise CheckpointError(
            f"checkpoint quantizes {name!r} but the model's module there is {type(module).__name__}{not_linear}"
        )
    return as_linear(module)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Puts ``new`` at ``name`` in ``model``, in the train/eval mode of the module it replaces (an
    eval model stays in eval mode: bitsandbytes' CPU layers compute differently in each)."""
    parent, _, leaf = name.rpartition(".")
    holder = model.get_submodule(parent) if parent else model
    new.train(getattr(holder, leaf).training)
    setattr(holder, leaf, new)
