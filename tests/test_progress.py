"""One progress mechanism: a bar on a terminal, log lines at a steady rate without one."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from fusellm import progress as progress_mod
from fusellm.progress import progress_bar


def test_without_a_terminal_progress_is_logged_at_a_steady_rate(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = iter([0.0, 10.0, 31.0, 45.0, 62.0, 70.0])
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: next(clock))
    caplog.set_level(logging.INFO, logger="fusellm.progress")
    bar = progress_bar(None, 100, "align", "row")  # pytest's stderr is not a terminal
    for _ in range(4):  # at 10, 31, 45 and 62 s: lines at 31 and 62 (30 s apart at least)
        bar.update(20)
    bar.set_postfix(loss="1.5")
    bar.close()
    bar.close()  # once only
    lines = [r.getMessage() for r in caplog.records if r.name == "fusellm.progress"]
    assert lines == [
        "align: 40/100 rows (40%) in 31 s, 1.29 row/s, about 46 s left",
        "align: 80/100 rows (80%) in 62 s, 1.29 row/s, about 16 s left",
        "align: 80/100 rows (80%) in 70 s, 1.14 row/s, loss=1.5",
    ]


def test_no_progress_is_silent(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    bar = progress_bar(False, 10, "pack", "row")
    bar.update(10)
    bar.set_postfix(x=1)
    bar.close()
    assert not caplog.records


def test_a_stage_command_writes_progress_to_a_log_that_is_not_a_terminal(tmp_path: Path) -> None:
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(5)))

    def split(out: str, *flags: str) -> subprocess.CompletedProcess[str]:
        command = ["split", str(data), out, "-t", "bundled:mistral", *flags]
        return subprocess.run(
            [sys.executable, "-m", "fusellm.cli", *command],
            capture_output=True,
            text=True,
            check=True,
            timeout=300,
            cwd=tmp_path,
        )

    logged = split(str(tmp_path / "a"))
    assert "split: 5/5 docs (100%) in" in logged.stderr
    quiet = split(str(tmp_path / "b"), "--no-progress")
    assert "split:" not in quiet.stderr
