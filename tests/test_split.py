"""Stage 1 (split) on the real tokenizers, and the shared I/O helpers of fusellm.io.

The split's contract: every row fits ``block_size - margin`` tokens under EVERY tokenizer; rows
keep the input order and record their document; with the default boundaries a document is the
exact concatenation of its rows and cuts fall after whitespace (no word is split).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fusellm
from fusellm.io import (
    MANIFEST_NAME,
    atomic_dir,
    atomic_write_json,
    fingerprint_dataset,
    fingerprint_files,
    load_text_dataset,
    read_manifest,
)
from fusellm.samples import SAMPLE_TEXTS
from fusellm.stages.split import BOUNDARIES, add_split_parser, run_split, split_texts

datasets = pytest.importorskip("datasets")

BLOCK, MARGIN = 96, 8
LIMIT = BLOCK - MARGIN
LONG_DOC = " ".join(SAMPLE_TEXTS) * 2


@pytest.fixture(scope="module")
def toks(mistral: Any, qwen: Any, deepseek: Any) -> list[Any]:
    return [mistral.tok, qwen.tok, deepseek.tok]


def n_tokens(tok: Any, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


def rows_of(ds: Any) -> list[tuple[str, int, int]]:
    return list(zip(ds["text"], ds["doc_index"], ds["chunk_index"], strict=True))


def check_split(
    docs: list[str], out: Any, toks: list[Any], limit: int, boundary: str, drop_empty: bool = True
) -> None:
    """The invariants every (non-reference) split must satisfy."""
    rows = rows_of(out)
    # Order: documents ascending, chunks 0, 1, ... within each.
    keys = [(d, c) for _, d, c in rows]
    assert keys == sorted(keys)
    by_doc: dict[int, list[str]] = {}
    for text, d, c in rows:
        assert c == len(by_doc.setdefault(d, []))
        by_doc[d].append(text)
    for d, doc in enumerate(docs):
        if doc == "" and drop_empty:
            assert d not in by_doc
            continue
        assert "".join(by_doc[d]) == doc  # lossless
    for text, _, _ in rows:
        for tok in toks:
            assert n_tokens(tok, text) <= limit, (boundary, text)
    if boundary == "word":
        for chunks in by_doc.values():
            for a, b in itertools.pairwise(chunks):
                # The cut is after whitespace, or the window had no whitespace at all.
                assert a[-1].isspace() or not any(ch.isspace() for ch in a[-len(a) // 4 :])
                assert not b[0].isspace() or a[-1].isspace()


# --- splitting -----------------------------------------------------------------------------------


def test_short_documents_pass_through_unchanged(toks: list[Any]) -> None:
    out, stats = split_texts(list(SAMPLE_TEXTS), toks, return_stats=True, progress=False)
    assert out["text"] == list(SAMPLE_TEXTS)
    assert out["doc_index"] == list(range(len(SAMPLE_TEXTS)))
    assert out["chunk_index"] == [0] * len(SAMPLE_TEXTS)
    assert out.features["doc_index"] == datasets.Value("int64")
    assert out.features["chunk_index"] == datasets.Value("int32")
    assert (stats.num_docs, stats.num_rows, stats.num_split_docs) == (len(SAMPLE_TEXTS),) * 2 + (0,)
    for tok, (name, longest) in zip(toks, stats.max_tokens.items(), strict=True):
        assert longest == max(n_tokens(tok, t) for t in SAMPLE_TEXTS), name


@pytest.mark.parametrize("boundary", ["word", "sentence", "token"])
def test_long_documents_fit_every_tokenizer(toks: list[Any], boundary: str) -> None:
    docs = ["Short.", LONG_DOC, "", SAMPLE_TEXTS[3] * 4, "x" * 700, SAMPLE_TEXTS[2]]
    out, stats = split_texts(
        docs, toks, block_size=BLOCK, margin=MARGIN, boundary=boundary, return_stats=True
    )
    check_split(docs, out, toks, LIMIT, boundary)
    assert stats.num_split_docs == 3
    assert stats.num_empty_dropped == 1
    assert stats.num_rows == len(out)
    assert max(stats.max_tokens.values()) <= LIMIT
    if boundary == "sentence":
        # Cuts of the prose document land after sentence ends or newlines.
        chunks = [t for t, d, _ in rows_of(out) if d == 1][:-1]
        assert all(c.rstrip()[-1] in '.!?)”"' or c.endswith("\n") for c in chunks)


def test_word_boundaries_split_no_word(toks: list[Any]) -> None:
    out, stats = split_texts(
        [LONG_DOC], toks, block_size=BLOCK, margin=MARGIN, return_stats=True, progress=False
    )
    assert len(out) > 3
    words = set(LONG_DOC.split())
    for text in out["text"]:
        assert set(text.split()) <= words  # every chunk is made of whole words
    assert stats.num_forced_cuts == 0


def test_reference_boundary_decodes_id_chunks_of_the_longest_tokenization(
    toks: list[Any],
) -> None:
    out, stats = split_texts(
        [LONG_DOC], toks, block_size=BLOCK, margin=MARGIN, boundary="reference", return_stats=True
    )
    counts = [n_tokens(t, LONG_DOC) for t in toks]
    tok = toks[int(np.argmax(counts))]
    ids = tok(LONG_DOC, add_special_tokens=False)["input_ids"]
    expected = [tok.decode(ids[i : i + LIMIT]) for i in range(0, len(ids), LIMIT)]
    assert out["text"] == expected
    # The reference does not re-check its chunks: some overflow another tokenizer (or itself).
    over = sum(max(n_tokens(t, x) for t in toks) > LIMIT for x in expected)
    assert stats.num_over_limit == over


def test_empty_documents_dropped_or_kept(toks: list[Any]) -> None:
    docs = ["", "a b", ""]
    out = split_texts(docs, toks, progress=False)
    assert rows_of(out) == [("a b", 1, 0)]
    kept = split_texts(docs, toks, drop_empty=False, progress=False)
    assert rows_of(kept) == [("", 0, 0), ("a b", 1, 0), ("", 2, 0)]


def test_other_columns_follow_their_document(toks: list[Any]) -> None:
    ds = datasets.Dataset.from_dict(
        {"id": ["a", "b", "c"], "text": ["one", LONG_DOC, "three"], "score": [1.0, 2.0, 3.0]}
    )
    out = split_texts(ds, toks, block_size=BLOCK, margin=MARGIN, progress=False)
    assert out.column_names == ["id", "text", "score", "doc_index", "chunk_index"]
    for row in out:
        assert row["id"] == "abc"[row["doc_index"]]
        assert row["score"] == float(row["doc_index"] + 1)
    assert out.features["score"] == ds.features["score"]
    # One document dropped and one cut in two: as many rows as documents, but not the same ones.
    ds2 = datasets.Dataset.from_dict({"id": ["a", "b"], "text": ["", LONG_DOC[:700]]})
    out2 = split_texts(ds2, toks, block_size=BLOCK, margin=MARGIN, progress=False)
    assert len(out2) == 2
    assert out2["id"] == ["b", "b"]
    bare = split_texts(ds, toks, keep_columns=False, progress=False)
    assert bare.column_names == ["text", "doc_index", "chunk_index"]


def test_selected_view_is_split_in_its_visible_order(toks: list[Any]) -> None:
    ds = datasets.Dataset.from_dict({"text": ["zero", "one", "two", "three"]}).select([3, 1])
    assert split_texts(ds, toks, progress=False)["text"] == ["three", "one"]


def test_many_batches_equal_one_batch(toks: list[Any]) -> None:
    docs = [*SAMPLE_TEXTS, LONG_DOC, "", *SAMPLE_TEXTS[::-1], LONG_DOC[::-1]]
    one = split_texts(docs, toks, block_size=BLOCK, margin=MARGIN, batch_size=1000)
    many = split_texts(docs, toks, block_size=BLOCK, margin=MARGIN, batch_size=3)
    assert rows_of(one) == rows_of(many)
    assert fingerprint_dataset(one) == fingerprint_dataset(many)


TEXT_PIECES = [*"abcdefgh xyz", " ", "  ", "\n", "\n\n", "\t", ".", "!", "?", ",", "'", '"']
TEXT_PIECES += ["é", "—", "寿", "司", "ελ", "🙂", "1850", "”", "-"]
TEXT_ALPHABET = st.sampled_from(TEXT_PIECES)


@settings(max_examples=max(10, settings.default.max_examples // 4))
@given(
    parts=st.lists(TEXT_ALPHABET, min_size=0, max_size=300),
    limit=st.integers(min_value=16, max_value=48),
    boundary=st.sampled_from(["word", "sentence", "token"]),
)
def test_split_invariants_on_random_text(
    toks: list[Any], parts: list[str], limit: int, boundary: str
) -> None:
    doc = "".join(parts)
    docs = [doc, "tail"]
    out = split_texts(docs, toks, block_size=limit + 4, margin=4, boundary=boundary, progress=False)
    check_split(docs, out, toks, limit, boundary)


def test_tokenizers_from_paths_and_bundled_names(toks: list[Any], tmp_path: Path) -> None:
    toks[0].save_pretrained(tmp_path / "mistral")
    by_path = split_texts(
        [LONG_DOC], [tmp_path / "mistral", "bundled:deepseek"], block_size=BLOCK, margin=MARGIN
    )
    by_obj = split_texts([LONG_DOC], [toks[0], toks[2]], block_size=BLOCK, margin=MARGIN)
    assert by_path["text"] == by_obj["text"]
    with pytest.raises(fusellm.InputError, match="does not exist"):
        split_texts(["x"], tmp_path / "nope")
    with pytest.raises(fusellm.InputTypeError, match="not a fast tokenizer"):
        split_texts(["x"], [object()])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"boundary": "paragraph"}, "boundary"),
        ({"block_size": 20, "margin": 10}, "at least"),
        ({"margin": -1}, "at least"),
        ({"max_backoff": 1.0}, "max_backoff"),
        ({"batch_size": 0}, "batch_size"),
        ({"text_column": "body"}, "no column 'body'"),
    ],
)
def test_bad_parameters(toks: list[Any], kwargs: dict[str, Any], match: str) -> None:
    ds = datasets.Dataset.from_dict({"text": ["some text"]})
    with pytest.raises(fusellm.InputError, match=match):
        split_texts(ds, toks[:1], **kwargs)


def test_bad_columns(toks: list[Any]) -> None:
    with pytest.raises(fusellm.InputError, match="null"):
        split_texts(datasets.Dataset.from_dict({"text": ["a", None]}), toks[:1])
    with pytest.raises(fusellm.InputTypeError, match="not strings"):
        split_texts(datasets.Dataset.from_dict({"text": [1, 2]}), toks[:1])
    with pytest.raises(fusellm.InputError, match="doc_index"):
        split_texts(datasets.Dataset.from_dict({"text": ["a"], "doc_index": [0]}), toks[:1])
    with pytest.raises(fusellm.InputTypeError, match="strings"):
        split_texts(["a", 3], toks[:1])


# --- inputs, outputs, command line ---------------------------------------------------------------


def test_every_input_format_gives_the_same_rows(toks: list[Any], tmp_path: Path) -> None:
    docs = [SAMPLE_TEXTS[0], LONG_DOC, SAMPLE_TEXTS[4]]
    base = datasets.Dataset.from_dict({"text": docs})
    (tmp_path / "docs.jsonl").write_text(
        "".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8"
    )
    base.to_parquet(str(tmp_path / "docs.parquet"))
    base.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "txt").mkdir()
    for i, d in enumerate(docs):
        (tmp_path / "txt" / f"{i:02d}.txt").write_text(d, encoding="utf-8")
    expected = split_texts(docs, toks, block_size=BLOCK, margin=MARGIN)["text"]
    for source in ["docs.jsonl", "docs.parquet", "saved", "txt"]:
        got = split_texts(tmp_path / source, toks, block_size=BLOCK, margin=MARGIN)
        assert got["text"] == expected, source
    assert load_text_dataset(tmp_path / "txt")["path"] == ["00.txt", "01.txt", "02.txt"]
    (tmp_path / "x.csv").write_text("text\na\n")
    with pytest.raises(fusellm.InputError, match="unknown input format"):
        load_text_dataset(tmp_path / "x.csv")
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(fusellm.InputError, match="cannot read"):
        load_text_dataset(tmp_path / "bad.jsonl")
    with pytest.raises(fusellm.InputError, match="does not exist"):
        load_text_dataset(tmp_path / "missing")


def test_run_split_saves_atomically_with_a_manifest(
    toks: list[Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out_dir = tmp_path / "split"
    stats = run_split([LONG_DOC, "b"], out_dir, toks, block_size=BLOCK, margin=MARGIN)
    ds = datasets.load_from_disk(str(out_dir))
    assert len(ds) == stats.num_rows
    manifest = read_manifest(out_dir)
    assert manifest is not None
    assert manifest["stage"] == "split"
    assert manifest["params"]["block_size"] == BLOCK
    assert manifest["input"]["sha256"] == fingerprint_dataset(
        datasets.Dataset.from_dict({"text": [LONG_DOC, "b"]})
    )
    assert len(manifest["tokenizers"]) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["split"]  # no temporary left
    # The same inputs again: skipped, nothing rewritten, the recorded statistics returned.
    mtimes = {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()}
    with caplog.at_level(logging.INFO, logger="fusellm.artifact"):
        again = run_split([LONG_DOC, "b"], out_dir, toks, block_size=BLOCK, margin=MARGIN)
    assert f"{out_dir} is up to date (same documents, tokenizers and settings): skipped" in (
        caplog.text
    )
    assert again.skipped
    assert not stats.skipped
    assert (again.num_rows, again.num_docs) == (stats.num_rows, stats.num_docs)
    assert {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()} == mtimes
    # Other documents, other tokenizers or other settings: refused, naming what differs.
    with pytest.raises(fusellm.StaleArtifactError, match="input_sha256"):
        run_split(["c"], out_dir, toks, block_size=BLOCK, margin=MARGIN)
    with pytest.raises(fusellm.StaleArtifactError, match="params, tokenizers"):
        run_split([LONG_DOC, "b"], out_dir, toks[:1])
    run_split(["c"], out_dir, toks[:1], overwrite=True)
    assert datasets.load_from_disk(str(out_dir))["text"] == ["c"]
    # The replace-stale policy fusellm run passes: replaced, and the replacement is complete.
    replaced = run_split(["d"], out_dir, toks[:1], on_stale="replace")
    assert not replaced.skipped
    assert datasets.load_from_disk(str(out_dir))["text"] == ["d"]
    assert run_split(["d"], out_dir, toks[:1], on_stale="replace").skipped
    with pytest.raises(fusellm.InputError, match="on_stale must be one of"):
        run_split(["d"], out_dir, toks[:1], on_stale="ignore")
    # Documents that are all empty: an error naming the column, and nothing written.
    with pytest.raises(fusellm.InputError, match=r"2 document\(s\) in column 'text' are all empty"):
        run_split(["", ""], tmp_path / "empty", toks[:1])
    assert not (tmp_path / "empty").exists()
    # A failing split leaves nothing behind.
    with pytest.raises(fusellm.InputError):
        run_split(["c"], tmp_path / "never", toks[:1], block_size=10)
    assert not (tmp_path / "never").exists()


def test_cli_hook(toks: list[Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    toks[0].save_pretrained(tmp_path / "tok")
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": LONG_DOC}) + "\n", encoding="utf-8")
    parser = argparse.ArgumentParser(prog="fusellm")
    add_split_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "split",
            str(tmp_path / "in.jsonl"),
            str(tmp_path / "out"),
            "-t",
            str(tmp_path / "tok"),
            "-t",
            "bundled:qwen",
            "--block-size",
            str(BLOCK),
            "--margin",
            str(MARGIN),
            "--boundary",
            "sentence",
            "--no-progress",
        ]
    )
    assert args.func(args) == 0
    assert "rows" in capsys.readouterr().out
    # `fusellm split` run twice: the second run skips and says so.
    assert args.func(args) == 0
    assert "up to date" in capsys.readouterr().out
    got = datasets.load_from_disk(str(tmp_path / "out"))["text"]
    assert (
        got
        == split_texts([LONG_DOC], toks[:2], block_size=BLOCK, margin=MARGIN, boundary="sentence")[
            "text"
        ]
    )
    assert set(BOUNDARIES) == {"word", "sentence", "token", "reference"}


# --- fusellm.io ----------------------------------------------------------------------------------


def test_fingerprint_dataset_ignores_chunking_and_format(tmp_path: Path) -> None:
    texts = [f"row {i} " + "é" * (i % 7) for i in range(50)]
    one = pa.table({"text": texts, "n": list(range(50))})
    chunked = pa.Table.from_batches(one.to_batches(max_chunksize=7))
    assert chunked.column(0).num_chunks > 1
    fp = fingerprint_dataset(one)
    assert fingerprint_dataset(chunked) == fp
    ds = datasets.Dataset(datasets.table.InMemoryTable(chunked))
    assert fingerprint_dataset(ds) == fp
    ds.save_to_disk(str(tmp_path / "d"), num_shards=3)
    assert fingerprint_dataset(datasets.load_from_disk(str(tmp_path / "d"))) == fp
    changed = pa.table({"text": [*texts[:-1], "other"], "n": list(range(50))})
    assert fingerprint_dataset(changed) != fp
    assert fingerprint_dataset(one, ["text"]) != fp
    with pytest.raises(fusellm.InputError, match="no column"):
        fingerprint_dataset(one, ["nope"])


def test_fingerprint_files_and_reuse(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"w" * 100)
    (tmp_path / "notes.txt").write_text("ignored")
    first = fingerprint_files(tmp_path, patterns=["config.json", "*.safetensors"])
    assert [f[0] for f in first["files"]] == ["config.json", "model.safetensors"]
    # Unchanged stats: the recorded hash is reused without reading the files.
    fake = {"sha256": "cafe", "files": first["files"]}
    assert (
        fingerprint_files(tmp_path, patterns=["config.json", "*.safetensors"], previous=fake)[
            "sha256"
        ]
        == "cafe"
    )
    (tmp_path / "model.safetensors").write_bytes(b"x" * 100)
    os.utime(tmp_path / "model.safetensors", ns=(1, 1))
    again = fingerprint_files(tmp_path, patterns=["config.json", "*.safetensors"], previous=first)
    assert again["sha256"] != first["sha256"]


def test_atomic_helpers(tmp_path: Path) -> None:
    atomic_write_json(tmp_path / "a.json", {"b": 1, "a": [1.5, None]})
    assert json.loads((tmp_path / "a.json").read_text()) == {"a": [1.5, None], "b": 1}

    def fail() -> None:
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "f").write_text("x")
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "f").write_text("x")
    assert (tmp_path / "d" / "f").read_text() == "x"
    with pytest.raises(FileExistsError):  # noqa: SIM117
        with atomic_dir(tmp_path / "d"):
            pass
    with atomic_dir(tmp_path / "d", overwrite=True) as tmp:
        (tmp / "g").write_text("y")
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["g"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "d"]
    assert MANIFEST_NAME.endswith(".json")
