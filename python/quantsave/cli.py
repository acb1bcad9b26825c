"""The ``quantsave`` command line: ``convert``, ``inspect``, ``verify`` and ``demo``.

Exit codes: 0 success, 1 ``verify`` found problems (or the demo's check failed), 2 bad usage or
input (a missing folder, not a checkpoint, a file ``inspect`` cannot read). Errors are one line
on stderr; ``--debug`` shows the traceback instead, and the ``quantsave`` loggers' DEBUG records
(such as why ``convert`` could not read the layout from transformers' source).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["main", "build_parser"]

_T = TypeVar("_T")

INSPECT_EPILOG = """\
examples:
  quantsave inspect ./tiny-nf4
  quantsave inspect ./tiny-nf4 --tensors
  quantsave inspect ./tiny-nf4 --json | jq .compression_ratio

--json keys (stable):
  directory, index          folder, and index file name (null for a single file)
  shards                    [{file, tensors, bytes}] (bytes: file size on disk)
  tensor_count, tensor_bytes, disk_bytes
  dtypes                    {safetensors dtype: {tensors, bytes}}
  quant_method, quantization_config   from config.json (null when unquantized)
  parameters                logical parameters (quantized weights unpacked)
  float_dtype, float_bytes  the model's float dtype and parameters x its size
  compression_ratio         float_bytes / disk_bytes
  ratio_method              how the ratio was computed
  tensors                   [{name, dtype, shape, bytes, file}]
"""

VERIFY_EPILOG = """\
checks: every shard header (Rust reader: offsets, sizes, dtypes), the index (files exist,
inside the folder, weight_map matches the shards), config.json (valid JSON, quantization_config
resolves) and that the tensors have the layout of the config's method.

exit status: 0 sound, 1 problems found (one line each on stdout), 2 bad usage or input.

examples:
  quantsave verify ./tiny-nf4
  quantsave verify ./tiny-nf4 --quiet && echo ok
"""

CONVERT_EPILOG = """\
SRC is a float safetensors checkpoint: a model folder (config.json plus one file or shards), a
single .safetensors file beside a config.json, or a diffusers pipeline folder (model_index.json;
the components named by --components, default all with weights, are converted and the rest is
copied). DST receives what diffusers/transformers write after quantizing the model on load with
the same bitsandbytes config, keeping the source dtype. Tensors stream through a few MB per
thread, so checkpoints larger than RAM convert.

examples:
  quantsave convert ./llama-bf16 ./llama-nf4 --quant nf4
  quantsave convert ./llama-bf16 ./llama-nf4-dq --quant nf4 --double-quant --max-shard-size 2GB
  quantsave convert ./sd3-transformer ./sd3-int8 --quant int8 --skip proj_out
  quantsave convert ./flux-transformer ./flux-nf4 --quant nf4 --dtype bfloat16
  quantsave convert ./sd3-pipeline ./sd3-nf4 --quant nf4 --components transformer text_encoder_3
  quantsave convert ./llama-bf16 ./llama-nf4 --quant nf4 --lora ./my-adapter --lora ./style:0.5
  quantsave convert flux1-dev.safetensors ./flux-nf4 --quant nf4 --dtype bfloat16 \
      --model-class FluxTransformer2DModel --model-config ./flux-dev-configs --lora kohya.safetensors:0.8

--lora merges a LoRA adapter (a PEFT adapter folder, or a diffusers/kohya LoRA file) into its
weights as they stream through, before quantizing; --model-class reads an original single-file
checkpoint with diffusers' own key mapping (see README).
"""

DEMO_EPILOG = """\
examples:
  quantsave demo
  quantsave demo --out ./tiny-nf4 --max-shard-size 500KB
"""


def _progress(args: argparse.Namespace, desc: str) -> Any:
    """A wrapper that shows a tqdm bar over an iterable, silent with --quiet or without a TTY."""

    def wrap(items: Iterable[_T]) -> Iterable[_T]:
        if getattr(args, "quiet", False) or not sys.stderr.isatty():
            return items
        from tqdm import tqdm

        seq = list(items)
        return tqdm(seq, desc=desc, unit="shard", leave=False, disable=len(seq) < 2)  # type: ignore[no-any-return]

    return wrap


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{n} B" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1000
    return f"{n} B"


def _print_summary(s: dict[str, Any], show_tensors: bool) -> None:
    print(f"checkpoint   {s['directory']}" + (f"  (index {s['index']})" if s["index"] else ""))
    print(f"tensors      {s['tensor_count']}  ({_human(s['tensor_bytes'])} of data)")
    print(f"shards       {len(s['shards'])}  ({_human(s['disk_bytes'])} on disk)")
    print()
    print(f"{'shard':<48} {'tensors':>8} {'bytes':>14}")
    for sh in s["shards"]:
        print(f"{sh['file']:<48} {sh['tensors']:>8} {sh['bytes']:>14}")
    print()
    print(f"{'dtype':<10} {'tensors':>8} {'bytes':>14}")
    for dt, d in s["dtypes"].items():
        print(f"{dt:<10} {d['tensors']:>8} {d['bytes']:>14}")
    print()
    q = s["quantization_config"]
    print("quantization " + (s["quant_method"] or "?") if q else "quantization none")
    for k, v in sorted((q or {}).items()):
        if k != "quant_method":
            print(f"  {k} = {json.dumps(v)}")
    print()
    print(f"parameters   {s['parameters']}  (as {s['float_dtype']}: {_human(s['float_bytes'])})")
    ratio = s["compression_ratio"]
    print(f"compression  {ratio:.2f}x" if ratio is not None else "compression  n/a")
    print(f"  computed as {s['ratio_method']}")
    if show_tensors:
        print()
        width = max((len(t["name"]) for t in s["tensors"]), default=4)
        print(f"{'tensor':<{width}} {'dtype':<8} {'shape':<16} {'bytes':>10}  file")
        for t in s["tensors"]:
            print(f"{t['name']:<{width}} {t['dtype']:<8} {t['shape']!s:<16} {t['bytes']:>10}  {t['file']}")


def _inspect(args: argparse.Namespace) -> int:
    from quantsave.diagnostics.inspect import summarize

    summary = summarize(Path(args.directory), variant=args.variant, progress=_progress(args, "reading headers"))
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
    else:
        _print_summary(summary, args.tensors)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from quantsave.checkpoint.reader import open_checkpoint
    from quantsave.diagnostics.verify import verify_checkpoint

    directory = Path(args.directory)
    checksum_problems: list[str] = []
    if args.checksums:
        from quantsave.checkpoint.checksums import check_checksums, read_checksums

        # A missing folder is reported first; a broken index by the checks below.
        found = open_checkpoint(directory, variant=args.variant, strict=False, headers=False)
        if read_checksums(directory) is None:
            raise ValueError(
                f"--checksums: no checksums are recorded in {directory} (save or convert with checksums=True)"
            )
        # Missing shards are reported by the checks below.
        checksum_problems = check_checksums(directory, [f for f in found.files if f.is_file()])
    problems, count = verify_checkpoint(directory, variant=args.variant, progress=_progress(args, "verifying"))
    problems = checksum_problems + problems
    for p in problems:
        print(p)
    if problems:
        print(f"quantsave: {len(problems)} problem(s) in {directory}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"ok: {directory} ({count} tensors)")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from quantsave.backends.bitsandbytes.config import BitsAndBytesConfig
    from quantsave.convert.run import convert

    if args.quant == "int8":
        if args.double_quant:
            raise ValueError("--double-quant applies to nf4 and fp4, not int8")
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=args.skip)
    else:
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=args.quant,
            bnb_4bit_use_double_quant=args.double_quant,
            bnb_4bit_compute_dtype=args.compute_dtype,
            llm_int8_skip_modules=args.skip,
        )
    if args.quant == "int8" and args.compute_dtype is not None:
        raise ValueError("--compute-dtype applies to nf4 and fp4 (bnb_4bit_compute_dtype), not int8")
    result = convert(
        args.src,
        args.dst,
        config,
        components=args.components,
        max_shard_size=args.max_shard_size,
        torch_dtype=args.dtype,
        progress=False if args.quiet else None,
        lora=[_lora_arg(a) for a in args.lora or []],
        lora_merge=args.lora_merge,
        model_class=args.model_class,
        model_config=args.model_config,
    )
    if not args.quiet:
        print(f"wrote {args.dst}: {result.num_shards} shard(s), {_human(result.total_bytes)}, {result.seconds:.2f} s")
    return 0


def _lora_arg(text: str) -> str | tuple[str, float]:
    """``FILE`` or ``FILE:SCALE`` (a path that itself holds a colon is taken whole when it exists)."""
    path, sep, scale = text.rpartition(":")
    if not sep or Path(text).exists():
        return text
    try:
        return path, float(scale)
    except ValueError:
        raise ValueError(f"--lora {text!r}: the scale after ':' must be a number") from None


def _demo(args: argparse.Namespace) -> int:
    from quantsave.demo import run_demo

    return 0 if run_demo(args.out, max_shard_size=args.max_shard_size) else 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    parser = argparse.ArgumentParser(
        prog="quantsave",
        description="Save quantized PyTorch models as Hugging Face compatible checkpoints.",
        epilog="run 'quantsave COMMAND --help' for a command's options and examples",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks, debug logs")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks, debug logs")
    common.add_argument("--quiet", "-q", action="store_true", help="no progress bars or 'ok' line")
    fmt = argparse.RawDescriptionHelpFormatter
    sub = parser.add_subparsers(dest="command", required=True)

    conv = sub.add_parser(
        "convert", parents=[common], formatter_class=fmt, epilog=CONVERT_EPILOG,
        help="turn a float checkpoint into a pre-quantized bitsandbytes checkpoint",
        description="Converts a float safetensors checkpoint into a pre-quantized one (bitsandbytes).",
    )
    conv.add_argument("src", help="float checkpoint folder or .safetensors file")
    conv.add_argument("dst", help="output folder")
    conv.add_argument("--quant", choices=["nf4", "fp4", "int8"], required=True, help="quantization type")
    conv.add_argument(
        "--double-quant", action="store_true", help="also quantize the 4-bit absmax (nested quantization)"
    )
    conv.add_argument("--max-shard-size", help="shard size, e.g. 5GB (default: the model family's)")
    conv.add_argument("--skip", nargs="+", metavar="MODULE", help="Linear modules to keep in float")
    dtypes = ["float32", "bfloat16", "float16"]
    conv.add_argument(
        "--dtype",
        choices=[*dtypes, "auto"],
        help="dtype of the tensors left unquantized (torch_dtype); default as the reference: "
             "transformers 'auto' (the config's dtype), diffusers float16",
    )
    conv.add_argument(
        "--compute-dtype",
        choices=dtypes,
        help="nf4/fp4: the dtype the 4-bit layers compute in (bnb_4bit_compute_dtype; default float32)",
    )
    conv.add_argument(
        "--components",
        nargs="+",
        metavar="NAME",
        help="pipeline folders only: the components to convert (default: every component with weights); "
             "the rest is copied",
    )
    conv.add_argument(
        "--lora",
        action="append",
        metavar="FILE[:SCALE]",
        help="a LoRA adapter to merge before quantizing (repeatable, merged in order; SCALE default 1)",
    )
    conv.add_argument(
        "--lora-merge",
        choices=["float", "quantized"],
        default="float",
        help="merge into the float weight (default, the references'), or onto dequantize(quantize(W)) "
             "(QLoRA-consistent)",
    )
    conv.add_argument(
        "--model-class",
        metavar="CLASS",
        help="SRC is an original single file: the diffusers class whose from_single_file reads it",
    )
    conv.add_argument(
        "--model-config",
        metavar="DIR",
        help="with --model-class: the folder of the diffusers model's config.json (or its pipeline folder)",
    )
    conv.set_defaults(func=_convert)

    inspect = sub.add_parser(
        "inspect", parents=[common], formatter_class=fmt, epilog=INSPECT_EPILOG,
        help="summarize a checkpoint: tensors, dtypes, bytes, shards, quantization, compression ratio",
        description="Summarizes a checkpoint folder; reads only the shard headers and small metadata tensors.",
    )
    inspect.add_argument("directory", help="checkpoint folder")
    inspect.add_argument("--json", action="store_true", help="print the summary as JSON (keys below)")
    inspect.add_argument("--tensors", action="store_true", help="also list every tensor")
    inspect.add_argument("--variant", help="weights variant, e.g. fp16")
    inspect.set_defaults(func=_inspect)

    verify = sub.add_parser(
        "verify", parents=[common], formatter_class=fmt, epilog=VERIFY_EPILOG,
        help="validate every shard, the index and config.json",
        description="Validates a checkpoint folder and prints one line per problem.",
    )
    verify.add_argument("directory", help="checkpoint folder")
    verify.add_argument("--variant", help="weights variant, e.g. fp16")
    verify.add_argument(
        "--checksums",
        action="store_true",
        help="also check each weights file against the sha256 recorded at save time (checksums=True); "
             "exits 2 when none were recorded",
    )
    verify.set_defaults(func=_verify)

    demo = sub.add_parser(
        "demo", parents=[common], formatter_class=fmt, epilog=DEMO_EPILOG,
        help="quantize a tiny embedded model to nf4 on the CPU, save it sharded, reload and check it",
        description="Runs the embedded example; downloads nothing.",
    )
    demo.add_argument("--out", help="keep the checkpoint in this folder (default: a temporary folder)")
    demo.add_argument("--max-shard-size", default="1MB", help="shard size, e.g. 1MB (default) or 500KB")
    demo.set_defaults(func=_demo)
    return parser


@contextlib.contextmanager
def _debug_logs(on: bool) -> Iterator[None]:
    """While the command runs, ``--debug`` sends the ``quantsave`` loggers' DEBUG records to stderr."""
    log, handler = logging.getLogger("quantsave"), logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("quantsave: debug: %(name)s: %(message)s"))
    level = log.level
    if on:
        log.addHandler(handler)
        log.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        if on:
            log.removeHandler(handler)
            log.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    with _debug_logs(args.debug):
        try:
            return int(args.func(args))
        except (ValueError, OSError, ImportError) as e:
            if args.debug:
                raise
            print(f"quantsave: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            if args.debug:
                raise
            print("quantsave: interrupted", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
