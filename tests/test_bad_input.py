"""Bad input: every malformed call raises InputError / InputTypeError (or at least ValueError /
TypeError) with a message naming the offending value; never a panic, never anything else."""

from __future__ import annotations

import re
import warnings
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fusellm

SPM, BBPE = "▁", "Ġ"
BASE = ["▁a", "b", None, "▁c"]
BLEND = ["Ġa", "b", "Ġc", None]
ALLOWED = (fusellm.InputError, fusellm.InputTypeError, ValueError, TypeError)


@pytest.fixture(scope="module")
def aligner() -> fusellm.Aligner:
    return fusellm.Aligner(BASE, BLEND, base_marker=SPM, blend_marker=BBPE)


def valid() -> dict[str, Any]:
    """One valid sequence pair of length 2 / 2 with K = 2, and its offsets."""
    return {
        "base_ids": [np.array([0, 1])],
        "blend_ids": [np.array([0, 1])],
        "blend_topk_ids": [np.array([[0, 1], [1, 2]])],
        "blend_topk_logits": [np.array([[1.0, 0.0], [1.0, 0.0]])],
        "base_offsets": [np.array([[0, 1], [1, 2]])],
        "blend_offsets": [np.array([[0, 1], [1, 2]])],
        "method": "offsets",
    }


def call(aligner: fusellm.Aligner, **changes: Any) -> list[fusellm.AlignedRow]:
    kw = valid()
    kw.update(changes)
    return aligner.align_batch(
        kw.pop("base_ids"),
        kw.pop("blend_ids"),
        kw.pop("blend_topk_ids"),
        kw.pop("blend_topk_logits"),
        **kw,
    )


def test_valid_input_works(aligner: fusellm.Aligner) -> None:
    assert len(call(aligner)) == 1
    assert len(call(aligner, method="mined")) == 1


def test_empty_batch_gives_no_rows(aligner: fusellm.Aligner) -> None:
    assert aligner.align_batch([], [], [], []) == []


CASES: list[tuple[str, dict[str, Any], type[BaseException], str]] = [
    # --- batch structure
    (
        "mismatched number of sequences",
        {"blend_ids": [np.array([0, 1]), np.array([0])]},
        ValueError,
        "blend_ids has 2 sequences but base_ids has 1",
    ),
    (
        "mismatched number of offset sequences",
        {"blend_offsets": [np.array([[0, 1], [1, 2]])] * 3},
        ValueError,
        "blend_offsets has 3 sequences",
    ),
    (
        "batch given as one array",
        {"base_ids": np.array([[0, 1]])},
        fusellm.InputTypeError,
        "base_ids must be a list",
    ),
    (
        "batch given as a string",
        {"blend_ids": "ab"},
        fusellm.InputTypeError,
        "blend_ids must be a list",
    ),
    # --- shapes
    (
        "top-K rows != blend length",
        {"blend_topk_ids": [np.array([[0, 1]])], "blend_topk_logits": [np.array([[1.0, 0.0]])]},
        fusellm.InputError,
        "the blend sequence has 2 tokens",
    ),
    (
        "ids / logits shape mismatch",
        {"blend_topk_logits": [np.zeros((2, 3))]},
        ValueError,
        "blend_topk_ids has shape [2, 2] but blend_topk_logits has [2, 3]",
    ),
    (
        "wrong rank of ids",
        {"base_ids": [np.array([[0, 1]])]},
        fusellm.InputTypeError,
        "base_ids[0] must have 1 dimension(s), got shape (1, 2)",
    ),
    (
        "wrong rank of top-K ids",
        {"blend_topk_ids": [np.array([0, 1])]},
        fusellm.InputTypeError,
        "blend_topk_ids[0] must have 2 dimension(s), got shape (2,)",
    ),
    (
        "wrong rank of logits",
        {"blend_topk_logits": [np.zeros((2, 2, 1))]},
        fusellm.InputTypeError,
        "blend_topk_logits[0] must have 2 dimensions [L, K], got shape (2, 2, 1)",
    ),
    ("a None sequence", {"blend_ids": [None]}, fusellm.InputTypeError, "blend_ids[0]"),
    (
        "K = 0",
        {"blend_topk_ids": [np.zeros((2, 0), int)], "blend_topk_logits": [np.zeros((2, 0))]},
        fusellm.InputError,
        "K = 0",
    ),
    # --- dtypes
    (
        "float ids",
        {"base_ids": [np.array([0.0, 1.0])]},
        fusellm.InputTypeError,
        "base_ids[0] must hold integers, got dtype float64",
    ),
    (
        "float top-K ids",
        {"blend_topk_ids": [np.zeros((2, 2), np.float32)]},
        fusellm.InputTypeError,
        "blend_topk_ids[0] must hold integers, got dtype float32",
    ),
    (
        "int logits",
        {"blend_topk_logits": [np.array([[1, 0], [1, 0]])]},
        fusellm.InputTypeError,
        "blend_topk_logits[0] must hold floating-point logits, got dtype int64",
    ),
    (
        "complex logits",
        {"blend_topk_logits": [np.zeros((2, 2), complex)]},
        fusellm.InputTypeError,
        "got dtype complex128",
    ),
    (
        "object ids",
        {"base_ids": [np.array([0, "a"], dtype=object)]},
        fusellm.InputTypeError,
        "got dtype object",
    ),
    # --- ids
    (
        "negative base id",
        {"base_ids": [np.array([0, -1])]},
        fusellm.InputError,
        "base token id -1 at position 1",
    ),
    (
        "base id beyond the vocabulary",
        {"base_ids": [np.array([4, 0])]},
        fusellm.InputError,
        "base token id 4 at position 0",
    ),
    (
        "base id without a string",
        {"base_ids": [np.array([0, 2])]},
        fusellm.InputError,
        "base token id 2 at position 1",
    ),
    (
        "blend id without a string",
        {"blend_ids": [np.array([3, 0])]},
        fusellm.InputError,
        "blend token id 3 at position 0",
    ),
    (
        "blend id beyond the vocabulary",
        {"blend_ids": [np.array([0, 17])]},
        fusellm.InputError,
        "blend token id 17",
    ),
    (
        "negative top-K id",
        {"blend_topk_ids": [np.array([[0, 1], [-5, 2]])]},
        fusellm.InputError,
        "top-K id -5 at position 1, rank 0",
    ),
    (
        "id beyond int32",
        {"base_ids": [np.array([0, 2**40])]},
        fusellm.InputError,
        "1099511627776",
    ),
    (
        "top-K id beyond int32",
        {"blend_topk_ids": [np.array([[0, 2**31], [0, 1]])]},
        fusellm.InputError,
        "2147483648",
    ),
    # --- empty sequences
    (
        "empty base sequence",
        {"base_ids": [np.array([], np.int32)], "base_offsets": [np.zeros((0, 2), int)]},
        fusellm.InputError,
        "the base sequence is empty",
    ),
    (
        "empty base sequence as a list",
        {"base_ids": [[]], "method": "mined"},
        fusellm.InputError,
        "the base sequence is empty",
    ),
    (
        "empty blend sequence",
        {
            "blend_ids": [np.array([], np.int32)],
            "blend_topk_ids": [np.zeros((0, 2), np.int32)],
            "blend_topk_logits": [np.zeros((0, 2), np.float32)],
            "blend_offsets": [np.zeros((0, 2), int)],
        },
        fusellm.InputError,
        "the blend sequence is empty",
    ),
    # --- logits
    (
        "NaN logit",
        {"blend_topk_logits": [np.array([[1.0, 0.0], [np.nan, 0.0]])]},
        fusellm.InputError,
        "logit at position 1, rank 0 is NaN",
    ),
    (
        "NaN float16 logit",
        {"blend_topk_logits": [np.array([[1.0, np.nan], [0.0, 0.0]], np.float16)]},
        fusellm.InputError,
        "position 0, rank 1 is NaN",
    ),
    # --- offsets
    (
        "offsets missing",
        {"base_offsets": None},
        fusellm.InputError,
        'method="offsets" needs base_offsets and blend_offsets',
    ),
    (
        "offsets of shape [L, 3]",
        {"base_offsets": [np.zeros((2, 3), int)]},
        fusellm.InputTypeError,
        "base_offsets[0] must have shape [L, 2], got shape (2, 3)",
    ),
    (
        "float offsets",
        {"blend_offsets": [np.array([[0.0, 1.0], [1.0, 2.0]])]},
        fusellm.InputTypeError,
        "blend_offsets[0] must hold integer character offsets, got dtype float64",
    ),
    (
        "negative start",
        {"base_offsets": [np.array([[-1, 1], [1, 2]])]},
        fusellm.InputError,
        "token 0 has offsets (-1, 1)",
    ),
    (
        "start after end",
        {"blend_offsets": [np.array([[0, 1], [3, 2]])]},
        fusellm.InputError,
        "blend_offsets: token 1 has offsets (3, 2)",
    ),
    (
        "decreasing ends",
        {"base_offsets": [np.array([[0, 3], [1, 2]])]},
        fusellm.InputError,
        "token 1 ends at 2, before the previous token's end 3",
    ),
    (
        "offset rows != tokens",
        {"base_offsets": [np.array([[0, 2]])]},
        fusellm.InputError,
        "offsets have 1 base and 2 blend rows",
    ),
    # --- options
    ("unknown method", {"method": "dtw"}, ValueError, '"dtw"'),
    ("unknown vocab mode", {"vocab": "medium"}, ValueError, '"medium"'),
    ("num_threads = 0", {"num_threads": 0}, fusellm.InputError, "got 0"),
    ("num_threads < 0", {"num_threads": -2}, fusellm.InputError, "got -2"),
    ("num_threads = True", {"num_threads": True}, fusellm.InputError, "got True"),
    ("num_threads float", {"num_threads": 1.5}, fusellm.InputError, "got 1.5"),
    ("num_threads str", {"num_threads": "2"}, fusellm.InputError, "got '2'"),
    ("num_threads beyond usize", {"num_threads": 2**70}, ValueError, str(2**70)),
]


@pytest.mark.parametrize(
    ("changes", "exc", "message"),
    [pytest.param(c, e, m, id=name) for name, c, e, m in CASES],
)
def test_bad_align_batch_input(
    aligner: fusellm.Aligner, changes: dict[str, Any], exc: type[BaseException], message: str
) -> None:
    with pytest.raises(exc, match=re.escape(message)):
        call(aligner, **changes)


def test_error_classes() -> None:
    assert issubclass(fusellm.InputError, ValueError)
    assert issubclass(fusellm.InputTypeError, TypeError)
    assert issubclass(fusellm.InputError, fusellm.FuseLLMError)


def test_errors_name_the_failing_sequence(aligner: fusellm.Aligner) -> None:
    ok = valid()
    with pytest.raises(fusellm.InputError, match="sequence 1: base token id 9"):
        aligner.align_batch(
            [ok["base_ids"][0], np.array([9])],
            ok["blend_ids"] * 2,
            ok["blend_topk_ids"] * 2,
            ok["blend_topk_logits"] * 2,
        )


def test_compat_with_offsets_is_an_input_error() -> None:
    ref = fusellm.Aligner(BASE, BLEND, base_marker=SPM, blend_marker=BBPE, compat="fusellm")
    with pytest.raises(fusellm.InputError, match='compat="fusellm"'):
        call(ref)


def test_function_form_needs_an_aligner() -> None:
    with pytest.raises(fusellm.InputTypeError, match="got str"):
        fusellm.align_batch("aligner", [], [], [], [])  # type: ignore[arg-type]


# --- coercions that must work ------------------------------------------------------------------


def test_non_contiguous_and_foreign_layouts_are_coerced(aligner: fusellm.Aligner) -> None:
    want = call(aligner)[0]
    odd = call(
        aligner,
        base_ids=[np.array([0, 9, 1, 9])[::2]],  # strided
        blend_ids=[np.array([0, 1], dtype=">i8")],  # big-endian
        blend_topk_ids=[np.asfortranarray(np.array([[0, 1], [1, 2]], np.int32))],  # Fortran
        blend_topk_logits=[np.array([[1.0, 7.0, 0.0], [1.0, 7.0, 0.0]])[:, ::2]],  # strided
        base_offsets=[np.array([[0, 1], [1, 2]], ">i4").T.copy().T],
        blend_offsets=[np.array([[0, 1, 2], [1, 2, 3]]).T[:2]],
    )[0]
    np.testing.assert_array_equal(want.ids, odd.ids)
    np.testing.assert_array_equal(want.logits, odd.logits)
    np.testing.assert_array_equal(want.status, odd.status)
    # plain lists, tuples, other integer and float dtypes
    odd = call(
        aligner,
        base_ids=([0, 1],),
        blend_ids=[np.array([0, 1], np.uint8)],
        blend_topk_ids=[[[0, 1], [1, 2]]],
        blend_topk_logits=[np.array([[1.0, 0.0], [1.0, 0.0]], np.float16)],
        base_offsets=[[[0, 1], [1, 2]]],
    )[0]
    np.testing.assert_array_equal(want.ids, odd.ids)
    np.testing.assert_array_equal(want.logits, odd.logits)


def test_huge_float64_logits_saturate_quietly(aligner: fusellm.Aligner) -> None:
    """float64 logits beyond the float32 range become +-inf, without a numpy RuntimeWarning
    escaping from the library (an error under filterwarnings=error): -inf is padding, +inf is
    refused (it is no probability)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        row = call(aligner, blend_topk_logits=[np.array([[1.0, -1e300], [1.0, 0.0]])])[0]
        assert row.logits[0, 1] == -np.inf
        with pytest.raises(fusellm.InputError, match="is inf"):
            call(aligner, blend_topk_logits=[np.array([[1e300, -1e300], [1.0, 0.0]])])


# --- the constructor and mined_base_to_blend ----------------------------------------------------

CTOR_CASES: list[tuple[str, tuple[Any, Any], dict[str, Any], type[BaseException], str]] = [
    ("base vocab as dict", ({"▁a": 0}, BLEND), {}, fusellm.InputTypeError, "base_vocab must list"),
    ("blend vocab as dict", (BASE, {"a": 0}), {}, fusellm.InputTypeError, "blend_vocab must list"),
    ("non-str entry", (["▁a", 3], BLEND), {}, fusellm.InputTypeError, "base_vocab[1]"),
    ("bytes entry", (BASE, ["a", b"b"]), {}, fusellm.InputTypeError, "blend_vocab[1]"),
    ("empty base vocab", ([], BLEND), {}, fusellm.InputError, "base 0"),
    ("empty blend vocab", (BASE, []), {}, fusellm.InputError, "blend 0"),
    ("empty base marker", (BASE, BLEND), {"base_marker": ""}, fusellm.InputError, "base_marker"),
    ("empty blend marker", (BASE, BLEND), {"blend_marker": ""}, fusellm.InputError, "blend_marker"),
    ("unknown compat", (BASE, BLEND), {"compat": "ref"}, fusellm.InputError, "'ref'"),
    ("unknown fallback", (BASE, BLEND), {"fallback": "current"}, fusellm.InputError, "'current'"),
    (
        "vocab map as list",
        (BASE, BLEND),
        {"vocab_map": [("a", "b")]},
        fusellm.InputTypeError,
        "list",
    ),
]


@pytest.mark.parametrize(
    ("args", "kwargs", "exc", "message"),
    [pytest.param(a, k, e, m, id=name) for name, a, k, e, m in CTOR_CASES],
)
def test_bad_aligner_arguments(
    args: tuple[Any, Any], kwargs: dict[str, Any], exc: type[BaseException], message: str
) -> None:
    kw = {"base_marker": SPM, "blend_marker": BBPE, **kwargs}
    with pytest.raises(exc, match=re.escape(message)):
        fusellm.Aligner(*args, **kw)


def test_bad_targets_mode(aligner: fusellm.Aligner) -> None:
    with pytest.raises(ValueError, match='"fuzzy"'):
        aligner.targets("fuzzy")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("base", "blend", "exc", "message"),
    [
        ([], ["a"], fusellm.InputError, "base length 0"),
        (["a"], [], fusellm.InputError, "blend length 0"),
        ("ab", ["a"], fusellm.InputTypeError, "base_tokens"),
        (["a", 1], ["a"], fusellm.InputTypeError, "base_tokens"),
        (["a"], ["b", None], fusellm.InputTypeError, "blend_tokens"),
    ],
)
def test_bad_mined_input(base: Any, blend: Any, exc: type[BaseException], message: str) -> None:
    with pytest.raises(exc, match=re.escape(message)):
        fusellm.mined_base_to_blend(base, blend, base_marker=SPM, blend_marker=BBPE)


# --- hypothesis: anything malformed raises only the documented exception types -----------------

DTYPES = [
    np.int8,
    np.int32,
    np.int64,
    np.uint32,
    np.uint64,
    np.float16,
    np.float32,
    np.float64,
    np.bool_,
]
junk = st.one_of(
    st.none(),
    st.integers(-(2**65), 2**65),
    st.floats(),
    st.text(max_size=3),
    st.lists(st.integers(-3, 6), max_size=4),
    st.lists(st.lists(st.integers(-3, 6), max_size=3), max_size=3),
    st.lists(st.floats(allow_nan=True), max_size=3),
    st.sampled_from(DTYPES).flatmap(
        lambda dt: hnp.arrays(
            dt,
            hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
            # float64 values beyond the float32 range are test_huge_float64_logits' business
            elements=st.floats(width=min(32, 8 * np.dtype(dt).itemsize))
            if np.dtype(dt).kind == "f"
            else None,
        )
    ),
)
small_ints = st.one_of(
    hnp.arrays(
        st.sampled_from([np.int32, np.int64, np.int16]),
        hnp.array_shapes(min_dims=1, max_dims=2, min_side=0, max_side=4),
        elements=st.integers(-2, 6),
    ),
    hnp.arrays(
        st.sampled_from([np.uint8, np.uint64]),
        hnp.array_shapes(min_dims=1, max_dims=2, min_side=0, max_side=4),
        elements=st.integers(0, 6),
    ),
)
offsets_like = hnp.arrays(
    np.int64,
    st.tuples(st.integers(0, 3), st.sampled_from([2, 2, 2, 1, 3])),
    elements=st.integers(-2, 5),
)
logits_like = hnp.arrays(
    st.sampled_from([np.float16, np.float32, np.float64]),
    hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=4),
    elements=st.floats(width=16),
)
FIELDS = {
    "base_ids": st.one_of(small_ints, junk),
    "blend_ids": st.one_of(small_ints, junk),
    "blend_topk_ids": st.one_of(small_ints, junk),
    "blend_topk_logits": st.one_of(logits_like, junk),
    "base_offsets": st.one_of(offsets_like, junk),
    "blend_offsets": st.one_of(offsets_like, junk),
}


def _same_shape(name: str, shape: tuple[int, ...]) -> st.SearchStrategy[Any]:
    """New values for a field, keeping its valid shape (reaches the native validation)."""
    if name == "blend_topk_logits":
        values = st.one_of(st.floats(width=32), st.sampled_from([np.nan, np.inf, -np.inf, -0.0]))
        return hnp.arrays(np.float32, shape, elements=values)
    return hnp.arrays(np.int64, shape, elements=st.integers(-3, 8))


@st.composite
def malformed_calls(draw: st.DrawFn) -> dict[str, Any]:
    kw = valid()
    kw["method"] = draw(st.sampled_from(["offsets", "mined"]))
    names = draw(st.lists(st.sampled_from(sorted(FIELDS)), min_size=1, max_size=3, unique=True))
    for name in names:
        how = draw(
            st.sampled_from(["values"] * 4 + ["shape"] * 3 + ["extra", "drop", "whole", "none"])
        )
        if how == "values":
            kw[name] = [draw(_same_shape(name, kw[name][0].shape))]
        elif how == "shape":
            kw[name] = [draw(FIELDS[name])]
        elif how == "extra":
            kw[name] = [*kw[name], draw(FIELDS[name])]
        elif how == "drop":
            kw[name] = []
        elif how == "whole":
            kw[name] = draw(junk)
        else:
            kw[name] = None
    if draw(st.integers(0, 7)) == 0:
        kw["vocab"] = draw(st.one_of(st.sampled_from(["hard", "soft"]), st.text(max_size=4)))
    if draw(st.integers(0, 7)) == 0:
        kw["method"] = draw(st.one_of(st.text(max_size=4), st.none()))
    if draw(st.integers(0, 3)) == 0:
        kw["num_threads"] = draw(st.sampled_from([None, 1, 2, 3, 0, -1, True, 1.5, "2", []]))
    return kw


@given(malformed_calls(), st.sampled_from([None, "fusellm"]))
def test_malformed_align_batch_raises_only_documented_errors(
    kw: dict[str, Any], compat: str | None
) -> None:
    aligner = fusellm.Aligner(BASE, BLEND, base_marker=SPM, blend_marker=BBPE, compat=compat)  # type: ignore[arg-type]
    try:
        rows = aligner.align_batch(
            kw.pop("base_ids"),
            kw.pop("blend_ids"),
            kw.pop("blend_topk_ids"),
            kw.pop("blend_topk_logits"),
            **kw,
        )
    except ALLOWED:
        return
    except BaseException as e:  # PanicException is a BaseException
        pytest.fail(f"{type(e).__module__}.{type(e).__name__}: {e}")
    for row in rows:
        assert row.ids.shape == row.logits.shape
        assert row.status.shape == (row.ids.shape[0],)


vocab_entry = st.one_of(
    st.text(alphabet="ab▁Ġ", max_size=3), st.none(), st.integers(), st.binary(max_size=2)
)


@given(
    base=st.one_of(
        st.lists(vocab_entry, max_size=4), junk, st.dictionaries(st.text(max_size=2), st.integers())
    ),
    blend=st.one_of(st.lists(vocab_entry, max_size=4), junk),
    base_marker=st.one_of(st.sampled_from([SPM, BBPE, ""]), st.none(), st.integers()),
    blend_marker=st.one_of(st.sampled_from([SPM, BBPE, ""]), st.text(max_size=2)),
    vocab_map=st.one_of(
        st.none(),
        st.dictionaries(
            st.one_of(st.text(max_size=2), st.integers()), st.one_of(st.text(max_size=2), st.none())
        ),
        junk,
    ),
    compat=st.one_of(st.none(), st.just("fusellm"), st.text(max_size=3)),
    fallback=st.one_of(st.sampled_from(["next", "mask"]), st.text(max_size=3), st.none()),
)
def test_malformed_aligner_raises_only_documented_errors(**kwargs: Any) -> None:
    base, blend = kwargs.pop("base"), kwargs.pop("blend")
    try:
        fusellm.Aligner(base, blend, **kwargs)
    except ALLOWED:
        pass
    except BaseException as e:
        pytest.fail(f"{type(e).__module__}.{type(e).__name__}: {e}")


@given(
    base=st.one_of(
        st.lists(st.one_of(st.text(max_size=3), st.none(), st.integers()), max_size=4), junk
    ),
    blend=st.one_of(st.lists(st.one_of(st.text(max_size=3), st.none()), max_size=4), junk),
    base_marker=st.one_of(st.text(max_size=2), st.none()),
    blend_marker=st.one_of(st.text(max_size=2), st.integers()),
)
def test_malformed_mined_raises_only_documented_errors(
    base: Any, blend: Any, base_marker: Any, blend_marker: Any
) -> None:
    try:
        fusellm.mined_base_to_blend(base, blend, base_marker=base_marker, blend_marker=blend_marker)
    except ALLOWED:
        pass
    except BaseException as e:
        pytest.fail(f"{type(e).__module__}.{type(e).__name__}: {e}")
