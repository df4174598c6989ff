"""Stages 3a (vocab map), 3b (align) and 4 (pack) on real extractions of tiny models.

The target is a tiny Llama on Mistral's SentencePiece tokenizer; the sources are a tiny GPT-NeoX on
DeepSeek's byte-level BPE and a tiny Qwen2 (padded vocabulary) on Qwen's. Every stored column is
compared with an independent computation: the extraction it came from, a direct
``Aligner.align_batch`` call on the same arrays (offsets computed here from the tokenizer), or a
pure-Python token-weighted mean. Re-runs must skip, changed inputs must be refused, bad inputs
must fail before anything is written.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fusellm
from fusellm import Aligner, InputError, StaleArtifactError, VocabMap
from fusellm.io import MANIFEST_NAME, read_manifest
from fusellm.samples import SAMPLE_TEXTS
from models import TinyModel, build_named, quiet

torch = pytest.importorskip("torch")
datasets = pytest.importorskip("datasets")

from fusellm.bundled import load_tokenizer  # noqa: E402
from fusellm.fuse import validate_packed  # noqa: E402
from fusellm.report import write_report  # noqa: E402
from fusellm.stages.align import ALIGN_STATS_NAME, add_align_parser, align_dataset  # noqa: E402
from fusellm.stages.extract import add_extract_parser, extract_topk  # noqa: E402
from fusellm.stages.pack import add_pack_parser, load_packed, pack_dataset  # noqa: E402
from fusellm.stages.vocab_map import add_vocab_map_parser, run_vocab_map  # noqa: E402

TEXTS = [
    SAMPLE_TEXTS[0][:160],
    "Hello",
    "Héllo wörld 🙂 — naïve café, 1850 x.",
    "Numbers: 1, 22, 333, 4444.",
    SAMPLE_TEXTS[1][:120],
    "A second line\nwith a newline and    spaces.",
    "x",
]
SOURCES = {"neox": "neox", "qwen": "qwen2"}  # source name -> tiny model
TOKENIZER = {"llama": "mistral", "neox": "deepseek", "qwen2": "qwen"}
STATUS_KEYS = ("matched", "empty", "fallback", "masked")


def listing(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in sorted(path.rglob("*"))}


def align_hard(*args: Any, **kw: Any) -> Any:
    """align_dataset with the hard vocabulary unless told otherwise: most tests here compare the
    columns with a direct Aligner call that has no vocabulary map."""
    kw.setdefault("vocab", "hard")
    return align_dataset(*args, **kw)


def extract(model: TinyModel, out: Path, texts: list[str] = TEXTS, **kw: Any) -> Path:
    with quiet():
        extract_topk(texts, model.path, out, progress=False, rows_per_shard=3, **kw)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TinyModel]:
    root = tmp_path_factory.mktemp("models")
    return {name: build_named(name, root) for name in ("llama", "neox", "qwen2")}


@pytest.fixture(scope="module")
def extracts(models: dict[str, TinyModel], tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("extracts")
    return {name: extract(m, root / name) for name, m in models.items()}


@pytest.fixture(scope="module")
def logit_extracts(models: dict[str, TinyModel], tmp_path_factory: Any) -> dict[str, Path]:
    """Raw-logit extractions (the reference's), of the target and the NeoX source."""
    root = tmp_path_factory.mktemp("logits")
    return {n: extract(models[n], root / n, values="logits") for n in ("llama", "neox")}


@pytest.fixture(scope="module")
def source_dirs(extracts: dict[str, Path]) -> dict[str, Path]:
    return {s: extracts[m] for s, m in SOURCES.items()}


@pytest.fixture(scope="module")
def aligned(extracts: dict[str, Path], source_dirs: dict[str, Path], tmp_path_factory: Any) -> Any:
    out = tmp_path_factory.mktemp("aligned") / "offsets"
    return align_hard(extracts["llama"], source_dirs, out, rows_per_batch=3, progress=False)


@pytest.fixture(scope="module")
def neox_map(models: dict[str, TinyModel], tmp_path_factory: Any) -> Path:
    out = tmp_path_factory.mktemp("maps") / "neox.json"
    run_vocab_map(models["llama"].path, models["neox"].path, out)
    return out


def load_rows(path: Path) -> Any:
    return datasets.load_from_disk(str(path)).with_format("numpy")


def offsets_of(tok: Any, text: str) -> tuple[list[int], np.ndarray]:
    """Ids and character spans of ``text + eos``; the EOS gets one virtual character."""
    enc = tok(text + tok.eos_token, add_special_tokens=False, return_offsets_mapping=True)
    spans = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    tail = spans[:, 1] > len(text)
    spans[tail] = [len(text), len(text) + 1]
    return list(enc["input_ids"]), spans


# --- 3a: vocabulary map --------------------------------------------------------------------------


def test_vocab_map_builds_saves_skips_and_refuses(
    models: dict[str, TinyModel], neox_map: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base = fusellm.tokenizer_vocab(load_tokenizer("mistral"))
    blend = fusellm.tokenizer_vocab(load_tokenizer("deepseek"))
    # Built for exactly these vocabularies (checksums), markers and method.
    loaded = VocabMap.load(neox_map, base, blend)
    assert (loaded.method, loaded.base_marker, loaded.blend_marker) == ("surface", "▁", "Ġ")
    meta = json.loads(neox_map.with_name("neox.json.meta.json").read_text())
    assert meta["stats"] == loaded.stats()
    assert loaded.stats()["surface"] > 0
    assert loaded.stats()["unmapped"] == 0
    assert json.loads(neox_map.read_text()) == loaded.to_dict()

    before = listing(neox_map.parent)
    with caplog.at_level(logging.INFO, logger="fusellm.artifact"):
        again = run_vocab_map(models["llama"].path, "bundled:deepseek", neox_map)
    assert again.skipped
    assert f"{neox_map} is up to date (same tokenizers and settings): skipped" in caplog.text
    assert listing(neox_map.parent) == before  # skipped: same vocabularies and method
    np.testing.assert_array_equal(again.vocab_map.base_ids, loaded.base_ids)
    with pytest.raises(StaleArtifactError, match=r"differs in: method\).*--overwrite"):
        run_vocab_map(models["llama"].path, models["neox"].path, neox_map, method="exact")
    with pytest.raises(StaleArtifactError, match=r"differs in: blend_vocab_sha256, method\)"):
        run_vocab_map(models["llama"].path, models["qwen2"].path, neox_map, method="exact")
    assert listing(neox_map.parent) == before
    # Changed after it was written: stale (the manifest's output fingerprint).
    meta_path = neox_map.with_name("neox.json.meta.json")
    meta_bytes = meta_path.read_bytes()
    meta_path.write_bytes(meta_bytes.replace(b'"stats"', b' "stats"', 1))
    with pytest.raises(StaleArtifactError, match="changed after it was written"):
        run_vocab_map(models["llama"].path, "bundled:deepseek", neox_map)
    meta_path.write_bytes(meta_bytes)
    assert run_vocab_map(models["llama"].path, "bundled:deepseek", neox_map).skipped

    other = neox_map.with_name("other.json")
    shutil.copy(neox_map, other)
    shutil.copy(neox_map.with_name("neox.json.meta.json"), other.with_name("other.json.meta.json"))
    with pytest.raises(StaleArtifactError, match=r"has no fusellm manifest.*--overwrite"):
        run_vocab_map(models["llama"].path, models["qwen2"].path, other, method="exact")
    rebuilt = run_vocab_map(
        models["llama"].path, models["qwen2"].path, other, method="exact", overwrite=True
    )
    assert rebuilt.method == "exact"
    assert not rebuilt.skipped
    qwen = fusellm.tokenizer_vocab(load_tokenizer("qwen"))
    assert VocabMap.load(other, base, qwen).method == "exact"
    with pytest.raises(InputError, match=r"\.json"):
        run_vocab_map(models["llama"].path, models["neox"].path, other.with_suffix(".txt"))
    with pytest.raises(InputError, match="does not exist"):
        run_vocab_map(other.parent / "nope", models["neox"].path, other)


# --- 3b: align -----------------------------------------------------------------------------------


def test_ref_and_row_columns_equal_the_extractions(aligned: Any, extracts: dict) -> None:
    got = load_rows(aligned.output_dir)
    base = load_rows(extracts["llama"])
    assert len(got) == len(TEXTS) == aligned.rows
    assert list(got["text"]) == TEXTS
    assert [int(x) for x in got["row_index"]] == list(range(len(TEXTS)))
    for r in range(len(TEXTS)):
        a, b = got[r], base[r]
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
        np.testing.assert_array_equal(a["ref_ids"], b["per_step_indices"])
        np.testing.assert_array_equal(a["ref_logits"], b["per_step_logits"])
        assert a["ref_metric_ce"] == b["metric_ce"]
        assert a["ref_num_tokens"] == b["num_tokens"] == len(b["input_ids"])
        assert a["num_bytes"] == len(TEXTS[r].encode("utf-8"))
        for s, m in SOURCES.items():
            src = load_rows(extracts[m])[r]
            assert a[f"{s}_metric_ce"] == src["metric_ce"]
            assert a[f"{s}_num_tokens"] == src["num_tokens"]
            assert a[f"{s}_ids"].shape == (len(b["input_ids"]), 10)
    feats = datasets.load_from_disk(str(aligned.output_dir)).features
    assert feats["neox_logits"] == datasets.List(datasets.List(datasets.Value("float16"), 10))
    assert feats["ref_ids"] == datasets.List(datasets.List(datasets.Value("int32"), 10))
    assert aligned.base_positions == sum(len(x) for x in got["input_ids"])


def direct_rows(extracts: dict, source: str, **kw: Any) -> tuple[list[Any], list[Any], list[Any]]:
    """Aligner.align_batch on the extraction arrays, with offsets computed here."""
    model = SOURCES[source]
    base_tok, src_tok = load_tokenizer("mistral"), load_tokenizer(TOKENIZER[model])
    base = load_rows(extracts["llama"])
    src = load_rows(extracts[model])
    method = kw.pop("method", "offsets")
    vocab_map = kw.pop("vocab_map", None)
    aligner = Aligner(
        fusellm.tokenizer_vocab(base_tok),
        fusellm.tokenizer_vocab(src_tok),
        base_marker="▁",
        blend_marker="Ġ",
        vocab_map=vocab_map,
        compat=kw.pop("compat", None),
    )
    b_spans, s_spans = [], []
    for r, text in enumerate(TEXTS):
        ids, spans = offsets_of(base_tok, text)
        assert ids == base[r]["input_ids"].tolist()
        b_spans.append(spans)
        ids, spans = offsets_of(src_tok, text)
        assert ids == src[r]["input_ids"].tolist()
        s_spans.append(spans)
    rows = aligner.align_batch(
        list(base["input_ids"]),
        list(src["input_ids"]),
        list(src["per_step_indices"]),
        list(src["per_step_logits"]),
        method=method,
        base_offsets=b_spans if method == "offsets" else None,
        blend_offsets=s_spans if method == "offsets" else None,
        **kw,
    )
    return rows, b_spans, s_spans


@pytest.mark.parametrize("source", list(SOURCES))
def test_source_columns_equal_a_direct_aligner_call(
    aligned: Any, extracts: dict, source: str
) -> None:
    rows, b_spans, s_spans = direct_rows(extracts, source)
    got = load_rows(aligned.output_dir)
    stats = json.loads((aligned.output_dir / ALIGN_STATS_NAME).read_text())["sources"][source]
    totals = dict.fromkeys([*STATUS_KEYS, "unknown_ids", "unmapped_ids", "duplicate_ids"], 0)
    exact = entries = 0
    for r, row in enumerate(rows):
        np.testing.assert_array_equal(got[r][f"{source}_ids"], row.ids)
        np.testing.assert_array_equal(got[r][f"{source}_logits"], row.logits.astype(np.float16))
        np.testing.assert_array_equal(got[r][f"{source}_status"], row.status)
        for k, v in row.counts().items():
            totals[k] += v
        entries += int((row.ids[row.status == fusellm.MATCHED] >= 0).sum())
        for i in np.flatnonzero(row.status == fusellm.MATCHED):  # the paired source token
            j = max(j for j, sp in enumerate(s_spans[r]) if sp[1] == b_spans[r][i][1])
            exact += bool(s_spans[r][j][0] == b_spans[r][i][0])
    assert {k: stats[k] for k in totals} == totals
    assert sum(stats[k] for k in STATUS_KEYS) == aligned.base_positions
    assert stats["topk_entries"] == entries
    assert stats["exact_span"] == exact
    assert 0 < exact <= stats["matched"] < aligned.base_positions
    assert stats["fallback"] > 0  # the tokenizers disagree somewhere: next-token one-hots


def test_align_stats_file_shape(aligned: Any) -> None:
    stats = json.loads((aligned.output_dir / ALIGN_STATS_NAME).read_text())
    assert stats == aligned.stats()
    assert list(stats) == ["method", "vocab", "rows", "base_positions", "sources", "teachers"]
    assert (stats["method"], stats["vocab"], stats["rows"]) == ("offsets", "hard", len(TEXTS))
    assert list(stats["sources"]) == list(SOURCES)
    for counts in stats["sources"].values():
        assert set(counts) == {
            *STATUS_KEYS,
            "exact_span",
            "unknown_ids",
            "unmapped_ids",
            "duplicate_ids",
            "topk_entries",
        }
        assert all(isinstance(v, int) for v in counts.values())
    assert aligned.to_dict()["output_dir"] == str(aligned.output_dir)
    manifest = read_manifest(aligned.output_dir)
    assert manifest["stage"] == "align"
    assert manifest["complete"]
    assert manifest["candidates"] == ["ref", *SOURCES]


def test_mined_soft_with_a_vocab_map(
    extracts: dict, source_dirs: dict, logit_extracts: dict, neox_map: Path, tmp_path: Path
) -> None:
    out = tmp_path / "mined"
    report = align_hard(
        extracts["llama"],
        {"neox": source_dirs["neox"]},
        out,
        method="mined",
        vocab="soft",
        vocab_maps={"neox": neox_map},
        logits_dtype="float32",
        progress=False,
    )
    base = fusellm.tokenizer_vocab(load_tokenizer("mistral"))
    blend = fusellm.tokenizer_vocab(load_tokenizer("deepseek"))
    vm = VocabMap.load(neox_map, base, blend)
    rows, _, _ = direct_rows(extracts, "neox", method="mined", vocab="soft", vocab_map=vm)
    got = load_rows(out)
    for r, row in enumerate(rows):
        np.testing.assert_array_equal(got[r]["neox_ids"], row.ids)
        np.testing.assert_array_equal(got[r]["neox_logits"], row.logits)
    stats = report.sources["neox"]
    assert stats["exact_span"] is None
    assert stats["matched"] == sum(r.counts()["matched"] for r in rows)
    # The soft map rescues entries the hard mode drops.
    hard, _, _ = direct_rows(extracts, "neox", method="mined", vocab="hard")
    assert stats["unmapped_ids"] < sum(r.num_unmapped for r in hard)

    # The reference's rows (compat="fusellm", on raw logits as the reference stores them):
    # one-hot fallback on the CURRENT token.
    with pytest.raises(InputError, match="raw logits"):
        align_hard(
            extracts["llama"], {"neox": source_dirs["neox"]}, tmp_path / "c", compat="fusellm"
        )
    ref = align_hard(
        logit_extracts["llama"],
        {"neox": logit_extracts["neox"]},
        tmp_path / "compat",
        method="mined",
        compat="fusellm",
        progress=False,
    )
    rows, _, _ = direct_rows(logit_extracts, "neox", method="mined", compat="fusellm")
    got = load_rows(tmp_path / "compat")
    for r, row in enumerate(rows):
        np.testing.assert_array_equal(got[r]["neox_ids"], row.ids)
        fb = row.status == fusellm.FALLBACK
        np.testing.assert_array_equal(row.ids[fb, 0], got[r]["input_ids"][fb])
    assert ref.sources["neox"]["fallback"] == sum(r.counts()["fallback"] for r in rows) > 0


def test_rerun_skips_and_changed_inputs_are_refused(
    aligned: Any, extracts: dict, source_dirs: dict, caplog: pytest.LogCaptureFixture
) -> None:
    out = aligned.output_dir
    before = listing(out)
    with caplog.at_level(logging.INFO, logger="fusellm.artifact"):
        again = align_hard(extracts["llama"], source_dirs, out, rows_per_batch=5, progress=False)
    assert f"{out} is up to date (the same inputs and settings): skipped" in caplog.text
    assert again.skipped
    assert again.stats() == aligned.stats()
    assert listing(out) == before
    with pytest.raises(StaleArtifactError, match="method"):
        align_hard(extracts["llama"], source_dirs, out, method="mined", progress=False)
    swapped = {"neox": source_dirs["qwen"], "qwen": source_dirs["neox"]}
    with pytest.raises(StaleArtifactError, match="sources"):
        align_hard(extracts["llama"], swapped, out, progress=False)
    assert listing(out) == before


def test_overwrite_replaces(extracts: dict, source_dirs: dict, tmp_path: Path) -> None:
    out = tmp_path / "al"
    align_hard(extracts["llama"], {"qwen": source_dirs["qwen"]}, out, progress=False)
    # The replace-stale policy (fusellm run's): another method replaces the output.
    mined = align_hard(
        extracts["llama"], {"qwen": source_dirs["qwen"]}, out, method="mined", on_stale="replace"
    )
    assert not mined.skipped
    assert read_manifest(out)["key"]["method"] == "mined"
    report = align_hard(
        extracts["llama"],
        {"neox": source_dirs["neox"]},
        out,
        fallback="mask",
        overwrite=True,
        progress=False,
    )
    assert not report.skipped
    ds = datasets.load_from_disk(str(out))
    assert "neox_ids" in ds.column_names
    assert "qwen_ids" not in ds.column_names
    assert report.sources["neox"]["fallback"] == 0
    assert report.sources["neox"]["masked"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["al"]


def tamper(src: Path, out: Path, change: Any) -> Path:
    """A copy of an extraction whose dataset was changed by ``change(dataset)``."""
    ds = datasets.load_from_disk(str(src))
    change(ds).save_to_disk(str(out))
    shutil.copy(src / MANIFEST_NAME, out / MANIFEST_NAME)
    return out


def test_offsets_refuse_ids_that_do_not_retokenize(
    extracts: dict, source_dirs: dict, tmp_path: Path
) -> None:
    """An extraction without stored spans (made before they were) is tokenized again, and ids
    that do not come back are refused, naming the row and position."""

    def change(ds: Any) -> Any:
        ids = [list(x) for x in ds["input_ids"]]
        ids[3][2] = (ids[3][2] + 1) % 1000
        ds = ds.remove_columns(["input_ids", "token_spans"])
        return ds.add_column("input_ids", ids)

    bad = tamper(source_dirs["neox"], tmp_path / "bad", change)
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"row 3: re-tokenizing .* position 2"):
        align_hard(extracts["llama"], {"neox": bad}, out, rows_per_batch=2, progress=False)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]  # no temporary left behind


def test_stored_spans_that_do_not_fit_the_text_are_refused(
    extracts: dict, source_dirs: dict, tmp_path: Path
) -> None:
    def change(ds: Any) -> Any:
        spans = [[list(p) for p in x] for x in ds["token_spans"]]
        spans[4][-1][1] += 3  # the EOS no longer ends one character after the text
        return ds.remove_columns("token_spans").add_column("token_spans", spans)

    bad = tamper(source_dirs["neox"], tmp_path / "bad", change)
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"token_spans do not fit row 4's text"):
        align_hard(extracts["llama"], {"neox": bad}, out, rows_per_batch=2, progress=False)
    assert not out.exists()


def test_row_count_and_text_mismatches_name_the_row(
    models: dict[str, TinyModel], extracts: dict, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    short = extract(models["neox"], tmp_path / "short", TEXTS[:-1])
    with pytest.raises(InputError, match=f"{len(TEXTS) - 1} rows but the target has {len(TEXTS)}"):
        align_hard(extracts["llama"], {"neox": short}, out, progress=False)
    texts = list(TEXTS)
    texts[4] = texts[4].upper()
    other = extract(models["neox"], tmp_path / "other", texts)
    with pytest.raises(InputError, match="row 4: the text of source 'neox' differs"):
        align_hard(extracts["llama"], {"neox": other}, out, progress=False)
    assert not out.exists()


def test_extractions_of_different_values_are_not_mixed(
    extracts: dict, logit_extracts: dict, tmp_path: Path
) -> None:
    with pytest.raises(InputError, match=r"'neox'.s extraction holds logits but the target"):
        align_hard(extracts["llama"], {"neox": logit_extracts["neox"]}, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def domain_aligned(models: dict[str, TinyModel], tmp_path_factory: Any) -> Path:
    """Extractions of texts with a domain column, aligned (the teacher diagnostics' input)."""
    root = tmp_path_factory.mktemp("domains")
    rows = datasets.Dataset.from_dict(
        {"text": TEXTS, "domain": ["a", "b", "a", "b", "a", "b", "a"]}
    )
    ex = {n: extract(models[n], root / n, rows) for n in ("llama", "neox", "qwen2")}
    out = root / "aligned"
    align_hard(
        ex["llama"],
        {"neox": ex["neox"], "qwen": ex["qwen2"]},
        out,
        rows_per_batch=2,
        progress=False,
    )
    return out


def test_teacher_diagnostics_equal_a_direct_computation(domain_aligned: Path) -> None:
    """Every number of ``teachers`` in align_stats.json, recomputed position by position."""
    stats = json.loads((domain_aligned / ALIGN_STATS_NAME).read_text())["teachers"]
    rows = load_rows(domain_aligned)
    vocab_size = len(load_tokenizer("mistral"))
    assert stats["vocab_size"] == vocab_size
    assert stats["logprobs"] is True
    assert list(rows["domain"]) == ["a", "b", "a", "b", "a", "b", "a"]

    def score(ids: Any, vals: Any, y: int) -> tuple[bool, bool, float]:
        entries = [(int(i), float(v)) for i, v in zip(ids, vals, strict=True) if i >= 0]
        probs = {i: math.exp(v) for i, v in entries}
        if y in probs:
            p = probs[y]
        else:
            p = max(0.0, 1.0 - sum(probs.values())) / (vocab_size - len(entries))
        return bool(entries) and entries[0][0] == y, y in probs, -math.log(max(p, 1e-300))

    want: dict[str, dict[str, dict[str, list[float]]]] = {}
    for row in rows:
        ids = row["input_ids"]
        for t in range(len(ids) - 1):
            y = int(ids[t + 1])
            ref = score(row["ref_ids"][t], row["ref_logits"][t], y)
            for dom in ("all", row["domain"]):
                acc = want.setdefault("ref", {}).setdefault(dom, {})
                for key, v in zip(("top1", "coverage", "ce"), ref, strict=True):
                    acc.setdefault(key, []).append(v)
                for src in SOURCES:
                    acc = want.setdefault(src, {}).setdefault(dom, {})
                    matched = row[f"{src}_status"][t] == fusellm.MATCHED
                    acc.setdefault("matched", []).append(matched)
                    if not matched:
                        continue
                    got = score(row[f"{src}_ids"][t], row[f"{src}_logits"][t], y)
                    for key, v in zip(("top1", "coverage", "ce"), got, strict=True):
                        acc.setdefault(key, []).append(v)
                    for key, v in zip(("ref_top1", "ref_coverage", "ref_ce"), ref, strict=True):
                        acc.setdefault(key, []).append(v)
    for cand, per in want.items():
        assert set(stats["candidates"][cand]) == {"all", "a", "b"}
        for dom, acc in per.items():
            got = stats["candidates"][cand][dom]
            if cand != "ref":
                assert got["matched_share"] == pytest.approx(np.mean(acc.pop("matched")))
            assert got["positions"] == len(acc["top1"])
            for key, vals in acc.items():
                assert got[key] == pytest.approx(np.mean(vals), rel=1e-6), (cand, dom, key)
    assert 0 < stats["candidates"]["ref"]["all"]["coverage"] < 1
    # The report's teacher-quality table shows these numbers.
    wd = domain_aligned.parent / "workdir"
    if not wd.exists():
        (wd / "align").mkdir(parents=True)
        shutil.copy(domain_aligned / ALIGN_STATS_NAME, wd / "align" / ALIGN_STATS_NAME)
    text = write_report(wd).read_text(encoding="utf-8")
    table = text.split("### Teacher quality", 1)[1].split("\n\n")[2]
    cells = {
        (r[0], r[1]): r for r in (line.strip("| ").split(" | ") for line in table.splitlines()[2:])
    }
    for cand, per in want.items():
        for dom, acc in per.items():
            row = cells[(cand, dom)]
            assert row[2] == f"{len(acc['top1']):,}"
            assert row[4] == f"{100 * np.mean(acc['top1']):.1f}%"
            assert row[6] == f"{100 * np.mean(acc['coverage']):.1f}%"
            assert row[8] == f"{np.mean(acc['ce']):.3f}"
            if cand != "ref":
                assert row[5] == f"{100 * np.mean(acc['ref_top1']):.1f}%"
                assert row[9] == f"{np.mean(acc['ref_ce']):.3f}"
    for src in SOURCES:
        mass = stats["candidates"][src]["all"]
        assert 0 < mass["topk_mass"] <= 1
        assert 0 <= mass["dropped_mass"] <= mass["topk_mass"]


def test_pack_gives_each_block_its_commonest_domain(domain_aligned: Path, tmp_path: Path) -> None:
    report = pack_dataset(
        domain_aligned, tmp_path / "packed", block_size=24, progress=False, layout="copy"
    )
    rows = load_rows(domain_aligned)
    token_domain = [d for r in rows for d in [r["domain"]] * len(r["input_ids"])]
    blocks = datasets.load_from_disk(str(tmp_path / "packed"))
    assert read_manifest(tmp_path / "packed")["domains"] == ["a", "b"]
    assert read_manifest(tmp_path / "packed")["values"] == "logprobs"
    start = 0
    for block in blocks:
        n = len(block["input_ids"])
        here = token_domain[start : start + n]
        counts = {d: here.count(d) for d in ("a", "b")}
        assert block["domain"] == max(counts, key=lambda d: (counts[d], d == "a")), counts
        start += n
    assert start == report.tokens
    plan = load_packed(pack_dataset(domain_aligned, tmp_path / "plan", block_size=24).output_dir)
    assert [b["domain"] for b in plan] == blocks["domain"]
    assert sorted(plan.unique("domain")) == ["a", "b"]


def test_bad_inputs_write_nothing(
    models: dict[str, TinyModel],
    extracts: dict,
    source_dirs: dict,
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    base = extracts["llama"]
    neox = source_dirs["neox"]
    missing = tamper(neox, tmp_path / "missing", lambda ds: ds.remove_columns("metric_ce"))
    qwen_map = tmp_path / "qwen.json"
    run_vocab_map(models["llama"].path, models["qwen2"].path, qwen_map, method="exact")
    cases: list[tuple[Any, dict[str, Any], type, str]] = [
        ({"Neox": neox}, {}, InputError, "source name 'Neox' is not valid"),
        ({"ref": neox}, {}, InputError, "reserved"),
        ({"input": neox}, {}, InputError, "clashes"),
        ({}, {}, TypeError, "non-empty mapping"),
        ({"neox": missing}, {}, InputError, r"lacks column\(s\) \['metric_ce'\]"),
        ({"neox": tmp_path / "nope"}, {}, InputError, "does not exist"),
        ({"neox": models["neox"].path}, {}, InputError, "not a fusellm extraction"),
        ({"neox": neox}, {"vocab_maps": {"qwen": qwen_map}}, InputError, "unknown source"),
        ({"neox": neox}, {"vocab_maps": {"neox": qwen_map}}, StaleArtifactError, "vocabulary"),
        (
            {"neox": neox},
            {"source_tokenizers": {"neox": "bundled:qwen"}},
            InputError,
            "not the extraction's tokenizer",
        ),
        ({"neox": neox}, {"method": "dtw"}, InputError, "method"),
        ({"neox": neox}, {"rows_per_batch": 0}, InputError, "rows_per_batch"),
    ]
    for sources, kw, err, match in cases:
        with pytest.raises(err, match=match):
            align_hard(base, sources, out, progress=False, **kw)
        assert not out.exists(), match
    # A vocabulary map object built for other vocabularies.
    b = fusellm.tokenizer_vocab(load_tokenizer("mistral"))
    q = fusellm.tokenizer_vocab(load_tokenizer("qwen"))
    with pytest.raises(StaleArtifactError, match="other vocabularies"):
        align_hard(base, {"neox": neox}, out, vocab_maps={"neox": VocabMap.load(qwen_map, b, q)})
    # A directory that is not a fusellm output is never replaced.
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="no fusellm manifest"):
        align_hard(base, {"neox": neox}, out, overwrite=True, progress=False)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


# --- 4: pack -------------------------------------------------------------------------------------


def expected_blocks(rows: Any, blocks: list[list[tuple]]) -> Any:
    """Pure-Python scores of blocks given as lists of (row, tokens in the block)."""
    cands = ["ref", *SOURCES]
    out = []
    for pieces in blocks:
        rec: dict[str, float] = {}
        tot = sum(n for _, n in pieces)
        for c in cands:
            rec[f"{c}_metric_ce"] = (
                sum(n * float(rows[r][f"{c}_metric_ce"]) for r, n in pieces) / tot
            )
            ce = sum(
                n
                / len(rows[r]["input_ids"])
                * float(rows[r][f"{c}_metric_ce"])
                * (int(rows[r][f"{c}_num_tokens"]) - 1)
                for r, n in pieces
            )
            by = sum(n / len(rows[r]["input_ids"]) * int(rows[r]["num_bytes"]) for r, n in pieces)
            rec[f"{c}_metric_ce_per_byte"] = ce / by
        rec["num_bytes"] = by
        out.append(rec)
    return out


def concat_pieces(lengths: list[int], block_size: int) -> list[list[tuple]]:
    blocks: list[list[tuple]] = [[]]
    room = block_size
    for r, n in enumerate(lengths):
        while n:
            if room == 0:
                blocks.append([])
                room = block_size
            take = min(n, room)
            blocks[-1].append((r, take))
            n -= take
            room -= take
    return blocks


def check_scores(got: Any, want: list[dict[str, float]]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        for k, v in w.items():
            assert float(g[k]) == pytest.approx(v, rel=1e-6), k


@pytest.mark.parametrize("chunk_tokens", [1 << 21, 50, 1])
def test_pack_concat_keeps_every_token_in_order(
    aligned: Any, tmp_path: Path, chunk_tokens: int
) -> None:
    out = tmp_path / "packed"
    bs = 64
    report = pack_dataset(
        aligned.output_dir,
        out,
        block_size=bs,
        chunk_tokens=chunk_tokens,
        layout="copy",
        progress=False,
    )
    ds = datasets.load_from_disk(str(out))
    assert validate_packed(
        ds, sources=list(SOURCES), with_ref=True, score="ce_per_byte", vocab_size=32000
    ) == ["ref", *SOURCES]
    rows = load_rows(aligned.output_dir)
    blocks = ds.with_format("numpy")
    lengths = [len(x) for x in rows["input_ids"]]
    assert [len(b) for b in blocks["input_ids"]] == [bs] * (sum(lengths) // bs) + [
        sum(lengths) % bs
    ]
    assert (report.rows, report.tokens, report.blocks) == (len(TEXTS), sum(lengths), len(ds))
    for col in ["input_ids", *(f"{c}_{k}" for c in ["ref", *SOURCES] for k in ("ids", "logits"))]:
        np.testing.assert_array_equal(
            np.concatenate(list(blocks[col])), np.concatenate(list(rows[col]))
        )
    for col in (f"{c}_status" for c in SOURCES):  # the alignment statuses travel with the rows
        np.testing.assert_array_equal(
            np.concatenate(list(blocks[col])), np.concatenate(list(rows[col]))
        )
    assert "ref_status" not in ds.column_names
    assert "domain" not in ds.column_names  # the texts had no domain
    assert all((m == 1).all() for m in blocks["attention_mask"])
    assert "position_ids" not in ds.column_names
    check_scores(blocks, expected_blocks(rows, concat_pieces(lengths, bs)))
    assert ds.features["neox_logits"] == datasets.List(datasets.List(datasets.Value("float16"), 10))


@pytest.mark.parametrize("group", [3, 2, 1000])
def test_pack_compat_reproduces_the_reference_batch_boundaries(
    aligned: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, group: int
) -> None:
    """compat='fusellm': rows concatenated and cut per group of REFERENCE_PACK_ROWS (the
    reference's datasets.map batches), each group's remainder a short block; the oracle cuts
    every group on its own."""
    import fusellm.stages.pack as pack_stage

    monkeypatch.setattr(pack_stage, "REFERENCE_PACK_ROWS", group)
    bs = 16
    out = tmp_path / "packed"
    report = pack_dataset(
        aligned.output_dir, out, block_size=bs, compat="fusellm", progress=False, layout="copy"
    )
    rows = load_rows(aligned.output_dir)
    lengths = [len(x) for x in rows["input_ids"]]
    pieces: list[list[tuple]] = []
    for start in range(0, len(lengths), group):
        cut = concat_pieces(lengths[start : start + group], bs)
        pieces += [[(r + start, n) for r, n in block] for block in cut]
    blocks = datasets.load_from_disk(str(out)).with_format("numpy")
    assert [len(b) for b in blocks["input_ids"]] == [sum(n for _, n in b) for b in pieces]
    assert report.blocks == len(pieces)
    np.testing.assert_array_equal(
        np.concatenate(list(blocks["input_ids"])), np.concatenate(list(rows["input_ids"]))
    )
    check_scores(blocks, expected_blocks(rows, pieces))
    plain = pack_dataset(aligned.output_dir, tmp_path / "plain", block_size=bs, progress=False)
    if group < len(lengths):
        assert plain.blocks < report.blocks  # short blocks inside, not only at the end
    else:
        assert plain.blocks == report.blocks
    with pytest.raises(InputError, match="concat packing"):
        pack_dataset(
            aligned.output_dir, tmp_path / "x", block_size=bs, compat="fusellm", mode="bfd"
        )


def test_pack_bfd_keeps_documents_whole(aligned: Any, tmp_path: Path) -> None:
    out = tmp_path / "bfd"
    bs = 80
    pack_dataset(aligned.output_dir, out, block_size=bs, mode="bfd", progress=False, layout="copy")
    ds = datasets.load_from_disk(str(out))
    validate_packed(ds, sources=list(SOURCES), with_ref=True, score="ce", vocab_size=32000)
    rows = load_rows(aligned.output_dir)
    docs = {tuple(x.tolist()): r for r, x in enumerate(rows["input_ids"])}
    assert len(docs) == len(TEXTS)
    pieces = []
    seen = []
    for block in ds.with_format("numpy"):
        assert len(block["input_ids"]) <= bs
        starts = [*np.flatnonzero(block["position_ids"] == 0).tolist(), len(block["input_ids"])]
        np.testing.assert_array_equal(
            block["position_ids"], np.concatenate([np.arange(b - a) for a, b in pairs(starts)])
        )
        found = []
        for a, b in pairs(starts):
            r = docs[tuple(block["input_ids"][a:b].tolist())]
            np.testing.assert_array_equal(block["qwen_ids"][a:b], rows[r]["qwen_ids"])
            found.append((r, b - a))
        pieces.append(found)
        seen += [r for r, _ in found]
    assert sorted(seen) == list(range(len(TEXTS)))
    check_scores(ds.with_format("numpy"), expected_blocks(rows, pieces))


def pairs(xs: list[int]) -> list[tuple[int, int]]:
    return list(itertools.pairwise(xs))


def test_pack_skips_refuses_and_trains(
    aligned: Any, models: dict[str, TinyModel], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "packed"
    first = pack_dataset(aligned.output_dir, out, block_size=64, progress=False)
    before = listing(out)
    with caplog.at_level(logging.INFO, logger="fusellm.artifact"):
        again = pack_dataset(aligned.output_dir, out, block_size=64, progress=False)
    assert f"{out} is up to date (the same inputs and settings): skipped" in caplog.text
    assert again.skipped
    assert again.blocks == first.blocks
    assert listing(out) == before
    with pytest.raises(StaleArtifactError, match="block_size"):
        pack_dataset(aligned.output_dir, out, block_size=32, progress=False)
    assert listing(out) == before
    # Replaced under the replace-stale policy, and the old block size comes back the same way.
    assert pack_dataset(aligned.output_dir, out, block_size=32, on_stale="replace").blocks > 0
    assert read_manifest(out)["key"]["block_size"] == 32
    again = pack_dataset(aligned.output_dir, out, block_size=64, on_stale="replace")
    assert (again.skipped, again.blocks) == (False, first.blocks)

    from fusellm import FusionConfig, run_train

    assert len(load_packed(out)) == first.blocks
    config = FusionConfig(
        output_dir=str(tmp_path / "run"),
        sources=list(SOURCES),
        use_cpu=True,
        report_to="none",
        per_device_train_batch_size=2,
        max_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    with quiet():
        trainer = run_train(config, out, models["llama"].path)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert trainer.state.global_step == 1
    assert math.isfinite(logs[0]["loss"])
    assert math.isfinite(logs[0]["fusion_loss"])


# --- the plan layout -----------------------------------------------------------------------------


def same_values(a: Any, b: Any) -> bool:
    x, y = np.asarray(a), np.asarray(b)
    if x.shape != y.shape:
        return False
    if x.dtype.kind in "fc" or y.dtype.kind in "fc":
        x, y = x.astype(np.float64), y.astype(np.float64)
        return bool(((x == y) | (np.isnan(x) & np.isnan(y))).all())
    return bool((x == y).all())


@pytest.mark.parametrize(
    ("mode", "compat", "chunk_tokens"),
    [
        ("concat", None, 1 << 21),
        ("concat", None, 23),
        ("bfd", None, 1 << 21),
        ("concat", "fusellm", 23),
    ],
)
def test_pack_plan_gives_the_copy_layouts_blocks(
    aligned: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, compat: Any,
    chunk_tokens: int,
) -> None:  # fmt: skip
    """Every block a plan-layout pack reads from the aligned rows equals the copy layout's
    block, column for column and value for value; small chunks carry row remainders (concat)
    across chunks, and a small reference group cuts them (compat)."""
    import fusellm.stages.pack as pack_stage
    from fusellm.fuse import FusionCollator
    from fusellm.stages.pack import PlannedBlocks

    monkeypatch.setattr(pack_stage, "REFERENCE_PACK_ROWS", 2)
    bs = 80 if mode == "bfd" else 16  # bfd never splits a row
    kw = {"block_size": bs, "mode": mode, "compat": compat, "chunk_tokens": chunk_tokens}
    copy = pack_dataset(aligned.output_dir, tmp_path / "copy", **kw, progress=False, layout="copy")
    plan = pack_dataset(aligned.output_dir, tmp_path / "plan", **kw)  # the default layout
    assert (plan.layout, plan.blocks, plan.tokens) == ("plan", copy.blocks, copy.tokens)
    a = load_packed(copy.output_dir).with_format("numpy")
    b = load_packed(plan.output_dir)
    assert isinstance(b, PlannedBlocks)
    assert len(b) == len(a) == copy.blocks
    assert b.column_names == a.column_names
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert list(y) == list(x)
        for k in x:
            assert same_values(x[k], y[k]), (i, k)
    # The collator makes the same batches of both, and the training checks pass on both.
    collate = FusionCollator(list(SOURCES), teacher="calibrated")
    for lo in range(0, len(a), 5):
        idx = range(lo, min(lo + 5, len(a)))
        p, q = collate([a[i] for i in idx]), collate([b[i] for i in idx])
        assert p.keys() == q.keys()
        for k in p:
            assert torch.equal(p[k], q[k]), k
    for ds in (a, b):
        stack = validate_packed(ds, sources=list(SOURCES), with_ref=True, score="ce_per_byte",
                                vocab_size=32000, teacher="calibrated", batch_size=4)  # fmt: skip
        assert stack == ["ref", *SOURCES]

    # The plan holds no token (here, with 16-token blocks and K = 4: under half the bytes).
    def shard_bytes(path: Path) -> int:
        return sum(f.stat().st_size for f in path.glob("data-*.arrow"))

    assert shard_bytes(plan.output_dir) < shard_bytes(copy.output_dir) / 2


def test_pack_plan_trains_like_the_copy(
    aligned: Any, models: dict[str, TinyModel], tmp_path: Path
) -> None:
    from fusellm import FusionConfig, run_train

    logs = {}
    for layout in ("copy", "plan"):
        out = tmp_path / layout
        pack_dataset(aligned.output_dir, out, block_size=32, layout=layout, progress=False)
        config = FusionConfig(
            output_dir=str(tmp_path / f"run-{layout}"),
            sources=list(SOURCES),
            teacher="calibrated",
            use_cpu=True,
            report_to="none",
            per_device_train_batch_size=2,
            max_steps=3,
            logging_steps=1,
            save_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=3,
        )
        with quiet():
            trainer = run_train(config, out, models["llama"].path, print_logs=False)
        logs[layout] = [
            (h["loss"], h["fusion_loss"]) for h in trainer.state.log_history if "loss" in h
        ]
    assert len(logs["plan"]) == 3
    assert logs["plan"] == logs["copy"]


def test_pack_plan_protocol_and_a_changed_input(aligned: Any, tmp_path: Path) -> None:
    """A plan reruns as skipped, another layout in its place is stale, and a plan whose
    aligned data changed since packing is refused when read."""
    from fusellm.stages.pack import PlannedBlocks

    src = tmp_path / "aligned"
    shutil.copytree(aligned.output_dir, src)
    out = tmp_path / "plan"
    first = pack_dataset(src, out, block_size=16, layout="plan", progress=False)
    again = pack_dataset(src, out, block_size=16, layout="plan", progress=False)
    assert again.skipped
    assert (again.blocks, again.layout) == (first.blocks, "plan")
    with pytest.raises(StaleArtifactError, match="layout"):
        pack_dataset(src, out, block_size=16, progress=False, layout="copy")
    assert len(load_packed(out)) == first.blocks
    state = src / "state.json"
    state.write_text(state.read_text(encoding="utf-8") + "\n", encoding="utf-8")
    with pytest.raises(InputError, match="changed since it was packed; pack again"):
        PlannedBlocks(out)
    shutil.rmtree(src)
    with pytest.raises(InputError, match="does not exist"):
        load_packed(out)
    with pytest.raises(InputError, match="not a plan-layout pack output"):
        PlannedBlocks(aligned.output_dir)


def synthetic_aligned(path: Path, ce: dict[str, list[float]], lengths: list[int]) -> Path:
    """An aligned-schema dataset written by hand (no manifest): K = 2, ids 0.."""
    rng = np.random.default_rng(0)
    data: dict[str, Any] = {
        "input_ids": [rng.integers(0, 50, n).astype(np.int32) for n in lengths],
        "num_bytes": [3 * n + 1 for n in lengths],
    }
    feats: dict[str, Any] = {
        "input_ids": datasets.List(datasets.Value("int32")),
        "num_bytes": datasets.Value("int32"),
    }
    for c, values in ce.items():
        data[f"{c}_ids"] = [rng.integers(0, 50, (n, 2)).astype(np.int32) for n in lengths]
        data[f"{c}_logits"] = [rng.normal(size=(n, 2)).astype(np.float32) for n in lengths]
        data[f"{c}_metric_ce"] = values
        data[f"{c}_num_tokens"] = [n + 1 for n in lengths]
        feats[f"{c}_ids"] = datasets.List(datasets.List(datasets.Value("int32"), 2))
        feats[f"{c}_logits"] = datasets.List(datasets.List(datasets.Value("float32"), 2))
        feats[f"{c}_metric_ce"] = datasets.Value("float32")
        feats[f"{c}_num_tokens"] = datasets.Value("int32")
    datasets.Dataset.from_dict(data, features=datasets.Features(feats)).save_to_disk(str(path))
    return path


def test_pack_excludes_nan_rows_from_every_candidate(tmp_path: Path) -> None:
    lengths = [5, 3, 4]
    src = synthetic_aligned(
        tmp_path / "al", {"ref": [1.0, 2.0, 3.0], "a": [4.0, float("nan"), 6.0]}, lengths
    )
    report = pack_dataset(src, tmp_path / "p", block_size=100, progress=False, layout="copy")
    assert report.nan_rows == 1
    (block,) = datasets.load_from_disk(str(tmp_path / "p"))
    # Row 1 (NaN for "a") is left out of ref's score too.
    assert block["ref_metric_ce"] == pytest.approx((5 * 1.0 + 4 * 3.0) / 9)
    assert block["a_metric_ce"] == pytest.approx((5 * 4.0 + 4 * 6.0) / 9)
    assert block["ref_metric_ce_per_byte"] == pytest.approx((1.0 * 5 + 3.0 * 4) / (16 + 13))
    assert block["num_bytes"] == pytest.approx(16 + 10 + 13)
    prop = pack_dataset(
        src, tmp_path / "q", block_size=100, nan_rows="propagate", progress=False, layout="copy"
    )
    assert prop.nan_rows == 1
    (block,) = datasets.load_from_disk(str(tmp_path / "q"))
    assert math.isnan(block["a_metric_ce"])
    assert block["ref_metric_ce"] == pytest.approx((5 * 1.0 + 3 * 2.0 + 4 * 3.0) / 12)
    # A block made only of such rows has no score: refused, nothing written.
    with pytest.raises(InputError, match=r"blocks \[1\] hold only rows with no scored token"):
        pack_dataset(src, tmp_path / "r", block_size=5, mode="bfd", progress=False)
    assert not (tmp_path / "r").exists()


def test_pack_bad_inputs(aligned: Any, tmp_path: Path) -> None:
    ds = datasets.load_from_disk(str(aligned.output_dir))
    cases = [
        (ds.remove_columns("ref_metric_ce"), r"lacks column\(s\) \['ref_metric_ce'\]"),
        (ds.remove_columns(["ref_ids", "ref_logits"]), "no 'ref_logits' column"),
        (ds.remove_columns("num_bytes"), "num_bytes"),
    ]
    out = tmp_path / "out"
    for i, (bad, match) in enumerate(cases):
        path = tmp_path / f"bad{i}"
        bad.save_to_disk(str(path))
        with pytest.raises(InputError, match=match):
            pack_dataset(path, out, progress=False)
        assert not out.exists()
    with pytest.raises(InputError, match="does not exist"):
        pack_dataset(tmp_path / "nope", out)
    with pytest.raises(InputError, match="mode"):
        pack_dataset(aligned.output_dir, out, mode="greedy")
    with pytest.raises(InputError, match="block_size"):
        pack_dataset(aligned.output_dir, out, block_size=0)
    assert not out.exists()


# --- command line --------------------------------------------------------------------------------


def test_cli_hooks(
    models: dict[str, TinyModel],
    extracts: dict,
    source_dirs: dict,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    parser = argparse.ArgumentParser(prog="fusellm")
    sub = parser.add_subparsers(dest="command")
    for hook in (add_vocab_map_parser, add_align_parser, add_pack_parser):
        p = hook(sub)
        assert p.description
        assert p.format_help()
    helps = {name: sub.choices[name].format_help() for name in ("vocab-map", "align", "pack")}
    assert "--method" in helps["vocab-map"]
    assert "bundled:NAME" in helps["vocab-map"]
    assert "NAME=DIR" in helps["align"]
    assert "--vocab-map" in helps["align"]
    assert "--block-size" in helps["pack"]
    assert "--mode" in helps["pack"]

    vmap = tmp_path / "map.json"
    args = parser.parse_args(
        ["vocab-map", str(models["llama"].path), "bundled:deepseek", str(vmap), "--method", "exact"]
    )
    assert args.func(args) == 0
    assert "up to date" not in capsys.readouterr().out
    assert args.func(args) == 0  # a rerun with the same inputs skips, and says so
    assert "up to date (same tokenizers and settings); skipped" in capsys.readouterr().out
    assert (
        VocabMap.load(
            vmap,
            fusellm.tokenizer_vocab(load_tokenizer("mistral")),
            fusellm.tokenizer_vocab(load_tokenizer("deepseek")),
        ).method
        == "exact"
    )

    al = tmp_path / "al"
    argv = ["align", str(extracts["llama"]), "--source", f"neox={source_dirs['neox']}"]
    argv += [str(al), "--vocab-map", f"neox={vmap}", "--vocab", "soft", "--no-progress"]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    assert "neox:" in capsys.readouterr().out
    assert json.loads((al / ALIGN_STATS_NAME).read_text())["vocab"] == "soft"

    pk = tmp_path / "pk"
    args = parser.parse_args(["pack", str(al), str(pk), "--block-size", "32", "--no-progress"])
    assert args.func(args) == 0
    assert "blocks of 32" in capsys.readouterr().out
    assert max(len(b["input_ids"]) for b in load_packed(pk)) == 32  # the default plan layout

    args = parser.parse_args(["align", str(extracts["llama"]), "--source", "neox", str(al)])
    with pytest.raises(InputError, match="NAME=PATH"):
        args.func(args)


def stage_parser() -> tuple[argparse.ArgumentParser, Any]:
    parser = argparse.ArgumentParser(prog="fusellm")
    sub = parser.add_subparsers(dest="command")
    for hook in (add_extract_parser, add_vocab_map_parser, add_align_parser, add_pack_parser):
        hook(sub)
    return parser, sub


def test_cli_api_and_config_declare_the_same_defaults() -> None:
    """Each stage's options are declared once, in its settings dataclass: the command-line
    flags, the Python function's keyword defaults and the config keys agree."""
    import dataclasses
    import inspect

    from fusellm.config import (
        AlignSettings,
        ExtractSettings,
        PackSettings,
        PipelineConfig,
        VocabMapSettings,
    )

    parser, _ = stage_parser()
    commands = {
        "extract": (["extract", "rows", "model", "out"], ExtractSettings, extract_topk),
        "vocab-map": (["vocab-map", "a", "b", "m.json"], VocabMapSettings, run_vocab_map),
        "align": (["align", "base", "out", "-s", "x=y"], AlignSettings, align_dataset),
        "pack": (["pack", "al", "out"], PackSettings, pack_dataset),
    }
    config = PipelineConfig.from_dict(
        {"target": {"path": "t"}, "sources": [{"name": "s", "path": "s"}], "data": {"train": "d"}}
    )
    sections = {
        "extract": config.extract,
        "vocab-map": config.vocab_map,
        "align": config.align,
        "pack": config.pack,
    }
    for command, (argv, cls, function) in commands.items():
        args = vars(parser.parse_args(argv))
        signature = inspect.signature(function).parameters
        for f in dataclasses.fields(cls):
            declared = f.default
            assert args[f.name] == declared, (command, f.name)
            assert signature[f.name].default == declared, (command, f.name)
            assert getattr(sections[command], f.name) == declared, (command, f.name)
    pack_args = vars(parser.parse_args(commands["pack"][0]))
    assert pack_args["block_size"] == config.block_size
    assert inspect.signature(pack_dataset).parameters["block_size"].default == config.block_size


def test_cli_flags_parse_like_the_config(capsys: pytest.CaptureFixture[str]) -> None:
    parser, sub = stage_parser()
    base = ["align", "base", "out", "-s", "x=y"]
    args = parser.parse_args([*base, "--compression", "none", "--compat", "fusellm"])
    assert (args.compression, args.compat) == (None, "fusellm")
    assert parser.parse_args([*base, "--num-threads", "3"]).num_threads == 3
    for bad in (["--vocab", "sofft"], ["--num-threads", "many"], ["--rows-per-batch", "1.5"]):
        with pytest.raises(SystemExit):
            parser.parse_args([*base, *bad])
        err = capsys.readouterr().err
        assert bad[1] in err
    helps = sub.choices["align"].format_help()
    assert "(default: soft)" in helps
    assert "through the vocabulary map" in helps


def test_cli_align_with_defaults_equals_the_api(
    extracts: dict, source_dirs: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`fusellm align` with no option and align_dataset() with no keyword write the same data
    (soft vocabulary through the default surface map, built in memory when none is given)."""
    parser, _ = stage_parser()
    cli_out, api_out = tmp_path / "cli", tmp_path / "api"
    argv = ["align", str(extracts["llama"]), str(cli_out), "--no-progress"]
    argv += [f"--source=neox={source_dirs['neox']}", f"--source=qwen={source_dirs['qwen']}"]
    args = parser.parse_args(argv)
    with quiet():
        assert args.func(args) == 0
        report = align_dataset(extracts["llama"], source_dirs, api_out, progress=False)
    capsys.readouterr()
    assert json.loads((cli_out / ALIGN_STATS_NAME).read_text())["vocab"] == "soft"
    shards = sorted(p.name for p in api_out.glob("*.arrow"))
    assert shards
    assert shards == sorted(p.name for p in cli_out.glob("*.arrow"))
    for name in shards:
        assert (cli_out / name).read_bytes() == (api_out / name).read_bytes(), name
    assert report.rows == len(TEXTS)


def test_cli_stale_outputs_name_the_flag(aligned: Any, tmp_path: Path) -> None:
    """A command-line user is told about --overwrite, not about a Python keyword alone."""
    parser, _ = stage_parser()
    out = tmp_path / "pk"
    args = parser.parse_args(["pack", str(aligned.output_dir), str(out), "--block-size", "32"])
    with quiet():
        assert args.func(args) == 0
    args = parser.parse_args(["pack", str(aligned.output_dir), str(out), "--block-size", "16"])
    with pytest.raises(StaleArtifactError, match=r"differs in: block_size.*\(--overwrite\)"):
        args.func(args)
    args = parser.parse_args(
        ["pack", str(aligned.output_dir), str(out), "--block-size", "16", "--overwrite"]
    )
    with quiet():
        assert args.func(args) == 0


def test_stored_spans_align_like_tokenizing_again(
    extracts: dict, source_dirs: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The offsets alignment reads the extraction's token_spans; an extraction without them (made
    before they were stored) is tokenized again: both give the same aligned shards."""
    import fusellm.stages.align as align_stage

    stored = align_dataset(extracts["llama"], source_dirs, tmp_path / "stored", progress=False)
    calls: list[int] = []
    encode = align_stage._encode_with_offsets

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return encode(*args, **kwargs)

    monkeypatch.setattr(align_stage, "_encode_with_offsets", counted)
    align_dataset(extracts["llama"], source_dirs, tmp_path / "again", progress=False)
    assert not calls  # the stored spans were used
    monkeypatch.setattr(align_stage, "SPANS_COLUMN", "no_such_column")
    again = align_dataset(extracts["llama"], source_dirs, tmp_path / "tokenized", progress=False)
    assert calls
    names = sorted(p.name for p in stored.output_dir.glob("*.arrow"))
    assert names == sorted(p.name for p in again.output_dir.glob("*.arrow"))
    for name in names:
        assert (stored.output_dir / name).read_bytes() == (again.output_dir / name).read_bytes()
