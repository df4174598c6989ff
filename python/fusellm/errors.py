"""The exception hierarchy of fusellm, defined once.

Every error fusellm raises on purpose is a :class:`FuseLLMError`. Errors caused by bad input are
also ``ValueError`` (:class:`InputError`) or ``TypeError`` (:class:`InputTypeError`), so code that
already catches the builtin types keeps working. The Rust extension raises :class:`InputError`.
"""

from __future__ import annotations

__all__ = [
    "FuseLLMError",
    "InputError",
    "InputTypeError",
    "StaleArtifactError",
]


class FuseLLMError(Exception):
    """Base class of every error raised by fusellm."""


class InputError(FuseLLMError, ValueError):
    """An input value is invalid: wrong length, out-of-range id, NaN, malformed offsets, ..."""


class InputTypeError(FuseLLMError, TypeError):
    """An input has the wrong type, dtype or number of dimensions."""


class StaleArtifactError(FuseLLMError):
    """A saved artifact (vocabulary map, stage output) does not match the inputs it is used with."""


class LockedError(FuseLLMError):
    """A work directory or stage output is in use by another fusellm process (named in the
    message)."""
