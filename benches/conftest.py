"""Benchmarks measure release builds only, and report ratios against baselines run in the same
process. Run with ``python -m pytest benches --benchmark-only``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import fusellm

# The pure-Python oracles live with the tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def pytest_configure(config: pytest.Config) -> None:
    if fusellm._native._debug:
        raise pytest.UsageError(
            "fusellm._native is a debug build; benchmarks need a release build "
            "(scripts/setup.sh, pip install ., or maturin develop --release)"
        )
