"""Token alignment: re-express a source ("blend") model's top-K distributions on the target
("base") model's tokens and vocabulary.

Two pairings of base positions with blend positions:

- ``method="mined"``: MinED dynamic time warping over the raw token strings, bit-identical to the
  reference FuseLLM pipeline (Levenshtein over code points after stripping each side's marker,
  ties diag > up > left). Quadratic in the worst case, pruned exactly to the cells near the path.
- ``method="offsets"``: both sides tokenized the same text and carry character offsets; a base
  position takes a distribution only where a blend token ends at the same character offset (both
  then predict the same continuation). Linear time, no string heuristics.

Two policies:

- ``compat="fusellm"`` reproduces the reference rows exactly (spec section 6): duplicates keep
  the first (highest) logit and an unmatched position gets a one-hot row (logit 1.0) on the
  CURRENT base token, although the position predicts the next one.
- the default fixes the reference's defects: duplicates are merged by summing probabilities
  (logsumexp of the values: exact for log-probabilities, and for logits at temperature 1),
  unmatched positions get a one-hot row on the NEXT base token (``fallback="next"``; the last
  position is masked) or are masked (``fallback="mask"``). A one-hot row holds log-probability
  0 (probability 1).

In both, top-K ids that have no token string (padded vocabularies: model width > tokenizer length)
are dropped and counted in :attr:`AlignedRow.num_unknown`; entries whose string is not a base
token in :attr:`AlignedRow.num_unmapped`. Nothing is renormalised: when the values are
log-probabilities (``fusellm extract``'s default), the mass of every dropped entry is simply
absent from the row, i.e. it moves to the row's tail (``1 - Σ exp(value)``), which the calibrated
loss (:mod:`fusellm.fuse`) reads as probability outside the row.

Rows are padded to K columns: ids with ``-1``, logits with ``-inf`` (probability zero under a
softmax over the row). Every row is sorted by descending logit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from . import _native
from .checks import check_num_threads, check_text, vocab_list
from .errors import InputError, InputTypeError

if TYPE_CHECKING:
    from .vocab import VocabMap

__all__ = [
    "EMPTY",
    "FALLBACK",
    "MASKED",
    "MATCHED",
    "AlignedBatch",
    "AlignedRow",
    "Aligner",
    "align_batch",
    "mined_base_to_blend",
]

#: The row holds the source distribution.
MATCHED = 0
#: The position was matched but none of its top-K tokens exists in the base vocabulary.
EMPTY = 1
#: The row is a one-hot fallback (current token with ``compat="fusellm"``, next token by default).
FALLBACK = 2
#: The position has no target.
MASKED = 3

Method = Literal["mined", "offsets"]
VocabMode = Literal["hard", "soft"]
Fallback = Literal["next", "mask"]

_INT32 = np.iinfo(np.int32)


@dataclass(frozen=True, slots=True)
class AlignedRow:
    """One aligned sequence, on the base side.

    Attributes:
        ids: ``int32 [L_base, K]`` base token ids, ``-1`` padded.
        logits: ``float32 [L_base, K]`` matching logits, ``-inf`` padded, descending per row.
        status: ``uint8 [L_base]`` :data:`MATCHED`, :data:`EMPTY`, :data:`FALLBACK` or
            :data:`MASKED` per position.
        num_unknown: top-K entries dropped because the blend id has no token string.
        num_unmapped: top-K entries dropped because their string is not a base token.
        num_duplicates: top-K entries whose base id repeats an earlier entry's: merged into it
            (probabilities summed) by default, dropped with ``compat="fusellm"``.
    """

    ids: npt.NDArray[np.int32]
    logits: npt.NDArray[np.float32]
    status: npt.NDArray[np.uint8]
    num_unknown: int
    num_unmapped: int
    num_duplicates: int

    def counts(self) -> dict[str, int]:
        """Positions per status, plus the dropped top-K entries."""
        c = np.bincount(self.status, minlength=4)
        return {
            "matched": int(c[MATCHED]),
            "empty": int(c[EMPTY]),
            "fallback": int(c[FALLBACK]),
            "masked": int(c[MASKED]),
            "unknown_ids": self.num_unknown,
            "unmapped_ids": self.num_unmapped,
            "duplicate_ids": self.num_duplicates,
        }


@dataclass(frozen=True, slots=True)
class AlignedBatch:
    """A batch aligned by :meth:`Aligner.align_flat`: the rows of every sequence, one after the
    other (the base side's row offsets index them).

    Attributes:
        ids: ``int32 [N_base, K]`` base token ids, ``-1`` padded.
        logits: ``[N_base, K]`` matching logits (``float32``, or ``float16`` as asked), ``-inf``
            padded, descending per row.
        status: ``uint8 [N_base]`` status per position.
        counts: the batch's sums: ``matched``, ``empty``, ``fallback``, ``masked`` (positions by
            status), ``unknown_ids``, ``unmapped_ids``, ``duplicate_ids`` (as in
            :class:`AlignedRow`), ``topk_entries`` (entries kept in matched rows) and
            ``exact_span`` (offsets method: matched positions whose source token has the base
            token's span; ``None`` for MinED).
    """

    ids: npt.NDArray[np.int32]
    logits: npt.NDArray[np.float32] | npt.NDArray[np.float16]
    status: npt.NDArray[np.uint8]
    counts: dict[str, int | None]


def _as_int32(x: Any, name: str, ndim: int) -> npt.NDArray[np.int32]:
    a = np.asarray(x)
    if a.dtype == np.int32 and a.ndim == ndim and a.flags.c_contiguous:
        return a
    if a.ndim != ndim:
        raise InputTypeError(f"{name} must have {ndim} dimension(s), got shape {a.shape}")
    if a.size == 0 and a.dtype.kind not in "iu":
        a = a.astype(np.int64)
    if a.dtype.kind not in "iu":  # bool too: True is not a token id
        raise InputTypeError(f"{name} must hold integers, got dtype {a.dtype}")
    if a.size and (int(a.min()) < _INT32.min or int(a.max()) > _INT32.max):
        bad = int(a.min()) if int(a.min()) < _INT32.min else int(a.max())
        raise InputError(f"{name} holds id {bad}, outside the int32 range")
    return np.ascontiguousarray(a, dtype=np.int32)


def _as_float32(x: Any, name: str) -> npt.NDArray[np.float32]:
    a = np.asarray(x)
    if a.ndim != 2:
        raise InputTypeError(f"{name} must have 2 dimensions [L, K], got shape {a.shape}")
    if a.dtype.kind != "f":
        raise InputTypeError(f"{name} must hold floating-point logits, got dtype {a.dtype}")
    # Values beyond the float32 range become +-inf, as intended; no overflow warning.
    with np.errstate(over="ignore"):
        return np.ascontiguousarray(a, dtype=np.float32)


def _as_row_values(x: Any, name: str) -> npt.NDArray[np.float16] | npt.NDArray[np.float32]:
    """``[L, K]`` logits for the kernel: ``float16`` rows as they are (the kernel widens them
    exactly), any other floating-point dtype as ``float32``."""
    a = np.asarray(x)
    if a.dtype == np.float16 and a.ndim == 2:
        return np.ascontiguousarray(a)
    return _as_float32(a, name)


def _as_offsets(x: Any, name: str) -> npt.NDArray[np.int64]:
    a = np.asarray(x)
    if a.ndim != 2 or a.shape[1] != 2:
        raise InputTypeError(f"{name} must have shape [L, 2], got shape {a.shape}")
    if a.size and a.dtype.kind not in "iu":
        raise InputTypeError(f"{name} must hold integer character offsets, got dtype {a.dtype}")
    if a.size and a.dtype.kind == "u" and int(a.max()) > np.iinfo(np.int64).max:
        raise InputError(f"{name} holds offset {int(a.max())}, beyond the int64 range")
    return np.ascontiguousarray(a, dtype=np.int64)


def _as_rows(x: Any, name: str) -> npt.NDArray[np.int64]:
    a = np.asarray(x)
    if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
        raise InputTypeError(f"{name} must be 1-D integer row offsets, got {a.dtype} {a.shape}")
    if a.size and a.dtype.kind == "u" and int(a.max()) > np.iinfo(np.int64).max:
        raise InputError(f"{name} holds offset {int(a.max())}, beyond the int64 range")
    return np.ascontiguousarray(a, dtype=np.int64)


_I32, _I64, _F32 = np.dtype(np.int32), np.dtype(np.int64), np.dtype(np.float32)


def _ready(a: Any, dtype: np.dtype[Any], ndim: int, width: int | None = None) -> bool:
    """Whether ``a`` goes to Rust as it is (the common case, checked per array per batch):
    a C-contiguous ndarray of ``dtype`` and rank ``ndim`` (and ``width`` columns, if given)."""
    return (
        type(a) is np.ndarray
        and a.dtype is dtype
        and a.ndim == ndim
        and (width is None or a.shape[1] == width)
        and a.flags.c_contiguous
    )


def _arrays(
    xs: Any,
    name: str,
    convert: Callable[[Any, str], Any],
    dtype: np.dtype[Any],
    ndim: int,
    width: int | None = None,
) -> list[Any]:
    """One array per sequence: those that are :func:`_ready` as they are, the others through
    ``convert`` (which checks them and names ``name[i]`` in its errors)."""
    out = _as_list(xs, name)
    for i, a in enumerate(out):
        if not _ready(a, dtype, ndim, width):
            out[i] = convert(a, f"{name}[{i}]")
    return out


def _as_list(x: Any, name: str) -> list[Any]:
    if isinstance(x, np.ndarray) or not isinstance(x, Sequence) or isinstance(x, str):
        raise InputTypeError(f"{name} must be a list with one array per sequence, got {type(x)}")
    return list(x)


class Aligner:
    """Aligns one source (blend) tokenizer's outputs onto the target (base) tokenizer.

    Args:
        base_vocab: the string of every base token id, in id order (``None`` for ids without
            one, as in padded vocabularies).
        blend_vocab: the same for the blend tokenizer.
        base_marker: the base tokenizer's word-boundary marker (``"▁"`` or ``"Ġ"``).
        blend_marker: the blend tokenizer's marker.
        vocab_map: marker-swapped blend string -> base string, used by ``vocab="soft"``: a dict
            (the reference pipeline's JSON mapping) or a :class:`fusellm.VocabMap`.
        compat: ``"fusellm"`` for the reference pipeline's exact rows, ``None`` for the improved
            defaults (see the module docstring).
        fallback: without ``compat``: ``"next"`` (one-hot on the next base token) or ``"mask"``.
    """

    def __init__(
        self,
        base_vocab: Sequence[str | None],
        blend_vocab: Sequence[str | None],
        *,
        base_marker: str,
        blend_marker: str,
        vocab_map: Mapping[str, str] | VocabMap | None = None,
        compat: Literal["fusellm"] | None = None,
        fallback: Fallback = "next",
    ) -> None:
        if compat not in (None, "fusellm"):
            raise InputError(f'compat must be None or "fusellm", got {compat!r}')
        check_text(base_marker, "base_marker")
        check_text(blend_marker, "blend_marker")
        if fallback not in ("next", "mask"):
            raise InputError(f'fallback must be "next" or "mask", got {fallback!r}')
        base = vocab_list(base_vocab, "base_vocab")
        pairs: list[tuple[str, str]] | None = None
        if vocab_map is not None:
            mapping = vocab_map.to_dict() if hasattr(vocab_map, "to_dict") else vocab_map
            if not isinstance(mapping, Mapping):
                raise InputTypeError(
                    f"vocab_map must be a dict or a VocabMap, got {type(vocab_map).__name__}"
                )
            pairs = list(mapping.items())
            base_strings = set(base)
            for k, v in pairs:
                if not isinstance(k, str) or not isinstance(v, str):
                    raise InputTypeError(
                        f"vocab_map must map str to str, got {k!r} -> {v!r} "
                        f"({type(k).__name__} -> {type(v).__name__})"
                    )
                if v not in base_strings:
                    raise InputError(
                        f"vocab_map maps {k!r} to {v!r}, which is not a base vocabulary token"
                    )
                check_text(k, "a vocab_map key")
        self._has_map = pairs is not None
        self._native = _native.Aligner(
            base,
            vocab_list(blend_vocab, "blend_vocab"),
            base_marker,
            blend_marker,
            pairs,
            compat == "fusellm",
            "current" if compat == "fusellm" else fallback,
        )
        self.base_marker = base_marker
        self.blend_marker = blend_marker
        self.compat = compat
        self.fallback: str = self._native.fallback

    @property
    def base_vocab_size(self) -> int:
        return self._native.base_vocab_size

    @property
    def blend_vocab_size(self) -> int:
        return self._native.blend_vocab_size

    def targets(self, vocab: VocabMode = "hard") -> npt.NDArray[np.int32]:
        """The base id each blend id's top-K entry maps to (``-1``: dropped) in ``vocab`` mode."""
        self._check_vocab_mode(vocab)
        return self._native.targets(vocab)

    def _check_vocab_mode(self, vocab: str) -> None:
        if vocab == "soft" and not self._has_map:
            raise InputError(
                'vocab="soft" maps tokens through a vocabulary map, and this Aligner has none: '
                'pass vocab_map= (a fusellm.VocabMap or a dict), or use vocab="hard"'
            )

    def align_batch(
        self,
        base_ids: Sequence[Any],
        blend_ids: Sequence[Any],
        blend_topk_ids: Sequence[Any],
        blend_topk_logits: Sequence[Any],
        *,
        method: Method = "mined",
        vocab: VocabMode = "hard",
        base_offsets: Sequence[Any] | None = None,
        blend_offsets: Sequence[Any] | None = None,
        num_threads: int | None = None,
    ) -> list[AlignedRow]:
        """Aligns a batch of sequence pairs; one :class:`AlignedRow` per pair, in order.

        Args:
            base_ids: per sequence, the base token ids (1-D integer array).
            blend_ids: per sequence, the blend token ids of the same text.
            blend_topk_ids: per sequence, ``[len(blend_ids[i]), K]`` top-K ids of the blend model.
            blend_topk_logits: per sequence, the matching ``[len(blend_ids[i]), K]`` logits
                (any float dtype; NaN is an error). Rows are read in descending logit order.
            method: ``"mined"`` (reference MinED DTW) or ``"offsets"`` (shared end offsets).
            vocab: ``"hard"`` (exact strings) or ``"soft"`` (through ``vocab_map``).
            base_offsets: per sequence, ``[L_base, 2]`` character spans (``"offsets"`` only).
            blend_offsets: per sequence, ``[L_blend, 2]`` character spans of the same text.
            num_threads: worker threads (default: ``FUSELLM_NUM_THREADS`` or all cores). The
                result does not depend on it. The interpreter is released during the work.
        """
        num_threads = check_num_threads(num_threads)
        self._check_vocab_mode(vocab)
        b_ids = _arrays(base_ids, "base_ids", lambda x, n: _as_int32(x, n, 1), _I32, 1)
        x_ids = _arrays(blend_ids, "blend_ids", lambda x, n: _as_int32(x, n, 1), _I32, 1)
        t_ids = _arrays(blend_topk_ids, "blend_topk_ids", lambda x, n: _as_int32(x, n, 2), _I32, 2)
        t_logits = _arrays(blend_topk_logits, "blend_topk_logits", _as_float32, _F32, 2)
        b_off = (
            None
            if base_offsets is None
            else _arrays(base_offsets, "base_offsets", _as_offsets, _I64, 2, width=2)
        )
        x_off = (
            None
            if blend_offsets is None
            else _arrays(blend_offsets, "blend_offsets", _as_offsets, _I64, 2, width=2)
        )
        raw = self._native.align_batch(
            b_ids, x_ids, t_ids, t_logits, b_off, x_off, method, vocab, num_threads
        )
        return [AlignedRow(*r) for r in raw]

    def align_flat(
        self,
        base_ids: Any,
        base_rows: Any,
        blend_ids: Any,
        blend_rows: Any,
        blend_topk_ids: Any,
        blend_topk_logits: Any,
        *,
        method: Method = "mined",
        vocab: VocabMode = "hard",
        base_offsets: Any = None,
        blend_offsets: Any = None,
        num_threads: int | None = None,
        logits_dtype: Literal["float32", "float16"] = "float32",
    ) -> AlignedBatch:
        """:meth:`align_batch` on a batch in flat buffers, as an Arrow list column holds it: the
        values of every sequence one after the other, and row offsets (``n + 1``, from 0) where
        sequence ``r`` is ``values[rows[r]:rows[r + 1]]``. One call per batch, no per-sequence
        arrays; the rows come back flat too (:class:`AlignedBatch`, indexed by ``base_rows``).

        Args:
            base_ids: ``[N_base]`` base token ids of every sequence; ``base_rows`` their offsets.
            blend_ids: ``[N_blend]`` blend token ids; ``blend_rows`` their offsets.
            blend_topk_ids: ``[N_blend, K]`` top-K ids; ``blend_topk_logits`` the matching logits.
            base_offsets: ``[N_base, 2]`` character spans (``"offsets"`` only);
                ``blend_offsets`` the same for the blend side.
            method, vocab, num_threads: as for :meth:`align_batch`. Errors name the failing
                sequence (``sequence r``).
            logits_dtype: the dtype of the returned logits. ``"float16"`` rounds the merged
                logits to nearest; one that overflows float16 is an :class:`InputError`.
                ``float16`` top-K logits are read as they are (no copy), others as float32.
        """
        num_threads = check_num_threads(num_threads)
        self._check_vocab_mode(vocab)
        raw = self._native.align_flat(
            _as_int32(base_ids, "base_ids", 1),
            _as_rows(base_rows, "base_rows"),
            _as_int32(blend_ids, "blend_ids", 1),
            _as_rows(blend_rows, "blend_rows"),
            _as_int32(blend_topk_ids, "blend_topk_ids", 2),
            _as_row_values(blend_topk_logits, "blend_topk_logits"),
            None if base_offsets is None else _as_offsets(base_offsets, "base_offsets"),
            None if blend_offsets is None else _as_offsets(blend_offsets, "blend_offsets"),
            method,
            vocab,
            num_threads,
            logits_dtype,
        )
        return AlignedBatch(*raw)


def align_batch(
    aligner: Aligner,
    base_ids: Sequence[Any],
    blend_ids: Sequence[Any],
    blend_topk_ids: Sequence[Any],
    blend_topk_logits: Sequence[Any],
    **kwargs: Any,
) -> list[AlignedRow]:
    """Function form of :meth:`Aligner.align_batch`."""
    if not isinstance(aligner, Aligner):
        raise InputTypeError(f"aligner must be a fusellm.Aligner, got {type(aligner).__name__}")
    return aligner.align_batch(base_ids, blend_ids, blend_topk_ids, blend_topk_logits, **kwargs)


def mined_base_to_blend(
    base_tokens: Sequence[str],
    blend_tokens: Sequence[str],
    *,
    base_marker: str,
    blend_marker: str,
) -> list[list[int]]:
    """MinED alignment of two token-string sequences (reference semantics, spec section 4).

    Returns ``base_to_blend``: for every base position, the ascending blend positions paired with
    it. Both sequences must be non-empty.
    """
    for name, toks in (("base_tokens", base_tokens), ("blend_tokens", blend_tokens)):
        if isinstance(toks, str) or not all(isinstance(t, str) for t in toks):
            raise InputTypeError(f"{name} must be a sequence of token strings")
        for i, t in enumerate(toks):
            if not t.isascii():
                check_text(t, f"{name}[{i}]")
    return _native.mined_base_to_blend(
        list(base_tokens),
        list(blend_tokens),
        check_text(base_marker, "base_marker"),
        check_text(blend_marker, "blend_marker"),
    )
