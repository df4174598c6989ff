"""The dataset-level stages of the pipeline, one module each, in the order they run.

Each stage reads the previous stage's output from disk and writes its own, and has a command of
the same name (``fusellm <stage>``, its parser beside the stage's code):

1. :mod:`~fusellm.stages.split` (:func:`run_split`, :func:`split_texts`): documents cut into rows
   that fit ``block_size - margin`` tokens under every tokenizer.
2. :mod:`~fusellm.stages.extract` (:func:`extract_topk`): one model's top-K next-token
   distributions over every row, sharded and resumable shard by shard.
3. :mod:`~fusellm.stages.vocab_map` (:func:`run_vocab_map`): each source vocabulary mapped onto
   the target's.
4. :mod:`~fusellm.stages.align` (:func:`align_dataset`): every source's top-K re-expressed on
   the target's tokens.
5. :mod:`~fusellm.stages.pack` (:func:`pack_dataset`): the aligned rows packed into training
   blocks (the schema :mod:`fusellm.train` reads).
6. training (:mod:`fusellm.train`, not a dataset stage).
7. :mod:`~fusellm.stages.evaluate` (:func:`run_evaluate`): held-out perplexity and bits per
   byte; :mod:`~fusellm.stages.benchmark` (:func:`run_benchmarks`): lm-evaluation-harness tasks.

:mod:`fusellm.pipeline` (``fusellm run``) runs them all from one config. The in-memory kernels
the stages call (:class:`fusellm.Aligner`, :class:`fusellm.VocabMap`, :func:`fusellm.pack`) live
at the top level of the package. Each module is imported when one of its names is first used (the
stages import torch, datasets or the Rust extension inside the functions that need them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_getattr

if TYPE_CHECKING:
    from .align import AlignReport, align_dataset
    from .benchmark import run_benchmarks
    from .evaluate import evaluate_perplexity, run_evaluate
    from .extract import ExtractReport, extract_topk, finalize_extract
    from .pack import PackReport, pack_dataset
    from .split import SplitStats, run_split, split_texts
    from .vocab_map import run_vocab_map

#: Entry point -> its stage module.
_LAZY = {
    "SplitStats": "split",
    "run_split": "split",
    "split_texts": "split",
    "ExtractReport": "extract",
    "extract_topk": "extract",
    "finalize_extract": "extract",
    "run_vocab_map": "vocab_map",
    "AlignReport": "align",
    "align_dataset": "align",
    "PackReport": "pack",
    "pack_dataset": "pack",
    "evaluate_perplexity": "evaluate",
    "run_evaluate": "evaluate",
    "run_benchmarks": "benchmark",
}


__getattr__ = lazy_getattr(__name__, _LAZY)


__all__ = [
    "AlignReport",
    "ExtractReport",
    "PackReport",
    "SplitStats",
    "align_dataset",
    "evaluate_perplexity",
    "extract_topk",
    "finalize_extract",
    "pack_dataset",
    "run_benchmarks",
    "run_evaluate",
    "run_split",
    "run_vocab_map",
    "split_texts",
]
