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
from ..schema import DOMAIN_COLUMN, REF, pack_features
from ._common import (
    CANDIDATE_SUFFIXES,
    COMPRESSIONS,
    DiskDataset,
    arrow_array,
    check_choice,
    files_fingerprint,
    fixed_width,
    list_column,
    nested,
    positive_int,
    previous_fingerprints,
    scalar_column,
)

__all__ = ["REFERENCE_PACK_ROWS", "PackReport", "add_pack_parser", "pack_dataset"]

logger = logging.getLogger(__name__)

PACK_FORMAT = "fusellm.pack/1"
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
        for s in ("ids", "logits"):
            name = f"{c}_{s}"
            o, v = list_column(table.column(name), name)
            if not np.array_equal(o, offsets):
                bad = np.flatnonzero(np.diff(o) != np.diff(offsets))
                raise InputError(
                    f"{name}: rows {(first_row + bad[:5]).tolist()} do not have one entry per "
                    "input_ids token"
                )
            columns[name] = v
        if f"{c}_status" in table.column_names:
            o, v = list_column(table.column(f"{c}_status"), f"{c}_status")
            if not np.array_equal(o, offsets):
                raise InputError(f"{c}_status: rows do not have one entry per input_ids token")
            columns[f"{c}_status"] = v
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
        "input_ids": nested(bo, blocks.columns["input_ids"]),
        "attention_mask": nested(bo, np.ones(int(bo[-1]), dtype=np.int8)),
    }
    if mode == "bfd":
        cols["position_ids"] = nested(bo, blocks.position_ids)
    cols["num_bytes"] = pa.array(blocks.scores["__bytes"] * lengths)
    if domains:  # the block's commonest domain by tokens (ties: the first in name order)
        shares = np.stack([blocks.scores[f"__domain_{d}"] for d in domains], axis=1)
        cols[DOMAIN_COLUMN] = pa.array([domains[i] for i in shares.argmax(1).tolist()])
    for c in cands:
        cols[f"{c}_ids"] = nested(bo, blocks.columns[f"{c}_ids"])
        cols[f"{c}_logits"] = nested(bo, blocks.columns[f"{c}_logits"])
        if f"{c}_status" in blocks.columns:
            cols[f"{c}_status"] = nested(bo, blocks.columns[f"{c}_status"])
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
        on_stale: ``"refuse"`` or ``"replace"`` such an output (default: from ``overwrite``;
            :mod:`fusellm.artifact`).
        progress: progress bar (default: only on a terminal).
    """
    import datasets

    from ..artifact import Artifact, stale_policy
    from ..io import read_manifest, shard_file_name, write_arrow_shard, write_dataset_metadata
    from ..pack import pack

    t0 = time.perf_counter()
    block_size = positive_int("block_size", block_size)
    chunk_tokens = positive_int("chunk_tokens", chunk_tokens)
    check_choice("mode", mode, ("concat", "bfd"))
    check_choice("nan_rows", nan_rows, ("exclude", "propagate"))
    check_choice("compat", compat, (None, "fusellm"))
    if compat == "fusellm" and mode != "concat":
        raise InputError(
            f"compat='fusellm' reproduces the reference's concat packing, not mode {mode!r}"
        )
    check_choice("compression", compression, COMPRESSIONS)
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
    ds = DiskDataset(src, "aligned")
    cands = _pack_candidates(ds, src_manifest)
    values = str(((src_manifest or {}).get("key") or {}).get("values", "logits"))
    domains = _domains(ds)

    fp = files_fingerprint(src, previous_fingerprints(out).get("aligned"))
    key = {
        "format": PACK_FORMAT,
        "aligned_sha256": fp["sha256"],
        "block_size": block_size,
        "mode": mode,
        "nan_rows": nan_rows,
        "chunk_tokens": chunk_tokens if mode == "bfd" else None,
        "group_rows": REFERENCE_PACK_ROWS if compat == "fusellm" else None,
    }
    art = Artifact(out, "pack", key)
    decision = art.decide(stale_policy(overwrite, on_stale))
    if decision.done:
        art.skipped()
        m = decision.manifest or {}
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
                fixed_width(ds.schema.field(f"{c}_ids").type) or 0,
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
    manifest: dict[str, Any] = {}
    bar = progress_bar(progress, num_rows or 0, "pack", "row")
    try:
        with art.build(decision, manifest) as tmp:
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
            manifest.update(
                {
                    "format": PACK_FORMAT,
                    "fingerprints": {"aligned": fp},
                    "inputs": {"aligned": str(src.resolve())},
                    "parameters": {"compression": compression, "chunk_tokens": chunk_tokens},
                    "candidates": cands,
                    "values": values,
                    "domains": domains,
                    "totals": totals,
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


def _domains(ds: DiskDataset) -> list[str]:
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
