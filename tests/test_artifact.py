"""The one artifact protocol (``fusellm.artifact``): the decision, the commit, the lock.

Every stage, the miniature and ``fusellm run`` go through it; their own tests check that each
one skips, refuses, replaces and resumes through it. These check the protocol itself on small
outputs: the four outcomes of the decision, that a failed build leaves the old output, that a
changed output is stale, file artifacts with sidecars, in-place builds that resume, and the
lock.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fusellm import FuseLLMError, InputError, LockedError, StaleArtifactError
from fusellm.artifact import Artifact, build_seconds, is_complete, output_sha256, stale_policy
from fusellm.io import MANIFEST_NAME, read_manifest


def build(art: Artifact, policy: str = "refuse", text: str = "x") -> str:
    """Builds a one-file directory artifact unless it is done; returns the decision's state."""
    decision = art.decide(policy)
    if decision.done:
        art.skipped()
        return "done"
    with art.build(decision, {"note": text}) as tmp:
        (tmp / "data.txt").write_text(text)
    return decision.state


def dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(proc.stdout)


def test_absent_done_stale_and_replace(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "out"
    assert build(Artifact(out, "demo", {"a": 1, "b": [1, 2]})) == "absent"
    m = read_manifest(out)
    assert m is not None
    assert (m["stage"], m["key"], m["complete"], m["note"]) == ("demo", {"a": 1, "b": [1, 2]},
                                                                True, "x")  # fmt: skip
    assert m["output"]["files"][0][0] == "data.txt"
    assert output_sha256(out) == m["output"]["sha256"]
    assert build_seconds(out)[0] >= 0.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary, no lock left

    with caplog.at_level(logging.INFO, logger="fusellm.artifact"):
        assert build(Artifact(out, "demo", {"a": 1, "b": (1, 2)}, describe="same a, b")) == "done"
    assert f"{out} is up to date (same a, b): skipped" in caplog.text

    with pytest.raises(StaleArtifactError, match=r"differs in: a\).*--overwrite"):
        build(Artifact(out, "demo", {"a": 2, "b": [1, 2]}))
    assert (out / "data.txt").read_text() == "x"
    with pytest.raises(StaleArtifactError, match="holds the output of stage 'demo', not 'other'"):
        build(Artifact(out, "other", {"a": 1, "b": [1, 2]}))

    with caplog.at_level(logging.WARNING, logger="fusellm.artifact"):
        assert build(Artifact(out, "demo", {"a": 2}), "replace", "y") == "replace"
    assert "differs in: a, b): replacing it" in caplog.text
    assert (out / "data.txt").read_text() == "y"
    assert read_manifest(out)["key"] == {"a": 2}


def test_a_changed_output_is_stale(tmp_path: Path) -> None:
    out = tmp_path / "out"
    art = Artifact(out, "demo", {"a": 1})
    build(art)
    (out / "data.txt").write_text("z")
    with pytest.raises(StaleArtifactError, match="was changed after it was written"):
        art.decide("refuse")
    (out / "data.txt").write_text("x")  # the recorded content again (new modification time)
    assert art.decide("refuse").done
    (out / "extra.txt").write_text("new file")
    assert art.decide("replace").state == "replace"
    (out / MANIFEST_NAME).write_text("{torn")
    with pytest.raises(StaleArtifactError, match="unreadable manifest"):
        art.decide("refuse")


def test_a_failed_build_leaves_the_old_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    build(Artifact(out, "demo", {"a": 1}))
    art = Artifact(out, "demo", {"a": 2})
    decision = art.decide("replace")

    def failing() -> None:
        with art.build(decision, {}) as tmp:
            (tmp / "data.txt").write_text("half")
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        failing()
    assert (out / "data.txt").read_text() == "x"
    assert read_manifest(out)["key"] == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_foreign_directories_are_refused_unless_owned(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    for policy in ("refuse", "replace"):
        with pytest.raises(InputError, match="holds no fusellm manifest"):
            Artifact(mine, "demo", {}).decide(policy)
    assert (mine / "notes.txt").read_text() == "keep"
    owned = Artifact(mine, "demo", {}, owned=True)
    with pytest.raises(StaleArtifactError, match="has no fusellm manifest"):
        owned.decide("refuse")
    assert owned.decide("replace").state == "replace"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / f".x.tmp-{dead_pid()}-00").write_text("temporary")  # temporaries do not count
    assert Artifact(empty, "demo", {}).decide("refuse").state == "absent"
    (tmp_path / "file").write_text("a file")
    with pytest.raises(InputError, match="not a directory"):
        Artifact(tmp_path / "file", "demo", {}).decide("refuse")


def test_policies_are_checked() -> None:
    assert stale_policy(False, None) == "refuse"
    assert stale_policy(True, None) == "replace"
    assert stale_policy(False, "replace") == "replace"
    with pytest.raises(InputError, match="on_stale must be one of"):
        stale_policy(False, "keep")
    with pytest.raises(InputError, match="overwrite must be True or False"):
        stale_policy("yes", None)


def test_file_artifacts_commit_every_file_with_a_manifest_beside(tmp_path: Path) -> None:
    path = tmp_path / "map.json"
    files = ("map.json", "map.json.meta.json")
    art = Artifact(path, "demo", {"k": 1}, files=files)
    decision = art.decide("refuse")
    assert decision.state == "absent"
    with art.build(decision, {}) as tmp:
        (tmp / "map.json").write_text("{}")
        (tmp / "map.json.meta.json").write_text('{"m": 1}')
    manifest = tmp_path / f"map.json.{MANIFEST_NAME}"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*files, manifest.name])
    assert is_complete(path, "demo")
    assert art.decide("refuse").done
    # A file written outside the protocol (no manifest) is stale, not foreign.
    manifest.unlink()
    with pytest.raises(StaleArtifactError, match="has no fusellm manifest"):
        art.decide("refuse")
    decision = art.decide("replace")

    def half() -> None:
        with art.build(decision, {}) as tmp:
            (tmp / "map.json").write_text("{}")

    with pytest.raises(FuseLLMError, match=r"wrote no \['map.json.meta.json'\]"):
        half()
    assert not manifest.exists()
    with pytest.raises(InputError, match="is a directory"):
        Artifact(tmp_path, "demo", {}, files=(tmp_path.name,)).decide("refuse")


def test_in_place_builds_resume_and_clean_up_after_killed_writers(tmp_path: Path) -> None:
    out = tmp_path / "shards"
    art = Artifact(out, "demo", {"n": 2}, resumable=True)
    with art.building(art.decide("refuse"), {"note": "first"}):
        (out / "part-0").write_text("0")  # killed here: no completion
    assert read_manifest(out)["complete"] is False
    assert not is_complete(out)
    with pytest.raises(FuseLLMError, match="holds no complete fusellm output"):
        output_sha256(out)
    torn = out / f".part-1.tmp-{dead_pid()}-0badc0de"
    torn.write_text("half")
    decision = art.decide("refuse")
    assert decision.state == "resume"
    with art.building(decision, {"note": "second"}):
        assert not torn.exists()  # a dead writer's temporary
        assert (out / "part-0").read_text() == "0"  # the finished part is kept
        (out / "part-1").write_text("1")
        manifest = art.complete({"parts": 2})
    assert (manifest["note"], manifest["parts"], manifest["complete"]) == ("first", 2, True)
    assert art.decide("refuse").done
    # Another key replaces everything the output held.
    other = Artifact(out, "demo", {"n": 3}, resumable=True)
    with other.building(other.decide("replace"), {}):
        assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME]


def test_a_second_builder_gets_a_one_line_error_naming_the_holder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = Artifact(out, "demo", {"a": 1}, resumable=True)
    second = Artifact(out, "demo", {"a": 1}, resumable=True)
    with first.building(first.decide("refuse"), {}):
        with pytest.raises(LockedError) as exc:
            second.building(second.decide("refuse"), {}).__enter__()
        message = str(exc.value)
        assert "\n" not in message
        assert f"the demo output {out} is in use by another fusellm process (pid " in message
        assert f"pid {os.getpid()} " in message
        # Workers of one resumable output lock their own slots.
        with second.building(second.decide("refuse"), {}, slot="1-of-2"):
            pass
    assert not any(p.name.startswith(".out.lock") for p in tmp_path.iterdir())
    assert json.loads((out / MANIFEST_NAME).read_text())["complete"] is False
