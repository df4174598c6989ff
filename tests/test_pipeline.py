"""``fusellm run``: the whole pipeline on the reduced built-in miniature.

One uninterrupted reference run (``fusellm run --scale test``, a subprocess: the built-in
miniature, no config) is shared by the tests: its every stage output is checked against its
schema, its report against its contents; then, through the resolved ``config.yaml`` it wrote (the
same models and data), a re-run must skip everything, a changed setting must redo exactly the
stages downstream of it, and a run SIGKILLed at random moments and started again must end with
the reference's outputs.

Why the comparison after a kill is exact (bit for bit), not tolerant: the reduced run uses one
CPU thread everywhere (``num_threads: 1``, and the miniature's preparation under one thread), so
every floating-point reduction happens in the same order in both runs; extraction computes each
shard in a fixed batch order whichever process computes it; training resumes from a checkpoint
with the model, optimizer, scheduler, RNG states and data position restored. Any difference is a
resumption bug (or new nondeterminism), which is what the test is for.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from fusellm.artifact import is_complete
from fusellm.cli import main
from fusellm.config import load_config
from fusellm.io import MANIFEST_NAME
from fusellm.pipeline import stage_outputs, train_runs
from models import quiet

SOURCES = ("neox_bible", "mpt_python")
MODELS = ("target", *SOURCES)
DOMAINS = ("bible", "jargon", "python")
RUNS = ("fused", "clm")
#: The reduced run must finish within this many CPU seconds (the acceptance asks for under two
#: minutes; CPU time, unlike wall time, does not grow when other jobs share the machine).
CPU_BUDGET_S = 120.0
#: Per-subprocess limit (a hung pipeline fails the test instead of blocking the suite).
RUN_TIMEOUT_S = 600


def fusellm_run(*args: str, timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """``python -m fusellm.cli run ARGS`` as a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "fusellm.cli", "run", *args, "--no-progress"],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The uninterrupted reduced run: its work directory, wall and CPU seconds."""
    wd = tmp_path_factory.mktemp("pipeline") / "ref"
    cpu0, t0 = children_cpu(), time.perf_counter()
    proc = fusellm_run("--scale", "test", "--workdir", str(wd))
    wall, cpu = time.perf_counter() - t0, children_cpu() - cpu0
    assert proc.returncode == 0, proc.stderr[-5000:]
    return {"workdir": wd, "wall": wall, "cpu": cpu, "stdout": proc.stdout}


def load(path: Path) -> Any:
    import datasets

    return datasets.load_from_disk(str(path))


def statuses(wd: Path) -> dict[str, str]:
    return json.loads((wd / "timings.json").read_text(encoding="utf-8"))["status"]


# --- the reference run ---------------------------------------------------------------------------


def test_reduced_run_is_fast(reference: dict[str, Any]) -> None:
    print(f"reduced run: {reference['wall']:.1f} s wall, {reference['cpu']:.1f} s CPU")
    assert reference["cpu"] < CPU_BUDGET_S


def test_every_stage_output_has_its_schema(reference: dict[str, Any]) -> None:
    from fusellm.fuse import validate_packed
    from fusellm.io import read_manifest

    wd: Path = reference["workdir"]
    config = load_config(wd / "config.yaml")
    assert config.source_names == list(SOURCES)
    k = config.extract.top_k
    block = config.block_size

    split = load(wd / "split")
    assert {"text", "domain", "doc_index", "chunk_index"} <= set(split.column_names)
    assert read_manifest(wd / "split")["stage"] == "split"
    assert set(split["domain"]) == set(DOMAINS)

    for name in MODELS:
        ex = load(wd / "extract" / name)
        assert len(ex) == len(split)
        assert {"input_ids", "per_step_logits", "per_step_indices", "metric_ce"} <= set(
            ex.column_names
        )
        row = ex.with_format("numpy")[0]
        n = len(row["input_ids"])
        assert row["per_step_logits"].shape == (n, k)
        assert row["per_step_indices"].shape == (n, k)
        assert (row["num_tokens"], row["num_bytes"]) == (n, len(split[0]["text"].encode()))
        assert read_manifest(wd / "extract" / name)["complete"] is True

    for name in SOURCES:
        mapping = json.loads((wd / "vocab_map" / f"{name}.json").read_text(encoding="utf-8"))
        assert mapping
        assert all(isinstance(a, str) and isinstance(b, str) for a, b in mapping.items())
        meta = json.loads((wd / "vocab_map" / f"{name}.json.meta.json").read_text())
        assert meta["method"] == "surface"

    aligned = load(wd / "align")
    assert len(aligned) == len(split)
    for c in ("ref", *SOURCES):
        assert {f"{c}_ids", f"{c}_logits", f"{c}_metric_ce"} <= set(aligned.column_names)
    stats = json.loads((wd / "align" / "align_stats.json").read_text(encoding="utf-8"))
    assert set(stats["sources"]) == set(SOURCES)
    for s in stats["sources"].values():
        assert s["matched"] + s["empty"] + s["fallback"] + s["masked"] == stats["base_positions"]
        assert s["matched"] > 0

    from fusellm.stages.pack import PlannedBlocks, load_packed

    packed = load_packed(wd / "pack")
    assert isinstance(packed, PlannedBlocks)  # the default layout
    vocab = json.loads((wd / "models" / "target" / "config.json").read_text())["vocab_size"]
    stack = validate_packed(
        packed, sources=list(SOURCES), with_ref=True, score="ce_per_byte", vocab_size=vocab
    )
    assert stack == ["ref", *SOURCES]
    lengths = [len(b["input_ids"]) for b in packed]
    assert max(lengths) == block
    assert sum(lengths) == sum(len(x) for x in aligned["input_ids"])

    steps = config.train.args["max_steps"]
    for run in RUNS:
        state = json.loads((wd / "train" / run / "trainer_state.json").read_text())
        assert state["global_step"] == steps
        logs = [e for e in state["log_history"] if "loss" in e]
        assert len(logs) == steps
        if run == "fused":  # the built-in miniature: fusion weight 0.7, no ref candidate
            assert config.train.args["combine"] == "decoupled"
            assert config.train.args["with_ref"] is False
            # the gate stays open for the first steps: the sources know more than the student
            assert all(e["lm_weight"] == pytest.approx(0.3) for e in logs)
            assert not any("fusion/select_ref" in e for e in logs)
        else:
            assert all(e["lm_weight"] == pytest.approx(1.0) for e in logs)  # float32
        assert all(math.isfinite(e["fusion_loss"]) for e in logs)
        assert all(any(key.startswith("fusion/select_") for key in e) for e in logs)
        record = json.loads((wd / "train" / run / MANIFEST_NAME).read_text())
        assert (record["stage"], record["complete"]) == ("train", True)
        assert record["key"]["kind"] == run
        assert record["summary"]["steps"] == steps

    ppl = json.loads((wd / "evaluate" / "perplexity.json").read_text(encoding="utf-8"))
    labels = list(ppl["models"])
    assert labels == [
        "target (before)",
        "neox_bible (source, bible)",
        "mpt_python (source, python)",
        "fused",
        "clm",
    ]
    for entry in ppl["models"].values():
        assert set(entry["groups"]) == {*DOMAINS, "all"}
        for g in entry["groups"].values():
            assert math.isfinite(g["ppl"])
            assert g["ppl"] > 1
            assert math.isfinite(g["bits_per_byte"])

    timings = json.loads((wd / "timings.json").read_text(encoding="utf-8"))
    expected = {
        "prepare",
        "split",
        *(f"extract/{m}" for m in MODELS),
        *(f"vocab_map/{s}" for s in SOURCES),
        "align",
        "pack",
        "train/fused",
        "train/clm",
        "evaluate",
    }
    assert set(timings["stages"]) == expected
    assert all(v >= 0 for v in timings["stages"].values())
    assert set(timings["status"].values()) == {"ran"}

    log = (wd / "fusellm.log").read_text(encoding="utf-8")
    for stage in ("split", "extract/target", "align", "pack", "train/fused", "evaluate"):
        assert f"{stage}: running" in log
        assert f"{stage}: done in" in log
    assert "train/fused step 1:" in log
    # Every stage output is a complete artifact of the one protocol.
    outputs = stage_outputs(config, wd)
    assert set(outputs) == expected - {"prepare"}
    assert all(is_complete(path) for path in outputs.values()), outputs


def test_report_contents(reference: dict[str, Any]) -> None:
    wd: Path = reference["workdir"]
    report = (wd / "report" / "report.md").read_text(encoding="utf-8")
    for text in (
        "# FuseLLM run report",
        "## Held-out perplexity",
        "### Fused vs CLM control",
        "Headline:",
        "target (before)",
        "neox_bible (source, bible)",
        "mpt_python (source, python)",
        "## Stage timings",
        "train/fused",
        "preset | improved",
    ):
        assert text in report, text
    for name in SOURCES:
        assert name in report
    assert "not available" not in report.split("## Stage timings")[0].split("## Run summary")[1]
    # The command's own summary: every stage and the perplexity table.
    out = reference["stdout"]
    assert "fused model:" in out
    assert "report:" in out
    assert "target (before)" in out
    assert "all ppl" in out


def test_fused_model_loads_and_generates(reference: dict[str, Any]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = reference["workdir"] / "train" / "fused"
    with quiet():
        model = AutoModelForCausalLM.from_pretrained(str(path))
        tok = AutoTokenizer.from_pretrained(str(path))
        ids = tok("In the beginning", return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5
    assert isinstance(tok.decode(out[0]), str)


# --- re-runs -------------------------------------------------------------------------------------


def test_rerun_skips_every_completed_stage(reference: dict[str, Any], tmp_path: Path) -> None:
    # Through the resolved config (models and data of the reference's miniature): a copied work
    # directory is complete for it, since keys and output fingerprints do not depend on where
    # the work directory is.
    wd = tmp_path / "again"
    shutil.copytree(reference["workdir"], wd)
    before = (wd / "train" / "fused" / "model.safetensors").stat().st_mtime_ns
    proc = fusellm_run(str(reference["workdir"] / "config.yaml"), "--workdir", str(wd))
    assert proc.returncode == 0, proc.stderr[-5000:]
    st = statuses(wd)
    assert set(st.values()) == {"skipped"}, st
    assert len(st) == 11
    assert (wd / "train" / "fused" / "model.safetensors").stat().st_mtime_ns == before
    log = (wd / "fusellm.log").read_text()
    assert "complete with the same inputs, skipped" in log
    # The pipeline's own artifacts (training runs, evaluation) go through the same protocol.
    for stage in ("train/fused", "train/clm", "evaluate/perplexity.json", "pack", "split"):
        assert f"{wd / stage} is up to date (" in log, stage
    # An output changed after it was written is stale: replaced, and only it.
    ppl = wd / "evaluate" / "perplexity.json"
    ppl.write_text(ppl.read_text().replace('"ppl"', ' "ppl"', 1))
    proc = fusellm_run(str(reference["workdir"] / "config.yaml"), "--workdir", str(wd))
    assert proc.returncode == 0, proc.stderr[-5000:]
    st = statuses(wd)
    assert {k for k, v in st.items() if v == "ran"} == {"evaluate"}, st
    assert f"{ppl} was changed after it was written" in (wd / "fusellm.log").read_text()
    assert (
        final_outputs(wd, models=False)["perplexity"]
        == final_outputs(reference["workdir"], models=False)["perplexity"]
    )


def test_builtin_rerun_skips_every_completed_stage(reference: dict[str, Any]) -> None:
    wd = reference["workdir"].parent / "builtin-again"
    shutil.copytree(reference["workdir"], wd)
    proc = fusellm_run("--scale", "test", "--workdir", str(wd))
    assert proc.returncode == 0, proc.stderr[-5000:]
    st = statuses(wd)
    assert {k for k, v in st.items() if v != "skipped"} == {"prepare"}, st


def test_changed_settings_redo_exactly_what_depends_on_them(
    reference: dict[str, Any], tmp_path: Path
) -> None:
    wd = tmp_path / "changed"
    shutil.copytree(reference["workdir"], wd)
    raw = yaml.safe_load((wd / "config.yaml").read_text(encoding="utf-8"))
    upstream = ["split", *(f"extract/{m}" for m in MODELS), "align", "pack"]
    upstream += [f"vocab_map/{s}" for s in SOURCES]

    # Another seed: its two runs are trained, the first seed's are kept, evaluation extended.
    raw["seeds"] = [0, 1]
    cfg = wd / "two-seeds.yaml"
    cfg.write_text(yaml.safe_dump(raw), encoding="utf-8")
    proc = fusellm_run(str(cfg), "--workdir", str(wd))
    assert proc.returncode == 0, proc.stderr[-5000:]
    st = statuses(wd)
    assert all(st[s] == "skipped" for s in [*upstream, "train/fused", "train/clm"]), st
    assert st["train/fused-seed1"] == st["train/clm-seed1"] == st["evaluate"] == "ran"
    ppl = json.loads((wd / "evaluate" / "perplexity.json").read_text())
    assert {"fused", "clm", "fused-seed1", "clm-seed1"} <= set(ppl["models"])
    assert "across seeds" in (wd / "report" / "report.md").read_text()

    # A training setting: every training run and the evaluation are redone, nothing upstream.
    fused = wd / "train" / "fused" / "model.safetensors"
    old = fused.read_bytes()
    raw["train"]["learning_rate"] = 2 * float(raw["train"]["learning_rate"])
    cfg.write_text(yaml.safe_dump(raw), encoding="utf-8")
    proc = fusellm_run(str(cfg), "--workdir", str(wd))
    assert proc.returncode == 0, proc.stderr[-5000:]
    st = statuses(wd)
    assert all(st[s] == "skipped" for s in upstream), st
    trains = ["train/fused", "train/clm", "train/fused-seed1", "train/clm-seed1"]
    assert all(st[s] == "ran" for s in [*trains, "evaluate"]), st
    assert fused.read_bytes() != old
    log = (wd / "fusellm.log").read_text(encoding="utf-8")
    assert f"{wd / 'train' / 'fused'} was made from other inputs (differs in: args)" in log


def test_kd_baselines_and_a_weight_sweep_run_and_are_reported(
    reference: dict[str, Any], tmp_path: Path
) -> None:
    wd = tmp_path / "baselines"
    shutil.copytree(reference["workdir"], wd)
    raw = yaml.safe_load((wd / "config.yaml").read_text(encoding="utf-8"))
    raw["train"]["kd_baselines"] = True
    raw["train"]["sweep_lm_loss_weight"] = [0.5]
    cfg = wd / "baselines.yaml"
    cfg.write_text(yaml.safe_dump(raw), encoding="utf-8")
    proc = fusellm_run(str(cfg), "--workdir", str(wd))
    assert proc.returncode == 0, proc.stderr[-5000:]
    st = statuses(wd)
    assert st["train/fused"] == st["train/clm"] == "skipped", st  # their keys did not change
    new_runs = ["kd-neox_bible", "kd-mpt_python", "fused-lmw0.5"]
    assert all(st[f"train/{r}"] == "ran" for r in new_runs), st
    ppl = json.loads((wd / "evaluate" / "perplexity.json").read_text())
    assert set(new_runs) <= set(ppl["models"])
    for source in SOURCES:  # a KD run trains on its source alone
        state = json.loads((wd / "train" / f"kd-{source}" / "trainer_state.json").read_text())
        logged = next(e for e in state["log_history"] if "loss" in e)
        assert logged[f"fusion/select_{source}"] == 1.0
        assert not any(k.startswith("fusion/select_ref") for k in logged)
    report = (wd / "report" / "report.md").read_text(encoding="utf-8")
    table = report.split("### Every run against the CLM control", 1)[1].split("###", 1)[0]
    for r in ["fused", *new_runs]:
        assert f"`{r}`" in table
    closure = report.split("### Gap closed on each source's domain", 1)[1].split("##", 1)[0]
    assert "neox_bible (bible)" in closure
    assert "mpt_python (python)" in closure


# --- a killed run, started again -----------------------------------------------------------------


def final_outputs(wd: Path, *, models: bool = True) -> dict[str, Any]:
    """What a run produces, in comparable form."""
    from safetensors.numpy import load_file

    from fusellm.io import fingerprint_dataset

    out: dict[str, Any] = {}
    for d in ["split", *(f"extract/{m}" for m in MODELS), "align", "pack"]:
        out[d] = fingerprint_dataset(load(wd / d))
    for s in SOURCES:
        out[f"vocab_map/{s}"] = (wd / "vocab_map" / f"{s}.json").read_bytes()
    weights = {f"models/{m}": wd / "models" / m for m in MODELS} if models else {}
    weights.update({f"train/{r}": wd / "train" / r for r in RUNS})
    for name, path in weights.items():
        tensors = load_file(str(path / "model.safetensors"))
        out[name] = {k: v.tobytes() for k, v in sorted(tensors.items())}
    for r in RUNS:
        state = json.loads((wd / "train" / r / "trainer_state.json").read_text())
        out[f"train/{r}/losses"] = [e for e in state["log_history"] if "loss" in e]
    ppl = json.loads((wd / "evaluate" / "perplexity.json").read_text())
    out["perplexity"] = {k: v["groups"] for k, v in ppl["models"].items()}
    return out


def test_killed_run_started_again_ends_with_the_same_outputs(
    reference: dict[str, Any], tmp_path: Path
) -> None:
    """SIGKILL ``fusellm run CONFIG`` at three seeded random moments, then let it finish: the
    outputs are those of the uninterrupted reference run, bit for bit (module docstring).

    The run reads the reference's resolved config, so it uses the very models and data the
    reference's miniature preparation produced and covers every stage from split to report.
    """
    wd = tmp_path / "killed"
    rng = random.Random(20241127)
    timings = json.loads((reference["workdir"] / "timings.json").read_text())
    # Each kill falls at a random moment of the work that remains: the clock starts when the run
    # has validated its config and created its state directory (before that nothing is written),
    # and the span is what the stages not yet complete took in the reference run.
    stage_seconds = {k: v for k, v in timings["stages"].items() if k != "prepare"}

    outputs = stage_outputs(load_config(reference["workdir"] / "config.yaml"), wd)

    def remaining() -> float:
        done = {k for k, path in outputs.items() if is_complete(path)}
        return 0.5 + sum(v for k, v in stage_seconds.items() if k not in done)

    cmd = [sys.executable, "-m", "fusellm.cli", "run", str(reference["workdir"] / "config.yaml")]
    cmd += ["--workdir", str(wd), "--no-progress"]
    kills = []
    for _ in range(3):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not (wd / "config.yaml").is_file() and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        delay = rng.uniform(0.0, 1.0) * remaining()
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            pending = sorted(k for k, path in outputs.items() if not is_complete(path))
            kills.append((round(delay, 1), pending[:2]))
        else:
            assert proc.returncode == 0
    print("killed at (seconds, first stages not complete):", kills)
    done = fusellm_run(str(reference["workdir"] / "config.yaml"), "--workdir", str(wd))
    assert done.returncode == 0, done.stderr[-5000:]

    expected, got = final_outputs(reference["workdir"]), final_outputs(wd, models=False)
    expected = {k: v for k, v in expected.items() if not k.startswith("models/")}
    assert expected.keys() == got.keys()
    for key in expected:
        assert got[key] == expected[key], f"{key} differs after the killed run was resumed"


def test_kills_at_the_hardest_training_moments(reference: dict[str, Any], tmp_path: Path) -> None:
    """Two kill points a random delay rarely hits, set up by hand in a copy of the reference:

    - ``fused``: killed after its final checkpoint was written, before the final save. The
      Trainer resumed there would train one step past the end (transformers resumes into the next
      step before it checks ``max_steps``); the pipeline takes the checkpoint as the final model.
    - ``clm``: killed while its newest checkpoint was being written (the optimizer state torn, no
      completion mark). The pipeline deletes it and resumes from the one before.
    """
    wd = tmp_path / "moments"
    shutil.copytree(reference["workdir"], wd)
    for run in RUNS:  # the manifest of an interrupted attempt: begun with the same key
        manifest = wd / "train" / run / MANIFEST_NAME
        rec = json.loads(manifest.read_text())
        rec["complete"] = False
        manifest.write_text(json.dumps(rec))
        for name in ("model.safetensors", "trainer_state.json"):
            (wd / "train" / run / name).unlink()
    last = max(
        (p for p in (wd / "train" / "clm").glob("checkpoint-*")), key=lambda p: p.stat().st_mtime
    )
    (last / "fusellm_checkpoint_complete").unlink()
    (last / "optimizer.pt").write_bytes((last / "optimizer.pt").read_bytes()[:100])

    proc = fusellm_run(str(reference["workdir"] / "config.yaml"), "--workdir", str(wd))
    assert proc.returncode == 0, proc.stderr[-5000:]
    st = statuses(wd)
    assert st["train/fused"] == st["train/clm"] == "ran"
    log = (wd / "fusellm.log").read_text(encoding="utf-8")
    assert "holds the finished training: it is the final model" in log
    assert f"removing the incompletely written checkpoint {last}" in log
    steps = load_config(wd / "config.yaml").train.args["max_steps"]
    assert not (wd / "train" / "fused" / f"checkpoint-{steps + 1}").exists()
    expected, got = final_outputs(reference["workdir"]), final_outputs(wd)
    for key in ("train/fused", "train/clm", "train/fused/losses", "train/clm/losses", "perplexity"):
        assert got[key] == expected[key], key


# --- bad configs ---------------------------------------------------------------------------------


def bad_config(reference: dict[str, Any], tmp_path: Path, **change: Any) -> Path:
    raw = yaml.safe_load((reference["workdir"] / "config.yaml").read_text(encoding="utf-8"))
    for key, value in change.items():
        section, _, field = key.partition("__")
        if field:
            raw[section][field] = value
        else:
            raw[section] = value
    raw.pop("workdir")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("change", "key", "words"),
    [
        ({"align__methd": "mined"}, "align.methd", ["unknown key", "'method'"]),
        ({"block_size": 1024}, "block_size", ["larger than the context", "512"]),
        ({"train__fusion": "maxce"}, "train.fusion", ["mince"]),
    ],
)
def test_bad_config_fails_before_any_work(
    reference: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    change: dict[str, Any],
    key: str,
    words: list[str],
) -> None:
    path = bad_config(reference, tmp_path, **change)
    wd = tmp_path / "never"
    with quiet():
        status = main(["run", str(path), "--workdir", str(wd), "--no-progress"])
    err = capsys.readouterr().err
    assert status == 2
    assert f"config key {key!r}" in err
    for w in words:
        assert w in err
    assert not wd.exists()


def test_missing_source_and_unloadable_tokenizer_fail_before_any_work(
    reference: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = yaml.safe_load((reference["workdir"] / "config.yaml").read_text(encoding="utf-8"))
    broken = tmp_path / "broken_source"
    shutil.copytree(raw["sources"][1]["path"], broken)
    (broken / "tokenizer.json").write_text("{", encoding="utf-8")
    cases = {
        "sources[0].path": {**raw["sources"][0], "path": str(tmp_path / "absent")},
        "sources[1].path": {**raw["sources"][1], "path": str(broken)},
    }
    for key, source in cases.items():
        index = int(key[8])
        sources = list(raw["sources"])
        sources[index] = source
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump({**raw, "sources": sources}), encoding="utf-8")
        wd = tmp_path / f"never{index}"
        with quiet():
            status = main(["run", str(path), "--workdir", str(wd)])
        err = capsys.readouterr().err
        assert status == 2
        assert f"config key {key!r}" in err
        assert ("does not exist" if index == 0 else "cannot load a tokenizer") in err
        assert not wd.exists()


def test_training_runs_for_several_seeds_baselines_and_a_sweep(reference: dict[str, Any]) -> None:
    cfg = load_config(reference["workdir"] / "config.yaml")
    assert [(r.name, r.kind, r.seed) for r in train_runs(cfg)] == [
        ("fused", "fused", 0),
        ("clm", "clm", 0),
    ]
    cfg.seeds = [3, 5]
    cfg.train.control = False
    assert [(r.name, r.seed) for r in train_runs(cfg)] == [("fused", 3), ("fused-seed5", 5)]
    cfg.seeds = [0, 1]
    cfg.train.control = True
    cfg.train.kd_baselines = True
    cfg.train.sweep_lm_loss_weight = [0.5]
    runs = {r.name: r for r in train_runs(cfg)}
    assert list(runs) == [
        "fused",
        "clm",
        "kd-neox_bible",
        "kd-mpt_python",
        "fused-lmw0.5",
        "fused-seed1",
        "clm-seed1",
        "kd-neox_bible-seed1",
        "kd-mpt_python-seed1",
        "fused-lmw0.5-seed1",
    ]
    assert runs["clm"].overrides == {"lm_loss_weight": 1.0, "combine": "hard"}
    assert runs["kd-neox_bible"].overrides == {
        "sources": ["neox_bible"],
        "ignore_sources": ["mpt_python"],
        "with_ref": False,
        "combine": "hard",
    }
    assert runs["fused-lmw0.5-seed1"].overrides == {"lm_loss_weight": 0.5, "combine": "hard"}
    assert runs["fused-lmw0.5-seed1"].seed == 1


def test_help_config_and_dry_run(
    reference: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "--help-config"]) == 0
    assert "align.method" in capsys.readouterr().out
    with quiet():
        assert main(["run", str(reference["workdir"] / "config.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert load_config(reference["workdir"] / "config.yaml").to_yaml() == out
