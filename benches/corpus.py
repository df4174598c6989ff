"""Real English text for benchmarks: the Python Language Reference topics that every CPython
ships in ``pydoc_data`` (Python Software Foundation licence), cut into pieces of about
``tokens`` base tokens."""

from __future__ import annotations

import functools
from pydoc_data.topics import topics

import numpy as np

from fusellm.bundled import load_tokenizer


@functools.cache
def corpus_text() -> str:
    return "\n\n".join(topics[k] for k in sorted(topics))


def pieces(base: str, count: int, tokens: int = 2048) -> list[str]:
    """``count`` consecutive pieces of the corpus, each about ``tokens`` tokens of ``base``."""
    tok = load_tokenizer(base)
    text = corpus_text()
    out: list[str] = []
    pos = 0
    while len(out) < count:
        chunk = text[pos : pos + tokens * 8]
        if not chunk:
            pos = 0
            continue
        ids = tok(chunk, add_special_tokens=False)["input_ids"][:tokens]
        piece = tok.decode(ids)
        out.append(piece)
        pos += len(piece)
    return out


def encode(tok_name: str, texts: list[str]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    tok = load_tokenizer(tok_name)
    enc = tok(texts, add_special_tokens=False, return_offsets_mapping=True)
    ids = [np.asarray(x, dtype=np.int32) for x in enc["input_ids"]]
    offs = [np.asarray(x, dtype=np.int64).reshape(-1, 2) for x in enc["offset_mapping"]]
    return ids, offs


def random_topk(
    lengths: list[int], vocab: int, k: int = 10, seed: int = 0
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    ids = [rng.integers(0, vocab, (n, k)).astype(np.int32) for n in lengths]
    logits = [-np.sort(rng.random((n, k)), axis=1).astype(np.float32) for n in lengths]
    return ids, logits


def report(name: str, **figures: object) -> None:
    """Prints one line of figures (visible with -s, and kept in the benchmark's extra_info)."""
    parts = ", ".join(f"{k}={v}" for k, v in figures.items())
    print(f"\n[{name}] {parts}")
