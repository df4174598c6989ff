"""A small built-in sample of English text (written for fusellm, no third-party text).

It mixes the things that make cross-tokenizer alignment hard: leading and repeated spaces,
numbers, punctuation runs, newlines, accented letters, an em dash, curly quotes and a few
non-Latin characters.
"""

from __future__ import annotations

__all__ = ["SAMPLE_TEXTS"]

SAMPLE_TEXTS: tuple[str, ...] = (
    "Knowledge fusion combines the strengths of several language models that were trained "
    "separately. Instead of averaging their weights, which only works when the architectures "
    "match, it asks each source model what it expects the next token to be, and teaches a "
    "target model to agree with the best of those predictions.",
    "The hard part is bookkeeping. Two tokenizers rarely cut a sentence in the same places: one "
    'writes "un" + "believ" + "able", the other "unbel" + "ievable". Before a '
    "distribution can be moved from one model to another, every position on one side must be "
    "paired with the position on the other side that predicts the same continuation.",
    "In 1850 the survey counted 3,417 households, 12 mills and 1 railway station; by 1900 the "
    "numbers had grown to 9,126, 31 and 4.\nA second line follows the first.\n\nA blank line "
    "separates paragraphs.",
    "Café owners in Zürich and Kraków served crème brûlée — and a naïve visitor asked for "
    "“another one, please”. The menu also listed 寿司 and Ελληνικά dishes.",
    "    Indented code keeps its spaces:\n    for i in range(10):\n        total += i * i\n"
    "and ends with a tab\tbefore the last word.",
    "Short.",
    "Why does the loss go down?! Because the student sees better targets... usually; sometimes "
    "it does not (see Table 3, rows 2-4).",
    "Vocabulary mapping pairs each token of the source vocabulary with the closest token of the "
    "target vocabulary, measured by edit distance over characters. Exact matches are common for "
    "frequent English words; rare pieces such as byte fragments fall back to their nearest "
    "neighbour.",
)
