"""``Aligner.align_flat`` (a batch in flat buffers with row offsets, as a stage reads Arrow list
columns) against ``Aligner.align_batch`` on the same sequences, with the batch's counts checked
against sums over the rows (``exact_span`` against a numpy recomputation); malformed flat
batches are typed errors, never a panic."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fusellm
from fusellm.align import MATCHED
from test_align import Seq, Setup, _examples, batches, offset_batches


def _rows(xs: list[Any], dtype: Any, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Flat values and row offsets of per-sequence arrays."""
    arrays = [np.asarray(x, dtype) for x in xs]
    lengths = [len(a) for a in arrays]
    rows = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    empty = np.zeros((0,) if width is None else (0, width), dtype)
    return (np.concatenate(arrays) if arrays else empty), rows


def _flat(aligner: fusellm.Aligner, seqs: list[Seq], **kw: Any) -> Any:
    base, base_rows = _rows([s.base_ids for s in seqs], np.int32)
    blend, blend_rows = _rows([s.blend_ids for s in seqs], np.int32)
    k = seqs[0].topk_ids.shape[1]
    topk_ids, _ = _rows([s.topk_ids for s in seqs], np.int32, k)
    topk_logits, _ = _rows([s.topk_logits for s in seqs], np.float32, k)
    spans = kw.pop("spans", False)
    base_sp = _rows([s.base_offsets for s in seqs], np.int64, 2)[0] if spans else None
    blend_sp = _rows([s.blend_offsets for s in seqs], np.int64, 2)[0] if spans else None
    return aligner.align_flat(
        base,
        base_rows,
        blend,
        blend_rows,
        topk_ids,
        topk_logits,
        base_offsets=base_sp,
        blend_offsets=blend_sp,
        **kw,
    )


def _exact_spans(base: np.ndarray, blend: np.ndarray, status: np.ndarray) -> int:
    """Matched positions whose last blend token ending at or before the base token's end ends
    there and starts where it starts."""
    m = np.flatnonzero(status == MATCHED)
    if not m.size:
        return 0
    ends = blend[:, 1]
    j = np.searchsorted(ends, base[m, 1], side="right") - 1
    ok = (j >= 0) & (ends[np.maximum(j, 0)] == base[m, 1])
    return int(np.count_nonzero(ok & (blend[np.maximum(j, 0), 0] == base[m, 0])))


def _check(setup: Setup, seqs: list[Seq], *, method: str, vocab: str) -> None:
    aligner = setup.aligner()
    if vocab == "soft" and setup.vocab_map is None:
        return
    spans = method == "offsets"
    kw: dict[str, Any] = dict(method=method, vocab=vocab)
    if spans:
        kw.update(
            base_offsets=[s.base_offsets for s in seqs],
            blend_offsets=[s.blend_offsets for s in seqs],
        )
    error = None
    try:
        rows = aligner.align_batch(
            [s.base_ids for s in seqs],
            [s.blend_ids for s in seqs],
            [s.topk_ids for s in seqs],
            [s.topk_logits for s in seqs],
            **kw,
        )
    except fusellm.InputError as e:
        error = str(e)
    if error is not None:  # the same error, naming the same sequence
        with pytest.raises(fusellm.InputError) as got:
            _flat(aligner, seqs, method=method, vocab=vocab, spans=spans)
        assert str(got.value) == error
        return
    for threads in (1, 2, 3):
        out = _flat(aligner, seqs, method=method, vocab=vocab, spans=spans, num_threads=threads)
        np.testing.assert_array_equal(out.ids, np.concatenate([r.ids for r in rows]))
        np.testing.assert_array_equal(out.logits, np.concatenate([r.logits for r in rows]))
        np.testing.assert_array_equal(out.status, np.concatenate([r.status for r in rows]))
        want: dict[str, Any] = dict.fromkeys(out.counts, 0)
        for s, r in zip(seqs, rows, strict=True):
            for key, v in r.counts().items():
                want[key] += v
            want["topk_entries"] += int(np.count_nonzero(r.ids[r.status == MATCHED] >= 0))
            if spans:
                want["exact_span"] += _exact_spans(s.base_offsets, s.blend_offsets, r.status)
        if not spans:
            want["exact_span"] = None
        assert out.counts == want


@given(batches(), st.sampled_from(["hard", "soft"]))
@settings(max_examples=_examples(0.5))
def test_flat_mined_equals_align_batch(batch: tuple[Setup, list[Seq]], vocab: str) -> None:
    setup, seqs = batch
    _check(setup, seqs, method="mined", vocab=vocab)


@given(offset_batches(), st.sampled_from(["hard", "soft"]))
@settings(max_examples=_examples(0.5))
def test_flat_offsets_equals_align_batch(batch: tuple[Setup, list[Seq]], vocab: str) -> None:
    setup, seqs = batch
    _check(setup, seqs, method="offsets", vocab=vocab)


def _small() -> tuple[fusellm.Aligner, dict[str, Any]]:
    aligner = fusellm.Aligner(["▁a", "b"], ["Ġa", "b"], base_marker="▁", blend_marker="Ġ")
    args = dict(
        base_ids=np.array([0, 1, 0], np.int32),
        base_rows=np.array([0, 2, 3]),
        blend_ids=np.array([0, 1, 1], np.int32),
        blend_rows=np.array([0, 2, 3]),
        blend_topk_ids=np.array([[0, 1], [1, 0], [1, 0]], np.int32),
        blend_topk_logits=np.array([[1.0, 0.0]] * 3, np.float16),
    )
    return aligner, args


def test_flat_batch_of_no_rows() -> None:
    aligner, args = _small()
    args.update(
        base_ids=np.zeros(0, np.int32),
        base_rows=np.zeros(1, np.int64),
        blend_ids=np.zeros(0, np.int32),
        blend_rows=np.zeros(1, np.int64),
        blend_topk_ids=np.zeros((0, 2), np.int32),
        blend_topk_logits=np.zeros((0, 2), np.float32),
    )
    out = aligner.align_flat(**args)
    assert out.ids.shape == (0, 2)
    assert out.status.shape == (0,)
    assert out.counts["matched"] == 0


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"base_rows": np.array([0, 2])}, fusellm.InputError, "row offsets"),
        ({"base_rows": np.array([1, 2, 3])}, fusellm.InputError, "start at 0"),
        ({"blend_rows": np.array([0, 3, 2])}, fusellm.InputError, "decrease at row 1"),
        ({"blend_rows": np.array([0, 2, 4])}, fusellm.InputError, "end at 4"),
        ({"blend_rows": np.array([0, 2, 2**62])}, fusellm.InputError, "end at"),
        ({"blend_rows": np.array([0.0, 2.0, 3.0])}, fusellm.InputTypeError, "row offsets"),
        ({"blend_topk_ids": np.zeros((2, 2), np.int32)}, fusellm.InputError, "shape"),
        ({"blend_topk_ids": np.zeros((3, 0), np.int32)}, fusellm.InputError, "shape"),
        ({"base_ids": np.array([0, 5, 0])}, fusellm.InputError, "sequence 0"),
        ({"blend_topk_ids": np.array([[0, 1], [1, 0], [-1, 0]])}, fusellm.InputError, "sequence 1"),
        ({"base_ids": np.array([0.5, 1, 0])}, fusellm.InputTypeError, "integers"),
        ({"base_offsets": np.zeros((3, 3), np.int64)}, fusellm.InputTypeError, "shape"),
    ],
)
def test_malformed_flat_batches_are_typed_errors(
    change: dict[str, Any], error: type[Exception], match: str
) -> None:
    aligner, args = _small()
    args.update(change)
    with pytest.raises(error, match=match):
        aligner.align_flat(**args, method="mined")


def test_offsets_method_needs_both_spans() -> None:
    aligner, args = _small()
    with pytest.raises(fusellm.InputError, match="offsets"):
        aligner.align_flat(**args, method="offsets", base_offsets=np.zeros((3, 2), np.int64))


def test_float16_rows_are_read_as_their_exact_widening() -> None:
    """float16 top-K logits (as extraction stores them) go to the kernel as they are and align
    exactly as their float32 values do; ``logits_dtype="float16"`` returns the float32 result
    rounded to nearest."""
    aligner, args = _small()
    args["blend_topk_logits"] = np.array([[3.0, -1.5], [0.1, -np.inf], [-7.25, -0.333]], np.float16)
    half = aligner.align_flat(**args)
    wide = aligner.align_flat(
        **{**args, "blend_topk_logits": args["blend_topk_logits"].astype(np.float32)}
    )
    assert half.logits.dtype == wide.logits.dtype == np.float32
    np.testing.assert_array_equal(half.ids, wide.ids)
    np.testing.assert_array_equal(half.logits, wide.logits)
    stored = aligner.align_flat(**args, logits_dtype="float16")
    assert stored.logits.dtype == np.float16
    np.testing.assert_array_equal(stored.logits, wide.logits.astype(np.float16))
    np.testing.assert_array_equal(stored.status, wide.status)
    with pytest.raises(fusellm.InputError, match="logits_dtype"):
        aligner.align_flat(**args, logits_dtype="bfloat16")  # type: ignore[arg-type]


def test_float16_output_refuses_exactly_the_values_that_overflow() -> None:
    """A merged logit is returned as float16 unless it would round to infinity there: from the
    largest finite float16 (65504) plus half its ulp (16) on; the padding's -inf is kept."""
    aligner, args = _small()
    ok = np.array([[65519.0, -65519.0], [-3.25, -np.inf], [1.0, 0.0]], np.float32)
    got = aligner.align_flat(**{**args, "blend_topk_logits": ok}, logits_dtype="float16")
    want = aligner.align_flat(**{**args, "blend_topk_logits": ok})
    np.testing.assert_array_equal(got.logits, want.logits.astype(np.float16))
    assert np.isfinite(got.logits[0]).all()
    assert got.logits[0, 0] == 65504
    for bad in (65520.0, -70000.0, 1e30):
        row = ok.copy()
        row[1, 0] = bad  # the second token's row (matched)
        with pytest.raises(fusellm.InputError, match=r"a merged logit \(.*\) overflows float16"):
            aligner.align_flat(**{**args, "blend_topk_logits": row}, logits_dtype="float16")
        # float32 output keeps it
        assert aligner.align_flat(**{**args, "blend_topk_logits": row}).logits.max() == np.float32(
            max(bad, 65519.0)
        )
