"""``Aligner.align_batch`` against the pure-Python oracle (spec sections 6 and 8).

Random small vocabularies (None entries, duplicated strings, both markers), random top-K rows
(ids beyond the vocabulary, unsorted rows, duplicate targets, -inf logits), random vocabulary maps,
both policies, both vocabulary modes, both pairings; then the real tokenizers on real text.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import fusellm
from fusellm.samples import SAMPLE_TEXTS
from oracle import EMPTY, FALLBACK, MASKED, MATCHED, align_row, compare_rows, lowest_ids, match_ends
from oracle import mined_base_to_blend as oracle_mined

SPM, BBPE = "▁", "Ġ"
MARKER_PAIRS = [(SPM, BBPE), (BBPE, SPM), (SPM, SPM), (BBPE, BBPE)]
NEG_INF = -math.inf


def _examples(fraction: float) -> int:
    return max(5, int(settings.default.max_examples * fraction))


def test_status_codes_are_the_documented_ones() -> None:
    assert (fusellm.MATCHED, fusellm.EMPTY, fusellm.FALLBACK, fusellm.MASKED) == (0, 1, 2, 3)
    assert (MATCHED, EMPTY, FALLBACK, MASKED) == (0, 1, 2, 3)


# --- scenario model ----------------------------------------------------------------------------


@dataclass
class Seq:
    base_ids: list[int]
    blend_ids: list[int]
    topk_ids: np.ndarray  # [len(blend_ids), K]
    topk_logits: np.ndarray
    base_offsets: np.ndarray | None = None
    blend_offsets: np.ndarray | None = None


@dataclass
class Setup:
    base_vocab: list[str | None]
    blend_vocab: list[str | None]
    base_marker: str
    blend_marker: str
    vocab_map: dict[str, str] | None = None
    compat: str | None = None
    fallback: str = "next"
    base_index: dict[str, int] | None = None

    def aligner(self) -> fusellm.Aligner:
        return fusellm.Aligner(
            self.base_vocab,
            self.blend_vocab,
            base_marker=self.base_marker,
            blend_marker=self.blend_marker,
            vocab_map=self.vocab_map,
            compat=self.compat,  # type: ignore[arg-type]
            fallback=self.fallback,  # type: ignore[arg-type]
        )

    def oracle(self, s: Seq, *, method: str, vocab: str) -> tuple[Any, ...]:
        return align_row(
            self.base_vocab,
            self.blend_vocab,
            s.base_ids,
            s.blend_ids,
            s.topk_ids,
            s.topk_logits,
            base_marker=self.base_marker,
            blend_marker=self.blend_marker,
            vocab_map=self.vocab_map,
            compat=self.compat,
            fallback=self.fallback,
            method=method,
            vocab=vocab,
            base_offsets=s.base_offsets,
            blend_offsets=s.blend_offsets,
            base_index=self.base_index,
        )


def run(
    aligner: fusellm.Aligner,
    seqs: Sequence[Seq],
    *,
    method: str = "mined",
    vocab: str = "hard",
    num_threads: int | None = None,
) -> list[fusellm.AlignedRow]:
    offsets = method == "offsets"
    if vocab == "soft" and not aligner._has_map:
        # Soft mode needs a map; without one it would be the hard mode, which the oracle's soft
        # mode with an empty map is.
        with pytest.raises(fusellm.InputError, match="vocabulary map"):
            aligner.align_batch([], [], [], [], vocab="soft")
        vocab = "hard"
    return aligner.align_batch(
        [np.asarray(s.base_ids, dtype=np.int64) for s in seqs],
        [np.asarray(s.blend_ids, dtype=np.int64) for s in seqs],
        [s.topk_ids for s in seqs],
        [s.topk_logits for s in seqs],
        method=method,  # type: ignore[arg-type]
        vocab=vocab,  # type: ignore[arg-type]
        base_offsets=[s.base_offsets for s in seqs] if offsets else None,
        blend_offsets=[s.blend_offsets for s in seqs] if offsets else None,
        num_threads=num_threads,
    )


def check(
    setup: Setup,
    seqs: Sequence[Seq],
    *,
    method: str = "mined",
    vocab: str = "hard",
    threads: Sequence[int | None] = (1,),
) -> list[fusellm.AlignedRow]:
    """Rust == oracle for every sequence, and the same bits for every thread count."""
    aligner = setup.aligner()
    first = run(aligner, seqs, method=method, vocab=vocab, num_threads=threads[0])
    assert len(first) == len(seqs)
    for n, (got, s) in enumerate(zip(first, seqs, strict=True)):
        compare_rows(got, setup.oracle(s, method=method, vocab=vocab), where=f"sequence {n}")
    for t in threads[1:]:
        again = run(aligner, seqs, method=method, vocab=vocab, num_threads=t)
        for a, b in zip(first, again, strict=True):
            np.testing.assert_array_equal(a.ids, b.ids)
            np.testing.assert_array_equal(a.logits, b.logits)
            np.testing.assert_array_equal(a.status, b.status)
            assert (a.num_unknown, a.num_unmapped) == (b.num_unknown, b.num_unmapped)
    return first


# --- strategies --------------------------------------------------------------------------------

LOGITS = st.one_of(
    st.sampled_from([NEG_INF, -2.5, -1.0, 0.0, 0.5, 1.0, 2.0, 3.0]),
    st.floats(-30, 30, width=32),
)


@st.composite
def setups(draw: st.DrawFn, *, method: str = "mined") -> Setup:
    base_marker, blend_marker = draw(st.sampled_from(MARKER_PAIRS))
    piece = st.one_of(
        st.text(alphabet="ab" + SPM + BBPE + "é", max_size=3),
        st.sampled_from(["<0xE5>", "<0x0A>", "Ċ", "Ã©", "âĢĶ", "寿"]),
    )
    base_vocab = draw(st.lists(st.one_of(piece, piece, st.none()), min_size=1, max_size=10))
    if all(s is None for s in base_vocab):
        base_vocab.append(draw(piece))
    base_strings = [s for s in base_vocab if s is not None]
    # blend strings are often base strings spelled with the blend marker, so that tokens match
    as_blend = st.sampled_from(base_strings).map(lambda s: s.replace(base_marker, blend_marker))
    blend_vocab = draw(st.lists(st.one_of(as_blend, piece, st.none()), min_size=1, max_size=10))
    if all(s is None for s in blend_vocab):
        blend_vocab.append(draw(as_blend))
    vocab_map = None
    if draw(st.booleans()):
        swapped = [s.replace(blend_marker, base_marker) for s in blend_vocab if s is not None]
        vocab_map = draw(
            st.dictionaries(
                st.one_of(st.sampled_from(swapped), piece),
                st.sampled_from(base_strings),  # a value that is no base token is an error
                max_size=6,
            )
        )
    compat = draw(st.sampled_from([None, "fusellm"])) if method == "mined" else None
    fallback = draw(st.sampled_from(["next", "mask"]))
    return Setup(base_vocab, blend_vocab, base_marker, blend_marker, vocab_map, compat, fallback)


def _valid_ids(vocab: Sequence[str | None]) -> list[int]:
    return [i for i, s in enumerate(vocab) if s is not None]


@st.composite
def topk(draw: st.DrawFn, n: int, k: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    ids = draw(st.lists(st.integers(0, vocab_size + 3), min_size=n * k, max_size=n * k))
    logits = np.array(draw(st.lists(LOGITS, min_size=n * k, max_size=n * k)), np.float32)
    logits = logits.reshape(n, k)
    if draw(st.booleans()):  # most real rows come sorted
        logits = -np.sort(-logits, axis=1)
    return np.array(ids, np.int32).reshape(n, k), logits


@st.composite
def sequences(draw: st.DrawFn, setup: Setup, k: int) -> Seq:
    base_ok, blend_ok = _valid_ids(setup.base_vocab), _valid_ids(setup.blend_vocab)
    base_ids = draw(st.lists(st.sampled_from(base_ok), min_size=1, max_size=24))
    if draw(st.booleans()):
        # the blend side spells the same tokens where it can: many positions then match
        by_string = {}
        for i in blend_ok:
            by_string.setdefault(
                setup.blend_vocab[i].replace(setup.blend_marker, setup.base_marker),  # type: ignore[union-attr]
                i,
            )
        blend_ids = [
            by_string.get(setup.base_vocab[b], draw(st.sampled_from(blend_ok)))  # type: ignore[arg-type]
            for b in base_ids
        ]
    else:
        blend_ids = draw(st.lists(st.sampled_from(blend_ok), min_size=1, max_size=24))
    ids, logits = draw(topk(len(blend_ids), k, len(setup.blend_vocab)))
    return Seq(base_ids, blend_ids, ids, logits)


@st.composite
def batches(draw: st.DrawFn, *, method: str = "mined") -> tuple[Setup, list[Seq]]:
    setup = draw(setups(method=method))
    # Rows of up to 16 entries and wider ones take different paths in Rust.
    k = draw(st.one_of(st.integers(1, 5), st.integers(15, 20)))
    seqs = draw(st.lists(sequences(setup, k), min_size=1, max_size=4))
    return setup, seqs


# --- random vocabularies: MinED pairing --------------------------------------------------------


@given(batches(), st.sampled_from(["hard", "soft"]))
@example(
    (
        Setup(["▁a", "b", "▁a", None], ["Ġa", "b", None, "Ġx"], SPM, BBPE, {"▁x": "b"}),
        [
            Seq(
                [2, 1, 0],
                [0, 1, 0],
                np.array([[0, 3, 9], [1, 0, 2], [3, 3, 0]], np.int32),
                np.array([[1.0, 0.5, 0.0], [2.0, 2.0, -np.inf], [0.0, 1.0, 3.0]], np.float32),
            )
        ],
    ),
    "soft",
)
def test_random_mined_equals_oracle(batch: tuple[Setup, list[Seq]], vocab: str) -> None:
    setup, seqs = batch
    check(setup, seqs, method="mined", vocab=vocab, threads=(1, 2, 3))


@given(batches())
@settings(max_examples=_examples(0.3))
def test_function_form_equals_method(batch: tuple[Setup, list[Seq]]) -> None:
    setup, seqs = batch
    aligner = setup.aligner()
    a = run(aligner, seqs, num_threads=1)
    b = fusellm.align_batch(
        aligner,
        [s.base_ids for s in seqs],
        [s.blend_ids for s in seqs],
        [s.topk_ids for s in seqs],
        [s.topk_logits for s in seqs],
        num_threads=2,
    )
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.ids, y.ids)
        np.testing.assert_array_equal(x.logits, y.logits)
        np.testing.assert_array_equal(x.status, y.status)


@given(setups())
def test_targets_equal_oracle(setup: Setup) -> None:
    aligner = setup.aligner()
    index = lowest_ids(setup.base_vocab)
    vmap = setup.vocab_map or {}
    for mode in ("hard", "soft"):
        want = []
        for s in setup.blend_vocab:
            if s is None:
                want.append(-1)
                continue
            t = s.replace(setup.blend_marker, setup.base_marker)
            if mode == "soft" and t in vmap:
                t = vmap[t]
            want.append(index.get(t, -1))
        if mode == "soft" and setup.vocab_map is None:
            with pytest.raises(fusellm.InputError, match="vocabulary map"):
                aligner.targets(mode)
            continue
        got = aligner.targets(mode)  # type: ignore[arg-type]
        assert got.tolist() == want, mode


# --- hand-made cases ---------------------------------------------------------------------------

#                0        1       2       3      4     5     6       7       8      9
BASE = ["<unk>", "▁the", "▁cat", "▁s", "at", ".", "▁The", "▁the", None, "▁dog"]
#                0      1       2       3    4       5       6       7     8       9
BLEND = ["The", "Ġcat", "Ġsat", ".", "Ġthe", "ĠThe", "Ġdog", None, "Ġthe", "Ġx"]


def _hand(compat: str | None = None, fallback: str = "next", vocab_map: Any = None) -> Setup:
    return Setup(BASE, BLEND, SPM, BBPE, vocab_map, compat, fallback)


def _row(ids: list[int], logits: list[float], n: int) -> tuple[np.ndarray, np.ndarray]:
    """A one-sequence top-K of n identical rows."""
    return (
        np.tile(np.array(ids, np.int32), (n, 1)),
        np.tile(np.array(logits, np.float32), (n, 1)),
    )


def test_duplicates_first_wins_in_compat_and_merge_by_default() -> None:
    # "▁The ▁cat ." on both sides: every position matches
    ids, logits = _row([4, 8, 6, 7, 9, 20], [3.0, 2.0, 1.0, 0.5, 0.2, 0.1], 3)
    seq = Seq([6, 2, 5], [5, 1, 3], ids, logits)
    ref = check(_hand("fusellm"), [seq])[0]
    assert ref.ids[0].tolist() == [1, 9, -1, -1, -1, -1]  # "▁the" -> lowest id 1, first wins
    assert ref.logits[0, :2].tolist() == [3.0, 1.0]
    assert (ref.num_unknown, ref.num_unmapped) == (3 * 2, 3 * 1)  # None string, beyond vocab; Ġx
    assert ref.status.tolist() == [MATCHED] * 3
    new = check(_hand(), [seq])[0]
    assert new.ids[0].tolist() == [1, 9, -1, -1, -1, -1]
    assert new.logits[0, 0] == pytest.approx(np.logaddexp(3.0, 2.0), rel=1e-6)


def test_merged_rows_are_resorted() -> None:
    # "▁dog" 2.0, then "▁the" 1.5 twice: merged to 1.5 + ln 2 > 2.0
    ids, logits = _row([6, 4, 8], [2.0, 1.5, 1.5], 3)
    seq = Seq([6, 2, 5], [5, 1, 3], ids, logits)
    ref = check(_hand("fusellm"), [seq])[0]
    assert ref.ids[0].tolist() == [9, 1, -1]
    new = check(_hand(), [seq])[0]
    assert new.ids[0].tolist() == [1, 9, -1]
    assert new.logits[0, 0] == pytest.approx(1.5 + math.log(2), rel=1e-6)


def test_unsorted_rows_are_read_in_descending_order() -> None:
    ids, logits = _row([6, 4, 8, 0], [0.5, 2.0, -1.0, 2.0], 3)  # ties keep column order
    seq = Seq([6, 2, 5], [5, 1, 3], ids, logits)
    ref = check(_hand("fusellm"), [seq])[0]
    # 1 (col 1, 2.0) < "The" -> unmapped (col 3, 2.0), 9 (col 0), 1 again (col 2) dropped
    assert ref.ids[0].tolist() == [1, 9, -1, -1]
    assert ref.logits[0].tolist() == [2.0, 0.5, NEG_INF, NEG_INF]
    check(_hand(), [seq])


def test_negative_zero_ties_keep_column_order() -> None:
    """-0.0 == 0.0: equal logits, so a stable descending order keeps their column order."""
    ids, logits = _row([6, 1, 4], [-0.0, 1.0, 0.0], 3)  # ▁dog, ▁cat, ▁the
    seq = Seq([6, 2, 5], [5, 1, 3], ids, logits)
    for compat in ("fusellm", None):
        row = run(_hand(compat).aligner(), [seq], num_threads=1)[0]
        assert row.ids[0].tolist() == [2, 9, 1], compat


def test_positive_infinite_logits_are_an_error() -> None:
    """+inf is no probability (a softmax over it is NaN): refused, naming where it is."""
    ids, logits = _row([4, 8, 6], [np.inf, np.inf, 1.0], 3)
    seq = Seq([6, 2, 5], [5, 1, 3], ids, logits)
    with pytest.raises(fusellm.InputError, match=r"position 0, rank 0 is inf"):
        run(_hand().aligner(), [seq], num_threads=1)


def test_negative_infinite_entries_are_padding() -> None:
    """-inf entries hold no probability: they are dropped (not counted); a row of them only is
    EMPTY (replaced by the target's own row in training), never a MATCHED row of nothing."""
    ids, logits = _row([4, 8, 6], [1.0, NEG_INF, NEG_INF], 3)
    seq = Seq([6, 2, 5], [5, 1, 3], ids, logits)
    row = check(_hand(), [seq])[0]
    assert row.ids[0].tolist() == [1, -1, -1]
    assert row.logits[0, 1] == NEG_INF
    assert row.num_unmapped == 0
    ids, logits = _row([6, 4, 8], [NEG_INF, NEG_INF, NEG_INF], 3)
    row = check(_hand(), [Seq([6, 2, 5], [5, 1, 3], ids, logits)])[0]
    assert row.status[0] == EMPTY
    assert row.ids[0].tolist() == [-1] * 3
    assert row.logits[0].tolist() == [NEG_INF] * 3


def test_fallbacks() -> None:
    # "▁The ▁cat ▁s at ." vs "The Ġcat Ġsat .": ▁s and at share Ġsat; "The" != "▁The" with a
    # ▁ blend marker, but the byte-level first-token rule makes it match with Ġ
    ids, logits = _row([6], [1.0], 4)
    seq = Seq([6, 2, 3, 4, 5], [0, 1, 2, 3], ids, logits)
    ref = check(_hand("fusellm"), [seq])[0]
    assert ref.status.tolist() == [MATCHED, MATCHED, FALLBACK, FALLBACK, MATCHED]
    assert ref.ids[2:4, 0].tolist() == [3, 4]  # current token
    assert ref.logits[2:4, 0].tolist() == [1.0, 1.0]
    nxt = check(_hand(fallback="next"), [seq])[0]
    assert nxt.ids[2:4, 0].tolist() == [4, 5]  # next token
    assert nxt.logits[2:4, 0].tolist() == [0.0, 0.0]  # probability 1, as a log-probability
    assert nxt.status.tolist() == [MATCHED, MATCHED, FALLBACK, FALLBACK, MATCHED]
    masked = check(_hand(fallback="mask"), [seq])[0]
    assert masked.status.tolist() == [MATCHED, MATCHED, MASKED, MASKED, MATCHED]
    assert (masked.ids[2:4] == -1).all()
    assert (masked.logits[2:4] == NEG_INF).all()


def test_next_fallback_masks_the_last_position() -> None:
    ids, logits = _row([6], [1.0], 1)
    seq = Seq([9, 2, 3], [9], ids, logits)  # "Ġx" matches nothing
    row = check(_hand(), [seq])[0]
    assert row.status.tolist() == [FALLBACK, FALLBACK, MASKED]
    assert row.ids[:, 0].tolist() == [2, 3, -1]
    ref = check(_hand("fusellm"), [seq])[0]
    assert ref.status.tolist() == [FALLBACK] * 3
    assert ref.ids[:, 0].tolist() == [9, 2, 3]


def test_fallback_keeps_the_given_duplicate_id() -> None:
    # id 7 is a second "▁the": the one-hot uses the id as given, matched rows the lowest id
    ids, logits = _row([4], [1.0], 1)
    seq = Seq([7, 9, 7], [9], ids, logits)
    assert check(_hand("fusellm"), [seq])[0].ids[:, 0].tolist() == [7, 9, 7]
    assert check(_hand(), [seq])[0].ids[:, 0].tolist() == [9, 7, -1]


def test_empty_rows() -> None:
    ids, logits = _row([9, 7, 30], [1.0, 0.5, 0.0], 3)  # unmapped, no string, beyond vocab
    seq = Seq([6, 2, 5], [5, 1, 3], ids, logits)
    row = check(_hand(), [seq])[0]
    assert row.status.tolist() == [EMPTY] * 3
    assert (row.num_unknown, row.num_unmapped) == (6, 3)
    assert (row.ids == -1).all()


def test_byte_level_first_token_rule() -> None:
    ids, logits = _row([6], [1.0], 2)
    seq = Seq([6, 2], [0, 1], ids, logits)  # "▁The ▁cat" vs "The Ġcat"
    assert check(_hand(), [seq])[0].status.tolist() == [MATCHED, MATCHED]
    # only at position 0
    seq = Seq([2, 6, 2], [1, 0, 1], *_row([6], [1.0], 3))
    assert check(_hand(), [seq])[0].status.tolist() == [MATCHED, FALLBACK, MATCHED]
    # only for a byte-level (Ġ) blend marker: with "▁" on both sides "The" != "▁The"
    spm = Setup(BASE, [s.replace(BBPE, SPM) if s else s for s in BLEND], SPM, SPM)
    seq = Seq([6, 2], [0, 1], ids, logits)
    assert check(spm, [seq])[0].status.tolist() == [FALLBACK, MATCHED]


def test_soft_vocab_map() -> None:
    # Ġsat is not a base token; the map sends "▁sat" to "▁s" and "▁x" to "▁cat"
    vmap = {"▁sat": "▁s", "▁x": "▁cat", "▁the": "▁dog"}
    seq = Seq([6, 3], [5, 2], *_row([9, 4, 2], [2.0, 1.0, 0.5], 2))
    hard = check(_hand(vocab_map=vmap), [seq], vocab="hard")[0]
    assert hard.status.tolist() == [MATCHED, MASKED]  # next-token fallback at the last position
    soft = check(_hand(vocab_map=vmap), [seq], vocab="soft")[0]
    assert soft.status.tolist() == [MATCHED, MATCHED]
    # the map applies to the top-K even where the string is a base token ("▁the" -> "▁dog")
    assert soft.ids[0].tolist() == [2, 9, 3]
    assert hard.ids[0].tolist() == [1, -1, -1]
    assert hard.num_unmapped == 2


# --- offsets pairing ---------------------------------------------------------------------------


def _pairing(
    base_offsets: list[tuple[int, int]], blend_offsets: list[tuple[int, int]]
) -> list[int]:
    """The pairing Rust uses, read back from rows: blend position j's top-1 maps to base id j."""
    n = len(blend_offsets)
    vocab = [f"t{j}" for j in range(n)]
    aligner = fusellm.Aligner(vocab, vocab, base_marker=SPM, blend_marker=BBPE, fallback="mask")
    row = aligner.align_batch(
        [np.zeros(len(base_offsets), np.int32)],
        [np.arange(n, dtype=np.int32)],
        [np.arange(n, dtype=np.int32)[:, None]],
        [np.zeros((n, 1), np.float32)],
        method="offsets",
        base_offsets=[np.array(base_offsets, np.int64).reshape(-1, 2)],
        blend_offsets=[np.array(blend_offsets, np.int64).reshape(-1, 2)],
    )[0]
    assert set(row.status.tolist()) <= {MATCHED, MASKED}
    return [int(r[0]) if s == MATCHED else -1 for r, s in zip(row.ids, row.status, strict=True)]


def test_offsets_golden() -> None:
    # "hello world": base [hel][lo][ world], blend [hello][ wor][ld]
    base, blend = [(0, 3), (3, 5), (5, 11)], [(0, 5), (5, 9), (9, 11)]
    assert match_ends(base, blend) == [-1, 0, 2]
    assert _pairing(base, blend) == [-1, 0, 2]
    # one character in three byte pieces on the base side, two on the blend side
    base, blend = [(0, 1), (0, 1), (0, 1), (1, 2)], [(0, 1), (0, 1), (1, 2)]
    assert match_ends(base, blend) == [-1, -1, 1, 2]
    assert _pairing(base, blend) == [-1, -1, 1, 2]
    # zero-width tokens and overlapping byte-level pieces (start before the previous end)
    base, blend = [(0, 0), (0, 2), (1, 2), (2, 2), (2, 4)], [(0, 0), (0, 0), (0, 4)]
    assert match_ends(base, blend) == [1, -1, -1, -1, 2]
    assert _pairing(base, blend) == [1, -1, -1, -1, 2]


@st.composite
def segmentation(draw: st.DrawFn, length: int) -> list[tuple[int, int]]:
    """Spans over a text of ``length`` characters: pieces, zero-width tokens, runs of pieces of
    one character (byte fallback) and byte-level pieces that start before the previous end."""
    spans: list[tuple[int, int]] = []
    pos = 0
    while pos < length or not spans:
        kind = draw(st.sampled_from(["piece", "piece", "piece", "zero", "bytes", "overlap"]))
        if kind == "zero" or pos >= length:
            spans.append((pos, pos))
            if pos >= length:
                break
            continue
        w = draw(st.integers(1, min(4, length - pos)))
        if kind == "bytes":
            spans.extend([(pos, pos + w)] * draw(st.integers(2, 4)))
        elif kind == "overlap" and pos > 0:
            spans.extend([(pos - 1, pos + w), (pos, pos + w)])
        else:
            spans.append((pos, pos + w))
        pos += w
    if draw(st.booleans()):
        spans.append((length, length))  # a trailing zero-width token (an EOS)
    return spans


@st.composite
def offset_batches(draw: st.DrawFn) -> tuple[Setup, list[Seq]]:
    setup = draw(setups(method="offsets"))
    k = draw(st.one_of(st.integers(1, 4), st.integers(16, 18)))
    base_ok, blend_ok = _valid_ids(setup.base_vocab), _valid_ids(setup.blend_vocab)
    seqs = []
    for _ in range(draw(st.integers(1, 3))):
        length = draw(st.integers(0, 20))
        base_sp, blend_sp = draw(segmentation(length)), draw(segmentation(length))
        base_ids = draw(
            st.lists(st.sampled_from(base_ok), min_size=len(base_sp), max_size=len(base_sp))
        )
        blend_ids = draw(
            st.lists(st.sampled_from(blend_ok), min_size=len(blend_sp), max_size=len(blend_sp))
        )
        ids, logits = draw(topk(len(blend_ids), k, len(setup.blend_vocab)))
        seqs.append(
            Seq(
                base_ids,
                blend_ids,
                ids,
                logits,
                np.array(base_sp, np.int64),
                np.array(blend_sp, np.int64),
            )
        )
    return setup, seqs


@given(st.integers(0, 25).flatmap(lambda n: st.tuples(segmentation(n), segmentation(n))))
def test_offsets_pairing_equals_oracle(spans: tuple[list, list]) -> None:
    base, blend = spans
    assert _pairing(base, blend) == match_ends(base, blend)


@given(offset_batches(), st.sampled_from(["hard", "soft"]))
def test_random_offsets_equals_oracle(batch: tuple[Setup, list[Seq]], vocab: str) -> None:
    setup, seqs = batch
    check(setup, seqs, method="offsets", vocab=vocab, threads=(1, 2, 3))


@given(offset_batches(), st.sampled_from(["hard", "soft"]))
@settings(max_examples=_examples(0.2), deadline=None)
def test_large_base_vocabulary_equals_oracle(batch: tuple[Setup, list[Seq]], vocab: str) -> None:
    """Base vocabularies of 65,534 strings or more (Llama 3, Gemma) take 32-bit target tables in
    Rust, smaller ones 16-bit tables: both must give the oracle's rows."""
    setup, seqs = batch
    filler = [f"<filler {i}>" for i in range(70_000 - len(setup.base_vocab))]
    big = replace(setup, base_vocab=[*setup.base_vocab, *filler])
    check(big, seqs, method="offsets", vocab=vocab, threads=(1, 2))


def test_mined_ignores_offsets() -> None:
    ids, logits = _row([6], [1.0], 2)
    seq = Seq([6, 2], [0, 1], ids, logits)
    aligner = _hand().aligner()
    plain = run(aligner, [seq])[0]
    with_offsets = aligner.align_batch(
        [seq.base_ids],
        [seq.blend_ids],
        [ids],
        [logits],
        base_offsets=[np.array([[0, 3], [3, 7]])],
        blend_offsets=[np.array([[0, 9], [9, 9]])],
    )[0]
    np.testing.assert_array_equal(plain.ids, with_offsets.ids)
    np.testing.assert_array_equal(plain.status, with_offsets.status)


# --- real tokenizers on real text --------------------------------------------------------------

WORDS = sorted({w for text in SAMPLE_TEXTS for w in text.split()})
SEPARATORS = [" ", " ", " ", "  ", "\n", "\n\n", "\t", ", ", " — "]


@st.composite
def sentences(draw: st.DrawFn) -> str:
    words = draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=30))
    out = draw(st.sampled_from(["", "", " ", "\n"]))
    for w in words:
        out += w + draw(st.sampled_from(SEPARATORS))
    return out.rstrip(" ") if draw(st.booleans()) else out


class RealPair:
    """A (base, blend) pair of bundled tokenizers with the aligners and the vocabulary map."""

    def __init__(self, base: Any, blend: Any) -> None:
        self.base, self.blend = base, blend
        self.vocab_map = self._vocab_map()
        self._aligners: dict[tuple[str | None, str], fusellm.Aligner] = {}

    def swap(self, s: str) -> str:
        return s.replace(self.blend.marker, self.base.marker)

    def _vocab_map(self) -> dict[str, str]:
        """Small map built from the sample texts: blend spellings that differ from the base token
        MinED pairs them with, and a few exact strings re-mapped elsewhere (a value that is no
        base token is an error: tests/test_bad_input.py)."""
        vmap: dict[str, str] = {}
        for text in SAMPLE_TEXTS:
            b_ids, x_ids = self.base.encode(text), self.blend.encode(text)
            bs, xs = self.base.strings(b_ids), self.blend.strings(x_ids)
            for i, group in enumerate(oracle_mined(bs, xs, self.base.marker, self.blend.marker)):
                if len(group) == 1:
                    t = self.swap(xs[group[0]])
                    if t != bs[i] and t not in vmap:
                        vmap[t] = bs[i]
        rng = np.random.default_rng(0)
        exact = [
            t for t in (self.swap(s) for s in self.blend.vocab[:3000] if s) if t in self.base.index
        ]
        strings = [s for s in self.base.vocab if s is not None]
        for t in rng.choice(exact, size=20, replace=False).tolist():
            vmap[t] = strings[int(rng.integers(len(strings)))]
        return vmap

    def setup(self, compat: str | None, fallback: str) -> Setup:
        return Setup(
            self.base.vocab,
            self.blend.vocab,
            self.base.marker,
            self.blend.marker,
            self.vocab_map,
            compat,
            fallback,
            self.base.index,
        )

    def aligner(self, compat: str | None, fallback: str) -> fusellm.Aligner:
        key = (compat, fallback)
        if key not in self._aligners:
            self._aligners[key] = self.setup(compat, fallback).aligner()
        return self._aligners[key]

    def seq(self, text: str, rng: np.random.Generator, k: int = 6, offsets: bool = False) -> Seq:
        b_ids, b_off = self.base.encode_offsets(text)
        x_ids, x_off = self.blend.encode_offsets(text)
        n, size = len(x_ids), len(self.blend.vocab)
        ids = np.empty((n, k), np.int64)
        for j in range(n):
            cand = [
                x_ids[min(j + 1, n - 1)],  # the true next token
                x_ids[j],
                int(rng.choice(x_ids)),
                int(rng.integers(size)),
                size + int(rng.integers(0, 300)),  # a padded-vocabulary id
                int(rng.integers(min(size, 2000))),  # frequent tokens
            ]
            ids[j] = [cand[c] for c in rng.integers(0, len(cand), size=k)]
            ids[j, 0] = cand[0]
        logits = (rng.normal(size=(n, k)) * 3).astype(np.float32)
        sort = rng.random(n) < 0.8
        logits[sort] = -np.sort(-logits[sort], axis=1)
        return Seq(
            b_ids,
            x_ids,
            ids.astype(np.int32),
            logits,
            np.array(b_off, np.int64).reshape(-1, 2) if offsets else None,
            np.array(x_off, np.int64).reshape(-1, 2) if offsets else None,
        )


DIRECTIONS = [
    ("mistral", "qwen"),
    ("mistral", "deepseek"),
    ("qwen", "mistral"),
    ("deepseek", "mistral"),
]
POLICIES = [("fusellm", "next"), (None, "next"), (None, "mask")]


@pytest.fixture(scope="module")
def real_pairs(request: pytest.FixtureRequest) -> dict[tuple[str, str], RealPair]:
    toks = {n: request.getfixturevalue(n) for n in ("mistral", "qwen", "deepseek")}
    return {(b, x): RealPair(toks[b], toks[x]) for b, x in DIRECTIONS}


@pytest.mark.parametrize(("base", "blend"), DIRECTIONS)
def test_real_mined_alignment_on_samples(real_pairs: dict, base: str, blend: str) -> None:
    pair = real_pairs[base, blend]
    for text in SAMPLE_TEXTS:
        bs = pair.base.strings(pair.base.encode(text))
        xs = pair.blend.strings(pair.blend.encode(text))
        got = fusellm.mined_base_to_blend(
            bs, xs, base_marker=pair.base.marker, blend_marker=pair.blend.marker
        )
        assert got == oracle_mined(bs, xs, pair.base.marker, pair.blend.marker), text


@pytest.mark.parametrize(("base", "blend"), DIRECTIONS)
def test_real_align_batch_on_samples(real_pairs: dict, base: str, blend: str) -> None:
    pair = real_pairs[base, blend]
    rng = np.random.default_rng(1234)
    seqs = [pair.seq(text, rng) for text in SAMPLE_TEXTS]
    matched = 0
    for compat, fallback in POLICIES:
        setup = pair.setup(compat, fallback)
        aligner = pair.aligner(compat, fallback)
        for vocab in ("hard", "soft"):
            rows = run(aligner, seqs, vocab=vocab, num_threads=2)
            for n, (got, s) in enumerate(zip(rows, seqs, strict=True)):
                want = setup.oracle(s, method="mined", vocab=vocab)
                compare_rows(got, want, where=f"{base}<-{blend} {compat} {vocab} text {n}")
                matched += int((got.status == MATCHED).sum())
    assert matched > 0


@pytest.mark.parametrize(("base", "blend"), DIRECTIONS)
def test_real_soft_map_rescues_positions(real_pairs: dict, base: str, blend: str) -> None:
    pair = real_pairs[base, blend]
    rng = np.random.default_rng(7)
    seqs = [pair.seq(text, rng) for text in SAMPLE_TEXTS]
    aligner = pair.aligner(None, "next")
    hard = sum(int((r.status == MATCHED).sum()) for r in run(aligner, seqs, vocab="hard"))
    soft = sum(int((r.status == MATCHED).sum()) for r in run(aligner, seqs, vocab="soft"))
    assert soft > hard


@given(text=sentences(), seed=st.integers(0, 2**32 - 1), policy=st.sampled_from(POLICIES))
@settings(max_examples=_examples(0.5))
@pytest.mark.parametrize(("base", "blend"), DIRECTIONS)
def test_real_sentences(
    real_pairs: dict, base: str, blend: str, text: str, seed: int, policy: tuple
) -> None:
    pair = real_pairs[base, blend]
    compat, fallback = policy
    s = pair.seq(text, np.random.default_rng(seed))
    bs, xs = pair.base.strings(s.base_ids), pair.blend.strings(s.blend_ids)
    assert fusellm.mined_base_to_blend(
        bs, xs, base_marker=pair.base.marker, blend_marker=pair.blend.marker
    ) == oracle_mined(bs, xs, pair.base.marker, pair.blend.marker)
    setup = pair.setup(compat, fallback)
    aligner = pair.aligner(compat, fallback)
    for vocab in ("hard", "soft"):
        got = run(aligner, [s], vocab=vocab, num_threads=1)[0]
        compare_rows(got, setup.oracle(s, method="mined", vocab=vocab), where=f"{vocab} {text!r}")


@pytest.mark.parametrize(("base", "blend"), DIRECTIONS)
def test_real_offsets_on_samples(real_pairs: dict, base: str, blend: str) -> None:
    pair = real_pairs[base, blend]
    rng = np.random.default_rng(99)
    seqs = [pair.seq(text, rng, offsets=True) for text in SAMPLE_TEXTS]
    for fallback in ("next", "mask"):
        setup = pair.setup(None, fallback)
        aligner = pair.aligner(None, fallback)
        for vocab in ("hard", "soft"):
            rows = run(aligner, seqs, method="offsets", vocab=vocab, num_threads=2)
            for n, (got, s) in enumerate(zip(rows, seqs, strict=True)):
                want = setup.oracle(s, method="offsets", vocab=vocab)
                compare_rows(got, want, where=f"{base}<-{blend} offsets {vocab} text {n}")
    for s in seqs:
        assert _pairing(s.base_offsets.tolist(), s.blend_offsets.tolist()) == match_ends(
            s.base_offsets, s.blend_offsets
        )


@given(text=sentences(), seed=st.integers(0, 2**32 - 1))
@settings(max_examples=_examples(0.3))
@pytest.mark.parametrize(("base", "blend"), DIRECTIONS)
def test_real_offsets_sentences(
    real_pairs: dict, base: str, blend: str, text: str, seed: int
) -> None:
    pair = real_pairs[base, blend]
    s = pair.seq(text, np.random.default_rng(seed), offsets=True)
    setup = pair.setup(None, "next")
    got = run(pair.aligner(None, "next"), [s], method="offsets", vocab="soft")[0]
    compare_rows(got, setup.oracle(s, method="offsets", vocab="soft"), where=repr(text))
