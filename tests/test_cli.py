"""The ``fusellm`` command line: every command has a complete ``--help``; errors are clean."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fusellm.cli import COMMANDS, build_parser, main


def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name, (_, _, help_text) in COMMANDS.items():
        assert name in out
        assert help_text.split()[0] in out


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: fusellm {command}")
    # A real parser, not the listing placeholder: it describes at least one option besides -h.
    assert out.count("--") >= 2, out


def test_full_parser_builds_every_command() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, type(parser._subparsers._actions[-1])))
    assert set(sub.choices) == set(COMMANDS)


def test_no_command_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_unknown_command_is_a_usage_error() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fusellm.cli", "fly"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "invalid choice: 'fly'" in proc.stderr


def test_errors_are_messages_not_tracebacks(tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fusellm.cli", "report", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("fusellm report: error: ")
    assert "Traceback" not in proc.stderr
    assert "missing" in proc.stderr


def test_stage_package_reexports_each_stage_module() -> None:
    """``fusellm.stages`` re-exports every stage's entry points from their own modules, and the
    top-level package gives the same objects."""
    import importlib

    import fusellm
    import fusellm.stages as stages

    for name in stages.__all__:
        value = getattr(stages, name)
        module = importlib.import_module(value.__module__)
        assert module.__name__.startswith("fusellm.stages."), (name, module.__name__)
        assert name in module.__all__, (name, module.__name__)
        if name in fusellm.__all__:
            assert getattr(fusellm, name) is value
    with pytest.raises(AttributeError, match="no_such_stage"):
        _ = stages.no_such_stage
