"""MinED DTW (spec section 4): ``fusellm.mined_base_to_blend`` against the pure-Python oracle."""

from __future__ import annotations

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

import fusellm
from oracle import levenshtein
from oracle import mined_base_to_blend as oracle_mined

SPM, BBPE = "▁", "Ġ"
MARKER_PAIRS = [(SPM, BBPE), (BBPE, SPM), (SPM, SPM), (BBPE, BBPE)]


def _examples(fraction: float) -> int:
    return max(5, int(settings.default.max_examples * fraction))


def rust(base: list[str], blend: list[str], base_marker: str = SPM, blend_marker: str = BBPE):
    return fusellm.mined_base_to_blend(
        base, blend, base_marker=base_marker, blend_marker=blend_marker
    )


# --- golden ------------------------------------------------------------------------------------

GOLDEN = [
    # blend, base, base_to_blend (spec section 4, the worked cases)
    (["Ġhel", "lo", "Ġworld"], ["▁hello", "▁world"], [[0, 1], [2]]),
    (["Ġhello", "Ġworld"], ["▁hel", "lo", "▁world"], [[0], [0], [1]]),
    (["The", "Ġcat", "Ġsat", "."], ["▁The", "▁cat", "▁s", "at", "."], [[0], [1], [2], [2], [3]]),
    (["Ġ1850", "Ġx"], ["▁", "1", "8", "5", "0", "▁x"], [[0], [1], [1], [1], [1], [1]]),
]


@pytest.mark.parametrize(("blend", "base", "expected"), GOLDEN)
def test_spec_worked_cases(blend: list[str], base: list[str], expected: list[list[int]]) -> None:
    assert rust(base, blend) == expected
    assert oracle_mined(base, blend, SPM, BBPE) == expected


def test_length_one_sequences() -> None:
    assert rust(["▁a"], ["Ġb"]) == [[0]]
    assert rust(["▁a", "b", "c"], ["x"]) == [[0], [0], [0]]
    assert rust(["x"], ["Ġa", "b", "c"]) == [[0, 1, 2]]


def test_returns_plain_lists() -> None:
    out = rust(["▁a", "b"], ["a", "b"])
    assert type(out) is list
    assert all(type(v) is list and all(type(x) is int for x in v) for v in out)


def test_levenshtein_oracle_known_values() -> None:
    assert levenshtein("", "") == 0
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("flaw", "lawn") == 2
    # code points, not bytes and not UTF-16 units
    assert levenshtein("é", "e") == 1
    assert levenshtein("𝄞", "a") == 1
    assert levenshtein("寿司", "司") == 1


def test_markers_are_stripped_everywhere() -> None:
    # "a▁b" strips to "ab": it equals the blend "ab" exactly, so "x" is left to the other token
    assert rust(["▁x", "a▁b"], ["x", "ab"]) == oracle_mined(["▁x", "a▁b"], ["x", "ab"], SPM, BBPE)
    # a lone marker is the empty string
    assert rust(["▁", "▁a"], ["Ġ", "a"]) == [[0], [1]]


# --- hypothesis --------------------------------------------------------------------------------

# code points: ASCII, both markers, Latin-1, CJK, an astral character (two UTF-16 units) and a
# combining accent
ALPHABET = "ab▁Ġé寿𝄞\u0301"
short_token = st.text(alphabet=ALPHABET, max_size=4)
marker_token = st.text(alphabet="▁Ġa", max_size=5)
long_token = st.text(alphabet="ab▁Ġ", min_size=60, max_size=140)
# spellings of real vocabularies: SentencePiece byte fallback, byte-level BPE bytes (Ċ newline,
# âĢĶ em dash, Ã© é)
byte_token = st.sampled_from(
    ["<0xE5>", "<0xAF>", "<0x0A>", "▁<0x0A>", "<0x>", "Ċ", "ĊĊ", "Ã©", "ĠâĢĶ", "âĢĶ", "å¯¿", "ĉ"]
)
# any code point but lone surrogates (not representable in a Rust String): a wide range of
# distinct characters
wide_token = st.text(st.characters(exclude_categories=["Cs"]), max_size=5)
token = st.one_of(
    short_token,
    short_token,
    marker_token,
    byte_token,
    wide_token,
    st.sampled_from(["", "▁", "Ġ", "▁▁"]),
)
markers = st.sampled_from(MARKER_PAIRS)


@given(
    base=st.lists(token, min_size=1, max_size=24),
    blend=st.lists(token, min_size=1, max_size=24),
    mk=markers,
)
@example(base=["▁hello", "▁world"], blend=["Ġhel", "lo", "Ġworld"], mk=(SPM, BBPE))
@example(base=[""], blend=[""], mk=(SPM, SPM))
@example(base=["▁", "▁"], blend=["Ġ"], mk=(SPM, BBPE))
def test_random_tokens(base: list[str], blend: list[str], mk: tuple[str, str]) -> None:
    assert rust(base, blend, *mk) == oracle_mined(base, blend, *mk)


@given(
    base=st.lists(st.one_of(short_token, long_token), min_size=1, max_size=6),
    blend=st.lists(st.one_of(short_token, long_token), min_size=1, max_size=6),
    mk=markers,
)
@settings(max_examples=_examples(0.5))
def test_long_tokens(base: list[str], blend: list[str], mk: tuple[str, str]) -> None:
    assert rust(base, blend, *mk) == oracle_mined(base, blend, *mk)


@given(
    base=st.lists(token, min_size=30, max_size=120),
    blend=st.lists(token, min_size=30, max_size=120),
    mk=markers,
)
@settings(max_examples=_examples(0.1))
def test_long_unrelated_sequences(base: list[str], blend: list[str], mk: tuple[str, str]) -> None:
    """Unrelated sequences: any bound taken from a guide path is loose, ties are everywhere."""
    assert rust(base, blend, *mk) == oracle_mined(base, blend, *mk)


@given(
    a=st.text(alphabet="abc", max_size=140),
    b=st.text(alphabet="abc", max_size=140),
    x=st.text(alphabet="abc", max_size=140),
)
@example(a="a" * 64, b="b" * 64, x="a" * 32 + "b" * 33)
@example(a="ab" * 33, b="ba" * 33, x="a" * 65)
@settings(max_examples=_examples(0.5))
def test_distance_probe(a: str, b: str, x: str) -> None:
    """blend [a, x, b] on base [a, b]: x goes to base 0 iff lev(x, a) <= lev(x, b) (roughly), so
    the alignment exposes comparisons of long (> 64 code point) distances."""
    base, blend = ["▁" + a, "▁" + b], ["Ġ" + a, "Ġ" + x, "Ġ" + b]
    assert rust(base, blend) == oracle_mined(base, blend, SPM, BBPE)


@st.composite
def two_segmentations(draw: st.DrawFn) -> tuple[list[str], list[str]]:
    """The same words cut in two random ways, each side with its own marker (the realistic
    case, where the pruning bound is tight)."""
    words = draw(st.lists(st.text(alphabet="abcdeé寿", min_size=1, max_size=8), max_size=40))
    words = words or ["x"]

    def segment(marker: str) -> list[str]:
        out: list[str] = []
        for w in words:
            cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(w) - 1)), max_size=3))))
            cuts = [c for c in cuts if 0 < c < len(w)]
            pieces = [w[i:j] for i, j in zip([0, *cuts], [*cuts, len(w)], strict=True)]
            if draw(st.booleans()):
                out.append(marker)  # a lone marker before the word
            else:
                pieces[0] = marker + pieces[0]
            out.extend(pieces)
        return out

    return segment("▁"), segment("Ġ")


@given(two_segmentations())
@settings(max_examples=_examples(0.5))
def test_same_text_two_segmentations(seg: tuple[list[str], list[str]]) -> None:
    base, blend = seg
    assert rust(base, blend) == oracle_mined(base, blend, SPM, BBPE)


@st.composite
def long_noisy_pairs(draw: st.DrawFn) -> tuple[list[str], list[str]]:
    """Longer sequences (up to a few hundred tokens) of the same words, then a few random edits on
    one side: the pruning bound is no longer tight, and ties appear around the edits."""
    vocab = ["the", "a", "cat", "s", "at", "1", "8", "é", "寿司"]
    n = draw(st.integers(1, 150))
    words = draw(st.lists(st.sampled_from(vocab), min_size=n, max_size=n))
    cuts = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    base: list[str] = []
    for w, cut in zip(words, cuts, strict=True):
        base.extend(["▁" + w[:1], w[1:]] if cut and len(w) > 1 else ["▁" + w])
    blend = ["Ġ" + w for w in words]
    for _ in range(draw(st.integers(0, 6))):
        side = draw(st.sampled_from([base, blend]))
        pos = draw(st.integers(0, len(side)))
        op = draw(st.sampled_from(["insert", "delete", "replace"]))
        tok = draw(st.sampled_from(["Ġ", "▁", "", "x", "Ġthe", "▁cat", "8"]))
        if op == "insert":
            side.insert(pos, tok)
        elif len(side) > 1 and pos < len(side):
            if op == "delete":
                del side[pos]
            else:
                side[pos] = tok
    return base, blend


@given(long_noisy_pairs())
@settings(max_examples=_examples(0.2))
def test_long_noisy_sequences(pair: tuple[list[str], list[str]]) -> None:
    base, blend = pair
    assert rust(base, blend) == oracle_mined(base, blend, SPM, BBPE)


@given(
    base=st.lists(token, min_size=1, max_size=12),
    blend=st.lists(token, min_size=1, max_size=12),
)
def test_alignment_invariants(base: list[str], blend: list[str]) -> None:
    out = rust(base, blend)
    assert len(out) == len(base)
    assert all(group and group == sorted(set(group)) for group in out)
    assert out[0][0] == 0
    assert out[-1][-1] == len(blend) - 1
    assert sorted({i for group in out for i in group}) == list(range(len(blend)))
    # monotone warping path
    flat = [i for group in out for i in group]
    assert flat == sorted(flat)


def test_identical_sequences_align_diagonally() -> None:
    toks = ["▁The", "▁cat", "▁s", "at", "."]
    assert rust(toks, toks, SPM, SPM) == [[i] for i in range(len(toks))]


@given(st.lists(token, min_size=1, max_size=10))
def test_empty_side_is_an_input_error(toks: list[str]) -> None:
    assume(toks)
    with pytest.raises(fusellm.InputError, match="non-empty"):
        rust([], toks)
    with pytest.raises(fusellm.InputError, match="non-empty"):
        rust(toks, [])
