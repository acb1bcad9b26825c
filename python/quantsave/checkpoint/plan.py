"""The shard plan: weight groups -> shards, file names, weight map and index metadata. Save,
convert and (next) distributed save all produce a ``CheckpointPlan``; one writer consumes it.

Sharding is greedy in state-dict order, as ``huggingface_hub.split_torch_state_dict_into_shards``
(an oversize unit gets its own shard), done by the Rust planner; the tensors of one quantized
weight are one unit and never split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from quantsave import _core
from quantsave.checkpoint.names import index_file_name, shard_file_names
from quantsave.checkpoint.tensors import is_wrapper_subclass, subclass_nbytes

__all__ = [
    "CheckpointPlan",
    "parse_shard_size",
    "plan_checkpoint",
    "shared_units",
    "storage_identity",
    "storage_units",
]


@dataclass(frozen=True)
class CheckpointPlan:
    """Which tensors go into which file, under which names."""

    keys: list[str]
    #: For each shard, the indices into ``keys`` of its tensors.
    shards: list[list[int]]
    file_names: list[str]
    total_size: int
    weights_name: str
    variant: str | None

    @property
    def sharded(self) -> bool:
        return len(self.shards) > 1

    @property
    def index_name(self) -> str:
        return index_file_name(self.weights_name, self.variant)

    def weight_map(self) -> dict[str, str]:
        """Tensor name -> file name."""
        return {self.keys[i]: name for idx, name in zip(self.shards, self.file_names, strict=True) for i in idx}

    def shard_keys(self) -> list[tuple[str, list[str]]]:
        """Each file name with its tensor names, in plan order."""
        return [(name, [self.keys[i] for i in idx]) for idx, name in zip(self.shards, self.file_names, strict=True)]


def parse_shard_size(value: int | str | None, default: str) -> int:
    """``max_shard_size`` in bytes: an int, a string with decimal units (``"5GB"``), or None for
    ``default``.

    Raises:
        ValueError: not an int or size string, or not positive.
    """
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"max_shard_size must be an int (bytes) or a string like '5GB', got {value!r}")
    size = _core.parse_size(value) if isinstance(value, str) else value
    if size <= 0:
        raise ValueError(f"max_shard_size must be positive, got {value!r}")
    return size


def plan_checkpoint(
    keys: list[str],
    sizes: list[int],
    groups: list[Any],
    max_shard_size: int,
    weights_name: str,
    variant: str | None = None,
) -> CheckpointPlan:
    """Plans the files for ``keys`` (in state-dict order) of ``sizes`` bytes; keys with the same
    non-None ``groups`` entry are one unit."""
    ids: dict[Any, int] = {}
    unit_ids = [None if g is None else ids.setdefault(g, len(ids)) for g in groups]
    shards, total_size = _core.plan_shards(sizes, unit_ids, max_shard_size)
    names = shard_file_names(weights_name, variant, len(shards))
    return CheckpointPlan(list(keys), shards, names, total_size, weights_name, variant)


def storage_identity(t: torch.Tensor) -> tuple[Any, int]:
    """A tensor's storage as ``storage_units`` counts it: ``(token, bytes)``. Tensors with the
    same non-None token share one storage (all empty tensors do); a None token stands alone."""
    if is_wrapper_subclass(t):
        return None, subclass_nbytes(t)
    storage = t.untyped_storage()
    if t.numel() and not storage.resizable():
        return None, t.numel() * t.element_size()
    return (str(t.device), storage.data_ptr(), storage.nbytes()), storage.nbytes()


def storage_units(
    keys: list[str], tensors: list[torch.Tensor], groups: dict[str, str]
) -> tuple[list[int], list[int | None]]:
    """Sizes and unit ids of in-memory tensors for ``plan_checkpoint``.

    As the reference, a tensor counts its whole storage, and tensors sharing a storage (all
    empty tensors included) are placed with the first of them and counted once. External memory
    torch did not allocate (non-resizable, e.g. a memory-mapped checkpoint) is the exception:
    each tensor counts its own bytes and stands alone. Tensors of one quantized weight
    (``groups``: key -> group name) are one unit as well.
    """
    return shared_units(keys, [storage_identity(t) for t in tensors], groups)


def shared_units(
    keys: list[str], identities: list[tuple[Any, int]], groups: dict[str, str]
) -> tuple[list[int], list[int | None]]:
    """``storage_units`` from each key's ``storage_identity`` (tokens need only be equal where
    storages are shared, so a distributed save can name them the same on every rank)."""
    parent = list(range(len(keys)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_of: dict[Any, int] = {}
    sizes = []
    for i, (key, (token, size)) in enumerate(zip(keys, identities, strict=True)):
        if token is None:
            sizes.append(size)
        elif ("storage", token) in first_of:
            parent[find(i)] = find(first_of["storage", token])
            sizes.append(0)
        else:
            first_of["storage", token] = i
            sizes.append(size)
        if key in groups:
            gid = ("group", groups[key])
            if gid in first_of:
                parent[find(i)] = find(first_of[gid])
            else:
                first_of[gid] = i
    roots = [find(i) for i in range(len(keys))]
    members: dict[int, int] = {}
    for r in roots:
        members[r] = members.get(r, 0) + 1
    return sizes, [r if members[r] > 1 else None for r in roots]
