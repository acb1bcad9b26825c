"""The ``quantsave`` command line."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from quantsave.demo import run_demo

    return 0 if run_demo(args.out, max_shard_size=args.max_shard_size) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quantsave",
        description="Save quantized PyTorch models as Hugging Face compatible checkpoints.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="quantize a tiny embedded model to nf4 on the CPU, save it sharded, reload and check it",
        description="Runs the embedded example; downloads nothing. Example: quantsave demo --out ./tiny-nf4",
    )
    demo.add_argument("--out", help="keep the checkpoint in this folder (default: a temporary folder)")
    demo.add_argument("--max-shard-size", default="1MB", help="shard size, e.g. 1MB (default) or 500KB")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, OSError, ImportError) as e:
        if args.debug:
            raise
        print(f"quantsave: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
