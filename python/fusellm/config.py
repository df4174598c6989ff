"""The configuration of ``fusellm run``: one YAML file for the whole pipeline.

A config names the target model, any number of source models (local directories), the training
and held-out data, and each stage's settings. Every field is a dataclass field with help text
(:func:`describe_config` prints them all). Loading goes in three steps, all before any work:

1. the preset: ``preset: improved`` (the default) or ``preset: reference`` supplies the stage
   settings the file does not give (:data:`PRESETS`); the file wins key by key, an explicit
   ``null`` included;
2. :meth:`PipelineConfig.from_dict`: unknown keys (with a close-match suggestion), wrong types,
   values outside their choices or ranges, duplicate or reserved names, and ``train`` fields that
   are not :class:`fusellm.FusionConfig` fields, each a :class:`ConfigError` naming the key
   (``sources[1].path``) and the problem;
3. :func:`validate_config` checks the file system: the model directories exist and hold a
   ``config.json``, every tokenizer loads (a fast tokenizer with an EOS token), ``block_size``
   fits every model's context, the data paths exist, and the ``train`` settings build a
   :class:`fusellm.FusionConfig`.

Relative paths in a file are relative to the file's directory. :meth:`PipelineConfig.to_dict`
gives the resolved config (preset applied, paths absolute), which the pipeline saves as
``<workdir>/config.yaml``.

The two presets:

- ``reference``: the published FuseLLM setting: K = 10, T = 1, λ = 0.9, MinCE, blocks of 2048,
  the reference split (id chunks of the longest tokenization, decoded), the MinED ("default")
  vocabulary map, MinED DTW alignment with the soft (MinED-map) rule and the reference's rows
  (``compat: fusellm``: one-hot fallback on the current token, duplicates keep the max logit),
  per-token CE scores, raw top-K logits renormalised over each row, lr 1e-5 with Adam betas
  (0.9, 0.95), a cosine schedule and 0.8% warm-up, one epoch (the published training command;
  its shipped DeepSpeed file silently ran (0.9, 0.999) and a linear decay instead).
- ``improved`` (default): the same K, T, λ, MinCE and block size with fusellm's fixes: word-
  boundary split, surface-string vocabulary map (MinED only as a fallback), character-offset
  alignment, next-token fallback rows and probability merging, CE per byte of text as the
  block score (spec section 8).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .checks import MAX_THREADS
from .errors import FuseLLMError, InputError

__all__ = [
    "PRESETS",
    "AlignSettings",
    "ConfigError",
    "DataSpec",
    "EvaluateSettings",
    "ExtractSettings",
    "ModelSpec",
    "PackSettings",
    "PipelineConfig",
    "SplitSettings",
    "TrainSettings",
    "VocabMapSettings",
    "describe_config",
    "load_config",
    "validate_config",
]


class ConfigError(InputError):
    """A pipeline configuration is invalid.

    Attributes:
        key: the offending entry, dotted with list indices (``"sources[1].path"``).
        problem: what is wrong with it.
        source: the config file, when there is one.
    """

    def __init__(self, key: str, problem: str, *, source: str | None = None) -> None:
        self.key = key
        self.problem = problem
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}config key {key!r}: {problem}")


#: Model names: they prefix the packed data's column names (``{name}_ids``).
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
#: Names a source may not take: the target's own candidate and the packed schema's prefixes.
_RESERVED_NAMES = ("ref", "input", "position", "labels", "attention")
#: FusionConfig fields the pipeline sets itself.
_MANAGED_TRAIN_FIELDS = {
    "output_dir": "the pipeline trains into <workdir>/train/<run>",
    "resume_from_checkpoint": "the pipeline resumes from the newest complete checkpoint itself",
    "sources": "the pipeline takes the source names from the top-level `sources` list",
    "seed": "use the top-level `seeds` list (or --seeds)",
    "data_seed": "use the top-level `seeds` list (or --seeds)",
    "overwrite_output_dir": "the pipeline decides what to redo from the stage manifests",
}


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


# --- the sections --------------------------------------------------------------------------------


@dataclass
class ModelSpec:
    """A model of the fusion: the target, or one source."""

    name: str = field(
        metadata=_help(
            "Name of the model in the stage directories (extract/<name>) and, for a source, the "
            "prefix of its columns in the packed data: lower-case letters, digits and '_', "
            "starting with a letter; not 'ref'."
        )
    )
    path: str = field(
        metadata=_help("Local model directory (config.json and weights, save_pretrained layout).")
    )
    tokenizer: str | None = field(
        default=None,
        metadata=_help("Tokenizer directory, when it is not saved in the model directory."),
    )
    domain: str | None = field(
        default=None,
        metadata=_help(
            "The domain the model was trained on (a value of the held-out data's domain column): "
            "the report shows each source's perplexity on its own domain."
        ),
    )

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.path


@dataclass
class DataSpec:
    """The documents."""

    train: str = field(
        metadata=_help(
            "Documents for fusion training: a save_to_disk directory, a JSONL / JSON / Parquet / "
            "Arrow file, or a directory of text files."
        )
    )
    heldout: str | None = field(
        default=None,
        metadata=_help(
            "Held-out documents for the perplexity evaluation (same formats); unset: no evaluation."
        ),
    )
    text_column: str = field(default="text", metadata=_help("Column holding the documents."))
    domain_column: str | None = field(
        default="domain",
        metadata=_help(
            "Column naming each held-out document's domain (perplexity per domain); may be absent "
            "from the data when left at 'domain'."
        ),
    )


@dataclass
class SplitSettings:
    """Stage 1: split documents into rows that fit every tokenizer."""

    margin: int = field(
        default=48,
        metadata=_help("Rows hold at most block_size - margin tokens under every tokenizer."),
    )
    boundary: Literal["word", "sentence", "token", "reference"] = field(
        default="word",
        metadata=_help(
            "Where a long document is cut: word, sentence, token, or reference (the reference "
            "pipeline's decoded id chunks; preset reference)."
        ),
    )
    max_backoff: float = field(
        default=0.25,
        metadata=_help("How far back (a fraction of the chunk) a cut may move to a boundary."),
    )
    batch_size: int = field(default=1000, metadata=_help("Documents per tokenizer batch."))


@dataclass
class ExtractSettings:
    """Stage 2: every model's top-K next-token distributions."""

    top_k: int = field(default=10, metadata=_help("K, the logits kept per position (paper: 10)."))
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = field(
        default="auto",
        metadata=_help("Forward-pass dtype: auto = bfloat16 on CUDA, float32 on the CPU."),
    )
    device: str | None = field(
        default=None, metadata=_help("Torch device (default: CUDA when available, else the CPU).")
    )
    attn_implementation: str | None = field(
        default=None, metadata=_help("Attention kernel (default: flash_attention_2 if importable).")
    )
    per_step_ce: bool = field(
        default=False, metadata=_help("Also store every position's cross-entropy.")
    )
    values: Literal["logprobs", "logits"] = field(
        default="logprobs",
        metadata=_help(
            "What the top-K values are: exact log-probabilities, which keep the teacher's true "
            "mass for the calibrated loss (improved), or raw logits (reference)."
        ),
    )
    rows_per_shard: int = field(
        default=2048, metadata=_help("Rows per output shard (the unit of resumption).")
    )
    max_tokens_per_batch: int = field(
        default=16384, metadata=_help("Padded tokens per forward pass.")
    )
    max_batch_size: int = field(default=256, metadata=_help("Rows per forward pass."))
    compression: Literal["lz4", "zstd"] | None = field(
        default="lz4",
        metadata=_help("Shard compression: lz4 (fast to read back), zstd (smaller) or null."),
    )


@dataclass
class VocabMapSettings:
    """Stage 3a: each source vocabulary mapped onto the target's."""

    method: Literal["surface", "mined", "exact"] = field(
        default="surface",
        metadata=_help(
            "surface: same decoded bytes first, MinED as a fallback (improved); mined: the "
            "reference's nearest string by edit distance; exact: marker-swapped equality only."
        ),
    )
    num_threads: int | None = field(
        default=None, metadata=_help("Threads (default: the top-level num_threads, else all).")
    )
    max_distance: int | None = field(
        default=None,
        metadata=_help(
            "Leave unmapped the source tokens whose nearest target string is more edits away "
            "(their probability goes to the row's tail); null: no cap."
        ),
    )


@dataclass
class AlignSettings:
    """Stage 3b: the sources' distributions re-expressed on the target's tokens."""

    method: Literal["offsets", "mined"] = field(
        default="offsets",
        metadata=_help(
            "offsets: pair tokens that end at the same character (improved); mined: the "
            "reference's MinED dynamic time warping."
        ),
    )
    vocab: Literal["hard", "soft"] = field(
        default="soft",
        metadata=_help(
            "hard: a top-K token is kept only if its string is a target token; soft: through the "
            "vocabulary map (the reference's MinED rule)."
        ),
    )
    compat: Literal["fusellm"] | None = field(
        default=None,
        metadata=_help(
            "fusellm: the reference's rows exactly (current-token fallback, duplicates keep the "
            "max logit); null: fusellm's fixes."
        ),
    )
    fallback: Literal["next", "mask"] = field(
        default="next",
        metadata=_help(
            "Unmatched positions without compat: one-hot on the NEXT target token, or masked."
        ),
    )
    num_threads: int | None = field(
        default=None,
        metadata=_help(
            "Threads of the aligner, and shards aligned at once (default: the top-level "
            "num_threads, else all)."
        ),
    )
    rows_per_batch: int = field(
        default=256, metadata=_help("Rows aligned per batch, and per output shard.")
    )
    logits_dtype: Literal["float16", "float32"] = field(
        default="float16",
        metadata=_help("dtype of the aligned logits (extraction stores float16)."),
    )
    compression: Literal["lz4", "zstd"] | None = field(
        default="lz4",
        metadata=_help("Shard compression: lz4 (fast to read back), zstd (smaller) or null."),
    )


@dataclass
class PackSettings:
    """Stage 4: aligned rows packed into training blocks of block_size tokens."""

    mode: Literal["concat", "bfd"] = field(
        default="concat",
        metadata=_help(
            "concat: rows concatenated and cut (the reference); bfd: best-fit bins that never "
            "split a row, with position ids restarting per document."
        ),
    )
    layout: Literal["copy", "plan"] = field(
        default="plan",
        metadata=_help(
            "copy: every block's tokens and teacher rows written out; plan: only where each "
            "block's pieces are in the aligned data (and its scores), which training reads "
            "from there (no second copy of the data; the aligned data must stay in place)."
        ),
    )
    nan_rows: Literal["exclude", "propagate"] = field(
        default="exclude",
        metadata=_help(
            "Rows without a scored token (one token: CE 0/0): left out of every candidate's "
            "block scores (exclude), or NaN reaching the scores as in the reference (propagate; "
            "the trainer refuses NaN scores)."
        ),
    )
    compat: Literal["fusellm"] | None = field(
        default=None,
        metadata=_help(
            "fusellm: the reference's block boundaries (rows concatenated and cut in groups of "
            "1000, each group's remainder kept as a short block, as its datasets.map batches "
            "do); null: one concatenation across the dataset."
        ),
    )
    chunk_tokens: int = field(
        default=1 << 21,
        metadata=_help(
            "Tokens packed at a time (a memory bound; concat blocks do not depend on it, bfd "
            "bins are formed within a chunk)."
        ),
    )
    compression: Literal["lz4", "zstd"] | None = field(
        default="lz4",
        metadata=_help("Shard compression: lz4 (fast to read back), zstd (smaller) or null."),
    )


@dataclass
class TrainSettings:
    """Stage 5: continual training of the target (fusion run, and its CLM control).

    Besides the run plan (``control``, ``kd_baselines``, ``sweep_lm_loss_weight``), every key is
    a :class:`fusellm.FusionConfig` (``TrainingArguments``) field, except those the pipeline sets
    itself (``output_dir``, ``seed``, ``sources``, ``resume_from_checkpoint``).
    """

    control: bool = field(
        default=True,
        metadata=_help(
            "Also train the CLM control: the same trainer, data, steps and seed with the fusion "
            "term off (lm_loss_weight = 1), run 'clm' beside 'fused'."
        ),
    )
    kd_baselines: bool = field(
        default=False,
        metadata=_help(
            "Also train one knowledge-distillation baseline per source, 'kd-<source>': the same "
            "trainer, data, steps, seed and lm_loss_weight, distilling that source alone on every "
            "block (no ref, nothing to select, combine: hard), as the paper compares FuseLLM "
            "with single-teacher KD."
        ),
    )
    sweep_lm_loss_weight: list[float] = field(
        default_factory=list,
        metadata=_help(
            "Also train a fused run per value of lm_loss_weight, 'fused-lmw<value>' (the fusion "
            "weight is 1 - value, combine: hard), every other setting unchanged: a sweep of the "
            "fusion weight."
        ),
    )
    args: dict[str, Any] = field(
        default_factory=dict,
        metadata=_help("FusionConfig / TrainingArguments fields (written inline under train)."),
    )


@dataclass
class EvaluateSettings:
    """Stage 6: held-out perplexity and bits per byte, per domain; benchmark tasks."""

    enabled: bool = field(
        default=True,
        metadata=_help(
            "Evaluate: perplexity (needs data.heldout; skipped with a log line without it), then "
            "the benchmark tasks."
        ),
    )
    sources: bool = field(
        default=True, metadata=_help("Also evaluate every source model (on its own domain).")
    )
    max_length: int | None = field(
        default=None, metadata=_help("Tokens per window (default: the block size).")
    )
    stride: int | None = field(
        default=None, metadata=_help("Tokens between window starts (default: max_length - 1).")
    )
    batch_size: int = field(default=8, metadata=_help("Windows per forward pass."))
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata=_help("Evaluation dtype (auto: float32 on the CPU).")
    )
    device: str | None = field(default=None, metadata=_help("Torch device."))
    tasks: list[str] = field(
        default_factory=list,
        metadata=_help(
            "Benchmark tasks of lm-evaluation-harness (pip install 'fusellm[eval]'), run on every "
            "evaluated model after perplexity: registry names (arc_challenge, mmlu, ...: their "
            "data sets are downloaded) or local tasks found under include_path; NAME:N gives a "
            "task N few-shot examples. Results in evaluate/benchmarks/. Empty: no benchmark."
        ),
    )
    num_fewshot: int | None = field(
        default=None,
        metadata=_help(
            "Few-shot examples of the benchmark tasks not given as NAME:N (default: each task's "
            "own, else 0)."
        ),
    )
    limit: int | None = field(
        default=None,
        metadata=_help("At most this many items per benchmark task (its first; default: all)."),
    )
    include_path: list[str] = field(
        default_factory=list,
        metadata=_help(
            "Directories of local lm-evaluation-harness task YAML files (relative to the config)."
        ),
    )
    tasks_batch_size: int = field(
        default=32,
        metadata=_help(
            "Requests (a context and one answer) per forward pass of the benchmark tasks."
        ),
    )

    def __post_init__(self) -> None:
        for key, minimum in (("num_fewshot", 0), ("limit", 1), ("tasks_batch_size", 1)):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"evaluate.{key}", f"must be an integer, got {value!r}")
            if value is not None and value < minimum:
                raise ConfigError(f"evaluate.{key}", f"must be at least {minimum}, got {value}")
        if self.tasks:
            from .stages.benchmark import parse_task_specs

            try:
                parse_task_specs(self.tasks)
            except InputError as e:
                raise ConfigError("evaluate.tasks", str(e)) from None


@dataclass
class PipelineConfig:
    """The whole pipeline (``fusellm run CONFIG.yaml``)."""

    target: ModelSpec = field(
        metadata=_help(
            "The target ('base') model, continually trained; its name defaults to 'target'."
        ),
    )
    sources: list[ModelSpec] = field(
        metadata=_help("The source ('blend') models, any number (at least one), in order."),
    )
    data: DataSpec = field(metadata=_help("The documents."))
    preset: Literal["improved", "reference"] = field(
        default="improved",
        metadata=_help(
            "Stage settings the file does not give: 'improved' (fusellm's fixes) or 'reference' "
            "(the published pipeline)."
        ),
    )
    block_size: int = field(
        default=2048,
        metadata=_help(
            "Tokens per training block (paper: 2048); rows are split to block_size - margin; "
            "must not exceed any model's context."
        ),
    )
    seeds: list[int] = field(
        default_factory=lambda: [0],
        metadata=_help(
            "Training seeds: runs 'fused' and 'clm' use the first, 'fused-seed<N>' and "
            "'clm-seed<N>' the others."
        ),
    )
    num_threads: int | None = field(
        default=None,
        metadata=_help(
            "CPU threads for torch and the Rust stages (results are reproducible for a fixed "
            "count); default: all cores."
        ),
    )
    workdir: str | None = field(
        default=None,
        metadata=_help("Working directory (default: ./fusellm-run; --workdir wins)."),
    )
    split: SplitSettings = field(default_factory=SplitSettings, metadata=_help("Stage 1."))
    extract: ExtractSettings = field(default_factory=ExtractSettings, metadata=_help("Stage 2."))
    vocab_map: VocabMapSettings = field(
        default_factory=VocabMapSettings, metadata=_help("Stage 3a.")
    )
    align: AlignSettings = field(default_factory=AlignSettings, metadata=_help("Stage 3b."))
    pack: PackSettings = field(default_factory=PackSettings, metadata=_help("Stage 4."))
    train: TrainSettings = field(default_factory=TrainSettings, metadata=_help("Stage 5."))
    evaluate: EvaluateSettings = field(default_factory=EvaluateSettings, metadata=_help("Stage 6."))

    # -- construction ----------------------------------------------------------------------------

    @classmethod
    def from_dict(
        cls,
        raw: Mapping[str, Any],
        *,
        preset: str | None = None,
        base_dir: str | os.PathLike[str] | None = None,
        source: str | None = None,
    ) -> PipelineConfig:
        """Builds a config from a mapping (a parsed YAML file), preset applied, checked.

        Args:
            raw: the mapping.
            preset: overrides the mapping's ``preset`` key.
            base_dir: relative paths are resolved against it (default: the current directory).
            source: the file name, for error messages.
        """
        try:
            return _build(raw, preset=preset, base_dir=base_dir)
        except ConfigError as e:
            if source and not e.source:
                raise ConfigError(e.key, e.problem, source=source) from None
            raise

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data (the ``train`` args inline under ``train``)."""
        out = dataclasses.asdict(self)
        train = out.pop("train")
        args = train.pop("args")
        out["train"] = {**train, **args}
        return out

    def to_yaml(self) -> str:
        """The resolved config as YAML (``load_config`` reads it back to an equal config)."""
        import yaml

        header = "# fusellm run: resolved configuration (preset applied, paths absolute)\n"
        return header + yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    @property
    def models(self) -> list[ModelSpec]:
        """The target, then the sources."""
        return [self.target, *self.sources]

    @property
    def source_names(self) -> list[str]:
        return [s.name for s in self.sources]


# --- presets -------------------------------------------------------------------------------------

#: Preset name -> the settings it supplies (a partial config; the file's keys win).
PRESETS: dict[str, dict[str, Any]] = {
    "improved": {
        "block_size": 2048,
        "split": {"boundary": "word"},
        "extract": {"top_k": 10, "values": "logprobs"},
        "vocab_map": {"method": "surface"},
        "align": {"method": "offsets", "vocab": "soft", "compat": None, "fallback": "next"},
        "pack": {"mode": "concat"},
        "train": {
            "fusion": "mince",
            "combine": "hard",
            "lm_loss_weight": 0.9,
            "teacher_temperature": 1.0,
            "score": "ce_per_byte",
            "learning_rate": 1.0e-5,
            "lr_scheduler_type": "cosine",
            "warmup_steps": 0.008,
            "num_train_epochs": 1,
            "weight_decay": 0.0,
            "report_to": "none",
            "save_strategy": "steps",
            "save_steps": 500,
            "save_total_limit": 2,
        },
    },
    "reference": {
        "block_size": 2048,
        "split": {"boundary": "reference"},
        "extract": {"top_k": 10, "values": "logits"},
        "vocab_map": {"method": "mined"},
        "align": {"method": "mined", "vocab": "soft", "compat": "fusellm", "fallback": "next"},
        "pack": {"mode": "concat"},
        "train": {
            "fusion": "mince",
            "combine": "hard",
            "lm_loss_weight": 0.9,
            "teacher_temperature": 1.0,
            "compat": "fusellm",
            "score": "ce",
            "learning_rate": 1.0e-5,
            # The published command's betas; its DeepSpeed file ran DeepSpeed's (0.9, 0.999).
            "adam_beta1": 0.9,
            "adam_beta2": 0.95,
            "lr_scheduler_type": "cosine",
            "warmup_steps": 0.008,
            "num_train_epochs": 1,
            "weight_decay": 0.0,
            "report_to": "none",
            "save_strategy": "steps",
            "save_steps": 500,
            "save_total_limit": 2,
        },
    },
}


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` applied on ``base`` key by key (mappings merged recursively)."""
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


# --- type checking -------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return f"list of {_type_name(inner)}"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _describe(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against the annotation ``tp`` (numbers from strings like ``1e-5``)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(key, f"must be {_type_name(tp)}, got null")
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(key, f"must be {_type_name(tp)}, got {_describe(value)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                key,
                f"must be one of {', '.join(json.dumps(c) for c in choices)}, got "
                f"{_describe(value)}{hint}",
            )
        return value
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"must be a list, got {_describe(value)}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"must be a mapping, got {_describe(value)}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, key)  # type: ignore[arg-type]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"must be true or false, got {_describe(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(key, f"must be an integer, got {_describe(value)}")
    if tp is float:
        if isinstance(value, int) and not isinstance(value, bool):
            return value  # an int stays one (TrainingArguments reads 2 and 0.5 differently)
        if isinstance(value, float):
            return value
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(key, f"must be a number, got {_describe(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(key, f"must be a string, got {_describe(value)}")
    raise ConfigError(key, f"unsupported type {_type_name(tp)}")  # pragma: no cover


def _unknown(key_prefix: str, unknown: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(unknown, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(
        f"{key_prefix}{unknown}", f"unknown key (known keys: {', '.join(known)}){hint}"
    )


def _build_dataclass(cls: type, value: Any, key: str) -> Any:
    if not isinstance(value, Mapping):
        raise ConfigError(key or "(top level)", f"must be a mapping, got {_describe(value)}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    prefix = f"{key}." if key else ""
    for k in value:
        if not isinstance(k, str):
            raise ConfigError(f"{prefix}{k}", "keys must be strings")
        if k not in known:
            raise _unknown(prefix, k, known)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.name in value:
            kwargs[f.name] = _coerce(value[f.name], hints[f.name], f"{prefix}{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix}{f.name}", f"is required ({f.metadata.get('help', '')})")
    return cls(**kwargs)


# --- building and checking -----------------------------------------------------------------------


def _fusion_fields() -> dict[str, Any]:
    """FusionConfig's init fields and their types (imports torch and transformers)."""
    from .train import FusionConfig

    hints = typing.get_type_hints(FusionConfig)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(FusionConfig) if f.init}


def _simple_train_value(name: str, value: Any, tp: Any) -> Any:
    """Checks a FusionConfig value whose type is simple (bool, int, float, str, Literal, their
    optional forms); other types are left to FusionConfig itself."""
    simple = {bool, int, float, str, type(None)}
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else ()
    members = args or (tp,)
    if all(a in simple or typing.get_origin(a) is Literal for a in members):
        return _coerce(value, tp, f"train.{name}")
    return value


def _build(
    raw: Mapping[str, Any], *, preset: str | None, base_dir: str | os.PathLike[str] | None
) -> PipelineConfig:
    if not isinstance(raw, Mapping):
        raise ConfigError("(top level)", f"must be a mapping of keys, got {_describe(raw)}")
    chosen = preset if preset is not None else raw.get("preset", "improved")
    if chosen not in PRESETS:
        raise ConfigError(
            "preset", f"must be one of {', '.join(map(repr, PRESETS))}, got {_describe(chosen)}"
        )
    merged = _merge(PRESETS[chosen], raw)
    merged["preset"] = chosen
    for section in ("target", "data"):
        if section not in merged:
            raise ConfigError(section, "is required")
    if "sources" not in merged:
        raise ConfigError("sources", "is required: at least one source model")
    if isinstance(merged.get("target"), Mapping) and "name" not in merged["target"]:
        merged["target"] = {"name": "target", **merged["target"]}
    train_raw = merged.pop("train", None) or {}
    if not isinstance(train_raw, Mapping):
        raise ConfigError("train", f"must be a mapping, got {_describe(train_raw)}")
    config: PipelineConfig = _build_dataclass(PipelineConfig, merged, "")
    config.train = _build_train(train_raw)
    _check_values(config)
    _resolve_paths(config, Path(base_dir) if base_dir is not None else Path.cwd())
    return config


def _build_train(raw: Mapping[str, Any]) -> TrainSettings:
    hints = typing.get_type_hints(TrainSettings)
    plan_keys = [f.name for f in dataclasses.fields(TrainSettings) if f.name != "args"]
    plan = {k: _coerce(raw[k], hints[k], f"train.{k}") for k in plan_keys if k in raw}
    for i, w in enumerate(plan.get("sweep_lm_loss_weight", [])):
        if not 0.0 <= w <= 1.0:
            raise ConfigError(f"train.sweep_lm_loss_weight[{i}]", f"must be in [0, 1], got {w}")
    fusion_fields = _fusion_fields()
    args: dict[str, Any] = {}
    for k, v in raw.items():
        if k in plan_keys:
            continue
        if k in _MANAGED_TRAIN_FIELDS:
            raise ConfigError(f"train.{k}", f"is set by the pipeline: {_MANAGED_TRAIN_FIELDS[k]}")
        if k not in fusion_fields:
            known = [*plan_keys, *sorted(set(fusion_fields) - set(_MANAGED_TRAIN_FIELDS))]
            close = difflib.get_close_matches(k, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"train.{k}",
                f"unknown key: not one of {plan_keys} nor a FusionConfig / TrainingArguments "
                f"field (see `fusellm train --help`){hint}",
            )
        args[k] = _simple_train_value(k, v, fusion_fields[k])
    return TrainSettings(**plan, args=args)


def _positive(key: str, value: int | None, *, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if value is None or value < 1:
        raise ConfigError(key, f"must be a positive integer, got {_describe(value)}")


def _check_name(key: str, name: str) -> None:
    if not _NAME.match(name):
        raise ConfigError(
            key,
            f"{name!r} is not a usable name: lower-case letters, digits and '_', "
            "starting with a letter",
        )
    if name in _RESERVED_NAMES:
        raise ConfigError(key, f"{name!r} is reserved (the packed data's own column prefixes)")


def _check_values(c: PipelineConfig) -> None:
    _check_name("target.name", c.target.name)
    if not c.sources:
        raise ConfigError("sources", "needs at least one source model")
    seen = {c.target.name: "target.name"}
    for i, s in enumerate(c.sources):
        _check_name(f"sources[{i}].name", s.name)
        if s.name in seen:
            raise ConfigError(f"sources[{i}].name", f"{s.name!r} is already used by {seen[s.name]}")
        seen[s.name] = f"sources[{i}].name"
    if c.block_size < 64:
        raise ConfigError("block_size", f"must be at least 64, got {c.block_size}")
    if c.split.margin < 0 or c.block_size - c.split.margin < 16:
        raise ConfigError(
            "split.margin",
            f"must be >= 0 and leave at least 16 tokens per row (block_size {c.block_size})",
        )
    if not 0.0 <= c.split.max_backoff < 1.0:
        raise ConfigError("split.max_backoff", f"must be in [0, 1), got {c.split.max_backoff}")
    _positive("split.batch_size", c.split.batch_size, allow_none=False)
    _positive("extract.top_k", c.extract.top_k, allow_none=False)
    _positive("extract.rows_per_shard", c.extract.rows_per_shard, allow_none=False)
    _positive("extract.max_tokens_per_batch", c.extract.max_tokens_per_batch, allow_none=False)
    _positive("extract.max_batch_size", c.extract.max_batch_size, allow_none=False)
    if c.extract.max_tokens_per_batch < c.block_size:
        raise ConfigError(
            "extract.max_tokens_per_batch",
            f"{c.extract.max_tokens_per_batch} cannot hold one row of up to block_size "
            f"{c.block_size} tokens",
        )
    for key, value in (
        ("num_threads", c.num_threads),
        ("vocab_map.num_threads", c.vocab_map.num_threads),
        ("align.num_threads", c.align.num_threads),
    ):
        _positive(key, value)
        if value is not None and value > MAX_THREADS:
            raise ConfigError(
                key, f"must be at most {MAX_THREADS} (or null: all cores), got {value}"
            )
    _positive("align.rows_per_batch", c.align.rows_per_batch, allow_none=False)
    if not c.seeds:
        raise ConfigError("seeds", "needs at least one seed")
    for i, seed in enumerate(c.seeds):
        if seed < 0:
            raise ConfigError(f"seeds[{i}]", f"must be >= 0, got {seed}")
    if len(set(c.seeds)) != len(c.seeds):
        raise ConfigError("seeds", f"has duplicates: {c.seeds}")
    _positive("evaluate.max_length", c.evaluate.max_length)
    _positive("evaluate.batch_size", c.evaluate.batch_size, allow_none=False)
    if c.evaluate.stride is not None:
        limit = c.evaluate.max_length or c.block_size
        if not 1 <= c.evaluate.stride < limit:
            raise ConfigError(
                "evaluate.stride", f"must be in [1, {limit - 1}], got {c.evaluate.stride}"
            )
    if c.evaluate.max_length is not None and c.evaluate.max_length < 2:
        raise ConfigError("evaluate.max_length", "must be at least 2")
    lam = c.train.args.get("lm_loss_weight")
    if isinstance(lam, float) and not 0.0 <= lam <= 1.0:
        raise ConfigError("train.lm_loss_weight", f"must be in [0, 1], got {lam}")
    temp = c.train.args.get("teacher_temperature")
    if isinstance(temp, float) and not (temp > 0 and math.isfinite(temp)):
        raise ConfigError("train.teacher_temperature", f"must be > 0, got {temp}")


def _resolve_paths(c: PipelineConfig, base: Path) -> None:
    def res(p: str | None) -> str | None:
        if p is None:
            return None
        q = Path(os.path.expanduser(p))
        return str(q if q.is_absolute() else (base / q).resolve())

    for m in c.models:
        m.path = res(m.path)  # type: ignore[assignment]
        m.tokenizer = res(m.tokenizer)
    c.data.train = res(c.data.train)  # type: ignore[assignment]
    c.data.heldout = res(c.data.heldout)
    c.workdir = res(c.workdir)
    c.evaluate.include_path = [str(res(p)) for p in c.evaluate.include_path]
    for k in ("deepspeed", "logging_dir"):
        v = c.train.args.get(k)
        if isinstance(v, str) and (os.sep in v or v.endswith(".json")):
            c.train.args[k] = res(v)


def load_config(
    source: str | os.PathLike[str] | Mapping[str, Any], *, preset: str | None = None
) -> PipelineConfig:
    """Reads a YAML config file (or a mapping) and returns the checked :class:`PipelineConfig`.

    ``preset`` overrides the file's ``preset`` key. Raises :class:`ConfigError` naming the key
    (file-system checks are :func:`validate_config`'s).
    """
    if isinstance(source, Mapping):
        return PipelineConfig.from_dict(source, preset=preset)
    path = Path(source)
    if not path.is_file():
        raise ConfigError("(file)", f"config file {str(path)!r} does not exist")
    import yaml

    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError("(file)", f"is not valid YAML: {e}", source=str(path)) from None
    if raw is None:
        raise ConfigError("(file)", "is empty", source=str(path))
    return PipelineConfig.from_dict(
        raw, preset=preset, base_dir=path.resolve().parent, source=str(path)
    )


# --- file-system checks --------------------------------------------------------------------------

#: Config attributes giving a model's context length, in order of preference.
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def model_context(model_config: Any) -> int | None:
    """A model configuration's context length, or None if it does not say."""
    cfg = model_config.get_text_config() if hasattr(model_config, "get_text_config") else None
    for c in (cfg, model_config):
        if c is None:
            continue
        for k in _CONTEXT_KEYS:
            v = getattr(c, k, None)
            if isinstance(v, int) and v > 0:
                return v
    return None


#: The files a model directory holds its weights in (save_pretrained layouts, sharded or not).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
WEIGHT_FILES = ("model*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json")


def _check_model(key: str, spec: ModelSpec, block_size: int) -> dict[str, Any]:
    path = Path(spec.path)
    if not path.exists():
        raise ConfigError(f"{key}.path", f"model directory {str(path)!r} does not exist")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ConfigError(
            f"{key}.path", f"{str(path)!r} is not a model directory (no config.json in it)"
        )
    if not any(any(path.glob(pattern)) for pattern in WEIGHT_FILES):
        raise ConfigError(
            f"{key}.path",
            f"{str(path)!r} holds no model weights (none of {', '.join(WEIGHT_FILES)})",
        )
    from transformers import AutoConfig, AutoTokenizer

    try:
        model_config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise ConfigError(
            f"{key}.path", f"cannot read the model configuration in {str(path)!r}: {e}"
        ) from None
    ctx = model_context(model_config)
    if ctx is not None and block_size > ctx:
        raise ConfigError(
            "block_size",
            f"{block_size} is larger than the context of {key} ({spec.name}: {ctx} positions)",
        )
    tok_key = f"{key}.tokenizer" if spec.tokenizer else f"{key}.path"
    tok_path = Path(spec.tokenizer_path)
    if not tok_path.exists():
        raise ConfigError(tok_key, f"tokenizer directory {str(tok_path)!r} does not exist")
    if not any((tok_path / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(
            tok_key,
            f"{str(tok_path)!r} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
            "save it there or give the model's `tokenizer` directory",
        )
    try:
        tok = AutoTokenizer.from_pretrained(str(tok_path), local_files_only=True)
    except Exception as e:
        reason = " ".join(str(e).split())  # transformers' messages span several lines
        raise ConfigError(
            tok_key, f"cannot load a tokenizer from {str(tok_path)!r}: {type(e).__name__}: {reason}"
        ) from None
    if getattr(tok, "backend_tokenizer", None) is None:
        raise ConfigError(tok_key, f"{str(tok_path)!r} holds no fast (Rust) tokenizer")
    if not tok.eos_token:
        raise ConfigError(tok_key, f"the tokenizer in {str(tok_path)!r} has no EOS token")
    return {"context": ctx, "model_type": getattr(model_config, "model_type", None)}


def _check_data(key: str, value: str | None) -> None:
    if value is None:
        return
    if not Path(value).exists():
        raise ConfigError(key, f"{value!r} does not exist")


def _check_tasks(ev: EvaluateSettings) -> None:
    """The benchmark tasks exist (lm-evaluation-harness installed, every name known)."""
    from .stages.benchmark import check_tasks

    try:
        check_tasks(ev.tasks, num_fewshot=ev.num_fewshot, include_path=ev.include_path)
    except FuseLLMError as e:
        raise ConfigError("evaluate.tasks", str(e)) from None


def validate_config(config: PipelineConfig) -> dict[str, Any]:
    """Checks a config against the file system, before any work.

    Every model directory must exist with a ``config.json``; every tokenizer must load as a fast
    tokenizer with an EOS token; ``block_size`` must fit every model's context; the data paths
    must exist; the ``train`` settings must build a :class:`fusellm.FusionConfig`. Returns what
    was learned (``{"models": {name: {"context", "model_type"}}}``). Raises :class:`ConfigError`.
    """
    info: dict[str, Any] = {"models": {}}
    info["models"][config.target.name] = _check_model("target", config.target, config.block_size)
    for i, s in enumerate(config.sources):
        info["models"][s.name] = _check_model(f"sources[{i}]", s, config.block_size)
    _check_data("data.train", config.data.train)
    _check_data("data.heldout", config.data.heldout)
    if config.evaluate.enabled and config.evaluate.tasks:
        _check_tasks(config.evaluate)
    for i, s in enumerate(config.sources):
        if s.domain is not None and config.data.heldout is None and config.evaluate.enabled:
            raise ConfigError(
                f"sources[{i}].domain", "is set but data.heldout is not: nothing to evaluate on"
            )
    fusion_config(config, {}, seed=config.seeds[0], output_dir=os.devnull, check=True)
    return info


def fusion_config(
    config: PipelineConfig,
    overrides: Mapping[str, Any],
    *,
    seed: int,
    output_dir: str,
    check: bool = False,
) -> Any:
    """The :class:`fusellm.FusionConfig` of a training run: the config's ``train`` settings, the
    sources, seed and output directory, then the run's ``overrides``
    (:class:`fusellm.pipeline.TrainRun`).

    The control is the fusion run with ``lm_loss_weight = 1`` (and the ``hard`` combination):
    the same trainer, data order, steps, schedule and seed, the fusion term weighted 0 (it costs
    one gather of K student log-probabilities per position, nothing else).
    """
    from .train import FusionConfig

    args = dict(config.train.args)
    args.update(output_dir=output_dir, seed=seed, sources=config.source_names)
    args.update(overrides)
    try:
        return FusionConfig(**args)
    except InputError as e:
        raise ConfigError("train", str(e)) from None
    except (TypeError, ValueError) as e:
        raise ConfigError("train", f"{type(e).__name__}: {e}") from None
    except Exception as e:  # transformers raises bare exceptions for some combinations
        if not check:
            raise
        raise ConfigError("train", f"{type(e).__name__}: {e}") from None


# --- command-line flags from the same declarations ----------------------------------------------


def _flag_parser(tp: Any, flag: str) -> tuple[Any, list[str] | None]:
    """(argparse type function, choices shown) for a field's annotation. ``none`` on the command
    line is the YAML ``null`` of an optional field."""
    import argparse

    args = typing.get_args(tp)
    optional = typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args
    inner = next((a for a in args if a is not type(None)), tp) if optional else tp

    def parse(text: str) -> Any:
        if optional and text.lower() in ("none", "null"):
            return None
        value: Any = text
        if inner is int:
            try:
                value = int(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        try:
            return _coerce(value, inner, flag)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e).split(": ", 1)[-1]) from None

    choices = None
    if typing.get_origin(inner) is Literal:
        choices = [str(c) for c in typing.get_args(inner)] + (["none"] if optional else [])
    parse.__name__ = _type_name(tp)  # argparse names the type in its own errors
    return parse, choices


def add_settings_arguments(parser: Any, cls: type) -> None:
    """One ``--flag`` per field of the settings dataclass ``cls`` (the same declaration as the
    YAML key): its default, its help, its type and choices."""
    import argparse

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        text = f.metadata.get("help", "")
        if hints[f.name] is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=default, help=text
            )
            continue
        parse, choices = _flag_parser(hints[f.name], flag)
        shown = "none" if default is None else default
        parser.add_argument(
            flag,
            type=parse,
            default=default,
            metavar="{" + ",".join(choices) + "}" if choices else None,
            help=f"{text} (default: {shown})",
        )


def settings_from_args(args: Any, cls: type) -> dict[str, Any]:
    """The keyword arguments of a stage function from the flags :func:`add_settings_arguments`
    made."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}


# --- documentation -------------------------------------------------------------------------------


def describe_config() -> str:
    """Every config key with its type, default and help text (for ``fusellm run --help-config``)."""
    lines = [
        "fusellm run configuration keys (YAML). Relative paths are relative to the file.",
        "Presets supply the stage settings a file does not give: "
        + "; ".join(f"{name}" for name in PRESETS)
        + " (see `preset`).",
        "",
    ]

    def walk(cls: type, prefix: str, indent: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            key = f"{prefix}{f.name}"
            if f.default is not dataclasses.MISSING:
                default = f" (default: {json.dumps(f.default)})"
            elif f.default_factory is not dataclasses.MISSING and not dataclasses.is_dataclass(tp):
                default = f" (default: {json.dumps(f.default_factory())})"
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                default = " (required)"
            else:
                default = ""
            inner = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
            if cls is TrainSettings and f.name == "args":
                lines.append(
                    f"{indent}train.<field>: any FusionConfig / TrainingArguments field except "
                    f"{', '.join(sorted(_MANAGED_TRAIN_FIELDS))} (see `fusellm train --help`)"
                )
                continue
            lines.append(f"{indent}{key}: {_type_name(tp)}{default}")
            lines.append(f"{indent}    {f.metadata.get('help', '')}")
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{key}.", indent + "  ")  # type: ignore[arg-type]
            elif inner is not None and dataclasses.is_dataclass(inner):
                walk(inner, f"{key}[i].", indent + "  ")  # type: ignore[arg-type]

    walk(PipelineConfig, "", "")
    lines.append("")
    for name, values in PRESETS.items():
        lines.append(f"preset {name}: {json.dumps(values)}")
    return "\n".join(lines)
