"""Held-out perplexity of causal LMs, per domain, comparable across tokenizers.

Method. Every text is tokenized as ``text + eos`` without special tokens (the pipeline's
convention, spec section 2; ``append_eos=False`` drops the EOS). A document of ``n`` tokens scores
its tokens ``1..n-1`` (token ``p`` given tokens ``0..p-1``); the first token has no prefix and is
never scored. The model reads a document in windows of at most ``max_length`` tokens (default: the
model's context, ``max_position_embeddings`` or its equivalents) whose starts are ``stride``
tokens apart:

- window ``i`` covers tokens ``[i * stride, min(i * stride + max_length, n))``;
- it scores only the tokens that no earlier window scored;
- the default ``stride = max_length - 1`` gives windows that overlap by ONE token: the last token
  of a window is the first (unscored, context-only) token of the next, so every token after the
  first of each window is scored, every token of the document but its first is scored exactly
  once, and the context restarts at each window boundary. A smaller stride gives every scored
  token at least ``max_length - stride`` tokens of context, at ``max_length / stride`` times the
  cost (the sliding-window evaluation of the transformers documentation).

The token NLL is ``-log_softmax(logits)[target]``, the log-softmax taken in float32 over the
model's whole logit row (padded-vocabulary ids included: that is the distribution the model
defines) whatever the model's dtype, and summed in float64. Per group of documents (the values
of ``domain_column``, plus ``"all"``):

- ``tokens``: scored tokens; ``nll``: their summed NLL in nats; ``ppl = exp(nll / tokens)``;
- ``bytes``: UTF-8 bytes of the texts (the EOS string excluded); ``bits_per_byte = nll / ln 2 /
  bytes``; ``documents``: the number of texts.

Perplexity per token depends on the tokenizer: a tokenizer that cuts text into more, shorter
tokens has more, easier predictions, hence a lower per-token perplexity for the same model
quality. The summed NLL of a text is (up to the EOS prediction) the model's log-probability of
the whole text, whatever its tokenization, so bits per byte compares models with DIFFERENT
tokenizers (a target and its sources) and perplexity compares models that share one (a fused
model and its control).

Speed. Windows are sorted by length and batched (``batch_size`` windows), each batch padded on the
right to its own longest window (dynamic padding). No attention mask is passed: under causal
attention a real position never sees the padding after it, so results do not depend on batching
or padding (up to floating-point summation order in the matrix products). The float32
log-softmax runs in chunks of positions, so its memory stays bounded for large vocabularies.

:func:`run_evaluate` evaluates several labelled model directories on one data set and writes one
JSON file atomically after each model; a model already in the file with the same data
fingerprint, model fingerprint (config and weights) and settings is skipped, so an interrupted
run resumes. :func:`add_evaluate_parser` is the ``fusellm evaluate`` command: perplexity with
``--data``, benchmark tasks of lm-evaluation-harness with ``--tasks``
(:mod:`fusellm.stages.benchmark`), on labelled model directories or on the models of one pipeline
work directory (:func:`fusellm.pipeline.workdir_models`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import FuseLLMError, InputError, InputTypeError
from ..loading import DTYPES, load_causal_lm, load_tokenizer, resolve_device, torch_dtype
from ..progress import progress_bar

__all__ = [
    "GROUP_ALL",
    "add_evaluate_parser",
    "evaluate_perplexity",
    "format_table",
    "parse_model_args",
    "plan_windows",
    "run_evaluate",
]

logger = logging.getLogger(__name__)

#: The group holding every document.
GROUP_ALL = "all"
#: Format tag of the :func:`run_evaluate` output.
_FORMAT = "fusellm.evaluate"
_VERSION = 1
#: Config attributes that give a model's context length, in order of preference.
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
#: Float32 elements per log-softmax chunk (positions x vocabulary): 256 MiB.
_CHUNK_ELEMENTS = 1 << 26
_LN2 = math.log(2.0)


# --- data ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Texts:
    texts: list[str]
    domains: list[str] | None
    domain_column: str | None
    dataset: Any


def _load_texts(data: Any, text_column: str, domain_column: str | None) -> _Texts:
    """The texts and their domains; the default domain column ``"domain"`` may be absent."""
    from ..io import load_text_dataset

    if not isinstance(text_column, str) or not text_column:
        raise InputError(f"text_column must be a non-empty string, got {text_column!r}")
    ds = load_text_dataset(data, text_column=text_column)
    if len(ds) == 0:
        raise InputError(f"the evaluation data set {_describe_source(data)} has no rows")
    if domain_column is not None and domain_column not in ds.column_names:
        if domain_column != "domain":
            raise InputError(
                f"the evaluation data set has no domain column {domain_column!r} "
                f"(columns: {ds.column_names})"
            )
        domain_column = None
    texts = ds[text_column]
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InputTypeError(
                f"row {i} of column {text_column!r} is {type(t).__name__}, not a string"
            )
    domains = None
    if domain_column is not None:
        domains = []
        for i, d in enumerate(ds[domain_column]):
            if d is None:
                raise InputError(f"row {i} has no value in the domain column {domain_column!r}")
            name = str(d)
            if name == GROUP_ALL:
                raise InputError(
                    f"row {i} has the domain {name!r}, the name of the group of every document; "
                    "rename that domain"
                )
            domains.append(name)
    return _Texts(list(texts), domains, domain_column, ds)


def _describe_source(data: Any) -> str:
    if isinstance(data, (str, os.PathLike)):
        return repr(str(data))
    return f"({type(data).__name__})"


# --- model loading -------------------------------------------------------------------------------


def _load_model(path: Path, dtype: Any, device: Any, progress: bool | None = None) -> Any:
    return load_causal_lm(path, dtype, device, progress=progress)[0]


def _context_length(model: Any) -> int | None:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for key in _CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 1:
            return value
    return None


def _logits_width(model: Any) -> int | None:
    from ..train import logits_width

    return logits_width(model)


# --- windows -------------------------------------------------------------------------------------


def plan_windows(n: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """The windows of a document of ``n`` tokens: ``(start, end, first_scored)`` each.

    The window reads tokens ``[start, end)`` and scores tokens ``[first_scored, end)`` (see the
    module docstring). A document of fewer than two tokens has no window.
    """
    if max_length < 2:
        raise InputError(f"max_length must be at least 2, got {max_length}")
    if not 1 <= stride <= max_length - 1:
        raise InputError(f"stride must be in [1, max_length - 1 = {max_length - 1}], got {stride}")
    if n < 2:
        return []
    end = min(n, max_length)
    out = [(0, end, 1)]
    start = 0
    while end < n:
        start += stride
        new_end = min(n, start + max_length)
        out.append((start, new_end, max(start + 1, end)))
        end = new_end
    return out


def _token_nll(logits: Any, targets: Any) -> Any:
    """Float32 NLL of ``targets [T]`` under ``logits [T, V]``, the log-softmax in chunks."""
    import torch

    rows = max(1, _CHUNK_ELEMENTS // max(1, logits.shape[-1]))
    parts = []
    for s in range(0, logits.shape[0], rows):
        lp = torch.log_softmax(logits[s : s + rows].float(), dim=-1)
        parts.append(-lp.gather(1, targets[s : s + rows, None])[:, 0])
    return torch.cat(parts) if parts else logits.new_zeros(0, dtype=torch.float32)


# --- evaluation ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Result:
    groups: dict[str, dict[str, Any]]
    max_length: int
    stride: int
    dtype: str


def _group_stats(tokens: int, nll: float, nbytes: int, documents: int) -> dict[str, Any]:
    return {
        "tokens": tokens,
        "nll": nll,
        "ppl": math.exp(nll / tokens) if tokens else None,
        "bytes": nbytes,
        "bits_per_byte": nll / _LN2 / nbytes if nbytes else None,
        "documents": documents,
    }


def _evaluate(
    model: Any,
    texts: _Texts,
    *,
    tokenizer: Any,
    max_length: int | None,
    stride: int | None,
    batch_size: int,
    append_eos: bool,
    device: Any,
    dtype: Any,
    progress: bool | None,
    desc: str,
) -> _Result:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    for name, value in (("max_length", max_length), ("stride", stride)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise InputTypeError(f"{name} must be an integer, got {value!r}")
    tok, lm, dev, dtype_ = _model_and_tokenizer(model, tokenizer, device, dtype, progress)
    max_length, stride = _window_settings(lm, max_length, stride)
    ids_list = _token_ids(texts.texts, tok, lm, append_eos)
    windows = [
        (doc, s, e, f)
        for doc, ids in enumerate(ids_list)
        for s, e, f in plan_windows(len(ids), max_length, stride)
    ]
    # Longest first (ties in document order): the first batch shows an out-of-memory at once.
    windows.sort(key=lambda w: (-(w[2] - w[1]), w[0], w[1]))
    pad_id = tok.eos_token_id if tok.eos_token_id is not None else 0
    doc_nll, doc_tokens = _score_windows(
        lm, ids_list, windows, batch_size, pad_id, dev, dtype_, progress, desc
    )
    nbytes = [len(t.encode("utf-8")) for t in texts.texts]
    members: dict[str, list[int]] = {}
    if texts.domains is not None:
        for i, d in enumerate(texts.domains):
            members.setdefault(d, []).append(i)
    members = dict(sorted(members.items()))
    members[GROUP_ALL] = list(range(len(texts.texts)))
    groups = {}
    for name, idx in members.items():
        groups[name] = _group_stats(
            sum(doc_tokens[i] for i in idx),
            math.fsum(doc_nll[i] for i in idx),
            sum(nbytes[i] for i in idx),
            len(idx),
        )
    return _Result(groups, max_length, stride, str(dtype_).removeprefix("torch."))


def _model_and_tokenizer(
    model: Any, tokenizer: Any, device: Any, dtype: Any, progress: bool | None
) -> tuple[Any, Any, Any, Any]:
    """The tokenizer (checked before the weights are read), the model, its device and dtype."""
    import torch

    dev = resolve_device(device)
    dtype_ = torch_dtype(dtype, dev)
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if tokenizer is None:
            tokenizer = path
        tok = load_tokenizer(tokenizer)  # cheap checks before the weights are read
        return tok, _load_model(path, dtype_, dev, progress), dev, dtype_
    if not isinstance(model, torch.nn.Module):
        raise InputTypeError(
            f"model must be a model directory or a torch module, got {type(model).__name__}"
        )
    if tokenizer is None:
        raise InputError("pass tokenizer= with a model object")
    param = next(model.parameters())
    return load_tokenizer(tokenizer), model, param.device, param.dtype


def _window_settings(lm: Any, max_length: int | None, stride: int | None) -> tuple[int, int]:
    """``max_length`` (default: the model's context) and ``stride`` (default
    ``max_length - 1``), checked."""
    context = _context_length(lm)
    if max_length is None:
        if context is None:
            raise InputError("the model config gives no context length: pass max_length")
        max_length = context
    elif context is not None and max_length > context:
        logger.warning("max_length %d exceeds the model's context %d", max_length, context)
    if max_length < 2:
        raise InputError(f"max_length must be at least 2, got {max_length}")
    if stride is None:
        stride = max_length - 1
    plan_windows(2, max_length, stride)  # validates stride
    return max_length, stride


def _token_ids(texts: list[str], tok: Any, lm: Any, append_eos: bool) -> list[list[int]]:
    """Each text + EOS tokenized without special tokens, checked against the model's logits."""
    eos = ""
    if append_eos:
        eos = tok.eos_token
        if not eos:
            raise InputError("the tokenizer has no EOS token; pass append_eos=False")
    ids_list: list[list[int]] = []
    step = 1000
    for s in range(0, len(texts), step):
        chunk = [t + eos for t in texts[s : s + step]]
        ids_list.extend(tok(chunk, add_special_tokens=False)["input_ids"])
    width = _logits_width(lm)
    top = max((max(ids) for ids in ids_list if ids), default=-1)
    if width is not None and top >= width:
        raise InputError(
            f"the tokenizer produces id {top} but the model has {width} logits: "
            "tokenizer and model do not match"
        )
    return ids_list


def _score_windows(
    lm: Any,
    ids_list: list[list[int]],
    windows: list[tuple[int, int, int, int]],
    batch_size: int,
    pad_id: int,
    dev: Any,
    dtype_: Any,
    progress: bool | None,
    desc: str,
) -> tuple[list[float], list[int]]:
    """The summed NLL and the scored tokens of every document, over its windows in batches."""
    import torch

    doc_nll = [0.0] * len(ids_list)
    doc_tokens = [0] * len(ids_list)
    bar = progress_bar(progress, len(windows), desc, "window")
    try:
        with torch.inference_mode():
            for b in range(0, len(windows), batch_size):
                batch = windows[b : b + batch_size]
                longest = max(e - s for _, s, e, _ in batch)
                rows = [ids_list[doc][s:e] for doc, s, e, _ in batch]
                inp = torch.full((len(batch), longest), pad_id, dtype=torch.long)
                for j, r in enumerate(rows):
                    inp[j, : len(r)] = torch.tensor(r, dtype=torch.long)
                logits = lm(input_ids=inp.to(dev), use_cache=False).logits
                for j, (doc, s, e, f) in enumerate(batch):
                    targets = inp[j, f - s : e - s].to(logits.device)
                    nll = _token_nll(logits[j, f - s - 1 : e - s - 1], targets)
                    total = float(nll.double().sum())
                    if not math.isfinite(total):
                        raise FuseLLMError(
                            f"non-finite NLL ({total}) in document {doc}, tokens {f}..{e}: the "
                            f"model overflows in {dtype_}; try dtype='float32'"
                        )
                    doc_nll[doc] += total
                    doc_tokens[doc] += e - f
                del logits
                bar.update(len(batch))
    finally:
        bar.close()
    return doc_nll, doc_tokens


def evaluate_perplexity(
    model: Any,
    data: Any,
    *,
    tokenizer: Any = None,
    text_column: str = "text",
    domain_column: str | None = "domain",
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    append_eos: bool = True,
    device: Any = None,
    dtype: Any = None,
    progress: bool | None = None,
) -> dict[str, dict[str, Any]]:
    """Held-out perplexity and bits per byte of a causal LM on a text set, per domain.

    Args:
        model: a model directory (loaded with ``AutoModelForCausalLM``, its tokenizer from the
            same directory unless ``tokenizer`` is given) or a loaded causal LM (``tokenizer``
            then required; its device and dtype are used as they are).
        data: a ``datasets.Dataset``, a ``save_to_disk`` directory, a JSONL / JSON / Parquet /
            Arrow file, a directory of text files, or a list of strings
            (:func:`fusellm.io.load_text_dataset`).
        tokenizer: a tokenizer directory or object (default: the model directory's).
        text_column: the column holding the texts.
        domain_column: the column naming each text's domain (one group per value). The default
            ``"domain"`` may be absent (then only the group ``"all"``); another name must exist.
            ``None``: no grouping.
        max_length: tokens per window (default: the model's context length).
        stride: tokens between window starts, in ``[1, max_length - 1]`` (default
            ``max_length - 1``: windows overlap by one token, every token scored once).
        batch_size: windows per forward pass (results do not depend on it).
        append_eos: read ``text + eos`` (the pipeline's convention) instead of ``text``.
        device: torch device (default: CUDA when available, else CPU).
        dtype: ``"auto"`` (default: bfloat16 / float16 on CUDA, float32 on CPU), ``"float32"``,
            ``"bfloat16"``, ``"float16"`` or a ``torch.dtype``. The log-softmax is float32 always.
        progress: progress bar (``None``: only on a terminal).

    Returns:
        ``{group: {"tokens", "nll", "ppl", "bytes", "bits_per_byte", "documents"}}`` for every
        domain (sorted) and ``"all"`` last. ``ppl`` / ``bits_per_byte`` are ``None`` for a group
        without scored tokens / bytes. Bits per byte are comparable across tokenizers (see the
        module docstring); perplexity only between models sharing a tokenizer.

    Raises:
        InputError: missing column, empty data set, unreadable model or tokenizer directory,
            a tokenizer whose ids exceed the model's logits, invalid settings.
    """
    texts = _load_texts(data, text_column, domain_column)
    return _evaluate(
        model,
        texts,
        tokenizer=tokenizer,
        max_length=max_length,
        stride=stride,
        batch_size=batch_size,
        append_eos=append_eos,
        device=device,
        dtype=dtype,
        progress=progress,
        desc="perplexity",
    ).groups


# --- several models, resumable output -----------------------------------------------------------


def _read_existing(path: Path) -> dict[str, Any] | None:
    from ..io import read_json_object

    obj = read_json_object(path)
    if obj is not None and not isinstance(obj.get("models", {}), dict):
        raise InputError(f"{str(path)!r} is not a fusellm evaluation output")
    return obj


def _model_paths(models: Any) -> dict[str, Path]:
    """Label -> model directory, checked."""
    if not isinstance(models, Mapping):
        raise InputTypeError(f"models must be a mapping label -> directory, got {type(models)}")
    if not models:
        raise InputError("no model to evaluate")
    paths: dict[str, Path] = {}
    for label, path in models.items():
        if not isinstance(label, str) or not label.strip():
            raise InputError(f"model labels must be non-empty strings, got {label!r}")
        if not isinstance(path, (str, os.PathLike)):
            raise InputTypeError(
                f"model {label!r}: expected a directory path, got {type(path).__name__}"
            )
        paths[label] = Path(path)
    return paths


def _previous_results(out_path: Path | None, data_fingerprint: str) -> dict[str, Any]:
    """The models already in ``out_path`` when it was computed on the same data (else none)."""
    existing = _read_existing(out_path) if out_path is not None else None
    if existing is None:
        return {}
    if (existing.get("data") or {}).get("fingerprint") == data_fingerprint:
        return dict(existing.get("models") or {})
    logger.warning("%s was computed on other data: its results are replaced", out_path)
    return {}


def run_evaluate(
    models: Mapping[str, str | os.PathLike[str]],
    data: Any,
    output: str | os.PathLike[str] | None,
    *,
    tokenizers: Mapping[str, Any] | None = None,
    text_column: str = "text",
    domain_column: str | None = "domain",
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    append_eos: bool = True,
    device: Any = None,
    dtype: Any = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Evaluates each labelled model directory on ``data``; writes ``output`` (JSON) atomically.

    The output is ``{"data": {"source", "rows", "text_column", "domain_column", "fingerprint"},
    "models": {label: {"path", "groups", "fingerprint", "settings"}}}``, ``groups`` as returned by
    :func:`evaluate_perplexity`, ``fingerprint`` the SHA-256 of the model's config and weights
    (:func:`fusellm.io.model_fingerprint`), ``settings`` the requested and the effective
    window settings. The file is rewritten after each model. A label already in an existing
    ``output`` with the same data fingerprint, model fingerprint and requested settings is not
    evaluated again; models of an existing output for the same data that are not requested now
    are kept; an output for other data is replaced. ``output=None``: nothing is written.

    Args:
        models: label -> model directory, e.g. ``{"fused": "work/train/fused"}``.
        data: as for :func:`evaluate_perplexity` (read and fingerprinted once).
        output: the JSON file, or ``None``.
        tokenizers: label -> tokenizer directory, for models saved without their tokenizer.
        text_column, domain_column, max_length, stride, batch_size, append_eos, device, dtype,
        progress: as for :func:`evaluate_perplexity`.

    Returns:
        The output object.
    """
    from ..io import atomic_write_json, fingerprint_dataset, model_fingerprint

    paths = _model_paths(models)
    tokenizers = dict(tokenizers or {})
    unknown = sorted(set(tokenizers) - set(paths))
    if unknown:
        raise InputError(f"tokenizers given for unknown model labels {unknown}")

    texts = _load_texts(data, text_column, domain_column)
    columns = [text_column] + ([texts.domain_column] if texts.domain_column else [])
    data_info = {
        "source": str(data) if isinstance(data, (str, os.PathLike)) else None,
        "rows": len(texts.texts),
        "text_column": text_column,
        "domain_column": texts.domain_column,
        "fingerprint": fingerprint_dataset(texts.dataset, columns),
    }
    out_path = Path(output) if output is not None else None
    result: dict[str, Any] = {"format": _FORMAT, "version": _VERSION, "data": data_info}
    result["models"] = _previous_results(out_path, data_info["fingerprint"])

    for label, path in paths.items():
        previous = result["models"].get(label)
        prev_fp = previous.get("fingerprint") if isinstance(previous, dict) else None
        fp = model_fingerprint(path, previous=prev_fp if isinstance(prev_fp, dict) else None)
        tok = tokenizers.get(label)
        requested = {
            "max_length": max_length,
            "stride": stride,
            "append_eos": append_eos,
            "dtype": "auto" if dtype is None else str(dtype).removeprefix("torch."),
            "tokenizer": str(tok) if isinstance(tok, (str, os.PathLike)) else None,
        }
        if (
            isinstance(previous, dict)
            and isinstance(prev_fp, dict)
            and prev_fp.get("sha256") == fp["sha256"]
            and (previous.get("settings") or {}).get("requested") == requested
            and isinstance(previous.get("groups"), dict)
        ):
            logger.info("%s: already evaluated on this data, skipped", label)
            continue
        res = _evaluate(
            path,
            texts,
            tokenizer=tok,
            max_length=max_length,
            stride=stride,
            batch_size=batch_size,
            append_eos=append_eos,
            device=device,
            dtype=dtype,
            progress=progress,
            desc=label,
        )
        result["models"][label] = {
            "path": str(path),
            "fingerprint": fp,
            "settings": {
                "requested": requested,
                "max_length": res.max_length,
                "stride": res.stride,
                "dtype": res.dtype,
            },
            "groups": res.groups,
        }
        if out_path is not None:
            atomic_write_json(out_path, result, sort_keys=False)
    if out_path is not None and not out_path.exists():
        atomic_write_json(out_path, result, sort_keys=False)
    return result


# --- command line --------------------------------------------------------------------------------


def format_table(result: Mapping[str, Any]) -> str:
    """A plain-text table of a :func:`run_evaluate` result: one row per model, perplexity and
    bits per byte per group."""
    models = result.get("models") or {}
    groups: list[str] = []
    for entry in models.values():
        for g in entry.get("groups") or {}:
            if g not in groups and g != GROUP_ALL:
                groups.append(g)
    groups = [*sorted(groups), GROUP_ALL]
    header = ["model"] + [f"{g} {m}" for g in groups for m in ("ppl", "bits/byte")]
    rows = [header]
    for label, entry in models.items():
        row = [label]
        for g in groups:
            stats = (entry.get("groups") or {}).get(g) or {}
            row.append(_fmt(stats.get("ppl"), 3))
            row.append(_fmt(stats.get("bits_per_byte"), 4))
        rows.append(row)
    return text_table(rows)


def text_table(rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table for the terminal: the first row is the header, underlined; the first
    column left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, r in enumerate(rows):
        cells = [r[0].ljust(widths[0])]
        cells += [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: Any, digits: int) -> str:
    if isinstance(value, (int, float)) and math.isfinite(value):
        return f"{value:.{digits}f}"
    return "-"


def parse_model_args(items: Sequence[str]) -> dict[str, str]:
    """``LABEL=DIR`` or ``DIR`` (labelled by its name) -> ``{label: dir}``.

    An argument that is an existing path is a ``DIR`` even if it contains ``=``.
    """
    out: dict[str, str] = {}
    for item in items:
        if "=" in item and not Path(item).exists():
            label, _, path = item.partition("=")
            if not label.strip() or not path:
                raise InputError(f"bad model argument {item!r}: expected LABEL=DIR or DIR")
        else:
            path = item
            label = Path(item.rstrip("/\\")).name or item
        if label in out:
            raise InputError(f"model label {label!r} is given twice: name them with LABEL=DIR")
        out[label] = path
    return out


def _setting(name: str) -> tuple[Any, str]:
    """The default and help text of an ``evaluate`` config key (declared once, in
    :class:`fusellm.config.EvaluateSettings`)."""
    import dataclasses

    from ..config import EvaluateSettings

    f = {f.name: f for f in dataclasses.fields(EvaluateSettings)}[name]
    factory: Any = f.default_factory
    default = factory() if f.default is dataclasses.MISSING else f.default
    return default, str(f.metadata.get("help", ""))


def add_evaluate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds the ``evaluate`` command to an ``argparse`` sub-parser collection."""
    p = subparsers.add_parser(
        "evaluate",
        help="held-out perplexity and benchmark tasks of model directories",
        description=(
            "With --data: held-out perplexity and bits per byte of causal LM directories on a "
            "text set, per domain and overall. Each text is read as text + EOS without special "
            "tokens, in windows of at most --max-length tokens that start --stride tokens apart "
            "(default max-length - 1: one token of overlap, every token after a document's first "
            "scored exactly once). Bits per byte compare models with different tokenizers; "
            "perplexity compares models sharing one. With --output, results are saved as JSON "
            "and a model already evaluated there on the same data is skipped. "
            "With --tasks: lm-evaluation-harness tasks (pip install 'fusellm[eval]'), registry "
            "names or local task files (--include-path); the harness's whole output per model "
            "and task goes to --output (default WORKDIR/evaluate/benchmarks for a work "
            "directory), and a model and task already done there are skipped. "
            "MODEL may be one pipeline work directory: its target before training, sources and "
            "finished training runs (fused, clm, ...), as `fusellm run` evaluates them."
        ),
        epilog="examples: fusellm evaluate 'target (before)=models/llama' fused=work/train/fused "
        "--data heldout.jsonl --output perplexity.json; "
        "fusellm evaluate work --tasks arc_challenge:25,hellaswag:10",
    )
    p.add_argument(
        "models",
        nargs="+",
        metavar="MODEL",
        help="LABEL=DIR or DIR (labelled by the directory name): a causal LM directory; or one "
        "pipeline work directory",
    )
    p.add_argument(
        "--data",
        default=None,
        help="perplexity: held-out texts, a save_to_disk directory, JSONL/JSON/Parquet/Arrow "
        "file, or a directory of text files",
    )
    p.add_argument("--text-column", default="text", help="column holding the text (default text)")
    p.add_argument(
        "--domain-column",
        default="domain",
        help="column naming each text's domain; results per domain and overall (default domain, "
        "used when present)",
    )
    p.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="tokens per window (default: the model's context length)",
    )
    p.add_argument(
        "--stride",
        type=int,
        default=None,
        help="tokens between window starts (default: max-length - 1)",
    )
    bench = p.add_argument_group("benchmarks (lm-evaluation-harness)")
    _, tasks_help = _setting("tasks")
    bench.add_argument(
        "--tasks",
        default=None,
        metavar="T1[:N],T2,...",
        help=f"comma-separated benchmark tasks. {tasks_help}",
    )
    for name, minimum in (("num_fewshot", 0), ("limit", 1)):
        default, text = _setting(name)
        bench.add_argument(
            "--" + name.replace("_", "-"),
            type=int,
            default=default,
            metavar="N",
            help=f"{text} (>= {minimum})",
        )
    default, text = _setting("include_path")
    bench.add_argument(
        "--include-path",
        action="append",
        default=list(default),
        metavar="DIR",
        help=f"{text} Repeatable.",
    )
    default, text = _setting("tasks_batch_size")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"perplexity: windows per forward pass (default 8); benchmarks: {text[0].lower()}"
        f"{text[1:-1]} (default {default})",
    )
    p.add_argument(
        "--dtype", choices=DTYPES, default="auto", help="model dtype (default auto: bf16 on GPU)"
    )
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.add_argument("--no-eos", action="store_true", help="do not append the EOS token")
    p.add_argument(
        "--output",
        default=None,
        help="perplexity: a JSON file for the results; benchmarks: a directory (resumable)",
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_evaluate_cli)
    return p


def _is_workdir(item: str) -> bool:
    path = Path(item)
    return (
        path.is_dir() and (path / "config.yaml").is_file() and not (path / "config.json").exists()
    )


def _cli_models(items: Sequence[str]) -> tuple[dict[str, str], dict[str, str], Path | None]:
    """The models of the command line: labelled directories, or those of one work directory
    (:func:`fusellm.pipeline.workdir_models`); and their tokenizers."""
    if not any(_is_workdir(i) for i in items):
        return parse_model_args(items), {}, None
    if len(items) > 1:
        raise InputError("give one work directory, or model directories (LABEL=DIR or DIR)")
    from ..pipeline import workdir_models

    models, tokenizers = workdir_models(items[0])
    return models, tokenizers, Path(items[0])


def _evaluate_cli(args: argparse.Namespace) -> int:
    models, tokenizers, workdir = _cli_models(args.models)
    if args.tasks is not None and args.data is not None:
        raise InputError("--data (perplexity) and --tasks (benchmarks): give one at a time")
    if args.tasks is not None:
        return _benchmark_cli(args, models, tokenizers, workdir)
    if args.data is None:
        raise InputError("nothing to evaluate: give --data (perplexity) or --tasks (benchmarks)")
    result = run_evaluate(
        models,
        args.data,
        args.output,
        tokenizers=tokenizers or None,
        text_column=args.text_column,
        domain_column=args.domain_column,
        max_length=args.max_length,
        stride=args.stride,
        batch_size=8 if args.batch_size is None else args.batch_size,
        append_eos=not args.no_eos,
        device=args.device,
        dtype=args.dtype,
        progress=False if args.no_progress else None,
    )
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    else:
        print(format_table(result))
        if args.output:
            print(f"\nwritten to {args.output}")
    return 0


def _benchmark_cli(
    args: argparse.Namespace,
    models: Mapping[str, str],
    tokenizers: Mapping[str, str],
    workdir: Path | None,
) -> int:
    from .benchmark import format_benchmark_table, run_benchmarks

    output = args.output
    if output is None and workdir is not None:
        output = workdir / "evaluate" / "benchmarks"
    summary = run_benchmarks(
        models,
        args.tasks,
        output,
        tokenizers=tokenizers or None,
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        include_path=args.include_path or None,
        batch_size=_setting("tasks_batch_size")[0] if args.batch_size is None else args.batch_size,
        device=args.device,
        dtype=args.dtype,
        progress=False if args.no_progress else None,
    )
    if args.json:
        print(json.dumps(summary, indent=2, ensure_ascii=False, default=str))
    else:
        print(format_benchmark_table(summary))
        if output is not None:
            print(f"\nwritten to {output}")
    return 0
