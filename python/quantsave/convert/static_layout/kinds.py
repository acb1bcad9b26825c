"""The abstract values the static reading gives attributes (``Sym``) and the table of torch.nn
layers whose parameters and buffers it knows. Shared by every step; depends on nothing."""

from __future__ import annotations

from typing import Any

__all__ = ["BUFFER", "LINEAR", "NONE", "PARAM", "TORCH", "UNKNOWN", "Sym"]

# Abstract values of ``self.<attr> = <expr>``: a constructed module kind, or one of these.
UNKNOWN = ("unknown",)
NONE = ("none",)
LINEAR = ("linear",)
PARAM = ("param",)
BUFFER = ("buffer",)
# ("torch", name): a torch.nn layer from TORCH; ("class", module, name): a class transformers
# defines; ("list", per_index | None, every): an nn.ModuleList / nn.Sequential, where per_index
# holds a frozenset of kinds per known index and every the kinds at any index. In an MRO,
# ("ext", ...) stands for a base outside transformers' modeling files: ("ext", "Module"),
# ("ext", "torch", name), ("ext", "PreTrainedModel"), ("ext", "Mixin") or ("ext", "?") (unread).
Sym = tuple[Any, ...]  # any of these abstract values: a tag, then its fields

# torch.nn layers whose state is known: (parameters in registration order, buffers).
TORCH: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "Linear": (("weight", "bias"), ()),
    "Embedding": (("weight",), ()),
    "EmbeddingBag": (("weight",), ()),
    "LayerNorm": (("weight", "bias"), ()),
    "RMSNorm": (("weight",), ()),
    "GroupNorm": (("weight", "bias"), ()),
    "PReLU": (("weight",), ()),
    **{f"Conv{d}": (("weight", "bias"), ()) for d in ("1d", "2d", "3d", "Transpose1d", "Transpose2d", "Transpose3d")},
    **{
        f"BatchNorm{d}": (("weight", "bias"), ("running_mean", "running_var", "num_batches_tracked"))
        for d in ("1d", "2d", "3d")
    },
}
