"""Malformed input for every public array-taking function of ``fusellm`` and ``fusellm._native``,
drawn by hypothesis and run under an address-space limit.

Each call must return or raise a documented error (``InputError`` / ``InputTypeError``, or at
least ``ValueError`` / ``TypeError``): never a panic (``PanicException``), an abort, a
``MemoryError`` or ``OverflowError``. The limit (``RLIMIT_AS`` = what the process maps now plus
1 GiB, lowered around each call and raised back after) turns an allocation driven by a size in
the input into a failed allocation in the test instead of a machine out of memory: the core must
report it as an error, not abort the process.
"""

from __future__ import annotations

import contextlib
import resource
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fusellm
from fusellm import _native

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc/self/status are Linux's"
)

ALLOWED = (fusellm.InputError, fusellm.InputTypeError, ValueError, TypeError)
SPM, BBPE = "▁", "Ġ"
HEADROOM = 1 << 30


def _mapped_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmSize")  # pragma: no cover


@contextlib.contextmanager
def memory_limit() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _mapped_bytes() + HEADROOM
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def documented(call: Callable[[], Any]) -> None:
    """Runs ``call`` under the limit: a result or a documented error, nothing else."""
    with memory_limit():
        try:
            call()
        except ALLOWED:
            pass
        except BaseException as e:  # a PanicException is a BaseException
            raise AssertionError(f"undocumented {type(e).__name__}: {e}") from e


# --- strategies ----------------------------------------------------------------------------------

DTYPES = st.sampled_from(
    [np.int8, np.int32, np.int64, np.uint8, np.uint64, np.float16, np.float32, np.float64, bool]
)
HUGE = st.sampled_from(
    [2**31 - 1, 2**31, 2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64, -1, -(2**63)]
)
INTS = st.one_of(st.integers(-3, 40), HUGE)


@st.composite
def arrays(draw: st.DrawFn, max_dims: int = 3) -> Any:
    dtype = draw(DTYPES)
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=max_dims, min_side=0, max_side=5))
    return draw(hnp.arrays(dtype, shape))


@st.composite
def offsets(draw: st.DrawFn) -> Any:
    kind = draw(st.sampled_from(["valid", "huge", "array"]))
    if kind == "valid":
        lens = draw(st.lists(st.integers(0, 6), max_size=6))
        return np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    if kind == "huge":
        return np.array([0, *sorted(draw(st.lists(HUGE.filter(lambda v: v >= 0), max_size=3)))])
    return draw(arrays(max_dims=2))


VALUES = st.one_of(arrays(), INTS, st.none(), st.text(max_size=3), st.lists(INTS, max_size=3))
TOKENS = st.text(alphabet="ab▁Ġ\ud800é", max_size=4)
VOCABS = st.one_of(
    st.lists(st.one_of(TOKENS, st.none()), max_size=6),
    st.text(max_size=4),
    st.dictionaries(TOKENS, st.integers(0, 3), max_size=3),
    arrays(max_dims=1),
)
SETTINGS = settings(
    max_examples=max(25, settings.default.max_examples // 2),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    deadline=None,
)


# --- fusellm -------------------------------------------------------------------------------------


@SETTINGS
@given(
    columns=st.dictionaries(st.sampled_from(["x", "y"]), arrays(), max_size=2),
    offsets=offsets(),
    block_size=INTS,
    scores=st.one_of(st.none(), st.dictionaries(st.just("s"), arrays(max_dims=2), max_size=1)),
    mode=st.sampled_from(["concat", "bfd", "other"]),
)
def test_pack(columns: Any, offsets: Any, block_size: Any, scores: Any, mode: Any) -> None:
    documented(
        lambda: fusellm.pack(columns, offsets, block_size=block_size, scores=scores, mode=mode)
    )


@pytest.fixture(scope="module")
def aligner() -> fusellm.Aligner:
    base, blend = ["▁a", "b", None, "▁c"], ["Ġa", "b", "Ġc", None]
    return fusellm.Aligner(base, blend, base_marker=SPM, blend_marker=BBPE, vocab_map={"b": "b"})


@SETTINGS
@given(
    seqs=st.lists(st.tuples(VALUES, VALUES, VALUES, VALUES, VALUES, VALUES), max_size=3),
    method=st.sampled_from(["mined", "offsets", "dtw"]),
    vocab=st.sampled_from(["hard", "soft", "x"]),
    num_threads=st.one_of(st.none(), INTS),
)
def test_align_batch(
    aligner: fusellm.Aligner, seqs: Any, method: Any, vocab: Any, num_threads: Any
) -> None:
    cols = [list(c) for c in zip(*seqs, strict=True)] if seqs else [[]] * 6
    documented(
        lambda: aligner.align_batch(
            cols[0],
            cols[1],
            cols[2],
            cols[3],
            method=method,
            vocab=vocab,
            base_offsets=cols[4] if method == "offsets" else None,
            blend_offsets=cols[5] if method == "offsets" else None,
            num_threads=num_threads,
        )
    )


@SETTINGS
@given(
    base=VOCABS,
    blend=VOCABS,
    markers=st.tuples(st.one_of(TOKENS, st.none()), st.one_of(TOKENS, st.none())),
    method=st.sampled_from(["exact", "mined", "surface", "x"]),
    num_threads=st.one_of(st.none(), INTS),
    max_distance=st.one_of(st.none(), INTS),
)
def test_vocab_map_build(
    base: Any, blend: Any, markers: Any, method: Any, num_threads: Any, max_distance: Any
) -> None:
    documented(
        lambda: fusellm.VocabMap.build(
            base,
            blend,
            base_marker=markers[0],
            blend_marker=markers[1],
            method=method,
            num_threads=num_threads,
            max_distance=max_distance,
        )
    )


@SETTINGS
@given(
    mapping=st.one_of(st.dictionaries(TOKENS, st.one_of(TOKENS, INTS), max_size=4), VALUES),
    base=VOCABS,
    blend=VOCABS,
)
def test_vocab_map_from_dict_and_aligner(mapping: Any, base: Any, blend: Any) -> None:
    documented(
        lambda: fusellm.VocabMap.from_dict(mapping, base, blend, base_marker=SPM, blend_marker=BBPE)
    )
    documented(
        lambda: fusellm.Aligner(base, blend, base_marker=SPM, blend_marker=BBPE, vocab_map=mapping)
    )


@SETTINGS
@given(base=VOCABS, blend=VOCABS, markers=st.tuples(TOKENS, TOKENS))
def test_mined_base_to_blend(base: Any, blend: Any, markers: Any) -> None:
    documented(
        lambda: fusellm.mined_base_to_blend(
            base, blend, base_marker=markers[0], blend_marker=markers[1]
        )
    )


@SETTINGS
@given(vocab=VOCABS)
def test_tokenizer_marker(vocab: Any) -> None:
    documented(lambda: fusellm.tokenizer_marker(vocab))


# --- fusellm._native -----------------------------------------------------------------------------


@SETTINGS
@given(
    offsets=offsets(),
    block_size=INTS,
    mode=st.sampled_from(["concat", "bfd", "x"]),
    src=arrays(max_dims=1),
    width=INTS,
    scores=arrays(max_dims=1),
)
def test_native_pack_plan(
    offsets: Any, block_size: Any, mode: Any, src: Any, width: Any, scores: Any
) -> None:
    def run() -> None:
        plan = _native.PackPlan(offsets, block_size, mode)
        for bits in (8, 16, 32, 64):
            with contextlib.suppress(*ALLOWED):
                getattr(plan, f"gather_u{bits}")(src, width)
        with contextlib.suppress(*ALLOWED):
            plan.block_means(scores, "omit")
        plan.position_ids()

    documented(run)


@SETTINGS
@given(
    base=VOCABS,
    blend=VOCABS,
    markers=st.tuples(st.one_of(TOKENS, st.none()), st.one_of(TOKENS, st.none())),
    method=st.sampled_from(["exact", "mined", "surface", "x"]),
    num_threads=st.one_of(st.none(), INTS),
    pairs=st.one_of(st.lists(st.tuples(TOKENS, TOKENS), max_size=3), VALUES),
)
def test_native_vocab_functions(
    base: Any, blend: Any, markers: Any, method: Any, num_threads: Any, pairs: Any
) -> None:
    documented(
        lambda: _native.build_vocab_map(base, blend, markers[0], markers[1], method, num_threads)
    )
    documented(lambda: _native.describe_vocab_map(base, blend, markers[0], markers[1], pairs))
    documented(lambda: _native.nearest_brute_force(base, blend, num_threads))
    documented(lambda: _native.nearest_indexed(base, blend, num_threads))
    documented(lambda: _native.surface_bytes(markers[0], markers[1]))
    documented(lambda: _native.mined_base_to_blend(base, blend, markers[0], markers[1]))


@SETTINGS
@given(
    base=VOCABS,
    blend=VOCABS,
    pairs=st.one_of(st.none(), st.lists(st.tuples(TOKENS, TOKENS), max_size=3), VALUES),
    compat=st.one_of(st.booleans(), VALUES),
    fallback=st.sampled_from(["current", "next", "mask", "x"]),
    seqs=st.lists(st.tuples(VALUES, VALUES, VALUES, VALUES), max_size=2),
    num_threads=st.one_of(st.none(), INTS),
)
def test_native_aligner(
    base: Any, blend: Any, pairs: Any, compat: Any, fallback: Any, seqs: Any, num_threads: Any
) -> None:
    def run() -> None:
        a = _native.Aligner(base, blend, SPM, BBPE, pairs, compat, fallback)
        cols = [list(c) for c in zip(*seqs, strict=True)] if seqs else [[]] * 4
        for vocab in ("hard", "soft", "x"):
            with contextlib.suppress(*ALLOWED):
                a.targets(vocab)
            with contextlib.suppress(*ALLOWED):
                a.align_batch(*cols, None, None, "mined", vocab, num_threads)

    documented(run)
