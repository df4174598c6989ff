"""The ``fusellm`` command line.

Every pipeline stage is a sub-command whose parser lives beside its implementation (an
``add_<stage>_parser(subparsers)`` function). Some of them import torch and transformers to build
their options (``train`` exposes every ``TrainingArguments`` field), so the top-level parser lists
the commands from the table below and builds only the chosen command's real parser.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

__all__ = ["COMMANDS", "build_parser", "main"]

#: command -> (module, function adding its sub-parser, one-line help), in pipeline order.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "run": ("pipeline", "add_run_parser", "run every stage from a config (default: built-in demo)"),
    "split": (
        "stages.split",
        "add_split_parser",
        "split documents into rows that fit every tokenizer",
    ),
    "extract": (
        "stages.extract",
        "add_extract_parser",
        "store a model's top-K next-token distributions",
    ),
    "vocab-map": (
        "stages.vocab_map",
        "add_vocab_map_parser",
        "map a source vocabulary onto the target's",
    ),
    "align": (
        "stages.align",
        "add_align_parser",
        "re-express source distributions on target tokens",
    ),
    "pack": ("stages.pack", "add_pack_parser", "pack aligned rows into training blocks"),
    "train": ("train", "add_train_parser", "train the target on packed blocks with fusion loss"),
    "evaluate": (
        "stages.evaluate",
        "add_evaluate_parser",
        "held-out perplexity, or benchmark tasks (--tasks), of model directories",
    ),
    "report": ("report", "add_report_parser", "write the Markdown report of a pipeline run"),
    "align-demo": ("demo", "add_align_demo_parser", "align a built-in sample, print statistics"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser of the ``fusellm`` command.

    Args:
        command: the sub-command whose full parser is built (importing its module); the others
            are listed with their one-line help only. ``None`` builds every full parser.
    """
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="fusellm",
        description=(
            "Knowledge fusion of large language models (FuseLLM), Rust-accelerated. "
            "`fusellm run` runs the whole pipeline; each stage is also its own command. "
            "`fusellm COMMAND --help` describes a command."
        ),
    )
    parser.add_argument("--version", action="version", version=f"fusellm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, hook, help_text) in COMMANDS.items():
        if command is None or command == name:
            getattr(_module(module), hook)(sub)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _module(name: str) -> object:
    return importlib.import_module(f".{name}", __package__)


def _silence_library_bars() -> None:
    """``--no-progress``: the bars of datasets, huggingface_hub and transformers too (they read
    these variables when imported; the stages import them later)."""
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fusellm`` console script."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in args_list if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else "")
    args = parser.parse_args(args_list)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if getattr(args, "no_progress", False):
        _silence_library_bars()
    from .errors import FuseLLMError

    try:
        return int(args.func(args))
    except FuseLLMError as exc:
        # A clear message, not a traceback: these errors name the offending value.
        # FUSELLM_TRACEBACK=1 shows the traceback as well.
        if os.environ.get("FUSELLM_TRACEBACK"):
            raise
        print(f"fusellm {command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"fusellm {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
