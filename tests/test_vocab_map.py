"""Vocabulary mapping (spec section 5): ``fusellm.VocabMap`` against brute-force definitions.

- small vocabularies: the pure-Python definition (every pair measured, first minimum wins);
- real vocabularies: the native brute force (the same definition, compiled), itself checked
  against the pure-Python one, on a complete pair small enough to scan and on a random sample of
  the full Qwen -> Mistral map;
- the surface method against a pure-Python decoder; save/load/staleness; the Aligner hook.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fusellm
from fusellm import InputError, InputTypeError, StaleArtifactError, VocabMap, _native
from fusellm.vocab import MAP_EXACT, MAP_MINED, MAP_SURFACE, MAP_UNMAPPED, vocab_checksum
from oracle import levenshtein

SPM, BBPE = "▁", "Ġ"


def _examples(fraction: float) -> int:
    return max(5, int(settings.default.max_examples * fraction))


# --- pure-Python definitions -------------------------------------------------------------------


def oracle_nearest(base: list[str | None], t: str) -> tuple[int, int]:
    """Brute force of spec section 5: lowest id among the base strings nearest to ``t``."""
    best, best_id = None, -1
    for i, y in enumerate(base):
        if y is None:
            continue
        d = levenshtein(t, y)
        if best is None or d < best:
            best, best_id = d, i
    return best_id, (-1 if best is None else best)


def oracle_map(
    base: list[str | None], blend: list[str | None], bm: str, xm: str, method: str
) -> list[int]:
    index: dict[str, int] = {}
    for i, y in enumerate(base):
        if y is not None:
            index.setdefault(y, i)
    out = []
    for x in blend:
        if x is None:
            out.append(-1)
            continue
        t = x.replace(xm, bm)
        if t in index:
            out.append(index[t])
        elif method == "exact":
            out.append(-1)
        else:
            out.append(oracle_nearest(base, t)[0])
    return out


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}


def oracle_surface(token: str, marker: str) -> bytes | None:
    if marker == BBPE:
        if not all(c in BYTE_DECODER for c in token):
            return None
        return bytes(BYTE_DECODER[c] for c in token)
    if marker == SPM:
        if _is_piece(token):
            return bytes([int(token[3:5], 16)])
        return token.replace(SPM, " ").encode()
    return token.encode()


def oracle_surface_map(
    base: list[str | None], blend: list[str | None], bm: str, xm: str
) -> list[int]:
    """The surface rule written out: same bytes (exact string, else a non-<0xHH> token, else
    the lowest id), otherwise MinED. The map is a function of the key: the first blend id with a
    key decides."""
    index: dict[str, int] = {}
    by_surface: dict[bytes, int] = {}
    for i, y in enumerate(base):
        if y is None:
            continue
        index.setdefault(y, i)
        s = oracle_surface(y, bm)
        if s is None:
            continue
        if s not in by_surface:
            by_surface[s] = i
        else:
            cur = base[by_surface[s]]
            assert cur is not None
            if bm == SPM and _is_piece(cur) and not _is_piece(y):
                by_surface[s] = i
    decided: dict[str, int] = {}
    out = []
    for x in blend:
        if x is None:
            out.append(-1)
            continue
        t = x.replace(xm, bm)
        if t not in decided:
            s = oracle_surface(x, xm)
            target = None
            if s is not None and s in by_surface:
                e = index.get(t)
                same = e is not None and oracle_surface(base[e] or "", bm) == s
                target = e if same else by_surface[s]
            if target is None:
                target = index[t] if t in index else oracle_nearest(base, t)[0]
            decided[t] = target
        out.append(decided[t])
    return out


def _is_piece(tok: str) -> bool:
    hexdigits = "0123456789abcdefABCDEF"
    return (
        len(tok) == 6
        and tok.startswith("<0x")
        and tok.endswith(">")
        and all(c in hexdigits for c in tok[3:5])
    )


# --- small vocabularies ------------------------------------------------------------------------

ALPHABET = "ab▁Ġc<>0xAĊé"
# SentencePiece byte pieces, whole, so that surface matches happen often
PIECES = ["<0x0A>", "<0x61>", "<0xC3>", "<0xA9>", "<0xzz>"]
tokens = st.one_of(st.text(alphabet=ALPHABET, min_size=0, max_size=7), st.sampled_from(PIECES))
vocab = st.lists(st.one_of(st.none(), tokens), min_size=1, max_size=40)
MARKERS = [(SPM, BBPE), (BBPE, SPM), (SPM, SPM), (BBPE, BBPE)]


@given(base=vocab, blend=vocab, markers=st.sampled_from(MARKERS), threads=st.sampled_from([1, 2]))
@settings(max_examples=_examples(2.0))
def test_mined_and_exact_equal_the_definition(base, blend, markers, threads) -> None:
    bm, xm = markers
    for method in ("exact", "mined"):
        vm = VocabMap.build(
            base, blend, base_marker=bm, blend_marker=xm, method=method, num_threads=threads
        )
        assert vm.base_ids.tolist() == oracle_map(base, blend, bm, xm, method)
        for i, (b, d) in enumerate(zip(vm.base_ids.tolist(), vm.distances.tolist(), strict=True)):
            if b < 0:
                assert d == -1
                assert vm.kinds[i] == MAP_UNMAPPED
            else:
                t = blend[i].replace(xm, bm)  # type: ignore[union-attr]
                assert d == levenshtein(t, base[b])  # type: ignore[arg-type]
                assert vm.kinds[i] == (MAP_EXACT if d == 0 else MAP_MINED)


@given(
    base=vocab,
    blend=vocab,
    markers=st.sampled_from(MARKERS),
    method=st.sampled_from(["mined", "surface"]),
    cap=st.integers(1, 4),
)
@settings(max_examples=_examples(1.0))
def test_max_distance_unmaps_exactly_the_far_tokens(base, blend, markers, method, cap) -> None:
    bm, xm = markers
    kw = {"base_marker": bm, "blend_marker": xm, "method": method}
    full = VocabMap.build(base, blend, **kw)
    vm = VocabMap.build(base, blend, max_distance=cap, **kw)
    far = (full.kinds == MAP_MINED) & (full.distances > cap)
    assert vm.max_distance == cap
    assert vm.base_ids.tolist() == np.where(far, -1, full.base_ids).tolist()
    assert (vm.kinds[far] == MAP_UNMAPPED).all()
    assert (vm.distances[~far] == full.distances[~far]).all()
    # every mined token that is kept lies within the cap; exact and surface matches are kept
    assert (vm.distances[vm.kinds == MAP_MINED] <= cap).all()
    assert vm.stats()["unmapped"] == full.stats()["unmapped"] + int(far.sum())


@given(base=vocab, blend=vocab, markers=st.sampled_from(MARKERS))
@settings(max_examples=_examples(1.0))
def test_surface_equals_its_rule(base, blend, markers) -> None:
    bm, xm = markers
    vm = VocabMap.build(base, blend, base_marker=bm, blend_marker=xm, method="surface")
    assert vm.base_ids.tolist() == oracle_surface_map(base, blend, bm, xm)


@given(st.text(alphabet=ALPHABET + "ĠĊâĢĶ", max_size=8), st.sampled_from([SPM, BBPE, "#"]))
def test_surface_bytes(token, marker) -> None:
    assert _native.surface_bytes(token, marker) == oracle_surface(token, marker)


def test_nearest_index_equals_brute_force_on_long_strings() -> None:
    """Long, similar strings exercise every path of the index: deletion neighbourhoods up to
    four edits, the candidate cap, and the trie bound."""
    rng = np.random.default_rng(7)
    letters = np.array(list("abcdeé▁"))
    stems = ["".join(rng.choice(letters, size=rng.integers(3, 12))) for _ in range(60)]
    base: list[str | None] = []
    for _ in range(3000):
        s = list(stems[rng.integers(len(stems))])
        for _ in range(rng.integers(0, 5)):
            p = rng.integers(len(s) + 1)
            op = rng.integers(3)
            if op == 0:
                s.insert(p, str(rng.choice(letters)))
            elif p < len(s):
                s[p] = str(rng.choice(letters)) if op == 1 else ""
        base.append("".join(s) if rng.random() > 0.02 else None)
    queries = ["".join(rng.choice(letters, size=rng.integers(0, 20))) for _ in range(300)]
    queries += [stems[i % len(stems)] + "x" * (i % 6) for i in range(200)]
    fast = _native.nearest_indexed(base, queries, 2)
    slow = _native.nearest_brute_force(base, queries, 2)
    assert fast[0].tolist() == slow[0].tolist()
    assert fast[1].tolist() == slow[1].tolist()
    for q in queries[::25]:
        i = queries.index(q)
        assert (int(slow[0][i]), int(slow[1][i])) == oracle_nearest(base, q)


def test_ties_go_to_the_lowest_id() -> None:
    base = ["zz", "▁thx", "▁th", "▁tha", "▁thy"]
    vm = VocabMap.build(base, ["Ġthe"], base_marker=SPM, blend_marker=BBPE)
    assert vm.base_ids.tolist() == [1]  # "▁thx", "▁th", "▁tha" are all at distance 1
    assert vm.to_dict() == {"▁the": "▁thx"}


def test_results_do_not_depend_on_threads() -> None:
    rng = np.random.default_rng(0)
    base = ["".join(rng.choice(list("abc▁"), size=rng.integers(1, 6))) for _ in range(300)]
    blend = ["".join(rng.choice(list("abcĠd"), size=rng.integers(0, 8))) for _ in range(500)]
    maps = [
        VocabMap.build(base, blend, base_marker=SPM, blend_marker=BBPE, num_threads=n).base_ids
        for n in (1, 2, 3)
    ]
    assert all((m == maps[0]).all() for m in maps)


# --- real vocabularies -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen_on_mistral(qwen, mistral) -> VocabMap:
    return VocabMap.build(mistral.vocab, qwen.vocab, base_marker=SPM, blend_marker=BBPE)


def test_complete_map_of_a_small_real_pair(qwen, mistral) -> None:
    """Every blend token of a real pair, cut small enough for the brute force: every 8th
    Mistral id (the others have no string) and every 16th Qwen token."""
    base = [s if i % 8 == 0 else None for i, s in enumerate(mistral.vocab)]
    blend = qwen.vocab[::16]
    vm = VocabMap.build(base, blend, base_marker=SPM, blend_marker=BBPE)
    keys = [x.replace(BBPE, SPM) for x in blend]  # type: ignore[union-attr]
    ids, dist = _native.nearest_brute_force(base, keys, None)
    assert vm.base_ids.tolist() == ids.tolist()
    assert vm.distances.tolist() == dist.tolist()
    # The compiled brute force is the pure-Python definition.
    small = [s if i % 64 == 0 else None for i, s in enumerate(mistral.vocab)]
    sample = keys[::97]
    ids, dist = _native.nearest_brute_force(small, sample, None)
    assert [(int(i), int(d)) for i, d in zip(ids, dist, strict=True)] == [
        oracle_nearest(small, t) for t in sample
    ]


@pytest.mark.slow
def test_full_qwen_map_equals_the_brute_force_on_2000_tokens(qwen, mistral, qwen_on_mistral):
    rng = np.random.default_rng(2024)
    sample = rng.choice(len(qwen.vocab), size=2000, replace=False)
    keys = [qwen.vocab[i].replace(BBPE, SPM) for i in sample]  # type: ignore[union-attr]
    ids, dist = _native.nearest_brute_force(mistral.vocab, keys, None)
    assert qwen_on_mistral.base_ids[sample].tolist() == ids.tolist()
    assert qwen_on_mistral.distances[sample].tolist() == dist.tolist()


def test_real_map_statistics(qwen, mistral, qwen_on_mistral) -> None:
    vm = qwen_on_mistral
    s = vm.stats()
    assert s["blend_tokens"] == len(qwen.vocab)
    assert s["exact"] + s["mined"] + s["unmapped"] == len(qwen.vocab)
    assert sum(s["by_distance"].values()) == s["mined"]
    assert s["exact"] > 10_000
    assert s["unmapped"] == 0
    d = vm.to_dict()
    assert d["▁the"] == "▁the"
    assert all(mistral.index[v] >= 0 for v in d.values())


def test_surface_fixes_byte_spellings(qwen, mistral) -> None:
    vm = VocabMap.build(
        mistral.vocab, qwen.vocab, base_marker=SPM, blend_marker=BBPE, method="surface"
    )
    d = vm.to_dict()
    assert d["Ċ"] == "<0x0A>"
    assert d["ĊĊ"] != "<0x0A>"  # two newlines: no single-token surface, MinED decides
    assert d["▁the"] == "▁the"
    if "—" in mistral.index:
        assert d["âĢĶ"] == "—"
    s = vm.stats()
    assert s["surface"] > 1000
    # every surface match really has the same bytes
    for i in np.flatnonzero(vm.kinds == MAP_SURFACE)[::50]:
        x, y = qwen.vocab[i], mistral.vocab[vm.base_ids[i]]
        assert oracle_surface(x, BBPE) == oracle_surface(y, SPM)  # type: ignore[arg-type]


# --- output formats ----------------------------------------------------------------------------


def _small() -> tuple[list[str | None], list[str | None]]:
    base = ["<0x0A>", "▁the", "▁a", "—", "x", "▁th", None]
    blend = ["Ġthe", "Ċ", "âĢĶ", "Ġtha", "zz", None, "Ġthe"]
    return base, blend


def test_to_dict_and_arrays() -> None:
    base, blend = _small()
    vm = VocabMap.build(base, blend, base_marker=SPM, blend_marker=BBPE, method="surface")
    assert vm.to_dict() == {"▁the": "▁the", "Ċ": "<0x0A>", "âĢĶ": "—", "▁tha": "▁the", "zz": "▁a"}
    assert vm.base_ids.dtype == np.int32
    assert vm.base_ids.tolist() == [1, 0, 3, 1, 2, -1, 1]
    assert vm.kinds.tolist() == [MAP_EXACT, MAP_SURFACE, MAP_SURFACE, 3, 3, 0, MAP_EXACT]
    assert not vm.base_ids.flags.writeable
    assert len(vm) == 5
    assert vm["Ċ"] == "<0x0A>"
    assert "zz" in vm
    assert next(iter(vm)) == "▁the"
    assert vm.stats() == {
        "blend_tokens": 7,
        "exact": 2,
        "surface": 2,
        "mined": 2,
        "by_distance": {"1": 1, "2": 1},
        "unmapped": 1,
    }
    assert "surface" in repr(vm)


def test_save_load_round_trip(tmp_path) -> None:
    base, blend = _small()
    vm = VocabMap.build(base, blend, base_marker=SPM, blend_marker=BBPE, method="mined")
    path = tmp_path / "map.json"
    vm.save(path)
    with open(path, encoding="utf-8") as f:
        assert json.load(f) == vm.to_dict()  # the reference format, exactly
    meta = json.loads((tmp_path / "map.json.meta.json").read_text(encoding="utf-8"))
    assert meta["stats"] == vm.stats()
    assert meta["method"] == "mined"
    assert meta["blend_marker"] == BBPE
    assert meta["base_vocab"] == {"size": len(base), "sha256": vocab_checksum(base)}
    assert sorted(os.listdir(tmp_path)) == ["map.json", "map.json.meta.json"]  # no temp files
    back = VocabMap.load(path, base, blend)
    assert back.base_ids.tolist() == vm.base_ids.tolist()
    assert back.distances.tolist() == vm.distances.tolist()
    assert back.method == "mined"
    assert back.stats() == vm.stats()
    assert back.max_distance is None
    # load keeps the sidecar's hash of the bytes it read: the map it returns serializes to them
    assert back.content_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (
        back.content_sha256
        == VocabMap.from_dict(
            vm.to_dict(), base, blend, base_marker=SPM, blend_marker=BBPE
        ).content_sha256
    )
    vm.save(path)  # overwriting is fine
    capped = VocabMap.build(
        base, blend, base_marker=SPM, blend_marker=BBPE, method="mined", max_distance=1
    )
    capped.save(path)
    back = VocabMap.load(path, base, blend)
    assert back.max_distance == 1
    assert back.base_ids.tolist() == capped.base_ids.tolist()


def test_load_refuses_stale_maps(tmp_path) -> None:
    base, blend = _small()
    vm = VocabMap.build(base, blend, base_marker=SPM, blend_marker=BBPE)
    path = tmp_path / "map.json"
    vm.save(path)
    with pytest.raises(StaleArtifactError, match="different base vocabulary"):
        VocabMap.load(path, [*base, "new"], blend)
    with pytest.raises(StaleArtifactError, match="different blend vocabulary"):
        VocabMap.load(path, base, blend[:-1])
    with pytest.raises(StaleArtifactError, match="different base vocabulary"):
        VocabMap.load(path, ["▁a" if s == "▁the" else s for s in base], blend)
    data = json.loads(path.read_text(encoding="utf-8"))
    data["zz"] = "x"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(StaleArtifactError, match="changed after"):
        VocabMap.load(path, base, blend)
    (tmp_path / "map.json.meta.json").unlink()
    with pytest.raises(StaleArtifactError, match="from_dict"):
        VocabMap.load(path, base, blend)
    (tmp_path / "map.json.meta.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(StaleArtifactError):
        VocabMap.load(path, base, blend)
    assert issubclass(StaleArtifactError, fusellm.FuseLLMError)


def test_from_dict_imports_a_reference_map() -> None:
    base, blend = _small()
    vm = VocabMap.build(base, blend, base_marker=SPM, blend_marker=BBPE, method="surface")
    back = VocabMap.from_dict(vm.to_dict(), base, blend, base_marker=SPM, blend_marker=BBPE)
    assert back.base_ids.tolist() == vm.base_ids.tolist()
    assert back.kinds.tolist() == vm.kinds.tolist()
    assert back.method == "imported"
    partial = VocabMap.from_dict(
        {"zz": "x", "unknown": "x"}, base, blend, base_marker=SPM, blend_marker=BBPE
    )
    assert partial.base_ids.tolist() == [-1, -1, -1, -1, 4, -1, -1]
    with pytest.raises(InputError, match="not a base token"):
        VocabMap.from_dict({"zz": "nope"}, base, blend, base_marker=SPM, blend_marker=BBPE)


def test_aligner_accepts_a_vocab_map() -> None:
    base, blend = _small()
    vm = VocabMap.build(base, blend, base_marker=SPM, blend_marker=BBPE, method="mined")
    al = fusellm.Aligner(base, blend, base_marker=SPM, blend_marker=BBPE, vocab_map=vm)
    assert al.targets("soft").tolist() == vm.base_ids.tolist()
    hard = al.targets("hard").tolist()
    assert hard == [1, -1, -1, -1, -1, -1, 1]


# --- bad input ---------------------------------------------------------------------------------


def test_bad_input() -> None:
    base, blend = _small()
    kw = {"base_marker": SPM, "blend_marker": BBPE}
    with pytest.raises(InputError, match="method"):
        VocabMap.build(base, blend, method="co_occurrence", **kw)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="base_marker"):
        VocabMap.build(base, blend, base_marker="", blend_marker=BBPE)
    with pytest.raises(InputTypeError, match="blend_marker"):
        VocabMap.build(base, blend, base_marker=SPM, blend_marker=None)  # type: ignore[arg-type]
    with pytest.raises(InputTypeError, match="id order"):
        VocabMap.build({"a": 0}, blend, **kw)  # type: ignore[arg-type]
    with pytest.raises(InputTypeError, match="id order"):
        VocabMap.build("abc", blend, **kw)  # type: ignore[arg-type]
    with pytest.raises(InputTypeError, match=r"blend_vocab\[1\]"):
        VocabMap.build(base, ["a", 3], **kw)  # type: ignore[list-item]
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(InputError, match="num_threads"):
            VocabMap.build(base, blend, num_threads=bad, **kw)  # type: ignore[arg-type]
        with pytest.raises(InputError, match="max_distance"):
            VocabMap.build(base, blend, max_distance=bad, **kw)  # type: ignore[arg-type]
    with pytest.raises(InputTypeError, match="mapping"):
        VocabMap.from_dict([("a", "b")], base, blend, **kw)  # type: ignore[arg-type]
    with pytest.raises(InputTypeError, match="str to str"):
        VocabMap.from_dict({"a": 1}, base, blend, **kw)  # type: ignore[dict-item]
    # empty vocabularies are valid: nothing to map
    empty = VocabMap.build([], [], **kw)
    assert empty.base_ids.tolist() == []
    assert empty.to_dict() == {}
    none_base = VocabMap.build([None], ["a"], **kw)
    assert none_base.base_ids.tolist() == [-1]
