"""transformers' classes as its modeling source defines them: finding a class by dotted name, its
bases and MRO (C3, computed from the source), class attributes and methods. Only files under
``transformers/models/*/modeling_*.py`` and ``transformers/modeling_layers.py`` are read."""

from __future__ import annotations

import ast
from pathlib import Path

from quantsave.convert.static_layout.kinds import TORCH, Sym
from quantsave.convert.static_layout.source import Source, assigned_names, dotted, parse_source
from quantsave.convert.static_layout.unsure import Unsure

__all__ = ["MODULE", "UNREAD", "ClassIndex"]

UNREAD = ("ext", "?")  # a base (or decorator) this reading does not follow
MODULE = ("torch.nn.Module", "torch.nn.modules.module.Module")  # the dotted names of nn.Module
# Class decorators that leave the class's layout alone.
_DECORATORS = {"auto_docstring", "use_kernel_forward_from_hub", "use_kernelized_func", "use_experts_implementation"}


class ClassIndex:
    """The classes of the transformers package at ``root`` (MROs cached)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._mros: dict[Sym, list[Sym]] = {}

    def source(self, module: str) -> Source | None:
        """The parsed file of ``module``; None outside the modeling files or when absent."""
        parts = module.split(".")
        if module != "transformers.modeling_layers" and not (
            len(parts) == 4 and parts[:2] == ["transformers", "models"] and parts[3].startswith("modeling_")
        ):
            return None
        path = self.root.joinpath(*parts[1:-1], parts[-1] + ".py")
        if not path.is_file():
            return None
        return parse_source(path, module)

    def ref(self, name: str | None) -> Sym | None:
        """The class a dotted name refers to, when a modeling file defines it."""
        if not name:
            return None
        module, _, last = name.rpartition(".")
        src = self.source(module)
        return ("class", module, last) if src is not None and last in src.classes else None

    def cls(self, ref: Sym) -> tuple[Source, ast.ClassDef]:
        """The file and definition of class ``ref``."""
        src = self.source(ref[1])
        if src is None or ref[2] not in src.classes:
            raise Unsure(f"lost class {ref[2]}")
        return src, src.classes[ref[2]]

    def bases(self, ref: Sym) -> list[Sym]:
        """The bases of ``ref`` (an unreadable decorator counts as an unread base)."""
        src, node = self.cls(ref)
        out: list[Sym] = []
        for dec in node.decorator_list:
            d = dotted(src, dec.func if isinstance(dec, ast.Call) else dec)
            if d is None or d.rpartition(".")[2] not in _DECORATORS:
                out.append(UNREAD)
        for b in node.bases:
            d = dotted(src, b)
            last = (d or "").rpartition(".")[2]
            if (r := self.ref(d)) is not None:
                out.append(r)
            elif d in MODULE:
                out.append(("ext", "Module"))
            elif d and d.startswith("torch.nn.") and last in TORCH:
                out.append(("ext", "torch", last))
            elif d and d.startswith("transformers.modeling_utils.") and last == "PreTrainedModel":
                out.append(("ext", "PreTrainedModel"))
            elif d and d.startswith("transformers.generation") and last == "GenerationMixin":
                out.append(("ext", "Mixin"))
            else:
                out.append(UNREAD)
        return out

    def mro(self, ref: Sym, depth: int = 0) -> list[Sym]:
        """Python's C3 linearization of ``ref``."""
        if ref in self._mros:
            return self._mros[ref]
        if depth > 30:
            raise Unsure("class hierarchy too deep")
        bases = self.bases(ref)
        seqs = [list(self.mro(b, depth + 1)) if b[0] == "class" else [b] for b in bases] + [list(bases)]
        out = [ref]
        while any(seqs):
            for seq in seqs:
                head = seq[0] if seq else None
                if head is not None and not any(head in s[1:] for s in seqs):
                    break
            else:
                raise Unsure(f"no MRO for {ref[2]}")
            out.append(head)
            seqs = [s[1:] if s and s[0] == head else s for s in seqs]
        self._mros[ref] = out
        return out

    def class_attr(self, ref: Sym, name: str) -> ast.expr | None:
        """The value node of class attribute ``name`` (first in the MRO), None for transformers' default."""
        for e in self.mro(ref):
            if e == UNREAD:
                raise Unsure(f"{ref[2]} inherits from or is decorated by something unread")
            if e[0] != "class":
                continue
            src, node = self.cls(e)
            if e[2] in src.patched:
                raise Unsure(f"{e[2]} is patched at module level")
            for st in node.body:
                if isinstance(st, (ast.Assign, ast.AnnAssign)) and st.value is not None and name in assigned_names(st):
                    return st.value
        return None

    def method(self, ref: Sym, name: str, start: int = 0) -> tuple[int, ast.FunctionDef] | None:
        """Method ``name`` of ``ref`` looked up from MRO entry ``start``: (its MRO index, its definition)."""
        mro = self.mro(ref)
        for i in range(start, len(mro)):
            e = mro[i]
            if e == UNREAD:
                raise Unsure(f"{name} of {ref[2]} may come from an unread base")
            if e[0] == "class":
                for st in self.cls(e)[1].body:
                    if isinstance(st, ast.FunctionDef) and st.name == name:
                        return i, st
        return None

    def is_pretrained(self, ref: Sym) -> bool:
        """Whether ``ref`` is a ``PreTrainedModel``."""
        return ("ext", "PreTrainedModel") in self.mro(ref)
