"""What an expression of an ``__init__`` builds, abstractly: the set of kinds (``Sym``) a value
can be (both branches of a conditional, every assignment of a local), the callee a call can
reach, the kinds in a ModuleList; and ``Frame``, the method being run. Reads no statements."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass

from quantsave.convert.static_layout.classes import ClassIndex
from quantsave.convert.static_layout.kinds import BUFFER, LINEAR, NONE, PARAM, TORCH, UNKNOWN, Sym
from quantsave.convert.static_layout.source import Arch, Source, block, dotted, is_none

__all__ = ["Frame", "list_of", "local_env", "merge_list", "value"]


@dataclass
class Frame:
    """One method being run abstractly and what evaluating its expressions needs."""

    classes: ClassIndex
    arch: Arch
    src: Source  # the file defining the method
    ref: Sym  # the class whose instance is being built
    chain: list[Sym]  # its MRO
    index: int  # the MRO entry whose method runs
    self_name: str
    env: dict[str, list[ast.expr | None]]  # see local_env


def value(expr: ast.expr, f: Frame, depth: int = 0) -> set[Sym]:
    """The kinds ``expr`` can evaluate to."""
    if depth > 6:
        return {UNKNOWN}
    if is_none(expr):
        return {NONE}
    if isinstance(expr, ast.IfExp):
        return value(expr.body, f, depth + 1) | value(expr.orelse, f, depth + 1)
    if isinstance(expr, ast.BoolOp):
        return set().union(*(value(v, f, depth + 1) for v in expr.values))
    if isinstance(expr, ast.Name) and expr.id in f.env:
        return set().union(*({UNKNOWN} if e is None else value(e, f, depth + 1) for e in f.env[expr.id]))
    if not isinstance(expr, ast.Call):
        return {UNKNOWN}
    func = expr.func
    if isinstance(func, ast.Attribute) and func.attr in ("from_config", "_from_config"):
        d = dotted(f.src, func.value) or ""
        if d.rpartition(".")[2] == "AutoModel" and ".auto" in d:
            return {_auto_model(expr, f)}
        r = f.classes.ref(d)
        return {r} if r is not None else {UNKNOWN}
    out: set[Sym] = set()
    for name in _callee(func, f, depth):
        out |= _constructed(name, expr, f)
    return out


def _constructed(callee: str | None, call: ast.Call, f: Frame) -> set[Sym]:
    """The kinds ``call`` builds when it calls the dotted name ``callee``."""
    if callee is None:
        return {UNKNOWN}
    if callee in ("torch.nn.ModuleList", "torch.nn.Sequential"):
        if callee.endswith("ModuleList"):
            return list_of(call.args[0] if call.args else None, f)
        if len(call.args) == 1 and isinstance(call.args[0], ast.Starred):
            return list_of(call.args[0].value, f)
        return list_of(ast.List(elts=list(call.args), ctx=ast.Load()), f)
    if callee.startswith("torch.nn.") and callee.endswith(".Linear"):
        return {LINEAR}
    if callee in ("torch.nn.Parameter", "torch.nn.parameter.Parameter"):
        return {PARAM}
    if callee in ("torch.nn.Buffer", "torch.nn.parameter.Buffer"):
        return {BUFFER}
    if callee.startswith("torch.nn.") and callee.rpartition(".")[2] in TORCH:
        return {("torch", callee.rpartition(".")[2])}
    r = f.classes.ref(callee)
    return {r if r is not None else UNKNOWN}


def _callee(expr: ast.expr, f: Frame, depth: int) -> set[str | None]:
    """The dotted names a called expression can be (None: unknown)."""
    if depth > 6:
        return {None}
    if isinstance(expr, ast.Name) and expr.id in f.env:
        return set().union(*({None} if e is None else _callee(e, f, depth + 1) for e in f.env[expr.id]))
    if isinstance(expr, ast.IfExp):
        return _callee(expr.body, f, depth + 1) | _callee(expr.orelse, f, depth + 1)
    if isinstance(expr, ast.Subscript) and isinstance(expr.value, ast.Name) and expr.value.id in f.src.dicts:
        values = [v for v in f.src.dicts[expr.value.id].values if v is not None]
        return set().union(*(_callee(v, f, depth + 1) for v in values)) if values else {None}
    return {dotted(f.src, expr)}


def list_of(expr: ast.expr | None, f: Frame, depth: int = 0) -> set[Sym]:
    """The list kinds of ``nn.ModuleList(expr)``."""
    if expr is None:
        return {("list", (), frozenset())}
    if isinstance(expr, (ast.List, ast.Tuple)):
        if any(isinstance(e, ast.Starred) for e in expr.elts):
            return {UNKNOWN}
        return {("list", tuple(frozenset(value(e, f) - {NONE}) for e in expr.elts), frozenset())}
    if isinstance(expr, (ast.ListComp, ast.GeneratorExp)):
        return {("list", None, frozenset(value(expr.elt, f) - {NONE}))}
    if isinstance(expr, ast.Name) and expr.id in f.env and depth < 4:
        return set().union(*({UNKNOWN} if e is None else list_of(e, f, depth + 1) for e in f.env[expr.id]))
    return {UNKNOWN}


def _auto_model(call: ast.Call, f: Frame) -> Sym:
    """``AutoModel.from_config(config)`` in the architecture's own ``__init__``: the base model
    of the model_type (MODEL_MAPPING_NAMES), when this modeling file defines it."""
    arg = call.args[0] if call.args else None
    top_config = isinstance(arg, ast.Name) and arg.id == "config" and f.env.get("config") == [None]
    if not (f.ref == f.arch.ref and top_config):
        return UNKNOWN
    names = block(f.arch.root / "models" / "auto" / "modeling_auto.py", "\nMODEL_MAPPING_NAMES = ", "\n)\n")
    m = re.search(rf'\(\s*"{re.escape(f.arch.model_type)}",\s*"(\w+)"\s*\)', names)
    return (f.classes.ref(f"{f.arch.module}.{m.group(1)}") or UNKNOWN) if m else UNKNOWN


def merge_list(t: Sym, extra: set[Sym]) -> Sym:
    """A list kind with ``extra`` kinds appended at unknown indices."""
    if t[0] != "list":
        return UNKNOWN
    every = set(t[2]) | (set().union(*t[1]) if t[1] else set()) | (extra - {NONE})
    return ("list", None, frozenset(every))


def local_env(fn: ast.FunctionDef) -> dict[str, list[ast.expr | None]]:
    """Every local of ``fn`` -> the expressions assigned to it (None: unknown)."""
    env: dict[str, list[ast.expr | None]] = {}
    a = fn.args
    for arg in a.posonlyargs + a.args + a.kwonlyargs + [x for x in (a.vararg, a.kwarg) if x is not None]:
        env[arg.arg] = [None]

    def bind(target: ast.expr, value: ast.expr | None) -> None:
        if isinstance(target, ast.Name):
            env.setdefault(target.id, []).append(value)
        elif isinstance(target, (ast.Tuple, ast.List)):
            for t in target.elts:
                bind(t, None)
        elif isinstance(target, ast.Starred):
            bind(target.value, None)

    def visit(node: ast.AST) -> None:
        for n in ast.iter_child_nodes(node):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
                continue
            if isinstance(n, ast.Assign):
                for t in n.targets:
                    bind(t, n.value if isinstance(t, ast.Name) else None)
            elif isinstance(n, (ast.AnnAssign, ast.NamedExpr)) and n.value is not None:
                bind(n.target, n.value)
            elif isinstance(n, (ast.AugAssign, ast.For, ast.comprehension)):
                bind(n.target, None)
            elif isinstance(n, ast.withitem) and n.optional_vars is not None:
                bind(n.optional_vars, None)
            visit(n)

    visit(fn)
    return env
