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


def realistic_topk(
    ids: list[np.ndarray], k: int = 10, seed: int = 0
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Top-K rows shaped like a language model's: the token that actually follows first, then
    K - 1 other tokens from the text's own vocabulary, taken around a Zipf-distributed frequency
    rank (frequent tokens dominate a model's top-K, which is what the look-up tables see); logits
    descending. Like the output of ``torch.topk``, a row holds K distinct ids."""
    rng = np.random.default_rng(seed)
    flat = np.concatenate(ids)
    vocab, counts = np.unique(flat, return_counts=True)
    by_freq = vocab[np.argsort(-counts, kind="stable")].astype(np.int32)
    span = len(by_freq) - k
    out_ids, out_logits = [], []
    for x in ids:
        n = len(x)
        nxt = np.append(x[1:], x[-1])
        start = np.minimum(rng.zipf(1.5, size=n) - 1, span - 1)
        window = by_freq[start[:, None] + np.arange(k)[None, :]]
        # K window ids, less the next token where the window holds it, else less the last one.
        drop = window == nxt[:, None]
        drop[~drop.any(axis=1), -1] = True
        rows = np.concatenate([nxt[:, None], window[~drop].reshape(n, k - 1)], axis=1)
        out_ids.append(rows.astype(np.int32))
        out_logits.append(-np.sort(rng.random((n, k)), axis=1).astype(np.float32) * 10)
    return out_ids, out_logits


def report(name: str, **figures: object) -> None:
    """Prints one line of figures (visible with -s, and kept in the benchmark's extra_info)."""
    parts = ", ".join(f"{k}={v}" for k, v in figures.items())
    print(f"\n[{name}] {parts}")
