"""The Ray runner of sharded stages (fusellm.distributed, the fusellm[ray] extra): on a local
Ray instance its output is byte for byte the single-process one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fusellm import FuseLLMError, InputError
from fusellm.cli import main
from fusellm.distributed import run_sharded
from fusellm.samples import SAMPLE_TEXTS
from models import TinyModel, build_named, quiet

ray = pytest.importorskip("ray")
pytest.importorskip("torch")

from fusellm.stages.align import ALIGN_STATS_NAME, align_dataset  # noqa: E402
from fusellm.stages.extract import extract_topk  # noqa: E402

TEXTS = [*SAMPLE_TEXTS, "A second, longer line of text.", SAMPLE_TEXTS[0][:40], "Numbers: 1, 22."]
EXTRACT = {"top_k": 4, "rows_per_shard": 2, "max_tokens_per_batch": 256, "progress": False}


@pytest.fixture(scope="module")
def local_ray() -> Any:
    """One local Ray instance for the module (run_sharded leaves a running instance up)."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return build_named("llama", tmp_path_factory.mktemp("models"))


def data_files(out: Path) -> dict[str, bytes]:
    """The output's data shards, shard sidecars, dataset metadata and statistics, by name."""
    keep = [*out.glob("data-*.arrow"), *out.glob("shards/*.json"), out / "dataset_info.json"]
    keep += [p for p in (out / "state.json", out / ALIGN_STATS_NAME) if p.exists()]
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(keep)}


def test_extract_as_ray_tasks_is_byte_identical(
    local_ray: Any, tiny: TinyModel, tmp_path: Path
) -> None:
    with quiet():
        single = extract_topk(TEXTS, tiny.path, tmp_path / "single", **EXTRACT)
    reports = run_sharded("extract", TEXTS, tiny.path, tmp_path / "ray", tasks=3, **EXTRACT)
    assert [r.worker for r in reports] == [(0, 3), (1, 3), (2, 3)]
    assert sorted(s for r in reports for s in r.shards_written) == list(range(single.num_shards))
    assert any(r.complete for r in reports)
    assert data_files(tmp_path / "ray") == data_files(single.output_dir)
    assert len(data_files(single.output_dir)) > 3
    # A rerun skips every shard.
    again = run_sharded("extract", TEXTS, tiny.path, tmp_path / "ray", tasks=2, **EXTRACT)
    assert all(r.skipped for r in again)


def test_align_as_ray_tasks_is_byte_identical(
    local_ray: Any,
    tiny: TinyModel,
    tmp_path_factory: pytest.TempPathFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    source = build_named("neox", tmp_path_factory.mktemp("source"))
    ex = {}
    with quiet():
        for name, model in (("target", tiny), ("neox", source)):
            ex[name] = extract_topk(TEXTS, model.path, tmp_path / name, **EXTRACT).output_dir
    args = (ex["target"], {"neox": ex["neox"]})
    kw = {"rows_per_batch": 2, "progress": False}
    with quiet():
        single = align_dataset(*args, tmp_path / "single", **kw)
    reports = run_sharded("align", *args, tmp_path / "ray", tasks=2, **kw)
    assert sum(1 for r in reports if not r.skipped) == 2
    assert data_files(tmp_path / "ray") == data_files(single.output_dir)
    assert len(list((tmp_path / "ray").glob("data-*.arrow"))) > 2
    # The command line: --ray-tasks instead of one --shard per machine.
    argv = ["align", str(ex["target"]), str(tmp_path / "cli"), "--source", f"neox={ex['neox']}"]
    argv += ["--rows-per-batch", "2", "--no-progress"]
    assert main([*argv, "--ray-tasks", "3"]) == 0
    assert "aligned in" in capsys.readouterr().out
    assert data_files(tmp_path / "cli") == data_files(single.output_dir)
    assert main([*argv, "--ray-address", "auto"]) == 1  # without --ray-tasks: a one-line error
    assert "--ray-address needs --ray-tasks" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*argv, "--ray-tasks", "2", "--shard", "0/2"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_bad_arguments_and_task_errors(local_ray: Any, tiny: TinyModel, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="stage must be one of"):
        run_sharded("train", tasks=2)
    with pytest.raises(InputError, match="tasks must be between 1 and"):
        run_sharded("extract", tasks=0)
    with pytest.raises(InputError, match="tasks must be between 1 and"):
        run_sharded("extract", tasks=1 << 40)
    with pytest.raises(InputError, match="do not pass shard"):
        run_sharded("extract", TEXTS, tiny.path, tmp_path / "x", tasks=2, shard="0/2")
    # A task's own typed error reaches the caller as itself.
    with pytest.raises(FuseLLMError, match="empty text"):
        run_sharded("extract", ["fine", ""], tiny.path, tmp_path / "y", tasks=2, **EXTRACT)
