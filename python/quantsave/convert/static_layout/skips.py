"""transformers' default skip rules, read from the source: the tied weights
(``_tied_weights_keys`` with ``tie_word_embeddings`` from config.json or the configuration class's
default), ``_keep_in_fp32_modules`` (the model's and its PreTrainedModel children's) and the module
``get_output_embeddings()`` returns. The last parameter's module comes from ``keys.walk``."""

from __future__ import annotations

import ast
import re

from quantsave.convert.static_layout.classes import ClassIndex
from quantsave.convert.static_layout.interpret import Interpreter
from quantsave.convert.static_layout.kinds import NONE, UNKNOWN, Sym
from quantsave.convert.static_layout.source import (
    Arch,
    assigned_names,
    dotted,
    is_none,
    literal,
    parse_source,
    parse_tree,
)
from quantsave.convert.static_layout.unsure import Unsure

__all__ = ["fp32", "output_embeddings", "submodels", "tie_effective", "tied_names"]

# get_expanded_tied_weights_keys: mappings outside this regex are expanded against the parameters.
_TIED_COMMON = re.compile(r"^[A-Za-z0-9_\.]+(weight)|(bias)$")


def tie_effective(arch: Arch) -> bool | None:
    """``config.tie_word_embeddings`` as transformers reads it; None when unsure."""
    path = arch.root / "models" / arch.folder / f"configuration_{arch.folder}.py"
    if not path.is_file():
        return None
    for n in ast.walk(parse_tree(path)):
        if (isinstance(n, ast.Attribute) and n.attr == "tie_word_embeddings") or (
            isinstance(n, ast.Constant) and n.value == "tie_word_embeddings"
        ):
            return None  # the config class computes or renames it
    src = parse_source(path, f"transformers.models.{arch.folder}.configuration_{arch.folder}")
    for node in src.classes.values():
        mt = [st.value for st in node.body if isinstance(st, ast.Assign) and "model_type" in assigned_names(st)]
        if not (mt and isinstance(mt[0], ast.Constant) and mt[0].value == arch.model_type):
            continue
        bases = [(dotted(src, b) or "").rpartition(".")[2] for b in node.bases]
        if bases not in (["PreTrainedConfig"], ["PretrainedConfig"]):
            return None
        value = arch.config.get("tie_word_embeddings", ...)
        if value is not ...:
            return value if isinstance(value, bool) else None
        for st in node.body:
            if isinstance(st, ast.AnnAssign) and "tie_word_embeddings" in assigned_names(st):
                default = st.value
                return default.value if isinstance(default, ast.Constant) and isinstance(default.value, bool) else None
        return False  # not a field: getattr(config, "tie_word_embeddings", False)
    return None


def tied_names(classes: ClassIndex, ref: Sym, prefix: str, names: set[str]) -> set[str]:
    """The parameters in ``ref``'s tied weights mapping (get_expanded_tied_weights_keys), prefixed;
    ``names`` are the checkpoint's keys as the model names them."""
    value = classes.class_attr(ref, "_tied_weights_keys")
    tied = literal(value) if value is not None else None
    if tied is None:
        return set()
    if not isinstance(tied, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tied.items()):
        raise Unsure(f"{ref[2]}._tied_weights_keys is not a dict of names")
    found = set(tied) | set(tied.values())
    if not all(_TIED_COMMON.match(n) for n in found):
        # Expanded by regex search over the parameter names: the checkpoint's, plus the tied
        # targets it may lack, which are exact names when the mapping holds no regex.
        if not all(re.fullmatch(r"[\w.]+", n) for n in found):
            raise Unsure(f"{ref[2]}._tied_weights_keys holds regex patterns")
        params = {k.removeprefix(prefix) for k in names if k.startswith(prefix)} | found
        expanded: set[str] = set()
        for target, source in tied.items():
            targets = {p for p in params if re.search("^" + target, p)}
            sources = {p for p in params if re.search("^" + source, p)}
            if not sources or not targets or len(targets) % len(sources):
                raise Unsure(f"{ref[2]}._tied_weights_keys does not expand cleanly")
            expanded |= targets | sources
        found = expanded
    return {prefix + n for n in found}


def fp32(classes: ClassIndex, ref: Sym) -> set[str]:
    """``ref``'s ``_keep_in_fp32_modules``."""
    value = classes.class_attr(ref, "_keep_in_fp32_modules")
    names = literal(value) if value is not None else None
    if names is None:
        return set()
    if not isinstance(names, (list, tuple, set)) or not all(isinstance(n, str) for n in names):
        raise Unsure(f"{ref[2]}._keep_in_fp32_modules is not a list of names")
    return set(names)


def submodels(
    interp: Interpreter, ref: Sym, prefix: str, names: set[str], depth: int = 0
) -> tuple[set[str], set[str], set[str]]:
    """Tied parameters, ``_keep_in_fp32_modules`` of the direct ``PreTrainedModel`` children
    (gathered by transformers' ``post_init``) and the deeper ones (maybe gathered)."""
    tied: set[str] = set()
    fp32_direct: set[str] = set()
    fp32_deep: set[str] = set()
    if depth > 6:
        raise Unsure("submodels nest too deep")
    for name, types in interp.layout(ref).attrs.items():
        for t in types:
            if t[0] == "class" and interp.classes.is_pretrained(t):
                strict = interp.classes.class_attr(t, "_keep_in_fp32_modules_strict")
                if strict is not None and literal(strict):
                    raise Unsure(f"{t[2]}._keep_in_fp32_modules_strict: quantize-on-load upcasts those to float32")
                p = f"{prefix}{name}."
                tied |= tied_names(interp.classes, t, p, names)
                (fp32_direct if len(types - {NONE}) == 1 else fp32_deep).update(fp32(interp.classes, t))
                sub_tied, sub_direct, sub_deep = submodels(interp, t, p, names, depth + 1)
                tied |= sub_tied
                fp32_deep |= sub_direct | sub_deep
    return tied, fp32_direct, fp32_deep


def _input_embeddings(interp: Interpreter, ref: Sym, depth: int = 0) -> bool | None:
    """Whether ``get_input_embeddings()`` returns (True) or raises NotImplementedError (False)."""
    classes = interp.classes
    found = classes.method(ref, "get_input_embeddings")
    if found is not None:
        return None if any(isinstance(n, ast.Raise) for n in ast.walk(found[1])) else True
    lay = interp.layout(ref)
    value = classes.class_attr(ref, "_input_embed_layer")
    name = literal(value) if value is not None else "embed_tokens"
    if lay.dynamic or depth > 4 or not isinstance(name, str):
        return None

    def holds(attr: str) -> bool | None:
        types = lay.attrs.get(attr, set()) - {NONE}
        has = [t[0] == "class" and name in interp.layout(t).attrs for t in types]
        return (all(has) or None) if any(has) else False

    if NONE not in lay.attrs.get(name, {NONE}):
        return True
    if name in lay.attrs:
        return None
    for holder in ("embeddings", "model"):
        if (h := holds(holder)) is not False:
            return h
    if "language_model" in lay.attrs:
        return None
    value = classes.class_attr(ref, "base_model_prefix")
    prefix = literal(value) if value is not None else ""
    base = lay.attrs.get(prefix, set()) if isinstance(prefix, str) and prefix else set()
    if not base:
        return False
    results = {
        _input_embeddings(interp, t, depth + 1) if t[0] == "class" and classes.is_pretrained(t) else None for t in base
    }
    return results.pop() if len(results) == 1 else None


def output_embeddings(interp: Interpreter, ref: Sym) -> tuple[str | None, bool]:
    """The name of the module ``get_output_embeddings()`` returns and whether surely so."""
    classes = interp.classes
    found = classes.method(ref, "get_output_embeddings")
    lay = interp.layout(ref)
    if found is None:
        if classes.class_attr(ref, "lm_head") is not None or classes.method(ref, "lm_head") is not None:
            raise Unsure("lm_head is a class attribute")
        if "lm_head" not in lay.attrs:
            if lay.dynamic:
                raise Unsure("lm_head may be set by code this reading cannot follow")
            return None, True
        inp = _input_embeddings(interp, ref)
        types = lay.attrs["lm_head"]
        if inp is False or not types - {NONE}:
            return None, True
        return "lm_head", inp is True and NONE not in types
    fn = found[1]
    body = [st for st in fn.body if not (isinstance(st, ast.Expr) and isinstance(st.value, ast.Constant))]
    if len(body) == 1 and isinstance(body[0], ast.Return) and body[0].value is not None:
        expr = body[0].value
        if is_none(expr):
            return None, True
        path: list[str] = []
        while isinstance(expr, ast.Attribute):
            path.insert(0, expr.attr)
            expr = expr.value
        self_name = fn.args.args[0].arg if fn.args.args else None
        if isinstance(expr, ast.Name) and expr.id == self_name and path:
            return ".".join(path), _surely_module(interp, ref, path)
    raise Unsure("get_output_embeddings is not a plain attribute")


def _surely_module(interp: Interpreter, ref: Sym, path: list[str]) -> bool:
    """Whether ``self.<path>`` surely is a module (never None nor unknown) in a ``ref``."""
    types = {ref}
    sure = True
    for part in path:
        raw = set().union(
            *(interp.layout(t).attrs.get(part, {UNKNOWN}) if t[0] == "class" else {UNKNOWN} for t in types)
        )
        sure &= not raw & {NONE, UNKNOWN}
        types = {t for t in raw if t[0] in ("class", "linear", "torch", "list")}
    return sure and bool(types)
