"""``static_layout``: the Linear layers transformers' bitsandbytes quantization would replace in a
checkpoint, found by reading transformers' modeling source with ``ast`` instead of importing it.

The exact answer (``quantize.bnb_targets`` on a meta skeleton) costs an import of transformers'
modeling code, seconds of CPU. Here the ``__init__`` methods of the architecture class and of the
classes it builds are executed abstractly (both branches of every ``if``): each attribute gets the
set of kinds it can hold (nn.Linear, another torch layer, a transformers class, a ModuleList, a
parameter, unknown). Every checkpoint key (renamed first, when transformers renames it on load) is
walked from the architecture class down those attributes; a key no candidate kind explains, or
one that may or may not be an nn.Linear weight, makes the answer None. transformers' default skips
come from the same reading: ``_tied_weights_keys`` with ``tie_word_embeddings`` (from config.json
or the configuration class's default), the module of the last parameter (registration order of the
``__init__``s, with the tied parameters save_pretrained leaves out), ``get_output_embeddings`` and
``_keep_in_fp32_modules``. A skip the reading is unsure of is accepted only when the answer is the
same with and without it; anything else unusual gives None, so the caller builds the model.

Never imports transformers, diffusers or bitsandbytes.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantsave.quantize import transformers_should_convert

__all__ = ["transformers_bnb_targets"]

# Abstract values of ``self.<attr> = <expr>``: a constructed module kind, or one of these.
_UNKNOWN = ("unknown",)
_NONE = ("none",)
_LINEAR = ("linear",)
_PARAM = ("param",)
_BUFFER = ("buffer",)
# ("torch", name): a torch.nn layer from _TORCH; ("class", module, name): a class transformers
# defines; ("list", per_index | None, every): an nn.ModuleList / nn.Sequential.
_Sym = tuple[Any, ...]  # any of these abstract values: a tag, then its fields

# torch.nn layers whose state is known: (parameters in registration order, buffers).
_TORCH: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
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
_FLOAT_DTYPES = {"F32", "F16", "BF16"}
_DECORATORS = {"auto_docstring", "use_kernel_forward_from_hub", "use_kernelized_func", "use_experts_implementation"}
# transformers' "legacy" renamings, applied on load to every model (conversion_mapping.py).
_LEGACY = re.compile(
    r"LayerNorm.(gamma|beta)(?!\w)|.weight_[gv](?!\w)|^(model\.language_model|language_model\.model)\.model(?!\w)"
)
# get_expanded_tied_weights_keys: mappings outside this regex are expanded against the parameters.
_TIED_COMMON = re.compile(r"^[A-Za-z0-9_\.]+(weight)|(bias)$")


class _Unsure(Exception):
    """The static reading cannot settle the answer (the message says why)."""


def transformers_bnb_targets(
    config: dict[str, Any],
    tensors: dict[str, tuple[str, list[int]]],
    skip_modules: list[str] | None,
) -> list[str] | None:
    """The modules ``bnb_targets`` would quantize in the transformers model of ``config``.

    Args:
        config: the checkpoint's parsed ``config.json``.
        tensors: every checkpoint key -> (safetensors dtype, shape).
        skip_modules: the BitsAndBytesConfig's ``llm_int8_skip_modules``.

    Returns:
        The sorted names of the ``nn.Linear`` modules whose ``.weight`` is in ``tensors`` and that
        ``bnb_targets(skeleton, config)`` returns, or None when the static reading is unsure.
    """
    try:
        return _static_targets(config, tensors, skip_modules)
    except Exception:  # noqa: BLE001 - any failure of the reading means "unsure": the caller builds the model
        return None


def _static_targets(
    config: dict[str, Any], tensors: dict[str, tuple[str, list[int]]], skip_modules: list[str] | None
) -> list[str]:
    """``transformers_bnb_targets`` that raises ``_Unsure`` with the reason instead of returning None."""
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        raise _Unsure("transformers is not installed")
    if not isinstance(config, dict) or "auto_map" in config:
        raise _Unsure("remote code (auto_map) or no config")
    archs, model_type = config.get("architectures"), config.get("model_type")
    if not (isinstance(archs, list) and len(archs) == 1 and isinstance(archs[0], str) and isinstance(model_type, str)):
        raise _Unsure("config.json needs model_type and exactly one architecture")
    bad = next((k for k in tensors if _LEGACY.search(k)), None)
    if bad is not None:
        raise _Unsure(f"{bad!r} is renamed by transformers on load")
    root = Path(next(iter(spec.submodule_search_locations)))
    return _Reader(root, config, model_type, archs[0], tensors).targets(skip_modules)


# ---------------------------------------------------------------- parsing (cached per file version)


@dataclass
class _Source:
    module: str
    aliases: dict[str, str]  # local name -> dotted target
    classes: dict[str, ast.ClassDef]
    dicts: dict[str, ast.Dict]  # module-level dict literals (class dispatch tables)
    patched: set[str]  # classes whose attributes are assigned at module level


@functools.lru_cache(maxsize=128)
def _tree(path: str, mtime: float) -> ast.Module:
    return ast.parse(Path(path).read_text(encoding="utf-8"))


@functools.lru_cache(maxsize=128)
def _parse(path: str, mtime: float, module: str) -> _Source:
    tree = _tree(path, mtime)
    src = _Source(module, {}, {}, {}, set())
    package = module.split(".")[:-1]

    def visit(stmts: list[ast.stmt]) -> None:
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
                src.aliases[st.name] = f"{module}.{st.name}"
            elif isinstance(st, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = st.targets if isinstance(st, ast.Assign) else [st.target]
                for t in targets:
                    if isinstance(t, ast.Name):
                        src.aliases.pop(t.id, None)
                        src.classes.pop(t.id, None)
                        if isinstance(st.value, ast.Dict):
                            src.dicts[t.id] = st.value
                        elif isinstance(st.value, (ast.Name, ast.Attribute)) and (d := _dotted(src, st.value)):
                            src.aliases[t.id] = d
                    elif isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name):
                        src.patched.add(t.value.id)
            elif isinstance(st, (ast.If, ast.Try)):
                visit(st.body)
                visit(st.orelse)
                for h in getattr(st, "handlers", []):
                    visit(h.body)

    visit(tree.body)
    return src


@functools.lru_cache(maxsize=32)
def _text(path: str, mtime: float) -> str:
    return Path(path).read_text(encoding="utf-8")


def _read_text(path: Path) -> str:
    return _text(str(path), path.stat().st_mtime)


def _dotted(src: _Source, expr: ast.expr) -> str | None:
    """``nn.Linear`` -> ``torch.nn.Linear``; a class of the file -> ``<module>.<Name>``."""
    if isinstance(expr, ast.Name):
        return src.aliases.get(expr.id)
    if isinstance(expr, ast.Attribute):
        base = _dotted(src, expr.value)
        return f"{base}.{expr.attr}" if base else None
    return None


def _self_attr(expr: ast.expr, self_name: str) -> str | None:
    if isinstance(expr, ast.Attribute) and isinstance(expr.value, ast.Name) and expr.value.id == self_name:
        return expr.attr
    return None


def _literal(node: ast.expr) -> Any:
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError) as e:
        raise _Unsure(f"not a literal: {ast.dump(node)[:80]}") from e


# ---------------------------------------------------------------- the layout of one class


@dataclass
class _Layout:
    attrs: dict[str, set[_Sym]] = field(default_factory=dict)
    pos: dict[str, list[int]] = field(default_factory=dict)
    appended: dict[str, set[_Sym]] = field(default_factory=dict)
    dynamic: bool = False  # registers attributes this reading cannot name
    counter: int = 0

    def add(self, name: str, types: set[_Sym]) -> None:
        self.attrs.setdefault(name, set()).update(types)
        if types - {_NONE}:
            self.pos.setdefault(name, []).append(self.counter)
        self.counter += 1


@dataclass
class _Ctx:
    src: _Source
    ref: _Sym  # the class whose instance is being built
    chain: list[_Sym]  # its MRO
    index: int  # the MRO entry whose method runs
    self_name: str
    env: dict[str, list[ast.expr | None]]


class _Reader:
    def __init__(self, root: Path, config: dict[str, Any], model_type: str, arch: str, tensors: dict[str, Any]) -> None:
        self.root, self.config, self.arch_name, self.tensors = root, config, arch, tensors
        self.folder = _folder(root, model_type)
        self.model_type = model_type
        self.module = f"transformers.models.{self.folder}.modeling_{self.folder}"
        self.layouts: dict[_Sym, _Layout] = {}
        self.mros: dict[_Sym, list[_Sym]] = {}
        self.survivors: dict[str, list[_Sym]] = {}
        self.kinds: dict[str, str] = {}
        self.names: set[str] = set()  # the checkpoint's keys as the model names them
        self.arch = ("class", self.module, arch)

    # -- sources and classes

    def source(self, module: str) -> _Source | None:
        parts = module.split(".")
        if module != "transformers.modeling_layers" and not (
            len(parts) == 4 and parts[:2] == ["transformers", "models"] and parts[3].startswith("modeling_")
        ):
            return None
        path = self.root.joinpath(*parts[1:-1], parts[-1] + ".py")
        if not path.is_file():
            return None
        return _parse(str(path), path.stat().st_mtime, module)

    def ref(self, dotted: str | None) -> _Sym | None:
        if not dotted:
            return None
        module, _, name = dotted.rpartition(".")
        src = self.source(module)
        return ("class", module, name) if src is not None and name in src.classes else None

    def cls(self, ref: _Sym) -> tuple[_Source, ast.ClassDef]:
        src = self.source(ref[1])
        if src is None or ref[2] not in src.classes:
            raise _Unsure(f"lost class {ref[2]}")
        return src, src.classes[ref[2]]

    def bases(self, ref: _Sym) -> list[_Sym]:
        src, node = self.cls(ref)
        out: list[_Sym] = []
        for dec in node.decorator_list:
            d = _dotted(src, dec.func if isinstance(dec, ast.Call) else dec)
            if d is None or d.rpartition(".")[2] not in _DECORATORS:
                out.append(("ext", "?"))
        for b in node.bases:
            d = _dotted(src, b)
            last = (d or "").rpartition(".")[2]
            if (r := self.ref(d)) is not None:
                out.append(r)
            elif d in ("torch.nn.Module", "torch.nn.modules.module.Module"):
                out.append(("ext", "Module"))
            elif d and d.startswith("torch.nn.") and last in _TORCH:
                out.append(("ext", "torch", last))
            elif d and d.startswith("transformers.modeling_utils.") and last == "PreTrainedModel":
                out.append(("ext", "PreTrainedModel"))
            elif d and d.startswith("transformers.generation") and last == "GenerationMixin":
                out.append(("ext", "Mixin"))
            else:
                out.append(("ext", "?"))
        return out

    def mro(self, ref: _Sym, depth: int = 0) -> list[_Sym]:
        if ref in self.mros:
            return self.mros[ref]
        if depth > 30:
            raise _Unsure("class hierarchy too deep")
        bases = self.bases(ref)
        seqs = [list(self.mro(b, depth + 1)) if b[0] == "class" else [b] for b in bases] + [list(bases)]
        out = [ref]
        while any(seqs):
            for seq in seqs:
                head = seq[0] if seq else None
                if head is not None and not any(head in s[1:] for s in seqs):
                    break
            else:
                raise _Unsure(f"no MRO for {ref[2]}")
            out.append(head)
            seqs = [s[1:] if s and s[0] == head else s for s in seqs]
        self.mros[ref] = out
        return out

    def class_attr(self, ref: _Sym, name: str) -> ast.expr | None:
        """The value node of class attribute ``name`` (first in the MRO), None for transformers' default."""
        for e in self.mro(ref):
            if e == ("ext", "?"):
                raise _Unsure(f"{ref[2]} inherits from or is decorated by something unread")
            if e[0] != "class":
                continue
            src, node = self.cls(e)
            if e[2] in src.patched:
                raise _Unsure(f"{e[2]} is patched at module level")
            for st in node.body:
                if isinstance(st, (ast.Assign, ast.AnnAssign)) and st.value is not None and name in _names(st):
                    return st.value
        return None

    def method(self, ref: _Sym, name: str, start: int = 0) -> tuple[int, ast.FunctionDef] | None:
        mro = self.mro(ref)
        for i in range(start, len(mro)):
            e = mro[i]
            if e == ("ext", "?"):
                raise _Unsure(f"{name} of {ref[2]} may come from an unread base")
            if e[0] == "class":
                for st in self.cls(e)[1].body:
                    if isinstance(st, ast.FunctionDef) and st.name == name:
                        return i, st
        return None

    def is_pretrained(self, ref: _Sym) -> bool:
        return ("ext", "PreTrainedModel") in self.mro(ref)

    # -- abstract execution of __init__

    def layout(self, ref: _Sym) -> _Layout:
        if ref not in self.layouts:
            lay = self.layouts[ref] = _Layout()
            self.run_init(lay, ref, 0, 0)
            for name, extra in lay.appended.items():
                lay.attrs[name] = {_merge_list(t, extra) for t in lay.attrs.get(name, {_UNKNOWN})}
        return self.layouts[ref]

    def run_init(self, lay: _Layout, ref: _Sym, start: int, depth: int) -> None:
        mro = self.mro(ref)
        for i in range(start, len(mro)):
            e = mro[i]
            if e[0] == "class":
                found = self.method(ref, "__init__", i)
                if found is not None and found[0] == i:
                    self.run_method(lay, ref, i, found[1], depth)
                    return
            elif e[1] == "torch":
                params, buffers = _TORCH[e[2]]
                for p in params:
                    lay.add(p, {_PARAM})
                for b in buffers:
                    lay.add(b, {_BUFFER})
                return
            elif e[1] in ("Module", "PreTrainedModel"):
                return
            elif e[1] != "Mixin":
                lay.dynamic = True
                return

    def run_method(self, lay: _Layout, ref: _Sym, index: int, fn: ast.FunctionDef, depth: int) -> None:
        if depth > 8:
            raise _Unsure("__init__ calls nest too deep")
        if not fn.args.args:
            raise _Unsure(f"{fn.name} has no self")
        src = self.cls(self.mro(ref)[index])[0]
        ctx = _Ctx(src, ref, self.mro(ref), index, fn.args.args[0].arg, _env(fn))
        self.run_block(fn.body, ctx, lay, depth)

    def run_block(self, stmts: list[ast.stmt], ctx: _Ctx, lay: _Layout, depth: int) -> None:
        for st in stmts:
            if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Pass)):
                continue
            if isinstance(st, (ast.If, ast.For, ast.While, ast.With, ast.Try)):
                for block in ("body", "orelse", "finalbody"):
                    self.run_block(getattr(st, block, []), ctx, lay, depth)
                for h in getattr(st, "handlers", []):
                    self.run_block(h.body, ctx, lay, depth)
                continue
            if isinstance(st, (ast.Match, ast.Delete)):
                lay.dynamic = True
                continue
            if isinstance(st, (ast.Assign, ast.AnnAssign)) and st.value is not None:
                for t in st.targets if isinstance(st, ast.Assign) else [st.target]:
                    self.assign(t, st.value, ctx, lay)
            elif isinstance(st, ast.AugAssign) and _self_attr(st.target, ctx.self_name):
                lay.dynamic = True
            for node in ast.walk(st):
                if isinstance(node, ast.Call):
                    self.call(node, ctx, lay, depth)

    def assign(self, target: ast.expr, value: ast.expr, ctx: _Ctx, lay: _Layout) -> None:
        if (name := _self_attr(target, ctx.self_name)) is not None:
            lay.add(name, self.value(value, ctx))
        elif isinstance(target, (ast.Tuple, ast.List)):
            for t in target.elts:
                if (name := _self_attr(t, ctx.self_name)) is not None:
                    lay.add(name, {_UNKNOWN})
        elif isinstance(target, ast.Subscript) and (name := _self_attr(target.value, ctx.self_name)) is not None:
            lay.appended.setdefault(name, set()).update(self.value(value, ctx))
        elif isinstance(target, ast.Attribute) and _root_name(target) == ctx.self_name:
            raise _Unsure(f"{ctx.ref[2]}.__init__ assigns into a submodule")

    def call(self, node: ast.Call, ctx: _Ctx, lay: _Layout, depth: int) -> None:
        func, s = node.func, ctx.self_name
        if isinstance(func, ast.Name) and func.id == "setattr" and len(node.args) == 3:
            if not (isinstance(node.args[0], ast.Name) and node.args[0].id == s):
                return
            name = node.args[1]
            if (attr := _self_attr(name, s)) is not None and (v := self.class_attr(ctx.ref, attr)) is not None:
                name = v
            if isinstance(name, ast.Constant) and isinstance(name.value, str):
                lay.add(name.value, self.value(node.args[2], ctx))
            else:
                lay.dynamic = True
            return
        if not isinstance(func, ast.Attribute):
            return
        owner = _self_attr(func.value, s)
        if owner is not None and func.attr in ("append", "extend", "insert", "update"):
            arg = node.args[-1] if node.args else None
            if arg is None:
                types = {_UNKNOWN}
            elif func.attr in ("append", "insert"):
                types = self.value(arg, ctx)
            else:
                lists = self.list_of(arg, ctx)
                types = set().union(*(_merge_list(t, set())[2] if t[0] == "list" else {_UNKNOWN} for t in lists))
            lay.appended.setdefault(owner, set()).update(types)
            return
        if isinstance(func.value, ast.Name) and func.value.id == s:
            if func.attr in ("register_buffer", "register_parameter", "add_module", "register_module"):
                arg0 = node.args[0] if node.args else None
                if not (isinstance(arg0, ast.Constant) and isinstance(arg0.value, str)) or len(node.args) < 2:
                    lay.dynamic = True
                elif func.attr == "register_buffer":
                    lay.add(arg0.value, {_BUFFER})
                elif func.attr == "register_parameter":
                    lay.add(arg0.value, {_NONE} if _is_none(node.args[1]) else {_PARAM})
                else:
                    lay.add(arg0.value, self.value(node.args[1], ctx))
                return
            found = self.method(ctx.ref, func.attr)
            if found is not None and func.attr != "__init__":
                self.run_method(lay, ctx.ref, found[0], found[1], depth + 1)
            return
        if func.attr == "__init__":
            v = func.value
            if isinstance(v, ast.Call) and isinstance(v.func, ast.Name) and v.func.id == "super":
                start = ctx.index + 1
                if v.args:
                    r = self.ref(_dotted(ctx.src, v.args[0]))
                    if r is None or r not in ctx.chain:
                        raise _Unsure("super() of an unread class")
                    start = ctx.chain.index(r) + 1
            else:
                r = self.ref(_dotted(ctx.src, v))
                d = _dotted(ctx.src, v)
                if r is not None and r in ctx.chain:
                    start = ctx.chain.index(r)
                elif d in ("torch.nn.Module", "torch.nn.modules.module.Module"):
                    return
                else:
                    raise _Unsure(f"explicit __init__ of {d}")
            self.run_init(lay, ctx.ref, start, depth + 1)

    # -- what an expression builds

    def value(self, expr: ast.expr, ctx: _Ctx, depth: int = 0) -> set[_Sym]:
        if depth > 6:
            return {_UNKNOWN}
        if _is_none(expr):
            return {_NONE}
        if isinstance(expr, ast.IfExp):
            return self.value(expr.body, ctx, depth + 1) | self.value(expr.orelse, ctx, depth + 1)
        if isinstance(expr, ast.BoolOp):
            return set().union(*(self.value(v, ctx, depth + 1) for v in expr.values))
        if isinstance(expr, ast.Name) and expr.id in ctx.env:
            return set().union(*({_UNKNOWN} if e is None else self.value(e, ctx, depth + 1) for e in ctx.env[expr.id]))
        if not isinstance(expr, ast.Call):
            return {_UNKNOWN}
        func = expr.func
        if isinstance(func, ast.Attribute) and func.attr in ("from_config", "_from_config"):
            d = _dotted(ctx.src, func.value) or ""
            if d.rpartition(".")[2] == "AutoModel" and ".auto" in d:
                return {self.auto_model(expr, ctx)}
            r = self.ref(d)
            return {r} if r is not None else {_UNKNOWN}
        out: set[_Sym] = set()
        for callee in self.callee(func, ctx, depth):
            if callee is None:
                out.add(_UNKNOWN)
            elif callee in ("torch.nn.ModuleList", "torch.nn.Sequential"):
                if callee.endswith("ModuleList"):
                    out |= self.list_of(expr.args[0] if expr.args else None, ctx)
                elif len(expr.args) == 1 and isinstance(expr.args[0], ast.Starred):
                    out |= self.list_of(expr.args[0].value, ctx)
                else:
                    out |= self.list_of(ast.List(elts=list(expr.args), ctx=ast.Load()), ctx)
            elif callee.startswith("torch.nn.") and callee.endswith(".Linear"):
                out.add(_LINEAR)
            elif callee in ("torch.nn.Parameter", "torch.nn.parameter.Parameter"):
                out.add(_PARAM)
            elif callee in ("torch.nn.Buffer", "torch.nn.parameter.Buffer"):
                out.add(_BUFFER)
            elif callee.startswith("torch.nn.") and callee.rpartition(".")[2] in _TORCH:
                out.add(("torch", callee.rpartition(".")[2]))
            else:
                r = self.ref(callee)
                out.add(r if r is not None else _UNKNOWN)
        return out

    def callee(self, expr: ast.expr, ctx: _Ctx, depth: int) -> set[str | None]:
        if depth > 6:
            return {None}
        if isinstance(expr, ast.Name) and expr.id in ctx.env:
            return set().union(*({None} if e is None else self.callee(e, ctx, depth + 1) for e in ctx.env[expr.id]))
        if isinstance(expr, ast.IfExp):
            return self.callee(expr.body, ctx, depth + 1) | self.callee(expr.orelse, ctx, depth + 1)
        if isinstance(expr, ast.Subscript) and isinstance(expr.value, ast.Name) and expr.value.id in ctx.src.dicts:
            values = [v for v in ctx.src.dicts[expr.value.id].values if v is not None]
            return set().union(*(self.callee(v, ctx, depth + 1) for v in values)) if values else {None}
        return {_dotted(ctx.src, expr)}

    def list_of(self, expr: ast.expr | None, ctx: _Ctx, depth: int = 0) -> set[_Sym]:
        if expr is None:
            return {("list", (), frozenset())}
        if isinstance(expr, (ast.List, ast.Tuple)):
            if any(isinstance(e, ast.Starred) for e in expr.elts):
                return {_UNKNOWN}
            return {("list", tuple(frozenset(self.value(e, ctx) - {_NONE}) for e in expr.elts), frozenset())}
        if isinstance(expr, (ast.ListComp, ast.GeneratorExp)):
            return {("list", None, frozenset(self.value(expr.elt, ctx) - {_NONE}))}
        if isinstance(expr, ast.Name) and expr.id in ctx.env and depth < 4:
            return set().union(
                *({_UNKNOWN} if e is None else self.list_of(e, ctx, depth + 1) for e in ctx.env[expr.id])
            )
        return {_UNKNOWN}

    def auto_model(self, call: ast.Call, ctx: _Ctx) -> _Sym:
        """``AutoModel.from_config(config)`` in the architecture's own ``__init__``: the base model
        of the model_type (MODEL_MAPPING_NAMES), when this modeling file defines it."""
        arg = call.args[0] if call.args else None
        top_config = isinstance(arg, ast.Name) and arg.id == "config" and ctx.env.get("config") == [None]
        if not (ctx.ref == self.arch and top_config):
            return _UNKNOWN
        block = _block(self.root / "models" / "auto" / "modeling_auto.py", "\nMODEL_MAPPING_NAMES = ", "\n)\n")
        m = re.search(rf'\(\s*"{re.escape(self.model_type)}",\s*"(\w+)"\s*\)', block)
        return (self.ref(f"{self.module}.{m.group(1)}") or _UNKNOWN) if m else _UNKNOWN

    # -- walking the checkpoint

    def child(self, t: _Sym, name: str) -> set[_Sym]:
        """The module kinds ``name`` can be inside a module of kind ``t``."""
        if t[0] == "class":
            lay = self.layout(t)
            if name not in lay.attrs:
                if lay.dynamic:
                    raise _Unsure(f"{t[2]} registers attributes this reading cannot name")
                return set()
            types = lay.attrs[name] - {_PARAM, _BUFFER}
            return types if types - {_NONE} else set()
        if t[0] == "list":
            if not name.isdigit():
                return set()
            per, every = t[1], t[2]
            return set(every) | (set(per[int(name)]) if per is not None and int(name) < len(per) else set())
        if t in (_LINEAR,) or t[0] == "torch":
            return set()
        raise _Unsure(f"a module this reading cannot classify ({t})")

    def tensor_kind(self, t: _Sym, name: str) -> str | None:
        """"linear" for an nn.Linear's weight, "other" for any other tensor, None: not in ``t``."""
        if t == _LINEAR:
            return "linear" if name == "weight" else "other" if name == "bias" else None
        if t[0] == "torch":
            return "other" if name in _TORCH[t[1]][0] + _TORCH[t[1]][1] else None
        if t[0] == "list":
            return None
        if t[0] == "class":
            lay = self.layout(t)
            types = lay.attrs.get(name)
            if types is None:
                if lay.dynamic:
                    raise _Unsure(f"{t[2]} registers attributes this reading cannot name")
                return None
            if _UNKNOWN in types:
                raise _Unsure(f"{t[2]}.{name} is built by code this reading cannot follow")
            return "other" if types & {_PARAM, _BUFFER} else None
        raise _Unsure(f"a module this reading cannot classify ({t})")

    def explain(self, node: dict[str, Any], prefix: str, types: set[_Sym]) -> None:
        """Checks that a module of one of ``types`` holds every key under ``node`` (a trie of
        the keys below ``prefix``); records the kinds that can (``survivors``) and whether each
        tensor is an nn.Linear weight (``kinds``). Raises _Unsure when a key is unexplained."""
        def fits(t: _Sym) -> bool:
            return all(
                (self.tensor_kind(t, c) is not None) if sub is None else bool(self.child(t, c) - {_NONE})
                for c, sub in node.items()
            )

        survivors = [t for t in types - {_NONE} if fits(t)]
        if not survivors:
            raise _Unsure(f"no module of {prefix or self.arch_name!r} holds {sorted(node)[:4]}")
        self.survivors[prefix] = survivors
        for c, sub in node.items():
            name = f"{prefix}.{c}" if prefix else c
            if sub is None:
                kinds = {k for t in survivors if (k := self.tensor_kind(t, c)) is not None}
                if len(kinds) != 1:
                    raise _Unsure(f"{name!r} may or may not be an nn.Linear weight")
                self.kinds[name] = kinds.pop()
            else:
                self.explain(sub, name, set().union(*(self.child(t, c) for t in survivors)) - {_NONE})

    def walk(self, keys: set[str]) -> tuple[set[str], bool]:
        """Walks ``keys`` (see ``explain``); the candidates for the model's last parameter."""
        trie: dict[str, Any] = {}
        for key in keys:
            node = trie
            *path, leaf = key.split(".")
            for part in path:
                node = node.setdefault(part, {})
                if node is None:
                    raise _Unsure(f"{key!r} nests under a tensor")
            if leaf in node:
                raise _Unsure(f"{key!r} is also a module")
            node[leaf] = None
        self.survivors, self.kinds = {}, {}
        self.explain(trie, "", {self.arch})
        return self.last_param(trie, "")

    def last_param(self, node: dict[str, Any], prefix: str) -> tuple[set[str], bool]:
        """Candidates for the last name of ``named_parameters()`` under ``prefix``; True when
        the module surely holds a parameter."""
        cands: set[str] = set()
        sure = True
        for t in self.survivors[prefix]:
            c, s = self.last_in(t, node, prefix)
            cands |= c
            sure &= s
        return cands, sure and bool(cands)

    def last_in(self, t: _Sym, node: dict[str, Any], prefix: str) -> tuple[set[str], bool]:
        join = (prefix + ".") if prefix else ""
        if t == _LINEAR or t[0] == "torch":
            params = [p for p in (_TORCH["Linear"] if t == _LINEAR else _TORCH[t[1]])[0] if p in node]
            return ({join + params[-1]}, True) if params else (set(), False)
        cands: set[str] = set()
        if t[0] == "list":
            for c in sorted((c for c in node if c.isdigit() and node[c] is not None), key=int, reverse=True):
                cc, s = self.last_param(node[c], join + c)
                cands |= cc
                if s:
                    return cands, True
            return cands, False
        lay = self.layout(t)
        children = [c for c in node if node[c] is not None]
        own = [c for c in node if node[c] is None and _PARAM in lay.attrs.get(c, set())]
        ambiguous = lay.dynamic or any(len(set(lay.pos.get(c, []))) != 1 for c in children + own)
        sure = False
        for c in sorted(children, key=lambda c: min(lay.pos.get(c, [0])), reverse=True):
            cc, s = self.last_param(node[c], join + c)
            cands |= cc
            sure |= s
            if s and not ambiguous:
                return cands, True
        if own:
            ordered = sorted(own, key=lambda c: min(lay.pos.get(c, [0])))
            cands |= {join + c for c in (ordered if ambiguous else ordered[-1:])}
            sure = True
        return cands, sure

    # -- transformers' skips

    def tie_effective(self) -> bool | None:
        """``config.tie_word_embeddings`` as transformers reads it; None when unsure."""
        path = self.root / "models" / self.folder / f"configuration_{self.folder}.py"
        if not path.is_file():
            return None
        for n in ast.walk(_tree(str(path), path.stat().st_mtime)):
            if (isinstance(n, ast.Attribute) and n.attr == "tie_word_embeddings") or (
                isinstance(n, ast.Constant) and n.value == "tie_word_embeddings"
            ):
                return None  # the config class computes or renames it
        src = _parse(str(path), path.stat().st_mtime, f"transformers.models.{self.folder}.configuration_{self.folder}")
        for node in src.classes.values():
            mt = [st.value for st in node.body if isinstance(st, ast.Assign) and "model_type" in _names(st)]
            if not (mt and isinstance(mt[0], ast.Constant) and mt[0].value == self.model_type):
                continue
            bases = [(_dotted(src, b) or "").rpartition(".")[2] for b in node.bases]
            if bases not in (["PreTrainedConfig"], ["PretrainedConfig"]):
                return None
            value = self.config.get("tie_word_embeddings", ...)
            if value is not ...:
                return value if isinstance(value, bool) else None
            for st in node.body:
                if isinstance(st, ast.AnnAssign) and "tie_word_embeddings" in _names(st):
                    default = st.value
                    return (
                        default.value if isinstance(default, ast.Constant) and isinstance(default.value, bool) else None
                    )
            return False  # not a field: getattr(config, "tie_word_embeddings", False)
        return None

    def tied_names(self, ref: _Sym, prefix: str) -> set[str]:
        """The parameters in ``ref``'s tied weights mapping (get_expanded_tied_weights_keys), prefixed."""
        value = self.class_attr(ref, "_tied_weights_keys")
        tied = _literal(value) if value is not None else None
        if tied is None:
            return set()
        if not isinstance(tied, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tied.items()):
            raise _Unsure(f"{ref[2]}._tied_weights_keys is not a dict of names")
        names = set(tied) | set(tied.values())
        if not all(_TIED_COMMON.match(n) for n in names):
            # Expanded by regex search over the parameter names: the checkpoint's, plus the tied
            # targets it may lack, which are exact names when the mapping holds no regex.
            if not all(re.fullmatch(r"[\w.]+", n) for n in names):
                raise _Unsure(f"{ref[2]}._tied_weights_keys holds regex patterns")
            params = {k.removeprefix(prefix) for k in self.names if k.startswith(prefix)} | names
            expanded: set[str] = set()
            for target, source in tied.items():
                targets = {p for p in params if re.search("^" + target, p)}
                sources = {p for p in params if re.search("^" + source, p)}
                if not sources or not targets or len(targets) % len(sources):
                    raise _Unsure(f"{ref[2]}._tied_weights_keys does not expand cleanly")
                expanded |= targets | sources
            names = expanded
        return {prefix + n for n in names}

    def fp32(self, ref: _Sym) -> set[str]:
        value = self.class_attr(ref, "_keep_in_fp32_modules")
        names = _literal(value) if value is not None else None
        if names is None:
            return set()
        if not isinstance(names, (list, tuple, set)) or not all(isinstance(n, str) for n in names):
            raise _Unsure(f"{ref[2]}._keep_in_fp32_modules is not a list of names")
        return set(names)

    def submodels(self, ref: _Sym, prefix: str, depth: int = 0) -> tuple[set[str], set[str], set[str]]:
        """Tied parameters, ``_keep_in_fp32_modules`` of the direct ``PreTrainedModel`` children
        (gathered by transformers' ``post_init``) and the deeper ones (maybe gathered)."""
        tied: set[str] = set()
        fp32_direct: set[str] = set()
        fp32_deep: set[str] = set()
        if depth > 6:
            raise _Unsure("submodels nest too deep")
        for name, types in self.layout(ref).attrs.items():
            for t in types:
                if t[0] == "class" and self.is_pretrained(t):
                    p = f"{prefix}{name}."
                    tied |= self.tied_names(t, p)
                    (fp32_direct if len(types - {_NONE}) == 1 else fp32_deep).update(self.fp32(t))
                    sub_tied, sub_direct, sub_deep = self.submodels(t, p, depth + 1)
                    tied |= sub_tied
                    fp32_deep |= sub_direct | sub_deep
        return tied, fp32_direct, fp32_deep

    def input_embeddings(self, ref: _Sym, depth: int = 0) -> bool | None:
        """Whether ``get_input_embeddings()`` returns (True) or raises NotImplementedError (False)."""
        found = self.method(ref, "get_input_embeddings")
        if found is not None:
            return None if any(isinstance(n, ast.Raise) for n in ast.walk(found[1])) else True
        lay = self.layout(ref)
        value = self.class_attr(ref, "_input_embed_layer")
        name = _literal(value) if value is not None else "embed_tokens"
        if lay.dynamic or depth > 4 or not isinstance(name, str):
            return None

        def holds(attr: str) -> bool | None:
            types = lay.attrs.get(attr, set()) - {_NONE}
            has = [t[0] == "class" and name in self.layout(t).attrs for t in types]
            return (all(has) or None) if any(has) else False

        if _NONE not in lay.attrs.get(name, {_NONE}):
            return True
        if name in lay.attrs:
            return None
        for holder in ("embeddings", "model"):
            if (h := holds(holder)) is not False:
                return h
        if "language_model" in lay.attrs:
            return None
        value = self.class_attr(ref, "base_model_prefix")
        prefix = _literal(value) if value is not None else ""
        base = lay.attrs.get(prefix, set()) if isinstance(prefix, str) and prefix else set()
        if not base:
            return False
        results = {
            self.input_embeddings(t, depth + 1) if t[0] == "class" and self.is_pretrained(t) else None for t in base
        }
        return results.pop() if len(results) == 1 else None

    def output_embeddings(self, ref: _Sym) -> tuple[str | None, bool]:
        """The name of the module ``get_output_embeddings()`` returns and whether surely so."""
        found = self.method(ref, "get_output_embeddings")
        lay = self.layout(ref)
        if found is None:
            if self.class_attr(ref, "lm_head") is not None or self.method(ref, "lm_head") is not None:
                raise _Unsure("lm_head is a class attribute")
            if "lm_head" not in lay.attrs:
                if lay.dynamic:
                    raise _Unsure("lm_head may be set by code this reading cannot follow")
                return None, True
            inp = self.input_embeddings(ref)
            types = lay.attrs["lm_head"]
            if inp is False or not types - {_NONE}:
                return None, True
            return "lm_head", inp is True and _NONE not in types
        body = [st for st in found[1].body if not (isinstance(st, ast.Expr) and isinstance(st.value, ast.Constant))]
        if len(body) == 1 and isinstance(body[0], ast.Return) and body[0].value is not None:
            if _is_none(body[0].value):
                return None, True
            path: list[str] = []
            expr = body[0].value
            while isinstance(expr, ast.Attribute):
                path.insert(0, expr.attr)
                expr = expr.value
            if isinstance(expr, ast.Name) and expr.id == found[1].args.args[0].arg and path:
                types = {ref}
                sure = True
                for part in path:
                    raw = set().union(
                        *(self.layout(t).attrs.get(part, {_UNKNOWN}) if t[0] == "class" else {_UNKNOWN} for t in types)
                    )
                    sure &= not raw & {_NONE, _UNKNOWN}
                    types = {t for t in raw if t[0] in ("class", "linear", "torch", "list")}
                return ".".join(path), sure and bool(types)
        raise _Unsure("get_output_embeddings is not a plain attribute")

    # -- the answer

    def renamings(self) -> list[tuple[re.Pattern[str], str]]:
        """transformers' key renamings for this architecture (conversion_mapping.py), when they
        are plain ``WeightRenaming``s of literal names; anything else there is unsure."""
        text = _read_text(self.root / "conversion_mapping.py")
        found = [n for n in (self.arch_name, self.model_type) if f'"{n}"' in text or f"'{n}'" in text]
        if not found:
            return []
        name = found[0]
        at = [m.start() for m in re.finditer(re.escape(f'"{name}"'), text)]
        if len(found) > 1 or len(at) != 1 or not text.startswith(f'"{name}": [', at[0]):
            raise _Unsure(f"transformers converts the weights of {name} on load")
        lines = text[text.rfind("\n", 0, at[0]) + 1 :].split("\n", 80)
        for i in range(1, len(lines)):
            try:
                entry = ast.parse("{" + "\n".join(lines[:i]).strip().rstrip(",") + "}", mode="eval").body
                break
            except SyntaxError:
                continue
        else:
            raise _Unsure(f"cannot read the conversion mapping of {name}")
        out = []
        calls = (
            entry.values[0].elts if isinstance(entry, ast.Dict) and isinstance(entry.values[0], ast.List) else [None]
        )
        for call in calls:
            if not (
                isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "WeightRenaming"
            ):
                raise _Unsure(f"transformers converts the weights of {name} on load")
            args = list(call.args) + [k.value for k in call.keywords]
            pair = [a.value if isinstance(a, ast.Constant) else None for a in args]
            source, target = pair if len(pair) == 2 else (None, None)
            if not (
                isinstance(source, str)
                and isinstance(target, str)
                and re.fullmatch(r"\^?(?:\w|\\\.)+", source)
                and re.fullmatch(r"\^?(?:\w|\\?\.)+", target)
            ):
                raise _Unsure(f"transformers renames the weights of {name} by patterns")
            if target.startswith("^") and not source.startswith("^"):
                source = "^" + source
            if re.search(r"[a-zA-Z0-9]$", source):
                source += r"(?!\w)"
            out.append((re.compile(source), target.removeprefix("^").replace("\\.", ".")))
        return out

    def targets(self, skip_modules: list[str] | None) -> list[str]:
        src = self.source(self.module)
        if src is None:
            raise _Unsure(f"no modeling file for model_type {self.model_type!r}")
        if self.arch_name not in src.classes:
            raise _Unsure(f"{self.arch_name} is not defined in {self.module}")
        if any(d.endswith("pytorch_utils.Conv1D") for d in src.aliases.values()):
            raise _Unsure("the model uses GPT-2 style Conv1D layers")
        if not self.is_pretrained(self.arch):
            raise _Unsure(f"{self.arch_name} is not a PreTrainedModel")
        renamings = self.renamings()
        for key in self.tensors:
            for pattern, target in renamings:
                if m := pattern.search(key):
                    key = key.replace(m.group(0), target, 1)
            if key in self.names:
                raise _Unsure(f"two checkpoint keys load as {key!r}")
            self.names.add(key)
        lay = self.layout(self.arch)
        for attr in ("_tied_weights_keys", "all_tied_weights_keys", "_keep_in_fp32_modules"):
            if attr in lay.attrs:
                raise _Unsure(f"{self.arch_name}.__init__ sets {attr}")
        for attr in ("_keys_to_ignore_on_save", "_checkpoint_conversion_mapping"):
            if (value := self.class_attr(self.arch, attr)) is not None and _literal(value):
                raise _Unsure(f"{self.arch_name}.{attr}: the checkpoint's keys differ from the model's")
        sub_tied, fp32_direct, fp32_deep = self.submodels(self.arch, "")
        definite = (set(skip_modules) if skip_modules is not None else set()) | self.fp32(self.arch) | fp32_direct
        maybe = set(fp32_deep)
        sure_virtual: set[str] = set()
        if skip_modules is None:
            # save_pretrained leaves tied parameters out of the checkpoint; the model has them
            # (untied while bnb_targets reads it: transformers builds it under no_tie_weights).
            tie = self.tie_effective()
            own_tied = self.tied_names(self.arch, "")
            if tie is not False:
                (definite if tie else maybe).update(n.removesuffix(".weight") for n in own_tied)
            maybe |= {n.removesuffix(".weight") for n in sub_tied}
            output, output_sure = self.output_embeddings(self.arch)
            if output is not None:
                (definite if output_sure else maybe).add(output)
            sure_virtual = own_tied - self.names if tie else set()
            maybe_virtual = ((own_tied if tie is None else set()) | sub_tied) - self.names - sure_virtual
            lasts, sure = self.walk(self.names | sure_virtual | maybe_virtual) if maybe_virtual else (set(), True)
        last, last_sure = self.walk(self.names | sure_virtual)  # this walk's self.kinds are kept
        if skip_modules is None:
            lasts |= last
            if not (sure and last_sure):
                raise _Unsure("cannot tell the model's last parameter")
            (definite if len(lasts) == 1 else maybe).update(c.removesuffix(".weight") for c in lasts)
        mapping = _read_text(self.root / "conversion_mapping.py")
        for r in self.layouts:
            if r != self.arch and self.is_pretrained(r) and (f'"{r[2]}"' in mapping or f"'{r[2]}'" in mapping):
                raise _Unsure(f"transformers converts the weights of {r[2]} on load")

        linear = []
        for name, kind in self.kinds.items():
            if kind == "linear" and name in self.tensors:  # a renamed or left-out weight has no key to list
                dtype, shape = self.tensors[name]
                if dtype not in _FLOAT_DTYPES or len(shape) != 2:
                    raise _Unsure(f"{name!r} is a {dtype} tensor of shape {shape}, not a float matrix")
                linear.append(name.removesuffix(".weight"))

        try:
            low = [n for n in linear if transformers_should_convert(n, sorted(definite | maybe))]
            high = [n for n in linear if transformers_should_convert(n, sorted(definite))]
        except re.error as e:
            raise _Unsure(f"a skip pattern is not a regex: {e}") from e
        if low != high:
            raise _Unsure(f"an uncertain skip decides {sorted(set(high) - set(low))[:3]}")
        return sorted(high)


def _block(path: Path, head: str, end: str) -> str:
    """The text of ``path`` from ``head`` to the next ``end`` ("" when absent)."""
    text = _read_text(path) if path.is_file() else ""
    start = text.find(head)
    return text[start : text.find(end, start)] if start >= 0 else ""


def _folder(root: Path, model_type: str) -> str:
    """transformers' ``model_type_to_module_name``: the models/ folder of a model_type."""
    auto = root / "models" / "auto"
    special = _block(auto / "auto_mappings.py", "\nSPECIAL_MODEL_TYPE_TO_MODULE_NAME = ", "\n)\n") + _block(
        auto / "configuration_auto.py", "\nSPECIAL_MODEL_TYPE_TO_MODULE_NAME.update(", "\n)\n"
    )
    found = re.search(rf'"{re.escape(model_type)}"\s*[:,]\s*"([\w.]+)"', special)
    folder = found.group(1) if found else model_type.replace("-", "_")
    deprecated = _block(auto / "configuration_auto.py", "\nDEPRECATED_MODELS = [", "]")
    if not folder.isidentifier() or f'"{folder}"' in deprecated:
        raise _Unsure(f"model_type {model_type!r} lives in {folder} (deprecated or nested)")
    return folder


def _env(fn: ast.FunctionDef) -> dict[str, list[ast.expr | None]]:
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


def _merge_list(t: _Sym, extra: set[_Sym]) -> _Sym:
    """A list kind with ``extra`` kinds appended at unknown indices."""
    if t[0] != "list":
        return _UNKNOWN
    every = set(t[2]) | (set().union(*t[1]) if t[1] else set()) | (extra - {_NONE})
    return ("list", None, frozenset(every))


def _names(st: ast.Assign | ast.AnnAssign) -> set[str]:
    """The plain names an assignment binds."""
    targets = st.targets if isinstance(st, ast.Assign) else [st.target]
    return {t.id for t in targets if isinstance(t, ast.Name)}


def _is_none(expr: ast.expr) -> bool:
    return isinstance(expr, ast.Constant) and expr.value is None


def _root_name(expr: ast.expr) -> str | None:
    while isinstance(expr, (ast.Attribute, ast.Subscript)):
        expr = expr.value
    return expr.id if isinstance(expr, ast.Name) else None
