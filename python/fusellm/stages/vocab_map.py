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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checks import check_num_threads
from ..config import VocabMapSettings, add_settings_arguments, settings_from_args
from ..errors import InputError
from ..loading import load_tokenizer
from ._common import check_choice

__all__ = ["VOCAB_MAP_FORMAT", "VocabMapReport", "add_vocab_map_parser", "run_vocab_map"]

logger = logging.getLogger(__name__)


#: Format tag of the key of a vocabulary-map output.
VOCAB_MAP_FORMAT = "fusellm.vocab_map/1"


@dataclass
class VocabMapReport:
    """What :func:`run_vocab_map` produced (or found already done)."""

    output: Path
    method: str
    #: The map (loaded, not rebuilt, when the output was up to date).
    vocab_map: Any
    skipped: bool = False
    seconds: float = 0.0

    def stats(self) -> dict[str, Any]:
        """The map's statistics (:meth:`fusellm.VocabMap.stats`)."""
        return dict(self.vocab_map.stats())

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": str(self.output),
            "method": self.method,
            "stats": self.stats(),
            "skipped": self.skipped,
            "seconds": self.seconds,
        }


def run_vocab_map(
    base_tokenizer: Any,
    blend_tokenizer: Any,
    output: str | os.PathLike[str],
    *,
    method: str = "surface",
    num_threads: int | None = None,
    max_distance: int | None = None,
    overwrite: bool = False,
    on_stale: str | None = None,
) -> VocabMapReport:
    """Builds and saves the map of every blend token onto the base vocabulary (stage 3a).

    Args:
        base_tokenizer, blend_tokenizer: tokenizer directories, ``"bundled:NAME"``, or tokenizer
            objects.
        output: the map file (``.json``, the reference format); :meth:`fusellm.VocabMap.save`
            also writes ``<output>.meta.json`` (method, markers, statistics, checksums), and the
            artifact manifest ``<output>.fusellm_manifest.json`` records what it was made from
            (:mod:`fusellm.artifact`).
        method: ``"surface"`` (default), ``"mined"`` (the reference map) or ``"exact"``.
        num_threads: worker threads (default: ``FUSELLM_NUM_THREADS`` or all cores).
        max_distance: leave unmapped the tokens whose nearest base string is more edits away
            (:meth:`fusellm.VocabMap.build`; ``None``: no cap).
        overwrite: replace an existing map built for other vocabularies or settings.
        on_stale: ``"refuse"`` or ``"replace"`` such a map (default: from ``overwrite``).

    Returns:
        A :class:`VocabMapReport`; its ``vocab_map`` is loaded, not rebuilt, when ``output``
        already holds this map for these vocabularies and settings (``skipped``).

    Raises:
        StaleArtifactError: ``output`` holds a map for other vocabularies or settings, a map
            changed after it was written, or a map without a manifest, and ``overwrite`` is
            false.
    """
    from ..artifact import Artifact, stale_policy
    from ..tokenization import tokenizer_marker, tokenizer_vocab
    from ..vocab import VocabMap, vocab_checksum

    t0 = time.perf_counter()
    check_choice("method", method, ("exact", "mined", "surface"))
    policy = stale_policy(overwrite, on_stale)
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
    key = {
        "format": VOCAB_MAP_FORMAT,
        "base_vocab_sha256": vocab_checksum(base_vocab),
        "blend_vocab_sha256": vocab_checksum(blend_vocab),
        "base_marker": base_marker,
        "blend_marker": blend_marker,
        "method": method,
        "max_distance": max_distance,
    }
    files = (out.name, out.name + ".meta.json")
    art = Artifact(out, "vocab_map", key, files=files, describe="same tokenizers and settings")
    decision = art.decide(policy)
    if decision.done:
        art.skipped()
        vm = VocabMap.load(out, base_vocab, blend_vocab)
        return VocabMapReport(out, method, vm, skipped=True, seconds=time.perf_counter() - t0)
    fields: dict[str, Any] = {}
    with art.build(decision, fields) as tmp:
        vm = VocabMap.build(
            base_vocab,
            blend_vocab,
            base_marker=base_marker,
            blend_marker=blend_marker,
            method=method,  # type: ignore[arg-type]
            num_threads=threads,
            max_distance=max_distance,
        )
        fields["stats"] = vm.stats()
        vm.save(tmp / out.name)
    return VocabMapReport(out, method, vm, seconds=time.perf_counter() - t0)


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
    report = run_vocab_map(
        args.base_tokenizer,
        args.blend_tokenizer,
        args.output,
        **settings_from_args(args, VocabMapSettings),
        overwrite=args.overwrite,
    )
    s = report.stats()
    if report.skipped:
        print(f"{args.output}: up to date (same tokenizers and settings); skipped")
    print(
        f"{args.output}: {s['blend_tokens']} source tokens ({args.method}): {s['exact']} exact, "
        f"{s['surface']} surface, {s['mined']} mined, {s['unmapped']} unmapped"
    )
    return 0
