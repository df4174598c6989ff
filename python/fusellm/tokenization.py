"""Helpers that read what the aligner needs from a tokenizer: its vocabulary strings and marker."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from .errors import InputError, InputTypeError

__all__ = [
    "BYTE_LEVEL_MARKER",
    "SPIECE_MARKER",
    "char_spans",
    "tokenizer_marker",
    "tokenizer_vocab",
]

#: Word-boundary marker of SentencePiece (Llama family) vocabularies.
SPIECE_MARKER = "▁"
#: Word-boundary marker of byte-level BPE vocabularies (GPT-2, NeoX, Qwen, DeepSeek).
BYTE_LEVEL_MARKER = "Ġ"


def tokenizer_vocab(tokenizer: Any) -> list[str | None]:
    """The raw string of every id of a Hugging Face tokenizer, in id order.

    Covers ``len(tokenizer)`` ids (added tokens included). Ids without a string are ``None``.
    """
    if not callable(getattr(tokenizer, "convert_ids_to_tokens", None)):
        raise InputTypeError(
            f"expected a Hugging Face tokenizer (with convert_ids_to_tokens), got "
            f"{type(tokenizer).__name__}"
        )
    n = len(tokenizer)
    toks = tokenizer.convert_ids_to_tokens(list(range(n)))
    return [t if isinstance(t, str) else None for t in toks]


def tokenizer_marker(tokenizer_or_vocab: Any) -> str:
    """Detects the word-boundary marker (``"▁"`` or ``"Ġ"``) from the vocabulary strings."""
    vocab = (
        tokenizer_or_vocab
        if isinstance(tokenizer_or_vocab, list)
        else tokenizer_vocab(tokenizer_or_vocab)
    )
    counts: Counter[str] = Counter()
    for s in vocab:
        if isinstance(s, str) and s:
            if s.startswith(SPIECE_MARKER):
                counts[SPIECE_MARKER] += 1
            elif s.startswith(BYTE_LEVEL_MARKER):
                counts[BYTE_LEVEL_MARKER] += 1
    if not counts:
        raise InputError("cannot detect the word-boundary marker: no token starts with ▁ or Ġ")
    return counts.most_common(1)[0][0]


def char_spans(text: str, offsets: Any, eos: str) -> np.ndarray:
    """``int64 [n, 2]`` character spans of the tokens of ``text + eos`` (a ``tokenizers``
    encoding's offsets). The appended EOS gets the span of one virtual character after the text
    on every side, so that the EOS positions of two tokenizers end at the same offset (the
    offsets alignment pairs tokens by their end)."""
    spans = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    if eos:
        n_chars = len(text)
        tail = spans[:, 1] > n_chars
        spans[tail, 0] = np.minimum(spans[tail, 0], n_chars)
        spans[tail, 1] = n_chars + 1
    return spans
