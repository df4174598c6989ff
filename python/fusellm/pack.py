"""Packing aligned rows into training blocks (pipeline stage 4).

Rows travel as flat columns plus row offsets: row ``r`` is tokens ``offsets[r]:offsets[r + 1]``
of every per-token column (``input_ids``, aligned top-K ids ``[N, K]``, logits, ...), and element
``r`` of every per-row score column (``metric_ce``, ...). :func:`pack` returns the blocks the same
way: flat columns plus ``block_offsets``.

Two modes:

- ``mode="concat"``, the reference packing: rows are concatenated in order and cut every
  ``block_size`` tokens; the last, shorter block is kept. Every per-token column is cut
  identically, so the output columns hold exactly the input tokens, in order. A document can
  span two blocks and a block mixes documents (attention crosses documents, as in the
  reference). Planning is O(rows + blocks), then one contiguous copy per column.
- ``mode="bfd"``: best-fit-decreasing bin packing that never splits a row (longest row first,
  into the fullest block it fits), plus ``position_ids`` that restart at 0 at every document, for
  attention that stays inside documents. First fit in row order is also computed and kept in
  the rare cases where it needs fewer blocks, so the result never uses more blocks than either.
  Inside a block rows keep their input order; blocks are ordered by their first row. Costs
  O(rows · log blocks) to plan; a row longer than ``block_size`` is an error.

In both, a score column becomes the token-weighted mean of its rows' scores over each block,
``sum(n_r · s_r) / sum(n_r)`` with ``n_r`` the tokens of row ``r`` in the block, accumulated in
float64 in segment order. Empty rows carry no tokens and no weight.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from . import _native
from .errors import InputError, InputTypeError

__all__ = ["PackedBlocks", "pack"]

PackMode = Literal["concat", "bfd"]
NanScores = Literal["propagate", "omit"]

_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_I64_MAX = np.iinfo(np.int64).max


@dataclass(frozen=True)
class PackedBlocks:
    """Blocks produced by :func:`pack`.

    Attributes:
        columns: per-token columns, flat over all blocks (same dtypes and trailing shapes as the
            input); block ``b`` is rows ``block_offsets[b]:block_offsets[b + 1]``.
        block_offsets: ``int64 [num_blocks + 1]`` token offsets of the blocks.
        scores: per score column, ``float64 [num_blocks]`` token-weighted block means.
        position_ids: ``int32 [num_tokens]`` position inside each document (``mode="bfd"``),
            ``None`` in ``"concat"`` mode (positions there are simply ``0..len(block)-1``).
        segment_rows: ``int64 [num_segments]`` input row of each piece of a block.
        segment_starts: ``int64`` first token of each piece, relative to its row.
        segment_lengths: ``int64`` tokens in each piece.
        segment_offsets: ``int64 [num_blocks + 1]`` pieces of each block.
    """

    columns: dict[str, np.ndarray]
    block_offsets: npt.NDArray[np.int64]
    scores: dict[str, npt.NDArray[np.float64]]
    position_ids: npt.NDArray[np.int32] | None
    segment_rows: npt.NDArray[np.int64]
    segment_starts: npt.NDArray[np.int64]
    segment_lengths: npt.NDArray[np.int64]
    segment_offsets: npt.NDArray[np.int64]

    @property
    def num_blocks(self) -> int:
        return len(self.block_offsets) - 1

    def __len__(self) -> int:
        return self.num_blocks

    @property
    def block_lengths(self) -> npt.NDArray[np.int64]:
        """Tokens per block."""
        return np.diff(self.block_offsets)

    def block(self, i: int) -> dict[str, Any]:
        """Block ``i`` as a dict: every column's slice, every score, ``position_ids`` if any."""
        n = self.num_blocks
        if not -n <= i < n:
            raise IndexError(f"block {i} out of range for {n} blocks")
        i %= n
        lo, hi = int(self.block_offsets[i]), int(self.block_offsets[i + 1])
        out: dict[str, Any] = {k: v[lo:hi] for k, v in self.columns.items()}
        out.update({k: float(v[i]) for k, v in self.scores.items()})
        if self.position_ids is not None:
            out["position_ids"] = self.position_ids[lo:hi]
        return out


def _offsets(x: Any) -> npt.NDArray[np.int64]:
    a = np.asarray(x)
    if a.ndim != 1:
        raise InputTypeError(f"offsets must be 1-D (num_rows + 1 entries), got shape {a.shape}")
    if a.size and a.dtype.kind not in "iu":
        raise InputTypeError(f"offsets must hold integers, got dtype {a.dtype}")
    if a.dtype.kind == "u" and a.size and int(a.max()) > np.iinfo(np.int64).max:
        raise InputError("offsets exceed the int64 range")
    return np.ascontiguousarray(a, dtype=np.int64)


def _column(name: str, x: Any, total: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The column as a C-contiguous array, its flat unsigned view, and values per token."""
    a = np.asarray(x)
    if a.ndim == 0:
        raise InputTypeError(f"column {name!r} must have a token dimension, got a scalar")
    if a.dtype.kind not in "biufcmM":
        raise InputTypeError(f"column {name!r} must be numeric, got dtype {a.dtype}")
    if a.shape[0] != total:
        raise InputError(f"column {name!r} has {a.shape[0]} tokens but offsets[-1] is {total}")
    a = np.ascontiguousarray(a)
    width = math.prod(a.shape[1:])
    size = a.dtype.itemsize
    if size in _UINT:
        flat = a.reshape(-1).view(_UINT[size])
    else:
        flat, width = a.reshape(-1).view(np.uint8), width * size
    return a, flat, width


def _score(name: str, x: Any, rows: int) -> npt.NDArray[np.float64]:
    s = np.asarray(x)
    if s.ndim != 1:
        raise InputTypeError(f"score {name!r} must be 1-D (one per row), got {s.shape}")
    if s.size and s.dtype.kind not in "biuf":
        raise InputTypeError(f"score {name!r} must be numeric, got dtype {s.dtype}")
    if s.shape[0] != rows:
        raise InputError(f"score {name!r} has {s.shape[0]} values for {rows} rows")
    return np.ascontiguousarray(s, dtype=np.float64)


def pack(
    columns: Mapping[str, Any],
    offsets: Any,
    *,
    block_size: int,
    scores: Mapping[str, Any] | None = None,
    mode: PackMode = "concat",
    nan_scores: NanScores = "propagate",
) -> PackedBlocks:
    """Packs rows into blocks of at most ``block_size`` tokens (see the module docstring).

    Args:
        columns: per-token columns, each an array whose first dimension is the token (``[N]``,
            ``[N, K]``, ...), any numeric dtype (int32 ids, float16/float32 logits, ...).
        offsets: ``num_rows + 1`` non-decreasing integers from 0 to ``N``.
        block_size: tokens per block.
        scores: per-row score columns (``[num_rows]``, e.g. ``metric_ce``); each becomes a
            ``float64`` token-weighted mean per block.
        mode: ``"concat"`` (the reference) or ``"bfd"`` (best-fit decreasing, documents whole).
        nan_scores: ``"propagate"`` (a NaN row makes its blocks' mean NaN, as in the reference)
            or ``"omit"`` (NaN rows are left out of the means).

    Returns:
        A :class:`PackedBlocks`.
    """
    if mode not in ("concat", "bfd"):
        raise InputError(f'mode must be "concat" or "bfd", got {mode!r}')
    if nan_scores not in ("propagate", "omit"):
        raise InputError(f'nan_scores must be "propagate" or "omit", got {nan_scores!r}')
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)):
        raise InputTypeError(f"block_size must be an int, got {type(block_size).__name__}")
    if block_size < 1:
        raise InputError(f"block_size must be positive, got {block_size}")
    if block_size > _I64_MAX:
        raise InputError(f"block_size must be at most 2**63 - 1, got {block_size}")
    if not isinstance(columns, Mapping):
        raise InputTypeError(f"columns must be a dict of arrays, got {type(columns).__name__}")
    if not columns:
        raise InputError("columns is empty: give at least one per-token column (the tokens)")
    if scores is not None and not isinstance(scores, Mapping):
        raise InputTypeError(f"scores must be a dict of arrays, got {type(scores).__name__}")
    off = _offsets(offsets)
    if off.size == 0:
        raise InputError("offsets must hold num_rows + 1 entries (at least [0])")
    total = int(off[-1])
    rows = off.size - 1
    # Every size is checked against the data before anything is planned or allocated: the
    # plan's size comes from the offsets' values, which the columns must account for.
    cols = {name: _column(name, x, total) for name, x in columns.items()}
    score_arrays = {name: _score(name, x, rows) for name, x in (scores or {}).items()}
    plan = _native.PackPlan(off, int(block_size), mode)

    out_columns: dict[str, np.ndarray] = {}
    for name, (a, flat, width) in cols.items():
        gather = getattr(plan, f"gather_u{flat.dtype.itemsize * 8}")
        packed = gather(flat, width)
        out_columns[name] = packed.view(a.dtype).reshape((plan.num_tokens, *a.shape[1:]))
    out_scores = {name: plan.block_means(s, nan_scores) for name, s in score_arrays.items()}

    return PackedBlocks(
        columns=out_columns,
        block_offsets=plan.block_offsets,
        scores=out_scores,
        position_ids=plan.position_ids() if mode == "bfd" else None,
        segment_rows=plan.segment_rows,
        segment_starts=plan.segment_starts,
        segment_lengths=plan.segment_lengths,
        segment_offsets=plan.block_segments,
    )
