"""The sweep: for every transformers causal-LM model type, the encoder families chosen in
``tools/sweep_models.py`` and every diffusers ``ModelMixin`` class with Linear layers, a tiny random
model is checked against the reference (quantize on load + ``save_pretrained``) for nf4 with double
quant and for int8:

- ``convert``: ``quantsave.convert(float folder)`` writes the reference's files;
- ``save``: ``quantsave.save_quantized(reference model)`` writes what its ``save_pretrained`` writes;
- ``load``: ``quantsave.load_quantized(reference folder)`` gives the outputs the reference's own
  ``from_pretrained`` of that folder gives (the model it saved, where it cannot load the folder
  back), on fixed inputs (``tools/sweep_models.py``), compared exactly; a class without inputs in
  the table gets ``n/a`` after its loaded tensors are compared with the reference's.

Files compare by the tests' rule (``tests/conftest.py:check_against_reference``: identical bytes,
except that where the reference split a quantized weight across shards only the keys, index
metadata and config must agree), with the tests' bitsandbytes pin (imported from conftest). Each
case runs in a fresh process (forked from a server that imported the libraries once) with a
timeout. A case whose reference fails (the model does not build, or transformers/diffusers cannot
quantize or save it) is listed and not counted.

Usage:
    python tools/sweep.py [--family transformers|diffusers|all] [--sample] [--only NAME,...]
                          [--configs nf4-dq,int8] [--shard none|40KB|all] [--json OUT]
                          [--workers N] [--timeout SECONDS] [--list]

Without ``--sample``: every model, unsharded, in the source's dtype, plus the sample's sharded and
bf16 cases. ``--sample``: the fixed sample that ``tests/test_sweep.py`` runs. Exit status 1 when a
counted case fails a column.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
for _path in (ROOT / "tests", ROOT / "tools"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import sweep_models  # noqa: E402

from conftest import check_against_reference, files_equal, split_groups  # noqa: E402  (also pins bitsandbytes)

CONFIGS: dict[str, dict[str, Any]] = {
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "int8": dict(load_in_8bit=True),
}
SHARD = "40KB"
COLUMNS = ("reference", "convert", "save", "load")
IDS = [[1, 5, 9, 33, 64, 2, 7, 100]]
DECODER_IDS = [[0, 4, 8, 12]]


@dataclass(frozen=True)
class Case:
    """One model with one quantization config, unsharded or sharded, in one source dtype."""

    model: str
    config: str
    shard: str | None = None
    dtype: str = "float32"

    @property
    def family(self) -> str:
        """diffusers classes are CamelCase; transformers entries are lower-case model types."""
        return "diffusers" if self.model[:1].isupper() else "transformers"

    @property
    def name(self) -> str:
        extra = [x for x in (self.shard, "bf16" if self.dtype == "bfloat16" else None) if x]
        return " ".join([self.model, self.config, *extra])

    @classmethod
    def parse(cls, text: str) -> Case:
        """The inverse of ``name``: ``"llama nf4-dq 40KB bf16"``."""
        model, config, *extra = text.split()
        return cls(model, config, SHARD if SHARD in extra else None, "bfloat16" if "bf16" in extra else "float32")


@dataclass
class Outcome:
    """One column's result: ``ok``, ``fail``, ``n/a`` (with the reason) or, for the reference,
    ``fails`` (the case is not counted)."""

    state: str
    reason: str = ""

    def cell(self) -> str:
        return self.state if not self.reason else f"{self.state}: {self.reason}"


@dataclass
class Result:
    case: Case
    columns: dict[str, Outcome] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def counted(self) -> bool:
        ref = self.columns.get("reference")
        return ref is not None and ref.state == "ok"


# ----------------------------------------------------------------------------------------------
# models, references, inputs


def _short(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def diffusers_bnb_on_cpu() -> Iterator[None]:
    """Lifts only diffusers' "No GPU found" check, as the tests' ``diffusers_bnb_on_cpu`` fixture
    does (restored on exit)."""
    from diffusers.quantizers.bitsandbytes import bnb_quantizer

    classes: tuple[Any, ...] = (bnb_quantizer.BnB4BitDiffusersQuantizer, bnb_quantizer.BnB8BitDiffusersQuantizer)
    saved = [cls.__dict__.get("validate_environment") for cls in classes]
    for cls in classes:
        cls.validate_environment = lambda self, *a, **k: None
    try:
        yield
    finally:
        for cls, original in zip(classes, saved, strict=True):
            if original is None:
                del cls.validate_environment
            else:
                cls.validate_environment = original


def build_model(case: Case) -> Any:
    """The tiny float model (seed 0), in the case's dtype."""
    torch.manual_seed(0)
    if case.family == "diffusers":
        model = sweep_models.build_diffusers(case.model)
    else:
        model = sweep_models.build_transformers(case.model)
    return model.to(getattr(torch, case.dtype)).eval()


def load_reference(case: Case, src: Path) -> Any:
    """The reference's quantize-on-load of the float folder."""
    if case.family == "diffusers":
        diffusers: Any = importlib.import_module("diffusers")
        cls = getattr(diffusers, case.model.split(":")[0])
        qc = diffusers.BitsAndBytesConfig(**CONFIGS[case.config])
        with diffusers_bnb_on_cpu():
            return cls.from_pretrained(
                src, quantization_config=qc, device_map="cpu", torch_dtype=getattr(torch, case.dtype)
            )
    transformers: Any = importlib.import_module("transformers")
    cls = getattr(transformers, sweep_models.transformers_class(case.model))
    return cls.from_pretrained(src, quantization_config=transformers.BitsAndBytesConfig(**CONFIGS[case.config]),
                               device_map="cpu")


def reload_reference(case: Case, folder: Path) -> Any:
    """The reference's ``from_pretrained`` of its own pre-quantized folder.

    Raises:
        ValueError: the reference's own loading report lists keys of its folder it did not load
            or weights it did not find (its save and load do not round-trip).
    """
    if case.family == "diffusers":
        diffusers: Any = importlib.import_module("diffusers")
        cls = getattr(diffusers, case.model.split(":")[0])
        with diffusers_bnb_on_cpu():
            model, info = cls.from_pretrained(
                folder, device_map="cpu", torch_dtype=getattr(torch, case.dtype), output_loading_info=True
            )
    else:
        transformers: Any = importlib.import_module("transformers")
        model, info = getattr(transformers, sweep_models.transformers_class(case.model)).from_pretrained(
            folder, device_map="cpu", output_loading_info=True
        )
    for what in ("unexpected_keys", "missing_keys", "mismatched_keys"):
        if info.get(what):
            keys = sorted(map(str, info[what]))
            raise ValueError(f"its loading report lists {len(keys)} {what.replace('_', ' ')}, e.g. {keys[0]}")
    return model.eval()


def model_inputs(case: Case, model: Any) -> dict[str, Any] | None:
    """The forward inputs of the load comparison (None: none in the table)."""
    if case.family == "diffusers":
        return sweep_models.diffusers_inputs(case.model, dtype=getattr(torch, case.dtype))
    kind = sweep_models.transformers_inputs(case.model)
    if kind is None:
        return None
    inputs: dict[str, Any] = {"input_ids": torch.tensor(IDS)}
    if getattr(model.config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = torch.tensor(DECODER_IDS)
    return inputs


def first_output(out: Any) -> torch.Tensor:
    """The first output tensor (logits, last_hidden_state, sample, ...)."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state", "sample"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    first = out[0] if isinstance(out, (tuple, list)) else out.to_tuple()[0]
    return first_output(first)


def run_forward(model: Any, inputs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return first_output(model(**inputs))


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> str | None:
    """None when equal (NaNs in the same places count as equal), else what differs."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return f"outputs differ: {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}"
    equal = (a == b) | (a.isnan() & b.isnan()) if a.is_floating_point() else a == b
    if bool(equal.all()):
        return None
    diff = (a.float() - b.float()).abs().nan_to_num(float("inf"))
    return f"outputs differ: {int((~equal).sum())}/{a.numel()} values, max |diff| {float(diff.max()):.3g}"


def same_state(model: Any, ref: Any) -> str | None:
    """None when the two state dicts hold the same keys and tensors, else the first difference."""
    a, b = model.state_dict(), ref.state_dict()
    if set(a) != set(b):
        only = sorted(set(a) ^ set(b))
        return f"state dict keys differ, e.g. {only[0]}"
    for key in a:
        differ = same_tensor(a[key], b[key])
        if differ is not None:
            return f"{key}: " + differ.replace("outputs differ", "tensors differ")
    return None


# ----------------------------------------------------------------------------------------------
# file comparison


def _tensors(folder: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    from safetensors import safe_open

    out: dict[str, tuple[str, tuple[int, ...], bytes]] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                t = f.get_tensor(key)
                raw = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                out[key] = (str(t.dtype).removeprefix("torch."), tuple(t.shape), raw)
    return out


def _json_diff(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            where = f"{path}.{key}" if path else str(key)
            if key not in a:
                out.append(f"{where} missing")
            elif key not in b:
                out.append(f"{where} extra")
            else:
                out += _json_diff(a[key], b[key], where)
        return out
    return [] if a == b else [f"{path}: {json.dumps(a)[:40]} vs {json.dumps(b)[:40]}"]


def describe_mismatch(ours: Path, ref: Path, index_name: str) -> str:
    """A short account of why ``check_against_reference`` refused ``ours``."""
    notes: list[str] = []
    missing = sorted(p.name for p in ref.iterdir() if not (ours / p.name).is_file())
    extra = sorted(p.name for p in ours.iterdir() if not (ref / p.name).is_file())
    if missing:
        notes.append("missing " + ", ".join(missing))
    if extra:
        notes.append("extra " + ", ".join(extra))
    for name in ("config.json", index_name, "generation_config.json"):
        if (ours / name).is_file() and (ref / name).is_file():
            a, b = json.loads((ours / name).read_text()), json.loads((ref / name).read_text())
            if name == index_name:
                if split_groups(a.get("weight_map", {})):
                    notes.append("quantsave split a weight")
                a, b = a.get("metadata"), b.get("metadata")
            diff = _json_diff(a, b)
            if diff:
                notes.append(f"{name}: " + "; ".join(diff[:3]) + (f" (+{len(diff) - 3})" if len(diff) > 3 else ""))
    if not any(n.startswith("missing") for n in notes):
        mine, theirs = _tensors(ours), _tensors(ref)
        keys_only = sorted(set(theirs) - set(mine))
        keys_extra = sorted(set(mine) - set(theirs))
        if keys_only:
            notes.append(f"{len(keys_only)} reference keys not written, e.g. {keys_only[0]}")
        if keys_extra:
            notes.append(f"{len(keys_extra)} keys the reference lacks, e.g. {keys_extra[0]}")
        for key in sorted(set(mine) & set(theirs)):
            (da, sa, ba), (db, sb, bb) = mine[key], theirs[key]
            if (da, sa) != (db, sb):
                notes.append(f"{key}: {da}{list(sa)} vs reference {db}{list(sb)}")
                break
            if ba != bb:
                notes.append(f"{key}: values differ")
                break
        if not notes:
            notes.append("same tensors and JSON, bytes differ: " + ", ".join(files_equal(ours, ref)))
    return "; ".join(notes)


def compare_folders(ours: Path, ref: Path, index_name: str) -> Outcome:
    try:
        check_against_reference(ours, ref, index_name)
    except Exception:  # noqa: BLE001 - the assertions carry no message outside pytest
        return Outcome("FAIL", describe_mismatch(ours, ref, index_name))
    return Outcome("ok")


# ----------------------------------------------------------------------------------------------
# one case


def run_case(case: Case, workdir: Path, report: Callable[[str, Outcome], None] | None = None) -> Result:
    """Runs the four columns of one case in this process (files under ``workdir``); ``report``
    hears each column as it finishes (and ``("start", Outcome(column))`` before it starts)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _run_case(case, workdir, report)


def _run_case(case: Case, workdir: Path, report: Callable[[str, Outcome], None] | None) -> Result:
    import quantsave as qs

    result = Result(case)
    started = time.perf_counter()

    def record(column: str, outcome: Outcome) -> None:
        result.columns[column] = outcome
        if report is not None:
            report(column, outcome)

    def begin(column: str) -> None:
        if report is not None:
            report("start", Outcome(column))

    index = ("diffusion_pytorch_model" if case.family == "diffusers" else "model") + ".safetensors.index.json"
    src, hf = workdir / "float", workdir / "reference"
    shard_kw: dict[str, Any] = {"max_shard_size": case.shard} if case.shard else {}

    begin("reference")
    stage = "build"
    try:
        model = build_model(case)
        if not any(isinstance(m, torch.nn.Linear) for m in model.modules()):
            raise ValueError("no nn.Linear layer: nothing for bitsandbytes to quantize")
        stage = "save float"
        model.save_pretrained(src)
        del model
        stage = "quantize"
        ref = load_reference(case, src)
        ref.eval()
        stage = "save"
        ref.save_pretrained(hf, **shard_kw)
        # A folder the reference's own from_pretrained cannot load back is no target to match.
        stage = "reload of its own folder"
        reloaded = reload_reference(case, hf)
    except Exception as e:  # noqa: BLE001 - any reference failure is reported, not raised
        record("reference", Outcome("fails", f"{stage}: {_short(e)}"))
        for column in COLUMNS[1:]:
            record(column, Outcome("n/a"))
        result.seconds = time.perf_counter() - started
        return result
    record("reference", Outcome("ok"))

    begin("save")
    try:
        qs.save_quantized(ref, workdir / "save", **shard_kw)
        record("save", compare_folders(workdir / "save", hf, index))
    except Exception as e:  # noqa: BLE001
        record("save", Outcome("FAIL", _short(e)))

    begin("convert")
    try:
        # diffusers' reference is loaded with torch_dtype (its bitsandbytes default is float16)
        dtype_kw = {"torch_dtype": getattr(torch, case.dtype)} if case.family == "diffusers" else {}
        qs.convert(src, workdir / "convert", qs.BitsAndBytesConfig(**CONFIGS[case.config]), **shard_kw, **dtype_kw)
        record("convert", compare_folders(workdir / "convert", hf, index))
    except Exception as e:  # noqa: BLE001
        record("convert", Outcome("FAIL", _short(e)))

    begin("load")
    record("load", _load_column(case, ref, reloaded, hf))
    result.seconds = time.perf_counter() - started
    return result


def _load_column(case: Case, ref: Any, reloaded: Any, hf: Path) -> Outcome:
    import quantsave as qs

    try:
        loaded = qs.load_quantized(hf)
        loaded.eval()
    except Exception as e:  # noqa: BLE001
        return Outcome("FAIL", _short(e, 240))
    on_meta = [n for n, t in [*loaded.named_parameters(), *loaded.named_buffers()] if t.is_meta]
    if on_meta:
        return Outcome("FAIL", f"{len(on_meta)} tensors left on meta, e.g. {on_meta[0]}")
    inputs = model_inputs(case, ref)
    if inputs is None:
        differ = same_state(loaded, ref)
        return Outcome("n/a", "no inputs in the table; tensors equal") if differ is None else Outcome("FAIL", differ)
    # The reference's own load of the same folder (``reloaded``): its tensors are views of the
    # same file, so both models compute on identically aligned memory (CPU kernels round
    # differently at different alignments, by an ulp, which is no property of the checkpoint).
    expected_model, note = ref, ""
    if same_state(reloaded, ref) is None:
        expected_model = reloaded
    else:
        note = " (vs the saved model: the reference reloads its folder differently)"
    try:
        expected = run_forward(expected_model, inputs)
    except Exception as e:  # noqa: BLE001
        return Outcome("n/a", f"reference forward fails: {_short(e, 100)}")
    try:
        got = run_forward(loaded, inputs)
    except Exception as e:  # noqa: BLE001
        return Outcome("FAIL", f"forward: {_short(e)}{note}")
    differ = same_tensor(got, expected)
    return Outcome("ok") if differ is None else Outcome("FAIL", differ + note)


# ----------------------------------------------------------------------------------------------
# cases and isolation


def all_models(family: str) -> list[str]:
    out = []
    if family in ("transformers", "all"):
        out += sweep_models.transformers_models()
    if family in ("diffusers", "all"):
        out += sweep_models.diffusers_models()
    return out


def select_cases(
    family: str = "all", *, sample: bool = False, only: list[str] | None = None,
    configs: list[str] | None = None, shard: str = "none",
) -> list[Case]:
    """The cases a command line asks for (see the module docstring)."""
    configs = configs or list(CONFIGS)
    sample_cases = [Case.parse(text) for text in sweep_models.SAMPLE]
    models = all_models(family)
    if sample:
        cases = [c for c in sample_cases if c.model in models]
    else:
        variants: dict[str, list[str | None]] = {"none": [None], SHARD: [SHARD], "all": [None, SHARD]}
        shards = variants[shard]
        cases = [Case(m, c, s) for m in models for c in configs for s in shards]
        cases += [c for c in sample_cases if c not in cases and (c.shard or c.dtype != "float32") and c.model in models]
    if only:
        cases = [c for c in cases if c.model in only]
        known = set(all_models("all"))
        cases += [Case(m, c) for m in only if m in known and not any(x.model == m for x in cases) for c in configs]
    return [c for c in cases if c.config in configs]


def _child(case: Case, workdir: str, conn: Connection) -> None:
    log = os.open(os.path.join(workdir, "log.txt"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 1)
    os.dup2(log, 2)
    try:
        run_case(case, Path(workdir), lambda column, outcome: conn.send((column, outcome.state, outcome.reason)))
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        conn.close()


def _log_tail(workdir: Path) -> str:
    try:
        lines = [x for x in (workdir / "log.txt").read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    return " ".join(lines[-1].split())[:120] if lines else ""


PRELOAD = ["torch", "safetensors", "bitsandbytes", "transformers", "transformers.modeling_utils", "diffusers",
           "diffusers.models.modeling_utils", "quantsave", "conftest", "sweep_models"]


def run_isolated(cases: list[Case], *, workers: int, timeout: float, base: Path) -> Iterator[Result]:
    """Runs each case in its own process; yields results as they finish. A case that crashes or
    runs past ``timeout`` gets ``FAIL`` (or ``fails`` for the reference) in the column it was in."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    pending = list(reversed(cases))
    running: dict[Any, tuple[Case, Any, Connection, Result, list[str], float, Path]] = {}
    while pending or running:
        while pending and len(running) < workers:
            case = pending.pop()
            workdir = Path(tempfile.mkdtemp(prefix="case-", dir=base))
            parent, child = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_child, args=(case, str(workdir), child), daemon=True)
            proc.start()
            child.close()
            running[proc.sentinel] = (case, proc, parent, Result(case), [], time.perf_counter(), workdir)
        ready = wait([*running, *(r[2] for r in running.values())], timeout=1.0)
        now = time.perf_counter()
        for sentinel in list(running):
            case, proc, conn, result, current, t0, workdir = running[sentinel]
            with contextlib.suppress(EOFError, OSError):
                while conn.poll():
                    column, state, reason = conn.recv()
                    if column == "start":
                        current[:] = [state]
                    else:
                        result.columns[column] = Outcome(state, reason)
            timed_out = now - t0 > timeout
            if sentinel not in ready and proc.is_alive() and not timed_out:
                continue
            if timed_out and proc.is_alive():
                proc.kill()
            proc.join()
            conn.close()
            result.seconds = now - t0
            _close_result(result, current, timed_out, proc.exitcode, workdir)
            shutil.rmtree(workdir, ignore_errors=True)
            del running[sentinel]
            yield result


def _close_result(result: Result, current: list[str], timed_out: bool, exitcode: int | None, workdir: Path) -> None:
    if all(c in result.columns for c in COLUMNS):
        return
    why = f"timeout after {result.seconds:.0f} s" if timed_out else f"crashed (exit {exitcode}) {_log_tail(workdir)}"
    column = current[0] if current else "reference"
    result.columns.setdefault(column, Outcome("fails" if column == "reference" else "FAIL", why.strip()))
    for c in COLUMNS:
        result.columns.setdefault(c, Outcome("n/a", "not run"))


# ----------------------------------------------------------------------------------------------
# report


def summary(results: list[Result]) -> dict[str, dict[str, tuple[int, int]]]:
    """Per family and column: (passed, checked) over the counted cases (n/a left out)."""
    out: dict[str, dict[str, tuple[int, int]]] = {}
    for r in results:
        if not r.counted:
            continue
        fam = out.setdefault(r.case.family, dict.fromkeys(COLUMNS[1:], (0, 0)))
        for c in COLUMNS[1:]:
            o = r.columns[c]
            if o.state == "n/a":
                continue
            ok, n = fam[c]
            fam[c] = (ok + (o.state == "ok"), n + 1)
    return out


def print_row(r: Result, width: int) -> None:
    cells = [r.columns.get(c, Outcome("?")).cell() for c in COLUMNS]
    print(f"{r.case.name:<{width}} {r.seconds:5.1f}s  " + " | ".join(cells), flush=True)


def print_summary(results: list[Result]) -> None:
    print()
    for fam, cols in summary(results).items():
        counted = sum(1 for r in results if r.counted and r.case.family == fam)
        total = sum(1 for r in results if r.case.family == fam)
        line = "  ".join(f"{c} {ok}/{n}" for c, (ok, n) in cols.items())
        print(f"{fam}: {counted}/{total} cases counted (reference ok)  {line}")
    fails = [r for r in results if not r.counted]
    if fails:
        print(f"\nreference fails (not counted): {len(fails)}")
        for r in fails:
            print(f"  {r.case.name}: {r.columns['reference'].reason}")
    failed = [(r, c) for r in results if r.counted for c in COLUMNS[1:] if r.columns[c].state == "FAIL"]
    if failed:
        print(f"\nfailures: {len(failed)}")
        for r, c in failed:
            print(f"  {r.case.name} {c}: {r.columns[c].reason}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--family", choices=["transformers", "diffusers", "all"], default="all")
    p.add_argument("--sample", action="store_true", help="only the fixed sample (what tests/test_sweep.py runs)")
    p.add_argument("--only", help="comma-separated model names (model types, 'model:<type>', diffusers classes)")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    p.add_argument("--shard", choices=["none", SHARD, "all"], default="none", help="shard variants of every model")
    p.add_argument("--json", type=Path, help="write every row to this file")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per case")
    p.add_argument("--list", action="store_true", help="print the cases and exit")
    args = p.parse_args(argv)
    if sys.flags.optimize:
        p.error("the comparisons are assertions: run without -O")
    configs = args.configs.split(",")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        p.error(f"unknown config {unknown[0]!r}; known: {', '.join(CONFIGS)}")
    cases = select_cases(
        args.family, sample=args.sample, only=args.only.split(",") if args.only else None, configs=configs,
        shard=args.shard,
    )
    if args.list:
        print("\n".join(c.name for c in cases))
        return 0
    for module in PRELOAD:  # fail once here rather than in every case
        __import__(module)
    width = max((len(c.name) for c in cases), default=10)
    print(f"{'case':<{width}} {'time':>6}  " + " | ".join(COLUMNS), flush=True)
    results: list[Result] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="quantsave-sweep-") as base:
        for r in run_isolated(cases, workers=args.workers, timeout=args.timeout, base=Path(base)):
            results.append(r)
            print_row(r, width)
    order = {c: i for i, c in enumerate(cases)}
    results.sort(key=lambda r: order[r.case])
    print_summary(results)
    print(f"\n{len(results)} cases in {time.perf_counter() - started:.0f} s")
    if args.json:
        rows = [{**asdict(r.case), "name": r.case.name, "family": r.case.family, "seconds": round(r.seconds, 2),
                 **{c: asdict(o) for c, o in r.columns.items()}} for r in results]
        args.json.write_text(json.dumps({"summary": summary(results), "cases": rows}, indent=2) + "\n")
    failed = [r for r in results if r.counted and any(r.columns[c].state == "FAIL" for c in COLUMNS[1:])]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
