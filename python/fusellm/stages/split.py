"""Stage 1: split documents so that every row fits a block under EVERY tokenizer.

Each model of a fusion (the target and every source) later runs over the same rows, so a row must
fit ``block_size - margin`` tokens (defaults 2048 - 48 = 2000) under each tokenizer; the margin
leaves room for the EOS token appended at extraction and for small differences between
tokenizations.

Algorithm (``O(total tokens)``):

1. Documents are read in batches and tokenized once by each tokenizer with its fast (Rust) batch
   encoder, counting tokens only. A document within the limit under every tokenizer is copied
   through unchanged: zero-copy runs of the input's Arrow column, so a million short documents
   cost one tokenization per tokenizer.
2. A too-long document is re-encoded WITH character offsets and cut greedily in character space:
   from the current start ``s``, each tokenizer allows the text up to the start of its
   ``limit + 1``-th token at or after ``s``; the chunk ends at the smallest of these ends (the
   reference instead cuts the tokenizer with the most tokens into chunks of ``limit`` ids, and
   decodes each chunk, which can overflow another tokenizer and does not round-trip the text).
3. ``boundary`` moves that end back to a better place within the last ``max_backoff`` (25%) of
   the chunk: ``"word"`` (default) to the end of a whitespace run, so no word is split;
   ``"sentence"`` to the end of a sentence (``.!?`` + optional closing quotes, or a newline),
   falling back to a word boundary; ``"token"`` keeps the token boundary. Chunks are exact
   substrings: ``"".join(chunks) == document``; whitespace stays at the end of a chunk, so the
   next chunk starts with a word.
4. Every chunk is re-tokenized by every tokenizer (a tokenization of a substring can differ from
   the document's at the cut); the rare chunk over the limit is cut again by its own offsets,
   until all fit. ``boundary="reference"`` reproduces the reference behaviour instead (ids
   chunks of the longest tokenization, decoded; not verified).

Rows keep the input order; each row records ``doc_index`` (its document's row in the input) and
``chunk_index`` (0, 1, ... within the document). Other input columns are copied to every chunk.
Empty documents are dropped (counted) by default, because they give the models nothing to score.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..errors import FuseLLMError, InputError, InputTypeError
from ..loading import load_tokenizer
from ..progress import progress_bar

__all__ = [
    "SplitStats",
    "add_split_parser",
    "load_tokenizers",
    "run_split",
    "split_texts",
]

logger = logging.getLogger(__name__)

Boundary = Literal["word", "sentence", "token", "reference"]
BOUNDARIES: tuple[str, ...] = ("word", "sentence", "token", "reference")
SPLIT_FORMAT = "fusellm.split/1"
#: The arguments of :func:`split_texts` that change its rows (the others: speed, progress).
_OUTPUT_PARAMS = ("block_size", "margin", "boundary", "max_backoff", "keep_columns", "drop_empty")

#: End of a whitespace run followed by a non-space character (the cut goes after the run).
_WORD_END = re.compile(r"\s(?=\S)")
#: End of a sentence: terminal punctuation, optional closing quotes/brackets, whitespace; or a
#: newline and the whitespace after it.
_SENTENCE_END = re.compile(r"(?:[.!?…。！？]['\"”’»)\]]*\s+|\n\s*)(?=\S)")
_MAX_REPAIR_ROUNDS = 32
_MIN_LIMIT = 16


@dataclass
class SplitStats:
    """What a split did."""

    num_docs: int = 0
    num_rows: int = 0
    num_split_docs: int = 0
    num_empty_dropped: int = 0
    #: Cuts that could not be moved to the requested boundary (no boundary in the window).
    num_forced_cuts: int = 0
    #: Chunks that were over the limit once re-tokenized and were cut again.
    num_repaired: int = 0
    #: Rows over the limit (only ``boundary="reference"``, which does not verify).
    num_over_limit: int = 0
    #: Largest row length, per tokenizer name.
    max_tokens: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    #: The output was already complete for these inputs: nothing was done (the statistics are
    #: those recorded when it was made).
    skipped: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Tok:
    name: str
    backend: Any  # tokenizers.Tokenizer, without truncation or padding
    hf: Any | None  # the transformers tokenizer, when one was given

    def count(self, texts: list[str]) -> list[int]:
        encode = getattr(self.backend, "encode_batch_fast", None) or self.backend.encode_batch
        return [len(e) for e in encode(texts, add_special_tokens=False)]

    def spans(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per text, the start and end character offsets of every token, made non-decreasing."""
        out = []
        for e in self.backend.encode_batch(texts, add_special_tokens=False):
            offsets = np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2)
            out.append(
                (np.maximum.accumulate(offsets[:, 0]), np.maximum.accumulate(offsets[:, 1]))
                if len(offsets)
                else (offsets[:, 0], offsets[:, 1])
            )
        return out

    def ids(self, text: str) -> list[int]:
        return list(self.backend.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        if self.hf is not None:
            return str(self.hf.decode(ids))
        return str(self.backend.decode(ids, skip_special_tokens=False))


def _backend_of(tok: Any) -> Any:
    import tokenizers

    backend = (
        tok if isinstance(tok, tokenizers.Tokenizer) else getattr(tok, "backend_tokenizer", None)
    )
    if backend is None:
        raise InputTypeError(
            f"{type(tok).__name__} is not a fast tokenizer: pass a transformers fast tokenizer, a "
            "tokenizers.Tokenizer, or a local path"
        )
    if backend.truncation is not None or backend.padding is not None:
        # Counting must see every token: work on a copy without truncation or padding.
        backend = tokenizers.Tokenizer.from_str(backend.to_str())
        backend.no_truncation()
        backend.no_padding()
    return backend


def load_tokenizers(specs: Any) -> list[Any]:
    """Loads tokenizers from local paths (``AutoTokenizer``), ``"bundled:NAME"`` names, or passes
    tokenizer objects through. ``specs`` is one of these or a sequence of them."""
    if isinstance(specs, (str, Path)) or not isinstance(specs, Sequence):
        specs = [specs]
    out = []
    for spec in specs:
        if isinstance(spec, (str, Path)):
            out.append(load_tokenizer(spec))
        else:
            out.append(spec)
    if not out:
        raise InputError("at least one tokenizer is needed")
    return out


def _tok_name(tok: Any, index: int) -> str:
    path = getattr(tok, "name_or_path", None)
    if path:
        return f"{index}:{path}"
    return f"{index}:{type(tok).__name__}"


def _as_toks(tokenizers: Any) -> list[_Tok]:
    toks = load_tokenizers(tokenizers)
    return [
        _Tok(_tok_name(t, i), _backend_of(t), None if hasattr(t, "to_str") else t)
        for i, t in enumerate(toks)
    ]


# --- cutting -------------------------------------------------------------------------------------


def _snap(text: str, s: int, e: int, boundary: str, max_backoff: float) -> tuple[int, bool]:
    """A cut position in ``(s, e]`` at the requested boundary; ``(e, False)`` if there is none."""
    if boundary == "token" or e >= len(text):
        return e, True
    lo = s + max(1, int((e - s) * (1.0 - max_backoff)))
    if lo > e:
        return e, False
    if boundary == "sentence":
        best = -1
        for m in _SENTENCE_END.finditer(text, max(s, lo - 1), e + 1):
            if lo <= m.end() <= e:
                best = m.end()
        if best > s:
            return best, True
    best = -1
    for m in _WORD_END.finditer(text, lo - 1, e + 1):
        best = m.start() + 1
    if best >= lo:
        return best, True
    if text[e - 1].isspace() or text[e].isspace():
        return e, True  # inside a whitespace run: no word is split
    return e, False


def _cut(
    text: str,
    spans: Sequence[tuple[np.ndarray, np.ndarray]],
    limit: int,
    boundary: str,
    max_backoff: float,
) -> tuple[list[str], int]:
    """Cuts ``text`` into substrings of at most ``limit`` tokens under each tokenization (by the
    document's offsets). Returns the chunks and the number of forced (token-boundary) cuts.

    A chunk starting at ``s`` counts, per tokenizer, every token that ends after ``s`` (a token
    straddling ``s``, such as ``" word"`` when the cut falls after the space, still costs a token
    in the next chunk) and ends where the ``limit + 1``-th such token starts."""
    n = len(text)
    s = 0
    chunks: list[str] = []
    forced = 0
    while s < n:
        e = n
        for st, en in spans:
            i = int(np.searchsorted(en, s, side="right"))
            j = i + limit
            if j < len(st):
                e = min(e, int(st[j]))
        if e >= n:
            chunks.append(text[s:])
            break
        if e <= s:
            e = s + 1
        c, ok = _snap(text, s, e, boundary, max_backoff)
        forced += not ok
        chunks.append(text[s:c])
        s = c
    if len(chunks) == 1 and n > 1:
        # The offsets say the text fits but its own tokenization does not (zero-width tokens at
        # the end): halve it at a token start.
        ends = [int(st[min(limit, len(st) - 1)]) for st, _ in spans if len(st) > 1]
        c = min([x for x in ends if 0 < x < n] or [n // 2])
        chunks = [text[:c], text[c:]]
        forced += 1
    return chunks, forced


class _Splitter:
    def __init__(
        self, toks: list[_Tok], limit: int, boundary: str, max_backoff: float, stats: SplitStats
    ) -> None:
        self.toks = toks
        self.limit = limit
        self.boundary = boundary
        self.max_backoff = max_backoff
        self.stats = stats

    def split_long(self, texts: list[str], counts: np.ndarray) -> list[list[str]]:
        """Chunks of each text (all of which are over the limit), verified under every tokenizer."""
        if self.boundary == "reference":
            pieces = [self._reference(t, c) for t, c in zip(texts, counts, strict=True)]
            flat = [c for p in pieces for c in p]
            per_tok = np.asarray([tok.count(flat) for tok in self.toks]).reshape(len(self.toks), -1)
            self._record(per_tok)
            self.stats.num_over_limit += int((per_tok.max(axis=0) > self.limit).sum())
            return pieces
        spans = [tok.spans(texts) for tok in self.toks]
        pieces: list[list[str]] = []
        for d, text in enumerate(texts):
            chunks, forced = _cut(
                text, [s[d] for s in spans], self.limit, self.boundary, self.max_backoff
            )
            self.stats.num_forced_cuts += forced
            pieces.append(chunks)
        return self._verify(pieces)

    def _verify(self, pieces: list[list[str]]) -> list[list[str]]:
        # Positions (doc, chunk) still to check; new sub-chunks are re-checked, others are done.
        todo = [(d, c) for d, p in enumerate(pieces) for c in range(len(p))]
        for _ in range(_MAX_REPAIR_ROUNDS):
            if not todo:
                return pieces
            texts = [pieces[d][c] for d, c in todo]
            per_tok = np.asarray([tok.count(texts) for tok in self.toks]).reshape(
                len(self.toks), -1
            )
            worst = per_tok.max(axis=0)
            self._record(per_tok[:, worst <= self.limit])
            over = [todo[i] for i in np.flatnonzero(worst > self.limit)]
            if not over:
                return pieces
            self.stats.num_repaired += len(over)
            over_texts = [pieces[d][c] for d, c in over]
            spans = [tok.spans(over_texts) for tok in self.toks]
            replaced: dict[tuple[int, int], list[str]] = {}
            for i, (key, text) in enumerate(zip(over, over_texts, strict=True)):
                sub, forced = _cut(
                    text, [s[i] for s in spans], self.limit, self.boundary, self.max_backoff
                )
                self.stats.num_forced_cuts += forced
                replaced[key] = sub
            todo = []
            for d in sorted({d for d, _ in over}):
                new: list[str] = []
                for c, chunk in enumerate(pieces[d]):
                    if (d, c) in replaced:
                        todo.extend((d, len(new) + k) for k in range(len(replaced[(d, c)])))
                        new.extend(replaced[(d, c)])
                    else:
                        new.append(chunk)
                pieces[d] = new
        raise FuseLLMError(
            f"could not cut {len(todo)} chunk(s) under {self.limit} tokens after "
            f"{_MAX_REPAIR_ROUNDS} rounds"
        )

    def _record(self, per_tok: np.ndarray) -> None:
        if per_tok.size:
            for tok, m in zip(self.toks, per_tok.max(axis=1).tolist(), strict=True):
                self.stats.max_tokens[tok.name] = max(self.stats.max_tokens[tok.name], int(m))

    def _reference(self, text: str, counts: np.ndarray) -> list[str]:
        tok = self.toks[int(np.argmax(counts))]
        ids = tok.ids(text)
        return [tok.decode(ids[i : i + self.limit]) for i in range(0, len(ids), self.limit)]


# --- the stage -----------------------------------------------------------------------------------


def split_texts(
    data: Any,
    tokenizers: Any,
    *,
    text_column: str = "text",
    block_size: int = 2048,
    margin: int = 48,
    boundary: Boundary = "word",
    max_backoff: float = 0.25,
    keep_columns: bool = True,
    drop_empty: bool = True,
    batch_size: int = 1000,
    progress: bool | None = None,
    return_stats: bool = False,
) -> Any:
    """Splits documents into rows of at most ``block_size - margin`` tokens under every tokenizer.

    Args:
        data: the documents: a ``datasets.Dataset``, a path (``save_to_disk`` directory, JSONL,
            JSON, Parquet, Arrow, a directory of text files) or a list of strings.
        tokenizers: one tokenizer or a sequence (target and sources): fast ``transformers``
            tokenizers, ``tokenizers.Tokenizer`` objects, local paths or ``"bundled:NAME"``.
        text_column: the column holding the documents (kept under the same name).
        block_size, margin: each row has at most ``block_size - margin`` tokens (no special
            tokens) under each tokenizer.
        boundary: where a too-long document is cut: ``"word"`` (default), ``"sentence"``,
            ``"token"``, or ``"reference"`` (the reference pipeline's decode-of-id-chunks).
        max_backoff: how far back (a fraction of the chunk) a cut may move to reach a boundary.
        keep_columns: copy the input's other columns to every row of their document.
        drop_empty: drop empty documents (else they are kept as empty rows).
        batch_size: documents per tokenizer batch.
        progress: show a progress bar (default: only on a terminal).
        return_stats: also return a :class:`SplitStats`.

    Returns:
        A ``datasets.Dataset`` with the input's columns (``text_column`` holding the rows) plus
        ``doc_index`` (int64) and ``chunk_index`` (int32); or ``(dataset, stats)``.
    """
    from ..io import load_text_dataset

    limit = _check_split_settings(boundary, block_size, margin, max_backoff, batch_size)
    ds = load_text_dataset(data, text_column=text_column)
    for extra in ("doc_index", "chunk_index"):
        if extra in ds.column_names:
            raise InputError(
                f"the input already has a {extra!r} column (is it a split output?); remove or "
                "rename it first"
            )
    toks = _as_toks(tokenizers)
    table = _table_of(ds)
    column = _text_column(table, text_column)

    t0 = time.perf_counter()
    stats = SplitStats(num_docs=table.num_rows, max_tokens={t.name: 0 for t in toks})
    splitter = _Splitter(toks, limit, boundary, max_backoff, stats)
    new_text, rows_per_doc = _split_column(column, splitter, drop_empty, batch_size, progress)
    out = _split_dataset(ds, table, text_column, new_text, rows_per_doc, keep_columns)
    stats.num_rows = len(out)
    stats.seconds = time.perf_counter() - t0
    logger.info(
        "split %d documents into %d rows (%d cut, %d empty dropped) in %.1f s",
        stats.num_docs,
        stats.num_rows,
        stats.num_split_docs,
        stats.num_empty_dropped,
        stats.seconds,
    )
    return (out, stats) if return_stats else out


def _check_split_settings(
    boundary: str, block_size: int, margin: int, max_backoff: float, batch_size: int
) -> int:
    """The settings of :func:`split_texts`, checked; returns the row limit in tokens."""
    if boundary not in BOUNDARIES:
        raise InputError(f"boundary must be one of {list(BOUNDARIES)}, got {boundary!r}")
    limit = int(block_size) - int(margin)
    if margin < 0 or limit < _MIN_LIMIT:
        raise InputError(
            f"block_size - margin must be at least {_MIN_LIMIT} with margin >= 0 "
            f"(got block_size={block_size}, margin={margin})"
        )
    if not 0.0 <= max_backoff < 1.0:
        raise InputError(f"max_backoff must be in [0, 1), got {max_backoff}")
    if batch_size < 1:
        raise InputError(f"batch_size must be positive, got {batch_size}")
    return limit


def _text_column(table: Any, text_column: str) -> Any:
    """The documents' column: strings, no nulls."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = table.column(text_column)
    if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
        raise InputTypeError(f"column {text_column!r} holds {column.type}, not strings")
    if column.null_count:
        first = int(pc.index(pc.is_null(column), True).as_py())
        raise InputError(
            f"column {text_column!r} has {column.null_count} null(s), first at row {first}"
        )
    return column


def _split_column(
    column: Any, splitter: _Splitter, drop_empty: bool, batch_size: int, progress: bool | None
) -> tuple[Any, np.ndarray]:
    """The rows of every document, in order, as one Arrow column (runs of documents within the
    limit are copied through zero-copy), and the number of rows of each document."""
    import pyarrow as pa

    toks, limit, stats = splitter.toks, splitter.limit, splitter.stats
    num_docs = len(column)
    rows_per_doc = np.ones(num_docs, dtype=np.int64)
    out_chunks: list[Any] = []  # pyarrow arrays, in row order
    run_start = 0  # start of the current run of documents copied unchanged

    def flush(stop: int) -> None:
        if stop > run_start:
            out_chunks.extend(column.slice(run_start, stop - run_start).chunks)

    bar = progress_bar(progress, num_docs, "split", "doc")
    try:
        for start in range(0, num_docs, batch_size):
            texts: list[str] = column.slice(start, batch_size).to_pylist()
            counts = np.asarray([tok.count(texts) for tok in toks], dtype=np.int64).reshape(
                len(toks), len(texts)
            )
            worst = counts.max(axis=0)
            for k, tok in enumerate(toks):
                fit = counts[k][worst <= limit]
                if len(fit):
                    stats.max_tokens[tok.name] = max(stats.max_tokens[tok.name], int(fit.max()))
            empty = np.array([len(t) == 0 for t in texts]) if drop_empty else None
            special = np.flatnonzero(worst > limit)
            if empty is not None and empty.any():
                special = np.union1d(special, np.flatnonzero(empty))
            if len(special):
                long_idx = [int(i) for i in special if worst[i] > limit]
                pieces = splitter.split_long([texts[i] for i in long_idx], counts[:, long_idx].T)
                by_doc = dict(zip(long_idx, pieces, strict=True))
                for i in special.tolist():
                    doc = start + i
                    flush(doc)
                    run_start = doc + 1
                    if i in by_doc:
                        chunks = by_doc[i]
                        rows_per_doc[doc] = len(chunks)
                        stats.num_split_docs += 1
                        out_chunks.append(pa.array(chunks, type=column.type))
                    else:
                        rows_per_doc[doc] = 0
                        stats.num_empty_dropped += 1
            bar.update(len(texts))
        flush(num_docs)
    finally:
        bar.close()
    return pa.chunked_array(out_chunks, type=column.type), rows_per_doc


def _split_dataset(
    ds: Any,
    table: Any,
    text_column: str,
    new_text: Any,
    rows_per_doc: np.ndarray,
    keep_columns: bool,
) -> Any:
    """The output dataset: the rows, the input's other columns repeated per row of their
    document (with ``keep_columns``), ``doc_index`` and ``chunk_index``."""
    import datasets
    import pyarrow as pa

    num_rows = int(rows_per_doc.sum())
    doc_index = np.repeat(np.arange(table.num_rows, dtype=np.int64), rows_per_doc)
    first_row = np.cumsum(rows_per_doc) - rows_per_doc
    chunk_index = (np.arange(num_rows, dtype=np.int64) - np.repeat(first_row, rows_per_doc)).astype(
        np.int32
    )
    identity = bool((rows_per_doc == 1).all())
    arrays, names = [], []
    for name in table.column_names:
        if name == text_column:
            arrays.append(new_text)
        elif keep_columns:
            col = table.column(name)
            arrays.append(col if identity else col.take(pa.array(doc_index)))
        else:
            continue
        names.append(name)
    arrays += [pa.array(doc_index), pa.array(chunk_index)]
    names += ["doc_index", "chunk_index"]
    out_table = pa.Table.from_arrays(arrays, names=names)
    features = datasets.Features(
        {
            **{n: ds.features[n] for n in names if n in ds.features},
            "doc_index": datasets.Value("int64"),
            "chunk_index": datasets.Value("int32"),
        }
    )
    return datasets.Dataset(
        datasets.table.InMemoryTable(out_table.cast(features.arrow_schema)),
        info=datasets.DatasetInfo(features=features),
    )


def _table_of(ds: Any) -> Any:
    from ..io import _as_arrow_table

    return _as_arrow_table(ds)


def run_split(
    data: Any,
    output_dir: str | Path,
    tokenizers: Any,
    *,
    overwrite: bool = False,
    on_stale: str | None = None,
    num_shards: int | None = None,
    text_column: str = "text",
    **kwargs: Any,
) -> SplitStats:
    """Splits ``data`` (see :func:`split_texts`) and saves the result with ``save_to_disk`` into
    ``output_dir`` atomically, with a manifest recording the parameters, the input's content
    fingerprint and the tokenizers. Returns the statistics.

    A rerun with the same documents, tokenizers and settings skips (and says so); an output made
    from other inputs raises :class:`~fusellm.StaleArtifactError` unless ``overwrite`` (or
    ``on_stale="replace"``, :mod:`fusellm.artifact`). Input whose documents are all empty is an
    :class:`~fusellm.InputError`, and nothing is written."""
    from ..artifact import Artifact, stale_policy
    from ..io import fingerprint_dataset, load_text_dataset, tokenizer_object_fingerprint

    policy = stale_policy(overwrite, on_stale)
    out_path = Path(output_dir)
    ds = load_text_dataset(data, text_column=text_column)
    toks = load_tokenizers(tokenizers)
    defaults = inspect.signature(split_texts).parameters
    params: dict[str, Any] = {"text_column": text_column}
    params.update({k: kwargs.get(k, defaults[k].default) for k in _OUTPUT_PARAMS})
    tok_records = [
        {"name": _tok_name(t, i), "sha256": tokenizer_object_fingerprint(t)}
        for i, t in enumerate(toks)
    ]
    input_sha = fingerprint_dataset(ds)
    key = {
        "format": SPLIT_FORMAT,
        "params": params,
        "input_sha256": input_sha,
        "tokenizers": [t["sha256"] for t in tok_records],
        "num_shards": num_shards,
    }
    art = Artifact(out_path, "split", key, describe="same documents, tokenizers and settings")
    decision = art.decide(policy)
    if decision.done:
        art.skipped()
        return SplitStats(**{**(decision.manifest or {}).get("stats", {}), "skipped": True})
    fields: dict[str, Any] = {
        "format": SPLIT_FORMAT,
        "params": params,
        "input": {
            "source": str(data) if isinstance(data, (str, Path)) else type(data).__name__,
            "num_rows": len(ds),
            "sha256": input_sha,
        },
        "tokenizers": tok_records,
    }
    with art.build(decision, fields) as tmp:
        out, stats = split_texts(ds, toks, text_column=text_column, return_stats=True, **kwargs)
        if len(out) == 0:
            raise InputError(
                f"{data if isinstance(data, (str, Path)) else 'the input'} gives no rows: its "
                f"{len(ds)} document(s) in column {text_column!r} are all empty"
            )
        fields.update(num_rows=len(out), stats=stats.to_dict())
        out.save_to_disk(str(tmp), num_shards=num_shards)
    return stats


def add_split_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds the ``split`` command to an ``argparse`` sub-parser collection."""
    p = subparsers.add_parser(
        "split",
        help="split documents into rows that fit a block under every tokenizer",
        description=(
            "Split the documents of INPUT (a save_to_disk directory, JSONL/JSON/Parquet/Arrow "
            "file, or a directory of text files) into rows of at most BLOCK_SIZE - MARGIN tokens "
            "under every tokenizer, and save them to OUTPUT (save_to_disk, with a manifest)."
        ),
    )
    p.add_argument("input", help="documents to split")
    p.add_argument(
        "output",
        help="output directory (a rerun with the same inputs skips; an output of other inputs "
        "is refused unless --overwrite)",
    )
    p.add_argument(
        "-t",
        "--tokenizer",
        action="append",
        required=True,
        help="a tokenizer directory (or bundled:NAME); repeat for the target and every source",
    )
    p.add_argument("--text-column", default="text", help="column holding the text (default: text)")
    p.add_argument("--block-size", type=int, default=2048, help="block size (default: 2048)")
    p.add_argument("--margin", type=int, default=48, help="tokens kept free (default: 48)")
    p.add_argument(
        "--boundary",
        choices=BOUNDARIES,
        default="word",
        help="where a long document is cut (default: word)",
    )
    p.add_argument("--batch-size", type=int, default=1000, help="documents per batch")
    p.add_argument("--num-shards", type=int, default=None, help="output shards")
    p.add_argument("--keep-empty", action="store_true", help="keep empty documents as rows")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an OUTPUT made from other inputs"
    )
    p.set_defaults(func=_split_cli)
    return p


def _split_cli(args: argparse.Namespace) -> int:
    stats = run_split(
        args.input,
        args.output,
        args.tokenizer,
        overwrite=args.overwrite,
        num_shards=args.num_shards,
        text_column=args.text_column,
        block_size=args.block_size,
        margin=args.margin,
        boundary=args.boundary,
        batch_size=args.batch_size,
        drop_empty=not args.keep_empty,
        progress=False if args.no_progress else None,
    )
    if stats.skipped:
        print(f"{args.output}: up to date (same documents, tokenizers and settings); skipped")
        return 0
    print(
        f"split {stats.num_docs} documents into {stats.num_rows} rows "
        f"({stats.num_split_docs} cut, {stats.num_empty_dropped} empty dropped) "
        f"in {stats.seconds:.1f} s -> {args.output}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fusellm.stages.split``: ``fusellm split``, its errors included."""
    from ..cli import main as cli_main

    return cli_main(["split", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
