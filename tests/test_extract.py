"""Stage 2 (extract) on tiny models built from configs over the real tokenizers.

Each stored row is compared with an independent computation: an unpadded single-row forward pass,
``torch.topk`` of its full logits (ids without a token removed), and the cross-entropy from float64
log-softmax. Sharding, resuming after a SIGKILL, manual ``i/N`` workers and ``torchrun`` ranks must
all produce the bytes of one uninterrupted run; bad inputs must fail before anything is written.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fusellm
from fusellm.io import MANIFEST_NAME, read_manifest
from fusellm.samples import SAMPLE_TEXTS
from models import TinyModel, build_named, load, quiet, reference_row

torch = pytest.importorskip("torch")
datasets = pytest.importorskip("datasets")

from fusellm.stages.extract import (  # noqa: E402
    KILL_ENV,
    TopKEngine,
    add_extract_parser,
    extract_topk,
    finalize_extract,
    grouped_topk,
    pad_batch,
    plan_batches,
)

K = 10
ROWS_PER_SHARD = 4
#: Small batches: several per shard, each padded to its own longest row.
BATCH = {"max_tokens_per_batch": 160, "max_batch_size": 4}
TEXTS = [
    *SAMPLE_TEXTS,
    "Hello",
    "A second, longer line of text that keeps going for a while.",
    SAMPLE_TEXTS[0][:40],
    "x",
    "Numbers: 1, 22, 333, 4444.",
    SAMPLE_TEXTS[1][::-1],
]


def run(model: TinyModel, out: Path, data: Any = None, **kw: Any) -> Any:
    args = {"rows_per_shard": ROWS_PER_SHARD, "progress": False, **BATCH, **kw}
    with quiet():
        return extract_topk(TEXTS if data is None else data, model.path, out, **args)


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("data-*.arrow"))}


def listing(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in sorted(path.rglob("*"))}


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return build_named("llama", tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def tiny_neox(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return build_named("neox", tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return build_named("qwen2", tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def llama_run(tiny_llama: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Any:
    return run(tiny_llama, tmp_path_factory.mktemp("x") / "llama", per_step_ce=True)


# --- results against an independent computation -------------------------------------------------


def check_against_reference(model: TinyModel, report: Any, texts: list[str] = TEXTS) -> None:
    lm, tok = load(model)
    ds = report.load()
    values = read_manifest(report.output_dir)["key"]["values"]
    assert len(ds) == len(texts)
    assert ds["text"] == texts
    assert ds["row_index"] == list(range(len(texts)))
    rows = ds.with_format("numpy")
    for r, row in enumerate(rows):
        enc = tok(texts[r] + tok.eos_token, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        assert row["input_ids"].tolist() == ids
        assert row["num_tokens"] == len(ids)
        # Each token's character span; the EOS is one virtual character after the text.
        spans = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        n_chars = len(texts[r])
        spans[-1] = [n_chars, n_chars + 1]
        np.testing.assert_array_equal(row["token_spans"], spans)
        assert row["num_bytes"] == len(texts[r].encode("utf-8"))
        ref = reference_row(lm, ids, model.num_tokens, K)
        got_ids, got_logits = row["per_step_indices"], row["per_step_logits"]
        assert got_ids.shape == got_logits.shape == (len(ids), K)
        assert (got_ids < model.num_tokens).all()
        np.testing.assert_array_equal(got_ids, ref["ids"])
        want = ref[values]
        np.testing.assert_allclose(got_logits, want, rtol=2e-3, atol=2e-3)
        # Equal to float16 rounding of the reference, except where the reference lies within
        # float noise of a rounding boundary.
        assert np.mean(want.astype(np.float16) == got_logits.astype(np.float16)) > 0.99
        if values == "logprobs":  # the row's mass: at most 1, the rest outside the top-K
            mass = np.exp(got_logits.astype(np.float64)).sum(-1)
            assert (mass <= 1 + 2e-3).all()
        assert row["metric_ce"] == pytest.approx(ref["ce"], abs=2e-5)
        if "per_step_metric_ce" in row:
            np.testing.assert_allclose(row["per_step_metric_ce"], ref["steps"], atol=2e-5)
    # The stored dtypes.
    table = ds.data.table
    assert table.column("per_step_indices").type.value_type.value_type == "int32"
    assert table.column("per_step_logits").type.value_type.value_type == "halffloat"


def test_llama_mistral_matches_full_logits(tiny_llama: TinyModel, llama_run: Any) -> None:
    assert read_manifest(llama_run.output_dir)["key"]["values"] == "logprobs"  # the default
    check_against_reference(tiny_llama, llama_run)
    ds = llama_run.load()
    # per_step_metric_ce has L - 1 entries whose mean is metric_ce.
    for row in ds:
        assert len(row["per_step_metric_ce"]) == row["num_tokens"] - 1
        assert np.mean(row["per_step_metric_ce"]) == pytest.approx(row["metric_ce"], abs=1e-5)


def test_raw_logits_as_the_reference_stores_them(tiny_llama: TinyModel, tmp_path: Path) -> None:
    report = run(tiny_llama, tmp_path / "logits", values="logits")
    assert read_manifest(report.output_dir)["key"]["values"] == "logits"
    check_against_reference(tiny_llama, report)


FAMILY_TEXTS = TEXTS[:4] + TEXTS[8:11]


@pytest.fixture(scope="module")
def family_runs(
    tiny_neox: TinyModel, tiny_qwen2: TinyModel, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[TinyModel, Any]]:
    root = tmp_path_factory.mktemp("families")
    return {
        name: (m, run(m, root / name, data=FAMILY_TEXTS, max_tokens_per_batch=400))
        for name, m in [("neox", tiny_neox), ("qwen2", tiny_qwen2)]
    }


@pytest.mark.parametrize("name", ["neox", "qwen2"])
def test_other_families_match_full_logits(
    name: str, family_runs: dict[str, tuple[TinyModel, Any]]
) -> None:
    model, report = family_runs[name]
    check_against_reference(model, report, FAMILY_TEXTS)


def test_padded_vocabulary_ids_are_excluded(family_runs: dict[str, tuple[TinyModel, Any]]) -> None:
    model, report = family_runs["qwen2"]
    assert model.vocab_size > model.num_tokens
    lm, tok = load(model)
    ids = tok(TEXTS[0], add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        raw = torch.topk(lm(input_ids=torch.tensor([ids])).logits[0], K).indices
    assert (raw >= model.num_tokens).float().mean() > 0.5  # they WOULD win the top-K
    for row in report.load().with_format("numpy"):
        assert row["per_step_indices"].max() < model.num_tokens
    assert read_manifest(report.output_dir)["key"]["num_valid_ids"] == model.num_tokens
    assert read_manifest(report.output_dir)["model"]["logits_width"] == model.vocab_size


def test_dynamic_padding(llama_run: Any) -> None:
    lengths = llama_run.load()["num_tokens"]
    assert llama_run.num_tokens == sum(lengths)
    # Batches are padded to their own longest row, not to the longest row of all.
    assert llama_run.padded_tokens < len(lengths) * max(lengths)
    assert llama_run.padded_tokens >= sum(lengths)
    assert llama_run.num_batches > llama_run.num_shards


def test_schema_dtypes_and_manifest(llama_run: Any, tiny_llama: TinyModel) -> None:
    out = llama_run.output_dir
    ds = datasets.load_from_disk(str(out))
    f = ds.features
    assert f["input_ids"] == datasets.List(datasets.Value("int32"))
    assert f["per_step_logits"] == datasets.List(datasets.List(datasets.Value("float16"), length=K))
    assert f["per_step_indices"] == datasets.List(datasets.List(datasets.Value("int32"), length=K))
    assert f["metric_ce"] == datasets.Value("float32")
    assert f["per_step_metric_ce"] == datasets.List(datasets.Value("float32"))
    assert f["token_spans"] == datasets.List(datasets.List(datasets.Value("int32"), length=2))
    schema = ds.data.schema
    assert str(schema.field("per_step_logits").type) == (
        "list<item: fixed_size_list<item: halffloat>[10]>"
    )
    manifest = read_manifest(out)
    assert manifest["complete"] is True
    num_shards = -(-len(TEXTS) // ROWS_PER_SHARD)
    assert manifest["key"]["num_shards"] == len(list(out.glob("data-*.arrow"))) == num_shards
    assert (
        manifest["key"]["model_sha256"] == fusellm.io.model_fingerprint(tiny_llama.path)["sha256"]
    )
    assert manifest["totals"]["num_tokens"] == sum(ds["num_tokens"])
    # (The 60 bytes/token budget is measured by the benchmark: these shards are a few rows.)
    assert manifest["totals"]["bytes"] == sum(p.stat().st_size for p in out.glob("data-*.arrow"))
    assert sum(s["num_rows"] for s in manifest["shards"]) == len(TEXTS)
    assert [s["row_start"] for s in manifest["shards"]] == list(
        range(0, len(TEXTS), ROWS_PER_SHARD)
    )
    assert manifest["model"]["logits_width"] == 32000
    assert llama_run.complete
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


def test_one_token_rows_are_flagged_not_crashes(tiny_llama: TinyModel, tmp_path: Path) -> None:
    report = run(tiny_llama, tmp_path / "out", data=["Hello", "Hello world"], append_eos=False)
    ce = report.load()["metric_ce"]
    assert np.isnan(ce[0])
    assert np.isfinite(ce[1])
    assert report.nan_rows == [0]
    assert read_manifest(tmp_path / "out")["totals"]["nan_rows"] == [0]


@settings(max_examples=max(10, settings.default.max_examples // 3))
@given(
    n=st.integers(1, 6),
    v=st.integers(10, 3000),
    k=st.integers(1, 10),
    masked=st.integers(0, 50),
    seed=st.integers(0, 2**16),
)
def test_grouped_topk_is_exact(n: int, v: int, k: int, masked: int, seed: int) -> None:
    k = min(k, v - min(masked, v - k))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=g)
    keep = v - min(masked, v - k)
    x[:, keep:] = -float("inf")
    vals, idx = grouped_topk(x, k, group=8)
    ref_vals, ref_idx = torch.topk(x, k)
    torch.testing.assert_close(vals, ref_vals, rtol=0, atol=0)
    assert torch.equal(idx, ref_idx)  # continuous random values: no ties
    # With the group maxima computed elsewhere (as the fused CE kernel does).
    gmax = x[:, : (v // 8) * 8].reshape(n, -1, 8).amax(-1)
    vals2, idx2 = grouped_topk(x, k, group=8, group_max=gmax)
    assert torch.equal(vals2, ref_vals)
    assert torch.equal(idx2, ref_idx)


def test_engine_excludes_listed_ids_and_pads_exactly(tiny_llama: TinyModel) -> None:
    lm, tok = load(tiny_llama)
    rows = [np.asarray(tok(t, add_special_tokens=False)["input_ids"]) for t in TEXTS[:3]]
    ids, lengths = pad_batch(rows)
    first = TopKEngine(lm, top_k=K).collect(TopKEngine(lm, top_k=K).submit(ids, lengths))
    banned = sorted(set(first.ids[0, 0, :3].tolist()) | {5})
    engine = TopKEngine(lm, top_k=K, invalid_ids=banned, per_step_ce=True)
    (out,) = engine.run([(ids, lengths)])
    for j, row in enumerate(rows):
        n = len(row)
        assert not np.isin(out.ids[j, :n], banned).any()
        ref = reference_row(lm, row.tolist(), tiny_llama.num_tokens, K + len(banned))
        keep = ~np.isin(ref["ids"], banned)
        expected = np.stack([r[k][:K] for r, k in zip(ref["ids"], keep, strict=True)])
        np.testing.assert_array_equal(out.ids[j, :n], expected)
        assert out.per_step_ce.shape[1] == ids.shape[1] - 1
        assert (out.per_step_ce[j, n - 1 :] == 0).all()  # padding is not scored


@pytest.mark.slow
def test_fused_ce_equals_eager(tiny_llama: TinyModel, llama_run: Any, tmp_path: Path) -> None:
    """The compiled log-sum-exp (the CUDA default) on the CPU; needs a C++ compiler."""
    report = run(tiny_llama, tmp_path / "fused", per_step_ce=True, fused_ce=True)
    if report.ce_path != "fused":
        pytest.skip("torch.compile is unavailable here")
    a = report.load().with_format("numpy")
    b = llama_run.load().with_format("numpy")
    np.testing.assert_allclose(a["metric_ce"], b["metric_ce"], atol=1e-5)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["per_step_indices"], y["per_step_indices"])
        np.testing.assert_allclose(x["per_step_metric_ce"], y["per_step_metric_ce"], atol=1e-5)


def test_lazy_exports() -> None:
    assert fusellm.extract_topk is extract_topk
    assert fusellm.split_texts.__module__ == "fusellm.stages.split"
    assert {"ExtractReport", "SplitStats", "finalize_extract", "run_split"} <= set(fusellm.__all__)


def test_plan_batches() -> None:
    lengths = np.array([5, 50, 7, 50, 1, 30])
    plan = plan_batches(lengths, max_tokens=100, max_batch_size=3)
    assert [b.tolist() for b in plan] == [[1, 3], [5, 2, 0], [4]]
    assert sorted(np.concatenate(plan).tolist()) == list(range(6))
    assert [b.tolist() for b in plan_batches([500, 2], 100, 8)] == [[0], [1]]


# --- sharding, resuming, workers -----------------------------------------------------------------


def test_rerun_skips_finished_shards(
    tiny_llama: TinyModel, llama_run: Any, caplog: pytest.LogCaptureFixture
) -> None:
    before = listing(llama_run.output_dir)
    with caplog.at_level(logging.INFO, logger="fusellm.artifact"):
        again = run(tiny_llama, llama_run.output_dir, per_step_ce=True)
    out = llama_run.output_dir
    assert f"{out} is up to date (same model, tokenizer, rows and settings): skipped" in (
        caplog.text
    )
    assert again.skipped
    assert again.complete
    assert again.shards_written == []
    assert again.shards_skipped == [0, 1, 2, 3]
    assert listing(llama_run.output_dir) == before


def test_resume_after_sigkill_gives_the_same_bytes(
    tiny_llama: TinyModel, llama_run: Any, tmp_path: Path
) -> None:
    out = tmp_path / "killed"
    (tmp_path / "in.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in TEXTS), encoding="utf-8"
    )
    cmd = [
        sys.executable,
        "-m",
        "fusellm.stages.extract",
        str(tmp_path / "in.jsonl"),
        str(tiny_llama.path),
        str(out),
        "--rows-per-shard",
        str(ROWS_PER_SHARD),
        "--max-tokens-per-batch",
        str(BATCH["max_tokens_per_batch"]),
        "--max-batch-size",
        str(BATCH["max_batch_size"]),
        "--per-step-ce",
        "--no-progress",
    ]
    env = {**os.environ, KILL_ENV: "2"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert len(list(out.glob("data-*.arrow"))) == 2
    assert not (out / "state.json").exists()
    assert read_manifest(out)["complete"] is False
    with pytest.raises(fusellm.FuseLLMError, match="2 of 4 shard"):
        finalize_extract(out)
    # What the killed writer left half-written (a dead process's temporaries) is removed on
    # resume; the protocol's decision for the output is "resume", never "stale".
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True)  # fmt: skip
    torn = out / f".data-00002-of-00004.arrow.tmp-{int(dead.stdout)}-0badc0de"
    torn.write_bytes(b"torn")
    resumed = run(tiny_llama, out, data=tmp_path / "in.jsonl", per_step_ce=True)
    assert not torn.exists()
    assert not resumed.skipped
    assert resumed.shards_skipped == [0, 1]
    assert resumed.shards_written == [2, 3]
    assert resumed.complete
    assert shard_bytes(out) == shard_bytes(llama_run.output_dir)
    assert datasets.load_from_disk(str(out))["text"] == TEXTS


def test_manual_workers_then_finalize(
    tiny_llama: TinyModel, llama_run: Any, tmp_path: Path
) -> None:
    out = tmp_path / "workers"
    first = run(tiny_llama, out, shard="1/2", per_step_ce=True)
    assert first.shards_written == [1, 3]
    assert not first.complete
    with pytest.raises(fusellm.FuseLLMError, match="not complete"):
        first.load()
    second = run(tiny_llama, out, shard=(0, 2), per_step_ce=True)
    assert second.shards_written == [0, 2]
    assert second.complete  # the last worker to finish writes the metadata
    assert shard_bytes(out) == shard_bytes(llama_run.output_dir)
    manifest = finalize_extract(out, verify_hashes=True)
    assert manifest["totals"]["num_rows"] == len(TEXTS)
    with pytest.raises(fusellm.InputError, match="i/N"):
        run(tiny_llama, out, shard="2/2")


@pytest.mark.slow
def test_torchrun_ranks_take_their_own_shards(
    tiny_llama: TinyModel, llama_run: Any, tmp_path: Path
) -> None:
    out = tmp_path / "ranks"
    (tmp_path / "in.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in TEXTS), encoding="utf-8"
    )
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(torchrun),
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "fusellm.stages.extract",
        str(tmp_path / "in.jsonl"),
        str(tiny_llama.path),
        str(out),
        "--rows-per-shard",
        str(ROWS_PER_SHARD),
        "--max-tokens-per-batch",
        str(BATCH["max_tokens_per_batch"]),
        "--max-batch-size",
        str(BATCH["max_batch_size"]),
        "--per-step-ce",
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = read_manifest(out)
    assert manifest["complete"] is True
    got = datasets.load_from_disk(str(out)).with_format("numpy")
    ref = llama_run.load().with_format("numpy")
    assert list(got["text"]) == TEXTS
    for a, b in zip(got, ref, strict=True):
        np.testing.assert_array_equal(a["per_step_indices"], b["per_step_indices"])
        np.testing.assert_allclose(a["per_step_logits"], b["per_step_logits"], atol=1e-2)


# --- bad input: a clear error, nothing written ---------------------------------------------------


def test_bad_inputs_write_nothing(
    tiny_llama: TinyModel, tiny_neox: TinyModel, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    cases = [
        (datasets.Dataset.from_dict({"body": ["a"]}), tiny_llama.path, {}, "no column 'text'"),
        (["fine", ""], tiny_llama.path, {}, "1 empty text"),
        (datasets.Dataset.from_dict({"text": ["a", None]}), tiny_llama.path, {}, "null"),
        (["fine"], tiny_llama.path, {"tokenizer": tiny_neox.path}, "belongs to another model"),
        (["fine"], tiny_neox.path, {"tokenizer": tiny_llama.path}, "belongs to another model"),
        (["fine"], tmp_path / "missing", {}, "does not exist"),
        (["fine"], tiny_llama.path, {"top_k": 0}, "top_k"),
        (["fine"], tiny_llama.path, {"dtype": "int8"}, "dtype"),
        (["fine"], tiny_llama.path, {"compression": "gzip"}, "compression"),
        (["fine"], tiny_llama.path, {"shard": "1/x"}, "i/N"),
    ]
    for data, model, kw, match in cases:
        with pytest.raises(fusellm.InputError, match=match), quiet():
            extract_topk(data, model, out, progress=False, **kw)
        assert not out.exists(), match


def test_unreadable_model_directories(tiny_llama: TinyModel, tmp_path: Path) -> None:
    out = tmp_path / "out"
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "config.json").write_text("{not json")
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    no_weights = tmp_path / "no_weights"
    shutil.copytree(tiny_llama.path, no_weights)
    for p in no_weights.glob("*.safetensors"):
        p.unlink()
    bad_weights = tmp_path / "bad_weights"
    shutil.copytree(tiny_llama.path, bad_weights)
    for p in bad_weights.glob("*.safetensors"):
        p.write_bytes(b"not a safetensors file")
    for model, match in [
        (garbage, "cannot read the model config"),
        (no_config, "no config.json"),
        (no_weights, "cannot load a causal LM"),
        (bad_weights, "cannot load a causal LM"),
    ]:
        with pytest.raises(fusellm.InputError, match=match), quiet():
            extract_topk(["fine"], model, out, progress=False)
        assert not out.exists(), match


def test_output_directory_of_another_model_is_refused(
    tiny_llama: TinyModel, tiny_neox: TinyModel, llama_run: Any, tmp_path: Path
) -> None:
    out = llama_run.output_dir
    before = listing(out)
    stale = r"other inputs \(differs in: .*{}.*\).*--overwrite"
    with pytest.raises(fusellm.StaleArtifactError, match=stale.format("model_sha256")):
        run(tiny_neox, out, per_step_ce=True)
    with pytest.raises(fusellm.StaleArtifactError, match=stale.format("top_k")):
        run(tiny_llama, out, top_k=5, per_step_ce=True)
    assert listing(out) == before
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(fusellm.InputError, match="not empty"):
        run(tiny_neox, stranger)
    assert [p.name for p in stranger.iterdir()] == ["notes.txt"]


def test_overwrite_replaces_another_runs_output(
    tiny_llama: TinyModel, tiny_neox: TinyModel, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    run(tiny_llama, out, data=TEXTS[:7])
    assert len(list(out.glob("data-*.arrow"))) == 2
    report = run(tiny_neox, out, data=TEXTS[:3], overwrite=True)
    assert report.complete
    assert sorted(p.name for p in out.glob("data-*.arrow")) == ["data-00000-of-00001.arrow"]
    assert read_manifest(out)["model"]["path"] == str(tiny_neox.path.resolve())
    assert report.load()["text"] == TEXTS[:3]
    assert (out / MANIFEST_NAME).is_file()


def test_cli_hook(
    tiny_llama: TinyModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser(prog="fusellm")
    add_extract_parser(parser.add_subparsers(dest="command"))
    datasets.Dataset.from_dict({"text": TEXTS[:4]}).save_to_disk(str(tmp_path / "in"))
    argv = ["extract", str(tmp_path / "in"), str(tiny_llama.path), str(tmp_path / "out")]
    args = parser.parse_args([*argv, "--top-k", "3", "--compression", "none", "--no-progress"])
    with quiet():
        assert args.func(args) == 0
    assert "complete" in capsys.readouterr().out
    ds = datasets.load_from_disk(str(tmp_path / "out"))
    assert ds.features["per_step_indices"].feature.length == 3
    args = parser.parse_args([*argv, "--top-k", "3", "--compression", "none", "--finalize"])
    assert args.func(args) == 0
