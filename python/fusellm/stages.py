"""Dataset-level stages 3a (vocabulary map), 3b (align) and 4 (pack), with their CLI hooks.

Each stage reads the previous stage's output from disk and writes its own, complete or not at
all (built under a temporary name, renamed into place), with a ``fusellm_manifest.json`` that
records a fingerprint of every input and every parameter that changes the result. A re-run with
the same inputs returns at once; a run against an output made from other inputs is refused
(:class:`~fusellm.errors.StaleArtifactError`) unless ``overwrite=True``. Every check that can be
made before the work (row counts, texts, tokenizers, vocabularies, names, columns) is made before
anything is written, and a check that fails during the work (a row whose ids do not re-tokenize)
leaves the output path untouched.

3a. :func:`run_vocab_map` (``fusellm vocab-map``)
    Maps every source ("blend") token onto the target ("base") vocabulary with
    :meth:`fusellm.VocabMap.build` and saves it as the reference pipeline's JSON object plus the
    ``<file>.meta.json`` sidecar (method, markers, statistics, vocabulary checksums). The default
    ``method="surface"`` compares decoded bytes first and edit distance only as a fallback (it
    fixes the reference's ``Ċ`` vs ``<0x0A>`` misses); ``"mined"`` is the reference map. The map
    is only used by ``vocab="soft"`` alignment.

3b. :func:`align_dataset` (``fusellm align``)
    Inputs: the target's extraction (stage 2) and one extraction per source, all of the same rows.
    Per row it writes the target's tokens and its own top-K (the ``ref`` candidate) and, per
    source, the source's top-K re-expressed on the target's positions and vocabulary
    (:meth:`fusellm.Aligner.align_batch`, Rust, rayon-parallel, without the GIL), batch by batch,
    as a sharded ``save_to_disk`` dataset. Columns: ``text``, ``row_index``, ``num_bytes``,
    ``input_ids``, ``ref_ids`` / ``ref_logits`` ``[L, K]``, ``ref_metric_ce``,
    ``ref_num_tokens``, and per source ``{name}_ids`` (``-1`` padded), ``{name}_logits``
    (``-inf`` padded), ``{name}_metric_ce``, ``{name}_num_tokens`` (the source's own token count),
    named as the packed training schema names its candidates. ``align_stats.json`` counts, per
    source, the positions by status (matched, empty, fallback, masked; they sum to
    ``base_positions``), the dropped top-K entries and the kept ones.

    ``method="offsets"`` (default) re-tokenizes every text with character offsets, checks that the
    ids are the stored ones (so the offsets describe exactly the tokens the models saw), and pairs
    a target position with a source position only where both tokens END at the same character:
    both then predict the same continuation. Exact and linear; positions whose ends differ get no
    source distribution (a next-token one-hot by default). The appended EOS strings of the two
    tokenizers differ (``</s>`` vs ``<|endoftext|>``), so each side's EOS is given the span of one
    virtual character after the text: the EOS positions pair with each other. ``method="mined"``
    is the reference MinED dynamic time warping over token strings (no re-tokenization), which
    always pairs but misaligns runs of short tokens.

4. :func:`pack_dataset` (``fusellm pack``)
    Concatenates the aligned rows and cuts them into blocks (``mode="concat"``, the reference:
    documents cross block boundaries, the last shorter block is kept) or packs whole documents
    best-fit-decreasing (``mode="bfd"``, with ``position_ids`` restarting at every document), with
    the Rust :func:`fusellm.pack`. Every per-token column is cut identically. Per block and
    candidate ``c``: ``{c}_metric_ce`` is the token-weighted mean of the rows' ``metric_ce``
    (weights: the row's target tokens in the block; spec section 2), and
    ``{c}_metric_ce_per_byte`` is the block's CE per byte of text, ``Σ f_r·CE_r / Σ f_r·B_r`` with
    ``CE_r = metric_ce·(num_tokens - 1)`` the row's total CE under ``c``, ``B_r`` its bytes and
    ``f_r`` the share of its target tokens in the block (exact for whole rows; a proportional share
    for rows cut between blocks). ``num_bytes`` is ``Σ f_r·B_r``. A row with no scored token
    (``metric_ce`` NaN for any candidate) is left out of every candidate's scores alike
    (``nan_rows="exclude"``; ``"propagate"`` keeps the reference's NaN blocks). Memory: the input
    is read shard by shard as flat numpy views of the Arrow buffers and packed in chunks of about
    ``chunk_tokens`` tokens (in concat mode the unfinished last block is carried into the next
    chunk, so the blocks are those of one pass over everything); one output shard per chunk.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .checks import check_num_threads
from .config import (
    AlignSettings,
    PackSettings,
    PipelineConfig,
    VocabMapSettings,
    add_settings_arguments,
    settings_from_args,
)
from .errors import FuseLLMError, InputError, InputTypeError, StaleArtifactError
from .loading import load_tokenizer
from .progress import progress_bar
from .schema import DOMAIN_COLUMN, REF, SPANS_COLUMN, align_features, pack_features
from .tokenization import char_spans

__all__ = [
    "ALIGN_STATS_NAME",
    "AlignReport",
    "PackReport",
    "add_align_parser",
    "add_pack_parser",
    "add_vocab_map_parser",
    "align_dataset",
    "pack_dataset",
    "run_vocab_map",
]

logger = logging.getLogger(__name__)

ALIGN_FORMAT = "fusellm.align/1"
PACK_FORMAT = "fusellm.pack/1"
#: Statistics file of an aligned dataset.
ALIGN_STATS_NAME = "align_stats.json"
_SOURCE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_ALIGN_FIXED = ("text", "row_index", "num_bytes", "input_ids")
_CANDIDATE_SUFFIXES = ("ids", "logits", "metric_ce", "num_tokens")
_EXTRACT_COLUMNS = (
    "input_ids",
    "per_step_logits",
    "per_step_indices",
    "metric_ce",
    "num_tokens",
    "num_bytes",
)
_DATA_PATTERNS = ("data-*.arrow", "state.json", "dataset_info.json")
_COMPRESSIONS = ("zstd", "lz4", None)
_LOGITS_DTYPES = ("float16", "float32")
_BLOCK_SIZE = next(f.default for f in dataclasses.fields(PipelineConfig) if f.name == "block_size")


# --- small helpers -------------------------------------------------------------------------------


def _fusellm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fusellm")
    except PackageNotFoundError:  # pragma: no cover
        return "unknown"


def _choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise InputError(f"{name} must be one of {list(choices)}, got {value!r}")


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _previous_fingerprints(out: Path) -> dict[str, Any]:
    from .io import read_manifest

    try:
        m = read_manifest(out) if out.is_dir() else None
    except FuseLLMError:
        return {}
    return dict((m or {}).get("fingerprints", {}))


def _files_fingerprint(path: Path, previous: Any) -> dict[str, Any]:
    from .io import fingerprint_files

    return fingerprint_files(path, patterns=_DATA_PATTERNS, previous=previous)


# --- tokenizers ----------------------------------------------------------------------------------


@dataclass
class _Side:
    """One model's extraction and tokenizer, as the aligner sees them."""

    name: str  # "ref" for the target
    path: Path
    manifest: dict[str, Any]
    tokenizer: Any
    vocab: list[str | None]
    marker: str
    top_k: int
    text_column: str
    eos: str
    add_special_tokens: bool
    num_rows: int
    fingerprint: dict[str, Any] = field(default_factory=dict)
    backend: Any = None


def _open_extract(path: Any, what: str) -> tuple[Path, dict[str, Any]]:
    from .io import read_manifest

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
    from .tokenization import tokenizer_marker, tokenizer_vocab

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
    tok = load_tokenizer(tok_spec, f"{what} tokenizer")
    num_ids = info.get("num_ids")
    if num_ids is not None and len(tok) != num_ids:
        raise InputError(
            f"{what}: the tokenizer has {len(tok)} ids but the extraction in {path} was made with "
            f"one of {num_ids} ids: it is not the extraction's tokenizer"
        )
    append_eos = bool(key.get("append_eos", True))
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


# --- reading save_to_disk datasets batch by batch ------------------------------------------------


class _DiskDataset:
    """A ``save_to_disk`` directory read record batch by record batch (memory-mapped Arrow
    streams; compressed shards are decompressed one batch at a time)."""

    def __init__(self, path: Path, what: str) -> None:
        import pyarrow as pa

        self.path = path
        try:
            state = json.loads((path / "state.json").read_text(encoding="utf-8"))
            names = [f["filename"] for f in state["_data_files"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError(f"{what}: {path} is not a save_to_disk dataset ({e})") from e
        if state.get("_indices_data_files"):
            raise InputError(f"{what}: {path} holds an indices mapping; save it flattened")
        self.files = [path / n for n in names]
        missing = [str(f) for f in self.files if not f.is_file()]
        if missing:
            raise InputError(f"{what}: data file(s) missing: {missing[:3]}")
        if not self.files:
            raise InputError(f"{what}: {path} has no data files")
        try:
            self.schema = pa.ipc.open_stream(pa.memory_map(str(self.files[0]))).schema
        except (OSError, pa.ArrowInvalid) as e:
            raise InputError(f"{what}: cannot read {self.files[0]}: {e}") from e
        self.what = what

    @property
    def column_names(self) -> list[str]:
        return list(self.schema.names)

    def batches(self) -> Iterator[Any]:
        import pyarrow as pa

        for f in self.files:
            try:
                reader = pa.ipc.open_stream(pa.memory_map(str(f)))
                if reader.schema != self.schema:
                    raise InputError(f"{self.what}: {f.name} has another schema than the first")
                yield from reader
            except pa.ArrowInvalid as e:
                raise InputError(f"{self.what}: cannot read {f}: {e}") from e


def _row_tables(batches: Iterator[Any], rows: int) -> Iterator[Any]:
    """Re-slices record batches into tables of exactly ``rows`` rows (the last may be shorter)."""
    import pyarrow as pa

    buf: list[Any] = []
    have = 0
    for b in batches:
        if b.num_rows == 0:
            continue
        buf.append(b)
        have += b.num_rows
        while have >= rows:
            t = pa.Table.from_batches(buf)
            yield t.slice(0, rows)
            rest = t.slice(rows)
            buf = rest.to_batches() if rest.num_rows else []
            have -= rows
    if have:
        yield pa.Table.from_batches(buf)


def _array(col: Any) -> Any:
    import pyarrow as pa

    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if isinstance(arr, pa.ExtensionArray):
        arr = arr.storage
    return arr


def _list_column(col: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Row offsets (``int64 [n + 1]``) and the flat values of a ``list<T>`` or
    ``list<fixed_size_list<T, K>>`` column (values ``[N]`` or ``[N, K]``), as numpy views."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = _array(col)
    if not isinstance(arr, (pa.ListArray, pa.LargeListArray)):
        raise InputTypeError(f"column {name!r} must hold lists, got {arr.type}")
    if arr.null_count:
        raise InputError(f"column {name!r} has {arr.null_count} null row(s)")
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False).astype(np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    inner = arr.flatten()
    if isinstance(inner, pa.ExtensionArray):
        inner = inner.storage
    if isinstance(inner, pa.FixedSizeListArray):
        k = inner.type.list_size
        if inner.null_count:
            raise InputError(f"column {name!r} has null positions")
        values = inner.flatten()
        if values.null_count:
            raise InputError(f"column {name!r} has null values")
        flat = values.to_numpy(zero_copy_only=False).reshape(-1, k)
    elif isinstance(inner, (pa.ListArray, pa.LargeListArray)):
        inner_len = pc.list_value_length(inner).to_numpy(zero_copy_only=False)
        if inner.null_count or (inner_len.size and inner_len.min() != inner_len.max()):
            raise InputError(f"column {name!r}: rows of different widths K")
        k = int(inner_len[0]) if inner_len.size else 0
        flat = inner.flatten().to_numpy(zero_copy_only=False).reshape(-1, k)
    else:
        if inner.null_count:
            raise InputError(f"column {name!r} has null values")
        flat = inner.to_numpy(zero_copy_only=False)
    if flat.shape[0] != offsets[-1]:  # pragma: no cover - arrow invariant
        raise InputError(f"column {name!r}: inconsistent list offsets")
    return offsets, flat


def _scalar_column(table: Any, name: str, dtype: Any) -> np.ndarray:
    arr = _array(table.column(name))
    if arr.null_count:
        raise InputError(f"column {name!r} has {arr.null_count} null value(s)")
    return np.asarray(arr.to_numpy(zero_copy_only=False), dtype=dtype)


def _width(field_type: Any) -> int | None:
    """K of a ``list<fixed_size_list<T, K>>`` type (``None`` for other types)."""
    import pyarrow as pa

    t = field_type.storage_type if isinstance(field_type, pa.ExtensionType) else field_type
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        v = t.value_type
        if isinstance(v, pa.ExtensionType):
            v = v.storage_type
        if pa.types.is_fixed_size_list(v):
            return int(v.list_size)
    return None


def _nested(offsets: np.ndarray, values: np.ndarray) -> Any:
    """A ``list<fixed_size_list<K>>`` (values ``[N, K]``) or ``list<T>`` (values ``[N]``) array."""
    import pyarrow as pa

    flat = pa.array(np.ascontiguousarray(values).reshape(-1))
    inner = pa.FixedSizeListArray.from_arrays(flat, values.shape[1]) if values.ndim == 2 else flat
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), inner)


# --- 3a: vocabulary map --------------------------------------------------------------------------


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
    from .tokenization import tokenizer_marker, tokenizer_vocab
    from .vocab import VocabMap

    _choice("method", method, ("exact", "mined", "surface"))
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


def _map_sha256(vm: Any) -> str:
    """SHA-256 of a map's JSON content, as :meth:`VocabMap.save` writes (and records) it."""
    data = json.dumps(vm.to_dict(), ensure_ascii=False, indent=0).encode("utf-8")
    return hashlib.sha256(data).hexdigest()


# --- 3b: align -----------------------------------------------------------------------------------


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
    fixed = set(_ALIGN_FIXED) | {f"{REF}_{s}" for s in _CANDIDATE_SUFFIXES}
    seen: dict[str, str] = {}
    for name in sources:
        if not isinstance(name, str) or not _SOURCE_NAME.match(name):
            raise InputError(
                f"source name {name!r} is not valid: use lower-case letters, digits and '_', "
                "starting with a letter (it prefixes the column names)"
            )
        if name == REF:
            raise InputError(f"source name {REF!r} is reserved for the target's own candidate")
        for s in _CANDIDATE_SUFFIXES:
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
    num_threads: int,
) -> dict[str, Any]:
    """name -> VocabMap (or None), each checked against both vocabularies. With
    ``vocab="soft"``, a source without a map gets the default one (:class:`VocabMapSettings`),
    built in memory."""
    maps = _given_maps(vocab_maps, names, base, sides)
    if vocab == "soft":
        from .vocab import VocabMap

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
    from .vocab import VocabMap, vocab_checksum

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
    base_sum = vocab_checksum(base.vocab)
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
            if vm.checksums != (base_sum, vocab_checksum(side.vocab)):
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


def _check_columns(ds: _DiskDataset, side: _Side, what: str) -> None:
    need = [side.text_column, *_EXTRACT_COLUMNS]
    missing = [c for c in need if c not in ds.column_names]
    if missing:
        raise InputError(
            f"{what}: {side.path} lacks column(s) {missing} (columns: {ds.column_names})"
        )
    for col in ("per_step_logits", "per_step_indices"):
        k = _width(ds.schema.field(col).type)
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

    eq = pc.equal(_array(a), _array(b))
    bad = pc.invert(pc.fill_null(eq, False))
    if pc.any(bad).as_py():
        return int(pc.index(bad, True).as_py())
    return None


def _scan_texts(
    base: _Side, base_ds: _DiskDataset, name: str, side: _Side, ds: _DiskDataset
) -> None:
    """Compares the two text columns row by row (reads only what it needs, batch by batch)."""
    start = 0
    a_iter = _row_tables(base_ds.batches(), 4096)
    b_iter = _row_tables(ds.batches(), 4096)
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
    texts: list[str],
    ids: np.ndarray,
    offsets: np.ndarray,
    first_row: int,
    what: str,
) -> list[np.ndarray]:
    """Character spans of every stored token: the extraction's ``token_spans`` column, or (an
    extraction made before fusellm stored it) from tokenizing the texts again."""
    if SPANS_COLUMN not in table.column_names:
        return _encode_with_offsets(side, texts, ids, offsets, first_row, what)
    sp_off, spans = _list_column(table.column(SPANS_COLUMN), f"{what} {SPANS_COLUMN}")
    if not np.array_equal(sp_off, offsets) or spans.ndim != 2 or spans.shape[1] != 2:
        raise InputError(
            f"the {what} extraction's {SPANS_COLUMN} do not match its input_ids near row "
            f"{first_row}"
        )
    # Checked in one pass over the batch: within a row the ends never decrease and no span
    # starts after its end; the last token ends at the text's end (one character after it with
    # the EOS, the virtual character).
    spans = spans.astype(np.int64)
    ends = spans[:, 1]
    lengths = np.diff(offsets)
    row = np.repeat(np.arange(len(lengths)), lengths)
    bad = spans[:, 0] > ends
    bad[1:] |= (ends[1:] < ends[:-1]) & (row[1:] == row[:-1])
    end = np.fromiter((len(t) for t in texts), np.int64, len(texts)) + (1 if side.eos else 0)
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
    return [spans[offsets[r] : offsets[r + 1]] for r in range(len(offsets) - 1)]


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


def _exact_spans(
    base_spans: np.ndarray, src_spans: np.ndarray, status: np.ndarray, matched: int
) -> int:
    m = np.flatnonzero(status == matched)
    if not m.size:
        return 0
    ends = src_spans[:, 1]
    j = np.searchsorted(ends, base_spans[m, 1], side="right") - 1
    ok = (j >= 0) & (ends[np.maximum(j, 0)] == base_spans[m, 1])
    return int(np.count_nonzero(ok & (src_spans[np.maximum(j, 0), 0] == base_spans[m, 0])))


def align_dataset(
    base: str | os.PathLike[str],
    sources: Mapping[str, str | os.PathLike[str]],
    output_dir: str | os.PathLike[str],
    *,
    base_tokenizer: Any = None,
    source_tokenizers: Mapping[str, Any] | None = None,
    vocab_maps: Mapping[str, Any] | None = None,
    method: str = "offsets",
    vocab: str = "soft",
    compat: str | None = None,
    fallback: str = "next",
    num_threads: int | None = None,
    rows_per_batch: int = 256,
    logits_dtype: str = "float16",
    compression: str | None = "zstd",
    overwrite: bool = False,
    progress: bool | None = None,
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
        method: ``"offsets"`` (shared end offsets, default) or ``"mined"`` (reference DTW).
        vocab: ``"soft"`` (through the map, default, as in both presets) or ``"hard"`` (exact
            strings only).
        compat: ``"fusellm"`` for the reference pipeline's rows (spec section 6).
        fallback: ``"next"`` (one-hot on the next target token) or ``"mask"``.
        num_threads: aligner threads (default: ``FUSELLM_NUM_THREADS`` or all cores).
        rows_per_batch: rows aligned per batch, and per output shard.
        logits_dtype: ``"float16"`` (default, as extraction stores them) or ``"float32"``.
        compression: output shard compression (``"zstd"``, ``"lz4"`` or ``None``).
        overwrite: replace an output made from other inputs instead of refusing.
        progress: progress bar (default: only on a terminal).

    Raises:
        InputError: row counts or texts differ (naming the first row), a tokenizer does not match
            its extraction, offsets re-tokenization gives other ids (naming the row), a column is
            missing, a source name is invalid.
        StaleArtifactError: a vocabulary map was built for other vocabularies, or ``output_dir``
            holds an output made from other inputs.
    """
    import pyarrow as pa

    from .align import MATCHED, Aligner
    from .io import (
        atomic_dir,
        atomic_write_json,
        shard_file_name,
        write_arrow_shard,
        write_dataset_metadata,
        write_manifest,
    )

    t0 = time.perf_counter()
    _choice("method", method, ("offsets", "mined"))
    _choice("vocab", vocab, ("hard", "soft"))
    _choice("compat", compat, (None, "fusellm"))
    _choice("fallback", fallback, ("next", "mask"))
    _choice("logits_dtype", logits_dtype, _LOGITS_DTYPES)
    _choice("compression", compression, _COMPRESSIONS)
    rows_per_batch = _positive_int("rows_per_batch", rows_per_batch)
    threads = check_num_threads(num_threads)
    src_dirs = _check_sources(sources)
    names = list(src_dirs)
    tok_specs = dict(source_tokenizers or {})
    unknown = [n for n in tok_specs if n not in src_dirs]
    if unknown:
        raise InputError(f"source_tokenizers names unknown source(s) {unknown}; sources: {names}")
    out = Path(output_dir)

    # 1. Inputs: manifests, columns, tokenizers, row counts (read-only).
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
    base_ds = _DiskDataset(base_path, "base")
    _check_columns(base_ds, base_side, "base")
    datasets_ = {n: _DiskDataset(s.path, f"source {n!r}") for n, s in sides.items()}
    for n, s in sides.items():
        _check_columns(datasets_[n], s, f"source {n!r}")
        if s.num_rows != base_side.num_rows:
            raise InputError(
                f"source {n!r} has {s.num_rows} rows but the target has {base_side.num_rows}: "
                "the extractions must be made from the same rows"
            )
    if base_side.num_rows < 1:
        raise InputError("the target's extraction has no rows")
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
    maps = _resolve_maps(vocab_maps, names, base_side, sides, vocab=vocab, num_threads=threads)
    if method == "offsets":
        base_side.backend = _backend(base_side.tokenizer, "base")
        for n, s in sides.items():
            s.backend = _backend(s.tokenizer, f"source {n!r}")

    # 2. Texts: the same rows in the same order. Extractions of the same input content carry
    #    the same input fingerprint; others are compared row by row.
    base_key = base_manifest.get("key", {})
    for n, s in sides.items():
        src_key = s.manifest.get("key", {})
        same_input = (
            src_key.get("input_sha256") is not None
            and src_key.get("input_sha256") == base_key.get("input_sha256")
            and src_key.get("text_column") == base_key.get("text_column")
        )
        if not same_input:
            _scan_texts(base_side, base_ds, n, s, datasets_[n])

    # 3. The output's key, and the skip / stale decision.
    from .vocab import vocab_checksum

    prev_fp = _previous_fingerprints(out)
    fps = {REF: _files_fingerprint(base_path, prev_fp.get(REF))}
    for n, s in sides.items():
        fps[n] = _files_fingerprint(s.path, prev_fp.get(n))
    key: dict[str, Any] = {
        "format": ALIGN_FORMAT,
        "base": {
            "data_sha256": fps[REF]["sha256"],
            "vocab_sha256": vocab_checksum(base_side.vocab),
            "marker": base_side.marker,
        },
        "sources": [
            {
                "name": n,
                "data_sha256": fps[n]["sha256"],
                "vocab_sha256": vocab_checksum(s.vocab),
                "marker": s.marker,
                "vocab_map_sha256": None if maps[n] is None else _map_sha256(maps[n]),
            }
            for n, s in sides.items()
        ],
        "method": method,
        "vocab": vocab,
        "compat": compat,
        "fallback": fallback,
        "logits_dtype": logits_dtype,
        "values": values,
    }
    from .io import output_state

    state = output_state(out, "align", key, overwrite)
    if state == "done":
        try:
            stats = json.loads((out / ALIGN_STATS_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise StaleArtifactError(f"{out}: unreadable {ALIGN_STATS_NAME} ({e})") from e
        logger.info("%s is up to date: skipped", out)
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

    aligners = {
        n: Aligner(
            base_side.vocab,
            s.vocab,
            base_marker=base_side.marker,
            blend_marker=s.marker,
            vocab_map=maps[n],
            compat=compat,  # type: ignore[arg-type]
            fallback=fallback,  # type: ignore[arg-type]
        )
        for n, s in sides.items()
    }

    # 4. The work, under a temporary directory renamed into place at the end.

    has_domain = DOMAIN_COLUMN in base_ds.column_names
    features = align_features(
        base_side.top_k,
        {n: s.top_k for n, s in sides.items()},
        logits_dtype,
        has_domain=has_domain,
    )
    schema = features.arrow_schema
    np_logits = np.dtype(logits_dtype)

    num_rows = base_side.num_rows
    num_shards = math.ceil(num_rows / rows_per_batch)
    counts: dict[str, dict[str, Any]] = {
        n: {
            "matched": 0,
            "empty": 0,
            "fallback": 0,
            "masked": 0,
            "exact_span": 0 if method == "offsets" else None,
            "unknown_ids": 0,
            "unmapped_ids": 0,
            "duplicate_ids": 0,
            "topk_entries": 0,
        }
        for n in names
    }
    from .diagnostics import TeacherStats, next_tokens

    teachers = TeacherStats(len(base_side.vocab), logprobs=values == "logprobs")
    domain_codes: dict[str, int] = {}
    kept_ids = {
        n: np.append(a.targets(vocab) >= 0, False) for n, a in aligners.items()
    }  # per blend id (the last slot: ids without a string)
    positions = 0
    files: list[str] = []
    bar = progress_bar(progress, num_rows, "align", "row")
    try:
        with atomic_dir(out, overwrite=state == "replace") as tmp:
            iters = [_row_tables(base_ds.batches(), rows_per_batch)] + [
                _row_tables(datasets_[n].batches(), rows_per_batch) for n in names
            ]
            start = 0
            for shard, tables in enumerate(_lockstep(iters, ["base", *names])):
                tb, *ts = tables
                n_rows = tb.num_rows
                if start + n_rows > num_rows:
                    raise InputError(
                        f"base: the data holds more rows than its manifest's {num_rows}"
                    )
                texts_col = tb.column(base_side.text_column)
                base_off, base_ids = _list_column(tb.column("input_ids"), "base input_ids")
                base_num_tokens = _scalar_column(tb, "num_tokens", np.int64)
                if not np.array_equal(np.diff(base_off), base_num_tokens):
                    raise InputError(f"base: num_tokens disagrees with input_ids near row {start}")
                ref_off, ref_ids = _list_column(
                    tb.column("per_step_indices"), "base per_step_indices"
                )
                if not np.array_equal(ref_off, base_off):
                    raise InputError(
                        f"base: per_step_indices rows do not match input_ids near row {start}"
                    )
                texts = _array(texts_col).to_pylist()
                base_spans = (
                    _spans_of(base_side, tb, texts, base_ids, base_off, start, "target's")
                    if method == "offsets"
                    else None
                )
                base_rows = [base_ids[base_off[r] : base_off[r + 1]] for r in range(n_rows)]
                nxt = next_tokens(base_ids, base_off)
                if has_domain:
                    row_dom = _array(tb.column(DOMAIN_COLUMN)).cast(pa.string()).to_pylist()
                    codes = [domain_codes.setdefault(str(d), len(domain_codes)) for d in row_dom]
                    pos_dom = np.repeat(np.asarray(codes, np.int64), np.diff(base_off))
                else:
                    pos_dom = np.full(int(base_off[-1]), -1, np.int64)
                dom_names = list(domain_codes)
                _, ref_vals = _list_column(tb.column("per_step_logits"), "base per_step_logits")
                teachers.add_ref(ref_ids, ref_vals, nxt, pos_dom, dom_names)
                cols: dict[str, Any] = {
                    "text": _array(texts_col).cast(pa.string()),
                    "row_index": pa.array(np.arange(start, start + n_rows, dtype=np.int64)),
                    "num_bytes": _array(tb.column("num_bytes")).cast(pa.int32()),
                    "input_ids": _array(tb.column("input_ids")).cast(
                        schema.field("input_ids").type
                    ),
                    "ref_ids": _array(tb.column("per_step_indices")).cast(
                        schema.field("ref_ids").type
                    ),
                    "ref_logits": _array(tb.column("per_step_logits")).cast(
                        schema.field("ref_logits").type
                    ),
                    "ref_metric_ce": _array(tb.column("metric_ce")).cast(pa.float32()),
                    "ref_num_tokens": _array(tb.column("num_tokens")).cast(pa.int32()),
                }
                if has_domain:
                    cols[DOMAIN_COLUMN] = _array(tb.column(DOMAIN_COLUMN)).cast(pa.string())
                base_bytes = _scalar_column(tb, "num_bytes", np.int64)
                positions += int(base_off[-1])
                for n, t in zip(names, ts, strict=True):
                    s = sides[n]
                    what = f"source {n!r}"
                    if t.num_rows != n_rows:  # pragma: no cover - _lockstep checks
                        raise InputError(f"{what}: batch sizes differ near row {start}")
                    bad = _first_text_mismatch(texts_col, t.column(s.text_column))
                    if bad is not None:
                        raise InputError(
                            f"row {start + bad}: the text of source {n!r} differs from the "
                            "target's (the extractions were not made from the same rows)"
                        )
                    if not np.array_equal(_scalar_column(t, "num_bytes", np.int64), base_bytes):
                        raise InputError(
                            f"{what}: num_bytes differs from the target's near row {start}"
                        )
                    s_off, s_ids = _list_column(t.column("input_ids"), f"{what} input_ids")
                    k_off, k_ids = _list_column(t.column("per_step_indices"), f"{what} indices")
                    l_off, k_logits = _list_column(t.column("per_step_logits"), f"{what} logits")
                    if not (np.array_equal(s_off, k_off) and np.array_equal(s_off, l_off)):
                        raise InputError(
                            f"{what}: per_step rows do not match input_ids near row {start}"
                        )
                    src_spans = (
                        _spans_of(s, t, texts, s_ids, s_off, start, f"{n!r}")
                        if method == "offsets"
                        else None
                    )
                    sl = [slice(s_off[r], s_off[r + 1]) for r in range(n_rows)]
                    rows = aligners[n].align_batch(
                        base_rows,
                        [s_ids[x] for x in sl],
                        [k_ids[x] for x in sl],
                        [k_logits[x] for x in sl],
                        method=method,  # type: ignore[arg-type]
                        vocab=vocab,  # type: ignore[arg-type]
                        base_offsets=base_spans,
                        blend_offsets=src_spans,
                        num_threads=threads,
                    )
                    c = counts[n]
                    for r, row in enumerate(rows):
                        rc = row.counts()
                        for key_ in ("matched", "empty", "fallback", "masked"):
                            c[key_] += rc[key_]
                        c["unknown_ids"] += row.num_unknown
                        c["unmapped_ids"] += row.num_unmapped
                        c["duplicate_ids"] += row.num_duplicates
                        c["topk_entries"] += int(
                            np.count_nonzero(row.ids[row.status == MATCHED] >= 0)
                        )
                        if base_spans is not None and src_spans is not None:
                            c["exact_span"] += _exact_spans(
                                base_spans[r], src_spans[r], row.status, MATCHED
                            )
                    flat_ids = (
                        np.concatenate([row.ids for row in rows])
                        if rows
                        else np.zeros((0, s.top_k), np.int32)
                    )
                    flat_logits = (
                        np.concatenate([row.logits for row in rows])
                        if rows
                        else np.zeros((0, s.top_k), np.float32)
                    )
                    flat_status = (
                        np.concatenate([row.status for row in rows])
                        if rows
                        else np.zeros(0, np.uint8)
                    )
                    del rows
                    if np_logits != flat_logits.dtype:
                        with np.errstate(over="ignore"):
                            cast = flat_logits.astype(np_logits)
                        over = np.isinf(cast) & np.isfinite(flat_logits)
                        if over.any():
                            raise InputError(
                                f"{what}: a merged logit ({float(flat_logits[over][0])}) "
                                f"overflows {logits_dtype}; use logits_dtype='float32'"
                            )
                        flat_logits = cast
                    # scored as stored (a merged value rounded to logits_dtype)
                    teachers.add_source(
                        n,
                        flat_ids,
                        flat_logits,
                        flat_status == MATCHED,
                        ref_ids,
                        ref_vals,
                        nxt,
                        pos_dom,
                        dom_names,
                    )
                    known = kept_ids[n]
                    teachers.add_source_mass(n, k_logits, known[np.minimum(k_ids, known.size - 1)])
                    cols[f"{n}_ids"] = _nested(base_off, flat_ids)
                    cols[f"{n}_logits"] = _nested(base_off, flat_logits)
                    cols[f"{n}_metric_ce"] = _array(t.column("metric_ce")).cast(pa.float32())
                    cols[f"{n}_num_tokens"] = _array(t.column("num_tokens")).cast(pa.int32())
                    cols[f"{n}_status"] = _nested(base_off, flat_status)
                table = pa.Table.from_arrays(
                    [cols[f.name].cast(f.type) for f in schema], schema=schema
                )
                name = shard_file_name(shard, num_shards)
                write_arrow_shard(table, tmp / name, compression=compression)
                files.append(name)
                start += n_rows
                bar.update(n_rows)
            if start != num_rows:
                raise InputError(
                    f"the extractions hold {start} rows but their manifests say {num_rows}"
                )
            write_dataset_metadata(
                tmp,
                features,
                files,
                fingerprint=hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest(),
            )
            report = AlignReport(
                out, method, vocab, num_rows, positions, counts, teachers=teachers.result()
            )
            atomic_write_json(tmp / ALIGN_STATS_NAME, report.stats(), sort_keys=False)
            write_manifest(
                tmp,
                {
                    "stage": "align",
                    "format": ALIGN_FORMAT,
                    "fusellm_version": _fusellm_version(),
                    "key": key,
                    "fingerprints": fps,
                    "inputs": {
                        "base": str(base_path.resolve()),
                        "sources": {n: str(s.path.resolve()) for n, s in sides.items()},
                    },
                    "parameters": {
                        "rows_per_batch": rows_per_batch,
                        "compression": compression,
                        "num_threads": threads,
                    },
                    "candidates": [REF, *names],
                    "num_rows": num_rows,
                    "num_shards": len(files),
                    "complete": True,
                },
            )
    finally:
        bar.close()
    report.seconds = time.perf_counter() - t0
    return report


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


# --- 4: pack -------------------------------------------------------------------------------------


@dataclass
class PackReport:
    """What :func:`pack_dataset` produced (or found already done)."""

    output_dir: Path
    mode: str
    block_size: int
    rows: int
    tokens: int
    blocks: int
    candidates: list[str]
    #: Rows left out of every candidate's scores (no scored token: ``metric_ce`` NaN).
    nan_rows: int = 0
    skipped: bool = False
    seconds: float = 0.0

    @property
    def fill(self) -> float:
        """Tokens per block slot: ``tokens / (blocks · block_size)``."""
        return self.tokens / (self.blocks * self.block_size) if self.blocks else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["output_dir"] = str(self.output_dir)
        d["fill"] = self.fill
        return d

    def load(self) -> Any:
        """The packed dataset (``datasets.load_from_disk``)."""
        import datasets

        return datasets.load_from_disk(str(self.output_dir))


def _pack_candidates(ds: _DiskDataset, manifest: Mapping[str, Any] | None) -> list[str]:
    cols = ds.column_names
    present = [c[: -len("_logits")] for c in cols if c.endswith("_logits")]
    order = list((manifest or {}).get("candidates") or [])
    if order and sorted(order) == sorted(present):
        cands = order
    else:
        cands = sorted(present, key=lambda c: c != REF)
    if REF not in cands:
        raise InputError(
            f"{ds.path}: no 'ref_logits' column: the aligned data must hold the target's own "
            f"top-K (columns: {cols})"
        )
    need = ["input_ids", "num_bytes"]
    for c in cands:
        need += [f"{c}_{s}" for s in _CANDIDATE_SUFFIXES]
    missing = [c for c in need if c not in cols]
    if missing:
        raise InputError(f"{ds.path} lacks column(s) {missing} (columns: {cols})")
    for c in cands:
        for s in ("ids", "logits"):
            if _width(ds.schema.field(f"{c}_{s}").type) is None:
                raise InputError(f"column {c}_{s!r} must be list<fixed_size_list<K>>")
    return cands


#: Rows per ``datasets.map`` batch in the reference's packing (``compat="fusellm"``).
REFERENCE_PACK_ROWS = 1000


def _row_groups(tables: Iterator[Any], group: int | None) -> Iterator[Any]:
    """The non-empty tables, cut so that none crosses a multiple of ``group`` rows."""
    done = 0
    for table in tables:
        while table.num_rows:
            take = table.num_rows if group is None else min(table.num_rows, group - done % group)
            yield table.slice(0, take)
            done += take
            table = table.slice(take)


class _Chunk:
    """Flat per-token columns plus row offsets and per-row score inputs."""

    def __init__(
        self,
        columns: dict[str, np.ndarray],
        offsets: np.ndarray,
        scores: dict[str, np.ndarray],
        nan: np.ndarray,
    ) -> None:
        self.columns = columns
        self.offsets = offsets
        self.scores = scores
        self.nan = nan

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @staticmethod
    def concat(parts: list[_Chunk]) -> _Chunk:
        if len(parts) == 1:
            return parts[0]
        offsets = [np.zeros(1, np.int64)]
        base = 0
        for p in parts:
            offsets.append(p.offsets[1:] + base)
            base += p.num_tokens
        return _Chunk(
            {k: np.concatenate([p.columns[k] for p in parts]) for k in parts[0].columns},
            np.concatenate(offsets),
            {k: np.concatenate([p.scores[k] for p in parts]) for k in parts[0].scores},
            np.concatenate([p.nan for p in parts]),
        )

    def tail(self, cut: int) -> _Chunk:
        """The tokens from ``cut`` on, as pieces of the rows they belong to (copied)."""
        off = self.offsets
        r0 = int(np.searchsorted(off, cut, side="right")) - 1
        ends = off[r0 + 1 :]
        starts = np.maximum(off[r0:-1], cut)
        lengths = ends - starts
        new_off = np.zeros(lengths.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=new_off[1:])
        return _Chunk(
            {k: v[cut:].copy() for k, v in self.columns.items()},
            new_off,
            {k: v[r0:].copy() for k, v in self.scores.items()},
            self.nan[r0:].copy(),
        )


def _read_chunk(
    table: Any, cands: list[str], nan_rows: str, first_row: int, domains: Sequence[str]
) -> _Chunk:
    offsets, ids = _list_column(table.column("input_ids"), "input_ids")
    columns: dict[str, np.ndarray] = {"input_ids": ids}
    lengths = np.diff(offsets).astype(np.float64)
    if (lengths == 0).any():
        r = first_row + int(np.flatnonzero(lengths == 0)[0])
        raise InputError(f"row {r} has no tokens")
    num_bytes = _scalar_column(table, "num_bytes", np.float64)
    scores: dict[str, np.ndarray] = {"__bytes": num_bytes / lengths}
    if domains:
        # One indicator per domain: its block mean is the domain's share of the block's tokens.
        row_dom = np.asarray(_array(table.column(DOMAIN_COLUMN)).to_pylist(), dtype=object)
        for d in domains:
            scores[f"__domain_{d}"] = (row_dom == d).astype(np.float64)
    nan = np.zeros(len(lengths), dtype=bool)
    per_c = {}
    for c in cands:
        for s in ("ids", "logits"):
            name = f"{c}_{s}"
            o, v = _list_column(table.column(name), name)
            if not np.array_equal(o, offsets):
                bad = np.flatnonzero(np.diff(o) != np.diff(offsets))
                raise InputError(
                    f"{name}: rows {(first_row + bad[:5]).tolist()} do not have one entry per "
                    "input_ids token"
                )
            columns[name] = v
        if f"{c}_status" in table.column_names:
            o, v = _list_column(table.column(f"{c}_status"), f"{c}_status")
            if not np.array_equal(o, offsets):
                raise InputError(f"{c}_status: rows do not have one entry per input_ids token")
            columns[f"{c}_status"] = v
        ce = _scalar_column(table, f"{c}_metric_ce", np.float64)
        n_tok = _scalar_column(table, f"{c}_num_tokens", np.float64)
        per_c[c] = (ce, n_tok)
        nan |= ~np.isfinite(ce)
    for c, (ce, n_tok) in per_c.items():
        with np.errstate(invalid="ignore"):
            ce_sum = ce * np.maximum(n_tok - 1.0, 0.0)
        a, b = ce_sum / lengths, num_bytes / lengths
        if nan_rows == "exclude":
            ce = np.where(nan, np.nan, ce)
            a = np.where(nan, np.nan, a)
            b = np.where(nan, np.nan, b)
        scores[f"{c}__ce"] = ce
        scores[f"{c}__ce_sum"] = a
        scores[f"{c}__bytes"] = b
    return _Chunk(columns, offsets, scores, nan)


def _pack_table(
    blocks: Any,
    cands: list[str],
    schema: Any,
    mode: str,
    first_block: int,
    nan_rows: str,
    domains: Sequence[str],
) -> Any:
    import pyarrow as pa

    bo = blocks.block_offsets
    lengths = np.diff(bo)
    cols: dict[str, Any] = {
        "input_ids": _nested(bo, blocks.columns["input_ids"]),
        "attention_mask": _nested(bo, np.ones(int(bo[-1]), dtype=np.int8)),
    }
    if mode == "bfd":
        cols["position_ids"] = _nested(bo, blocks.position_ids)
    cols["num_bytes"] = pa.array(blocks.scores["__bytes"] * lengths)
    if domains:  # the block's commonest domain by tokens (ties: the first in name order)
        shares = np.stack([blocks.scores[f"__domain_{d}"] for d in domains], axis=1)
        cols[DOMAIN_COLUMN] = pa.array([domains[i] for i in shares.argmax(1).tolist()])
    for c in cands:
        cols[f"{c}_ids"] = _nested(bo, blocks.columns[f"{c}_ids"])
        cols[f"{c}_logits"] = _nested(bo, blocks.columns[f"{c}_logits"])
        if f"{c}_status" in blocks.columns:
            cols[f"{c}_status"] = _nested(bo, blocks.columns[f"{c}_status"])
        ce = blocks.scores[f"{c}__ce"]
        with np.errstate(invalid="ignore", divide="ignore"):
            per_byte = blocks.scores[f"{c}__ce_sum"] / blocks.scores[f"{c}__bytes"]
        if nan_rows == "exclude":
            bad = ~np.isfinite(ce) | ~np.isfinite(per_byte)
            if bad.any():
                b = (first_block + np.flatnonzero(bad)[:5]).tolist()
                raise InputError(
                    f"blocks {b} hold only rows with no scored token (metric_ce NaN) or no text "
                    "bytes: drop those rows (one-token texts) before packing"
                )
        cols[f"{c}_metric_ce"] = pa.array(ce.astype(np.float32))
        cols[f"{c}_metric_ce_per_byte"] = pa.array(per_byte.astype(np.float32))
    return pa.Table.from_arrays([cols[f.name].cast(f.type) for f in schema], schema=schema)


def pack_dataset(
    aligned: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    *,
    block_size: int = 2048,
    mode: str = "concat",
    chunk_tokens: int = 1 << 21,
    nan_rows: str = "exclude",
    compat: str | None = None,
    compression: str | None = "zstd",
    overwrite: bool = False,
    progress: bool | None = None,
) -> PackReport:
    """Packs an aligned dataset into training blocks (stage 4; see the module docstring).

    Args:
        aligned: the aligned dataset directory (:func:`align_dataset`'s output).
        output_dir: the packed dataset (``save_to_disk`` layout, the schema of
            ``docs/training.md``, with a manifest).
        block_size: tokens per block.
        mode: ``"concat"`` (the reference: concatenate and cut, keep the remainder) or ``"bfd"``
            (whole documents, best-fit decreasing, ``position_ids`` per document).
        chunk_tokens: tokens packed at a time (memory bound; in concat mode the result does not
            depend on it; in bfd mode documents are only packed with documents of their chunk).
        nan_rows: ``"exclude"`` (rows without a scored token are left out of every candidate's
            scores) or ``"propagate"`` (their NaN reaches the block scores, as in the reference).
        compat: ``"fusellm"``: the reference's block boundaries (concat only). The reference
            packs inside ``datasets.map(batched=True, batch_size=1000)``, so the rows are
            concatenated and cut in groups of :data:`REFERENCE_PACK_ROWS`, each group's remainder
            kept as a short block. ``None``: one concatenation across the whole dataset.
        compression: output shard compression (``"zstd"``, ``"lz4"`` or ``None``).
        overwrite: replace an output made from other inputs instead of refusing.
        progress: progress bar (default: only on a terminal).
    """
    import datasets

    from .io import (
        atomic_dir,
        read_manifest,
        shard_file_name,
        write_arrow_shard,
        write_dataset_metadata,
        write_manifest,
    )
    from .pack import pack

    t0 = time.perf_counter()
    block_size = _positive_int("block_size", block_size)
    chunk_tokens = _positive_int("chunk_tokens", chunk_tokens)
    _choice("mode", mode, ("concat", "bfd"))
    _choice("nan_rows", nan_rows, ("exclude", "propagate"))
    _choice("compat", compat, (None, "fusellm"))
    if compat == "fusellm" and mode != "concat":
        raise InputError(
            f"compat='fusellm' reproduces the reference's concat packing, not mode {mode!r}"
        )
    _choice("compression", compression, _COMPRESSIONS)
    if not isinstance(aligned, (str, os.PathLike)):
        raise InputTypeError(f"aligned must be a directory, got {type(aligned).__name__}")
    src = Path(aligned)
    if not src.is_dir():
        raise InputError(f"aligned dataset directory {src} does not exist")
    out = Path(output_dir)
    if src.resolve() == out.resolve():
        raise InputError(f"output_dir {out} is the input")
    try:
        src_manifest = read_manifest(src)
    except FuseLLMError as e:
        raise InputError(f"{src}: {e}") from e
    if src_manifest is not None and src_manifest.get("stage") not in ("align", None):
        raise InputError(f"{src} holds the output of stage {src_manifest.get('stage')!r}")
    if src_manifest is not None and not src_manifest.get("complete"):
        raise InputError(f"{src}: the aligned dataset is not complete")
    ds = _DiskDataset(src, "aligned")
    cands = _pack_candidates(ds, src_manifest)
    values = str(((src_manifest or {}).get("key") or {}).get("values", "logits"))
    domains = _domains(ds)

    fp = _files_fingerprint(src, _previous_fingerprints(out).get("aligned"))
    key = {
        "format": PACK_FORMAT,
        "aligned_sha256": fp["sha256"],
        "block_size": block_size,
        "mode": mode,
        "nan_rows": nan_rows,
        "chunk_tokens": chunk_tokens if mode == "bfd" else None,
        "group_rows": REFERENCE_PACK_ROWS if compat == "fusellm" else None,
    }
    from .io import output_state

    state = output_state(out, "pack", key, overwrite)
    if state == "done":
        m = read_manifest(out) or {}
        t = m.get("totals", {})
        return PackReport(
            out,
            mode,
            block_size,
            int(t.get("rows", 0)),
            int(t.get("tokens", 0)),
            int(t.get("blocks", 0)),
            list(m.get("candidates", cands)),
            nan_rows=int(t.get("nan_rows", 0)),
            skipped=True,
            seconds=time.perf_counter() - t0,
        )

    in_features = datasets.Features.from_arrow_schema(ds.schema)
    features = pack_features(
        {
            c: (
                _width(ds.schema.field(f"{c}_ids").type) or 0,
                in_features[f"{c}_logits"].feature.feature.dtype,
                f"{c}_status" in in_features,
            )
            for c in cands
        },
        position_ids=mode == "bfd",
        has_domain=bool(domains),
    )
    schema = features.arrow_schema
    num_rows = (src_manifest or {}).get("num_rows")

    rows = tokens = blocks_total = nan_total = 0
    bar = progress_bar(progress, num_rows or 0, "pack", "row")
    try:
        with atomic_dir(out, overwrite=state == "replace") as tmp:
            written: list[Path] = []
            carry: _Chunk | None = None
            pending: list[_Chunk] = []
            pending_tokens = 0

            def flush(final: bool) -> None:
                nonlocal carry, pending, pending_tokens, blocks_total, tokens
                parts = ([carry] if carry is not None else []) + pending
                pending, pending_tokens, carry = [], 0, None
                if not parts:
                    return
                chunk = _Chunk.concat(parts)
                if chunk.num_tokens == 0:
                    return
                packed = pack(
                    chunk.columns,
                    chunk.offsets,
                    block_size=block_size,
                    scores=chunk.scores,
                    mode=mode,  # type: ignore[arg-type]
                    nan_scores="omit" if nan_rows == "exclude" else "propagate",
                )
                keep = packed.num_blocks
                if mode == "concat" and not final and packed.block_lengths[-1] < block_size:
                    keep -= 1
                    carry = chunk.tail(int(packed.block_offsets[keep]))
                if keep == 0:
                    return
                if keep < packed.num_blocks:
                    packed = _first_blocks(packed, keep)
                table = _pack_table(packed, cands, schema, mode, blocks_total, nan_rows, domains)
                path = tmp / f".part-{len(written):05d}.arrow"
                write_arrow_shard(table, path, compression=compression)
                written.append(path)
                blocks_total += keep
                tokens += int(packed.block_offsets[-1])

            group = REFERENCE_PACK_ROWS if compat == "fusellm" else None
            for table in _row_groups(ds.batches(), group):
                chunk = _read_chunk(table, cands, nan_rows, rows, domains)
                rows += table.num_rows
                nan_total += int(np.count_nonzero(chunk.nan))
                pending.append(chunk)
                pending_tokens += chunk.num_tokens
                if group is not None and rows % group == 0:
                    flush(final=True)  # the group's remainder stays a short block
                elif pending_tokens >= chunk_tokens:
                    flush(final=False)
                bar.update(table.num_rows)
            flush(final=True)
            if num_rows is not None and rows != num_rows:
                raise InputError(f"{src} holds {rows} rows but its manifest says {num_rows}")
            if blocks_total == 0:
                raise InputError(f"{src} holds no tokens")
            names = [shard_file_name(i, len(written)) for i in range(len(written))]
            for p, name in zip(written, names, strict=True):
                os.replace(p, tmp / name)
            write_dataset_metadata(tmp, features, names, fingerprint=fp["sha256"])
            totals = {
                "rows": rows,
                "tokens": tokens,
                "blocks": blocks_total,
                "nan_rows": nan_total,
                "fill": tokens / (blocks_total * block_size),
            }
            write_manifest(
                tmp,
                {
                    "stage": "pack",
                    "format": PACK_FORMAT,
                    "fusellm_version": _fusellm_version(),
                    "key": key,
                    "fingerprints": {"aligned": fp},
                    "inputs": {"aligned": str(src.resolve())},
                    "parameters": {"compression": compression, "chunk_tokens": chunk_tokens},
                    "candidates": cands,
                    "values": values,
                    "domains": domains,
                    "totals": totals,
                    "complete": True,
                },
            )
    finally:
        bar.close()
    if nan_total:
        logger.warning("%d row(s) without a scored token were left out of the scores", nan_total)
    return PackReport(
        out,
        mode,
        block_size,
        rows,
        tokens,
        blocks_total,
        cands,
        nan_rows=nan_total,
        seconds=time.perf_counter() - t0,
    )


def _domains(ds: _DiskDataset) -> list[str]:
    """The sorted distinct values of the aligned data's domain column (none: no column)."""
    if DOMAIN_COLUMN not in ds.column_names:
        return []
    import pyarrow.compute as pc

    seen: set[str] = set()
    for batch in ds.batches():
        col = batch.column(DOMAIN_COLUMN)
        if col.null_count:
            raise InputError(f"{ds.path}: the {DOMAIN_COLUMN!r} column has null values")
        seen.update(str(v) for v in pc.unique(col).to_pylist())
    return sorted(seen)


def _first_blocks(packed: Any, keep: int) -> Any:
    """The first ``keep`` blocks of a :class:`fusellm.PackedBlocks` (views)."""
    from .pack import PackedBlocks

    end = int(packed.block_offsets[keep])
    seg_end = int(packed.segment_offsets[keep])
    return PackedBlocks(
        columns={k: v[:end] for k, v in packed.columns.items()},
        block_offsets=packed.block_offsets[: keep + 1],
        scores={k: v[:keep] for k, v in packed.scores.items()},
        position_ids=None if packed.position_ids is None else packed.position_ids[:end],
        segment_rows=packed.segment_rows[:seg_end],
        segment_starts=packed.segment_starts[:seg_end],
        segment_lengths=packed.segment_lengths[:seg_end],
        segment_offsets=packed.segment_offsets[: keep + 1],
    )


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
            "--overwrite."
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
    p.add_argument("--overwrite", action="store_true", help="replace an output of other inputs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_align_cli)
    return p


def _align_cli(args: argparse.Namespace) -> int:
    report = align_dataset(
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
    state = "up to date" if report.skipped else f"aligned in {report.seconds:.1f} s"
    print(f"{args.output}: {state}; {report.rows} rows, {report.base_positions} target positions")
    for name, c in report.sources.items():
        share = (c["matched"] or 0) / max(report.base_positions, 1)
        print(
            f"  {name}: {c['matched']} matched ({share:.1%}), {c['empty']} empty, "
            f"{c['fallback']} fallback, {c['masked']} masked"
        )
    return 0


def add_pack_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds the ``pack`` command to an ``argparse`` sub-parser collection."""
    p = subparsers.add_parser(
        "pack",
        help="pack aligned rows into training blocks",
        description=(
            "Pack the aligned dataset ALIGNED (fusellm align) into blocks of BLOCK_SIZE tokens "
            "for fusellm train, and save them to OUTPUT (save_to_disk, with a manifest). Each "
            "candidate's block scores are the token-weighted mean CE and the CE per byte of "
            "text. Re-running with the same input does nothing."
        ),
    )
    p.add_argument("aligned", metavar="ALIGNED", help="the aligned dataset directory")
    p.add_argument("output", metavar="OUTPUT", help="the packed dataset directory to write")
    p.add_argument(
        "--block-size",
        type=int,
        default=_BLOCK_SIZE,
        help=f"tokens per block (the config's block_size; default: {_BLOCK_SIZE})",
    )
    add_settings_arguments(p, PackSettings)
    p.add_argument("--overwrite", action="store_true", help="replace an output of other inputs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_pack_cli)
    return p


def _pack_cli(args: argparse.Namespace) -> int:
    report = pack_dataset(
        args.aligned,
        args.output,
        block_size=args.block_size,
        **settings_from_args(args, PackSettings),
        overwrite=args.overwrite,
        progress=False if args.no_progress else None,
    )
    state = "up to date" if report.skipped else f"packed in {report.seconds:.1f} s"
    print(
        f"{args.output}: {state}; {report.rows} rows, {report.tokens} tokens in {report.blocks} "
        f"blocks of {report.block_size} ({report.fill:.1%} full), candidates {report.candidates}"
    )
    return 0
