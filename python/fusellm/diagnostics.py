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

:class:`TeacherStats` accumulates these batch by batch (the align stage feeds it every shard) and
writes them into ``align_stats.json`` under ``"teachers"``; :func:`next_token_scores` is the
per-position computation, shared by the accumulator and by token-level candidate selection.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import FuseLLMError

__all__ = ["ALL", "RefScores", "TeacherStats", "next_token_scores", "next_tokens"]

#: The pooled "domain".
ALL = "all"


def next_tokens(ids: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """``int64 [N]``: the token after each position of the rows ``ids[offsets[r]:offsets[r+1]]``,
    ``-1`` at the last position of a row."""
    nxt = np.full(ids.shape[0], -1, dtype=np.int64)
    if ids.shape[0] > 1:
        nxt[:-1] = ids[1:]
    ends = np.asarray(offsets[1:], dtype=np.int64) - 1
    nxt[ends[ends >= 0]] = -1
    return nxt


def next_token_scores(
    ids: np.ndarray, values: np.ndarray, nxt: np.ndarray, vocab_size: int, logprobs: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Per position: ``(top1, coverage, ce)`` of the rows ``ids``/``values`` ``[N, K]`` against
    the next tokens ``nxt`` ``[N]`` (see the module docstring; ``ce`` is None for raw logits).
    Computed by the Rust core (``fusellm_core::scores``) in float64, without the interpreter."""
    from ._native import next_token_scores as native

    return native(
        np.ascontiguousarray(ids, dtype=np.int32),
        np.ascontiguousarray(values, dtype=np.float32),
        np.ascontiguousarray(nxt, dtype=np.int64),
        int(vocab_size),
        bool(logprobs),
    )


@dataclass(frozen=True)
class RefScores:
    """The ref rows' scores (:func:`next_token_scores`) at every position of a batch; ``use``:
    the positions that have a next token (the others' scores are meaningless)."""

    use: np.ndarray
    top1: np.ndarray
    coverage: np.ndarray
    ce: np.ndarray | None


class TeacherStats:
    """Accumulates the next-token scores of every candidate, per domain (module docstring)."""

    def __init__(self, vocab_size: int, logprobs: bool) -> None:
        self.vocab_size = int(vocab_size)
        self.logprobs = bool(logprobs)
        self._sums: dict[str, dict[str, dict[str, float]]] = {}
        self._mass: dict[str, dict[str, float]] = {}

    def _add(
        self,
        name: str,
        where: np.ndarray,
        domains: np.ndarray,
        names: Sequence[str],
        cols: dict[str, Any],
    ) -> None:
        """Adds per-position columns (``None`` ones skipped), at the positions ``where``, into
        ``name``'s per-domain sums (``domains``: each position's index into ``names``)."""
        per = self._sums.setdefault(name, {})
        for key, col in cols.items():
            if col is None:
                continue
            w = np.where(where, col, 0.0)
            by = np.bincount(domains, weights=w, minlength=len(names)) if names else ()
            for dom, v in [(ALL, np.sum(w)), *zip(names, by, strict=True)]:
                acc = per.setdefault(dom, {})
                acc[key] = acc.get(key, 0.0) + float(v)

    def add_ref(
        self,
        ids: np.ndarray,
        values: np.ndarray,
        nxt: np.ndarray,
        domains: np.ndarray,
        names: Sequence[str],
    ) -> RefScores:
        """The target's own rows, on every position with a next token. Returns their scores per
        position, which :meth:`add_source` reads at each source's matched positions (each score
        depends on its row alone, so they are computed once for all sources)."""
        use = nxt >= 0
        t, c, ce = next_token_scores(ids, values, nxt, self.vocab_size, self.logprobs)
        cols = {"n": use, "top1": t, "coverage": c, "ce": ce}  # n: 1 where counted
        self._add("ref", use, domains, names, cols)
        return RefScores(use, t, c, ce)

    def add_source(
        self,
        name: str,
        ids: np.ndarray,
        values: np.ndarray,
        matched: np.ndarray,
        ref: RefScores,
        nxt: np.ndarray,
        domains: np.ndarray,
        names: Sequence[str],
    ) -> None:
        """A source's aligned rows on its matched positions, and the ref rows (``ref``: what
        :meth:`add_ref` returned for the same positions) beside them."""
        has_next = nxt >= 0
        if not np.array_equal(has_next, ref.use):
            raise FuseLLMError(f"{name}: the ref scores given are those of other positions")
        # Every row is scored where it is (no copies of the [N, K] rows); the sums take the
        # positions that count.
        t, c, ce = next_token_scores(ids, values, nxt, self.vocab_size, self.logprobs)
        cols = {"n": matched, "with_next": has_next}
        self._add(name, has_next, domains, names, cols)
        cols = {"top1": t, "coverage": c, "ce": ce, "ref_top1": ref.top1}
        cols.update(ref_coverage=ref.coverage, ref_ce=ref.ce)
        self._add(name, has_next & matched, domains, names, cols)

    def add_source_mass(self, name: str, topk_values: np.ndarray, kept: np.ndarray) -> None:
        """A source's own top-K rows (log-probabilities) and which entries the alignment keeps
        (the id maps to a target token): the mass it holds and the mass sent to the tail."""
        if not self.logprobs:
            return
        from ._native import topk_mass

        values = np.ascontiguousarray(topk_values, dtype=np.float32)
        total, dropped = topk_mass(values, np.ascontiguousarray(kept, dtype=np.bool_))
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
