"""``save_quantized`` called on every rank of a process group: one plan, each tensor written by
one owner rank into the shared files, rank 0 commits; the folder is byte for byte the one a
single process writes for the same model.

Two kinds of model:

- **replicated** (no ``DTensor``; quantized or not): every rank holds the model, so every rank
  computes the single-process state dict and plan itself (checked equal), and each writes the
  tensors it owns (the bytes split evenly, in plan order);
- **sharded** (``DTensor`` parameters from FSDP2 or tensor parallelism, float), or a float model
  quantized on the way with a bitsandbytes ``quantization_config``: the state dict is cut into
  units (``quantsave.units``), each with an owner. Units quantized on the way are gathered
  (``full_tensor()``, every rank taking part), quantized and kept by their owner, whose report of
  their sizes completes the plan; float ``DTensor``s are gathered only when written. A rank
  holds its local shards, the quantized tensors it owns and one gathered tensor at a time.

Files: each shard file is created (header, full size) by one rank as a temporary file in rank
0's staging folder; every owner opens it and writes its tensors at their offsets (Rust
``StreamWriter``); then the creators rename the files into place and rank 0 writes the index and
config files and commits the folder. Any failure stops every rank before the commit.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantsave import _core
from quantsave.backends.bitsandbytes.quantizer import BitsAndBytesQuantizer
from quantsave.backends.quantizer import Quantizer
from quantsave.checkpoint.commit import fsync_enabled, staged_directory
from quantsave.checkpoint.plan import (
    CheckpointPlan,
    parse_shard_size,
    plan_checkpoint,
    shared_units,
    storage_identity,
    storage_units,
)
from quantsave.checkpoint.tensors import byte_view, check_tensors, dtype_name
from quantsave.checkpoint.writer import CheckpointFiles, SaveResult, finish_checkpoint, write_checksums
from quantsave.distributed.group import Ranks, balance
from quantsave.errors import NotSerializableError
from quantsave.families import TRANSFORMERS, Family, family_of, is_pipeline
from quantsave.units import SaveUnit, give_back_memory, is_dtensor, model_units, on_the_way, quantize_unit, whole

__all__ = ["SharedFiles", "save_across_ranks", "write_shared"]


@dataclass
class _Tensors:
    """The plan's tensors and how this rank gets the bytes of those it owns."""

    plan: CheckpointPlan
    #: Plan key -> safetensors dtype name and shape.
    specs: dict[str, tuple[str, list[int]]]
    #: Plan key -> owner rank.
    owners: dict[str, int]
    #: Plan key -> a function giving the full tensor; for a sharded source it is a collective,
    #: called on every rank (in plan order), whose result only the owner writes.
    fetch: dict[str, Callable[[], torch.Tensor]]
    collective: set[str] = field(default_factory=set)
    files: CheckpointFiles | None = None


def save_across_ranks(
    model: nn.Module,
    directory: Path,
    options: Any,
    group: Any,
    *,
    weights_name: str | None,
    metadata: dict[str, str] | None,
) -> SaveResult:
    """``save_model`` on every rank of ``group`` (see the module docstring)."""
    from quantsave.save import check_serializable, resolve_quantizer

    ranks = Ranks(group, "save")
    try:
        if is_pipeline(model) or not isinstance(model, nn.Module):
            # Every rank got the same object kind; no exchange needed to refuse it.
            raise ValueError("a save across ranks takes one model (nn.Module); save a pipeline from one process")

        def prepare() -> tuple[Family, Quantizer | None, dict[str, torch.Tensor], list[str]]:
            if not options.safe_serialization:
                raise ValueError("a save across ranks writes safetensors; safe_serialization=False is for one process")
            family = family_of(model)
            quantizer = resolve_quantizer(model, options.quantization_config)
            if quantizer is not None:
                check_serializable(quantizer, True)
            state = dict(model.state_dict())
            targets = on_the_way(model, quantizer)
            sharded = any(is_dtensor(t) for t in state.values())
            if sharded and quantizer is not None and not targets:
                raise NotSerializableError(
                    f"a model with DTensor parameters is saved across ranks unquantized or quantized on the way "
                    f"with a bitsandbytes quantization_config; {quantizer.quant_method} models must be saved "
                    "replicated (every rank holding every module) or from one process. Nothing was written."
                )
            return family, quantizer, state, targets

        family, quantizer, state, targets = ranks.step(prepare, "the checks of the model")
        ranks.agree(_call_fields(model, directory, options, weights_name, metadata, state), "arguments or models")
        from quantsave.save import _weights_name

        weights_name = ranks.step(
            lambda: _weights_name(family, weights_name, options.variant, metadata, True), "the checks of the names"
        )
        limit = parse_shard_size(options.max_shard_size, family.default_max_shard_size)
        if targets or any(is_dtensor(t) for t in state.values()):
            tensors = _sharded(
                ranks, model, family, quantizer, state, targets, (limit, weights_name, options.variant), metadata
            )
        else:
            tensors = ranks.step(
                lambda: _replicated(ranks, model, family, quantizer, (limit, weights_name, options.variant), metadata),
                "the state dict and plan",
            )
        plan = tensors.plan
        ranks.agree({"plan": [plan.keys, plan.shards, plan.file_names, plan.total_size]}, "plans")
        return _write(ranks, directory, tensors, options)
    finally:
        ranks.close()


def _call_fields(
    model: nn.Module, directory: Path, options: Any, weights_name: Any, metadata: Any, state: dict[str, torch.Tensor]
) -> dict[str, Any]:
    """What must be the same on every rank, by field (for the error's sake)."""
    opts = asdict(options)
    config = opts.pop("quantization_config")
    to_dict = getattr(config, "to_dict", None)
    return {
        "save_directory": os.path.abspath(directory),
        **opts,
        "quantization_config": to_dict() if callable(to_dict) else config,
        "weights_name": weights_name,
        "metadata": metadata,
        "model class": type(model).__qualname__,
        "model tensors": [(k, list(t.shape), str(t.dtype)) for k, t in state.items()],
        # torch's float32 mean (the double-quant offset) depends on its intra-op thread count.
        "torch threads (torch.get_num_threads())": torch.get_num_threads(),
    }


def _replicated(
    ranks: Ranks,
    model: nn.Module,
    family: Family,
    quantizer: Quantizer | None,
    naming: tuple[int, str, str | None],
    metadata: dict[str, str] | None,
) -> _Tensors:
    """Every rank computes the single-process state dict and plan; the bytes are split."""
    from quantsave.save import _checkpoint_files, _state_dict

    state_dict = _state_dict(model, family, quantizer, True)
    dtypes = check_tensors(state_dict)
    keys = list(state_dict)
    groups = quantizer.weight_groups(keys) if quantizer is not None else {}
    sizes, units = storage_units(keys, [state_dict[k] for k in keys], groups)
    plan = plan_checkpoint(keys, sizes, units, *naming)
    files = _checkpoint_files(model, family, quantizer, state_dict, metadata, True)
    nbytes = [state_dict[k].numel() * state_dict[k].element_size() for k in keys]
    owners = dict(zip(keys, balance(nbytes, ranks.size), strict=True))
    specs = {k: (dtypes[k], list(state_dict[k].shape)) for k in keys}
    fetch: dict[str, Callable[[], torch.Tensor]] = {k: partial(state_dict.__getitem__, k) for k in keys}
    return _Tensors(plan, specs, owners, fetch, files=files)


def _tie_tokens(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A storage token for each state-dict key, the same on every rank: the first key naming the
    same parameter (tied weights), or, for plain tensors, the same storage; None: stands alone."""
    first_param: dict[int, str] = {}
    param_token: dict[str, str] = {}
    for name, p in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        param_token[name] = first_param.setdefault(id(p), name)
    first_storage: dict[Any, str] = {}
    tokens: dict[str, Any] = {}
    for key, t in state.items():
        if is_dtensor(t):
            tokens[key] = ("param", param_token.get(key, key))
            continue
        raw, _ = storage_identity(t)
        tokens[key] = None if raw is None else ("storage", first_storage.setdefault(raw, key))
    return tokens


def _final_order(
    model: nn.Module, family: Family, units: list[SaveUnit], tokens: dict[str, Any]
) -> list[tuple[str, str]]:
    """``(name written, unit key)`` in the order the single-process save writes them: for
    transformers, tied weights dropped and load-time renamings reverted, by transformers' own
    functions run on stand-in tensors that share storage where the real ones do."""
    keys = [k for u in units for k in u.keys]
    if family is not TRANSFORMERS:
        return [(k, k) for k in keys]
    from quantsave.save import _transformers_state_dict

    shared: dict[Any, torch.Tensor] = {}
    stand_ins = {}
    plain = {k for u in units if u.module is None for k in u.keys}
    for k in keys:
        token = tokens.get(k) if k in plain else None
        stand_ins[k] = torch.empty(1) if token is None else shared.setdefault(token, torch.empty(1))
    refusal = NotSerializableError(
        "this transformers model converts weights on load (e.g. fused MoE experts); saving it across ranks "
        "with sharded or on-the-way quantized weights is not supported yet: save it replicated or from one "
        "process. Nothing was written."
    )
    try:
        out = _transformers_state_dict(model, dict(stand_ins))
    except Exception as e:  # a converter run on stand-ins fails in its own ways
        raise refusal from e
    origin: dict[int, list[str]] = {}
    for k, t in stand_ins.items():
        origin.setdefault(id(t), []).append(k)
    order = []
    for name, t in out.items():
        if name in stand_ins and stand_ins[name] is t:
            order.append((name, name))
        elif len(origin.get(id(t), [])) == 1:
            order.append((name, origin[id(t)][0]))
        else:
            raise refusal
    return order


def _sharded(
    ranks: Ranks,
    model: nn.Module,
    family: Family,
    quantizer: Quantizer | None,
    state: dict[str, torch.Tensor],
    targets: list[str],
    naming: tuple[int, str, str | None],
    metadata: dict[str, str] | None,
) -> _Tensors:
    """Units, owners, the quantization on the way, the sizes gathered, the plan."""
    from quantsave.conversions import converted_quantized
    from quantsave.save import _checkpoint_files

    config = quantizer.config if isinstance(quantizer, BitsAndBytesQuantizer) else None

    def setup() -> tuple[list[SaveUnit], dict[str, Any], list[tuple[str, str]]]:
        units = model_units(model, state, targets, config)
        if family is TRANSFORMERS and quantizer is not None:
            keys = [k for u in units for k in u.keys]
            merged = converted_quantized(model, quantizer.weight_groups(keys))
            if merged:
                raise NotSerializableError(
                    f"transformers split checkpoint tensors into several quantized layers (e.g. {merged[:2]}); "
                    "such models cannot be saved. Nothing was written."
                )
        tokens = _tie_tokens(model, state)
        return units, tokens, _final_order(model, family, units, tokens)

    units, tokens, order = ranks.step(setup, "the units of the state dict")
    source_bytes = [sum(state[s].numel() * state[s].element_size() for s in u.sources) for u in units]
    unit_owner = balance(source_bytes, ranks.size)

    # Quantization on the way: every rank takes part in gathering a sharded layer, its owner
    # quantizes it and keeps the result (a fraction of the float size) until it is written.
    held: dict[str, torch.Tensor] = {}
    report: dict[str, tuple[str, list[int], Any, int]] = {}
    error: BaseException | None = None
    for u, owner in zip(units, unit_owner, strict=True):
        if u.module is None:
            continue
        mine = owner == ranks.rank
        if any(is_dtensor(state[s]) for s in u.sources):
            with ranks.collective(f"the gathering of {u.module!r}"):
                sources = {s: whole(state[s]) for s in u.sources}
        elif mine:
            sources = {s: state[s] for s in u.sources}
        else:
            continue
        if not mine or error is not None:
            del sources
            give_back_memory()
            continue
        try:
            out = quantize_unit(model, u, sources, config)
            dtypes = check_tensors(out)
            sizes, unit_ids = storage_units(list(out), list(out.values()), {})
            for (k, t), size, uid in zip(out.items(), sizes, unit_ids, strict=True):
                token = None if uid is None else ("unit", u.module, uid)
                report[k] = (dtypes[k], list(t.shape), token, size)
            held.update(out)
        except Exception as e:  # noqa: BLE001 - reported to every rank below
            error = e
        del sources
        give_back_memory()
    ranks.check(error, "the quantization on the way")

    def plain_reports() -> dict[str, tuple[str, list[int], Any, int]]:
        plain = {}
        local = {k: state[k] for u in units if u.module is None for k in u.keys if not is_dtensor(state[k])}
        dtypes = check_tensors(local)
        for u in units:
            if u.module is not None:
                continue
            (k,) = u.keys
            t = state[k]
            if is_dtensor(t):
                name = dtype_name(t.dtype, f"tensor {k!r}")
                plain[k] = (name, list(t.shape), tokens[k], t.numel() * t.element_size())
            else:
                plain[k] = (dtypes[k], list(t.shape), tokens[k], storage_identity(t)[1])
        return plain

    plain = ranks.step(plain_reports, "the checks of the tensors")
    every = ranks.gather(report, "the exchange of the quantized sizes")
    for r in every:
        plain.update(r)
    keys = [name for name, _ in order]
    origin = dict(order)
    identities = [(plain[origin[k]][2], plain[origin[k]][3]) for k in keys]
    groups = quantizer.weight_groups([origin[k] for k in keys]) if quantizer is not None else {}
    groups = {k: groups[origin[k]] for k in keys if origin[k] in groups}
    sizes, unit_ids = shared_units(keys, identities, groups)
    plan = plan_checkpoint(keys, sizes, unit_ids, *naming)

    owner_of_unit_key = {k: o for u, o in zip(units, unit_owner, strict=True) for k in u.keys}
    specs = {k: (plain[origin[k]][0], plain[origin[k]][1]) for k in keys}
    owners = {k: owner_of_unit_key[origin[k]] for k in keys}
    fetch: dict[str, Callable[[], torch.Tensor]] = {}
    collective = set()
    quantized = {k for u in units if u.module is not None for k in u.keys}
    for k in keys:
        src = origin[k]
        if src in quantized:
            # Held by the owner only (the others never fetch it).
            fetch[k] = partial(held.__getitem__, src)
        else:
            fetch[k] = partial(whole, state[src])
            if is_dtensor(state[src]):
                collective.add(k)
    # (bitsandbytes adds no header metadata of its own, so no state dict is needed here.)
    files = _checkpoint_files(model, family, quantizer, {}, metadata, True)
    return _Tensors(plan, specs, owners, fetch, collective, files)


class SharedFiles:
    """The shard files of one plan in a staging folder shared by the ranks: created by one rank
    each, filled by every owner, renamed into place by their creators."""

    def __init__(self, ranks: Ranks, stage: Path, plan: CheckpointPlan, specs: dict[str, tuple[str, list[int]]],
                 header: dict[str, str]) -> None:  # fmt: skip
        self.ranks, self.stage, self.plan, self.header = ranks, stage, plan, header
        self.file_specs = [[(k, *specs[k]) for k in names] for _, names in plan.shard_keys()]
        self.creators = [i % ranks.size for i in range(len(plan.file_names))]
        self.created: dict[int, Any] = {}
        self.attached: dict[int, Any] = {}
        self.temps: dict[int, str] = {}

    def create(self) -> None:
        def make() -> dict[int, str]:
            mine = {}
            for i, name in enumerate(self.plan.file_names):
                if self.creators[i] == self.ranks.rank:
                    w = _core.StreamWriter(self.stage / name, self.file_specs[i], self.header, shared=True)
                    self.created[i] = w
                    mine[i] = str(w.temp_path)
            return mine

        mine = self.ranks.step(make, "the creation of the shard files")
        for temps in self.ranks.gather(mine, "the exchange of the file names"):
            self.temps.update(temps)

    def writer(self, i: int) -> Any:
        if i in self.created:
            return self.created[i]
        if i not in self.attached:
            name = self.plan.file_names[i]
            self.attached[i] = _core.StreamWriter.attach(
                self.stage / name, self.temps[i], self.file_specs[i], self.header
            )
        return self.attached[i]

    def sync(self) -> None:
        """Syncs (when fsync is on) and closes the files this rank attached to."""
        for w in self.attached.values():
            w.finish(fsync=fsync_enabled())
        self.attached.clear()

    def commit(self, checksums: bool) -> dict[int, tuple[int, str | None]]:
        """Renames this rank's files into place; their sizes (and sha256 when asked)."""
        done: dict[int, tuple[int, str | None]] = {}
        for i, w in sorted(self.created.items()):
            size = w.finish(fsync=fsync_enabled())
            done[i] = (size, None)
        if checksums:
            names = [self.plan.file_names[i] for i in done]
            for i, digest in zip(done, _core.sha256_files([str(self.stage / n) for n in names]), strict=True):
                done[i] = (done[i][0], digest)
        self.created.clear()
        return done

    def abort(self) -> None:
        for w in self.created.values():
            w.abort()
        self.created.clear()
        self.attached.clear()


def _write(ranks: Ranks, directory: Path, tensors: _Tensors, options: Any) -> SaveResult:
    assert tensors.files is not None
    plan = tensors.plan
    shard_of = {k: i for i, (_, names) in enumerate(plan.shard_keys()) for k in names}

    def fill(shared: SharedFiles) -> None:
        # Every rank walks the plan in order, taking part in each gather of a sharded tensor;
        # a rank that failed keeps taking part (so no rank waits in vain) and reports after.
        error: BaseException | None = None
        for k in plan.keys:
            mine = tensors.owners[k] == ranks.rank
            if k in tensors.collective:
                with ranks.collective(f"the gathering of {k!r}"):
                    t = tensors.fetch[k]()
            elif mine and error is None:
                t = tensors.fetch[k]()
            else:
                continue
            if mine and error is None:
                try:
                    shared.writer(shard_of[k]).write(k, byte_view(t))
                except Exception as e:  # noqa: BLE001 - reported to every rank below
                    error = e
            del t
            if k in tensors.collective:
                give_back_memory()
        if error is not None:
            raise error
        shared.sync()

    return write_shared(ranks, directory, plan, tensors.specs, tensors.files, options.checksums, fill)


def write_shared(
    ranks: Ranks,
    directory: Path,
    plan: CheckpointPlan,
    specs: dict[str, tuple[str, list[int]]],
    files: CheckpointFiles,
    checksums: bool,
    fill: Callable[[SharedFiles], None],
) -> SaveResult:
    """Writes ``plan`` into ``directory`` with every rank: rank 0 stages the folder (checked
    visible to all), the shard files are created, ``fill`` writes this rank's share, the
    creators complete their files, rank 0 writes checksums, index and config files and commits.
    A failure anywhere, before the commit, leaves ``directory`` as it was on every rank."""
    result = SaveResult(directory=directory, num_shards=len(plan.shards))
    with ExitStack() as stack:
        marker = f".ranks.{os.getpid()}-{os.urandom(4).hex()}.quantsave.tmp"

        def open_stage() -> str | None:
            if ranks.rank != 0:
                return None
            stage = stack.enter_context(staged_directory(directory, fsync=fsync_enabled(), rewritten=plan.file_names))
            (stage / marker).write_text(marker, encoding="utf-8")
            return str(stage)

        stage_name = ranks.broadcast(ranks.step(open_stage, "the creation of the staging folder"), "the stage", 0)
        marker = ranks.broadcast(marker, "the stage", 0)
        stage = Path(stage_name)

        def see_stage() -> None:
            try:
                seen = (stage / marker).read_text(encoding="utf-8")
            except OSError as e:
                raise FileNotFoundError(
                    f"cannot see the staging folder {stage} that rank 0 created: the output folder must be on a "
                    f"filesystem every rank shares ({e.strerror})"
                ) from e
            if seen != marker:
                raise FileNotFoundError(f"the staging folder {stage} holds another save's files")

        ranks.step(see_stage, "the check that every rank sees the folder")
        shared = SharedFiles(ranks, stage, plan, specs, files.header_metadata)
        stack.callback(shared.abort)
        shared.create()
        ranks.step(lambda: fill(shared), "the writing of the tensors")
        done = ranks.step(lambda: shared.commit(checksums), "the completion of the shard files")
        every: dict[int, tuple[int, str | None]] = {}
        for part in ranks.gather(done, "the exchange of the file sizes"):
            every.update(part)
        result.files.extend(plan.file_names)
        result.total_bytes = sum(size for size, _ in every.values())

        def finish() -> list[str]:
            if ranks.rank == 0:
                (stage / marker).unlink(missing_ok=True)
                hashes = {plan.file_names[i]: h for i, (_, h) in every.items()} if checksums else None
                write_checksums(stage, hashes, result)  # type: ignore[arg-type]
                finish_checkpoint(stage, plan, files, result)
                stack.close()  # the commit
            return result.files

        result.files = ranks.broadcast(ranks.step(finish, "the commit"), "the result", 0)
    return result
