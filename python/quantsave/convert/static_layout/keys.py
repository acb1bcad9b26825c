"""The checkpoint's keys as the model names them: transformers' renamings on load
(conversion_mapping.py, plain ``WeightRenaming``s only), and the walk of every key from the
architecture class down the attributes' kinds, which tells an nn.Linear weight from any other
tensor and finds the candidates for the model's last parameter."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from typing import Any

from quantsave.convert.static_layout.interpret import Interpreter
from quantsave.convert.static_layout.kinds import BUFFER, LINEAR, NONE, PARAM, TORCH, UNKNOWN, Sym
from quantsave.convert.static_layout.source import Arch, read_text
from quantsave.convert.static_layout.unsure import Unsure

__all__ = ["Walk", "checkpoint_names", "refuse_converted", "refuse_legacy", "renamings", "walk"]

Renaming = tuple[re.Pattern[str], str]
# transformers' "legacy" renamings, applied on load to every model (conversion_mapping.py).
_LEGACY = re.compile(
    r"LayerNorm.(gamma|beta)(?!\w)|.weight_[gv](?!\w)|^(model\.language_model|language_model\.model)\.model(?!\w)"
)


def refuse_legacy(tensors: dict[str, Any]) -> None:
    """Raises Unsure when transformers' legacy renamings apply to a checkpoint key."""
    bad = next((k for k in tensors if _LEGACY.search(k)), None)
    if bad is not None:
        raise Unsure(f"{bad!r} is renamed by transformers on load")


def renamings(arch: Arch) -> list[Renaming]:
    """transformers' key renamings for this architecture (conversion_mapping.py), when they
    are plain ``WeightRenaming``s of literal names; anything else there is unsure."""
    text = read_text(arch.root / "conversion_mapping.py")
    found = [n for n in (arch.name, arch.model_type) if _mentioned(text, n)]
    if not found:
        return []
    name = found[0]
    at = [m.start() for m in re.finditer(re.escape(f'"{name}"'), text)]
    if len(found) > 1 or len(at) != 1 or not text.startswith(f'"{name}": [', at[0]):
        raise Unsure(f"transformers converts the weights of {name} on load")
    entry = _entry(text[text.rfind("\n", 0, at[0]) + 1 :], name)
    calls = entry.values[0].elts if isinstance(entry, ast.Dict) and isinstance(entry.values[0], ast.List) else [None]
    return [_renaming(call, name) for call in calls]


def _entry(text: str, name: str) -> ast.expr:
    """The ``{"<name>": [...]}`` entry that ``text`` starts with, parsed."""
    lines = text.split("\n", 80)
    for i in range(1, len(lines)):
        try:
            return ast.parse("{" + "\n".join(lines[:i]).strip().rstrip(",") + "}", mode="eval").body
        except SyntaxError:
            continue
    raise Unsure(f"cannot read the conversion mapping of {name}")


def _renaming(call: ast.expr | None, name: str) -> Renaming:
    """The pattern and replacement of ``WeightRenaming(source, target)``."""
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "WeightRenaming"):
        raise Unsure(f"transformers converts the weights of {name} on load")
    args = list(call.args) + [k.value for k in call.keywords]
    pair = [a.value if isinstance(a, ast.Constant) else None for a in args]
    source, target = pair if len(pair) == 2 else (None, None)
    if not (
        isinstance(source, str)
        and isinstance(target, str)
        and re.fullmatch(r"\^?(?:\w|\\\.)+", source)
        and re.fullmatch(r"\^?(?:\w|\\?\.)+", target)
    ):
        raise Unsure(f"transformers renames the weights of {name} by patterns")
    if target.startswith("^") and not source.startswith("^"):
        source = "^" + source
    if re.search(r"[a-zA-Z0-9]$", source):
        source += r"(?!\w)"
    return re.compile(source), target.removeprefix("^").replace("\\.", ".")


def _mentioned(text: str, name: str) -> bool:
    return f'"{name}"' in text or f"'{name}'" in text


def checkpoint_names(tensors: dict[str, Any], renames: list[Renaming]) -> set[str]:
    """The checkpoint's keys renamed as transformers loads them; two loading as one is unsure."""
    names: set[str] = set()
    for key in tensors:
        for pattern, target in renames:
            if m := pattern.search(key):
                key = key.replace(m.group(0), target, 1)
        if key in names:
            raise Unsure(f"two checkpoint keys load as {key!r}")
        names.add(key)
    return names


def refuse_converted(interp: Interpreter, arch: Arch) -> None:
    """Raises Unsure when conversion_mapping.py names a PreTrainedModel class the reading used
    other than the architecture (whose renamings ``renamings`` read)."""
    mapping = read_text(arch.root / "conversion_mapping.py")
    for r in interp.built():
        if r != arch.ref and interp.classes.is_pretrained(r) and _mentioned(mapping, r[2]):
            raise Unsure(f"transformers converts the weights of {r[2]} on load")


@dataclass(frozen=True)
class Walk:
    """What walking a set of keys found."""

    kinds: dict[str, str]  # every key -> "linear" (an nn.Linear's weight) or "other"
    lasts: set[str]  # the candidates for the last name of the model's named_parameters()
    sure: bool  # whether the model surely holds a parameter


def walk(interp: Interpreter, arch: Arch, keys: set[str]) -> Walk:
    """Walks ``keys`` from the architecture class down the attributes; raises Unsure when a key
    is unexplained or may or may not be an nn.Linear weight."""
    trie: dict[str, Any] = {}
    for key in keys:
        node = trie
        *path, leaf = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
            if node is None:
                raise Unsure(f"{key!r} nests under a tensor")
        if leaf in node:
            raise Unsure(f"{key!r} is also a module")
        node[leaf] = None
    walker = _Walker(interp, arch.name)
    walker.explain(trie, "", {arch.ref})
    lasts, sure = walker.last_param(trie, "")
    return Walk(walker.kinds, lasts, sure)


class _Walker:
    """One walk: the kinds that can hold each module prefix (``survivors``) and each key's kind."""

    def __init__(self, interp: Interpreter, arch_name: str) -> None:
        self.interp, self.arch_name = interp, arch_name
        self.survivors: dict[str, list[Sym]] = {}
        self.kinds: dict[str, str] = {}

    def explain(self, node: dict[str, Any], prefix: str, types: set[Sym]) -> None:
        """Checks that a module of one of ``types`` holds every key under ``node`` (a trie of
        the keys below ``prefix``); records the kinds that can and whether each tensor is an
        nn.Linear weight."""
        survivors = [t for t in types - {NONE} if self._fits(t, node)]
        if not survivors:
            raise Unsure(f"no module of {prefix or self.arch_name!r} holds {sorted(node)[:4]}")
        self.survivors[prefix] = survivors
        for c, sub in node.items():
            name = f"{prefix}.{c}" if prefix else c
            if sub is None:
                kinds = {k for t in survivors if (k := _tensor_kind(self.interp, t, c)) is not None}
                if len(kinds) != 1:
                    raise Unsure(f"{name!r} may or may not be an nn.Linear weight")
                self.kinds[name] = kinds.pop()
            else:
                self.explain(sub, name, set().union(*(_child(self.interp, t, c) for t in survivors)) - {NONE})

    def _fits(self, t: Sym, node: dict[str, Any]) -> bool:
        return all(
            (_tensor_kind(self.interp, t, c) is not None) if sub is None else bool(_child(self.interp, t, c) - {NONE})
            for c, sub in node.items()
        )

    def last_param(self, node: dict[str, Any], prefix: str) -> tuple[set[str], bool]:
        """Candidates for the last name of ``named_parameters()`` under ``prefix``; True when
        the module surely holds a parameter."""
        cands: set[str] = set()
        sure = True
        for t in self.survivors[prefix]:
            c, s = self._last_in(t, node, prefix)
            cands |= c
            sure &= s
        return cands, sure and bool(cands)

    def _last_in(self, t: Sym, node: dict[str, Any], prefix: str) -> tuple[set[str], bool]:
        join = (prefix + ".") if prefix else ""
        if t == LINEAR or t[0] == "torch":
            params = [p for p in (TORCH["Linear"] if t == LINEAR else TORCH[t[1]])[0] if p in node]
            return ({join + params[-1]}, True) if params else (set(), False)
        cands: set[str] = set()
        if t[0] == "list":
            for c in sorted((c for c in node if c.isdigit() and node[c] is not None), key=_index, reverse=True):
                cc, s = self.last_param(node[c], join + c)
                cands |= cc
                if s:
                    return cands, True
            return cands, False
        lay = self.interp.layout(t)
        children = [c for c in node if node[c] is not None]
        own = [c for c in node if node[c] is None and PARAM in lay.attrs.get(c, set())]
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


def _child(interp: Interpreter, t: Sym, name: str) -> set[Sym]:
    """The module kinds ``name`` can be inside a module of kind ``t``."""
    if t[0] == "class":
        lay = interp.layout(t)
        if name not in lay.attrs:
            if lay.dynamic:
                raise Unsure(f"{t[2]} registers attributes this reading cannot name")
            return set()
        types = lay.attrs[name] - {PARAM, BUFFER}
        return types if types - {NONE} else set()
    if t[0] == "list":
        if not name.isdigit():
            return set()
        per, every = t[1], t[2]
        return set(every) | (set(per[_index(name)]) if per is not None and _index(name) < len(per) else set())
    if t in (LINEAR,) or t[0] == "torch":
        return set()
    raise Unsure(f"a module this reading cannot classify ({t})")


def _tensor_kind(interp: Interpreter, t: Sym, name: str) -> str | None:
    """"linear" for an nn.Linear's weight, "other" for any other tensor, None: not in ``t``."""
    if t == LINEAR:
        return "linear" if name == "weight" else "other" if name == "bias" else None
    if t[0] == "torch":
        return "other" if name in TORCH[t[1]][0] + TORCH[t[1]][1] else None
    if t[0] == "list":
        return None
    if t[0] == "class":
        lay = interp.layout(t)
        types = lay.attrs.get(name)
        if types is None:
            if lay.dynamic:
                raise Unsure(f"{t[2]} registers attributes this reading cannot name")
            return None
        if UNKNOWN in types:
            raise Unsure(f"{t[2]}.{name} is built by code this reading cannot follow")
        return "other" if types & {PARAM, BUFFER} else None
    raise Unsure(f"a module this reading cannot classify ({t})")


def _index(name: str) -> int:
    """The list index a key part names (``isdigit`` also holds for digits ``int`` refuses)."""
    try:
        return int(name)
    except ValueError as e:
        raise Unsure(f"{name!r} is not a list index") from e
