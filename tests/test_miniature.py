"""The built-in miniature: shipped corpus, trained tokenizers, tiny models, pre-training, and the
resumable preparation (at the "test" scale, a few seconds)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from fusellm import InputError
from fusellm import miniature as mini
from fusellm.io import MANIFEST_NAME
from fusellm.tokenization import BYTE_LEVEL_MARKER, SPIECE_MARKER, tokenizer_marker

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("datasets")

ODD_TEXT = "Ünïcödé ſ ☃ — “quotes” 景太郎\ttab  double  spaces\nnew line, then 3.14 and 42."


def _mtimes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*")}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    wd = tmp_path_factory.mktemp("miniature")
    return wd, mini.prepare_miniature(wd, seed=0, scale="test", progress=False)


def _load(path: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(path)), AutoTokenizer.from_pretrained(str(path))


# --- corpus --------------------------------------------------------------------------------------


def test_corpus_splits_are_disjoint_and_cover_the_domains() -> None:
    train = mini.load_corpus("train")
    held = mini.load_corpus("heldout")
    assert train.column_names[:2] == ["text", "domain"]
    assert set(train["domain"]) == set(held["domain"]) == set(mini.DOMAINS)
    assert not set(train["id"]) & set(held["id"])
    assert not set(train["text"]) & set(held["text"])
    for d in mini.DOMAINS:
        n_train, n_held = train["domain"].count(d), held["domain"].count(d)
        assert n_train >= 500
        assert 0.08 <= n_held / (n_train + n_held) <= 0.12
    assert all(len(t.split()) >= 50 for t in held["text"])


def test_corpus_subsets_are_deterministic_and_validated() -> None:
    a = mini.load_corpus("heldout", domains=["python"], max_docs_per_domain=5)
    b = mini.load_corpus("heldout", domains="python", max_docs_per_domain=5)
    assert a["id"] == b["id"]
    assert len(a) == 5
    assert set(a["domain"]) == {"python"}
    with pytest.raises(InputError):
        mini.load_corpus("validation")
    with pytest.raises(InputError):
        mini.load_corpus(domains=["poetry"])
    with pytest.raises(InputError):
        mini.load_corpus(max_docs_per_domain=0)


def test_corpus_notice_names_sources_and_licences() -> None:
    notice = (mini.corpus_dir() / "NOTICE.md").read_text(encoding="utf-8")
    index = json.loads((mini.corpus_dir() / "index.json").read_text(encoding="utf-8"))
    for d in mini.DOMAINS:
        info = index["domains"][d]
        assert info["package"] in notice
        assert info["version"] in notice
    assert notice.count("public domain") >= 2
    assert "PSF LICENSE AGREEMENT FOR PYTHON" in notice
    assert "Copyright © 2001-2023 Python Software Foundation" in notice
    assert "brief summary of the changes" in notice
    total = sum(info["bytes"] for info in index["domains"].values())
    assert total < 2_000_000


# --- tokenizers ----------------------------------------------------------------------------------


def test_tokenizers_have_the_right_family_and_round_trip(prepared: tuple[Path, Any]) -> None:
    from transformers import AutoTokenizer

    _, m = prepared
    texts = [*mini.load_corpus("heldout", max_docs_per_domain=2)["text"], ODD_TEXT]
    sizes = set()
    for name, path in {"target": m.target, **m.sources}.items():
        tok = AutoTokenizer.from_pretrained(str(path))
        sizes.add(len(tok))
        vocab = tok.convert_ids_to_tokens(list(range(len(tok))))
        if name == "target":
            assert tokenizer_marker(tok) == SPIECE_MARKER
            assert tok.eos_token == "</s>"
            assert vocab[3:259] == [f"<0x{b:02X}>" for b in range(256)]
            pieces = tok.convert_ids_to_tokens(tok(ODD_TEXT, add_special_tokens=False)["input_ids"])
            assert "<0xE2>" in pieces  # a character outside the alphabet falls back to bytes
        else:
            assert tokenizer_marker(tok) == BYTE_LEVEL_MARKER
            assert tok.eos_token == "<|endoftext|>"
            assert not any(v.startswith("<0x") for v in vocab)
        for text in texts:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert tok.decode(ids) == text
            assert tok.eos_token_id not in ids
        ids = tok(texts[0] + tok.eos_token, add_special_tokens=False)["input_ids"]
        assert ids[-1] == tok.eos_token_id
    assert len(sizes) == 3  # three different vocabularies


def test_build_tokenizer_is_deterministic_and_exact(tmp_path: Path) -> None:
    texts = list(mini.load_corpus("train", max_docs_per_domain=10)["text"])
    for kind, size in (("spiece", 600), ("bytelevel", 400)):
        a = mini.build_tokenizer(kind, texts, size, tmp_path / f"{kind}-a")
        mini.build_tokenizer(kind, texts, size, tmp_path / f"{kind}-b")
        assert len(a) == size
        assert (tmp_path / f"{kind}-a" / "tokenizer.json").read_bytes() == (
            tmp_path / f"{kind}-b" / "tokenizer.json"
        ).read_bytes()
    with pytest.raises(InputError):
        mini.build_tokenizer("wordpiece", texts, 600, tmp_path / "x")
    with pytest.raises(InputError):
        mini.build_tokenizer("spiece", texts, 100, tmp_path / "x")
    with pytest.raises(TypeError):
        mini.build_tokenizer("spiece", "one string", 600, tmp_path / "x")


_FRESH_BUILD = """
import hashlib, sys, tempfile
from fusellm import miniature as m
sc = m.SCALES["test"]
spec = m.MODEL_SPECS[0]
texts = m._texts(m._partition(0, sc), spec.tokenizer_mix, sc.tokenizer_docs)
with tempfile.TemporaryDirectory() as out:
    m.build_tokenizer(spec.tokenizer, texts, spec.vocab[1], out + "/tok")
    print(hashlib.sha256(open(out + "/tok/tokenizer.json", "rb").read()).hexdigest())
"""


def test_target_tokenizer_is_identical_in_fresh_processes() -> None:
    # The tokenizers trainer orders characters of equal count by a per-process hash: with its own
    # alphabet cut, these texts gave three different target tokenizers in six fresh processes.
    import subprocess
    import sys

    digests = {
        subprocess.run(
            [sys.executable, "-c", _FRESH_BUILD], check=True, capture_output=True, text=True
        ).stdout.strip()
        for _ in range(4)
    }
    assert len(digests) == 1, digests


# --- models --------------------------------------------------------------------------------------


def test_models_load_with_their_architecture_and_vocabulary(prepared: tuple[Path, Any]) -> None:
    _, m = prepared
    expected = {
        "target": "LlamaForCausalLM",
        "neox_bible": "GPTNeoXForCausalLM",
        "mpt_python": "MptForCausalLM",
    }
    paths = {"target": m.target, **m.sources}
    assert set(paths) == set(expected)
    assert m.domains == {"target": "mixed", "neox_bible": "bible", "mpt_python": "python"}
    for name, path in paths.items():
        model, tok = _load(path)
        assert type(model).__name__ == expected[name]
        assert model.config.vocab_size == len(tok)
        assert model.get_output_embeddings().weight.shape[0] == len(tok)
        assert mini._max_positions(model.config) >= m.block_size
        stats = json.loads((path / "pretrain.json").read_text(encoding="utf-8"))
        assert stats["final_loss"] < stats["first_loss"]


def test_sources_beat_the_target_on_their_domains(prepared: tuple[Path, Any]) -> None:
    _, m = prepared
    ev = m.evaluation
    for name, domain in (("neox_bible", "bible"), ("mpt_python", "python")):
        assert ev[name][domain]["bits_per_byte"] < ev["target"][domain]["bits_per_byte"]
    summary = json.loads((m.workdir / "models" / "miniature.json").read_text(encoding="utf-8"))
    assert summary["evaluation"] == ev


# --- pre-training --------------------------------------------------------------------------------


def test_pretrain_lowers_the_loss_and_is_deterministic(
    prepared: tuple[Path, Any], tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    _, m = prepared
    texts = list(mini.load_corpus("train", domains=["bible"], max_docs_per_domain=20)["text"])
    kw = {"steps": 12, "block_size": 64, "batch_size": 4, "lr": 5e-3}
    a = mini.pretrain(m.target, texts, tmp_path / "a", seed=3, progress=False, **kw)
    b = mini.pretrain(m.target, texts, tmp_path / "b", seed=3, progress=False, **kw)
    mini.pretrain(m.target, texts, tmp_path / "c", seed=4, progress=False, **kw)
    assert a["losses"] == b["losses"]
    assert sum(a["losses"][-3:]) / 3 < a["losses"][0] - 0.2
    wa, wb, wc = (load_file(str(tmp_path / x / "model.safetensors")) for x in "abc")
    assert wa.keys() == wb.keys()
    assert all((wa[k] == wb[k]).all() for k in wa)
    assert any((wa[k] != wc[k]).any() for k in wa)
    assert json.loads((tmp_path / "a" / "pretrain.json").read_text())["losses"] == a["losses"]
    _load(tmp_path / "a")
    with pytest.raises(InputError):
        mini.pretrain(m.target, ["too short"], tmp_path / "d", seed=0, **kw)
    with pytest.raises(InputError):
        mini.pretrain(m.target, texts, tmp_path / "d", **{**kw, "block_size": 100_000})
    assert not (tmp_path / "d").exists()


# --- prepare_miniature ---------------------------------------------------------------------------


def test_prepare_skips_finished_pieces_and_rebuilds_on_change(
    prepared: tuple[Path, Any], caplog: pytest.LogCaptureFixture
) -> None:
    import datasets

    wd, first = prepared
    assert set(first.pieces.values()) == {"built"}
    train = datasets.load_from_disk(str(first.train_data))
    held = datasets.load_from_disk(str(first.heldout_data))
    assert set(train["domain"]) == set(held["domain"]) == set(mini.DOMAINS)
    assert not set(train["id"]) & set(held["id"])
    before = _mtimes(wd)

    with caplog.at_level(logging.INFO, logger="fusellm.artifact"):
        again = mini.prepare_miniature(wd, seed=0, scale="test", progress=False)
    assert set(again.pieces.values()) == {"skipped"}, again.pieces
    for piece in ("data/train", "models/tokenizers/target", "models/target"):
        assert f"{wd / piece} is up to date (same seed, scale and inputs): skipped" in caplog.text
    summary = wd / "models" / "miniature.json"
    assert f"{summary} is up to date (same seed, scale and inputs): skipped" in caplog.text
    assert _mtimes(wd) == before
    assert again.evaluation == first.evaluation
    assert not [p for p in wd.rglob("*") if ".tmp-" in p.name]

    # a modified piece is rebuilt, with what depends on it; the rest is kept
    weights = wd / "models" / "neox_bible" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    fixed = mini.prepare_miniature(wd, seed=0, scale="test", progress=False)
    built = {k for k, v in fixed.pieces.items() if v == "built"}
    assert built - {"summary"} == {"neox_bible"}
    assert fixed.evaluation == first.evaluation  # rebuilt identically

    # another seed rebuilds everything seeded: the partition, tokenizers, models
    other = mini.prepare_miniature(wd, seed=1, scale="test", progress=False)
    assert other.pieces["data/heldout"] == "built"  # same documents, new manifest key
    assert {k for k, v in other.pieces.items() if v == "built"} == set(other.pieces)
    assert datasets.load_from_disk(str(other.train_data))["id"] != train["id"]
    after = _mtimes(wd)
    assert after[f"models/target/{MANIFEST_NAME}"] != before[f"models/target/{MANIFEST_NAME}"]


def test_prepare_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(InputError):
        mini.prepare_miniature(tmp_path, scale="huge")
    with pytest.raises(InputError):
        mini.prepare_miniature(tmp_path, seed=-1)
