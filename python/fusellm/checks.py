"""Argument checks shared by the modules (one definition each, one wording of each error)."""

from __future__ import annotations

from typing import Any

from . import _native
from .errors import InputError

__all__ = ["MAX_THREADS", "check_num_threads"]

#: The largest thread count a batch runs on (``FUSELLM_NUM_THREADS`` is clamped to it).
MAX_THREADS: int = _native.MAX_THREADS


def check_num_threads(value: Any, name: str = "num_threads") -> int | None:
    """``value`` if it is ``None`` or an int in ``[1, MAX_THREADS]``; else :class:`InputError`."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_THREADS:
        raise InputError(f"{name} must be an int in [1, {MAX_THREADS}] or None, got {value!r}")
    return int(value)
