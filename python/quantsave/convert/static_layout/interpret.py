"""Abstract execution of ``__init__``: the ``Layout`` of a class, i.e. the kinds each attribute
of an instance can hold and the order they are registered in, found by running the ``__init__``
methods of its MRO (and the ``self.<method>()`` calls they make) over both branches of every
``if``. Expressions are evaluated by ``values``; classes are looked up in a ``ClassIndex``."""

from __future__ import annotations

import ast
from dataclasses import dataclass, field

from quantsave.convert.static_layout.classes import MODULE, ClassIndex
from quantsave.convert.static_layout.kinds import BUFFER, NONE, PARAM, TORCH, UNKNOWN, Sym
from quantsave.convert.static_layout.source import Arch, dotted, is_none
from quantsave.convert.static_layout.unsure import Unsure
from quantsave.convert.static_layout.values import Frame, list_of, local_env, merge_list, value

__all__ = ["Interpreter", "Layout"]


@dataclass
class Layout:
    """The attributes an instance of one class can have."""

    attrs: dict[str, set[Sym]] = field(default_factory=dict)  # name -> the kinds it can hold
    pos: dict[str, list[int]] = field(default_factory=dict)  # name -> where it is registered (not None)
    appended: dict[str, set[Sym]] = field(default_factory=dict)  # list attribute -> kinds appended to it
    dynamic: bool = False  # registers attributes this reading cannot name
    counter: int = 0

    def add(self, name: str, types: set[Sym]) -> None:
        self.attrs.setdefault(name, set()).update(types)
        if types - {NONE}:
            self.pos.setdefault(name, []).append(self.counter)
        self.counter += 1


class Interpreter:
    """The layouts of the classes of one reading (each built once, on first use)."""

    def __init__(self, classes: ClassIndex, arch: Arch) -> None:
        self.classes, self.arch = classes, arch
        self._layouts: dict[Sym, Layout] = {}

    def layout(self, ref: Sym) -> Layout:
        """The layout of class ``ref``."""
        if ref not in self._layouts:
            lay = Layout()
            self._run_init(lay, ref, 0, 0)
            for name, extra in lay.appended.items():
                lay.attrs[name] = {merge_list(t, extra) for t in lay.attrs.get(name, {UNKNOWN})}
            self._layouts[ref] = lay
        return self._layouts[ref]

    def built(self) -> list[Sym]:
        """The classes whose layout this reading has used so far."""
        return list(self._layouts)

    def _run_init(self, lay: Layout, ref: Sym, start: int, depth: int) -> None:
        """Runs the first ``__init__`` of ``ref``'s MRO from entry ``start``."""
        mro = self.classes.mro(ref)
        for i in range(start, len(mro)):
            e = mro[i]
            if e[0] == "class":
                found = self.classes.method(ref, "__init__", i)
                if found is not None and found[0] == i:
                    self._run_method(lay, ref, i, found[1], depth)
                    return
            elif e[1] == "torch":
                params, buffers = TORCH[e[2]]
                for p in params:
                    lay.add(p, {PARAM})
                for b in buffers:
                    lay.add(b, {BUFFER})
                return
            elif e[1] in ("Module", "PreTrainedModel"):
                return
            elif e[1] != "Mixin":
                lay.dynamic = True
                return

    def _run_method(self, lay: Layout, ref: Sym, index: int, fn: ast.FunctionDef, depth: int) -> None:
        if depth > 8:
            raise Unsure("__init__ calls nest too deep")
        if not fn.args.args:
            raise Unsure(f"{fn.name} has no self")
        chain = self.classes.mro(ref)
        src = self.classes.cls(chain[index])[0]
        f = Frame(self.classes, self.arch, src, ref, chain, index, fn.args.args[0].arg, local_env(fn))
        self._run_block(fn.body, f, lay, depth)

    def _run_block(self, stmts: list[ast.stmt], f: Frame, lay: Layout, depth: int) -> None:
        for st in stmts:
            if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Pass)):
                continue
            if isinstance(st, (ast.If, ast.For, ast.While, ast.With, ast.Try)):
                for body in ("body", "orelse", "finalbody"):
                    self._run_block(getattr(st, body, []), f, lay, depth)
                for h in getattr(st, "handlers", []):
                    self._run_block(h.body, f, lay, depth)
                continue
            if isinstance(st, (ast.Match, ast.Delete)):
                lay.dynamic = True
                continue
            if isinstance(st, (ast.Assign, ast.AnnAssign)) and st.value is not None:
                for t in st.targets if isinstance(st, ast.Assign) else [st.target]:
                    self._assign(t, st.value, f, lay)
            elif isinstance(st, ast.AugAssign) and _self_attr(st.target, f.self_name):
                lay.dynamic = True
            for node in ast.walk(st):
                if isinstance(node, ast.Call):
                    self._call(node, f, lay, depth)

    def _assign(self, target: ast.expr, expr: ast.expr, f: Frame, lay: Layout) -> None:
        if (name := _self_attr(target, f.self_name)) is not None:
            lay.add(name, value(expr, f))
        elif isinstance(target, (ast.Tuple, ast.List)):
            for t in target.elts:
                if (name := _self_attr(t, f.self_name)) is not None:
                    lay.add(name, {UNKNOWN})
        elif isinstance(target, ast.Subscript) and (name := _self_attr(target.value, f.self_name)) is not None:
            lay.appended.setdefault(name, set()).update(value(expr, f))
        elif isinstance(target, ast.Attribute) and _root_name(target) == f.self_name:
            raise Unsure(f"{f.ref[2]}.__init__ assigns into a submodule")

    def _call(self, node: ast.Call, f: Frame, lay: Layout, depth: int) -> None:
        func, s = node.func, f.self_name
        if isinstance(func, ast.Name) and func.id == "setattr" and len(node.args) == 3:
            if isinstance(node.args[0], ast.Name) and node.args[0].id == s:
                self._setattr(node, f, lay)
        elif not isinstance(func, ast.Attribute):
            return
        elif (owner := _self_attr(func.value, s)) is not None and func.attr in ("append", "extend", "insert", "update"):
            _extend(owner, func.attr, node, f, lay)
        elif isinstance(func.value, ast.Name) and func.value.id == s:
            self._self_call(func.attr, node, f, lay, depth)
        elif func.attr == "__init__":
            self._explicit_init(func.value, f, lay, depth)

    def _setattr(self, node: ast.Call, f: Frame, lay: Layout) -> None:
        """``setattr(self, name, value)``."""
        name = node.args[1]
        attr = _self_attr(name, f.self_name)
        if attr is not None and (v := self.classes.class_attr(f.ref, attr)) is not None:
            name = v
        if isinstance(name, ast.Constant) and isinstance(name.value, str):
            lay.add(name.value, value(node.args[2], f))
        else:
            lay.dynamic = True

    def _self_call(self, method: str, node: ast.Call, f: Frame, lay: Layout, depth: int) -> None:
        """``self.register_*(...)``, ``self.add_module(...)`` or ``self.<method>(...)``."""
        if method in ("register_buffer", "register_parameter", "add_module", "register_module"):
            arg0 = node.args[0] if node.args else None
            if not (isinstance(arg0, ast.Constant) and isinstance(arg0.value, str)) or len(node.args) < 2:
                lay.dynamic = True
            elif method == "register_buffer":
                lay.add(arg0.value, {BUFFER})
            elif method == "register_parameter":
                lay.add(arg0.value, {NONE} if is_none(node.args[1]) else {PARAM})
            else:
                lay.add(arg0.value, value(node.args[1], f))
            return
        found = self.classes.method(f.ref, method)
        if found is not None and method != "__init__":
            self._run_method(lay, f.ref, found[0], found[1], depth + 1)

    def _explicit_init(self, owner: ast.expr, f: Frame, lay: Layout, depth: int) -> None:
        """``super().__init__(...)``, ``super(Cls, self).__init__(...)`` or ``Base.__init__(self, ...)``."""
        if isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == "super":
            start = f.index + 1
            if owner.args:
                r = self.classes.ref(dotted(f.src, owner.args[0]))
                if r is None or r not in f.chain:
                    raise Unsure("super() of an unread class")
                start = f.chain.index(r) + 1
        else:
            r = self.classes.ref(dotted(f.src, owner))
            d = dotted(f.src, owner)
            if r is not None and r in f.chain:
                start = f.chain.index(r)
            elif d in MODULE:
                return
            else:
                raise Unsure(f"explicit __init__ of {d}")
        self._run_init(lay, f.ref, start, depth + 1)


def _extend(owner: str, method: str, node: ast.Call, f: Frame, lay: Layout) -> None:
    """``self.<owner>.<method>(...)`` (append, extend, insert, update): kinds added to a list attribute."""
    arg = node.args[-1] if node.args else None
    if arg is None:
        types = {UNKNOWN}
    elif method in ("append", "insert"):
        types = value(arg, f)
    else:
        lists = list_of(arg, f)
        types = set().union(*(merge_list(t, set())[2] if t[0] == "list" else {UNKNOWN} for t in lists))
    lay.appended.setdefault(owner, set()).update(types)


def _self_attr(expr: ast.expr, self_name: str) -> str | None:
    """``name`` for ``self.name``."""
    if isinstance(expr, ast.Attribute) and isinstance(expr.value, ast.Name) and expr.value.id == self_name:
        return expr.attr
    return None


def _root_name(expr: ast.expr) -> str | None:
    while isinstance(expr, (ast.Attribute, ast.Subscript)):
        expr = expr.value
    return expr.id if isinstance(expr, ast.Name) else None
