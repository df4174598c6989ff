"""``fusellm report``: a synthetic work directory with realistic files from every stage."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fusellm.errors import InputError
from fusellm.report import NOT_AVAILABLE, write_report
from fusellm.vocab import VocabMap

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
V, K = 48, 3


def _real_trainer_state(path: Path) -> dict[str, Any]:
    """Trains a tiny Llama for 4 steps with the fusion loss and saves its trainer_state.json."""
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    from fusellm import FusionConfig, FusionTrainer
    from fusellm.fuse import build_packed_dataset

    rng = np.random.default_rng(0)
    blocks = [rng.integers(0, V, 12) for _ in range(8)]

    def rows(ce: tuple[float, float]) -> dict[str, Any]:
        ids = [np.stack([rng.permutation(V)[:K] for _ in range(b.size)]) for b in blocks]
        # log-probabilities: rows of normal(0, 1) - 4 hold well under all of the mass
        logits = [np.sort(rng.normal(size=(b.size, K)), axis=1)[:, ::-1] - 4.0 for b in blocks]
        return {
            "ids": ids,
            "logits": logits,
            "metric_ce": rng.uniform(*ce, len(blocks)),
            "metric_ce_per_byte": rng.uniform(*ce, len(blocks)) / 4,
        }

    # Overlapping score ranges: each candidate wins some blocks.
    cands = {"ref": rows((1.0, 2.0)), "qwen": rows((0.8, 1.8)), "neox": rows((1.2, 2.2))}
    data = build_packed_dataset(blocks, cands)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=V,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=32,
        )
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args = FusionConfig(
            output_dir=str(path.parent / "out"),
            sources=["qwen", "neox"],
            use_cpu=True,
            report_to="none",
            per_device_train_batch_size=2,
            max_steps=4,
            save_strategy="no",
            disable_tqdm=True,
            seed=0,
        )
        trainer = FusionTrainer(model=model, args=args, train_dataset=data)
        trainer.train()
    finally:
        torch.set_num_threads(threads)
    path.mkdir(parents=True, exist_ok=True)
    trainer.state.save_to_json(str(path / "trainer_state.json"))
    return json.loads((path / "trainer_state.json").read_text("utf-8"))


def _state(log: list[dict[str, Any]], step: int) -> dict[str, Any]:
    return {"global_step": step, "max_steps": step, "log_history": log}


def _groups(ppl_all: float, ppl_code: float) -> dict[str, Any]:
    def g(ppl: float, tokens: int, nbytes: int) -> dict[str, Any]:
        nll = tokens * math.log(ppl)
        return {
            "tokens": tokens,
            "nll": nll,
            "ppl": ppl,
            "bytes": nbytes,
            "bits_per_byte": nll / math.log(2) / nbytes,
            "documents": 3,
        }

    return {"code": g(ppl_code, 400, 1600), "all": g(ppl_all, 1000, 4000)}


@pytest.fixture(scope="module")
def real_state(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _real_trainer_state(tmp_path_factory.mktemp("train") / "fused")


def build_workdir(root: Path, real_state: dict[str, Any], *, seeds: bool = False) -> Path:
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(
        "target:\n  path: models/llama\n"
        "sources:\n  - name: qwen\n    path: models/qwen\n  - name: neox\n    path: models/neox\n"
        "train:\n  fusion: mince\n  lm_loss_weight: 0.9\n  learning_rate: 1.0e-05\n"
        "block_size: 2048\nseeds: [0, 1]\n",
        "utf-8",
    )
    base = ["<unk>", "▁the", "▁cat", "s", "at", "▁dog"]
    for name, blend in (("qwen", ["Ġthe", "Ġcat", "Ġdogs", "xyz", "Ġ"]), ("neox", ["Ġthe", "q"])):
        vm = VocabMap.build(base, blend, base_marker="▁", blend_marker="Ġ", method="mined")
        (root / "vocab_map").mkdir(exist_ok=True)
        vm.save(root / "vocab_map" / f"{name}.json")
    (root / "align").mkdir()
    (root / "align" / "align_stats.json").write_text(
        json.dumps(
            {
                "method": "offsets",
                "vocab": "soft",
                "rows": 12,
                "base_positions": 2000,
                "sources": {
                    "qwen": {
                        "matched": 1500,
                        "empty": 20,
                        "fallback": 480,
                        "masked": 0,
                        "exact_span": 1400,
                        "unknown_ids": 7,
                        "unmapped_ids": 300,
                        "topk_entries": 15000,
                    },
                    "neox": {
                        "matched": 1000,
                        "empty": 0,
                        "fallback": 900,
                        "masked": 100,
                        "exact_span": None,
                        "unknown_ids": 0,
                        "unmapped_ids": 50,
                        "topk_entries": 10000,
                    },
                },
                "teachers": {
                    "vocab_size": 6,
                    "logprobs": True,
                    "candidates": {
                        "ref": {"all": {"positions": 1988, "top1": 0.07, "coverage": 0.2}},
                        "qwen": {
                            "all": {
                                "positions": 1490,
                                "matched_share": 0.75,
                                "top1": 0.26,
                                "coverage": 0.5,
                                "ce": 4.25,
                                "ref_top1": 0.08,
                                "ref_coverage": 0.21,
                                "ref_ce": 5.5,
                                "topk_mass": 0.45,
                                "dropped_mass": 0.01,
                            }
                        },
                    },
                },
            }
        ),
        "utf-8",
    )
    train = root / "train"
    (train / "fused").mkdir(parents=True)
    (train / "fused" / "trainer_state.json").write_text(json.dumps(real_state), "utf-8")
    clm_log = [{"step": s, "loss": 4.0 - 0.1 * s, "learning_rate": 1e-5} for s in range(1, 5)]
    clm_log.append({"step": 4, "train_loss": 3.75, "train_runtime": 1.0})
    (train / "clm").mkdir()
    (train / "clm" / "trainer_state.json").write_text(json.dumps(_state(clm_log, 4)), "utf-8")
    models: dict[str, Any] = {
        "target (before)": {"path": "models/llama", "groups": _groups(30.0, 20.0)},
        "clm": {"path": "train/clm", "groups": _groups(25.0, 18.0)},
        "fused": {"path": "train/fused", "groups": _groups(24.0, 17.0)},
        "qwen (own domain)": {"path": "models/qwen", "groups": {"code": _groups(1, 12.0)["code"]}},
    }
    if seeds:
        # Hand-written fused run with known shares: ref 1, 0.5, 0, 0.5 -> 50 %.
        log = []
        for s, share in zip(range(1, 5), (1.0, 0.5, 0.0, 0.5), strict=True):
            log.append(
                {
                    "step": s,
                    "loss": 3.0,
                    "clm_loss": 3.1,
                    "fusion_loss": 2.0,
                    "fusion/select_ref": share,
                    "fusion/select_qwen": 1 - share,
                }
            )
        (train / "fused-seed1").mkdir()
        (train / "fused-seed1" / "trainer_state.json").write_text(
            json.dumps(_state(log, 4)), "utf-8"
        )
        models["clm-seed1"] = {"path": "train/clm-seed1", "groups": _groups(26.0, 18.0)}
        models["fused-seed1"] = {"path": "train/fused-seed1", "groups": _groups(23.0, 17.5)}
    (root / "evaluate").mkdir()
    (root / "evaluate" / "perplexity.json").write_text(
        json.dumps(
            {
                "data": {"source": "heldout.jsonl", "rows": 6, "fingerprint": "ab" * 32},
                "models": models,
            }
        ),
        "utf-8",
    )
    (root / "timings.json").write_text(
        json.dumps({"stages": {"split": 1.5, "extract": 100.0, "train": 3600.0}}), "utf-8"
    )
    return root


def _weighted_mean(log: list[dict[str, Any]], key: str) -> float:
    pts = [(e["step"], e[key]) for e in log if key in e and "loss" in e]
    prev, num, den = 0, 0.0, 0.0
    for step, v in pts:
        num += (step - prev) * v
        den += step - prev
        prev = step
    return num / den


def test_full_report(tmp_path: Path, real_state: dict[str, Any]) -> None:
    wd = build_workdir(tmp_path / "work", real_state)
    path = write_report(wd)
    assert path == wd / "report" / "report.md"
    md = path.read_text("utf-8")
    assert NOT_AVAILABLE not in md
    # Summary and settings.
    assert "| train.lm_loss_weight | 0.9 |" in md
    assert "| sources[0].name | qwen |" in md
    assert "| seeds | 0, 1 |" in md
    # Vocabulary maps (VocabMap.save sidecars): qwen has 2 exact and 3 mined of 5.
    assert "| qwen | mined | 5 | 2 (40.0%) | 0 (0.0%) | 3 (60.0%) | 1: 2, 3: 1 | 0 (0.0%) |" in md
    # Alignment: matched share of base positions, exact span, fallback, drops.
    assert "| qwen | 1,500 (75.0%) | 1,400 (70.0%) | 480 (24.0%) |" in md
    assert "| neox | 1,000 (50.0%) | n/a | 900 (45.0%) | 0 (0.0%) | 100 (5.0%) |" in md
    assert "7 (<0.1%)" in md
    assert "300 (2.0%)" in md
    # Teacher quality, as align_stats.json has it.
    assert (
        "| qwen | all | 1,490 | 75.0% | 26.0% | 8.0% | 50.0% | 21.0% | 4.250 | 5.500 | 45.0% | "
        "1.0% |" in md
    )
    assert "| ref | all | 1,988 | – | 7.0% | – | 20.0% | – | – | – | – | – |" in md
    # Training: candidates of the real run, share over training computed from its log.
    log = real_state["log_history"]
    assert any("fusion/select_ref" in e for e in log)
    for cand in ("ref", "qwen", "neox"):
        share = _weighted_mean(log, f"fusion/select_{cand}")
        assert f"| {cand} | {100 * share:.1f}% |" in md
    assert "![fused: fusion candidates](selection_fused.png)" in md
    assert "| clm | control (CLM only) | 4 | 3.9000 | 3.6000 | 3.6000 | – | – |" in md
    lr = [e["optimizer/lr"] for e in log if "optimizer/lr" in e][-1]
    assert f"{lr:.3g}" in md
    assert "Effective Adam betas: fused: (0.9, 0.999)" in md
    # Perplexity tables and fused-vs-CLM differences.
    assert "| model | code | all |" in md
    assert "| target (before) | 20.000 | 30.000 |" in md
    assert "| qwen (own domain) | 12.000 | – |" in md
    bpb_all = 1000 * math.log(24.0) / math.log(2) / 4000
    assert f"{bpb_all:.4f}" in md
    d_bpb = 1000 * (math.log(24.0) - math.log(25.0)) / math.log(2) / 4000
    assert "| all | 24.000 | 25.000 | -1.000 | -4.00% |" in md
    assert f"{d_bpb:+.4f}" in md
    assert "| code | 17.000 | 18.000 | -1.000 | -5.56% |" in md
    assert "Headline: the fused model's held-out perplexity is 24.000 against 25.000" in md
    # Timings.
    assert "| train | 3600.0 | 1:00:00 | 97.3% |" in md
    assert "| total | 3701.5 | 1:01:42 | 100.0% |" in md
    # Plots: valid PNGs.
    for name in ("selection_fused.png", "loss_curves.png"):
        data = (wd / "report" / name).read_bytes()
        assert data.startswith(PNG_MAGIC)
        assert len(data) > 1000
        assert f"({name})" in md
    assert not [p for p in (wd / "report").iterdir() if p.name.startswith(".")]


def test_seeds_give_mean_and_spread(tmp_path: Path, real_state: dict[str, Any]) -> None:
    wd = build_workdir(tmp_path / "work", real_state, seeds=True)
    out = tmp_path / "elsewhere"
    path = write_report(wd, output_dir=out)
    assert path == out / "report.md"
    md = path.read_text("utf-8")
    # fused 24, 23; clm 25, 26; paired differences -1, -3 -> mean -2, sample std sqrt(2).
    assert "| all | 23.500 ± 0.707 | 25.500 ± 0.707 | -2.000 ± 1.414 |" in md
    assert "2 fused, 2 CLM runs" in md
    # Known shares of the hand-written run: ref 50 %, first 100 %, last 50 %.
    assert "**fused-seed1**" in md
    assert "| ref | 50.0% | 100.0% | 50.0% |" in md
    assert "| qwen | 50.0% | 0.0% | 50.0% |" in md
    assert (out / "selection_fused-seed1.png").read_bytes().startswith(PNG_MAGIC)
    assert not (wd / "report").exists()


def test_missing_pieces_are_reported_not_fatal(tmp_path: Path, real_state: dict[str, Any]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    md = write_report(empty).read_text("utf-8")
    for title in (
        "## Settings",
        "## Vocabulary maps",
        "## Alignment",
        "## Training",
        "## Held-out perplexity",
        "## Stage timings",
    ):
        section = md.split(title, 1)[1]
        assert section.lstrip("\n").startswith(NOT_AVAILABLE), title
    assert not list((empty / "report").glob("*.png"))

    wd = build_workdir(tmp_path / "partial", real_state)
    shutil.rmtree(wd / "align")
    shutil.rmtree(wd / "train")
    (wd / "timings.json").unlink()
    (wd / "vocab_map" / "neox.json.meta.json").unlink()
    md = write_report(wd).read_text("utf-8")
    assert md.count(NOT_AVAILABLE) >= 4
    assert "| neox | no statistics (no .meta.json sidecar) |" in md
    assert "| qwen | mined | 5 |" in md
    assert "| all | 24.000 | 25.000 |" in md
    assert not (wd / "report" / "loss_curves.png").exists()


@pytest.mark.parametrize(
    "rel",
    [
        "align/align_stats.json",
        "evaluate/perplexity.json",
        "train/clm/trainer_state.json",
        "timings.json",
        "vocab_map/qwen.json.meta.json",
    ],
)
def test_corrupt_json_names_the_file(tmp_path: Path, real_state: dict[str, Any], rel: str) -> None:
    wd = build_workdir(tmp_path / "work", real_state)
    (wd / rel).write_text('{"truncated": ', "utf-8")
    with pytest.raises(InputError, match=re.escape(Path(rel).name)):
        write_report(wd)
    assert not (wd / "report" / "report.md").exists()


def test_bad_structure_and_yaml(tmp_path: Path, real_state: dict[str, Any]) -> None:
    wd = build_workdir(tmp_path / "work", real_state)
    (wd / "align" / "align_stats.json").write_text("[1, 2]", "utf-8")
    with pytest.raises(InputError, match=re.escape("align_stats.json")):
        write_report(wd)
    (wd / "align" / "align_stats.json").write_text('{"rows": 3}', "utf-8")
    with pytest.raises(InputError, match="sources"):
        write_report(wd)
    shutil.rmtree(wd / "align")
    (wd / "config.yaml").write_text("a: [1, 2\n", "utf-8")
    with pytest.raises(InputError, match=re.escape("config.yaml")):
        write_report(wd)
    with pytest.raises(InputError, match="does not exist"):
        write_report(tmp_path / "nowhere")


def test_cli(
    tmp_path: Path, real_state: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    from fusellm.cli import main

    wd = build_workdir(tmp_path / "work", real_state)
    assert main(["report", str(wd), "--output", str(tmp_path / "r")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "r" / "report.md")
    assert (tmp_path / "r" / "report.md").is_file()
    with pytest.raises(SystemExit) as exc:
        main(["report", "--help"])
    assert exc.value.code == 0
    assert "--output" in capsys.readouterr().out
