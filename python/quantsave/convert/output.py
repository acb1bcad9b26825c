"""The output side of ``convert``: every output tensor in state-dict order, its dtype and shape
(bitsandbytes' layout, from ``backends/bitsandbytes/layout``) and the op producing it; the
source's order against the model's; what transformers records (dtype, parameter count)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from quantsave import _core
from quantsave.backends.bitsandbytes import layout as bnb_layout
from quantsave.backends.bitsandbytes.config import BitsAndBytesConfig
from quantsave.checkpoint.tensors import NAME_TO_DTYPE
from quantsave.checkpoint.writer import timed
from quantsave.conversions import KeyPlan, plan_keys, realize, saved_layout
from quantsave.convert.dtypes import Dtypes
from quantsave.convert.made import made_offset
from quantsave.convert.source import FLOATS, Source, torch_name
from quantsave.errors import CheckpointError
from quantsave.families import TRANSFORMERS, Family

__all__ = [
    "Output",
    "SourceOrder",
    "model_order",
    "natural_key",
    "output_dtype",
    "parameter_count",
    "plan_output",
    "planned_across",
    "saved_order",
    "stored_dtypes",
]


@dataclass
class Output:
    """The planned output: tensors in state-dict order with their dtype and shape, the ops
    producing them (output names, shard filled in later) and the quantized weight groups.
    ``sizes`` overrides the bytes the shard planner counts for a key and ``storages`` puts keys in
    one unit (tensors sharing one storage in the reference's model: counted once, never split)."""

    keys: list[str] = field(default_factory=list)
    specs: dict[str, tuple[str, list[int]]] = field(default_factory=dict)
    ops: list[tuple[Any, ...]] = field(default_factory=list)
    parameters: int = 0
    ordered: bool = False  # keys are already in the order the reference saves them
    sizes: dict[str, int] = field(default_factory=dict)
    storages: dict[str, str] = field(default_factory=dict)


@dataclass
class SourceOrder:
    """The source tensors as the model takes them: ``pairs`` (checkpoint key, model key) in the
    model's state-dict order, and the model parameters fused from several checkpoint tensors."""

    pairs: list[tuple[str, str]]
    plan: KeyPlan

    @property
    def model_keys(self) -> dict[str, str]:
        """Model key -> the checkpoint key it is read from (1:1 tensors)."""
        return {m: k for k, m in self.pairs}


def model_order(model: nn.Module, family: Family, source: Source) -> SourceOrder:
    """The source tensors in the model's state-dict order, under the names the model gives them
    (for transformers, its own renaming, fusing and ignore rules); checks that they match the model."""
    expected = model.state_dict(keep_vars=True)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {}) if family is TRANSFORMERS else set()
    plan = plan_keys(model, source.tensors)
    if plan.unexpected:
        raise CheckpointError(
            f"checkpoint in {source.folder} holds {len(plan.unexpected)} tensor(s) the model does not have, "
            f"e.g. {plan.unexpected[:3]}"
        )
    split = [f.sources[0][0] for f in plan.fused.values() if len(f.converter.target_patterns) > len(f.sources)]
    if split:
        raise CheckpointError(
            f"checkpoint in {source.folder}: transformers splits {len(split)} tensor(s), e.g. {split[:2]}, into "
            "several parameters on load (a fused qkv or in_proj); convert does not stream such checkpoints (and "
            "transformers' own quantized save of such a model does not load back)"
        )
    by_model = {m: k for k, m in plan.renamed.items()}
    provided = set(by_model) | set(plan.fused)
    missing = [k for k in expected if k not in provided and k not in tied]
    if missing:
        raise CheckpointError(
            f"checkpoint in {source.folder} lacks {len(missing)} weight(s) the model needs, e.g. {missing[:3]}"
        )
    for m, k in by_model.items():
        shape = source.tensors[k][2]
        if list(expected[m].shape) != shape:
            raise CheckpointError(
                f"checkpoint in {source.folder}: tensor {k!r} has shape {shape}, "
                f"the model expects {list(expected[m].shape)}"
            )
    for m, fused in plan.fused.items():
        shape = list(_fused_meta(model, source, m, plan).shape)
        if list(expected[m].shape) != shape:
            raise CheckpointError(
                f"checkpoint in {source.folder}: {len(fused.sources)} tensor(s) fused into {m!r} give shape "
                f"{shape}, the model expects {list(expected[m].shape)}"
            )
    # transformers does not save tied weights.
    pairs = [(by_model[m], m) for m in expected if m in by_model and m not in tied]
    return SourceOrder(pairs, plan)


def _fused_meta(model: nn.Module, source: Source, key: str, plan: KeyPlan) -> torch.Tensor:
    """The fused parameter ``key`` as transformers' converter builds it, on the meta device."""
    metas = {}
    for k, _ in plan.fused[key].sources:
        _, dtype, shape = source.tensors[k]
        metas[k] = torch.empty(shape, dtype=NAME_TO_DTYPE[dtype], device="meta")
    return realize(model, key, plan.fused[key], metas)


def stored_dtypes(source: Source, order: SourceOrder) -> dict[str, str]:
    """Model key -> the dtype its checkpoint tensor(s) are stored in."""
    stored = {m: source.tensors[k][1] for k, m in order.pairs}
    for m, fused in order.plan.fused.items():
        stored[m] = source.tensors[fused.sources[0][0]][1]
    return stored


def output_dtype(model: nn.Module, written: dict[str, str], targets: set[str]) -> torch.dtype:
    """The dtype transformers records: its model's first floating parameter once loaded (the
    quantized weights are uint8 then); ``written``: model key -> the dtype it is written in."""
    for name, _ in model.named_parameters():
        dtype = written.get(name)
        if dtype in FLOATS and name.removesuffix(".weight") not in targets:
            return FLOATS[dtype]
    return torch.float32


def parameter_count(model: nn.Module, targets: set[str], config: BitsAndBytesConfig) -> int:
    """transformers' ``total_parameters`` of the quantized model: a packed 4-bit weight counts
    two values per stored byte; tied weights count once (the skeleton, built as from_pretrained
    builds it, is not tied yet)."""
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    total = 0
    for name, p in model.named_parameters():
        if name in tied:
            continue
        n = p.numel()
        if config.bits == 4 and name.endswith(".weight") and name[: -len(".weight")] in targets:
            n = bnb_layout.logical_parameters(bnb_layout.packed_bytes(n))
        total += n
    return total


def saved_order(
    model: nn.Module, source: Source, order: SourceOrder, out: Output, dtypes: Dtypes | None = None
) -> None:
    """Renames ``out`` (model names) to the names transformers' ``save_pretrained`` writes after
    ``from_pretrained`` (its weight conversions reverted: fused experts split back into the
    checkpoint's per-expert tensors, copied, cast as their fused parameter is) and puts it in
    that order."""
    fused_casts = {
        k: cast
        for m, f in order.plan.fused.items()
        if (cast := (dtypes or Dtypes()).tensors.get(m)) is not None
        for k, _ in f.sources
        if source.tensors[k][1] != cast
    }
    metas: dict[str, tuple[torch.dtype, list[int]]] = {
        k: (NAME_TO_DTYPE[dtype], shape) for k, (dtype, shape) in out.specs.items()
    }
    for m in order.plan.fused:
        t = _fused_meta(model, source, m, order.plan)
        cast = (dtypes or Dtypes()).tensors.get(m)
        metas[m] = (NAME_TO_DTYPE[cast] if cast else t.dtype, list(t.shape))
    layout = saved_layout(model, order.plan, metas)
    fused_sources = {k for f in order.plan.fused.values() for k, _ in f.sources}
    rename: dict[str, str] = {}
    keys: list[str] = []
    specs: dict[str, tuple[str, list[int]]] = {}
    members: dict[int, list[tuple[str, int]]] = {}
    for name, model_key, storage, nbytes in layout:
        members.setdefault(storage, []).append((name, nbytes))
        if model_key is None or model_key in order.plan.fused:
            if name not in fused_sources:
                raise CheckpointError(
                    f"checkpoint in {source.folder}: transformers saves a fused parameter back as {name!r}, "
                    "which the checkpoint does not hold"
                )
            file, dtype, shape = source.tensors[name]
            cast = fused_casts.get(name)
            specs[name] = (cast or dtype, list(shape))
            out.ops.append(("copy", file, name, name, cast))
        else:
            rename[model_key] = name
            specs[name] = out.specs[model_key]
        keys.append(name)
    # huggingface_hub's splitter: tensors sharing a storage are sized once, at the first one, and
    # follow it into its shard.
    for group in members.values():
        if len(group) > 1:
            for i, (member, nbytes) in enumerate(group):
                out.storages[member] = f"storage:{group[0][0]}"
                out.sizes[member] = nbytes if i == 0 else 0
    out.keys = keys
    out.specs = specs
    out.ops = [_renamed(op, rename) for op in out.ops]
    out.ordered = True


def _renamed(op: tuple[Any, ...], rename: dict[str, str]) -> tuple[Any, ...]:
    """An op with its output names (model names) replaced by the saved ones."""
    kind = op[0]

    def r(name: str) -> str:
        return rename.get(name, name)

    if kind == "copy":  # (kind, file, name, target, cast)
        return (*op[:3], r(op[3]), op[4])
    if kind == "bytes":  # (kind, data, target)
        return (op[0], op[1], r(op[2]))
    if kind == "int8":  # (kind, file, name, rows, cols, weight, scb, cast, transposed)
        return (*op[:5], r(op[5]), r(op[6]), *op[7:])
    # quant4: (kind, file, name, qt, bs, packed, absmax, nested, cast, transposed)
    nested = op[7] if op[7] is None else (op[7][0], r(op[7][1]))
    return (*op[:5], r(op[5]), r(op[6]), nested, *op[8:])


def natural_key(name: str) -> list[tuple[Any, ...]]:
    """transformers' ``dot_natural_key``: dot-separated parts, numbers (whole or trailing)
    compared as numbers."""
    parts: list[tuple[Any, ...]] = []
    for part in name.split("."):
        if part.isdigit():
            parts.append((0, int(part)))
            continue
        text = part.rstrip("0123456789")
        digits = part[len(text) :]
        parts.append((1, text, int(digits)) if digits else (1, text))
    return parts


#: The ranks of a conversion across processes, while it plans (see ``planned_across``).
_RANKS: ContextVar[Any] = ContextVar("quantsave_convert_ranks", default=None)

#: A double-quant offset request: source file, tensor, blocksize, cast, transposed.
OffsetRequest = tuple[str, str, int, "str | None", bool]


@contextmanager
def planned_across(ranks: Any) -> Iterator[None]:
    """Plans under ``ranks`` (a ``distributed.group.Ranks``): the double-quant offsets, one pass
    over each quantized weight, are computed by the ranks in parallel and shared."""
    token = _RANKS.set(ranks)
    try:
        yield
    finally:
        _RANKS.reset(token)


def _absmax_offset(file: str, key: str, blocksize: int, cast: str | None, flip: bool) -> float:
    """The double-quant offset of a weight: the mean of its blocks' absmax (one pass in Rust)."""
    raw = _core.absmax_4bit(file, key, blocksize, cast=cast, transposed=flip)
    # (an empty weight has no absmax: torch's mean of nothing is nan)
    return torch.frombuffer(bytearray(raw), dtype=torch.float32).mean().item() if raw else float("nan")


def plan_output(
    source: Source,
    pairs: list[tuple[str, str]],
    targets: set[str],
    config: BitsAndBytesConfig,
    dtypes: Dtypes | None = None,
    transposed: set[str] | None = None,
) -> Output:
    """Every output tensor in state-dict order (a quantized Linear's weight, bias, then its
    quantization state, as bitsandbytes' layers list them), under its model name, and the op
    producing it (``pairs``: checkpoint key, model key; ``dtypes``: the casts quantize-on-load
    applies, see ``convert.dtypes``; ``transposed``: target modules whose weight is stored
    ``[in, out]``, GPT-2's ``Conv1D``)."""
    ranks = _RANKS.get()

    def offset_of(file: str, key: str, blocksize: int, cast: str | None, flip: bool) -> float:
        with timed("offsets"):
            if key in source.derived:
                return made_offset(source, key, blocksize, cast, flip)
            return _absmax_offset(file, source.names.get(key, key), blocksize, cast, flip)

    if ranks is None or not (config.bits == 4 and config.bnb_4bit_use_double_quant):
        return _plan_output(source, pairs, targets, config, dtypes, transposed, offset_of)
    from quantsave.distributed.group import balance

    wanted: list[OffsetRequest] = []

    def record(*request: Any) -> float:
        wanted.append(request)
        return 0.0

    _plan_output(source, pairs, targets, config, dtypes, transposed, record)
    owners = balance([_core.dtype_nbytes(*source.tensors[key][1:]) for _, key, *_ in wanted], ranks.size)

    def compute() -> dict[OffsetRequest, float]:
        return {req: offset_of(*req) for req, o in zip(wanted, owners, strict=True) if o == ranks.rank}

    table: dict[OffsetRequest, float] = {}
    for part in ranks.gather(ranks.step(compute, "the double-quant offsets"), "the exchange of the offsets"):
        table.update(part)
    return _plan_output(source, pairs, targets, config, dtypes, transposed, lambda *req: table[req])


def _plan_output(
    source: Source,
    pairs: list[tuple[str, str]],
    targets: set[str],
    config: BitsAndBytesConfig,
    dtypes: Dtypes | None,
    transposed: set[str] | None,
    offset_of: Callable[..., float],
) -> Output:
    out = Output()
    dtypes = dtypes or Dtypes()
    transposed = transposed or set()

    def add(name: str, dtype: str, shape: list[int]) -> None:
        out.keys.append(name)
        out.specs[name] = (dtype, shape)

    models = {m for _, m in pairs}
    pending: dict[str, _Weight] = {}  # module -> its weight, until its bias (if any) is listed
    for key, model_key in pairs:
        file, dtype, shape = source.tensors[key]
        module, _, leaf = model_key.rpartition(".")
        if leaf == "weight" and module in targets:
            if dtype not in FLOATS or len(shape) != 2:
                raise ValueError(f"{key!r} is {dtype} {shape}; only 2-D F32/BF16/F16 Linear weights can be quantized")
            flip = module in transposed
            rows, cols = (shape[1], shape[0]) if flip else (shape[0], shape[1])
            add(model_key, *bnb_layout.weight_spec(rows, cols, config.bits))
            weight = _Weight(key, model_key, rows, cols, flip)
            bias = f"{module}.bias"
            if bias in models and bias not in out.specs:
                pending[module] = weight
            else:
                _add_state(out, add, source, weight, config, dtypes.model, offset_of)
            continue
        cast = dtypes.tensors.get(model_key)
        add(model_key, cast or dtype, list(shape))
        out.ops.append(("copy", file, key, model_key, cast))
        if leaf == "bias" and module in pending:
            _add_state(out, add, source, pending.pop(module), config, dtypes.model, offset_of)
    return out


@dataclass
class _Weight:
    """A weight to quantize: its checkpoint key, model key, logical ``[rows, cols]`` (the Linear
    weight's) and whether the checkpoint stores it transposed."""

    key: str
    model_key: str
    rows: int
    cols: int
    transposed: bool


def _add_state(
    out: Output,
    add: Any,
    source: Source,
    w: _Weight,
    config: BitsAndBytesConfig,
    cast: str | None,
    offset_of: Callable[..., float],
) -> None:
    """The tensors a quantized weight keeps beside itself (``bnb_layout.state_specs``), and the
    op producing them all (``cast``: the dtype the weight is cast to before quantizing, None
    for as stored)."""
    file, dtype, _ = source.tensors[w.key]
    key, model_key, rows, cols, flip = w.key, w.model_key, w.rows, w.cols, w.transposed
    cast = cast if cast != dtype else None
    qt, bs, offset = config.bnb_4bit_quant_type, bnb_layout.BLOCKSIZE, None
    if config.bits == 4 and config.bnb_4bit_use_double_quant:
        offset = offset_of(str(source.files[file]), key, bs, cast, flip)
    quantized_as = torch_name(cast or dtype)
    if key in source.quantized_as:
        quantized_as = str(source.quantized_as[key](NAME_TO_DTYPE[cast or dtype])).removeprefix("torch.")
    state = bnb_layout.quant_state_json(qt, quantized_as, [rows, cols], offset) if config.bits == 4 else b""
    specs = bnb_layout.state_specs(
        model_key, rows, cols, bits=config.bits, quant_type=qt, double=offset is not None, state_len=len(state)
    )
    for spec in specs:
        add(*spec)
    # 8-bit: SCB, weight_format; 4-bit: absmax, quant_map[, nested_absmax, nested_quant_map], quant state.
    names = [name for name, _, _ in specs]
    if config.bits == 8:
        out.ops.append(("int8", file, key, rows, cols, model_key, names[0], cast, flip))
        out.ops.append(("bytes", bnb_layout.WEIGHT_FORMAT, names[1]))
        return
    out.ops.append(("bytes", bytes(_core.code_4bit(qt)), names[1]))
    nested = None
    if offset is not None:
        nested = (offset, names[2])
        out.ops.append(("bytes", bytes(_core.dynamic_map()), names[3]))
    out.ops.append(("bytes", state, names[-1]))
    out.ops.append(("quant4", file, key, qt, bs, model_key, names[0], nested, cast, flip))
