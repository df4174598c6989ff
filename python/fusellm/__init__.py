"""fusellm: knowledge fusion of large language models (FuseLLM), with a Rust core.

The CPU-heavy stages (MinED token alignment, vocabulary mapping, packing) run in the Rust
extension ``fusellm._native``; this package is the Python API around it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import _native
from ._lazy import lazy_getattr
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
from .errors import FuseLLMError, InputError, InputTypeError, LockedError, StaleArtifactError
from .pack import PackedBlocks, pack
from .tokenization import tokenizer_marker, tokenizer_vocab
from .vocab import VocabMap

if TYPE_CHECKING:
    from .config import PipelineConfig, load_config
    from .fuse import FusionCollator, build_packed_dataset, fusion_loss
    from .pipeline import run_pipeline
    from .report import write_report
    from .stages import (
        AlignReport,
        ExtractReport,
        PackReport,
        SplitStats,
        align_dataset,
        evaluate_perplexity,
        extract_topk,
        finalize_extract,
        pack_dataset,
        run_evaluate,
        run_split,
        run_vocab_map,
        split_texts,
    )
    from .train import FusionConfig, FusionTrainer, run_train

__version__: str = _native.__version__

# The stages need torch, transformers or datasets: import them only when one of these names is
# used.
_LAZY = {
    "ExtractReport": "stages",
    "SplitStats": "stages",
    "extract_topk": "stages",
    "finalize_extract": "stages",
    "run_split": "stages",
    "split_texts": "stages",
    "FusionCollator": "fuse",
    "FusionConfig": "train",
    "FusionTrainer": "train",
    "build_packed_dataset": "fuse",
    "fusion_loss": "fuse",
    "run_train": "train",
    "evaluate_perplexity": "stages",
    "run_evaluate": "stages",
    "write_report": "report",
    "AlignReport": "stages",
    "PackReport": "stages",
    "align_dataset": "stages",
    "pack_dataset": "stages",
    "run_vocab_map": "stages",
    "PipelineConfig": "config",
    "load_config": "config",
    "run_pipeline": "pipeline",
}


__getattr__ = lazy_getattr(__name__, _LAZY)


__all__ = [
    "EMPTY",
    "FALLBACK",
    "MASKED",
    "MATCHED",
    "AlignReport",
    "AlignedRow",
    "Aligner",
    "ExtractReport",
    "FuseLLMError",
    "FusionCollator",
    "FusionConfig",
    "FusionTrainer",
    "InputError",
    "InputTypeError",
    "LockedError",
    "PackReport",
    "PackedBlocks",
    "PipelineConfig",
    "SplitStats",
    "StaleArtifactError",
    "VocabMap",
    "__version__",
    "align_batch",
    "align_dataset",
    "build_packed_dataset",
    "evaluate_perplexity",
    "extract_topk",
    "finalize_extract",
    "fusion_loss",
    "load_config",
    "mined_base_to_blend",
    "pack",
    "pack_dataset",
    "run_evaluate",
    "run_pipeline",
    "run_split",
    "run_train",
    "run_vocab_map",
    "split_texts",
    "tokenizer_marker",
    "tokenizer_vocab",
    "write_report",
]
