"""Stage 3a: map every source ("blend") token onto the target ("base") vocabulary.

:func:`run_vocab_map` (``fusellm vocab-map``) builds the map with :meth:`fusellm.VocabMap.build`
and saves it as the reference pipeline's JSON object plus the ``<file>.meta.json`` sidecar
(method, markers, statistics, vocabulary checksums). The default ``method="surface"`` compares
decoded bytes first and edit distance only as a fallback (it fixes the reference's ``Ċ`` vs
``<0x0A>`` misses); ``"mined"`` is the reference map. The map is only used by ``vocab="soft"``
alignment (:mod:`fusellm.stages.align`).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

from ..checks import check_num_threads
from ..config import VocabMapSettings, add_settings_arguments, settings_from_args
from ..errors import InputError, StaleArtifactError
from ..loading import load_tokenizer
from ._common import check_choice

__all__ = ["add_vocab_map_parser", "run_vocab_map"]

logger = logging.getLogger(__name__)


def run_vocab_map(
    base_tokenizer: Any,
    blend_tokenizer: Any,
    output: str | os.PathLike[str],
    *,
    method: str = "surface",
    num_threads: int | None = None,
    max_distance: int | None = None,
    overwrite: bool = False,
) -> Any:
    """Builds and saves the map of every blend token onto the base vocabulary (stage 3a).

    Args:
        base_tokenizer, blend_tokenizer: tokenizer directories, ``"bundled:NAME"``, or tokenizer
            objects.
        output: the map file (``.json``, the reference format); :meth:`fusellm.VocabMap.save`
            also writes ``<output>.meta.json`` (method, markers, statistics, checksums).
        method: ``"surface"`` (default), ``"mined"`` (the reference map) or ``"exact"``.
        num_threads: worker threads (default: ``FUSELLM_NUM_THREADS`` or all cores).
        max_distance: leave unmapped the tokens whose nearest base string is more edits away
            (:meth:`fusellm.VocabMap.build`; ``None``: no cap).
        overwrite: replace an existing map built for other vocabularies or another method.

    Returns:
        The :class:`fusellm.VocabMap` (loaded, not rebuilt, when ``output`` already holds this
        map for these vocabularies and method).

    Raises:
        StaleArtifactError: ``output`` holds a map for other vocabularies, another method, or
            without its sidecar, and ``overwrite`` is false.
    """
    from ..tokenization import tokenizer_marker, tokenizer_vocab
    from ..vocab import VocabMap

    check_choice("method", method, ("exact", "mined", "surface"))
    threads = check_num_threads(num_threads)
    out = Path(output)
    if out.suffix.lower() != ".json":
        raise InputError(f"output must be a .json file, got {str(out)!r}")
    if out.is_dir():
        raise InputError(f"output {out} is a directory; give a .json file path")
    base = load_tokenizer(base_tokenizer, "base_tokenizer")
    blend = load_tokenizer(blend_tokenizer, "blend_tokenizer")
    base_vocab, blend_vocab = tokenizer_vocab(base), tokenizer_vocab(blend)
    base_marker = tokenizer_marker(base_vocab)
    blend_marker = tokenizer_marker(blend_vocab)
    meta = out.with_name(out.name + ".meta.json")
    if out.exists() or meta.exists():
        try:
            vm = VocabMap.load(out, base_vocab, blend_vocab)
        except (StaleArtifactError, FileNotFoundError, ValueError) as e:
            if not overwrite:
                raise StaleArtifactError(
                    f"{out} holds another vocabulary map ({e}); pass overwrite=True "
                    "(--overwrite) to rebuild it"
                ) from e
        else:
            same = (vm.method, vm.max_distance, vm.base_marker, vm.blend_marker) == (
                method,
                max_distance,
                base_marker,
                blend_marker,
            )
            if same:
                logger.info("%s is up to date (%s map): skipped", out, method)
                return vm
            if not overwrite:
                what = (
                    f"a {vm.method!r} map, not {method!r}"
                    if vm.method != method
                    else f"a map with max_distance {vm.max_distance}, not {max_distance}"
                )
                raise StaleArtifactError(
                    f"{out} holds {what}; pass overwrite=True (--overwrite) to rebuild it"
                )
    out.parent.mkdir(parents=True, exist_ok=True)
    vm = VocabMap.build(
        base_vocab,
        blend_vocab,
        base_marker=base_marker,
        blend_marker=blend_marker,
        method=method,  # type: ignore[arg-type]
        num_threads=threads,
        max_distance=max_distance,
    )
    vm.save(out)
    return vm


# --- command line --------------------------------------------------------------------------------


def add_vocab_map_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds the ``vocab-map`` command to an ``argparse`` sub-parser collection."""
    p = subparsers.add_parser(
        "vocab-map",
        help="map a source vocabulary onto the target's",
        description=(
            "Map every token of BLEND_TOKENIZER (a source model) onto a token of BASE_TOKENIZER "
            "(the target) and save the map as OUTPUT (the reference pipeline's JSON object) plus "
            "OUTPUT.meta.json (method, markers, statistics, vocabulary checksums). Used by "
            "`fusellm align --vocab soft`. Re-running with the same tokenizers and method does "
            "nothing; a map for other tokenizers is refused unless --overwrite."
        ),
    )
    p.add_argument(
        "base_tokenizer",
        metavar="BASE_TOKENIZER",
        help="target tokenizer: a directory or bundled:NAME",
    )
    p.add_argument(
        "blend_tokenizer",
        metavar="BLEND_TOKENIZER",
        help="source tokenizer: a directory or bundled:NAME",
    )
    p.add_argument("output", metavar="OUTPUT", help="the map file to write (.json)")
    add_settings_arguments(p, VocabMapSettings)
    p.add_argument("--overwrite", action="store_true", help="replace a map built for other inputs")
    p.set_defaults(func=_vocab_map_cli)
    return p


def _vocab_map_cli(args: argparse.Namespace) -> int:
    out = Path(args.output)
    before = out.stat().st_mtime_ns if out.is_file() else None
    vm = run_vocab_map(
        args.base_tokenizer,
        args.blend_tokenizer,
        args.output,
        **settings_from_args(args, VocabMapSettings),
        overwrite=args.overwrite,
    )
    s = vm.stats()
    if before is not None and out.stat().st_mtime_ns == before:
        print(f"{args.output}: up to date (same tokenizers and settings); skipped")
    print(
        f"{args.output}: {s['blend_tokens']} source tokens ({args.method}): {s['exact']} exact, "
        f"{s['surface']} surface, {s['mined']} mined, {s['unmapped']} unmapped"
    )
    return 0
