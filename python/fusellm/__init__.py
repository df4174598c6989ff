"""fusellm: knowledge fusion of large language models (FuseLLM), with a Rust core.

The CPU-heavy stages (MinED token alignment, vocabulary mapping, packing) run in the Rust
extension ``fusellm._native``; this package is the Python API around it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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
from .errors import FuseLLMError, InputError, InputTypeError, LockedError, StaleArtifactError
from .pack import PackedBlocks, pack
from .tokenization import tokenizer_marker, tokenizer_vocab
from .vocab import VocabMap

if TYPE_CHECKING:
    from .config import PipelineConfig, load_config
    from .evaluate import evaluate_perplexity, run_evaluate
    from .extract import ExtractReport, extract_topk, finalize_extract
    from .fuse import FusionCollator, build_packed_dataset, fusion_loss
    from .pipeline import run_pipeline
    from .report import write_report
    from .split import SplitStats, run_split, split_texts
    from .stages import AlignReport, PackReport, align_dataset, pack_dataset, run_vocab_map
    from .train import FusionConfig, FusionTrainer, run_train

__version__: str = _native.__version__

# The stages need torch, transformers or datasets: import them only when one of these names is
# used.
_LAZY = {
    "ExtractReport": "extract",
    "SplitStats": "split",
    "extract_topk": "extract",
    "finalize_extract": "extract",
    "run_split": "split",
    "split_texts": "split",
    "FusionCollator": "fuse",
    "FusionConfig": "train",
    "FusionTrainer": "train",
    "build_packed_dataset": "fuse",
    "fusion_loss": "fuse",
    "run_train": "train",
    "evaluate_perplexity": "evaluate",
    "run_evaluate": "evaluate",
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


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fusellm' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


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
