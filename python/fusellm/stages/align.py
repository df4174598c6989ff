"""Stage 3b: re-express every source's top-K on the target's tokens, row by row.

:func:`align_dataset` (``fusellm align``). Inputs: the target's extraction (stage 2) and one
extraction per source, all of the same rows. Per row it writes the target's tokens and its own
top-K (the ``ref`` candidate) and, per source, the source's top-K re-expressed on the target's
positions and vocabulary (:meth:`fusellm.Aligner.align_batch`, Rust, rayon-parallel, without the
GIL), batch by batch, as a sharded ``save_to_disk`` dataset. Columns: ``text``, ``row_index``,
``num_bytes``, ``input_ids``, ``ref_ids`` / ``ref_logits`` ``[L, K]``, ``ref_metric_ce``,
``ref_num_tokens``, and per source ``{name}_ids`` (``-1`` padded), ``{name}_logits`` (``-inf``
padded), ``{name}_metric_ce``, ``{name}_num_tokens`` (the source's own token count), named as the
packed training schema names its candidates. ``align_stats.json`` counts, per source, the
positions by status (matched, empty, fallback, masked; they sum to ``base_positions``), the
dropped top-K entries and the kept ones.

Speed and layout. Each shard (``rows_per_batch`` rows) crosses into Rust once per source: its
Arrow list columns go in as flat numpy views (values plus row offsets,
:meth:`fusellm.Aligner.align_flat`) and the aligned rows and their counts come back flat, with no
per-row Python work. Shards are read in lockstep and aligned, scored and written on a bounded
pool of ``num_threads`` threads (numpy, Arrow and the kernel release the interpreter); their
counts and teacher sums are added up in shard order, so the output does not depend on the
thread count. Shards are written with ``compression`` (:class:`fusellm.config.AlignSettings`,
default lz4, which keeps up with the stage: zstd level 1 is about 28 % smaller, writes at two
thirds of lz4's speed and reads back at less than half of it; ``None`` is the largest). Beside
each data file, ``shards/*.json`` records its rows, size, SHA-256, counts and teacher sums. One
process builds the output under a temporary directory renamed into place (a failure leaves
nothing); ``shard="i/N"`` workers (``fusellm align --shard i/N``) each build their shards
``s % N == i`` in place under their own lock, as ``fusellm extract`` does, and whoever finds
every shard done writes the statistics and completes the manifest; a run started over a partial
output resumes from its finished shards.

``method="offsets"`` (default) reads every token's character span from the extraction (or, for
an extraction made before fusellm stored them, re-tokenizes every text with character offsets
and checks that the ids are the stored ones, so the offsets describe exactly the tokens the
models saw), and pairs a target position with a source position only where both tokens END at
the same character: both then predict the same continuation. Exact and linear; positions whose
ends differ get no source distribution (a next-token one-hot by default). The appended EOS
strings of the two tokenizers differ (``</s>`` vs ``<|endoftext|>``), so each side's EOS is
given the span of one virtual character after the text: the EOS positions pair with each other.
``method="mined"`` is the reference MinED dynamic time warping over token strings (no
re-tokenization), which always pairs but misaligns runs of short tokens.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..checks import check_num_threads
from ..config import AlignSettings, VocabMapSettings, add_settings_arguments, settings_from_args
from ..distributed import add_worker_arguments, run_workers
from ..errors import InputError, InputTypeError, StaleArtifactError
from ..loading import load_tokenizer, load_tokenizer_file
from ..progress import progress_bar
from ..schema import DOMAIN_COLUMN, REF, SPANS_COLUMN, align_features
from ..tokenization import char_spans
from ._common import (
    CANDIDATE_SUFFIXES,
    COMPRESSIONS,
    DiskDataset,
    arrow_array,
    check_choice,
    finished_shards,
    fixed_width,
    input_fingerprint,
    list_column,
    nested,
    note_shard_digests,
    positive_int,
    previous_fingerprints,
    row_tables,
    scalar_column,
    shard_done,
    worker_shards,
    worker_slot,
    write_shard,
)

__all__ = ["ALIGN_STATS_NAME", "AlignReport", "add_align_parser", "align_dataset"]

logger = logging.getLogger(__name__)

ALIGN_FORMAT = "fusellm.align/1"
#: Statistics file of an aligned dataset.
ALIGN_STATS_NAME = "align_stats.json"
_SOURCE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_ALIGN_FIXED = ("text", "row_index", "num_bytes", "input_ids")
_EXTRACT_COLUMNS = (
    "input_ids",
    "per_step_logits",
    "per_step_indices",
    "metric_ce",
    "num_tokens",
    "num_bytes",
)
_LOGITS_DTYPES = ("float16", "float32")


# --- tokenizers ----------------------------------------------------------------------------------


@dataclass
class _Side:
    """One model's extraction and tokenizer, as the aligner sees them."""

    name: str  # "ref" for the target
    path: Path
    manifest: dict[str, Any]
    tokenizer: Any  # a TokenizerFile where tokenizer.json agrees with the extraction
    tokenizer_spec: Any
    vocab: list[str | None]
    marker: str
    top_k: int
    text_column: str
    eos: str
    add_special_tokens: bool
    num_rows: int
    fingerprint: dict[str, Any] = field(default_factory=dict)
    backend: Any = None

    @functools.cached_property
    def vocab_sha256(self) -> str:
        """:func:`fusellm.vocab.vocab_checksum` of the vocabulary (computed once)."""
        from ..vocab import vocab_checksum

        return vocab_checksum(self.vocab)


def _open_extract(path: Any, what: str) -> tuple[Path, dict[str, Any]]:
    from ..io import read_manifest

    if not isinstance(path, (str, os.PathLike)):
        raise InputTypeError(f"{what} must be an extraction directory, got {type(path).__name__}")
    p = Path(path)
    if not p.is_dir():
        raise InputError(f"{what}: extraction directory {p} does not exist")
    manifest = read_manifest(p)
    if manifest is None or manifest.get("stage") != "extract":
        raise InputError(f"{what}: {p} is not a fusellm extraction (no extract manifest)")
    if not manifest.get("complete") or not (p / "state.json").is_file():
        raise InputError(f"{what}: the extraction in {p} is not complete (run fusellm extract)")
    return p, manifest


def _values_of(manifest: Mapping[str, Any]) -> str:
    """What an extraction's top-K values are (extractions without the key hold raw logits)."""
    return str(manifest.get("key", {}).get("values", "logits"))


def _make_side(name: str, path: Path, manifest: dict[str, Any], tok_spec: Any, what: str) -> _Side:
    from ..tokenization import tokenizer_marker, tokenizer_vocab

    key = manifest.get("key", {})
    info = manifest.get("tokenizer", {})
    if tok_spec is None:
        recorded = info.get("path")
        if not recorded or not Path(recorded).is_dir():
            raise InputError(
                f"{what}: the extraction in {path} does not record a tokenizer directory "
                f"({recorded!r}); pass the tokenizer explicitly"
            )
        tok_spec = recorded
    num_ids = info.get("num_ids")
    append_eos = bool(key.get("append_eos", True))
    # The stored ids need only the tokenizer's strings: tokenizer.json alone, where it agrees
    # with what the extraction recorded of its tokenizer (else the full load, checked below).
    tok = load_tokenizer_file(tok_spec, f"{what} tokenizer")
    if (
        tok is None
        or len(tok) != num_ids
        or (append_eos and tok.eos_token != info.get("eos_token"))
    ):
        tok = load_tokenizer(tok_spec, f"{what} tokenizer")
    if num_ids is not None and len(tok) != num_ids:
        raise InputError(
            f"{what}: the tokenizer has {len(tok)} ids but the extraction in {path} was made with "
            f"one of {num_ids} ids: it is not the extraction's tokenizer"
        )
    eos = tok.eos_token if append_eos else ""
    if append_eos and (not eos or ("eos_token" in info and eos != info["eos_token"])):
        raise InputError(
            f"{what}: the tokenizer's EOS {eos!r} is not the extraction's "
            f"{info.get('eos_token')!r}: it is not the extraction's tokenizer"
        )
    vocab = tokenizer_vocab(tok)
    try:
        marker = tokenizer_marker(vocab)
    except InputError as e:
        raise InputError(f"{what}: {e}") from e
    return _Side(
        name=name,
        path=path,
        manifest=manifest,
        tokenizer=tok,
        tokenizer_spec=tok_spec,
        vocab=vocab,
        marker=marker,
        top_k=int(key.get("top_k", 0)),
        text_column=str(key.get("text_column", "text")),
        eos=eos,
        add_special_tokens=bool(key.get("add_special_tokens", False)),
        num_rows=int(key.get("num_rows", -1)),
    )


def _backend(tok: Any, what: str) -> Any:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise InputTypeError(
            f"{what}: method='offsets' needs a fast tokenizer (character offsets); "
            f"{type(tok).__name__} is not one (use method='mined')"
        )
    if backend.truncation is not None or backend.padding is not None:
        import tokenizers

        backend = tokenizers.Tokenizer.from_str(backend.to_str())
        backend.no_truncation()
        backend.no_padding()
    return backend


# --- the stage -----------------------------------------------------------------------------------


@dataclass
class AlignReport:
    """What :func:`align_dataset` produced (or found already done).

    ``sources`` maps each source name to its counts: ``matched``, ``empty``, ``fallback``,
    ``masked`` (base positions by status; they sum to ``base_positions``), ``exact_span``
    (offsets method: matched positions whose source token has the same character span as the
    base token; ``None`` for MinED), ``unknown_ids`` / ``unmapped_ids`` (top-K entries dropped:
    id without a token string / string not in the base vocabulary), ``duplicate_ids`` (entries
    merged into an earlier one of the same target id) and ``topk_entries`` (entries kept in
    matched rows). ``teachers`` scores every candidate's rows against the true next token
    (:mod:`fusellm.diagnostics`).
    """

    output_dir: Path
    method: str
    vocab: str
    rows: int
    base_positions: int
    sources: dict[str, dict[str, int | None]]
    #: Teacher quality per candidate and domain (:class:`fusellm.diagnostics.TeacherStats`).
    teachers: dict[str, Any] = field(default_factory=dict)
    skipped: bool = False
    seconds: float = 0.0
    #: False for a worker (``shard="i/N"``) whose shards are done while others' are not: then
    #: ``rows``, ``base_positions`` and ``sources`` count this worker's shards only.
    complete: bool = True

    def stats(self) -> dict[str, Any]:
        """The content of ``align_stats.json``."""
        return {
            "method": self.method,
            "vocab": self.vocab,
            "rows": self.rows,
            "base_positions": self.base_positions,
            "sources": {k: dict(v) for k, v in self.sources.items()},
            "teachers": self.teachers,
        }

    def to_dict(self) -> dict[str, Any]:
        d = self.stats()
        d.update(output_dir=str(self.output_dir), skipped=self.skipped, seconds=self.seconds)
        return d

    def load(self) -> Any:
        """The aligned dataset (``datasets.load_from_disk``)."""
        import datasets

        return datasets.load_from_disk(str(self.output_dir))


def _check_sources(sources: Any) -> dict[str, Any]:
    if not isinstance(sources, Mapping) or not sources:
        raise InputTypeError(
            "sources must be a non-empty mapping of source name -> extraction directory, got "
            f"{type(sources).__name__}"
        )
    fixed = set(_ALIGN_FIXED) | {f"{REF}_{s}" for s in CANDIDATE_SUFFIXES}
    seen: dict[str, str] = {}
    for name in sources:
        if not isinstance(name, str) or not _SOURCE_NAME.match(name):
            raise InputError(
                f"source name {name!r} is not valid: use lower-case letters, digits and '_', "
                "starting with a letter (it prefixes the column names)"
            )
        if name == REF:
            raise InputError(f"source name {REF!r} is reserved for the target's own candidate")
        for s in CANDIDATE_SUFFIXES:
            col = f"{name}_{s}"
            if col in fixed or col in seen:
                other = seen.get(col, "the target")
                raise InputError(f"source name {name!r}: its column {col!r} clashes with {other}")
            seen[col] = repr(name)
    return dict(sources)


def _resolve_maps(
    vocab_maps: Any,
    names: Sequence[str],
    base: _Side,
    sides: Mapping[str, _Side],
    *,
    vocab: str,
    num_threads: int | None,
) -> dict[str, Any]:
    """name -> VocabMap (or None), each checked against both vocabularies. With
    ``vocab="soft"``, a source without a map gets the default one (:class:`VocabMapSettings`),
    built in memory."""
    maps = _given_maps(vocab_maps, names, base, sides)
    if vocab == "soft":
        from ..vocab import VocabMap

        default = VocabMapSettings()
        for name in [n for n in names if maps[n] is None]:
            logger.info(
                "source %r: no vocabulary map given; building the %r map (fusellm vocab-map)",
                name,
                default.method,
            )
            maps[name] = VocabMap.build(
                base.vocab,
                sides[name].vocab,
                base_marker=base.marker,
                blend_marker=sides[name].marker,
                method=default.method,
                num_threads=num_threads,
                max_distance=default.max_distance,
            )
    return maps


def _given_maps(
    vocab_maps: Any, names: Sequence[str], base: _Side, sides: Mapping[str, _Side]
) -> dict[str, Any]:
    from ..vocab import VocabMap

    if vocab_maps is None:
        return dict.fromkeys(names)
    if not isinstance(vocab_maps, Mapping):
        raise InputTypeError(
            f"vocab_maps must map source names to VocabMap objects or files, got "
            f"{type(vocab_maps).__name__}"
        )
    unknown = [n for n in vocab_maps if n not in names]
    if unknown:
        raise InputError(f"vocab_maps names unknown source(s) {unknown}; sources are {names}")
    out: dict[str, Any] = {}
    for name in names:
        vm = vocab_maps.get(name)
        side = sides[name]
        if vm is None:
            out[name] = None
        elif isinstance(vm, (str, os.PathLike)):
            if not Path(vm).is_file():
                raise InputError(f"vocab map of source {name!r}: {vm} does not exist")
            try:
                out[name] = VocabMap.load(vm, base.vocab, side.vocab)
            except StaleArtifactError as e:
                raise StaleArtifactError(f"vocab map of source {name!r}: {e}") from e
        elif isinstance(vm, VocabMap):
            if vm.checksums != (base.vocab_sha256, side.vocab_sha256):
                raise StaleArtifactError(
                    f"vocab map of source {name!r} was built for other vocabularies than the "
                    "target's and this source's tokenizers: rebuild it (fusellm vocab-map)"
                )
            out[name] = vm
        elif isinstance(vm, Mapping):
            out[name] = VocabMap.from_dict(
                vm,
                base.vocab,
                side.vocab,
                base_marker=base.marker,
                blend_marker=side.marker,
            )
        else:
            raise InputTypeError(
                f"vocab map of source {name!r} must be a VocabMap, a file or a dict, got "
                f"{type(vm).__name__}"
            )
    return out


def _check_columns(ds: DiskDataset, side: _Side, what: str) -> None:
    need = [side.text_column, *_EXTRACT_COLUMNS]
    missing = [c for c in need if c not in ds.column_names]
    if missing:
        raise InputError(
            f"{what}: {side.path} lacks column(s) {missing} (columns: {ds.column_names})"
        )
    for col in ("per_step_logits", "per_step_indices"):
        k = fixed_width(ds.schema.field(col).type)
        if k is None:
            raise InputError(f"{what}: column {col!r} must be list<fixed_size_list<K>>")
        if side.top_k and k != side.top_k:
            raise InputError(
                f"{what}: column {col!r} holds {k} entries per position, the manifest says "
                f"top_k={side.top_k}"
            )
        side.top_k = k


def _first_text_mismatch(a: Any, b: Any) -> int | None:
    import pyarrow.compute as pc

    eq = pc.equal(arrow_array(a), arrow_array(b))
    bad = pc.invert(pc.fill_null(eq, False))
    if pc.any(bad).as_py():
        return int(pc.index(bad, True).as_py())
    return None


def _scan_texts(base: _Side, base_ds: DiskDataset, name: str, side: _Side, ds: DiskDataset) -> None:
    """Compares the two text columns row by row (reads only what it needs, batch by batch)."""
    start = 0
    a_iter = row_tables(base_ds.batches(), 4096)
    b_iter = row_tables(ds.batches(), 4096)
    for ta, tb in zip(a_iter, b_iter, strict=False):
        if ta.num_rows != tb.num_rows:  # pragma: no cover - counts were checked
            break
        bad = _first_text_mismatch(ta.column(base.text_column), tb.column(side.text_column))
        if bad is not None:
            raise InputError(
                f"row {start + bad}: the text of source {name!r} differs from the target's "
                "(the extractions were not made from the same rows in the same order)"
            )
        start += ta.num_rows


def _spans_of(
    side: _Side,
    table: Any,
    text: Any,
    ids: np.ndarray,
    offsets: np.ndarray,
    first_row: int,
    what: str,
) -> np.ndarray:
    """``int64 [N, 2]``: the character span of every stored token, the extraction's
    ``token_spans`` column (checked in one pass over the batch), or (an extraction made before
    fusellm stored it) from tokenizing the texts (``text``, an Arrow column) again."""
    import pyarrow.compute as pc

    if SPANS_COLUMN not in table.column_names:
        texts = arrow_array(text).to_pylist()
        rows = _encode_with_offsets(side, texts, ids, offsets, first_row, what)
        return np.concatenate(rows).astype(np.int64) if rows else np.zeros((0, 2), np.int64)
    sp_off, spans = list_column(table.column(SPANS_COLUMN), f"{what} {SPANS_COLUMN}")
    if not np.array_equal(sp_off, offsets) or spans.ndim != 2 or spans.shape[1] != 2:
        raise InputError(
            f"the {what} extraction's {SPANS_COLUMN} do not match its input_ids near row "
            f"{first_row}"
        )
    # Within a row the ends never decrease and no span starts after its end; the last token
    # ends at the text's end (one character after it with the EOS, the virtual character).
    spans = spans.astype(np.int64)
    ends = spans[:, 1]
    lengths = np.diff(offsets)
    row = np.repeat(np.arange(len(lengths)), lengths)
    bad = spans[:, 0] > ends
    bad[1:] |= (ends[1:] < ends[:-1]) & (row[1:] == row[:-1])
    chars = pc.utf8_length(arrow_array(text)).to_numpy(zero_copy_only=False)
    end = chars.astype(np.int64) + (1 if side.eos else 0)
    last = np.where(lengths > 0, ends[np.maximum(offsets[1:] - 1, 0)], end)
    bad_rows = np.bincount(row[bad], minlength=len(lengths)) > 0
    bad_rows |= (last != end) if side.eos else (last > end)
    if bad_rows.any():
        r = int(np.argmax(bad_rows))
        raise InputError(
            f"the {what} extraction's {SPANS_COLUMN} do not fit row {first_row + r}'s text "
            f"(spans in order, the last ending at character {int(end[r])}): the extraction was "
            "changed after it was written"
        )
    return spans


def _encode_with_offsets(
    side: _Side, texts: list[str], ids: np.ndarray, offsets: np.ndarray, first_row: int, what: str
) -> list[np.ndarray]:
    """Character spans of every stored token, from re-tokenizing the texts (ids verified)."""
    assert side.backend is not None
    encs = side.backend.encode_batch(
        [t + side.eos for t in texts], add_special_tokens=side.add_special_tokens
    )
    out = []
    for r, (text, enc) in enumerate(zip(texts, encs, strict=True)):
        stored = ids[offsets[r] : offsets[r + 1]]
        got = np.asarray(enc.ids, dtype=np.int64)
        if got.shape != stored.shape or not np.array_equal(got, stored):
            n = min(got.size, stored.size)
            diff = np.flatnonzero(got[:n] != stored[:n])
            pos = int(diff[0]) if diff.size else n
            raise InputError(
                f"row {first_row + r}: re-tokenizing the text with the {what} tokenizer gives "
                f"{got.size} ids that differ from the {stored.size} stored input_ids (first at "
                f"position {pos}); the tokenizer is not the one the extraction used, or the "
                "extraction's ids were changed"
            )
        out.append(char_spans(text, enc.offsets, side.eos))
    return out


@dataclass
class _Inputs:
    """The validated inputs of an alignment: both sides' extractions, tokenizers and maps."""

    base_path: Path
    base: _Side
    sides: dict[str, _Side]
    base_ds: DiskDataset
    datasets: dict[str, DiskDataset]
    values: str
    maps: dict[str, Any]


@dataclass
class _Job:
    """What every shard of one alignment reads (never written while the shards run)."""

    base: _Side
    sides: dict[str, _Side]
    aligners: dict[str, Any]
    #: Per source, per blend id whether its top-K entry maps to a target token.
    kept_ids: dict[str, np.ndarray]
    method: str
    vocab: str
    threads: int | None
    workers: int
    features: Any
    #: ``features.arrow_schema`` (built once: ``datasets`` rebuilds it on every access).
    schema: Any
    logits_dtype: str
    has_domain: bool
    logprobs: bool
    compression: str | None
    rows_per_batch: int
    num_rows: int
    num_shards: int


@dataclass
class _BaseRows:
    """One shard's target rows, as flat arrays (``offsets``: row offsets into every per-token
    array), and the output columns they give."""

    offsets: np.ndarray
    ids: np.ndarray
    spans: np.ndarray | None
    ref_ids: np.ndarray
    ref_values: np.ndarray
    next_ids: np.ndarray
    domains: np.ndarray
    domain_names: list[str]
    text: Any
    num_bytes: np.ndarray
    cols: dict[str, Any]


#: The per-source counts of ``align_stats.json``, in their order there.
_COUNT_KEYS = (
    "matched",
    "empty",
    "fallback",
    "masked",
    "exact_span",
    "unknown_ids",
    "unmapped_ids",
    "duplicate_ids",
    "topk_entries",
)


def align_dataset(
    base: str | os.PathLike[str],
    sources: Mapping[str, str | os.PathLike[str]],
    output_dir: str | os.PathLike[str],
    *,
    base_tokenizer: Any = None,
    source_tokenizers: Mapping[str, Any] | None = None,
    vocab_maps: Mapping[str, Any] | None = None,
    method: str = AlignSettings.method,
    vocab: str = AlignSettings.vocab,
    compat: str | None = AlignSettings.compat,
    fallback: str = AlignSettings.fallback,
    num_threads: int | None = AlignSettings.num_threads,
    rows_per_batch: int = AlignSettings.rows_per_batch,
    logits_dtype: str = AlignSettings.logits_dtype,
    compression: str | None = AlignSettings.compression,
    overwrite: bool = False,
    on_stale: str | None = None,
    progress: bool | None = None,
    shard: Any = None,
) -> AlignReport:
    """Re-expresses every source's top-K on the target's tokens, row by row (stage 3b).

    Args:
        base: the target model's extraction directory (stage 2 output).
        sources: source name (``[a-z][a-z0-9_]*``, not ``ref``) -> its extraction directory, of
            the same rows in the same order.
        output_dir: the aligned dataset (``save_to_disk`` layout, manifest, ``align_stats.json``).
        base_tokenizer: a tokenizer directory, ``"bundled:NAME"`` or tokenizer object (default:
            the one recorded in the extraction's manifest).
        source_tokenizers: the same per source name.
        vocab_maps: per source name, a :class:`fusellm.VocabMap`, a map file written by
            :func:`run_vocab_map`, or a reference ``{string: string}`` dict; used by
            ``vocab="soft"`` (a source without one gets the default ``"surface"`` map, built
            in memory).
        method, vocab, compat, fallback, num_threads, rows_per_batch, logits_dtype,
            compression: see :class:`fusellm.config.AlignSettings` (their defaults are its).
            ``num_threads`` also bounds the shards aligned at once.
        overwrite: replace an output made from other inputs instead of refusing.
        on_stale: ``"refuse"`` or ``"replace"`` such an output (default: from ``overwrite``;
            :mod:`fusellm.artifact`).
        progress: progress bar (default: only on a terminal).
        shard: ``"i/N"`` to align only this worker's shards (the shards ``s`` with
            ``s % N == i``; several processes or machines over one output directory, as
            ``fusellm extract`` does); whoever finds every shard done completes the output.
            A killed worker's rerun keeps its finished shards (one process without
            ``shard`` builds under a temporary directory instead: a failure leaves nothing).

    Raises:
        InputError: row counts or texts differ (naming the first row), a tokenizer does not match
            its extraction, offsets re-tokenization gives other ids (naming the row), a column is
            missing, a source name is invalid.
        StaleArtifactError: a vocabulary map was built for other vocabularies, or ``output_dir``
            holds an output made from other inputs.
    """
    from ..artifact import Artifact, stale_policy

    t0 = time.perf_counter()
    check_choice("method", method, ("offsets", "mined"))
    check_choice("vocab", vocab, ("hard", "soft"))
    check_choice("compat", compat, (None, "fusellm"))
    check_choice("fallback", fallback, ("next", "mask"))
    check_choice("logits_dtype", logits_dtype, _LOGITS_DTYPES)
    check_choice("compression", compression, COMPRESSIONS)
    rows_per_batch = positive_int("rows_per_batch", rows_per_batch)
    threads = check_num_threads(num_threads)
    slot = worker_slot(shard)
    out = Path(output_dir)
    inp = _read_inputs(
        base,
        sources,
        out,
        base_tokenizer=base_tokenizer,
        source_tokenizers=source_tokenizers,
        vocab_maps=vocab_maps,
        method=method,
        vocab=vocab,
        compat=compat,
        threads=threads,
    )
    fps, key = _output_key(inp, out, method, vocab, compat, fallback, logits_dtype)
    art = Artifact(out, "align", key, resumable=True)
    decision = art.decide(stale_policy(overwrite, on_stale))
    if decision.done:
        art.skipped()
        return _done_report(out, t0)
    job = _make_job(
        inp,
        method=method,
        vocab=vocab,
        compat=compat,
        fallback=fallback,
        threads=threads,
        rows_per_batch=rows_per_batch,
        logits_dtype=logits_dtype,
        compression=compression,
    )
    build = _Build(art, decision, _manifest_fields(job, inp, fps), key)
    if slot == (0, 1) and decision.state != "resume":
        report = _build_whole(build, job, inp, progress)
    else:
        report = _build_shards(build, job, inp, slot, progress)
    report.seconds = time.perf_counter() - t0
    return report


@dataclass
class _Build:
    """The output being built: its artifact, the decision, the manifest's fields and the key."""

    art: Any
    decision: Any
    fields: dict[str, Any]
    key: dict[str, Any]


def _build_whole(build: _Build, job: _Job, inp: _Inputs, progress: bool | None) -> AlignReport:
    """One process, every shard: built under a temporary directory renamed into place at the
    end (a failure leaves nothing behind)."""
    bar = progress_bar(progress, job.num_rows, "align", "row")
    try:
        with build.art.build(build.decision, build.fields) as tmp:
            _align_shards(job, inp, tmp, set(range(job.num_shards)), bar)
            return _commit(job, tmp, build.art.path, build.key, build.art)
    finally:
        bar.close()


def _build_shards(
    build: _Build, job: _Job, inp: _Inputs, slot: tuple[int, int], progress: bool | None
) -> AlignReport:
    """Worker ``slot`` (or a process resuming a partial output): its unfinished shards, built in
    place under the lock of its slot; it completes the output if it finds every shard done."""
    art, out = build.art, build.art.path
    with art.building(build.decision, build.fields, slot=f"{slot[0]}-of-{slot[1]}") as current:
        if current.done:  # completed by another worker meanwhile
            return _done_report(out, time.perf_counter())
        todo = [
            s for s in worker_shards(slot, job.num_shards) if not shard_done(out, s, job.num_shards)
        ]
        rows = sum(min(job.rows_per_batch, job.num_rows - s * job.rows_per_batch) for s in todo)
        bar = progress_bar(progress, rows, "align", "row")
        try:
            infos = _align_shards(job, inp, out, set(todo), bar)
        finally:
            bar.close()
        if not all(shard_done(out, s, job.num_shards) for s in range(job.num_shards)):
            return _partial_report(job, out, infos)
        report = _commit(job, out, out, build.key, art)
        art.complete(build.fields)
        return report


def _read_inputs(
    base: Any,
    sources: Any,
    out: Path,
    *,
    base_tokenizer: Any,
    source_tokenizers: Mapping[str, Any] | None,
    vocab_maps: Any,
    method: str,
    vocab: str,
    compat: str | None,
    threads: int | None,
) -> _Inputs:
    """Manifests, columns, tokenizers, row counts and texts of every input (read-only)."""
    src_dirs = _check_sources(sources)
    names = list(src_dirs)
    tok_specs = dict(source_tokenizers or {})
    unknown = [n for n in tok_specs if n not in src_dirs]
    if unknown:
        raise InputError(f"source_tokenizers names unknown source(s) {unknown}; sources: {names}")
    base_path, base_manifest = _open_extract(base, "base")
    paths: dict[str, tuple[Path, dict[str, Any]]] = {
        n: _open_extract(p, f"source {n!r}") for n, p in src_dirs.items()
    }
    if out.resolve() in {base_path.resolve(), *(p.resolve() for p, _ in paths.values())}:
        raise InputError(f"output_dir {out} is one of the inputs")
    base_side = _make_side(REF, base_path, base_manifest, base_tokenizer, "base")
    sides = {
        n: _make_side(n, p, m, tok_specs.get(n), f"source {n!r}") for n, (p, m) in paths.items()
    }
    base_ds = DiskDataset(base_path, "base")
    _check_columns(base_ds, base_side, "base")
    datasets_ = {n: DiskDataset(s.path, f"source {n!r}") for n, s in sides.items()}
    for n, s in sides.items():
        _check_columns(datasets_[n], s, f"source {n!r}")
        if s.num_rows != base_side.num_rows:
            raise InputError(
                f"source {n!r} has {s.num_rows} rows but the target has {base_side.num_rows}: "
                "the extractions must be made from the same rows"
            )
    if base_side.num_rows < 1:
        raise InputError("the target's extraction has no rows")
    values = _check_values(base_manifest, sides, compat)
    maps = _resolve_maps(vocab_maps, names, base_side, sides, vocab=vocab, num_threads=threads)
    if method == "offsets":  # re-tokenizing: only extractions made before token_spans existed
        for n, s, ds in [(REF, base_side, base_ds)] + [
            (n, s, datasets_[n]) for n, s in sides.items()
        ]:
            if SPANS_COLUMN not in ds.column_names:
                what = "base" if n == REF else f"source {n!r}"
                tok = load_tokenizer(s.tokenizer_spec, f"{what} tokenizer")
                s.backend = _backend(tok, what)
    inp = _Inputs(base_path, base_side, sides, base_ds, datasets_, values, maps)
    _check_same_texts(inp)
    return inp


def _check_values(base_manifest: Mapping[str, Any], sides: Mapping[str, _Side], compat: Any) -> str:
    """What every extraction's top-K values are (the same for all), checked against ``compat``."""
    values = _values_of(base_manifest)
    for n, s in sides.items():
        if _values_of(s.manifest) != values:
            raise InputError(
                f"source {n!r}'s extraction holds {_values_of(s.manifest)} but the target's holds "
                f"{values}: extract every model with the same values"
            )
    if compat == "fusellm" and values != "logits":
        raise InputError(
            "compat='fusellm' reproduces the reference rows, which are raw logits; these "
            "extractions hold log-probabilities (extract with values='logits')"
        )
    return values


def _check_same_texts(inp: _Inputs) -> None:
    """The same rows in the same order: extractions of the same input content carry the same
    input fingerprint; others are compared row by row."""
    base_key = inp.base.manifest.get("key", {})
    for n, s in inp.sides.items():
        src_key = s.manifest.get("key", {})
        same_input = (
            src_key.get("input_sha256") is not None
            and src_key.get("input_sha256") == base_key.get("input_sha256")
            and src_key.get("text_column") == base_key.get("text_column")
        )
        if not same_input:
            _scan_texts(inp.base, inp.base_ds, n, s, inp.datasets[n])


def _output_key(
    inp: _Inputs,
    out: Path,
    method: str,
    vocab: str,
    compat: str | None,
    fallback: str,
    logits_dtype: str,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The inputs' fingerprints, and the output's key (everything that changes its bytes)."""
    prev_fp = previous_fingerprints(out)
    fps = {REF: input_fingerprint(inp.base_path, inp.base.manifest, prev_fp.get(REF))}
    for n, s in inp.sides.items():
        fps[n] = input_fingerprint(s.path, s.manifest, prev_fp.get(n))
    key: dict[str, Any] = {
        "format": ALIGN_FORMAT,
        "base": {
            "data_sha256": fps[REF]["sha256"],
            "vocab_sha256": inp.base.vocab_sha256,
            "marker": inp.base.marker,
        },
        "sources": [
            {
                "name": n,
                "data_sha256": fps[n]["sha256"],
                "vocab_sha256": s.vocab_sha256,
                "marker": s.marker,
                "vocab_map_sha256": None if inp.maps[n] is None else inp.maps[n].content_sha256,
            }
            for n, s in inp.sides.items()
        ],
        "method": method,
        "vocab": vocab,
        "compat": compat,
        "fallback": fallback,
        "logits_dtype": logits_dtype,
        "values": inp.values,
    }
    return fps, key


def _done_report(out: Path, t0: float) -> AlignReport:
    """The report of an output that is already complete (from its ``align_stats.json``)."""
    try:
        stats = json.loads((out / ALIGN_STATS_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise StaleArtifactError(f"{out}: unreadable {ALIGN_STATS_NAME} ({e})") from e
    return AlignReport(
        out,
        stats["method"],
        stats["vocab"],
        stats["rows"],
        stats["base_positions"],
        stats["sources"],
        teachers=stats.get("teachers", {}),
        skipped=True,
        seconds=time.perf_counter() - t0,
    )


def _make_job(
    inp: _Inputs,
    *,
    method: str,
    vocab: str,
    compat: str | None,
    fallback: str,
    threads: int | None,
    rows_per_batch: int,
    logits_dtype: str,
    compression: str | None,
) -> _Job:
    """The aligners, the output schema and the settings every shard reads."""
    from .. import _native
    from ..align import Aligner

    aligners = {
        n: Aligner(
            inp.base.vocab,
            s.vocab,
            base_marker=inp.base.marker,
            blend_marker=s.marker,
            vocab_map=inp.maps[n],
            compat=compat,  # type: ignore[arg-type]
            fallback=fallback,  # type: ignore[arg-type]
        )
        for n, s in inp.sides.items()
    }
    has_domain = DOMAIN_COLUMN in inp.base_ds.column_names
    features = align_features(
        inp.base.top_k,
        {n: s.top_k for n, s in inp.sides.items()},
        logits_dtype,
        has_domain=has_domain,
    )
    num_rows = inp.base.num_rows
    num_shards = math.ceil(num_rows / rows_per_batch)
    return _Job(
        base=inp.base,
        sides=inp.sides,
        aligners=aligners,
        kept_ids={n: a.targets(vocab) >= 0 for n, a in aligners.items()},  # type: ignore[arg-type]
        method=method,
        vocab=vocab,
        threads=threads,
        workers=max(1, min(threads or _native.default_num_threads(), num_shards)),
        features=features,
        schema=features.arrow_schema,
        logits_dtype=logits_dtype,
        has_domain=has_domain,
        logprobs=inp.values == "logprobs",
        compression=compression,
        rows_per_batch=rows_per_batch,
        num_rows=num_rows,
        num_shards=num_shards,
    )


# --- the shards ----------------------------------------------------------------------------------


def _align_shards(
    job: _Job, inp: _Inputs, directory: Path, todo: set[int], bar: Any
) -> list[dict[str, Any]]:
    """Reads the inputs shard by shard (the same rows of every extraction, in lockstep) and
    aligns and writes the shards in ``todo`` on a pool of ``job.workers`` threads, at most one
    shard more than that read ahead. Returns their :func:`_align_shard` infos, in shard order;
    the first failing shard's error wins."""
    from collections import deque
    from concurrent.futures import Future, ThreadPoolExecutor

    if not todo:  # a worker whose shards are all done: nothing to read
        return []
    names = list(job.sides)
    iters = [row_tables(inp.base_ds.batches(), job.rows_per_batch)] + [
        row_tables(inp.datasets[n].batches(), job.rows_per_batch) for n in names
    ]
    infos: list[dict[str, Any]] = []
    pending: deque[Future[dict[str, Any]]] = deque()

    def collect() -> None:
        info = pending.popleft().result()
        bar.update(info["num_rows"])
        infos.append(info)

    pool = ThreadPoolExecutor(max_workers=job.workers, thread_name_prefix="fusellm-align")
    try:
        start = 0
        try:
            for index, tables in enumerate(_lockstep(iters, ["base", *names])):
                if start + tables[0].num_rows > job.num_rows:
                    raise InputError(
                        f"base: the data holds more rows than its manifest's {job.num_rows}"
                    )
                if index in todo:
                    pending.append(pool.submit(_align_shard, job, index, start, tables, directory))
                start += tables[0].num_rows
                while len(pending) > job.workers:
                    collect()
        except BaseException:
            while pending:  # an earlier shard's error comes first
                collect()
            raise
        while pending:
            collect()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if start != job.num_rows:
        raise InputError(
            f"the extractions hold {start} rows but their manifests say {job.num_rows}"
        )
    return infos


def _align_shard(
    job: _Job, index: int, start: int, tables: Sequence[Any], directory: Path
) -> dict[str, Any]:
    """Aligns one shard's rows (``tables``: the target's, then each source's) and writes its
    file. Returns what the output's statistics need of it: rows, target positions, per source
    the counts of ``align_stats.json``, and the teacher sums (:func:`_teacher_sums`)."""
    import pyarrow as pa

    from ..diagnostics import TeacherStats

    tb, *ts = tables
    rows = _base_rows(job, tb, start)
    teachers = TeacherStats(len(job.base.vocab), logprobs=job.logprobs)
    counts, aligned = {}, {}
    for (name, side), t in zip(job.sides.items(), ts, strict=True):
        counts[name], aligned[name] = _source_rows(job, name, side, t, rows, teachers, start)
    # Every candidate scored in one pass, from the rows as stored (a merged value rounded to
    # logits_dtype).
    teachers.add_shard(
        rows.next_ids,
        rows.domains,
        rows.domain_names,
        (rows.ref_ids, rows.ref_values),
        {n: (a.ids, a.logits, a.status) for n, a in aligned.items()},
    )
    table = pa.Table.from_arrays(
        [rows.cols[f.name].cast(f.type) for f in job.schema], schema=job.schema
    )
    info = {
        "index": index,
        "row_start": start,
        "num_rows": tb.num_rows,
        "positions": int(rows.offsets[-1]),
        "counts": counts,
        "teachers": _teacher_sums(teachers),
    }
    # Key order kept: the teacher sums are added up in it.
    return write_shard(
        directory, index, job.num_shards, table, job.compression, info, sort_keys=False
    )


def _base_rows(job: _Job, tb: Any, start: int) -> _BaseRows:
    """The target's rows of a shard, checked, and the output columns they give."""
    import pyarrow as pa

    from ..diagnostics import next_tokens

    side, schema = job.base, job.schema
    text = tb.column(side.text_column)
    offsets, ids = list_column(tb.column("input_ids"), "base input_ids")
    if not np.array_equal(np.diff(offsets), scalar_column(tb, "num_tokens", np.int64)):
        raise InputError(f"base: num_tokens disagrees with input_ids near row {start}")
    ref_off, ref_ids = list_column(tb.column("per_step_indices"), "base per_step_indices")
    if not np.array_equal(ref_off, offsets):
        raise InputError(f"base: per_step_indices rows do not match input_ids near row {start}")
    spans = (
        _spans_of(side, tb, text, ids, offsets, start, "target's")
        if job.method == "offsets"
        else None
    )
    domains, domain_names = _domains(job, tb, offsets)
    _, ref_values = list_column(tb.column("per_step_logits"), "base per_step_logits")
    cols: dict[str, Any] = {
        "text": arrow_array(text).cast(pa.string()),
        "row_index": pa.array(np.arange(start, start + tb.num_rows, dtype=np.int64)),
        "num_bytes": arrow_array(tb.column("num_bytes")).cast(pa.int32()),
        "input_ids": arrow_array(tb.column("input_ids")).cast(schema.field("input_ids").type),
        "ref_ids": arrow_array(tb.column("per_step_indices")).cast(schema.field("ref_ids").type),
        "ref_logits": arrow_array(tb.column("per_step_logits")).cast(
            schema.field("ref_logits").type
        ),
        "ref_metric_ce": arrow_array(tb.column("metric_ce")).cast(pa.float32()),
        "ref_num_tokens": arrow_array(tb.column("num_tokens")).cast(pa.int32()),
    }
    if job.has_domain:
        cols[DOMAIN_COLUMN] = arrow_array(tb.column(DOMAIN_COLUMN)).cast(pa.string())
    return _BaseRows(
        offsets=offsets,
        ids=ids,
        spans=spans,
        ref_ids=ref_ids,
        ref_values=ref_values,
        next_ids=next_tokens(ids, offsets),
        domains=domains,
        domain_names=domain_names,
        text=text,
        num_bytes=scalar_column(tb, "num_bytes", np.int64),
        cols=cols,
    )


def _domains(job: _Job, tb: Any, offsets: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Per target position its row's domain code, and the shard's domains in order of first
    appearance (``-1`` and none without a domain column)."""
    import pyarrow as pa

    if not job.has_domain:
        return np.full(int(offsets[-1]), -1, np.int64), []
    col = arrow_array(tb.column(DOMAIN_COLUMN)).cast(pa.string()).fill_null("None")
    encoded = col.dictionary_encode()
    codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    return np.repeat(codes, np.diff(offsets)), [str(d) for d in encoded.dictionary.to_pylist()]


def _source_rows(
    job: _Job,
    name: str,
    side: _Side,
    t: Any,
    rows: _BaseRows,
    teachers: Any,
    start: int,
) -> tuple[dict[str, int | None], Any]:
    """Aligns one source's rows of a shard onto the target's (one kernel call, which reads the
    stored top-K values as they are and returns the merged ones in ``logits_dtype``), adds the
    mass of its own rows to ``teachers`` and its columns to ``rows.cols``; returns the source's
    counts and its :class:`~fusellm.align.AlignedBatch`."""
    import pyarrow as pa

    what = f"source {name!r}"
    bad = _first_text_mismatch(rows.text, t.column(side.text_column))
    if bad is not None:
        raise InputError(
            f"row {start + bad}: the text of source {name!r} differs from the target's (the "
            "extractions were not made from the same rows)"
        )
    if not np.array_equal(scalar_column(t, "num_bytes", np.int64), rows.num_bytes):
        raise InputError(f"{what}: num_bytes differs from the target's near row {start}")
    s_off, s_ids = list_column(t.column("input_ids"), f"{what} input_ids")
    k_off, k_ids = list_column(t.column("per_step_indices"), f"{what} indices")
    l_off, k_logits = list_column(t.column("per_step_logits"), f"{what} logits")
    if not (np.array_equal(s_off, k_off) and np.array_equal(s_off, l_off)):
        raise InputError(f"{what}: per_step rows do not match input_ids near row {start}")
    spans = (
        _spans_of(side, t, rows.text, s_ids, s_off, start, f"{name!r}")
        if job.method == "offsets"
        else None
    )
    try:
        aligned = job.aligners[name].align_flat(
            rows.ids,
            rows.offsets,
            s_ids,
            s_off,
            k_ids,
            k_logits,
            method=job.method,  # type: ignore[arg-type]
            vocab=job.vocab,  # type: ignore[arg-type]
            base_offsets=rows.spans,
            blend_offsets=spans,
            num_threads=job.threads,
            logits_dtype=job.logits_dtype,  # type: ignore[arg-type]
        )
    except InputError as e:
        raise InputError(f"{what}: {e}") from e
    teachers.add_source_mass(name, k_logits, k_ids, job.kept_ids[name])
    cols = rows.cols
    cols[f"{name}_ids"] = nested(rows.offsets, aligned.ids)
    cols[f"{name}_logits"] = nested(rows.offsets, aligned.logits)
    cols[f"{name}_metric_ce"] = arrow_array(t.column("metric_ce")).cast(pa.float32())
    cols[f"{name}_num_tokens"] = arrow_array(t.column("num_tokens")).cast(pa.int32())
    cols[f"{name}_status"] = nested(rows.offsets, aligned.status)
    return {k: aligned.counts[k] for k in _COUNT_KEYS}, aligned


# --- statistics and the commit -------------------------------------------------------------------


def _teacher_sums(stats: Any) -> dict[str, Any]:
    """A :class:`~fusellm.diagnostics.TeacherStats`' running sums (JSON-ready). Summed over the
    shards in shard order (:func:`_add_teacher_sums`), they are, bit for bit, the sums of one
    accumulator fed every shard in turn: each of its sums starts at 0.0 and adds one float per
    shard."""
    return {"sums": stats._sums, "mass": stats._mass}


def _add_teacher_sums(stats: Any, part: Mapping[str, Any]) -> None:
    """Adds one shard's :func:`_teacher_sums` into ``stats`` (keys in first-seen order)."""
    for name, per in part["sums"].items():
        into = stats._sums.setdefault(name, {})
        for dom, acc in per.items():
            total = into.setdefault(dom, {})
            for key, v in acc.items():
                total[key] = total.get(key, 0.0) + v
    for name, mass in part["mass"].items():
        total = stats._mass.setdefault(name, dict.fromkeys(mass, 0.0))
        for key, v in mass.items():
            total[key] += v


def _sum_shards(
    job: _Job, infos: Sequence[Mapping[str, Any]]
) -> tuple[int, dict[str, dict[str, Any]], Any]:
    """Target positions, per-source counts and teacher statistics of shards (their
    :func:`_align_shard` infos), added up in shard order."""
    from ..diagnostics import TeacherStats

    counts: dict[str, dict[str, Any]] = {
        n: {k: None if k == "exact_span" and job.method != "offsets" else 0 for k in _COUNT_KEYS}
        for n in job.sides
    }
    teachers = TeacherStats(len(job.base.vocab), logprobs=job.logprobs)
    for info in infos:
        for n, c in info["counts"].items():
            for k, v in c.items():
                if v is not None:
                    counts[n][k] += v
        _add_teacher_sums(teachers, info["teachers"])
    return sum(int(i["positions"]) for i in infos), counts, teachers


def _commit(job: _Job, directory: Path, out: Path, key: Mapping[str, Any], art: Any) -> AlignReport:
    """Once every shard is in ``directory`` (checked against the rows they should hold): the
    dataset metadata and ``align_stats.json`` (every shard's counts and teacher sums, added in
    shard order). ``art`` learns the shards' SHA-256 from their sidecars, so its commit does not
    read them again. Returns the report of the output ``out``."""
    from ..io import atomic_write_json, shard_file_name, write_dataset_metadata

    infos = finished_shards(directory, job.num_shards, job.rows_per_batch, job.num_rows)
    positions, counts, teachers = _sum_shards(job, infos)
    note_shard_digests(art, infos, job.num_shards)
    files = [shard_file_name(s, job.num_shards) for s in range(job.num_shards)]
    write_dataset_metadata(
        directory,
        job.features,
        files,
        fingerprint=hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest(),
    )
    report = AlignReport(
        out, job.method, job.vocab, job.num_rows, positions, counts, teachers=teachers.result()
    )
    atomic_write_json(directory / ALIGN_STATS_NAME, report.stats(), sort_keys=False)
    return report


def _partial_report(job: _Job, out: Path, infos: Sequence[Mapping[str, Any]]) -> AlignReport:
    """What a worker did while other workers' shards are still missing."""
    positions, counts, _ = _sum_shards(job, infos)
    rows = sum(int(i["num_rows"]) for i in infos)
    return AlignReport(out, job.method, job.vocab, rows, positions, counts, complete=False)


def _manifest_fields(job: _Job, inp: _Inputs, fps: Mapping[str, Any]) -> dict[str, Any]:
    """What the manifest records besides the key."""
    return {
        "format": ALIGN_FORMAT,
        "fingerprints": dict(fps),
        "inputs": {
            "base": str(inp.base_path.resolve()),
            "sources": {n: str(s.path.resolve()) for n, s in job.sides.items()},
        },
        "parameters": {
            "rows_per_batch": job.rows_per_batch,
            "compression": job.compression,
            "num_threads": job.threads,
        },
        "candidates": [REF, *job.sides],
        "num_rows": job.num_rows,
        "num_shards": job.num_shards,
    }


def _lockstep(iters: list[Iterator[Any]], what: list[str]) -> Iterator[list[Any]]:
    """Batches of every input, checked to hold the same number of rows."""
    done: Any = object()
    while True:
        items = [next(it, done) for it in iters]
        ended = [w for w, x in zip(what, items, strict=True) if x is done]
        if len(ended) == len(items):
            return
        if ended:
            raise InputError(f"{ended} hold(s) fewer rows than the others' data")
        sizes = {x.num_rows for x in items}
        if len(sizes) != 1:
            raise InputError(f"the inputs' data hold different numbers of rows ({sizes})")
        yield items


# --- command line --------------------------------------------------------------------------------


def _pairs(values: Sequence[str] | None, option: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values or []:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise InputError(f"{option} takes NAME=PATH, got {v!r}")
        if name in out:
            raise InputError(f"{option}: {name!r} given twice")
        out[name] = path
    return out


def add_align_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds the ``align`` command to an ``argparse`` sub-parser collection."""
    p = subparsers.add_parser(
        "align",
        help="re-express source distributions on target tokens",
        description=(
            "Align the extractions (fusellm extract) of one or more source models onto the "
            "target's extraction BASE_EXTRACT, row by row: each source's top-K is re-expressed "
            "on the target's positions and vocabulary. Writes OUTPUT (a save_to_disk dataset "
            "with ref_* and {name}_* columns, a manifest and align_stats.json). Re-running with "
            "the same inputs does nothing; an OUTPUT made from other inputs is refused unless "
            "--overwrite. --shard i/N splits the work across processes or machines (workers "
            "build OUTPUT in place, and a killed worker's rerun keeps its finished shards)."
        ),
    )
    p.add_argument("base", metavar="BASE_EXTRACT", help="the target model's extraction directory")
    p.add_argument("output", metavar="OUTPUT", help="the aligned dataset directory to write")
    p.add_argument(
        "-s",
        "--source",
        action="append",
        required=True,
        metavar="NAME=DIR",
        help="a source: its name ([a-z][a-z0-9_]*, not ref) and extraction directory; repeat",
    )
    p.add_argument(
        "--vocab-map",
        action="append",
        metavar="NAME=FILE",
        help="the vocabulary map of a source (fusellm vocab-map), for --vocab soft; repeat",
    )
    p.add_argument(
        "--base-tokenizer",
        default=None,
        help="target tokenizer (directory or bundled:NAME; default: the extraction's)",
    )
    p.add_argument(
        "--source-tokenizer",
        action="append",
        metavar="NAME=TOKENIZER",
        help="a source's tokenizer (directory or bundled:NAME; default: the extraction's)",
    )
    add_settings_arguments(p, AlignSettings)
    add_worker_arguments(p, "align")
    p.add_argument("--overwrite", action="store_true", help="replace an output of other inputs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_align_cli)
    return p


def _align_cli(args: argparse.Namespace) -> int:
    report = run_workers(
        "align",
        args,
        args.base,
        _pairs(args.source, "--source"),
        args.output,
        base_tokenizer=args.base_tokenizer,
        source_tokenizers=_pairs(args.source_tokenizer, "--source-tokenizer"),
        vocab_maps=_pairs(args.vocab_map, "--vocab-map") or None,
        **settings_from_args(args, AlignSettings),
        overwrite=args.overwrite,
        progress=False if args.no_progress else None,
    )
    if not report.complete:
        print(
            f"{args.output}: shard {args.shard} aligned in {report.seconds:.1f} s "
            f"({report.rows} rows); other workers' shards are still missing"
        )
        return 0
    state = "up to date" if report.skipped else f"aligned in {report.seconds:.1f} s"
    print(f"{args.output}: {state}; {report.rows} rows, {report.base_positions} target positions")
    for name, c in report.sources.items():
        share = (c["matched"] or 0) / max(report.base_positions, 1)
        print(
            f"  {name}: {c['matched']} matched ({share:.1%}), {c['empty']} empty, "
            f"{c['fallback']} fallback, {c['masked']} masked"
        )
    return 0
