"""Stage 4: pack the aligned rows into training blocks.

:func:`pack_dataset` (``fusellm pack``) concatenates the aligned rows and cuts them into blocks
(``mode="concat"``, the reference: documents cross block boundaries, the last shorter block is
kept) or packs whole documents best-fit-decreasing (``mode="bfd"``, with ``position_ids``
restarting at every document), with the Rust :func:`fusellm.pack`. Every per-token column is cut
identically. Per block and candidate ``c``: ``{c}_metric_ce`` is the token-weighted mean of the
rows' ``metric_ce`` (weights: the row's target tokens in the block; spec section 2), and
``{c}_metric_ce_per_byte`` is the block's CE per byte of text, ``Σ f_r·CE_r / Σ f_r·B_r`` with
``CE_r = metric_ce·(num_tokens - 1)`` the row's total CE under ``c``, ``B_r`` its bytes and ``f_r``
the share of its target tokens in the block (exact for whole rows; a proportional share for rows
cut between blocks). ``num_bytes`` is ``Σ f_r·B_r``. A row with no scored token (``metric_ce`` NaN
for any candidate) is left out of every candidate's scores alike (``nan_rows="exclude"``;
``"propagate"`` keeps the reference's NaN blocks). Memory: the input is read shard by shard as
flat numpy views of the Arrow buffers and packed in chunks of about ``chunk_tokens`` tokens (in
concat mode the unfinished last block is carried into the next chunk, so the blocks are those of
one pass over everything); one output shard per chunk.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import PackSettings, PipelineConfig, add_settings_arguments, settings_from_args
from ..errors import FuseLLMError, InputError, InputTypeError
from ..progress import progress_bar
from ..schema import DOMAIN_COLUMN, PLAN_COLUMNS, REF, pack_features
from ._common import (
    CANDIDATE_SUFFIXES,
    COMPRESSIONS,
    DiskDataset,
    arrow_array,
    check_choice,
    fixed_width,
    input_fingerprint,
    list_column,
    nested,
    positive_int,
    previous_fingerprints,
    scalar_column,
)

__all__ = [
    "LAYOUTS",
    "REFERENCE_PACK_ROWS",
    "PackReport",
    "PlannedBlocks",
    "add_pack_parser",
    "load_packed",
    "pack_dataset",
]

logger = logging.getLogger(__name__)

PACK_FORMAT = "fusellm.pack/1"
#: ``layout`` of :func:`pack_dataset`: the blocks written out, or only where they are.
LAYOUTS = ("copy", "plan")
_BLOCK_SIZE = next(f.default for f in dataclasses.fields(PipelineConfig) if f.name == "block_size")


# --- the stage -----------------------------------------------------------------------------------


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
    #: ``"copy"`` or ``"plan"`` (:func:`pack_dataset`).
    layout: str = "copy"

    @classmethod
    def from_manifest(
        cls, out: Path, manifest: Mapping[str, Any], *, t0: float, skipped: bool
    ) -> PackReport:
        t, key = manifest.get("totals", {}), manifest.get("key", {})
        return cls(
            out,
            str(key.get("mode", "concat")),
            int(key.get("block_size", 0)),
            int(t.get("rows", 0)),
            int(t.get("tokens", 0)),
            int(t.get("blocks", 0)),
            list(manifest.get("candidates", [])),
            nan_rows=int(t.get("nan_rows", 0)),
            skipped=skipped,
            seconds=time.perf_counter() - t0,
            layout=str(key.get("layout", "copy")),
        )

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
        """The packed blocks: a ``datasets.Dataset`` (copy layout) or :class:`PlannedBlocks`."""
        return load_packed(self.output_dir)


def _pack_candidates(ds: DiskDataset, manifest: Mapping[str, Any] | None) -> list[str]:
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
        need += [f"{c}_{s}" for s in CANDIDATE_SUFFIXES]
    missing = [c for c in need if c not in cols]
    if missing:
        raise InputError(f"{ds.path} lacks column(s) {missing} (columns: {cols})")
    for c in cands:
        for s in ("ids", "logits"):
            if fixed_width(ds.schema.field(f"{c}_{s}").type) is None:
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
    """Flat per-token columns plus row offsets and per-row score inputs, and where each row's
    tokens are in the aligned data: ``rows`` its row there, ``starts`` its first token in that
    row (non-zero only for the remainder of a row carried into the next chunk)."""

    def __init__(
        self,
        columns: dict[str, np.ndarray],
        offsets: np.ndarray,
        scores: dict[str, np.ndarray],
        nan: np.ndarray,
        rows: np.ndarray,
        starts: np.ndarray,
    ) -> None:
        self.columns = columns
        self.offsets = offsets
        self.scores = scores
        self.nan = nan
        self.rows = rows
        self.starts = starts

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
            np.concatenate([p.rows for p in parts]),
            np.concatenate([p.starts for p in parts]),
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
        row_starts = self.starts[r0:].copy()
        row_starts[0] += cut - int(off[r0])
        return _Chunk(
            {k: v[cut:].copy() for k, v in self.columns.items()},
            new_off,
            {k: v[r0:].copy() for k, v in self.scores.items()},
            self.nan[r0:].copy(),
            self.rows[r0:].copy(),
            row_starts,
        )


def _read_columns(cands: list[str], domains: Sequence[str], layout: str) -> list[str] | None:
    """The aligned columns a layout reads (None: all); the plan reads no per-candidate token."""
    if layout == "copy":
        return None
    cols = ["input_ids", "num_bytes", *([DOMAIN_COLUMN] if domains else [])]
    return cols + [f"{c}_{s}" for c in cands for s in ("metric_ce", "num_tokens")]


def _read_chunk(
    table: Any,
    cands: list[str],
    nan_rows: str,
    first_row: int,
    domains: Sequence[str],
    tokens: bool = True,
) -> _Chunk:
    """One table of aligned rows as a chunk; without ``tokens``, of the per-token columns only
    ``input_ids`` (the plan layout)."""
    offsets, ids = list_column(table.column("input_ids"), "input_ids")
    columns: dict[str, np.ndarray] = {"input_ids": ids}
    lengths = np.diff(offsets).astype(np.float64)
    if (lengths == 0).any():
        r = first_row + int(np.flatnonzero(lengths == 0)[0])
        raise InputError(f"row {r} has no tokens")
    num_bytes = scalar_column(table, "num_bytes", np.float64)
    scores: dict[str, np.ndarray] = {"__bytes": num_bytes / lengths}
    if domains:
        # One indicator per domain: its block mean is the domain's share of the block's tokens.
        row_dom = np.asarray(arrow_array(table.column(DOMAIN_COLUMN)).to_pylist(), dtype=object)
        for d in domains:
            scores[f"__domain_{d}"] = (row_dom == d).astype(np.float64)
    nan = np.zeros(len(lengths), dtype=bool)
    per_c = {}
    for c in cands:
        if tokens:
            columns.update(_token_columns(table, c, offsets, first_row))
        ce = scalar_column(table, f"{c}_metric_ce", np.float64)
        n_tok = scalar_column(table, f"{c}_num_tokens", np.float64)
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
    rows = np.arange(first_row, first_row + len(lengths), dtype=np.int64)
    return _Chunk(columns, offsets, scores, nan, rows, np.zeros(len(lengths), np.int64))


def _token_columns(
    table: Any, c: str, offsets: np.ndarray, first_row: int
) -> dict[str, np.ndarray]:
    """Candidate ``c``'s per-token columns (ids, logits, status), checked against the rows."""
    out = {}
    for s in ("ids", "logits", "status"):
        name = f"{c}_{s}"
        if s == "status" and name not in table.column_names:
            continue
        o, v = list_column(table.column(name), name)
        if not np.array_equal(o, offsets):
            bad = np.flatnonzero(np.diff(o) != np.diff(offsets))
            raise InputError(
                f"{name}: rows {(first_row + bad[:5]).tolist()} do not have one entry per "
                "input_ids token"
            )
        out[name] = v
    return out


def _score_columns(
    blocks: Any, cands: list[str], first_block: int, nan_rows: str, domains: Sequence[str]
) -> dict[str, Any]:
    """Both layouts' per-block columns: bytes of text, majority domain, candidate scores."""
    import pyarrow as pa

    lengths = np.diff(blocks.block_offsets)
    cols: dict[str, Any] = {"num_bytes": pa.array(blocks.scores["__bytes"] * lengths)}
    if domains:  # the block's commonest domain by tokens (ties: the first in name order)
        shares = np.stack([blocks.scores[f"__domain_{d}"] for d in domains], axis=1)
        cols[DOMAIN_COLUMN] = pa.array([domains[i] for i in shares.argmax(1).tolist()])
    for c in cands:
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
    return cols


def _block_table(
    blocks: Any, chunk: _Chunk, cands: list[str], schema: Any, mode: str, first_block: int,
    nan_rows: str, domains: Sequence[str], layout: str,
) -> Any:  # fmt: skip
    """The output table of packed blocks: their tokens (copy) or where they are (plan)."""
    import pyarrow as pa

    cols = _score_columns(blocks, cands, first_block, nan_rows, domains)
    if layout == "plan":
        so, seg = blocks.segment_offsets, blocks.segment_rows
        cols["segment_rows"] = nested(so, chunk.rows[seg])
        cols["segment_starts"] = nested(so, chunk.starts[seg] + blocks.segment_starts)
        cols["segment_lengths"] = nested(so, blocks.segment_lengths)
    else:
        bo = blocks.block_offsets
        cols["input_ids"] = nested(bo, blocks.columns["input_ids"])
        cols["attention_mask"] = nested(bo, np.ones(int(bo[-1]), dtype=np.int8))
        if mode == "bfd":
            cols["position_ids"] = nested(bo, blocks.position_ids)
        for name, v in blocks.columns.items():
            if name != "input_ids":
                cols[name] = nested(bo, v)
    return pa.Table.from_arrays([cols[f.name].cast(f.type) for f in schema], schema=schema)


@dataclass
class _PackOptions:
    block_size: int
    mode: str
    nan_rows: str
    layout: str
    compression: str | None
    cands: list[str]
    domains: list[str]
    schema: Any


class _Packer:
    """Chunks of aligned rows in, shards of blocks out: pending chunks are packed together
    once they hold ``chunk_tokens``; in concat mode the unfinished last block is carried into
    the next pack, so the blocks are those of one pass over everything."""

    def __init__(self, tmp: Path, opts: _PackOptions) -> None:
        self.tmp, self.opts = tmp, opts
        self.written: list[Path] = []
        self.blocks = self.tokens = 0
        self.carry: _Chunk | None = None
        self.pending: list[_Chunk] = []
        self.pending_tokens = 0

    def add(self, chunk: _Chunk) -> None:
        self.pending.append(chunk)
        self.pending_tokens += chunk.num_tokens

    def flush(self, final: bool) -> None:
        from ..io import write_arrow_shard
        from ..pack import pack

        o = self.opts
        parts = ([self.carry] if self.carry is not None else []) + self.pending
        self.pending, self.pending_tokens, self.carry = [], 0, None
        if not parts:
            return
        chunk = _Chunk.concat(parts)
        if chunk.num_tokens == 0:
            return
        packed = pack(
            chunk.columns,
            chunk.offsets,
            block_size=o.block_size,
            scores=chunk.scores,
            mode=o.mode,  # type: ignore[arg-type]
            nan_scores="omit" if o.nan_rows == "exclude" else "propagate",
        )
        keep = packed.num_blocks
        if o.mode == "concat" and not final and packed.block_lengths[-1] < o.block_size:
            keep -= 1
            self.carry = chunk.tail(int(packed.block_offsets[keep]))
        if keep == 0:
            return
        if keep < packed.num_blocks:
            packed = _first_blocks(packed, keep)
        table = _block_table(
            packed, chunk, o.cands, o.schema, o.mode, self.blocks, o.nan_rows, o.domains, o.layout
        )
        path = self.tmp / f".part-{len(self.written):05d}.arrow"
        write_arrow_shard(table, path, compression=o.compression)
        self.written.append(path)
        self.blocks += keep
        self.tokens += int(packed.block_offsets[-1])


def _check_input(aligned: Any, output_dir: Any) -> tuple[Path, Path, dict[str, Any] | None]:
    """The aligned directory, the output directory and the aligned data's manifest."""
    from ..io import read_manifest

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
    return src, out, src_manifest


def _output_features(
    ds: DiskDataset, cands: list[str], mode: str, layout: str, has_domain: bool
) -> Any:
    import datasets

    in_features = datasets.Features.from_arrow_schema(ds.schema)
    return pack_features(
        {
            c: (
                fixed_width(ds.schema.field(f"{c}_ids").type) or 0,
                in_features[f"{c}_logits"].feature.feature.dtype,
                f"{c}_status" in in_features,
            )
            for c in cands
        },
        position_ids=mode == "bfd",
        has_domain=has_domain,
        layout=layout,
    )


def pack_dataset(
    aligned: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    *,
    block_size: int = 2048,
    mode: str = PackSettings.mode,
    layout: str = PackSettings.layout,
    chunk_tokens: int = PackSettings.chunk_tokens,
    nan_rows: str = PackSettings.nan_rows,
    compat: str | None = PackSettings.compat,
    compression: str | None = PackSettings.compression,
    overwrite: bool = False,
    on_stale: str | None = None,
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
        layout: ``"plan"`` (only where each block's tokens are in the aligned data, and its
            scores; :func:`load_packed` gives the :class:`PlannedBlocks` that read the blocks
            from the aligned data, which must stay in place) or ``"copy"`` (every block's
            tokens and teacher rows written out: the training schema of ``docs/training.md``).
        chunk_tokens: tokens packed at a time (memory bound; in concat mode the result does not
            depend on it; in bfd mode documents are only packed with documents of their chunk).
        nan_rows: ``"exclude"`` (rows without a scored token are left out of every candidate's
            scores) or ``"propagate"`` (their NaN reaches the block scores, as in the reference).
        compat: ``"fusellm"``: the reference's block boundaries (concat only). The reference
            packs inside ``datasets.map(batched=True, batch_size=1000)``, so the rows are
            concatenated and cut in groups of :data:`REFERENCE_PACK_ROWS`, each group's remainder
            kept as a short block. ``None``: one concatenation across the whole dataset.
        compression: output shard compression (``"lz4"``, ``"zstd"`` or ``None``).
        overwrite: replace an output made from other inputs instead of refusing.
        on_stale: ``"refuse"`` or ``"replace"`` such an output (default: from ``overwrite``;
            :mod:`fusellm.artifact`).
        progress: progress bar (default: only on a terminal).
    """
    from ..artifact import Artifact, stale_policy

    t0 = time.perf_counter()
    block_size = positive_int("block_size", block_size)
    chunk_tokens = positive_int("chunk_tokens", chunk_tokens)
    check_choice("mode", mode, ("concat", "bfd"))
    check_choice("layout", layout, LAYOUTS)
    check_choice("nan_rows", nan_rows, ("exclude", "propagate"))
    check_choice("compat", compat, (None, "fusellm"))
    if compat == "fusellm" and mode != "concat":
        raise InputError(
            f"compat='fusellm' reproduces the reference's concat packing, not mode {mode!r}"
        )
    check_choice("compression", compression, COMPRESSIONS)
    src, out, src_manifest = _check_input(aligned, output_dir)
    ds = DiskDataset(src, "aligned")
    cands = _pack_candidates(ds, src_manifest)
    fp = input_fingerprint(src, src_manifest, previous_fingerprints(out).get("aligned"))
    key = {
        "format": PACK_FORMAT,
        "aligned_sha256": fp["sha256"],
        "block_size": block_size,
        "mode": mode,
        "layout": layout,
        "nan_rows": nan_rows,
        "chunk_tokens": chunk_tokens if mode == "bfd" else None,
        "group_rows": REFERENCE_PACK_ROWS if compat == "fusellm" else None,
    }
    art = Artifact(out, "pack", key)
    decision = art.decide(stale_policy(overwrite, on_stale))
    if decision.done:
        art.skipped()
        return PackReport.from_manifest(out, decision.manifest or {}, t0=t0, skipped=True)

    domains = _domains(ds)
    features = _output_features(ds, cands, mode, layout, bool(domains))
    opts = _PackOptions(
        block_size, mode, nan_rows, layout, compression, cands, domains, features.arrow_schema
    )
    num_rows = (src_manifest or {}).get("num_rows")
    manifest: dict[str, Any] = {}
    bar = progress_bar(progress, num_rows or 0, "pack", "row")
    try:
        with art.build(decision, manifest) as tmp:
            packer = _Packer(tmp, opts)
            group = REFERENCE_PACK_ROWS if compat == "fusellm" else None
            rows, nan_total = _pack_rows(ds, packer, group, chunk_tokens, bar)
            if num_rows is not None and rows != num_rows:
                raise InputError(f"{src} holds {rows} rows but its manifest says {num_rows}")
            if packer.blocks == 0:
                raise InputError(f"{src} holds no tokens")
            _commit_shards(tmp, packer.written, features, fp["sha256"])
            totals = {
                "rows": rows,
                "tokens": packer.tokens,
                "blocks": packer.blocks,
                "nan_rows": nan_total,
                "fill": packer.tokens / (packer.blocks * block_size),
            }
            manifest.update(
                {
                    "format": PACK_FORMAT,
                    "fingerprints": {"aligned": fp},
                    "inputs": {"aligned": str(src.resolve())},
                    "parameters": {"compression": compression, "chunk_tokens": chunk_tokens},
                    "candidates": cands,
                    "values": str(((src_manifest or {}).get("key") or {}).get("values", "logits")),
                    "domains": domains,
                    "totals": totals,
                },
            )
    finally:
        bar.close()
    if nan_total:
        logger.warning("%d row(s) without a scored token were left out of the scores", nan_total)
    return PackReport.from_manifest(out, {**manifest, "key": key}, t0=t0, skipped=False)


def _pack_rows(
    ds: DiskDataset, packer: _Packer, group: int | None, chunk_tokens: int, bar: Any
) -> tuple[int, int]:
    """Every aligned row through ``packer``; returns the rows read and those without a score."""
    o = packer.opts
    rows = nan_total = 0
    batches = ds.batches(_read_columns(o.cands, o.domains, o.layout))
    for table in _row_groups(batches, group):
        chunk = _read_chunk(table, o.cands, o.nan_rows, rows, o.domains, o.layout == "copy")
        rows += table.num_rows
        nan_total += int(np.count_nonzero(chunk.nan))
        packer.add(chunk)
        if group is not None and rows % group == 0:
            packer.flush(final=True)  # the group's remainder stays a short block
        elif packer.pending_tokens >= chunk_tokens:
            packer.flush(final=False)
        bar.update(table.num_rows)
    packer.flush(final=True)
    return rows, nan_total


def _commit_shards(tmp: Path, written: list[Path], features: Any, fingerprint: str) -> None:
    """The part files renamed to their shard names, and the dataset's metadata."""
    from ..io import shard_file_name, write_dataset_metadata

    names = [shard_file_name(i, len(written)) for i in range(len(written))]
    for p, name in zip(written, names, strict=True):
        os.replace(p, tmp / name)
    write_dataset_metadata(tmp, features, names, fingerprint=fingerprint)


def _domains(ds: DiskDataset) -> list[str]:
    """The sorted distinct values of the aligned data's domain column (none: no column)."""
    if DOMAIN_COLUMN not in ds.column_names:
        return []
    import pyarrow.compute as pc

    seen: set[str] = set()
    for batch in ds.batches([DOMAIN_COLUMN]):
        col = batch.column(DOMAIN_COLUMN)
        if col.null_count:
            raise InputError(f"{ds.path}: the {DOMAIN_COLUMN!r} column has null values")
        seen.update(str(v) for v in pc.unique(col).to_pylist())
    return sorted(seen)


def _first_blocks(packed: Any, keep: int) -> Any:
    """The first ``keep`` blocks of a :class:`fusellm.PackedBlocks` (views)."""
    from ..pack import PackedBlocks

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


# --- reading a pack output -----------------------------------------------------------------------


def load_packed(data: Any) -> Any:
    """The training blocks of a pack output directory (or ``data`` as is): a
    ``datasets.Dataset`` for the copy layout (``save_to_disk``; a ``DatasetDict``'s ``train``
    split), :class:`PlannedBlocks` for the plan layout."""
    import datasets

    from ..io import read_manifest

    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.exists():
            raise InputError(f"packed dataset directory {str(path)!r} does not exist")
        try:
            manifest = read_manifest(path) if path.is_dir() else None
        except FuseLLMError as e:
            raise InputError(f"{path}: {e}") from e
        if manifest is not None and (manifest.get("key") or {}).get("layout") == "plan":
            return PlannedBlocks(path)
        data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        if "train" not in data:
            raise InputError(f"packed DatasetDict has no 'train' split: {list(data)}")
        data = data["train"]
    if not isinstance(data, (datasets.Dataset, PlannedBlocks)):
        raise InputTypeError(f"expected a datasets.Dataset, got {type(data).__name__}")
    return data


class _Column:
    """One per-token column of the aligned data: per record batch its row offsets and flat
    values (numpy views of the Arrow buffers)."""

    def __init__(self, name: str, tables: Sequence[Any]) -> None:
        self.parts = [list_column(t.column(name), name) for t in tables]

    def gather(self, chunks: np.ndarray, rows: np.ndarray, starts: np.ndarray, lengths: Any) -> Any:
        pieces = []
        for c, r, s, n in zip(
            chunks.tolist(), rows.tolist(), starts.tolist(), lengths.tolist(), strict=True
        ):
            off, values = self.parts[c]
            lo = int(off[r]) + s
            if s < 0 or n < 0 or lo + n > int(off[r + 1]):
                raise InputError(f"a plan's piece (start {s}, length {n}) is outside its row")
            pieces.append(values[lo : lo + n])
        return np.concatenate(pieces) if pieces else None


class PlannedBlocks:
    """The blocks of a ``layout="plan"`` pack output, read from the aligned rows it points to.

    ``blocks[i]`` is the dict that row ``i`` of the same pack in the copy layout holds in numpy
    format, column for column and value for value, so a :class:`fusellm.FusionCollator` makes
    the same batches of it (and :class:`fusellm.FusionTrainer` accepts it as a dataset). The
    aligned data is opened once (memory-mapped, or decompressed into memory when its shards
    are compressed) and must be what was packed: its fingerprint is checked against the
    manifest's.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from ..io import read_manifest

        self.path = Path(path)
        try:
            manifest = read_manifest(self.path)
        except FuseLLMError as e:
            raise InputError(f"{self.path}: {e}") from e
        key = (manifest or {}).get("key") or {}
        if not manifest or manifest.get("stage") != "pack" or key.get("layout") != "plan":
            raise InputError(f"{self.path} is not a plan-layout pack output")
        if not manifest.get("complete"):
            raise InputError(f"{self.path}: the pack is not complete")
        src = Path(str((manifest.get("inputs") or {}).get("aligned", "")))
        packed_fp = (manifest.get("fingerprints") or {}).get("aligned") or {}
        if not src.is_dir():
            raise InputError(f"{self.path}: its aligned data {src} does not exist")
        try:
            now = input_fingerprint(src, read_manifest(src), packed_fp)["sha256"]
        except FuseLLMError as e:
            raise InputError(f"{self.path}: its aligned data {src} cannot be read ({e})") from e
        if now != packed_fp.get("sha256"):
            raise InputError(
                f"{self.path}: its aligned data {src} changed since it was packed; pack again"
            )
        self.mode = str(key.get("mode", "concat"))
        self.candidates = [str(c) for c in manifest.get("candidates", [])]
        self.domains = [str(d) for d in manifest.get("domains", [])]
        aligned = DiskDataset(src, "aligned")
        plan = DiskDataset(self.path, "packed plan")
        token_cols = ["input_ids"] + [
            f"{c}_{s}"
            for c in self.candidates
            for s in ("ids", "logits", "status")
            if f"{c}_{s}" in aligned.column_names
        ]
        tables = list(aligned.batches(token_cols))
        self._columns = {name: _Column(name, tables) for name in token_cols}
        self._batch_rows = np.cumsum([0] + [t.num_rows for t in tables])
        self._plan = _PlanTable(list(plan.batches()), int(self._batch_rows[-1]))
        # The copy layout's columns, in its order (one declaration: schema.pack_features).
        has_domain = DOMAIN_COLUMN in plan.column_names
        copy = _output_features(aligned, self.candidates, self.mode, "copy", has_domain)
        self.column_names = list(copy)

    def __len__(self) -> int:
        return self._plan.num_blocks

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for lo in range(0, len(self), 256):
            yield from self.blocks(lo, min(lo + 256, len(self)))

    def unique(self, column: str) -> list[Any]:
        """The distinct values of a per-block column (``datasets.Dataset.unique``)."""
        return list(dict.fromkeys(self._plan.scalars[column].tolist()))

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self)
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not -n <= i < n:
            raise IndexError(f"block {i!r} out of range for {n} blocks")
        return self.blocks(int(i) % n, int(i) % n + 1)[0]

    def blocks(self, lo: int, hi: int) -> list[dict[str, Any]]:
        """Blocks ``lo..hi-1`` as dicts (see the class docstring)."""
        p = self._plan
        out = []
        for b in range(lo, hi):
            seg = slice(int(p.offsets[b]), int(p.offsets[b + 1]))
            rows, starts, lengths = p.rows[seg], p.starts[seg], p.lengths[seg]
            chunk = np.searchsorted(self._batch_rows, rows, side="right") - 1
            local = rows - self._batch_rows[chunk]
            d: dict[str, Any] = {
                name: col.gather(chunk, local, starts, lengths)
                for name, col in self._columns.items()
            }
            n = int(lengths.sum())
            d["attention_mask"] = np.ones(n, dtype=np.int8)
            if self.mode == "bfd":
                d["position_ids"] = np.concatenate(
                    [
                        np.arange(s, s + k, dtype=np.int32)
                        for s, k in zip(starts, lengths, strict=True)
                    ]
                )
            d.update({k: v[b] for k, v in p.scalars.items()})
            out.append({k: d[k] for k in self.column_names})
        return out

    def iter_tables(self, columns: Sequence[str], batch_size: int) -> Iterator[Any]:
        """The blocks as ``pyarrow`` tables of ``columns`` (the copy layout's types), up to
        ``batch_size`` blocks each (what :func:`fusellm.fuse.validate_packed` scans)."""
        import pyarrow as pa

        for lo in range(0, len(self), batch_size):
            blocks = self.blocks(lo, min(lo + batch_size, len(self)))
            offsets = np.cumsum([0] + [b["input_ids"].shape[0] for b in blocks])
            cols = {}
            for name in columns:
                if name in self._plan.scalars:
                    cols[name] = pa.array(np.asarray([b[name] for b in blocks]))
                else:
                    cols[name] = nested(offsets, np.concatenate([b[name] for b in blocks]))
            yield pa.table(cols)


class _PlanTable:
    """A plan's pieces (flat, with per-block offsets) and per-block scalar columns."""

    def __init__(self, tables: Sequence[Any], aligned_rows: int) -> None:
        import pyarrow as pa

        table = pa.Table.from_batches(tables) if tables else None
        if table is None or table.num_rows == 0:
            raise InputError("the packed plan holds no blocks")
        self.offsets, self.rows = list_column(table.column("segment_rows"), "segment_rows")
        o_s, self.starts = list_column(table.column("segment_starts"), "segment_starts")
        o_l, self.lengths = list_column(table.column("segment_lengths"), "segment_lengths")
        if not (np.array_equal(o_s, self.offsets) and np.array_equal(o_l, self.offsets)):
            raise InputError("the packed plan's piece columns disagree in length")
        if self.rows.size and (self.rows.min() < 0 or self.rows.max() >= aligned_rows):
            raise InputError(
                f"the packed plan names rows outside the aligned data's {aligned_rows}"
            )
        self.num_blocks = table.num_rows
        self.scalars = {
            name: arrow_array(table.column(name)).to_numpy(zero_copy_only=False)
            for name in table.column_names
            if name not in PLAN_COLUMNS
        }


# --- command line --------------------------------------------------------------------------------


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
