"""Shared fixtures and hypothesis profiles.

Hypothesis profile from the ``HYPOTHESIS_PROFILE`` environment variable:

- ``ci`` (default): about 100 examples per property;
- ``dev``: a quick pass while editing;
- ``thorough``: a long search before a release.

Tests whose examples are expensive (real 150k vocabularies) scale their own ``max_examples`` from
the profile's value, so each profile keeps its proportions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

import fusellm

settings.register_profile(
    "ci",
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile(
    "dev",
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@dataclass(frozen=True)
class RealTokenizer:
    """A bundled tokenizer with what the oracle needs, computed once per session."""

    name: str
    tok: Any
    vocab: list[str | None]
    marker: str
    index: dict[str, int]  # string -> lowest id

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    def strings(self, ids: list[int]) -> list[str]:
        return [self.vocab[i] for i in ids]  # type: ignore[misc]


def _load(name: str) -> RealTokenizer:
    from fusellm.bundled import load_tokenizer

    try:
        tok = load_tokenizer(name)
    except fusellm.FuseLLMError as e:  # the optional "tokenizers" extra is missing
        pytest.skip(f"bundled tokenizer {name!r} unavailable: {e}")
    vocab = fusellm.tokenizer_vocab(tok)
    index: dict[str, int] = {}
    for i, s in enumerate(vocab):
        if s is not None and s not in index:
            index[s] = i
    return RealTokenizer(name, tok, vocab, fusellm.tokenizer_marker(vocab), index)


@pytest.fixture(scope="session")
def mistral() -> RealTokenizer:
    return _load("mistral")


@pytest.fixture(scope="session")
def qwen() -> RealTokenizer:
    return _load("qwen")


@pytest.fixture(scope="session")
def deepseek() -> RealTokenizer:
    return _load("deepseek")
