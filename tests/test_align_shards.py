"""``align_dataset(shard="i/N")`` / ``fusellm align --shard i/N``: workers over one output
directory, each computing the shards ``s`` with ``s % N == i`` under a lock of its own; the last
to finish completes the output. Combined, the workers' output is byte-identical to one process's
(every data file, sidecar, metadata file and ``align_stats.json``, whose teacher sums are added
up shard by shard), in either order; a single process resumes a worker's partial output."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fusellm import InputError
from fusellm.io import MANIFEST_NAME
from models import TinyModel, build_named, quiet

torch = pytest.importorskip("torch")
datasets = pytest.importorskip("datasets")

from fusellm.stages.align import ALIGN_STATS_NAME, add_align_parser, align_dataset  # noqa: E402
from fusellm.stages.extract import extract_topk  # noqa: E402

TEXTS = [
    "Hello world, again.",
    "Héllo wörld 🙂 — naïve café.",
    "Numbers: 1, 22, 333, 4444.",
    "A second line\nwith a newline.",
    "x",
    "The end of the rows is near.",
    "One more.",
]
# Domains first seen in later shards: their order in the statistics is that of first appearance.
DOMAINS = ["a", "a", "b", "a", "c", "b", "a"]
ROWS = 2  # rows per shard: 4 shards


@pytest.fixture(scope="module")
def extracts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shards")
    rows = datasets.Dataset.from_dict({"text": TEXTS, "domain": DOMAINS})
    out = {}
    for name in ("llama", "neox"):
        model: TinyModel = build_named(name, root / "models")
        out[name] = root / name
        with quiet():
            extract_topk(rows, model.path, out[name], progress=False, rows_per_shard=3)
    return out


def _align(extracts: dict[str, Path], out: Path, **kw: Any) -> Any:
    with quiet():
        return align_dataset(
            extracts["llama"],
            {"neox": extracts["neox"]},
            out,
            rows_per_batch=ROWS,
            progress=False,
            **kw,
        )


def _files(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes()
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME
    }


def _manifest(path: Path) -> dict[str, Any]:
    m = json.loads((path / MANIFEST_NAME).read_text())
    for k in ("seconds", "cpu_seconds"):
        m.pop(k, None)
    m["output"] = m["output"]["sha256"]  # the files' modification times differ
    return m


@pytest.fixture(scope="module")
def single(extracts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("single") / "aligned"
    report = _align(extracts, out)
    assert report.complete
    assert len(list(out.glob("data-*.arrow"))) == 4
    return out


@pytest.mark.parametrize("order", [("0/2", "1/2"), ("1/2", "0/2"), ("2/3", "0/3", "1/3")])
def test_workers_combined_equal_one_process(
    extracts: dict[str, Path], single: Path, tmp_path: Path, order: tuple[str, ...]
) -> None:
    out = tmp_path / "aligned"
    for n, shard in enumerate(order):
        report = _align(extracts, out, shard=shard)
        last = n == len(order) - 1
        assert report.complete == last
        if not last:
            assert not (out / ALIGN_STATS_NAME).exists()
            assert not json.loads((out / MANIFEST_NAME).read_text())["complete"]
    assert _files(out) == _files(single)
    assert _manifest(out) == _manifest(single)
    again = _align(extracts, out, shard=order[0])  # complete: every worker skips
    assert again.skipped
    assert again.complete


def test_one_process_resumes_a_workers_output(
    extracts: dict[str, Path], single: Path, tmp_path: Path
) -> None:
    out = tmp_path / "aligned"
    first = _align(extracts, out, shard="1/2")
    assert not first.complete
    assert first.rows == 3  # shards 1 and 3: rows 2, 3 and 6
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("data-*.arrow")}
    assert sorted(done) == ["data-00001-of-00004.arrow", "data-00003-of-00004.arrow"]
    report = _align(extracts, out)
    assert report.complete
    assert report.rows == len(TEXTS)
    for name, mtime in done.items():  # kept, not computed again
        assert (out / name).stat().st_mtime_ns == mtime
    assert _files(out) == _files(single)


def test_shard_cli(extracts: dict[str, Path], single: Path, tmp_path: Path, capsys: Any) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_align_parser(parser.add_subparsers())
    out = tmp_path / "aligned"
    for shard in ("0/2", "1/2"):
        argv = ["align", str(extracts["llama"]), str(out), f"--source=neox={extracts['neox']}"]
        argv += [f"--rows-per-batch={ROWS}", "--shard", shard, "--no-progress"]
        args = parser.parse_args(argv)
        with quiet():
            assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "shard 0/2 aligned" in printed
    assert "other workers' shards are still missing" in printed
    first, *rest = printed.splitlines()
    assert "(4 rows)" in first  # shards 0 and 2
    assert f"{len(TEXTS)} rows" in rest[0]  # the last worker reports the whole output
    assert _files(out) == _files(single)


def test_align_reads_tokenizers_without_transformers(
    extracts: dict[str, Path], single: Path, tmp_path: Path
) -> None:
    """``fusellm align`` in a fresh process: the tokenizers' strings come from their
    tokenizer.json alone (torch and transformers are never imported), with the same output."""
    import subprocess
    import sys

    out = tmp_path / "aligned"
    code = (
        "import sys\n"
        "from fusellm.cli import main\n"
        "rc = main(sys.argv[1:])\n"
        "print('imported', [m for m in ('torch', 'transformers') if m in sys.modules])\n"
        "sys.exit(rc)\n"
    )
    argv = ["align", str(extracts["llama"]), str(out), f"--source=neox={extracts['neox']}"]
    argv += [f"--rows-per-batch={ROWS}", "--no-progress"]
    done = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "imported []" in done.stdout
    assert _files(out) == _files(single)


@pytest.mark.parametrize("shard", ["2/2", "1", "a/b", "-1/2", (0, 0)])
def test_bad_shards_are_refused_before_anything_is_written(
    extracts: dict[str, Path], tmp_path: Path, shard: Any
) -> None:
    out = tmp_path / "aligned"
    with pytest.raises(InputError, match="shard"):
        _align(extracts, out, shard=shard)
    assert not out.exists()
