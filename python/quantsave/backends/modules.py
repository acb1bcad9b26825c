"""Module replacement shared by every backend: find the Linear a checkpoint names, and swap a
quantized module in its place (keeping the replaced module's train/eval mode)."""

from __future__ import annotations

from torch import nn

from quantsave.errors import CheckpointError

__all__ = ["linear_at", "replace_module"]


def linear_at(model: nn.Module, name: str, *, not_linear: str = ", not Linear") -> nn.Linear:
    """The ``nn.Linear`` at ``name`` in ``model``, which a checkpoint quantizes.

    Raises:
        CheckpointError: no module there, or one that is not a Linear (``not_linear`` ends the
            message).
    """
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise CheckpointError(f"checkpoint has quantized weight {name!r} but the model has no such module") from None
    if not isinstance(module, nn.Linear):
        raise CheckpointError(
            f"checkpoint quantizes {name!r} but the model's module there is {type(module).__name__}{not_linear}"
        )
    return module


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Puts ``new`` at ``name`` in ``model``, in the train/eval mode of the module it replaces (an
    eval model stays in eval mode: bitsandbytes' CPU layers compute differently in each)."""
    parent, _, leaf = name.rpartition(".")
    holder = model.get_submodule(parent) if parent else model
    new.train(getattr(holder, leaf).training)
    setattr(holder, leaf, new)
