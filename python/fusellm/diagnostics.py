"""Teacher diagnostics: how well each candidate's rows predict the target's next token.

A row at target position ``t`` is a teacher's distribution over the token at ``t + 1``. Scored
against the token that really follows (``y``), per candidate and per domain:

- ``top1``: the row's first (highest) entry is ``y``;
- ``coverage``: ``y`` is among the row's ids;
- ``ce`` (rows of log-probabilities only): the cross-entropy of ``y`` under the row, in nats.
  Where ``y`` is in the row its probability is the entry's; where it is not, the row's tail
  ``1 - Σ p`` is taken as spread evenly over the ``V - n`` ids the row does not list (``V`` the
  target's vocabulary, ``n`` the row's entries). Rows of raw logits do not know their tail, so
  they get no ``ce``.

A source is scored on the positions where its row holds its own distribution (status MATCHED:
fallback rows are the true next token by construction, and empty rows are replaced by the
target's in training); the target's own rows (``ref``) on the same positions are scored beside
it (``ref_top1``, ``ref_coverage``, ``ref_ce``), so the two are compared on equal ground. ``ref``
alone is scored on every position that has a next token. ``all`` pools the domains.

:class:`TeacherStats` accumulates these shard by shard (the align stage feeds it every shard) and
writes them into ``align_stats.json`` under ``"teachers"``. The scores and their per-domain sums
are computed by the Rust core (``fusellm_core::scores``) in float64, in one pass over a shard's
positions, without the interpreter, from the rows as they are stored (float16 or float32).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["ALL", "TeacherStats", "next_tokens"]

#: The pooled "domain".
ALL = "all"

#: The sums the Rust core returns per candidate and domain, in its order.
_SLOTS = ("n", "with_next", "top1", "coverage", "ce", "ref_top1", "ref_coverage", "ref_ce")
#: The ones the target's own rows have (a source has all of them); ``ce`` ones only for
#: log-probabilities.
_REF_KEYS = ("n", "top1", "coverage", "ce")


def next_tokens(ids: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """``int64 [N]``: the token after each position of the rows ``ids[offsets[r]:offsets[r+1]]``,
    ``-1`` at the last position of a row."""
    nxt = np.full(ids.shape[0], -1, dtype=np.int64)
    if ids.shape[0] > 1:
        nxt[:-1] = ids[1:]
    ends = np.asarray(offsets[1:], dtype=np.int64) - 1
    nxt[ends[ends >= 0]] = -1
    return nxt


def _rows(ids: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[N, K]`` rows as the kernel takes them: int32 ids, float16 or float32 values."""
    if values.dtype != np.float16:
        values = np.ascontiguousarray(values, dtype=np.float32)
    return np.ascontiguousarray(ids, dtype=np.int32), np.ascontiguousarray(values)


class TeacherStats:
    """Accumulates the next-token scores of every candidate, per domain (module docstring)."""

    def __init__(self, vocab_size: int, logprobs: bool) -> None:
        self.vocab_size = int(vocab_size)
        self.logprobs = bool(logprobs)
        self._sums: dict[str, dict[str, dict[str, float]]] = {}
        self._mass: dict[str, dict[str, float]] = {}

    def _fold(
        self, name: str, keys: Sequence[str], slots: Sequence[Sequence[float]], names: Sequence[str]
    ) -> None:
        """Adds one shard's sums of ``name`` (``slots``: the pool, then each of ``names``)."""
        per = self._sums.setdefault(name, {})
        kept = [(k, _SLOTS.index(k)) for k in keys if self.logprobs or k not in ("ce", "ref_ce")]
        for dom, slot in zip([ALL, *names], slots, strict=True):
            acc = per.setdefault(dom, {})
            for key, i in kept:
                acc[key] = acc.get(key, 0.0) + slot[i]

    def add_shard(
        self,
        nxt: np.ndarray,
        domains: np.ndarray,
        names: Sequence[str],
        ref: tuple[np.ndarray, np.ndarray],
        sources: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    ) -> None:
        """One shard: the target's own rows ``ref`` (``(ids, values)``, ``[N, K]``) and each
        source's aligned rows ``(ids, values, status)`` against the next tokens ``nxt`` (``[N]``,
        ``-1``: none); ``domains``: each position's index into ``names`` (``-1``: none)."""
        from ._native import teacher_sums

        ref_slots, source_slots = teacher_sums(
            np.ascontiguousarray(nxt, dtype=np.int64),
            np.ascontiguousarray(domains, dtype=np.int64),
            len(names),
            self.vocab_size,
            self.logprobs,
            *_rows(*ref),
            [
                (*_rows(i, v), np.ascontiguousarray(st, dtype=np.uint8))
                for i, v, st in sources.values()
            ],
        )
        self._fold("ref", _REF_KEYS, ref_slots, names)
        for name, slots in zip(sources, source_slots, strict=True):
            self._fold(name, _SLOTS, slots, names)

    def add_source_mass(
        self, name: str, topk_values: np.ndarray, topk_ids: np.ndarray, known: np.ndarray
    ) -> None:
        """A source's own top-K rows (log-probabilities and ids, ``[R, K]``) and which of its ids
        the alignment keeps (``known[id]``: the id maps to a target token; ids outside it do
        not): the mass the rows hold and the mass sent to the tail."""
        if not self.logprobs:
            return
        from ._native import topk_mass

        ids, values = _rows(topk_ids, topk_values)
        total, dropped = topk_mass(values, ids, np.ascontiguousarray(known, dtype=np.bool_))
        acc = self._mass.setdefault(name, {"rows": 0.0, "topk_mass": 0.0, "dropped_mass": 0.0})
        acc["rows"] += values.shape[0]
        acc["topk_mass"] += total
        acc["dropped_mass"] += dropped

    def result(self) -> dict[str, Any]:
        """Means per candidate and domain (JSON-ready)."""
        out: dict[str, Any] = {}
        for name, per in self._sums.items():
            res: dict[str, Any] = {}
            for dom, acc in per.items():
                n = acc.get("n", 0.0)
                row: dict[str, Any] = {"positions": int(n)}
                if "with_next" in acc:
                    row["matched_share"] = n / acc["with_next"] if acc["with_next"] else None
                for key in ("top1", "coverage", "ce", "ref_top1", "ref_coverage", "ref_ce"):
                    if key in acc:
                        row[key] = acc[key] / n if n else None
                res[dom] = row
            if name in self._mass:
                m = self._mass[name]
                rows = m["rows"] or 1.0
                res[ALL]["topk_mass"] = m["topk_mass"] / rows
                res[ALL]["dropped_mass"] = m["dropped_mass"] / rows
            out[name] = res
        return {"vocab_size": self.vocab_size, "logprobs": self.logprobs, "candidates": out}
