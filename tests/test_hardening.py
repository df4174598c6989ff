"""Resource bounds: thread counts and thread pools, sizes that would drive allocations."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import fusellm
from fusellm.checks import MAX_THREADS

SPM, BBPE = "▁", "Ġ"
TASKS = Path("/proc/self/task")


def live_threads() -> int:
    return len(os.listdir(TASKS))


def small_batch() -> list[list[np.ndarray]]:
    seqs = 8
    return [
        [np.array([0, 1], np.int32)] * seqs,
        [np.array([0, 1], np.int32)] * seqs,
        [np.array([[0, 1], [1, 2]], np.int32)] * seqs,
        [np.array([[1.0, 0.0], [1.0, 0.0]], np.float32)] * seqs,
    ]


@pytest.mark.skipif(not TASKS.is_dir(), reason="counts threads through /proc/self/task")
def test_pools_of_many_thread_counts_do_not_accumulate() -> None:
    aligner = fusellm.Aligner(
        ["▁a", "b", "▁c"], ["Ġa", "b", "Ġc"], base_marker=SPM, blend_marker=BBPE
    )
    batch = small_batch()
    before = live_threads()
    counts = range(2, 40)
    for n in counts:
        aligner.align_batch(*batch, num_threads=n)
    # At most the four most recently used pools survive (36 + 37 + 38 + 39 threads); without the
    # bound every count kept its pool (sum(2..39) = 779 threads). Dropped pools' threads exit
    # asynchronously: wait for them a little.
    bound = before + sum(sorted(counts)[-4:])
    deadline = time.monotonic() + 10
    while live_threads() > bound and time.monotonic() < deadline:
        time.sleep(0.05)
    assert live_threads() <= bound, (live_threads(), bound)


def test_thread_counts_are_capped_with_a_clear_error() -> None:
    aligner = fusellm.Aligner(["▁a", "b"], ["Ġa", "b"], base_marker=SPM, blend_marker=BBPE)
    for bad in (0, -1, MAX_THREADS + 1, 100_000, True, 2.0):
        with pytest.raises(fusellm.InputError, match="num_threads"):
            aligner.align_batch(*small_batch(), num_threads=bad)
        with pytest.raises(fusellm.InputError, match="num_threads"):
            fusellm.VocabMap.build(
                ["▁a"], ["Ġa"], base_marker=SPM, blend_marker=BBPE, num_threads=bad
            )


@pytest.mark.skipif(not TASKS.is_dir(), reason="counts threads through /proc/self/task")
def test_environment_thread_count_is_clamped() -> None:
    """FUSELLM_NUM_THREADS=100000 runs on at most MAX_THREADS threads, and finishes."""
    code = (
        "import os, numpy as np, fusellm\n"
        "a = fusellm.Aligner(['▁a', 'b'], ['Ġa', 'b'], base_marker='▁', blend_marker='Ġ')\n"
        "x = [np.array([0, 1], np.int32)] * 64\n"
        "k = [np.array([[0, 1], [1, 0]], np.int32)] * 64\n"
        "z = [np.array([[1.0, 0.0], [1.0, 0.0]], np.float32)] * 64\n"
        "a.align_batch(x, x, k, z)\n"
        "print(len(os.listdir('/proc/self/task')))\n"
    )
    env = {**os.environ, "FUSELLM_NUM_THREADS": "100000"}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.strip()) <= MAX_THREADS + 16


# --- typed errors for malformed values ----------------------------------------------------------


def test_a_string_is_not_a_vocabulary() -> None:
    for build in (
        lambda v: fusellm.Aligner(v, ["Ġa"], base_marker=SPM, blend_marker=BBPE),
        lambda v: fusellm.VocabMap.build(v, ["Ġa"], base_marker=SPM, blend_marker=BBPE),
    ):
        with pytest.raises(fusellm.InputTypeError, match="id order"):
            build("▁a▁b")


def test_lone_surrogates_are_input_errors() -> None:
    bad = "▁a\ud800"
    with pytest.raises(fusellm.InputError, match=r"base_vocab\[1\].*surrogate"):
        fusellm.Aligner(["▁b", bad], ["Ġa"], base_marker=SPM, blend_marker=BBPE)
    with pytest.raises(fusellm.InputError, match=r"blend_marker.*surrogate"):
        fusellm.VocabMap.build(["▁b"], ["Ġa"], base_marker=SPM, blend_marker="\udc80")
    with pytest.raises(fusellm.InputError, match=r"blend_tokens\[0\].*surrogate"):
        fusellm.mined_base_to_blend(["▁a"], [bad], base_marker=SPM, blend_marker=BBPE)
    with pytest.raises(fusellm.InputError, match="surrogate"):
        fusellm.Aligner(["▁a"], ["Ġa"], base_marker=SPM, blend_marker=BBPE, vocab_map={bad: "▁a"})


def test_vocab_map_values_must_be_base_tokens_and_soft_needs_a_map() -> None:
    with pytest.raises(fusellm.InputError, match="'▁zz', which is not a base vocabulary token"):
        fusellm.Aligner(["▁a"], ["Ġa"], base_marker=SPM, blend_marker=BBPE, vocab_map={"▁a": "▁zz"})
    aligner = fusellm.Aligner(["▁a", "b"], ["Ġa", "b"], base_marker=SPM, blend_marker=BBPE)
    with pytest.raises(fusellm.InputError, match="vocabulary map"):
        aligner.align_batch(*small_batch(), vocab="soft")
    with pytest.raises(fusellm.InputError, match="vocabulary map"):
        aligner.targets("soft")


def test_bool_arrays_are_not_token_ids() -> None:
    aligner = fusellm.Aligner(["▁a", "b"], ["Ġa", "b"], base_marker=SPM, blend_marker=BBPE)
    base, blend, k_ids, k_logits = small_batch()
    with pytest.raises(fusellm.InputTypeError, match=r"base_ids\[0\] must hold integers"):
        aligner.align_batch([np.array([True, False])] * 8, blend, k_ids, k_logits)
    with pytest.raises(fusellm.InputTypeError, match=r"blend_topk_ids\[0\] must hold integers"):
        aligner.align_batch(base, blend, [np.ones((2, 2), bool)] * 8, k_logits)


def test_negative_or_infinite_learning_rates_are_refused() -> None:
    pytest.importorskip("torch")
    from fusellm import FusionConfig

    for lr in (-1e-5, float("inf"), float("nan")):
        with pytest.raises(fusellm.InputError, match="learning_rate"):
            FusionConfig(output_dir="/tmp/unused", learning_rate=lr, use_cpu=True)


def _map(tmp_path: Path) -> tuple[Path, list[str], list[str]]:
    base, blend = ["▁a", "▁b", "c"], ["Ġa", "Ġbb", "c"]
    vm = fusellm.VocabMap.build(base, blend, base_marker=SPM, blend_marker=BBPE, method="mined")
    path = tmp_path / "map.json"
    vm.save(path)
    return path, base, blend


def test_corrupt_vocab_map_files_are_stale_artifact_errors(tmp_path: Path) -> None:
    import hashlib
    import json

    path, base, blend = _map(tmp_path)
    meta_path = path.with_name("map.json.meta.json")
    good_meta = json.loads(meta_path.read_text())
    good_map = path.read_bytes()

    def with_map(data: bytes) -> dict:
        return {**good_meta, "map_sha256": hashlib.sha256(data).hexdigest()}

    cases: list[tuple[bytes, bytes, str]] = [
        (b"{not json", good_map, "cannot read"),
        (b"\xff\xfe", good_map, "cannot read"),
        (b"[1, 2]", good_map, "not a fusellm vocabulary-map sidecar"),
        (json.dumps({**good_meta, "base_marker": 3}).encode(), good_map, "'base_marker'"),
        (
            json.dumps({k: v for k, v in good_meta.items() if k != "base_vocab"}).encode(),
            good_map,
            "'base_vocab'",
        ),
        (json.dumps({**good_meta, "max_distance": -2}).encode(), good_map, "max_distance"),
        (json.dumps(with_map(b"\xff\xfe")).encode(), b"\xff\xfe", "not a JSON vocabulary map"),
        (json.dumps(with_map(b"[1]")).encode(), b"[1]", "not a map of token strings"),
    ]
    for meta, data, match in cases:
        meta_path.write_bytes(meta)
        path.write_bytes(data)
        with pytest.raises(fusellm.StaleArtifactError, match=match):
            fusellm.VocabMap.load(path, base, blend)


# --- the command line: one line, exit status 1 (2 for a bad config), nothing written ------------


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fusellm.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        check=False,
    )


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_cli_invalid_utf8_in_a_jsonl_text_names_the_file_and_row(tmp_path: Path) -> None:
    data = tmp_path / "docs.jsonl"
    data.write_bytes(b'{"text": "fine"}\n{"text": "bad \xff\xfe bytes"}\n')
    out = str(tmp_path / "out")
    proc = cli("split", str(data), out, "-t", "bundled:mistral", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 1
    line = one_line(proc)
    assert str(data) in line
    assert "row 1" in line
    assert "UTF-8" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl"]


def test_cli_corrupt_vocab_map_sidecar(tmp_path: Path) -> None:
    out = tmp_path / "map.json"
    first = cli("vocab-map", "bundled:mistral", "bundled:qwen", str(out), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    sidecar = tmp_path / "map.json.meta.json"
    sidecar.write_text('{"format": "fusellm.vocab_map", "version": 1, "method": 7}')
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    proc = cli("vocab-map", "bundled:mistral", "bundled:qwen", str(out), cwd=tmp_path)
    assert proc.returncode == 1
    line = one_line(proc)
    assert f"{out} was changed after it was written" in line
    assert "--overwrite" in line
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_cli_work_directory_that_is_a_file(tmp_path: Path) -> None:
    wd = tmp_path / "work"
    wd.write_text("not a directory")
    proc = cli("run", "--scale", "test", "--workdir", str(wd), "--no-progress", cwd=tmp_path)
    assert proc.returncode == 2
    assert "is a file, not a directory" in one_line(proc)
    assert wd.read_text() == "not a directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models import build_named, quiet

    root = tmp_path_factory.mktemp("models")
    with quiet():
        build_named("llama", root)
        build_named("neox", root)
    (root / "train.jsonl").write_text('{"text": "hello"}\n', encoding="utf-8")
    return root


def write_config(tmp_path: Path, models: Path, target: Path, train: dict[str, object]) -> Path:
    import yaml

    raw = {
        "target": {"path": str(target)},
        "sources": [{"name": "neox", "path": str(models / "neox")}],
        "data": {"train": str(models / "train.jsonl")},
        "block_size": 512,
        "workdir": str(tmp_path / "work"),
        "train": train,
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def refused_config(tmp_path: Path, config: Path, *words: str) -> None:
    """``fusellm run CONFIG`` refuses it: exit status 2, one line holding every word, nothing
    written."""
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = cli("run", str(config), "--no-progress", cwd=tmp_path)
    assert proc.returncode == 2
    line = one_line(proc)
    for word in words:
        assert word in line
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_cli_model_directory_without_weights(tmp_path: Path, tiny_models: Path) -> None:
    """Refused by the config check, before split runs: one line naming the key, nothing
    written (exit status 2, as for every config error)."""
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(tiny_models / "llama", bare)
    for weights in bare.glob("*.safetensors"):
        weights.unlink()
    config = write_config(tmp_path, tiny_models, bare, {"max_steps": 1})
    refused_config(tmp_path, config, "target.path", "holds no model weights")


def test_cli_negative_learning_rate(tmp_path: Path, tiny_models: Path) -> None:
    config = write_config(
        tmp_path, tiny_models, tiny_models / "llama", {"max_steps": 1, "learning_rate": -1e-4}
    )
    refused_config(tmp_path, config, "learning_rate", "-0.0001")


def test_cli_model_directory_without_tokenizer_files(tmp_path: Path, tiny_models: Path) -> None:
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(tiny_models / "llama", bare)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bare / name).unlink(missing_ok=True)
    config = write_config(tmp_path, tiny_models, bare, {"max_steps": 1})
    refused_config(tmp_path, config, "target.path", "holds no tokenizer")


def test_cli_second_run_on_a_locked_work_directory(tmp_path: Path) -> None:
    """While a run holds the work directory, another exits at once with one line naming the
    holder, exit status 1, and writes nothing."""
    from fusellm.io import LOCK_NAME, exclusive_lock

    wd = tmp_path / "work"
    with exclusive_lock(wd, "work directory"):
        proc = cli("run", "--scale", "test", "--workdir", str(wd), "--no-progress", cwd=tmp_path)
        assert proc.returncode == 1
        line = one_line(proc)
        assert f"{wd} is in use by another fusellm process (pid {os.getpid()}" in line
        assert sorted(p.name for p in wd.iterdir()) == [LOCK_NAME]
    # Released with its holder: the lock can be taken again.
    with exclusive_lock(wd, "work directory") as path:
        assert f"pid {os.getpid()}" in path.read_text()


def test_temporaries_of_killed_writers_are_removed(tmp_path: Path) -> None:
    """A writer killed between its temporary file and the rename leaves `.NAME.tmp-PID-...`;
    the next write of NAME removes it once PID is gone, and leaves a live writer's alone."""
    from fusellm.io import atomic_write_json

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    dead_pid = int(dead.stdout)
    target = tmp_path / "map.json"
    stale_file = tmp_path / f".map.json.tmp-{dead_pid}-0badc0de"
    stale_file.write_bytes(b"{half")
    stale_dir = tmp_path / f".map.json.tmp-{dead_pid}-0badc0df"
    stale_dir.mkdir()
    (stale_dir / "x").write_text("x")
    live = tmp_path / f".map.json.tmp-{os.getpid()}-00000000"
    live.write_bytes(b"{")
    other = tmp_path / f".other.json.tmp-{dead_pid}-0badc0de"
    other.write_bytes(b"{")
    atomic_write_json(target, {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["map.json", live.name, other.name])
