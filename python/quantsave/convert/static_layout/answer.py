"""The answer for one architecture: the checks that make the reading unsure up front, the skips
(``llm_int8_skip_modules`` or transformers' defaults, each sure or maybe), the nn.Linear weights
the walk of the checkpoint's keys finds, and the targets, which must not depend on a maybe skip."""

from __future__ import annotations

import re

from quantsave.convert.static_layout.interpret import Interpreter
from quantsave.convert.static_layout.keys import Walk, checkpoint_names, refuse_converted, renamings, walk
from quantsave.convert.static_layout.skips import fp32, output_embeddings, submodels, tie_effective, tied_names
from quantsave.convert.static_layout.source import Arch, literal
from quantsave.convert.static_layout.unsure import Unsure
from quantsave.quantize import transformers_should_convert

__all__ = ["answer"]

_FLOAT_DTYPES = {"F32", "F16", "BF16"}


def answer(
    interp: Interpreter, arch: Arch, tensors: dict[str, tuple[str, list[int]]], skip_modules: list[str] | None
) -> list[str]:
    """The sorted names of the nn.Linear modules ``bnb_targets`` quantizes; raises Unsure."""
    _check_architecture(interp, arch)
    names = checkpoint_names(tensors, renamings(arch))
    _check_init(interp, arch)
    sub_tied, fp32_direct, fp32_deep = submodels(interp, arch.ref, "", names)
    definite = (set(skip_modules) if skip_modules is not None else set()) | fp32(interp.classes, arch.ref) | fp32_direct
    maybe = set(fp32_deep)
    if skip_modules is None:
        sure_skips, maybe_skips, found = _default_skips(interp, arch, names, sub_tied)
        definite |= sure_skips
        maybe |= maybe_skips
    else:
        found = walk(interp, arch, names)
    refuse_converted(interp, arch)
    linear = _linear(found, tensors)
    try:
        low = [n for n in linear if transformers_should_convert(n, sorted(definite | maybe))]
        high = [n for n in linear if transformers_should_convert(n, sorted(definite))]
    except re.error as e:
        raise Unsure(f"a skip pattern is not a regex: {e}") from e
    if low != high:
        raise Unsure(f"an uncertain skip decides {sorted(set(high) - set(low))[:3]}")
    return sorted(high)


def _check_architecture(interp: Interpreter, arch: Arch) -> None:
    """The architecture class must be a PreTrainedModel of the model_type's modeling file."""
    src = interp.classes.source(arch.module)
    if src is None:
        raise Unsure(f"no modeling file for model_type {arch.model_type!r}")
    if arch.name not in src.classes:
        raise Unsure(f"{arch.name} is not defined in {arch.module}")
    if any(d.endswith("pytorch_utils.Conv1D") for d in src.aliases.values()):
        raise Unsure("the model uses GPT-2 style Conv1D layers")
    if not interp.classes.is_pretrained(arch.ref):
        raise Unsure(f"{arch.name} is not a PreTrainedModel")


def _check_init(interp: Interpreter, arch: Arch) -> None:
    """The skips and keys must come from class attributes the reading understands."""
    lay = interp.layout(arch.ref)
    for attr in ("_tied_weights_keys", "all_tied_weights_keys", "_keep_in_fp32_modules"):
        if attr in lay.attrs:
            raise Unsure(f"{arch.name}.__init__ sets {attr}")
    for attr in ("_keys_to_ignore_on_save", "_checkpoint_conversion_mapping"):
        if (value := interp.classes.class_attr(arch.ref, attr)) is not None and literal(value):
            raise Unsure(f"{arch.name}.{attr}: the checkpoint's keys differ from the model's")
    value = interp.classes.class_attr(arch.ref, "_keep_in_fp32_modules_strict")
    if value is not None and literal(value):
        raise Unsure(f"{arch.name}._keep_in_fp32_modules_strict: quantize-on-load upcasts those to float32")


def _default_skips(
    interp: Interpreter, arch: Arch, names: set[str], sub_tied: set[str]
) -> tuple[set[str], set[str], Walk]:
    """transformers' skips when ``llm_int8_skip_modules`` is None, sure and maybe: the tied
    weights, the output embeddings and the module of the last parameter; and the walk of the
    model's parameters (``names`` plus the tied ones save_pretrained surely left out)."""
    definite: set[str] = set()
    maybe: set[str] = set()
    # save_pretrained leaves tied parameters out of the checkpoint; the model has them
    # (untied while bnb_targets reads it: transformers builds it under no_tie_weights).
    tie = tie_effective(arch)
    own_tied = tied_names(interp.classes, arch.ref, "", names)
    if tie is not False:
        (definite if tie else maybe).update(n.removesuffix(".weight") for n in own_tied)
    maybe |= {n.removesuffix(".weight") for n in sub_tied}
    output, output_sure = output_embeddings(interp, arch.ref)
    if output is not None:
        (definite if output_sure else maybe).add(output)
    sure_virtual = own_tied - names if tie else set()
    maybe_virtual = ((own_tied if tie is None else set()) | sub_tied) - names - sure_virtual
    other = walk(interp, arch, names | sure_virtual | maybe_virtual) if maybe_virtual else None
    found = walk(interp, arch, names | sure_virtual)
    lasts = found.lasts | (other.lasts if other is not None else set())
    if not (found.sure and (other is None or other.sure)):
        raise Unsure("cannot tell the model's last parameter")
    (definite if len(lasts) == 1 else maybe).update(c.removesuffix(".weight") for c in lasts)
    return definite, maybe, found


def _linear(found: Walk, tensors: dict[str, tuple[str, list[int]]]) -> list[str]:
    """The modules whose checkpoint key is an nn.Linear weight (a float matrix)."""
    linear = []
    for name, kind in found.kinds.items():
        if kind == "linear" and name in tensors:  # a renamed or left-out weight has no key to list
            dtype, shape = tensors[name]
            if dtype not in _FLOAT_DTYPES or len(shape) != 2:
                raise Unsure(f"{name!r} is a {dtype} tensor of shape {shape}, not a float matrix")
            linear.append(name.removesuffix(".weight"))
    return linear
