"""Pure-Python oracles of the alignment core, written from the spec (sections 3, 4, 6, 8).

Nothing here is fast or clever on purpose: every function is the most direct reading of the spec,
so that the Rust kernels (bit-parallel Levenshtein, pruned DTW, two-pointer offset matching,
per-vocabulary look-up tables) can be checked against it.

Stable public names (a benchmark imports them with ``tests/`` on ``sys.path``):

- :func:`levenshtein`: edit distance over Unicode code points;
- :func:`mined_base_to_blend`: the MinED DTW of spec section 4 (full matrix, ties diag > up > left);
- :func:`match_ends`: the offsets pairing (-1 where a base position is not paired);
- :func:`align_row`: one sequence re-expressed on the base side (spec section 6, fusellm defaults);
- :func:`compare_rows`: asserts that a ``fusellm.AlignedRow`` equals an :func:`align_row` result.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "EMPTY",
    "FALLBACK",
    "MASKED",
    "MATCHED",
    "NO_MATCH",
    "align_row",
    "compare_rows",
    "levenshtein",
    "lowest_ids",
    "match_ends",
    "mined_base_to_blend",
]

MATCHED = 0
EMPTY = 1
FALLBACK = 2
MASKED = 3

#: :func:`match_ends` value of a base position without a blend partner.
NO_MATCH = -1

#: Tolerance on merged (logsumexp) logits; everything else is compared exactly.
MERGE_TOL = 1e-6


def levenshtein(a: str, b: str) -> int:
    """Levenshtein distance over code points (Python ``str`` indexes code points)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def mined_base_to_blend(
    base_tokens: Sequence[str],
    blend_tokens: Sequence[str],
    base_marker: str,
    blend_marker: str,
) -> list[list[int]]:
    """Spec section 4, literally: blend = series x (rows i), base = series y (columns j).

    Costs are Levenshtein distances between the tokens with EVERY occurrence of their own marker
    removed, memoised per distinct pair of stripped strings. Returns ``base_to_blend``.
    """
    x = [t.replace(blend_marker, "") for t in blend_tokens]
    y = [t.replace(base_marker, "") for t in base_tokens]
    n, m = len(x), len(y)
    if n == 0 or m == 0:
        raise ValueError("MinED needs two non-empty sequences")
    memo: dict[tuple[str, str], int] = {}

    def cost(i: int, j: int) -> int:
        key = (x[i], y[j])
        c = memo.get(key)
        if c is None:
            c = memo[key] = levenshtein(*key)
        return c

    inf = math.inf

    def d(i: int, j: int) -> float:
        # D[-1][-1] = 0, D[-1][j] = D[i][-1] = +inf otherwise
        if i == -1 and j == -1:
            return 0
        if i < 0 or j < 0:
            return inf
        return table[i][j]

    table: list[list[float]] = [[inf] * m for _ in range(n)]
    for i in range(n):
        for j in range(m):
            table[i][j] = cost(i, j) + min(d(i - 1, j), d(i, j - 1), d(i - 1, j - 1))

    def neighbour(i: int, j: int) -> float:
        # an out-of-range neighbour counts +inf during the backtrack
        return table[i][j] if i >= 0 and j >= 0 else inf

    pairs = []
    i, j = n - 1, m - 1
    while i > 0 or j > 0:
        pairs.append((i, j))
        diag = neighbour(i - 1, j - 1)
        up = neighbour(i - 1, j)
        left = neighbour(i, j - 1)
        best = min(diag, up, left)
        if diag == best:
            i, j = i - 1, j - 1
        elif up == best:
            i -= 1
        else:
            j -= 1
    pairs.append((0, 0))
    out: list[list[int]] = [[] for _ in range(m)]
    for bi, bj in pairs:
        out[bj].append(bi)
    return [sorted(v) for v in out]


def match_ends(base_offsets: Any, blend_offsets: Any) -> list[int]:
    """Offsets pairing: base position ``i`` is paired iff it is the last base token with its end
    offset, with the last blend token that has the same end; :data:`NO_MATCH` otherwise."""
    base_end = [int(e) for _, e in np.asarray(base_offsets).reshape(-1, 2)]
    blend_end = [int(e) for _, e in np.asarray(blend_offsets).reshape(-1, 2)]
    last_base = {e: i for i, e in enumerate(base_end)}
    last_blend = {e: j for j, e in enumerate(blend_end)}
    return [
        last_blend.get(e, NO_MATCH) if last_base[e] == i else NO_MATCH
        for i, e in enumerate(base_end)
    ]


def lowest_ids(vocab: Sequence[str | None]) -> dict[str, int]:
    """String -> lowest id having it (build once per vocabulary and pass it to align_row)."""
    out: dict[str, int] = {}
    for i, s in enumerate(vocab):
        if s is not None and s not in out:
            out[s] = i
    return out


def align_row(
    base_vocab: Sequence[str | None],
    blend_vocab: Sequence[str | None],
    base_ids: Any,
    blend_ids: Any,
    topk_ids: Any,
    topk_logits: Any,
    *,
    base_marker: str,
    blend_marker: str,
    vocab_map: Mapping[str, str] | None = None,
    compat: str | None = None,
    fallback: str = "next",
    method: str = "mined",
    vocab: str = "hard",
    base_offsets: Any = None,
    blend_offsets: Any = None,
    base_index: Mapping[str, int] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int, int]:
    """One sequence on the base side: ``(ids, logits, status, num_unknown, num_unmapped,
    num_duplicates)``.

    ``base_index`` (from :func:`lowest_ids`) avoids rebuilding the string index of a large base
    vocabulary on every call.
    """
    if compat not in (None, "fusellm"):
        raise ValueError(f"compat {compat!r}")
    if compat == "fusellm" and method == "offsets":
        raise ValueError('compat="fusellm" works with method="mined" only')
    if base_index is None:
        base_index = lowest_ids(base_vocab)
    vmap: Mapping[str, str] = vocab_map if vocab_map is not None else {}
    base_ids = [int(v) for v in np.asarray(base_ids).reshape(-1)]
    blend_ids = [int(v) for v in np.asarray(blend_ids).reshape(-1)]
    topk_ids = np.asarray(topk_ids)
    topk_logits = np.asarray(topk_logits, dtype=np.float32)
    n_base, k = len(base_ids), topk_ids.shape[1]

    def swap(s: str) -> str:
        return s.replace(blend_marker, base_marker)

    # 1. pairing: for each base position, the blend position whose distribution it takes
    paired: list[int | None] = []
    if method == "mined":
        base_strings = [base_vocab[i] for i in base_ids]
        blend_strings = [blend_vocab[j] for j in blend_ids]
        assert all(s is not None for s in base_strings + blend_strings)
        b2x = mined_base_to_blend(base_strings, blend_strings, base_marker, blend_marker)  # type: ignore[arg-type]
        for i, group in enumerate(b2x):
            if len(group) != 1:
                paired.append(None)
                continue
            j = group[0]
            b = base_strings[i]
            t = swap(blend_strings[j])  # type: ignore[arg-type]
            if (
                blend_marker == "Ġ"
                and i == 0
                and b.startswith(base_marker)  # type: ignore[union-attr]
                and not t.startswith(base_marker)
            ):
                t = base_marker + t
            ok = b == t or (vocab == "soft" and t in vmap and vmap[t] == b)
            paired.append(j if ok else None)
    elif method == "offsets":
        paired = [None if j == NO_MATCH else j for j in match_ends(base_offsets, blend_offsets)]
    else:
        raise ValueError(f"method {method!r}")

    # 2. rows
    ids = np.full((n_base, k), -1, dtype=np.int32)
    logits = np.full((n_base, k), -np.inf, dtype=np.float32)
    status = np.full(n_base, MASKED, dtype=np.uint8)
    unknown = unmapped = duplicates = 0
    for i in range(n_base):
        j = paired[i]
        if j is None:
            if compat == "fusellm":
                target: int | None = base_ids[i]
            elif fallback == "next":
                target = base_ids[i + 1] if i + 1 < n_base else None
            elif fallback == "mask":
                target = None
            else:
                raise ValueError(f"fallback {fallback!r}")
            if target is not None:
                ids[i, 0] = target
                logits[i, 0] = 1.0 if compat == "fusellm" else 0.0  # probability 1
                status[i] = FALLBACK
            continue
        # stable order by descending logit (equal logits keep their column order)
        order = sorted(range(k), key=lambda r: -float(topk_logits[j, r]))
        row: list[list[Any]] = []
        merged = False
        for r in order:
            blend_id = int(topk_ids[j, r])
            value = np.float32(topk_logits[j, r])
            if blend_id >= len(blend_vocab) or blend_vocab[blend_id] is None:
                unknown += 1
                continue
            s = swap(blend_vocab[blend_id])  # type: ignore[arg-type]
            if vocab == "soft" and s in vmap:
                s = vmap[s]
            base_id = base_index.get(s)
            if base_id is None:
                unmapped += 1
                continue
            if value == -np.inf:  # padding: no probability, not counted
                continue
            for entry in row:
                if entry[0] == base_id:
                    duplicates += 1
                    if compat != "fusellm":
                        with np.errstate(all="ignore"):
                            entry[1] = np.float32(np.logaddexp(entry[1], value))
                        merged = True
                    break
            else:
                row.append([base_id, value])
        if merged:
            row.sort(key=lambda e: -float(e[1]))
        for c, (base_id, value) in enumerate(row):
            ids[i, c] = base_id
            logits[i, c] = value
        status[i] = MATCHED if row else EMPTY
    return ids, logits, status, unknown, unmapped, duplicates


def compare_rows(got: Any, want: tuple[Any, ...], *, where: str = "") -> None:
    """Asserts that ``got`` (a ``fusellm.AlignedRow``) equals ``want`` (from :func:`align_row`).

    Everything is exact except merged logits (``MERGE_TOL``); where a row holds merged values the
    order of entries whose logits are within the tolerance of each other is not checked.
    """
    w_ids, w_logits, w_status, w_unknown, w_unmapped, w_duplicates = want
    assert got.ids.dtype == np.int32, where
    assert got.logits.dtype == np.float32, where
    assert got.status.dtype == np.uint8, where
    assert got.ids.shape == w_ids.shape, (where, got.ids.shape, w_ids.shape)
    assert got.logits.shape == w_logits.shape, where
    np.testing.assert_array_equal(got.status, w_status, err_msg=f"status {where}")
    got_counts = (int(got.num_unknown), int(got.num_unmapped), int(got.num_duplicates))
    assert got_counts == (w_unknown, w_unmapped, w_duplicates), (
        where,
        got_counts,
        (w_unknown, w_unmapped, w_duplicates),
    )
    for i in range(w_ids.shape[0]):
        g_ids, g_log = got.ids[i], got.logits[i]
        e_ids, e_log = w_ids[i], w_logits[i]
        msg = (
            f"{where} position {i}: got {g_ids.tolist()} {g_log.tolist()}, "
            f"want {e_ids.tolist()} {e_log.tolist()}"
        )
        n = int((e_ids >= 0).sum())
        assert int((g_ids >= 0).sum()) == n, msg
        assert (g_ids[n:] == -1).all(), msg
        assert (g_log[n:] == -np.inf).all(), msg
        if np.array_equal(g_ids, e_ids) and np.array_equal(g_log, e_log):
            continue
        # only merged values may differ, and only by rounding
        assert sorted(g_ids[:n].tolist()) == sorted(e_ids[:n].tolist()), msg
        want_of = dict(zip(e_ids[:n].tolist(), e_log[:n].tolist(), strict=True))
        got_vals = np.array([want_of[x] for x in g_ids[:n].tolist()], dtype=np.float64)
        assert np.allclose(g_log[:n], got_vals, rtol=MERGE_TOL, atol=MERGE_TOL), msg
        assert not np.array_equal(g_log[:n], got_vals) or np.array_equal(g_ids, e_ids), msg
        # the row is sorted, and any reordering is between entries the tolerance cannot separate
        assert (np.diff(g_log[:n].astype(np.float64)) <= 0).all(), msg
        assert (np.diff(got_vals) <= 2 * MERGE_TOL * (1 + np.abs(got_vals[1:]))).all(), msg
