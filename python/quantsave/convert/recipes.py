"""A key-conversion function (diffusers' single-file converters) run without reading a weight:
it runs on meta tensors while a torch function mode records how each tensor it returns is made
from the source tensors (its *recipe*: the torch calls, with the sources as leaves). A recipe is
replayed on the memory-mapped source when its tensor is written, so only that tensor is resident,
and the conversion's arithmetic is the reference's own, call for call.

A converter that looks at tensor values (``.item()``, a data-dependent branch) cannot run on meta
tensors; ``record`` then raises ``Unrecordable`` and the caller may run it on the real tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["Call", "Item", "Leaf", "Recipe", "Unrecordable", "evaluate", "held", "leaves", "record"]


class Unrecordable(RuntimeError):
    """The conversion function cannot run on meta tensors."""


@dataclass(frozen=True, eq=False)
class Leaf:
    """A source tensor, by its key."""

    key: str


@dataclass(frozen=True, eq=False)
class Call:
    """The result of a torch call; ``args``/``kwargs`` hold recipes where tensors were;
    ``in_place``: the call mutated its first argument (replayed on a copy of it)."""

    func: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    in_place: bool = False


@dataclass(frozen=True, eq=False)
class Item:
    """Element ``index`` of a call that returned several tensors (``chunk``, ``split``)."""

    parent: Call
    index: int


Recipe = Leaf | Call | Item


class _Recorder(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        # id -> (tensor, recipe); the tensor is held so that its id is never reused meanwhile.
        self.recipes: dict[int, tuple[torch.Tensor, Recipe]] = {}

    def recipe(self, t: torch.Tensor) -> Recipe | None:
        entry = self.recipes.get(id(t))
        return entry[1] if entry is not None and entry[0] is t else None

    def _encode(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            found = self.recipe(obj)
            if found is not None:
                return found
            if obj.device.type == "meta":
                raise Unrecordable("the conversion made a tensor the recording cannot follow")
            return obj  # a constant made by the converter on the CPU
        if isinstance(obj, list | tuple):
            return type(obj)(self._encode(o) for o in obj)
        if isinstance(obj, dict):
            return {k: self._encode(v) for k, v in obj.items()}
        return obj

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        try:
            result = func(*args, **kwargs)
        except (NotImplementedError, RuntimeError) as e:  # data-dependent: .item(), nonzero, ...
            raise Unrecordable(f"{getattr(func, '__name__', func)} needs tensor values: {e}") from e
        name = getattr(func, "__name__", "")
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        in_place = first is not None and (
            (name.endswith("_") and not name.endswith("__"))
            or (name.startswith("__i") and name.endswith("__"))
            or name == "__setitem__"
        )
        if in_place and first is not None and first._base is not None and self.recipe(first._base) is not None:
            raise Unrecordable(f"{name} writes into a view of another tensor")
        if not _tensors_in(result) and not in_place:
            return result
        call = Call(func, self._encode(tuple(args)), self._encode(kwargs), in_place)
        if in_place:
            self.recipes[id(args[0])] = (args[0], call)
            if result is args[0] or result is None:
                return result
        if isinstance(result, torch.Tensor):
            self.recipes[id(result)] = (result, call)
        elif isinstance(result, list | tuple):
            for i, r in enumerate(result):
                if isinstance(r, torch.Tensor):
                    self.recipes[id(r)] = (r, Item(call, i))
        return result


def _tensors_in(result: Any) -> bool:
    if isinstance(result, torch.Tensor):
        return True
    return isinstance(result, list | tuple) and any(isinstance(r, torch.Tensor) for r in result)


def record(
    convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    specs: dict[str, tuple[torch.dtype, list[int]]],
) -> dict[str, tuple[Recipe, torch.dtype, list[int]]]:
    """Runs ``convert`` on meta tensors of ``specs`` (key -> dtype, shape); each output key's
    recipe, dtype and shape.

    Raises:
        Unrecordable: the function needs tensor values, or returned something not made from
            the sources by torch calls.
    """
    recorder = _Recorder()
    sources = {}
    for key, (dtype, shape) in specs.items():
        t = torch.empty(shape, dtype=dtype, device="meta")
        recorder.recipes[id(t)] = (t, Leaf(key))
        sources[key] = t
    with recorder:
        converted = convert(sources)
    out: dict[str, tuple[Recipe, torch.dtype, list[int]]] = {}
    for key, t in converted.items():
        if not isinstance(t, torch.Tensor):
            raise Unrecordable(f"the conversion returned a {type(t).__name__} for {key!r}")
        found = recorder.recipe(t)
        if found is None:
            if t.device.type == "meta":
                raise Unrecordable(f"the conversion made {key!r} in a way the recording cannot follow")
            found = held(t)
        out[key] = (found, t.dtype, list(t.shape))
    return out


def held(t: torch.Tensor) -> Recipe:
    """The recipe of a tensor that exists already (a constant the converter made, or the
    output of a conversion run on the real tensors): it is its own value."""
    return Call(_same, (t,), {})


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def evaluate(recipe: Recipe, source: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """The tensor a recipe makes, with ``source(key)`` giving each source tensor (never
    written: an in-place call is replayed on a copy)."""
    memo: dict[int, Any] = {}

    def value(r: Any) -> Any:
        if isinstance(r, Leaf):
            return source(r.key)
        if isinstance(r, Item):
            return run(r.parent)[r.index]
        if isinstance(r, Call):
            return run(r)
        if isinstance(r, list | tuple):
            return type(r)(value(o) for o in r)
        if isinstance(r, dict):
            return {k: value(v) for k, v in r.items()}
        return r

    def run(call: Call) -> Any:
        if id(call) not in memo:
            args = list(value(call.args))
            kwargs = value(call.kwargs)
            if call.in_place:
                args[0] = args[0].clone()
                result = call.func(*args, **kwargs)
                memo[id(call)] = args[0] if result is None else result
            else:
                memo[id(call)] = call.func(*args, **kwargs)
        return memo[id(call)]

    try:
        result = value(recipe)
    finally:
        memo.clear()  # (the closures form a cycle: without this the intermediates wait for the GC)
    if not isinstance(result, torch.Tensor):
        raise TypeError(f"a recipe made a {type(result).__name__}, not a tensor")
    return result


def leaves(recipe: Recipe) -> set[str]:
    """The source keys a recipe reads."""
    found: set[str] = set()
    seen: set[int] = set()

    def walk(r: Any) -> None:
        if isinstance(r, Leaf):
            found.add(r.key)
        elif isinstance(r, Item):
            walk(r.parent)
        elif isinstance(r, Call):
            if id(r) in seen:
                return
            seen.add(id(r))
            walk(r.args)
            walk(r.kwargs)
        elif isinstance(r, list | tuple):
            for o in r:
                walk(o)
        elif isinstance(r, dict):
            for o in r.values():
                walk(o)

    walk(recipe)
    return found
