"""Packing (spec section 2, stage 4): ``fusellm.pack`` against pure-Python oracles.

- ``mode="concat"``: every token appears exactly once and in order, every per-token column is
  cut identically, the remainder block is kept, no block exceeds ``block_size``;
- ``mode="bfd"``: rows are never split, no block exceeds ``block_size``, positions restart at
  every document, never more blocks than first fit;
- scores: token-weighted block means equal to a pure-Python oracle, bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fusellm
from fusellm import InputError, InputTypeError, PackedBlocks, pack

# --- pure-Python oracles -----------------------------------------------------------------------


def oracle_concat(lengths: list[int], block_size: int) -> list[list[tuple[int, int, int]]]:
    """The reference: concatenate the rows, cut every ``block_size`` tokens, keep the rest.
    Returns each block as (row, start in row, length) pieces."""
    flat = [(r, i) for r, n in enumerate(lengths) for i in range(n)]
    blocks = []
    for lo in range(0, len(flat), block_size):
        pieces: list[tuple[int, int, int]] = []
        for r, i in flat[lo : lo + block_size]:
            if pieces and pieces[-1][0] == r:
                pieces[-1] = (r, pieces[-1][1], pieces[-1][2] + 1)
            else:
                pieces.append((r, i, 1))
        blocks.append(pieces)
    return blocks


def oracle_means(
    blocks: list[list[tuple[int, int, int]]], scores: list[float], omit_nan: bool = False
) -> list[float]:
    out = []
    for pieces in blocks:
        num, den = 0.0, 0.0
        for r, _, n in pieces:
            s = scores[r]
            if omit_nan and s != s:
                continue
            num += float(n) * s
            den += float(n)
        out.append(num / den if den else float("nan"))
    return out


def first_fit(lengths: list[int], block_size: int) -> int:
    room: list[int] = []
    for n in lengths:
        if n == 0:
            continue
        for b, left in enumerate(room):
            if left >= n:
                room[b] -= n
                break
        else:
            room.append(block_size - n)
    return len(room)


def blocks_of(p: PackedBlocks) -> list[list[tuple[int, int, int]]]:
    segs = list(
        zip(
            p.segment_rows.tolist(),
            p.segment_starts.tolist(),
            p.segment_lengths.tolist(),
            strict=True,
        )
    )
    o = p.segment_offsets.tolist()
    return [segs[o[b] : o[b + 1]] for b in range(p.num_blocks)]


def offsets_of(lengths: list[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)


lengths_st = st.lists(st.integers(0, 40), min_size=0, max_size=30)
block_st = st.integers(1, 48)


def columns_for(lengths: list[int], k: int, seed: int) -> dict[str, np.ndarray]:
    n = sum(lengths)
    rng = np.random.default_rng(seed)
    return {
        "input_ids": np.arange(n, dtype=np.int32),
        "topk_ids": rng.integers(-1, 1000, size=(n, k)).astype(np.int32),
        "topk_logits": rng.standard_normal((n, k)).astype(np.float16),
        "logprobs": rng.standard_normal((n, k)).astype(np.float32),
        "mask": rng.random(n) > 0.5,
        "wide": rng.standard_normal((n, 2, 3)),
        "complex": (rng.standard_normal(n) + 1j).astype(np.complex128),
    }


# --- concat (the reference) --------------------------------------------------------------------


@given(lengths=lengths_st, block_size=block_st, k=st.integers(0, 4), seed=st.integers(0, 9))
def test_concat_is_the_reference(lengths, block_size, k, seed) -> None:
    cols = columns_for(lengths, k, seed)
    rng = np.random.default_rng(seed)
    ce = rng.standard_normal(len(lengths)).tolist()
    ce_aligned = rng.random(len(lengths)).astype(np.float32)
    p = pack(
        cols,
        offsets_of(lengths),
        block_size=block_size,
        scores={"metric_ce": ce, "metric_ce_aligned_0": ce_aligned},
    )
    want = oracle_concat(lengths, block_size)
    assert blocks_of(p) == want
    # every token exactly once, in order; every column cut identically
    for name, col in cols.items():
        got = p.columns[name]
        assert got.dtype == col.dtype
        assert got.shape == col.shape
        np.testing.assert_array_equal(got, col)
    lens = p.block_lengths.tolist()
    assert all(0 < n <= block_size for n in lens)
    assert all(n == block_size for n in lens[:-1])  # only the remainder block is shorter
    assert sum(lens) == sum(lengths)
    # scores: bit-identical token-weighted means
    assert p.scores["metric_ce"].tolist() == oracle_means(want, ce)
    assert p.scores["metric_ce_aligned_0"].tolist() == oracle_means(
        want, ce_aligned.astype(np.float64).tolist()
    )
    assert p.position_ids is None


def test_concat_worked_example() -> None:
    ids = np.arange(10, dtype=np.int32)
    p = pack({"input_ids": ids}, [0, 3, 3, 8, 10], block_size=4, scores={"ce": [1, 9, 2, 4]})
    assert p.block_offsets.tolist() == [0, 4, 8, 10]
    assert p.scores["ce"].tolist() == [(3 * 1 + 1 * 2) / 4, 2.0, 4.0]
    assert p.num_blocks == len(p) == 3
    b = p.block(1)
    assert b["input_ids"].tolist() == [4, 5, 6, 7]
    assert b["ce"] == 2.0
    assert p.block(-1)["input_ids"].tolist() == [8, 9]
    with pytest.raises(IndexError):
        p.block(3)


# --- best-fit decreasing -----------------------------------------------------------------------


@given(lengths=lengths_st, block_size=block_st, seed=st.integers(0, 9))
@settings(max_examples=max(10, settings.default.max_examples * 2))
def test_bfd_properties(lengths, block_size, seed) -> None:
    lengths = [min(n, block_size) for n in lengths]
    cols = columns_for(lengths, 2, seed)
    offsets = offsets_of(lengths)
    ce = np.random.default_rng(seed).standard_normal(len(lengths)).tolist()
    p = pack(cols, offsets, block_size=block_size, scores={"ce": ce}, mode="bfd")
    blocks = blocks_of(p)
    # whole rows, each non-empty row exactly once, rows in input order inside a block
    rows = [r for pieces in blocks for r, _, _ in pieces]
    assert sorted(rows) == [r for r, n in enumerate(lengths) if n > 0]
    for pieces in blocks:
        assert all(start == 0 and n == lengths[r] for r, start, n in pieces)
        assert [r for r, _, _ in pieces] == sorted(r for r, _, _ in pieces)
        assert sum(n for _, _, n in pieces) <= block_size
    assert [pieces[0][0] for pieces in blocks] == sorted(pieces[0][0] for pieces in blocks)
    assert p.num_blocks <= first_fit(lengths, block_size)
    # columns cut identically: each row's tokens land together, unchanged
    for name, col in cols.items():
        expect = [col[offsets[r] : offsets[r] + n] for pieces in blocks for r, _, n in pieces]
        got = p.columns[name]
        assert got.dtype == col.dtype
        if expect:
            np.testing.assert_array_equal(got, np.concatenate(expect))
        else:
            assert got.shape[0] == 0
    # positions restart at every document
    assert p.position_ids is not None
    assert p.position_ids.dtype == np.int32
    want_pos = [i for pieces in blocks for _, _, n in pieces for i in range(n)]
    assert p.position_ids.tolist() == want_pos
    assert p.scores["ce"].tolist() == oracle_means(blocks, ce)


def test_bfd_beats_first_fit_on_a_known_case() -> None:
    # first fit in row order needs 3 blocks of 7 here, best-fit decreasing 2
    lengths = [3, 5, 2, 4]
    p = pack({"x": np.arange(14)}, offsets_of(lengths), block_size=7, mode="bfd")
    assert first_fit(lengths, 7) == 3
    assert p.num_blocks == 2
    assert p.columns["x"].tolist() == [0, 1, 2, 10, 11, 12, 13, 3, 4, 5, 6, 7, 8, 9]
    assert p.position_ids is not None
    assert p.position_ids.tolist() == [0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 1]


def test_bfd_never_uses_more_blocks_than_first_fit() -> None:
    # best-fit decreasing alone needs 4 blocks here, first fit in row order 3: the plan keeps 3
    lengths = [5, 6, 3, 12, 5, 1, 6, 3]
    p = pack({"x": np.zeros(sum(lengths))}, offsets_of(lengths), block_size=14, mode="bfd")
    assert p.num_blocks == first_fit(lengths, 14) == 3


def test_bfd_refuses_rows_longer_than_a_block() -> None:
    with pytest.raises(InputError, match="row 1 has 9 tokens"):
        pack({"x": np.zeros(12)}, [0, 3, 12], block_size=8, mode="bfd")


# --- scores ------------------------------------------------------------------------------------


def test_nan_scores() -> None:
    off = [0, 2, 4, 6]
    ce = [float("nan"), 3.0, 5.0]
    p = pack({"x": np.zeros(6)}, off, block_size=4, scores={"ce": ce})
    assert np.isnan(p.scores["ce"][0])
    assert p.scores["ce"][1] == 5.0
    p = pack({"x": np.zeros(6)}, off, block_size=4, scores={"ce": ce}, nan_scores="omit")
    assert p.scores["ce"].tolist() == [3.0, 5.0]
    p = pack({"x": np.zeros(2)}, [0, 2], block_size=4, scores={"ce": [np.nan]}, nan_scores="omit")
    assert np.isnan(p.scores["ce"][0])


# --- edge cases and bad input ------------------------------------------------------------------


def test_edge_cases() -> None:
    p = pack({"x": np.zeros(0, dtype=np.int32)}, [0], block_size=4, scores={"ce": []})
    assert p.num_blocks == 0
    assert p.columns["x"].shape == (0,)
    assert p.scores["ce"].shape == (0,)
    p = pack({"x": np.zeros((0, 3), dtype=np.float32)}, [0, 0, 0], block_size=4, mode="bfd")
    assert p.num_blocks == 0
    assert p.columns["x"].shape == (0, 3)
    with pytest.raises(InputError, match="columns is empty"):  # nothing to check offsets against
        pack({}, [0, 5, 7], block_size=4)
    # non-contiguous and big-endian input
    a = np.arange(20, dtype=">i4").reshape(10, 2)[:, ::-1]
    p = pack({"a": a}, [0, 4, 10], block_size=3)
    np.testing.assert_array_equal(p.columns["a"], a)
    assert p.columns["a"].dtype == a.dtype
    p = pack({"a": [[1, 2], [3, 4]]}, np.array([0, 2], dtype=np.uint8), block_size=1)
    assert p.columns["a"].tolist() == [[1, 2], [3, 4]]


def test_sizes_are_checked_against_the_data_before_any_allocation() -> None:
    # Each of these once planned first: 2.5e10 blocks (OOM), 4 TB of position ids (abort).
    with pytest.raises(InputError, match="offsets"):
        pack({"x": np.arange(10)}, [0, 3, 10**11], block_size=4)
    with pytest.raises(InputError, match="columns is empty"):
        pack({}, [0, 10**12], block_size=10**12, mode="bfd")
    with pytest.raises(InputError, match="block_size"):
        pack({"x": np.arange(10)}, [0, 10], block_size=2**64)
    with pytest.raises(InputError, match=r"\[0, 10\)|10 tokens|offsets\[-1\]"):
        pack({"x": np.arange(10)}, [0, 10**12], block_size=10**12, mode="bfd")


def test_bad_input() -> None:
    x = {"x": np.zeros(5)}
    with pytest.raises(InputError, match="start at 0"):
        pack(x, [1, 5], block_size=4)
    with pytest.raises(InputError, match="non-decreasing"):
        pack(x, [0, 3, 2, 5], block_size=4)
    with pytest.raises(InputError, match="at least"):
        pack(x, [], block_size=4)
    with pytest.raises(InputTypeError, match="1-D"):
        pack(x, [[0, 5]], block_size=4)
    with pytest.raises(InputTypeError, match="integers"):
        pack(x, [0.0, 5.0], block_size=4)
    with pytest.raises(InputError, match="has 5 tokens but offsets"):
        pack(x, [0, 4], block_size=4)
    with pytest.raises(InputTypeError, match="numeric"):
        pack({"s": np.array(["a"] * 5)}, [0, 5], block_size=4)
    with pytest.raises(InputTypeError, match="token dimension"):
        pack({"s": np.float32(1)}, [0, 5], block_size=4)
    for bad in (0, -3):
        with pytest.raises(InputError, match="block_size"):
            pack(x, [0, 5], block_size=bad)
    for bad_type in (True, 2.0, "4"):
        with pytest.raises(InputTypeError, match="block_size"):
            pack(x, [0, 5], block_size=bad_type)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="mode"):
        pack(x, [0, 5], block_size=4, mode="ffd")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="nan_scores"):
        pack(x, [0, 5], block_size=4, nan_scores="drop")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="2 values for 1 rows"):
        pack(x, [0, 5], block_size=4, scores={"ce": [1.0, 2.0]})
    with pytest.raises(InputTypeError, match="1-D"):
        pack(x, [0, 5], block_size=4, scores={"ce": [[1.0]]})
    with pytest.raises(InputTypeError, match="numeric"):
        pack(x, [0, 5], block_size=4, scores={"ce": ["a"]})
    with pytest.raises(InputTypeError, match="dict"):
        pack([np.zeros(5)], [0, 5], block_size=4)  # type: ignore[arg-type]
    assert issubclass(InputError, fusellm.FuseLLMError)
