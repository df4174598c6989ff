"""fusellm: knowledge fusion of large language models (FuseLLM), with a Rust core.

The CPU-heavy stages (MinED token alignment, vocabulary mapping, packing) run in the Rust
extension ``fusellm._native``; this package is the Python API around it.
"""

from __future__ import annotations

from . import _native
from .align import (
    EMPTY,
    FALLBACK,
    MASKED,
    MATCHED,
    AlignedRow,
    Aligner,
    align_batch,
    mined_base_to_blend,
)
from .errors import FuseLLMError, InputError, InputTypeError, StaleArtifactError
from .tokenization import tokenizer_marker, tokenizer_vocab

__version__: str = _native.__version__

__all__ = [
    "EMPTY",
    "FALLBACK",
    "MASKED",
    "MATCHED",
    "AlignedRow",
    "Aligner",
    "FuseLLMError",
    "InputError",
    "InputTypeError",
    "StaleArtifactError",
    "__version__",
    "align_batch",
    "mined_base_to_blend",
    "tokenizer_marker",
    "tokenizer_vocab",
]
