"""Argument checks shared by the modules (one definition each, one wording of each error)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import _native
from .errors import InputError, InputTypeError

__all__ = ["MAX_THREADS", "check_marker", "check_num_threads", "check_text", "vocab_list"]

#: The largest thread count a batch runs on (``FUSELLM_NUM_THREADS`` is clamped to it).
MAX_THREADS: int = _native.MAX_THREADS


def check_num_threads(value: Any, name: str = "num_threads") -> int | None:
    """``value`` if it is ``None`` or an int in ``[1, MAX_THREADS]``; else :class:`InputError`."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_THREADS:
        raise InputError(f"{name} must be an int in [1, {MAX_THREADS}] or None, got {value!r}")
    return int(value)


def check_text(value: Any, name: str) -> str:
    """``value`` if it is a str that UTF-8 can encode (no lone surrogates), else an error."""
    if not isinstance(value, str):
        raise InputTypeError(f"{name} must be a str, got {type(value).__name__}")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InputError(
                f"{name} = {value!r} holds a lone surrogate ({e.reason} at {e.start}): not "
                "text that UTF-8 can encode"
            ) from None
    return value


def vocab_list(vocab: Any, name: str) -> list[str | None]:
    """A vocabulary as the string of every id in id order (``None`` for ids without one).

    A ``str`` (which would become one token per character), ``bytes`` or a mapping is refused,
    as is an item that is not a str (or None) or a str UTF-8 cannot encode."""
    if isinstance(vocab, (str, bytes, Mapping)) or not isinstance(vocab, (Sequence, np.ndarray)):
        raise InputTypeError(
            f"{name} must list the string of every id in id order (use fusellm.tokenizer_vocab "
            f"for a tokenizer), got {type(vocab).__name__}"
        )
    out = list(vocab)
    for i, s in enumerate(out):
        if s is None:
            continue
        if not isinstance(s, str):
            raise InputTypeError(f"{name}[{i}] must be a str or None, got {type(s).__name__}")
        if not s.isascii():
            check_text(s, f"{name}[{i}]")
    return out


def check_marker(marker: Any, name: str) -> str:
    """A tokenizer's word-boundary marker: a non-empty str UTF-8 can encode."""
    check_text(marker, name)
    if not marker:
        raise InputError(f'{name} is empty; use the tokenizer\'s marker ("▁" or "Ġ")')
    return marker
