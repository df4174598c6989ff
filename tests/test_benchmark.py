"""Benchmark tasks through lm-evaluation-harness, checked against a direct computation.

A tiny Llama (built from a config, no hub) runs the miniature's domain tasks (generated here from
held-out documents of the shipped corpus) through the harness; its accuracies must equal an
independent computation of each choice's log-likelihood with torch, and a rerun must not call
the harness at all.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from fusellm.errors import FuseLLMError, InputError
from models import TinyModel, build_named, build_tiny_model, quiet

lm_eval = pytest.importorskip("lm_eval")
torch = pytest.importorskip("torch")

from fusellm.cli import main  # noqa: E402
from fusellm.stages import benchmark as bm  # noqa: E402
from fusellm.stages.benchmark import (  # noqa: E402
    SUMMARY_NAME,
    headline_metric,
    parse_task_specs,
    run_benchmarks,
    write_domain_tasks,
)

#: Items evaluated per task (the harness's first ones).
LIMIT = 12
DOMAINS = ("bible", "python")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return build_named("llama", tmp_path_factory.mktemp("benchmark"))


@pytest.fixture(scope="module")
def tiny2(tiny: TinyModel) -> TinyModel:
    """A second tiny model (other weights, same tokenizer)."""
    return build_tiny_model("llama", "mistral", tiny.path.parent / "llama-2", seed=7)


@pytest.fixture(scope="module")
def heldout() -> dict[str, list[str]]:
    from fusellm.miniature import load_corpus

    ds = load_corpus("heldout", list(DOMAINS), max_docs_per_domain=6)
    out: dict[str, list[str]] = {}
    for text, domain in zip(ds["text"], ds["domain"], strict=True):
        out.setdefault(domain, []).append(text)
    return out


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory, heldout: dict[str, list[str]]) -> Any:
    root = tmp_path_factory.mktemp("tasks")
    names = write_domain_tasks(
        heldout, root / "tasks", seed=0, items_per_task=20, cache_dir=root / "cache"
    )
    return SimpleNamespace(dir=root / "tasks", names=names, cache=root / "cache")


@pytest.fixture(scope="module")
def evaluated(tiny: TinyModel, tasks: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One harness run of the tiny model on the bible tasks, into a results directory."""
    out = tmp_path_factory.mktemp("results") / "benchmarks"
    names = tasks.names[:2]
    with quiet():
        summary = run_benchmarks(
            {"tiny": tiny.path}, names, out, include_path=tasks.dir, limit=LIMIT, progress=False
        )
    return SimpleNamespace(out=out, names=names, summary=summary)


def rows(tasks: Any, name: str) -> list[dict[str, Any]]:
    lines = (tasks.dir / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def loglikelihoods(lm: Any, tok: Any, context: str, continuations: list[str]) -> list[float]:
    """log P(continuation | context) of each continuation: its tokens are those the tokenization
    of context + continuation adds after the context's own. One forward pass over the rows padded
    on the right (causal attention: a real position never sees the padding after it)."""
    ctx = tok(context)["input_ids"]
    wholes = [tok(context + c)["input_ids"] for c in continuations]
    assert all(w[: len(ctx)] == ctx for w in wholes)
    width = max(map(len, wholes))
    ids = torch.tensor([w + [0] * (width - len(w)) for w in wholes])
    with torch.inference_mode():
        logits = lm(input_ids=ids).logits
    out = []
    for row, w in zip(logits, wholes, strict=True):
        logp = torch.log_softmax(row[len(ctx) - 1 : len(w) - 1].double(), dim=-1)
        out.append(float(logp.gather(1, torch.tensor(w[len(ctx) :])[:, None]).sum()))
    return out


def load_model(model: TinyModel) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet():
        lm = AutoModelForCausalLM.from_pretrained(str(model.path), dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(str(model.path))
    return lm, tok


def mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


# --- the domain tasks ----------------------------------------------------------------------------


def test_domain_tasks_are_deterministic_items_of_the_heldout_text(
    tasks: Any, heldout: dict[str, list[str]], tmp_path: Path
) -> None:
    import yaml

    kinds = ("continuation", "next_word")
    assert tasks.names == [f"fusellm_{d}_{k}" for d in DOMAINS for k in kinds]
    for name in tasks.names:
        domain = name.split("_")[1]
        docs = [" ".join(t.split()) for t in heldout[domain]]
        items = rows(tasks, name)
        assert 10 <= len(items) <= 20
        for r in items:
            assert len(r["choices"]) == 4
            assert len({c.lower() for c in r["choices"]}) == 4
            answer = r["choices"][r["label"]]
            # the right answer is what follows the context in a held-out document
            follows = [d for d in docs if r["context"] + " " + answer in d]
            assert follows, (name, r)
            assert len(r["context"].split()) == bm.CONTEXT_WORDS
            if name.endswith("_next_word"):
                assert " " not in answer
        cfg = yaml.safe_load((tasks.dir / f"{name}.yaml").read_text(encoding="utf-8"))
        assert cfg["task"] == name
        assert cfg["output_type"] == "multiple_choice"
        data = Path(cfg["dataset_kwargs"]["data_files"]["test"])
        assert data.is_absolute()
        assert data == (tasks.dir / f"{name}.jsonl").resolve()
        assert Path(cfg["dataset_kwargs"]["cache_dir"]) == tasks.cache.resolve()
    # the answers are not always in the same place
    labels = [r["label"] for name in tasks.names for r in rows(tasks, name)]
    assert len(set(labels)) == 4

    # the same seed gives the same items, another seed others
    again = write_domain_tasks(heldout, tmp_path / "a", seed=0, items_per_task=20)
    assert again == tasks.names
    for name in again:
        assert (tmp_path / "a" / f"{name}.jsonl").read_bytes() == (
            tasks.dir / f"{name}.jsonl"
        ).read_bytes()
    write_domain_tasks(heldout, tmp_path / "b", seed=1, items_per_task=20)
    name = tasks.names[0]
    assert (tmp_path / "b" / f"{name}.jsonl").read_bytes() != (
        tasks.dir / f"{name}.jsonl"
    ).read_bytes()

    with pytest.raises(InputError, match="no continuation item"):
        write_domain_tasks({"tiny": ["far too short"] * 10}, tmp_path / "c")


# --- the harness against a direct computation ----------------------------------------------------


def test_accuracy_equals_a_direct_computation(tiny: TinyModel, tasks: Any, evaluated: Any) -> None:
    lm, tok = load_model(tiny)
    entry = evaluated.summary["models"]["tiny"]
    for name in evaluated.names:
        items = rows(tasks, name)[:LIMIT]
        correct = correct_norm = 0
        lls_by_item = []
        for r in items:
            lls = loglikelihoods(lm, tok, r["context"], [" " + c for c in r["choices"]])
            lls_by_item.append(lls)
            pred = max(range(4), key=lambda i: lls[i])
            pred_norm = max(range(4), key=lambda i: lls[i] / len(r["choices"][i]))
            correct += pred == r["label"]
            correct_norm += pred_norm == r["label"]
        got = entry["tasks"][name]
        assert got["samples"] == LIMIT
        assert got["num_fewshot"] == 0
        assert got["metrics"]["acc,none"] == pytest.approx(correct / LIMIT, abs=1e-12)
        assert got["metrics"]["acc_norm,none"] == pytest.approx(correct_norm / LIMIT, abs=1e-12)
        assert (got["metric"], got["value"]) == ("acc_norm", got["metrics"]["acc_norm,none"])
        p = correct_norm / LIMIT
        assert got["stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (LIMIT - 1)), rel=1e-9)

        # the harness's own per-choice log-likelihoods, kept in the samples file
        result = evaluated.out / got["file"]
        full = json.loads(result.read_text(encoding="utf-8"))
        assert full["harness"]["results"][name]["acc,none"] == got["metrics"]["acc,none"]
        assert full["harness"]["configs"][name]["task"] == name
        samples = result.with_name(f"{name}.samples.jsonl").read_text(encoding="utf-8")
        records = sorted((json.loads(x) for x in samples.splitlines()), key=lambda r: r["doc_id"])
        assert len(records) == LIMIT
        for rec, lls in zip(records, lls_by_item, strict=True):
            harness_lls = [float(x[0]) for x in rec["filtered_resps"]]
            assert harness_lls == pytest.approx(lls, abs=1e-3)


def test_rerun_skips_done_models_and_tasks(
    tiny: TinyModel,
    tasks: Any,
    evaluated: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    out = evaluated.out
    before = mtimes(out)

    def no_harness(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the harness was called")

    with monkeypatch.context() as m:
        m.setattr(bm, "_load_lm", no_harness)
        m.setattr(lm_eval, "simple_evaluate", no_harness)
        with caplog.at_level(logging.INFO, logger="fusellm.stages.benchmark"):
            again = run_benchmarks(
                {"tiny": tiny.path},
                evaluated.names,
                out,
                include_path=tasks.dir,
                limit=LIMIT,
                progress=False,
            )
    assert again["models"]["tiny"]["tasks"] == evaluated.summary["models"]["tiny"]["tasks"]
    after = mtimes(out)
    assert {k: v for k, v in after.items() if k != SUMMARY_NAME} == {
        k: v for k, v in before.items() if k != SUMMARY_NAME
    }
    skipped = [r.getMessage() for r in caplog.records if "already evaluated" in r.getMessage()]
    assert len(skipped) == 2

    # another limit is another result: recomputed, the other task kept
    first, second = evaluated.names
    with quiet():
        changed = run_benchmarks(
            {"tiny": tiny.path}, f"{first}", out, include_path=tasks.dir, limit=4, progress=False
        )
    entry = changed["models"]["tiny"]["tasks"]
    assert entry[first]["samples"] == 4
    assert entry[second]["samples"] == LIMIT  # still in the summary
    rel = entry[first]["file"]
    assert mtimes(out)[rel] != before[rel]
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no temporary left


def test_no_progress_silences_the_harness_bars(
    tiny: TinyModel, tasks: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import lm_eval.api.task as task_module

    bar = task_module.tqdm
    name = tasks.names[0]
    run_benchmarks(
        {"tiny": tiny.path}, [name], tmp_path / "b", include_path=tasks.dir, limit=4,
        progress=False,
    )  # fmt: skip
    err = capsys.readouterr().err
    assert "it/s]" not in err, err  # no bar at all, the request bars too
    assert "%|" not in err, err
    assert task_module.tqdm is bar  # the harness's own bar is restored after the call


# --- errors --------------------------------------------------------------------------------------


def test_unknown_task_is_one_line_with_close_matches(
    tiny: TinyModel,
    tasks: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def no_model(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(bm, "_load_lm", no_model)
    with pytest.raises(InputError) as exc:
        run_benchmarks(
            {"tiny": tiny.path}, "fusellm_bibel_continuation", None, include_path=tasks.dir
        )
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith("unknown benchmark task 'fusellm_bibel_continuation'")
    assert "close matches: fusellm_bible_continuation" in msg

    # a registry name: the close matches come from the harness's registry
    status = main(
        ["evaluate", str(tiny.path), "--tasks", "hellaswag,arc_chalenge", "--no-progress"]
    )
    assert status == 1
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "\n" not in err, err
    assert err.startswith("fusellm evaluate: error: unknown benchmark task 'arc_chalenge'")
    assert "arc_challenge" in err
    assert "hellaswag" not in err  # a known name is not reported
    assert captured.out == ""


def test_tokenizer_without_eos_is_a_clear_error(
    tiny: TinyModel, tasks: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fusellm.stages.evaluate as ev

    model = tmp_path / "no-eos"
    shutil.copytree(tiny.path, model)
    config_path = model / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["eos_token"] = None
    config_path.write_text(json.dumps(config), encoding="utf-8")

    def no_weights(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the weights were read")

    monkeypatch.setattr(ev, "_load_model", no_weights)
    with pytest.raises(InputError, match="has no EOS token, which lm-evaluation-harness needs"):
        run_benchmarks(
            {"no-eos": model}, tasks.names[0], tmp_path / "out", include_path=tasks.dir, limit=2
        )
    assert not (tmp_path / "out" / "no-eos").exists()


def test_bad_settings_are_rejected(tasks: Any) -> None:
    from fusellm.config import ConfigError, PipelineConfig

    assert [str(s) for s in parse_task_specs("a:25, b", num_fewshot=5)] == ["a:25", "b:5"]
    for bad in ("a:x", "a b", "", "a,a:3"):
        with pytest.raises(InputError):
            parse_task_specs(bad)
    with pytest.raises(InputError, match="limit"):
        run_benchmarks({"m": "."}, tasks.names[0], None, include_path=tasks.dir, limit=0)
    with pytest.raises(InputError, match="does not exist"):
        run_benchmarks({"m": "."}, tasks.names[0], None, include_path=tasks.dir / "nowhere")

    raw = {"target": {"path": "t"}, "sources": [{"name": "s", "path": "s"}], "data": {"train": "d"}}
    for key, value in (("tasks", ["a:b"]), ("limit", 0), ("num_fewshot", -1)):
        with pytest.raises(ConfigError, match=f"evaluate.{key}"):
            PipelineConfig.from_dict({**raw, "evaluate": {key: value}})
    cfg = PipelineConfig.from_dict(
        {**raw, "evaluate": {"tasks": ["x:5"], "include_path": ["tasks"]}}, base_dir="/base"
    )
    assert cfg.evaluate.include_path == ["/base/tasks"]

    assert headline_metric({"alias": "x", "acc,none": 0.5, "acc_stderr,none": 0.1}) == {
        "metric": "acc",
        "filter": "none",
        "value": 0.5,
        "stderr": 0.1,
    }
    gsm = {"exact_match,strict-match": 0.2, "exact_match,flexible-extract": 0.3}
    assert headline_metric(gsm)["filter"] == "strict-match"  # type: ignore[index]
    assert headline_metric({"alias": "x"}) is None
    with pytest.raises(FuseLLMError):
        bm._summary_entry({"results": {"t": {"alias": "t"}}}, "t")


# --- a work directory: the command line and the report -------------------------------------------


def fake_workdir(root: Path, target: TinyModel, source: TinyModel) -> Path:
    """A work directory as `fusellm run` leaves it: config.yaml, a finished fused run (and an
    unfinished clm run)."""
    from fusellm.artifact import Artifact
    from fusellm.config import PipelineConfig

    cfg = PipelineConfig.from_dict(
        {
            "target": {"path": str(target.path)},
            "sources": [{"name": "src", "path": str(source.path), "domain": "bible"}],
            "data": {"train": str(root / "data")},
        }
    )
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    fused = Artifact(root / "train" / "fused", "train", {}, resumable=True)
    with fused.building(fused.decide("refuse"), {}):  # a finished training run
        shutil.copytree(source.path, fused.path, dirs_exist_ok=True)
        fused.complete()
    (root / "train" / "clm").mkdir()
    return root


def test_cli_evaluates_the_models_of_a_workdir(
    tiny: TinyModel,
    tiny2: TinyModel,
    tasks: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from fusellm.report import write_report

    wd = fake_workdir(tmp_path / "wd", tiny, tiny2)
    name = tasks.names[2]  # python continuation
    args = ["evaluate", str(wd), "--tasks", name, "--include-path", str(tasks.dir)]
    with quiet():
        assert main([*args, "--limit", "4", "--no-progress"]) == 0
    out = capsys.readouterr().out
    for label in ("target (before)", "src (source, bible)", "fused"):
        assert label in out
    assert "clm" not in out.split("written to")[0]  # not finished: not evaluated
    assert f"{name} (acc_norm)" in out
    summary = json.loads((wd / "evaluate" / "benchmarks" / SUMMARY_NAME).read_text("utf-8"))
    assert list(summary["models"]) == ["target (before)", "src (source, bible)", "fused"]
    for entry in summary["models"].values():
        assert (wd / "evaluate" / "benchmarks" / entry["tasks"][name]["file"]).is_file()
        assert entry["tasks"][name]["samples"] == 4
    # the source and the fused run share their weights here: the same accuracy
    models = summary["models"]
    assert (
        models["fused"]["tasks"][name]["value"]
        == models["src (source, bible)"]["tasks"][name]["value"]
    )

    report = write_report(wd).read_text(encoding="utf-8")
    section = report.split("## Benchmarks", 1)[1].split("## Stage timings")[0]
    assert f"| model | {name} (acc_norm, 0-shot) |" in section
    value = 100 * models["fused"]["tasks"][name]["value"]
    assert f"| fused | {value:.2f} |" in section
    assert "gain" not in section  # no finished control


def test_report_shows_the_gain_over_the_control_across_seeds(
    tiny: TinyModel, tiny2: TinyModel, tasks: Any, tmp_path: Path
) -> None:
    from fusellm.report import write_report

    wd = tmp_path / "wd"
    name = tasks.names[1]  # bible next word
    runs = {"clm": tiny, "fused": tiny2, "clm-seed1": tiny2, "fused-seed1": tiny}
    with quiet():
        summary = run_benchmarks(
            {k: m.path for k, m in runs.items()},
            [name],
            wd / "evaluate" / "benchmarks",
            include_path=tasks.dir,
            limit=LIMIT,
            progress=False,
        )
    acc = {k: 100 * summary["models"][k]["tasks"][name]["value"] for k in runs}
    assert acc["clm"] == acc["fused-seed1"]
    assert acc["fused"] == acc["clm-seed1"]
    report = write_report(wd).read_text(encoding="utf-8")
    section = report.split("## Benchmarks", 1)[1]
    gain = acc["fused"] - acc["clm"]  # seed 0; seed 1 is the opposite
    sd = math.sqrt(2) * abs(gain)
    assert f"| gain: fused − CLM | {0.0:+.2f} ± {sd:.2f} |" in section
    mean = (acc["fused"] + acc["fused-seed1"]) / 2
    assert f"| fused: mean ± sd over 2 seeds | {mean:.2f} ± {sd / 2:.2f} |" in section
    assert "paired by seed, mean ± sd" in section
    assert "Benchmarks: the fused model's gain over the CLM control averages +0.00" in report


def test_builtin_config_sets_the_miniature_tasks(tmp_path: Path) -> None:
    from fusellm.pipeline import builtin_config

    mini = SimpleNamespace(
        target=tmp_path / "t",
        sources={"neox_bible": tmp_path / "s"},
        domains={"target": "mixed", "neox_bible": "bible"},
        train_data=tmp_path / "train",
        heldout_data=tmp_path / "heldout",
        block_size=128,
        benchmarks=tmp_path / "data" / "benchmarks",
        benchmark_tasks=("fusellm_bible_continuation", "fusellm_bible_next_word"),
    )
    cfg = builtin_config(mini, workdir=tmp_path)
    assert cfg.evaluate.tasks == list(mini.benchmark_tasks)
    assert cfg.evaluate.include_path == [str(mini.benchmarks)]
    assert builtin_config(mini, workdir=tmp_path, scale="test").evaluate.tasks == []
