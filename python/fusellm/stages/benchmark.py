"""Benchmark accuracy through EleutherAI's lm-evaluation-harness (``pip install "fusellm[eval]"``).

:func:`run_benchmarks` runs harness tasks on labelled model directories (the target before
training, the CLM control, the fused target, the sources: the models of a work directory) and
writes, under an output directory (the pipeline's ``WORKDIR/evaluate/benchmarks``)::

    benchmarks.json              the summary: per model and task the headline metric, its
                                 standard error, every metric, the few-shot count, the items
    <model>/<task>.json          the harness's whole output for that model and task (results,
                                 configs, versions, n-shot, n-samples, environment), with the
                                 key it was computed under
    <model>/<task>.samples.jsonl the harness's per-item records (arguments, log-likelihoods)

Each file is written under a temporary name and renamed, so a killed run never leaves a torn
result; a model and task whose result file holds the same key (the model's config and weights,
its tokenizer, the task's definition and data files, the few-shot count, the limit and the harness
version) is not evaluated again, so a rerun only computes what is missing.

**Tasks.** Any task, group or tag of the harness's registry (``arc_challenge``, ``mmlu``,
``bbh_cot_fewshot``, ...; their data sets are downloaded from the Hugging Face hub, so they need a
machine with internet access), and local task YAML files found under ``include_path`` (work
offline). ``NAME:N`` sets one task's few-shot count; ``num_fewshot`` sets it for the others
(default: the task's own, else 0). The registry is indexed only when a name is not found among the
local tasks (indexing its ~15,000 YAML files takes seconds); an unknown name raises
:class:`~fusellm.errors.InputError` on one line with the closest registry and local names
(:mod:`difflib`), before any model is loaded.

**Models.** Each model is loaded with fusellm's own loaders (local files only, the evaluation
dtype, the sdpa-then-eager attention fallback) and handed to the harness's ``HFLM`` as an object.
A tokenizer without what the harness needs (an EOS token: the end of text of generation and of
rolling log-likelihoods, the prefix of an empty context; special-token ids within the model's
logits) raises :class:`~fusellm.errors.InputError` naming the model before its weights are read.
The harness seeds Python's, NumPy's and torch's global generators; their states are restored after
each call.

**The headline metric** of a task (:func:`headline_metric`) is the first of ``acc_norm``, ``acc``,
``exact_match``, ``em``, ``f1``, ``mcc`` it reports (first filter), else its first metric: this
picks what the FuseLLM model card reports (ARC-Challenge and HellaSwag acc_norm, MMLU and
Winogrande acc, TruthfulQA mc2 (``truthfulqa_mc2`` reports it as acc), GSM8K exact match).

**Domain tasks** (:func:`write_domain_tasks`, used by the built-in miniature): two 4-way
multiple-choice tasks per domain, built deterministically (a fixed seed, document order) from
held-out documents, each cut into windows of ``CONTEXT_WORDS`` words of context and
``CONTINUATION_WORDS`` words that follow: ``fusellm_<domain>_continuation`` (which of four
continuations follows the context: the true one and three from other documents of the domain)
and ``fusellm_<domain>_next_word`` (which of four words comes next: the true one, punctuation
stripped, and three words that follow other contexts of the domain). Metrics acc and acc_norm
(log-likelihood per character). The task files are rendered from the base configs shipped in
``fusellm/tasks/`` with absolute data paths: the harness hands ``dataset_path: json`` and
``dataset_kwargs.data_files`` to ``datasets.load_dataset``, which resolves relative paths against
the current directory, not against the YAML file; ``cache_dir`` keeps the datasets cache next to
the data instead of the user's cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import hashlib
import importlib
import json
import logging
import os
import random
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import FuseLLMError, InputError, InputTypeError

__all__ = [
    "CONTEXT_WORDS",
    "CONTINUATION_WORDS",
    "DOMAIN_TASKS_VERSION",
    "PERCENT_METRICS",
    "SUMMARY_NAME",
    "TaskSpec",
    "check_tasks",
    "domain_task_name",
    "format_benchmark_table",
    "headline_metric",
    "lm_eval_version",
    "parse_task_specs",
    "run_benchmarks",
    "write_domain_tasks",
]

logger = logging.getLogger(__name__)

#: The summary file in the output directory.
SUMMARY_NAME = "benchmarks.json"
_FORMAT = "fusellm.benchmarks"
_RESULT_FORMAT = "fusellm.benchmark"
_VERSION = 1
_INSTALL_HINT = 'pip install "fusellm[eval]"'
#: Headline metrics in order of preference (the FuseLLM model card's choices).
_PREFERRED = ("acc_norm", "acc", "exact_match", "em", "f1", "mcc")
#: Metrics that are fractions (shown in percent by the reports).
PERCENT_METRICS = frozenset(
    {"acc", "acc_norm", "acc_bytes", "acc_mutual_info", "exact_match", "em", "f1", "mcc", "mc1"}
    | {"mc2"}
)
#: The harness output entries that are per task (the others describe the whole run).
_PER_TASK = ("results", "groups", "configs", "versions", "n-shot", "higher_is_better", "n-samples")
_SPEC = re.compile(r"^([^\s:,]+)(?::(\d+))?$")

#: Words of context, and words that follow it, per item of the domain tasks.
CONTEXT_WORDS = 32
CONTINUATION_WORDS = 8
#: Bumped whenever :func:`write_domain_tasks` or its templates change what they write.
DOMAIN_TASKS_VERSION = 1
_CHOICES = 4
_TEMPLATES = {"continuation": "continuation.yaml", "next_word": "next_word.yaml"}


# --- task names ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """A harness task (or group, or tag) and its few-shot count (``None``: the task's own)."""

    name: str
    num_fewshot: int | None = None

    def __str__(self) -> str:
        return self.name if self.num_fewshot is None else f"{self.name}:{self.num_fewshot}"


def _count(name: str, value: Any, minimum: int) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise InputTypeError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise InputError(f"{name} must be at least {minimum}, got {value}")
    return value


def parse_task_specs(
    tasks: str | Sequence[str], *, num_fewshot: int | None = None
) -> list[TaskSpec]:
    """``"arc_challenge:25,hellaswag"`` or ``["arc_challenge:25", "hellaswag"]`` -> task specs.

    ``NAME:N`` gives the task ``N`` few-shot examples; the others get ``num_fewshot``.
    """
    _count("num_fewshot", num_fewshot, 0)
    if isinstance(tasks, str):
        items = [tasks]
    elif isinstance(tasks, Sequence) and all(isinstance(t, str) for t in tasks):
        items = list(tasks)
    else:
        raise InputTypeError(f"tasks must be a string or a list of strings, got {tasks!r}")
    specs: list[TaskSpec] = []
    for part in (p.strip() for item in items for p in item.split(",")):
        if not part:
            continue
        m = _SPEC.match(part)
        if m is None:
            raise InputError(f"bad benchmark task {part!r}: expected NAME or NAME:FEWSHOT")
        shots = int(m.group(2)) if m.group(2) is not None else num_fewshot
        if any(s.name == m.group(1) for s in specs):
            raise InputError(f"benchmark task {m.group(1)!r} is given twice")
        specs.append(TaskSpec(m.group(1), shots))
    if not specs:
        raise InputError("no benchmark task given")
    return specs


def _require_lm_eval() -> Any:
    try:
        import lm_eval
        import lm_eval.evaluator  # the harness proper, not only its package
    except ImportError as e:
        raise FuseLLMError(
            f"benchmark evaluation needs lm-evaluation-harness: {_INSTALL_HINT} ({e})"
        ) from e
    return lm_eval


def lm_eval_version() -> str | None:
    """The installed lm-evaluation-harness version, or ``None``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return None


def _include_paths(include_path: Any) -> list[Path]:
    if include_path is None:
        return []
    items = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path)
    out = []
    for p in items:
        if not isinstance(p, (str, os.PathLike)):
            raise InputTypeError(f"include_path entries must be paths, got {p!r}")
        if not Path(p).is_dir():
            raise InputError(f"task directory (include_path) {str(p)!r} does not exist")
        out.append(Path(p).resolve())
    return out


@functools.cache
def _registry() -> Any:
    """A TaskManager of the harness's own registry (its YAML files indexed once a process)."""
    from lm_eval.tasks import TaskManager

    logger.info("indexing the lm-evaluation-harness task registry")
    return TaskManager()


def _unknown_tasks(unknown: Sequence[str], known: Sequence[str]) -> InputError:
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
        parts.append(f"{name!r} (close matches: {', '.join(close)})" if close else f"{name!r}")
    plural = "s" if len(unknown) > 1 else ""
    return InputError(
        f"unknown benchmark task{plural} {'; '.join(parts)}; `lm-eval ls tasks` lists the "
        "harness's tasks, --include-path (evaluate.include_path) adds local task files"
    )


def _task_manager(specs: Sequence[TaskSpec], paths: Sequence[Path]) -> Any:
    """A harness TaskManager knowing every requested name: the local tasks only when they
    suffice (fast), else the registry too. Raises InputError for unknown names."""
    from lm_eval.tasks import TaskManager

    local = (
        TaskManager(include_path=[str(p) for p in paths], include_defaults=False) if paths else None
    )
    local_names = set(local.all_tasks) if local is not None else set()
    missing = [s.name for s in specs if s.name not in local_names]
    if not missing:
        return local
    registry = set(_registry().all_tasks)
    unknown = [n for n in missing if n not in registry]
    if unknown:
        raise _unknown_tasks(unknown, sorted(registry | local_names))
    if not paths:
        return _registry()
    return TaskManager(include_path=[str(p) for p in paths], include_defaults=True)


def check_tasks(
    tasks: str | Sequence[str],
    *,
    num_fewshot: int | None = None,
    include_path: Any = None,
) -> list[TaskSpec]:
    """Parses task specs and checks that the harness knows each name (before any work)."""
    specs = parse_task_specs(tasks, num_fewshot=num_fewshot)
    paths = _include_paths(include_path)
    _require_lm_eval()
    _task_manager(specs, paths)
    return specs


def _data_files(cfg: Any) -> list[Path]:
    """The local files a task config's ``dataset_kwargs.data_files`` names."""
    files = (
        ((cfg or {}).get("dataset_kwargs") or {}).get("data_files")
        if isinstance(cfg, dict)
        else None
    )
    values = list(files.values()) if isinstance(files, dict) else [files]
    flat = [v for x in values for v in (x if isinstance(x, list) else [x]) if isinstance(v, str)]
    return [Path(v) for v in flat if Path(v).is_file()]


def _task_fingerprint(tm: Any, name: str) -> str:
    """SHA-256 of a task's definition (its parsed YAML, includes resolved) and local data."""
    from ..io import fingerprint_files

    entry = tm.task_index.get(name)
    cfg = getattr(entry, "cfg", None)
    desc = {"name": name, "kind": str(getattr(entry, "kind", None)), "config": cfg}
    h = hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode("utf-8"))
    data = _data_files(cfg)
    if data:
        h.update(fingerprint_files(data, root=Path("/"))["sha256"].encode())
    return h.hexdigest()


# --- results -------------------------------------------------------------------------------------


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def headline_metric(entry: Mapping[str, Any]) -> dict[str, Any] | None:
    """The metric a report shows for a harness results entry (``{"acc,none": 0.5, ...}``):
    ``{"metric", "filter", "value", "stderr"}`` (see the module docstring), or ``None``."""
    found: list[tuple[str, str, float]] = []
    for key, value in entry.items():
        metric, sep, flt = str(key).partition(",")
        v = _number(value)
        if sep and v is not None and not metric.endswith("_stderr"):
            found.append((metric, flt, v))
    if not found:
        return None
    rank = {m: i for i, m in enumerate(_PREFERRED)}
    metric, flt, value = min(found, key=lambda f: rank.get(f[0], len(rank)))
    stderr = _number(entry.get(f"{metric}_stderr,{flt}"))
    return {"metric": metric, "filter": flt, "value": value, "stderr": stderr}


def _leaves(name: str, subtasks: Mapping[str, Any]) -> list[str]:
    """``name`` and, for a group, every group and task below it (depth first)."""
    out, todo = [], [name]
    while todo:
        n = todo.pop(0)
        if n not in out:
            out.append(n)
            todo = list(subtasks.get(n) or []) + todo
    return out


def _split_output(res: Mapping[str, Any], name: str) -> tuple[dict[str, Any], list[Any]]:
    """The part of a harness output that concerns ``name`` (and its subtasks), and its
    per-item records."""
    subtasks = res.get("group_subtasks") or {}
    names = _leaves(name, subtasks)
    part: dict[str, Any] = {k: v for k, v in res.items() if k not in (*_PER_TASK, "samples")}
    for k in _PER_TASK:
        section = res.get(k)
        if isinstance(section, Mapping):
            part[k] = {n: section[n] for n in names if n in section}
    part["group_subtasks"] = {g: subtasks[g] for g in names if g in subtasks}
    samples = res.get("samples") or {}
    records = [{"task": n, **rec} for n in names for rec in samples.get(n) or []]
    return part, records


def _summary_entry(part: Mapping[str, Any], name: str) -> dict[str, Any]:
    entry = (part.get("results") or {}).get(name) or (part.get("groups") or {}).get(name) or {}
    head = headline_metric(entry)
    if head is None:
        raise FuseLLMError(f"lm-evaluation-harness reported no metric for {name!r}")
    shots = {v for v in (part.get("n-shot") or {}).values() if isinstance(v, int)}
    counts = [
        c.get("effective")
        for c in (part.get("n-samples") or {}).values()
        if isinstance(c, dict) and isinstance(c.get("effective"), int)
    ]
    metrics = {k: v for k, v in entry.items() if "," in str(k) and _number(v) is not None}
    return {
        **head,
        "num_fewshot": shots.pop() if len(shots) == 1 else None,
        "samples": sum(counts) if counts else None,
        "higher_is_better": (part.get("higher_is_better") or {}).get(name, {}).get(head["metric"]),
        "metrics": metrics,
    }


# --- running the harness -------------------------------------------------------------------------


#: The harness's warnings that a model object, not a name, was passed (fusellm does it on
#: purpose: its own loaders read local files only).
_OBJECT_WARNINGS = (
    "`pretrained` model kwarg is not of type `str`",
    "Passed an already-initialized model through `pretrained`",
)


def _object_warning(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(_OBJECT_WARNINGS)


@contextlib.contextmanager
def _harness_call(progress: bool | None) -> Iterator[bool]:
    """Around a harness call: the global RNG states restored, the datasets bars off unless
    progress is shown; yields whether the model's own bars should be off."""
    import datasets
    import numpy as np
    import torch

    # the harness seeds the legacy global generators: keep the caller's states
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())  # noqa: NPY002
    quiet = progress is False or (progress is None and not sys.stderr.isatty())
    bars = datasets.is_progress_bar_enabled()
    # the harness builds each task's requests under a bar of its own, with no switch: its
    # module's tqdm is replaced by a disabled one for the call
    task_module = importlib.import_module("lm_eval.api.task") if quiet else None
    task_bar = getattr(task_module, "tqdm", None)
    if quiet:
        datasets.disable_progress_bar()
        if task_bar is not None:
            task_module.tqdm = functools.partial(task_bar, disable=True)  # type: ignore[union-attr]
    hf_logger = logging.getLogger("lm_eval.models.huggingface")
    hf_logger.addFilter(_object_warning)
    try:
        yield quiet
    finally:
        hf_logger.removeFilter(_object_warning)
        if quiet and task_bar is not None:
            task_module.tqdm = task_bar  # type: ignore[union-attr]
        if quiet and bars:
            datasets.enable_progress_bar()
        random.setstate(states[0])
        np.random.set_state(states[1])  # noqa: NPY002
        torch.set_rng_state(states[2])


def _check_tokenizer(tok: Any, label: str, where: Any) -> None:
    for attr in ("encode", "decode", "batch_decode"):
        if not callable(getattr(tok, attr, None)):
            raise InputTypeError(f"{label}: {type(tok).__name__} is not a Hugging Face tokenizer")
    if getattr(tok, "eos_token_id", None) is None:
        raise InputError(
            f"{label}: the tokenizer of {where} has no EOS token, which lm-evaluation-harness "
            "needs (the end of text of generation and of rolling log-likelihoods, the prefix of "
            "an empty context); set eos_token in its tokenizer_config.json"
        )


def _check_ids(tok: Any, model: Any, label: str) -> None:
    from ..train import logits_width

    width = logits_width(model)
    if width is None:
        return
    special = {
        name: getattr(tok, f"{name}_token_id", None) for name in ("eos", "bos", "pad", "unk")
    }
    bad = {k: v for k, v in special.items() if isinstance(v, int) and v >= width}
    if bad:
        raise InputError(
            f"{label}: the tokenizer's special-token ids {bad} are outside the model's {width} "
            "logits: tokenizer and model do not match"
        )
    if len(tok) > width:
        logger.warning(
            "%s: the tokenizer has %d tokens, the model %d logits", label, len(tok), width
        )


def _load_lm(
    label: str,
    path: Path,
    tokenizer: Any,
    batch_size: int,
    device: Any,
    dtype: Any,
    progress: bool | None = None,
) -> Any:
    from lm_eval.models.huggingface import HFLM

    from ..loading import load_tokenizer, resolve_device, torch_dtype
    from .evaluate import _context_length, _load_model

    dev = resolve_device(device)
    dtype_ = torch_dtype(dtype, dev)
    where = tokenizer if isinstance(tokenizer, (str, os.PathLike)) else path
    tok = load_tokenizer(tokenizer if tokenizer is not None else path)
    _check_tokenizer(tok, label, str(where))  # before the weights are read
    model = _load_model(path, dtype_, dev, progress)
    _check_ids(tok, model, label)
    hf_logger = logging.getLogger("lm_eval.models.huggingface")
    hf_logger.addFilter(_object_warning)
    try:
        return HFLM(
            pretrained=model,
            tokenizer=tok,
            backend="causal",
            batch_size=batch_size,
            max_length=_context_length(model),
        )
    finally:
        hf_logger.removeFilter(_object_warning)


def _harness(
    lm: Any, specs: Sequence[TaskSpec], tm: Any, limit: int | None, progress: bool | None
) -> dict[str, tuple[dict[str, Any], list[Any]]]:
    """Runs the harness once per distinct few-shot count; ``{task: (output part, records)}``."""
    lm_eval = _require_lm_eval()
    by_shots: dict[int | None, list[str]] = {}
    for s in specs:
        by_shots.setdefault(s.num_fewshot, []).append(s.name)
    out: dict[str, tuple[dict[str, Any], list[Any]]] = {}
    for shots, names in by_shots.items():
        with _harness_call(progress) as quiet:
            model = lm
            if quiet:  # the model's request bars; the harness exposes no other switch
                for m in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
                    setattr(lm, m, functools.partial(getattr(type(lm), m), lm, disable_tqdm=True))
            try:
                res = lm_eval.simple_evaluate(
                    model=model, tasks=names, num_fewshot=shots, limit=limit, task_manager=tm
                )
            except FuseLLMError:
                raise
            except Exception as e:
                raise FuseLLMError(
                    f"lm-evaluation-harness failed on {names}: {type(e).__name__}: {e}"
                ) from e
            finally:
                for m in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
                    lm.__dict__.pop(m, None)
        if not isinstance(res, dict):
            raise FuseLLMError("lm-evaluation-harness returned no results")
        for n in names:
            out[n] = _split_output(res, n)
    return out


# --- several models, resumable output ------------------------------------------------------------


def _safe(name: str) -> str:
    """A file name for a label or task: itself when safe, else a cleaned form plus a hash."""
    clean = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "x"
    if clean == name:
        return name
    return f"{clean}-{hashlib.sha256(name.encode('utf-8')).hexdigest()[:8]}"


def _dump(obj: Any) -> str:
    from lm_eval.utils import handle_non_serializable

    return json.dumps(obj, indent=2, ensure_ascii=False, default=handle_non_serializable)


def _write_result(path: Path, result: dict[str, Any], records: list[Any]) -> None:
    """The per-item records, then the result (its presence marks the pair done); each
    atomically."""
    from lm_eval.utils import handle_non_serializable

    from ..io import atomic_write_bytes

    lines = [json.dumps(r, ensure_ascii=False, default=handle_non_serializable) for r in records]
    samples = path.with_name(path.name.removesuffix(".json") + ".samples.jsonl")
    atomic_write_bytes(samples, ("".join(line + "\n" for line in lines)).encode("utf-8"))
    atomic_write_bytes(path, (_dump(result) + "\n").encode("utf-8"))


def _previous(path: Path, key_sha: str) -> dict[str, Any] | None:
    """The summary entry of a result file computed under ``key_sha``, or None."""
    from ..io import read_json_object

    try:
        obj = read_json_object(path)
    except InputError:
        return None
    if not obj or obj.get("format") != _RESULT_FORMAT or obj.get("key_sha256") != key_sha:
        return None
    entry = obj.get("summary")
    return entry if isinstance(entry, dict) else None


def _read_summary(path: Path | None) -> dict[str, Any]:
    from ..io import read_json_object

    obj = read_json_object(path) if path is not None else None
    if obj is None or obj.get("format") != _FORMAT or not isinstance(obj.get("models"), dict):
        return {"models": {}, "tasks": []}
    return obj


def run_benchmarks(
    models: Mapping[str, str | os.PathLike[str]],
    tasks: str | Sequence[str],
    output_dir: str | os.PathLike[str] | None,
    *,
    tokenizers: Mapping[str, Any] | None = None,
    num_fewshot: int | None = None,
    limit: int | None = None,
    include_path: Any = None,
    batch_size: int = 32,
    device: Any = None,
    dtype: Any = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Runs lm-evaluation-harness tasks on each labelled model directory (module docstring).

    Args:
        models: label -> model directory, e.g. ``{"fused": "work/train/fused"}``.
        tasks: task specs, ``"NAME[:FEWSHOT],..."`` or a list of them (:func:`parse_task_specs`).
        output_dir: where the summary and the harness's outputs go (resumable), or ``None``.
        tokenizers: label -> tokenizer directory, for models saved without their tokenizer.
        num_fewshot: few-shot examples of the tasks not given as ``NAME:N`` (default: their own).
        limit: at most this many items per task (the harness's first ones).
        include_path: directories (or one) of local task YAML files.
        batch_size: requests (a context and one answer) per forward pass.
        device, dtype: as for :func:`fusellm.stages.evaluate.evaluate_perplexity`.
        progress: progress bars (``None``: only on a terminal).

    Returns:
        The summary: ``{"format", "version", "lm_eval_version", "tasks", "models": {label:
        {"path", "fingerprint", "tasks": {task: {"metric", "filter", "value", "stderr",
        "num_fewshot", "samples", "higher_is_better", "metrics", "file"}}}}}``.

    Raises:
        InputError: an unknown task (one line, with close matches), an unreadable model or
            tokenizer, a tokenizer without an EOS token, invalid settings.
        FuseLLMError: lm-evaluation-harness is not installed, or it failed.
    """
    from ..io import atomic_write_bytes
    from .evaluate import _model_paths

    specs = parse_task_specs(tasks, num_fewshot=num_fewshot)
    _count("limit", limit, 1)
    _count("batch_size", batch_size, 1)
    paths = _model_paths(models)
    toks = dict(tokenizers or {})
    if set(toks) - set(paths):
        raise InputError(
            f"tokenizers given for unknown model labels {sorted(set(toks) - set(paths))}"
        )
    dirs = _include_paths(include_path)
    _require_lm_eval()
    tm = _task_manager(specs, dirs)  # unknown names fail here, before any model is loaded
    run = _Run(
        tm=tm,
        task_fp={s.name: _task_fingerprint(tm, s.name) for s in specs},
        out=Path(output_dir) if output_dir is not None else None,
        limit=limit,
        dtype=dtype,
        batch_size=batch_size,
        device=device,
        progress=progress,
    )
    summary = _read_summary(run.out / SUMMARY_NAME if run.out is not None else None)
    summary.update(format=_FORMAT, version=_VERSION, lm_eval_version=lm_eval_version())
    summary["tasks"] = list(dict.fromkeys([*summary.get("tasks", []), *(s.name for s in specs)]))
    for label, path in paths.items():
        summary["models"][label] = _benchmark_model(
            run, label, path, toks.get(label), specs, summary["models"].get(label) or {}
        )
        if run.out is not None:
            atomic_write_bytes(run.out / SUMMARY_NAME, (_dump(summary) + "\n").encode("utf-8"))
    return summary


@dataclasses.dataclass(frozen=True)
class _Run:
    """The settings shared by every model of a :func:`run_benchmarks` call."""

    tm: Any
    task_fp: dict[str, str]
    out: Path | None
    limit: int | None
    dtype: Any
    batch_size: int
    device: Any
    progress: bool | None

    def key(self, model_sha: str, tok_sha: str | None, spec: TaskSpec) -> dict[str, Any]:
        """What a model and task's result depends on."""
        return {
            "model": model_sha,
            "tokenizer": tok_sha,
            "task": spec.name,
            "task_definition": self.task_fp[spec.name],
            "num_fewshot": spec.num_fewshot,
            "limit": self.limit,
            "dtype": "auto" if self.dtype is None else str(self.dtype).removeprefix("torch."),
            "lm_eval": lm_eval_version(),
        }


def _benchmark_model(
    run: _Run,
    label: str,
    path: Path,
    tok: Any,
    specs: Sequence[TaskSpec],
    old: Mapping[str, Any],
) -> dict[str, Any]:
    """One model's summary entry: the tasks already done under the same key are read back,
    the others run (one harness call per few-shot count) and written."""
    from ..io import model_fingerprint, tokenizer_fingerprint

    prev_fp = old.get("fingerprint") if isinstance(old.get("fingerprint"), dict) else None
    fp = model_fingerprint(path, previous=prev_fp)
    tok_fp = tokenizer_fingerprint(tok)["sha256"] if isinstance(tok, (str, os.PathLike)) else None
    same_model = (prev_fp or {}).get("sha256") == fp["sha256"]
    done: dict[str, Any] = dict(old.get("tasks") or {}) if same_model else {}
    entry = {"path": str(path), "fingerprint": fp, "tasks": done}
    pending: list[TaskSpec] = []
    for s in specs:
        key_sha = _key_sha(run.key(fp["sha256"], tok_fp, s))
        rel = f"{_safe(label)}/{_safe(s.name)}.json"
        previous = _previous(run.out / rel, key_sha) if run.out is not None else None
        if previous is not None:
            logger.info("%s: %s already evaluated, skipped", label, s)
            done[s.name] = previous
        else:
            pending.append(s)
    if not pending:
        return entry
    logger.info("%s: running %s", label, ", ".join(map(str, pending)))
    lm = _load_lm(label, path, tok, run.batch_size, run.device, run.dtype, run.progress)
    try:
        outputs = _harness(lm, pending, run.tm, run.limit, run.progress)
    finally:
        del lm  # the model's memory, before the next model is loaded
    for s in pending:
        part, records = outputs[s.name]
        done[s.name] = task_entry = _summary_entry(part, s.name)
        if run.out is None:
            continue
        rel = f"{_safe(label)}/{_safe(s.name)}.json"
        task_entry["file"] = rel
        key = run.key(fp["sha256"], tok_fp, s)
        result = {
            "format": _RESULT_FORMAT,
            "version": _VERSION,
            "model": label,
            "path": str(path),
            "task": s.name,
            "key": key,
            "key_sha256": _key_sha(key),
            "summary": task_entry,
            "harness": part,
        }
        _write_result(run.out / rel, result, records)
    return entry


def _key_sha(key: Mapping[str, Any]) -> str:
    text = json.dumps(key, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def format_value(value: Any, metric: str) -> str:
    """A metric value as the reports show it: fractions in percent with two decimals."""
    v = _number(value)
    if v is None:
        return "-"
    return f"{100 * v:.2f}" if metric in PERCENT_METRICS else f"{v:.4g}"


def format_benchmark_table(summary: Mapping[str, Any]) -> str:
    """A plain-text table of a :func:`run_benchmarks` summary: models as rows, tasks as
    columns (headline metric, in percent for fractions)."""
    models = summary.get("models") or {}
    tasks = [
        t
        for t in summary.get("tasks") or []
        if any(t in (m.get("tasks") or {}) for m in models.values())
    ]
    metric = {}
    for t in tasks:
        metric[t] = next(
            m["tasks"][t]["metric"] for m in models.values() if t in (m.get("tasks") or {})
        )
    rows = [["model", *[f"{t} ({metric[t]})" for t in tasks]]]
    for label, m in models.items():
        results = [(m.get("tasks") or {}).get(t) for t in tasks]
        rows.append(
            [label, *[format_value(c["value"], c["metric"]) if c else "-" for c in results]]
        )
    from .evaluate import text_table

    return text_table(rows)


# --- domain tasks over held-out documents --------------------------------------------------------


def domain_task_name(domain: str, kind: str) -> str:
    """The name of a domain task: ``fusellm_<domain>_<kind>``, kind ``continuation`` or
    ``next_word``."""
    if kind not in _TEMPLATES:
        raise InputError(f"kind must be one of {list(_TEMPLATES)}, got {kind!r}")
    slug = re.sub(r"[^a-z0-9]+", "_", domain.lower()).strip("_")
    if not slug:
        raise InputError(f"domain {domain!r} gives no usable task name")
    return f"fusellm_{slug}_{kind}"


def _template(kind: str) -> dict[str, Any]:
    import yaml

    path = Path(__file__).resolve().parents[1] / "tasks" / _TEMPLATES[kind]
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise FuseLLMError(f"the shipped task template {path} is unreadable: {e}") from e
    return dict(cfg)


@dataclasses.dataclass(frozen=True)
class _Window:
    doc: int
    start: int
    context: str
    continuation: str
    word: str  # the next word, punctuation stripped ("" when none)


def _windows(texts: Sequence[str]) -> list[_Window]:
    size = CONTEXT_WORDS + CONTINUATION_WORDS
    out = []
    for d, text in enumerate(texts):
        words = text.split()
        for s in range(0, len(words) - size + 1, size):
            cont = words[s + CONTEXT_WORDS : s + size]
            word = re.sub(r"^\W+|\W+$", "", cont[0])
            out.append(_Window(d, s, " ".join(words[s : s + CONTEXT_WORDS]), " ".join(cont), word))
    return out


def _choice_row(
    w: _Window, answer: str, pool: Sequence[str], rng: random.Random
) -> dict[str, Any] | None:
    """A 4-way item: ``answer`` and three distinct distractors drawn from ``pool``."""
    seen = {answer.lower()}
    candidates = []
    for c in pool:
        if c and c.lower() not in seen:
            seen.add(c.lower())
            candidates.append(c)
    if len(candidates) < _CHOICES - 1:
        return None
    choices = rng.sample(candidates, _CHOICES - 1)
    label = rng.randrange(_CHOICES)
    choices.insert(label, answer)
    return {"id": f"{w.doc}-{w.start}", "context": w.context, "choices": choices, "label": label}


def _domain_rows(
    texts: Sequence[str], items: int | None, rng: random.Random
) -> dict[str, list[dict[str, Any]]]:
    windows = _windows(texts)
    chosen = list(range(len(windows)))
    if items is not None and len(chosen) > items:
        chosen = sorted(rng.sample(chosen, items))
    rows: dict[str, list[dict[str, Any]]] = {"continuation": [], "next_word": []}
    for i in chosen:
        w = windows[i]
        others = [x for x in windows if x.doc != w.doc] or [x for x in windows if x is not w]
        row = _choice_row(w, w.continuation, [x.continuation for x in others], rng)
        if row is not None:
            rows["continuation"].append(row)
        if w.word:
            row = _choice_row(w, w.word, [x.word for x in others], rng)
            if row is not None:
                rows["next_word"].append(row)
    return rows


def write_domain_tasks(
    texts: Mapping[str, Sequence[str]],
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    items_per_task: int | None = None,
    location: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> list[str]:
    """Writes the domain tasks (module docstring) of held-out ``texts`` (domain -> documents)
    into ``out_dir``: per task ``<name>.jsonl`` (the items) and ``<name>.yaml`` (the harness task).

    Args:
        texts: domain -> its held-out documents, in a stable order.
        out_dir: where the files are written.
        seed: the seed of the item selection, the distractors and the answer positions.
        items_per_task: at most this many items per task (a spread-out subset of the windows).
        location: the directory the task files will refer to, when ``out_dir`` is a temporary
            directory renamed there afterwards (default: ``out_dir``).
        cache_dir: the ``datasets`` cache directory of the tasks (default: the user's).

    Returns:
        The task names, per domain (in ``texts`` order) continuation then next word.

    Raises:
        InputError: a domain with too little text for four distinct choices.
    """
    import yaml

    _count("seed", seed, 0)
    _count("items_per_task", items_per_task, 1)
    if not isinstance(texts, Mapping) or not texts:
        raise InputTypeError("texts must be a non-empty mapping domain -> documents")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = Path(location if location is not None else out).resolve()
    names: list[str] = []
    for domain, docs in texts.items():
        if isinstance(docs, str) or not all(isinstance(t, str) for t in docs):
            raise InputTypeError(f"domain {domain!r}: documents must be a list of strings")
        rng = random.Random(f"fusellm.benchmark:{seed}:{domain}")
        rows = _domain_rows(docs, items_per_task, rng)
        for kind, items in rows.items():
            name = domain_task_name(str(domain), kind)
            if not items:
                raise InputError(
                    f"domain {domain!r}: no {kind} item (documents need at least "
                    f"{CONTEXT_WORDS + CONTINUATION_WORDS} words, and {_CHOICES} distinct answers)"
                )
            lines = [json.dumps(r, ensure_ascii=False, sort_keys=True) for r in items]
            (out / f"{name}.jsonl").write_text("".join(x + "\n" for x in lines), encoding="utf-8")
            kwargs: dict[str, Any] = {"data_files": {"test": str(final / f"{name}.jsonl")}}
            if cache_dir is not None:
                kwargs["cache_dir"] = str(Path(cache_dir).resolve())
            cfg = {"task": name, **_template(kind), "dataset_kwargs": kwargs}
            header = f"# generated by fusellm from fusellm/tasks/{_TEMPLATES[kind]}\n"
            text = header + yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True)
            (out / f"{name}.yaml").write_text(text, encoding="utf-8")
            names.append(name)
    return names
