"""Finding and parsing transformers' source: the file of a module (parsed once per file version),
its imports, classes and dispatch tables as a ``Source``, the architecture's files (``Arch``), and
the small ``ast`` helpers every step uses. Reads files only; knows nothing of abstract values."""

from __future__ import annotations

import ast
import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantsave.convert.static_layout.kinds import Sym
from quantsave.convert.static_layout.unsure import Unsure

__all__ = [
    "Arch",
    "Source",
    "assigned_names",
    "block",
    "dotted",
    "is_none",
    "literal",
    "parse_source",
    "parse_tree",
    "read_text",
]


@dataclass
class Source:
    """One parsed modeling (or configuration) file."""

    module: str
    aliases: dict[str, str]  # local name -> dotted target
    classes: dict[str, ast.ClassDef]
    dicts: dict[str, ast.Dict]  # module-level dict literals (class dispatch tables)
    patched: set[str]  # classes whose attributes are assigned at module level


@dataclass(frozen=True)
class Arch:
    """The architecture being read: transformers' package folder, the checkpoint's config and
    the class named by its ``architectures``."""

    root: Path  # the installed transformers package
    config: dict[str, Any]
    model_type: str
    name: str
    folder: str  # the models/ folder of model_type

    @classmethod
    def locate(cls, root: Path, config: dict[str, Any], model_type: str, name: str) -> Arch:
        """The architecture ``name`` of ``model_type``; raises Unsure for a deprecated or nested folder."""
        return cls(root, config, model_type, name, _model_folder(root, model_type))

    @property
    def module(self) -> str:
        return f"transformers.models.{self.folder}.modeling_{self.folder}"

    @property
    def ref(self) -> Sym:
        return ("class", self.module, self.name)


@functools.lru_cache(maxsize=128)
def _tree(path: str, mtime: float) -> ast.Module:
    return ast.parse(Path(path).read_text(encoding="utf-8"), filename=path)


def parse_tree(path: Path) -> ast.Module:
    """The syntax tree of ``path`` (cached while the file is unchanged)."""
    return _tree(str(path), path.stat().st_mtime)


def parse_source(path: Path, module: str) -> Source:
    """The ``Source`` of ``path``, which defines ``module`` (cached while the file is unchanged)."""
    return _parse(str(path), path.stat().st_mtime, module)


@functools.lru_cache(maxsize=128)
def _parse(path: str, mtime: float, module: str) -> Source:
    src = Source(module, {}, {}, {}, set())
    _visit(src, module.split(".")[:-1], _tree(path, mtime).body)
    return src


def _visit(src: Source, package: list[str], stmts: list[ast.stmt]) -> None:
    """Records the module-level names ``stmts`` bind (both branches of an if or a try)."""
    for st in stmts:
        if isinstance(st, ast.Import):
            for a in st.names:
                src.aliases[a.asname or a.name.partition(".")[0]] = a.name if a.asname else a.name.partition(".")[0]
        elif isinstance(st, ast.ImportFrom):
            base = ".".join(package[: len(package) - st.level + 1] if st.level else [])
            mod = ".".join(p for p in (base, st.module or "") if p)
            for a in st.names:
                src.aliases[a.asname or a.name] = f"{mod}.{a.name}"
        elif isinstance(st, ast.ClassDef):
            src.classes[st.name] = st
            src.aliases[st.name] = f"{src.module}.{st.name}"
        elif isinstance(st, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = st.targets if isinstance(st, ast.Assign) else [st.target]
            for t in targets:
                if isinstance(t, ast.Name):
                    src.aliases.pop(t.id, None)
                    src.classes.pop(t.id, None)
                    if isinstance(st.value, ast.Dict):
                        src.dicts[t.id] = st.value
                    elif isinstance(st.value, (ast.Name, ast.Attribute)) and (d := dotted(src, st.value)):
                        src.aliases[t.id] = d
                elif isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name):
                    src.patched.add(t.value.id)
        elif isinstance(st, (ast.If, ast.Try)):
            _visit(src, package, st.body)
            _visit(src, package, st.orelse)
            for h in getattr(st, "handlers", []):
                _visit(src, package, h.body)


@functools.lru_cache(maxsize=32)
def _text(path: str, mtime: float) -> str:
    return Path(path).read_text(encoding="utf-8")


def read_text(path: Path) -> str:
    """The text of ``path`` (cached while the file is unchanged)."""
    return _text(str(path), path.stat().st_mtime)


def block(path: Path, head: str, end: str) -> str:
    """The text of ``path`` from ``head`` to the next ``end`` ("" when absent)."""
    text = read_text(path) if path.is_file() else ""
    start = text.find(head)
    return text[start : text.find(end, start)] if start >= 0 else ""


def _model_folder(root: Path, model_type: str) -> str:
    """transformers' ``model_type_to_module_name``: the models/ folder of a model_type."""
    auto = root / "models" / "auto"
    special = block(auto / "auto_mappings.py", "\nSPECIAL_MODEL_TYPE_TO_MODULE_NAME = ", "\n)\n") + block(
        auto / "configuration_auto.py", "\nSPECIAL_MODEL_TYPE_TO_MODULE_NAME.update(", "\n)\n"
    )
    found = re.search(rf'"{re.escape(model_type)}"\s*[:,]\s*"([\w.]+)"', special)
    folder = found.group(1) if found else model_type.replace("-", "_")
    deprecated = block(auto / "configuration_auto.py", "\nDEPRECATED_MODELS = [", "]")
    if not folder.isidentifier() or f'"{folder}"' in deprecated:
        raise Unsure(f"model_type {model_type!r} lives in {folder} (deprecated or nested)")
    return folder


def dotted(src: Source, expr: ast.expr) -> str | None:
    """``nn.Linear`` -> ``torch.nn.Linear``; a class of the file -> ``<module>.<Name>``."""
    if isinstance(expr, ast.Name):
        return src.aliases.get(expr.id)
    if isinstance(expr, ast.Attribute):
        base = dotted(src, expr.value)
        return f"{base}.{expr.attr}" if base else None
    return None


def literal(node: ast.expr) -> Any:
    """The value of a literal expression; raises Unsure for anything else."""
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError) as e:
        raise Unsure(f"not a literal: {ast.dump(node)[:80]}") from e


def assigned_names(st: ast.Assign | ast.AnnAssign) -> set[str]:
    """The plain names an assignment binds."""
    targets = st.targets if isinstance(st, ast.Assign) else [st.target]
    return {t.id for t in targets if isinstance(t, ast.Name)}


def is_none(expr: ast.expr) -> bool:
    return isinstance(expr, ast.Constant) and expr.value is None
