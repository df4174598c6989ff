"""Stage 2: run one causal LM over every row and keep its top-K next-token distributions.

For each row (a split text), the model reads ``text + eos`` (no special tokens; both
configurable) and fusellm keeps, for every real position ``t`` (which predicts token ``t + 1``):

- the top-K values (float16) and their ids (int32), descending; ids that have no token in the
  tokenizer (padded vocabularies: 151,936 logits for 151,851 tokens) are excluded before the
  top-K, and also from the softmax of the cross-entropy. The values are exact log-probabilities
  by default (``values="logprobs"``: the logits minus the position's float32 log-sum-exp over the
  valid ids), so ``1 - Σ exp(value)`` is the mass the teacher puts outside its top-K; the
  reference stores the raw logits (``values="logits"``), whose softmax over K entries loses that
  mass. The manifest records which (key ``values``);
- ``metric_ce``: the mean next-token cross-entropy of tokens 2..L given their prefix (float32,
  computed from float32 log-probabilities; the first token is not scored). A row with one token
  has no scored token: its ``metric_ce`` is NaN and it is listed in the report and manifest;
- ``num_tokens`` and ``num_bytes`` (UTF-8 bytes of the text, so a CE per byte can be computed),
  ``row_index`` (the row in the input) and, optionally, ``per_step_metric_ce``.

Speed. Rows are sorted by length and batched under a token budget (dynamic padding: a batch is
padded to its own longest row, never to a fixed length). Padding is on the right and no attention
mask is passed: under causal attention a real position never sees the padding after it, so results
are those of unpadded single-row passes, and the fastest (causal) attention kernels apply. The top-K
is exact and cheap: the maximum of each group of 64 logits is taken in one pass, the K best groups
are selected, and the top-K is taken among their ``64 K`` candidates (the K best values always lie
in the K groups with the best maxima). On CUDA (or with ``fused_ce=True``) the group maxima and
the cross-entropy's float32 log-sum-exp come from one fused ``torch.compile`` kernel reading the
bf16 logits once (no float32 copy of the logits); otherwise, or if compilation fails, the CE is
``cross_entropy`` over float32 chunks. What remains is O(vocabulary) per position, against the
forward pass's O(width x vocabulary + layers). On CUDA the device->host copies of a
batch overlap the next batch's forward pass, and tokenization and writing run in a background
thread.

Storage. One HF dataset in ``save_to_disk`` layout: shards ``data-0000i-of-0000N.arrow`` (Arrow IPC
streams, lz4-compressed by default), ``state.json`` and ``dataset_info.json``, so
``datasets.load_from_disk`` opens it. Per-position arrays are ``list<fixed_size_list<K>>``: the
fixed inner lists need no per-position offsets (a row decodes to a dense ``[L, K]`` array), only
one offset per row. At K = 10 that is exactly 60 bytes per token before compression (40 for ids,
20 for logits) plus 4 for ``input_ids``; lz4 brings the whole row (text included) under that,
zstd further. Compressed shards are decompressed into memory when loaded; pass
``compression=None`` for memory-mapped shards.

Robustness. Shard ``i`` always holds the rows ``[i R, (i + 1) R)`` (``R = rows_per_shard``) and is
computed in a fixed batch order, so its bytes do not depend on which process computes it or when
(on the same kind of device, with the same number of threads: floating-point sums depend on them).
A shard is written under a temporary name and renamed, then its sidecar (``shards/*.json``: rows,
tokens, size, SHA-256) is written; a shard is finished when both exist and agree. A manifest
(``fusellm_manifest.json``) records the fingerprints of the model (config and weights), the
tokenizer files and the input's content, and every parameter that changes the bytes. The output
is a resumable artifact (:mod:`fusellm.artifact`): a re-run of a complete output with the same
inputs does nothing (not even loading the weights), a re-run of an interrupted one keeps its
finished shards (what killed writers left half-written is removed), and a directory made from
other inputs is refused (:class:`StaleArtifactError`) unless ``overwrite=True``. ``shard="i/N"``
(and each rank under ``torchrun``) computes only the shards ``s`` with ``s % workers == worker``,
under a lock of its own slot; whoever finishes last checks that all shards exist with the expected
row counts, writes the dataset metadata and completes the manifest with the output fingerprint.

All of the above is checked BEFORE anything is written: a missing text column, empty texts, an
unreadable model directory, a tokenizer that does not match the model's vocabulary, or an output
directory holding another run's shards raise an error and leave the file system untouched.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ExtractSettings, add_settings_arguments, settings_from_args
from ..distributed import add_worker_arguments, run_workers
from ..errors import FuseLLMError, InputError, InputTypeError
from ..loading import (
    load_causal_lm,
    load_model_config,
    load_tokenizer,
    resolve_device,
    torch_dtype,
)
from ..progress import progress_bar
from ..schema import SPANS_COLUMN, extract_features
from ..tokenization import char_spans
from ._common import (
    COMPRESSIONS,
    finished_shards,
    note_shard_digests,
    shard_done,
    shard_paths,
    worker_shards,
    worker_slot,
    write_shard,
)

__all__ = [
    "ExtractReport",
    "TopKEngine",
    "add_extract_parser",
    "check_tokenizer_vocab",
    "extract_topk",
    "finalize_extract",
    "grouped_topk",
    "plan_batches",
]

logger = logging.getLogger(__name__)

FORMAT = "fusellm.extract/2"  # 2: token_spans stored
#: Test hook: the process SIGKILLs itself after writing this many shards.
KILL_ENV = "FUSELLM_TEST_KILL_AFTER_SHARDS"
#: Columns the stage adds (the input's columns are kept).
OUTPUT_COLUMNS = (
    "row_index",
    "input_ids",
    "per_step_logits",
    "per_step_indices",
    "metric_ce",
    "per_step_metric_ce",
    "num_tokens",
    "num_bytes",
)
#: What the stored top-K values are: exact log-probabilities, or the raw logits (the reference).
VALUES = ("logprobs", "logits")
_GROUP = 64


# --- the compute engine (torch only) -------------------------------------------------------------


def grouped_topk(x: Any, k: int, group: int = _GROUP, *, group_max: Any = None) -> tuple[Any, Any]:
    """Exact ``torch.topk(x, k, dim=-1)`` of a contiguous 2-D tensor, via group maxima.

    The maximum of each run of ``group`` columns is taken in one pass; the top-K values lie in the
    ``k`` groups with the largest maxima (a group holding one of them has a maximum at least as
    large), so the top-K of those ``k * group`` candidates is the top-K of the row. Values are
    exact; among EQUAL values the ids chosen may differ from ``torch.topk``'s (both are valid).
    ``group_max`` may hold the maxima of the ``v // group`` full groups, computed elsewhere (the
    fused CE kernel computes them in the same pass). Returns ``(values, indices)`` sorted by
    descending value.
    """
    import torch

    n, v = x.shape
    if group < k:
        group, group_max = k, None
    if v < 4 * group * k:
        return torch.topk(x, k, dim=-1)
    ng = v // group
    # unfold: a view [n, ng, group], no copy whatever v is.
    gmax = x.unfold(1, group, group).amax(-1) if group_max is None else group_max.to(x.dtype)
    if v % group:
        gmax = torch.cat([gmax, x[:, ng * group :].amax(-1, keepdim=True)], dim=1)
    _, gidx = torch.topk(gmax, k, dim=-1, sorted=False)
    cand = (gidx.unsqueeze(-1) * group + torch.arange(group, device=x.device)).reshape(n, -1)
    if v % group:
        outside = cand >= v
        vals = x.gather(1, cand.clamp(max=v - 1)).masked_fill_(outside, -math.inf)
    else:
        vals = x.gather(1, cand)
    top, j = torch.topk(vals, k, dim=-1)
    return top, cand.gather(1, j)


def _stats_fused_impl(x: Any, group: int) -> tuple[Any, Any]:
    """Compiled: the maxima of the full groups of ``group`` logits (for :func:`grouped_topk`) and
    each row's float32 ``logsumexp(x)``, fused into one pass over ``x``."""
    import torch

    xf = x.float()
    n, v = xf.shape
    ng = v // group
    gmax = xf[:, : ng * group].reshape(n, ng, group).amax(-1)
    m = xf.amax(-1, keepdim=True)
    lse = torch.log(torch.exp(xf - m).sum(-1)) + m.squeeze(-1)
    return gmax, lse


_COMPILED: dict[str, Any] = {}


def _lse_eager(x: Any, chunk_rows: int) -> Any:
    """Each row's float32 ``logsumexp``, ``chunk_rows`` rows of float32 at a time."""
    import torch

    out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    for s in range(0, x.shape[0], chunk_rows):
        e = min(s + chunk_rows, x.shape[0])
        out[s:e] = torch.logsumexp(x[s:e].float(), dim=-1)
    return out


@dataclass
class BatchOutput:
    """One batch's results on the host, rows in batch order, padded to the batch length."""

    lengths: np.ndarray  # int64 [B]
    logits: np.ndarray  # float16 [B, L, K]
    ids: np.ndarray  # int32 [B, L, K]
    ce_sum: np.ndarray  # float64 [B]: sum of the per-step CE of each row
    per_step_ce: np.ndarray | None  # float32 [B, L - 1]


@dataclass
class _Pending:
    lengths: np.ndarray
    tensors: dict[str, Any]
    event: Any


class TopKEngine:
    """Runs a causal LM over right-padded batches and returns top-K logits/ids and CE sums.

    Args:
        model: a ``transformers`` causal LM (in eval mode, on its device).
        top_k: K.
        num_valid: ids ``>= num_valid`` have no token (padded vocabulary) and are excluded;
            ``None`` keeps every logit. ``invalid_ids`` excludes an explicit list instead.
        per_step_ce: also return each position's CE.
        values: ``"logprobs"``: the top-K values are exact log-probabilities (the logits minus
            the position's float32 log-sum-exp over the valid ids), so the row keeps the
            teacher's true probability mass; ``"logits"``: the raw logits (the reference's).
        fused_ce: compute the CE with a fused compiled reduction (``None``: on CUDA only).
        group: group width of :func:`grouped_topk`.

    :meth:`submit` launches a batch and returns a handle; :meth:`collect` waits for it. On CUDA,
    submitting batch ``i + 1`` before collecting batch ``i`` overlaps the copies with compute.
    """

    def __init__(
        self,
        model: Any,
        *,
        top_k: int = 10,
        num_valid: int | None = None,
        invalid_ids: Sequence[int] | None = None,
        per_step_ce: bool = False,
        values: str = "logits",
        fused_ce: bool | None = None,
        group: int = _GROUP,
        ce_chunk_bytes: int = 256 << 20,
    ) -> None:
        import torch

        if values not in VALUES:
            raise InputError(f"values must be one of {list(VALUES)}, got {values!r}")
        self.values = values
        self.model = model
        self.top_k = int(top_k)
        self.num_valid = num_valid
        self.per_step_ce = per_step_ce
        self.group = group
        self.ce_chunk_bytes = ce_chunk_bytes
        param = next(model.parameters())
        self.device = param.device
        self.cuda = self.device.type == "cuda"
        self.invalid = (
            torch.as_tensor(sorted(set(invalid_ids)), dtype=torch.long, device=self.device)
            if invalid_ids
            else None
        )
        self.fused_ce = self.cuda if fused_ce is None else bool(fused_ce)
        self.ce_path = "fused" if self.fused_ce else "eager"

    def _topk_and_ce(self, x: Any, targets: Any) -> tuple[Any, Any, Any]:
        """(top-K values, top-K ids, per-row CE) of the masked logits ``x`` ``[N, V]``; the
        values are log-probabilities with ``values="logprobs"``."""
        vals = idx = lse = None
        if self.fused_ce:
            import torch

            fn = _COMPILED.get("stats")
            if fn is None:
                fn = _COMPILED["stats"] = torch.compile(_stats_fused_impl, dynamic=True)
            try:
                gmax, lse = fn(x, self.group)
            except Exception as e:  # no compiler / backend: fall back, once, loudly
                logger.warning("fused CE unavailable (%s: %s); using eager", type(e).__name__, e)
                self.fused_ce = False
                self.ce_path = "eager"
            else:
                vals, idx = grouped_topk(x, self.top_k, self.group, group_max=gmax)
        if lse is None:
            vals, idx = grouped_topk(x, self.top_k, self.group)
            lse = _lse_eager(x, max(1, self.ce_chunk_bytes // (4 * x.shape[1])))
        ce = lse - x.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float()
        if self.values == "logprobs":
            vals = vals.float() - lse.unsqueeze(-1)
        return vals, idx, ce

    def forward_logits(self, input_ids: Any) -> Any:
        """The bare forward pass this engine runs (right padding, no attention mask)."""
        return self.model(input_ids=input_ids, use_cache=False).logits

    def submit(self, input_ids: np.ndarray, lengths: np.ndarray) -> _Pending:
        """Launches one batch: ``input_ids`` int ``[B, L]`` right-padded, ``lengths`` ``[B]``."""
        import torch

        lengths = np.asarray(lengths, dtype=np.int64)
        with torch.inference_mode():
            ids_cpu = torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64))
            ids = ids_cpu.pin_memory().to(self.device, non_blocking=True) if self.cuda else ids_cpu
            b, length = ids.shape
            logits = self.forward_logits(ids)
            v = logits.shape[-1]
            x = logits.reshape(b * length, v)
            if self.num_valid is not None and self.num_valid < v:
                x[:, self.num_valid :] = -math.inf
            if self.invalid is not None:
                x.index_fill_(1, self.invalid, -math.inf)
            targets = torch.zeros_like(ids)
            targets[:, :-1] = ids[:, 1:]
            vals, idx, ce = self._topk_and_ce(x, targets.reshape(-1))
            ce = ce.reshape(b, length)[:, :-1]
            steps = torch.arange(length - 1, device=self.device)
            lens = torch.from_numpy(lengths).to(self.device, non_blocking=True)
            scored = steps.unsqueeze(0) < (lens - 1).unsqueeze(1)
            ce = ce.masked_fill(~scored, 0.0)
            out = {
                "logits": vals.reshape(b, length, -1).to(torch.float16),
                "ids": idx.reshape(b, length, -1).to(torch.int32),
                "ce_sum": ce.double().sum(-1),
            }
            if self.per_step_ce:
                out["per_step_ce"] = ce
            event = None
            if self.cuda:
                host = {}
                for name, t in out.items():
                    buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                    buf.copy_(t, non_blocking=True)
                    host[name] = buf
                out = host
                event = torch.cuda.Event()
                event.record()
        return _Pending(lengths, out, event)

    def collect(self, pending: _Pending) -> BatchOutput:
        """Waits for a submitted batch and returns its results as numpy arrays."""
        if pending.event is not None:
            pending.event.synchronize()
        t = pending.tensors
        return BatchOutput(
            lengths=pending.lengths,
            logits=t["logits"].numpy(),
            ids=t["ids"].numpy(),
            ce_sum=t["ce_sum"].numpy(),
            per_step_ce=t["per_step_ce"].float().numpy() if "per_step_ce" in t else None,
        )

    def run(self, batches: Sequence[tuple[np.ndarray, np.ndarray]]) -> Iterator[BatchOutput]:
        """Runs ``(input_ids, lengths)`` batches in order, one batch in flight ahead."""
        pending: _Pending | None = None
        for ids, lengths in batches:
            nxt = self.submit(ids, lengths)
            if pending is not None:
                yield self.collect(pending)
            pending = nxt
        if pending is not None:
            yield self.collect(pending)


def plan_batches(
    lengths: Sequence[int] | np.ndarray, max_tokens: int, max_batch_size: int
) -> list[np.ndarray]:
    """Groups rows into batches by descending length (stable): each batch holds at most
    ``max_batch_size`` rows and ``rows * longest <= max_tokens`` padded tokens (a longer row
    runs alone). Returns the row indices of each batch."""
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    batches: list[np.ndarray] = []
    i = 0
    while i < len(order):
        longest = max(1, int(lengths[order[i]]))
        size = max(1, min(max_batch_size, max_tokens // longest))
        batches.append(order[i : i + size])
        i += size
    return batches


def pad_batch(rows: Sequence[np.ndarray], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads token id rows into an int64 ``[B, longest]`` array; returns it and the lengths."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    out = np.full((len(rows), int(lengths.max(initial=1))), pad_id, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out, lengths


# --- loading -------------------------------------------------------------------------------------


def _default_attn(device: Any, torch_dtype: Any) -> str:
    import importlib.util

    import torch

    if (
        device.type == "cuda"
        and torch_dtype in (torch.bfloat16, torch.float16)
        and importlib.util.find_spec("flash_attn") is not None
    ):
        return "flash_attention_2"
    return "sdpa"


def _vocab_size(config: Any) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    size = getattr(text, "vocab_size", None)
    if not isinstance(size, int) or size <= 0:
        raise InputError(f"the model config has no valid vocab_size ({size!r})")
    return size


def _ids_without_token(tokenizer: Any, n: int) -> list[int]:
    """Ids below ``n`` that have no token string (holes in a vocabulary): excluded like padding."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(n)))
    return [i for i, t in enumerate(tokens) if not isinstance(t, str)]


def check_tokenizer_vocab(tokenizer: Any, vocab_size: int, *, where: str = "") -> int:
    """Checks that a tokenizer fits a model's logits; returns the number of ids with a token.

    The model may have MORE logits than the tokenizer has tokens (padded vocabularies), within
    ``max(1024, 12.5%)``; a tokenizer with more ids than the model has logits, or a much smaller
    one, belongs to another model.
    """
    n = len(tokenizer)
    if n > vocab_size:
        raise InputError(
            f"the tokenizer{where} has {n} ids but the model has only {vocab_size} logits: it "
            "belongs to another model"
        )
    if vocab_size - n > max(1024, n // 8):
        raise InputError(
            f"the model has {vocab_size} logits but the tokenizer{where} only {n} ids: it "
            "belongs to another model (pass check_vocab=False to override)"
        )
    return n


# --- the stage -----------------------------------------------------------------------------------


@dataclass
class ExtractReport:
    """What :func:`extract_topk` did in this process."""

    output_dir: Path
    num_rows: int
    num_shards: int
    worker: tuple[int, int]
    shards_written: list[int] = field(default_factory=list)
    shards_skipped: list[int] = field(default_factory=list)
    complete: bool = False
    #: The output was already complete with these inputs: nothing was done.
    skipped: bool = False
    num_tokens: int = 0
    padded_tokens: int = 0
    num_batches: int = 0
    #: Wall time of the whole call, and of the shard loop alone (tokenize, forward, top-K, write).
    seconds: float = 0.0
    process_seconds: float = 0.0
    #: CPU time of the whole process (all threads) during the shard loop.
    process_cpu_seconds: float = 0.0
    nan_rows: list[int] = field(default_factory=list)
    bytes_written: int = 0
    attn_implementation: str = ""
    ce_path: str = ""
    device: str = ""

    @property
    def tokens_per_second(self) -> float:
        """Tokens written per second of the shard loop."""
        return self.num_tokens / self.process_seconds if self.process_seconds > 0 else 0.0

    def load(self) -> Any:
        """The finished dataset (``datasets.load_from_disk``)."""
        if not self.complete:
            raise FuseLLMError(f"{self.output_dir} is not complete yet (other shards are missing)")
        import datasets

        return datasets.load_from_disk(str(self.output_dir))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["output_dir"] = str(self.output_dir)
        d["tokens_per_second"] = self.tokens_per_second
        return d


def _check_texts(table: Any, text_column: str) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc

    col = table.column(text_column)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        raise InputTypeError(f"column {text_column!r} holds {col.type}, not strings")
    if col.null_count:
        first = pc.index(pc.is_null(col), True).as_py()
        raise InputError(
            f"column {text_column!r} has {col.null_count} null(s), first at row {first}"
        )
    empty = pc.equal(pc.utf8_length(col), 0)
    n_empty = pc.sum(empty).as_py() or 0
    if n_empty:
        first = pc.index(empty, True).as_py()
        raise InputError(
            f"column {text_column!r} has {n_empty} empty text(s), first at row {first}: drop them "
            "(fusellm split does) before extraction"
        )


class _Run:
    """Everything one extraction needs once the inputs are validated."""

    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


@dataclass
class _Inputs:
    """The validated inputs of an extraction: rows, model configuration, tokenizer, and the
    fingerprints and settings that make the output's key."""

    ds: Any
    table: Any
    model_dir: Path
    config: Any
    vocab_size: int
    tok: Any
    num_valid: int
    holes: list[int]
    eos: str
    device: Any
    dtype: Any
    fingerprints: dict[str, Any]
    key: dict[str, Any]


def extract_topk(
    data: Any,
    model: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    *,
    tokenizer: Any = None,
    text_column: str = "text",
    top_k: int = ExtractSettings.top_k,
    dtype: str = ExtractSettings.dtype,
    device: Any = ExtractSettings.device,
    attn_implementation: str | None = ExtractSettings.attn_implementation,
    append_eos: bool = True,
    add_special_tokens: bool = False,
    per_step_ce: bool = ExtractSettings.per_step_ce,
    values: str = ExtractSettings.values,
    rows_per_shard: int = ExtractSettings.rows_per_shard,
    max_tokens_per_batch: int = ExtractSettings.max_tokens_per_batch,
    max_batch_size: int = ExtractSettings.max_batch_size,
    compression: str | None = ExtractSettings.compression,
    shard: Any = None,
    overwrite: bool = False,
    on_stale: str | None = None,
    check_vocab: bool = True,
    fused_ce: bool | None = None,
    progress: bool | None = None,
) -> ExtractReport:
    """Extracts a model's top-K next-token distributions for every row (stage 2).

    Args:
        data: the rows (usually the output of :func:`fusellm.stages.split.split_texts`): a
            ``datasets.Dataset``, a path (``save_to_disk`` directory, JSONL, Parquet, ...) or a
            list of strings.
        model: a local directory holding a causal LM (``config.json`` and weights) and, unless
            ``tokenizer`` is given, its tokenizer.
        output_dir: where the dataset, its shards and its manifest go.
        tokenizer: a tokenizer directory or fast tokenizer object (default: ``model``).
        text_column: the column to read.
        top_k: K, the number of logits kept per position.
        dtype: ``"auto"`` (bf16 on CUDA, float32 on CPU), ``"bfloat16"``, ``"float16"``,
            ``"float32"``.
        device: a torch device (default: ``cuda:$LOCAL_RANK`` if available, else CPU).
        attn_implementation: default ``flash_attention_2`` when importable (CUDA, half
            precision), else ``sdpa``; ``eager`` if the model supports neither.
        append_eos, add_special_tokens: the model reads ``text + eos`` without special tokens by
            default (the reference's convention).
        per_step_ce: also store each position's CE (``per_step_metric_ce``, ``[L - 1]``).
        values: what ``per_step_logits`` holds: ``"logprobs"`` (default: exact top-K
            log-probabilities, log-softmax over the valid ids with a float32 log-sum-exp, so a
            row keeps the teacher's true probability mass) or ``"logits"`` (the raw logits, as
            the reference pipeline stores them). Recorded in the manifest; alignment, packing
            and training refuse to mix the two.
        rows_per_shard: rows per output shard (fixes the shard layout of the output).
        max_tokens_per_batch, max_batch_size: batch limits (padded tokens / rows).
        compression: shard compression, ``"lz4"`` (default: fast to read back), ``"zstd"``
            (about 30 % smaller, three times slower to read) or ``None``.
        shard: ``"i/N"`` to compute only this worker's shards (several machines); combined with
            ``torchrun``'s ranks.
        overwrite: replace an output directory made from other inputs instead of refusing.
        on_stale: ``"refuse"`` or ``"replace"`` such an output (default: from ``overwrite``;
            :mod:`fusellm.artifact`).
        check_vocab: refuse a tokenizer whose size does not fit the model's logits.
        fused_ce: fused compiled cross-entropy (default: on CUDA).
        progress: progress bar (default: only on a terminal).

    Returns:
        An :class:`ExtractReport`; ``report.load()`` opens the dataset once it is complete.
    """
    from ..artifact import Artifact, stale_policy

    t_start = time.perf_counter()
    settings = _check_settings(
        top_k=top_k,
        add_special_tokens=add_special_tokens,
        per_step_ce=per_step_ce,
        values=values,
        rows_per_shard=rows_per_shard,
        compression=compression,
        max_tokens=max_tokens_per_batch,
        max_batch_size=max_batch_size,
    )
    policy = stale_policy(overwrite, on_stale)
    worker, workers = worker_slot(shard)
    out = Path(output_dir)
    inp = _read_inputs(
        data,
        model,
        out,
        tokenizer=tokenizer,
        text_column=text_column,
        top_k=top_k,
        dtype=dtype,
        device=device,
        append_eos=append_eos,
        check_vocab=check_vocab,
        settings=settings,
    )
    num_rows, num_shards = inp.key["num_rows"], inp.key["num_shards"]
    art = Artifact(
        out, "extract", inp.key, resumable=True, describe="same model, tokenizer, rows and settings"
    )
    decision = art.decide(policy)
    if decision.done:  # nothing to do: do not even load the weights
        art.skipped()
        return _skipped_report(out, num_rows, num_shards, (worker, workers), t_start)

    return _extract(
        art,
        decision,
        inp,
        settings,
        (worker, workers),
        data=data,
        tokenizer=tokenizer,
        text_column=text_column,
        top_k=top_k,
        attn_implementation=attn_implementation,
        fused_ce=fused_ce,
        progress=progress,
        t_start=t_start,
    )


def _extract(
    art: Any,
    decision: Any,
    inp: _Inputs,
    settings: dict[str, Any],
    slot: tuple[int, int],
    *,
    data: Any,
    tokenizer: Any,
    text_column: str,
    top_k: int,
    attn_implementation: str | None,
    fused_ce: bool | None,
    progress: Any,
    t_start: float,
) -> ExtractReport:
    """Loads the weights and computes this worker's shards, under the output's lock."""
    out, per_step_ce = art.path, settings["per_step_ce"]
    num_rows, num_shards = inp.key["num_rows"], inp.key["num_shards"]
    # The weights (may still fail: nothing is written yet).
    attn = attn_implementation or _default_attn(inp.device, inp.dtype)
    lm, attn = load_causal_lm(inp.model_dir, inp.dtype, inp.device, attn, progress=progress)
    logits_width = lm.get_output_embeddings().weight.shape[0]
    if logits_width < inp.num_valid:
        raise InputError(f"the model has {logits_width} logits, fewer than {inp.num_valid} tokens")

    fields = _manifest_fields(inp, lm, int(logits_width), data, tokenizer, top_k, per_step_ce)
    with art.building(decision, fields, slot=f"{slot[0]}-of-{slot[1]}") as current:
        if current.done:  # another worker completed it meanwhile
            return _skipped_report(out, num_rows, num_shards, slot, t_start)
        run = _Run(
            out=out,
            table=inp.table,
            features=extract_features(inp.ds.features, top_k, per_step_ce),
            text_column=text_column,
            tok=inp.tok,
            eos=inp.eos,
            num_shards=num_shards,
            num_rows=num_rows,
            top_k=top_k,
            pad_id=int(inp.tok.eos_token_id if inp.tok.eos_token_id is not None else 0),
            max_positions=getattr(inp.config, "max_position_embeddings", None),
            **settings,
        )
        engine = TopKEngine(
            lm,
            top_k=top_k,
            num_valid=inp.num_valid,
            invalid_ids=inp.holes,
            per_step_ce=per_step_ce,
            values=settings["values"],
            fused_ce=fused_ce,
        )
        report = ExtractReport(out, num_rows, num_shards, slot, device=str(inp.device))
        report.attn_implementation = attn
        _run_worker(art, run, engine, report, progress)
    report.seconds = time.perf_counter() - t_start
    return report


def _check_settings(*, top_k: int, **settings: Any) -> dict[str, Any]:
    """The extraction settings, checked: those that change the bytes (key) and batch limits."""
    if top_k < 1:
        raise InputError(f"top_k must be positive, got {top_k}")
    limits = ("rows_per_shard", "max_tokens", "max_batch_size")
    if any(settings[k] < 1 for k in limits):
        raise InputError("rows_per_shard, max_tokens_per_batch and max_batch_size must be positive")
    if settings["compression"] not in COMPRESSIONS:
        raise InputError(
            f"compression must be one of {list(COMPRESSIONS)}, got {settings['compression']!r}"
        )
    if settings["values"] not in VALUES:
        raise InputError(f"values must be one of {list(VALUES)}, got {settings['values']!r}")
    return settings


def _read_inputs(
    data: Any,
    model: str | os.PathLike[str],
    out: Path,
    *,
    tokenizer: Any,
    text_column: str,
    top_k: int,
    dtype: str,
    device: Any,
    append_eos: bool,
    check_vocab: bool,
    settings: dict[str, Any],
) -> _Inputs:
    """Reads and checks the rows, the model configuration and the tokenizer (read-only), and
    makes the output's key from their fingerprints and the settings that change the bytes."""
    from ..io import (
        _as_arrow_table,
        fingerprint_dataset,
        load_text_dataset,
        model_fingerprint,
        read_manifest,
        tokenizer_fingerprint,
        tokenizer_object_fingerprint,
    )

    ds = load_text_dataset(data, text_column=text_column)
    clash = [c for c in OUTPUT_COLUMNS if c in ds.column_names]
    if clash:
        raise InputError(f"the input already has output column(s) {clash}")
    table = _as_arrow_table(ds)
    if table.num_rows == 0:
        raise InputError("the input has no rows")
    _check_texts(table, text_column)

    model_dir = Path(model)
    config = load_model_config(model_dir)
    vocab_size = _vocab_size(config)
    try:  # the previous run's fingerprints: files whose size and time did not change are not read
        previous = (read_manifest(out) or {}) if out.is_dir() else {}
    except InputError:
        previous = {}
    prev_fp = previous.get("fingerprints", {})
    model_fp = model_fingerprint(model_dir, previous=prev_fp.get("model"))
    tok_source = tokenizer if tokenizer is not None else model_dir
    tok = load_tokenizer(tok_source, fast=True)
    if isinstance(tok_source, (str, os.PathLike)):
        tok_fp = tokenizer_fingerprint(tok_source, previous=prev_fp.get("tokenizer"))
    else:
        tok_fp = {"sha256": tokenizer_object_fingerprint(tok), "files": []}
    num_valid = check_tokenizer_vocab(tok, vocab_size) if check_vocab else min(len(tok), vocab_size)
    holes = _ids_without_token(tok, num_valid)
    if num_valid - len(holes) < top_k:
        raise InputError(f"top_k={top_k} exceeds the {num_valid} ids of the tokenizer")
    eos = tok.eos_token if append_eos else ""
    if append_eos and not eos:
        raise InputError("the tokenizer has no EOS token; pass append_eos=False")
    dev = resolve_device(device)
    dtype_ = torch_dtype(dtype, dev)
    num_rows = table.num_rows
    key = {
        "format": FORMAT,
        "model_sha256": model_fp["sha256"],
        "tokenizer_sha256": tok_fp["sha256"],
        "input_sha256": fingerprint_dataset(table),
        "num_rows": num_rows,
        "text_column": text_column,
        "top_k": top_k,
        "dtype": str(dtype_).removeprefix("torch."),
        "append_eos": append_eos,
        "add_special_tokens": settings["add_special_tokens"],
        "per_step_ce": settings["per_step_ce"],
        "values": settings["values"],
        "rows_per_shard": settings["rows_per_shard"],
        "num_shards": math.ceil(num_rows / settings["rows_per_shard"]),
        "compression": settings["compression"],
        "num_valid_ids": num_valid,
        "ids_without_token": len(holes),
    }
    return _Inputs(
        ds=ds,
        table=table,
        model_dir=model_dir,
        config=config,
        vocab_size=vocab_size,
        tok=tok,
        num_valid=num_valid,
        holes=holes,
        eos=eos,
        device=dev,
        dtype=dtype_,
        fingerprints={"model": model_fp, "tokenizer": tok_fp},
        key=key,
    )


def _manifest_fields(
    inp: _Inputs,
    lm: Any,
    logits_width: int,
    data: Any,
    tokenizer: Any,
    top_k: int,
    per_step_ce: bool,
) -> dict[str, Any]:
    """What the manifest records besides the key: fingerprints, model, tokenizer, input."""
    model_dir = inp.model_dir
    return {
        "format": FORMAT,
        "fingerprints": inp.fingerprints,
        "model": {
            "path": str(model_dir.resolve()),
            "model_type": getattr(inp.config, "model_type", None),
            "vocab_size": inp.vocab_size,
            "logits_width": logits_width,
            "num_parameters": int(sum(p.numel() for p in lm.parameters())),
        },
        "tokenizer": {
            "path": str(Path(tokenizer).resolve())
            if isinstance(tokenizer, (str, os.PathLike))
            else (str(model_dir.resolve()) if tokenizer is None else type(tokenizer).__name__),
            "num_ids": len(inp.tok),
            "eos_token": inp.tok.eos_token,
        },
        "input": {"source": str(data) if isinstance(data, (str, Path)) else type(data).__name__},
        "schema_columns": list(extract_features(inp.ds.features, top_k, per_step_ce)),
    }


def _skipped_report(
    out: Path, num_rows: int, num_shards: int, slot: tuple[int, int], t_start: float
) -> ExtractReport:
    report = ExtractReport(out, num_rows, num_shards, slot, complete=True, skipped=True)
    report.shards_skipped = [s for s in range(num_shards) if s % slot[1] == slot[0]]
    report.seconds = time.perf_counter() - t_start
    return report


def _run_worker(
    art: Any, run: _Run, engine: TopKEngine, report: ExtractReport, progress: Any
) -> None:
    """Computes this worker's unfinished shards (the finished ones are kept: the resume), and
    completes the output when every worker's shards are there."""
    import torch

    worker, workers = report.worker
    todo = []
    for s in worker_shards((worker, workers), run.num_shards):
        if shard_done(run.out, s, run.num_shards):
            report.shards_skipped.append(s)
        else:
            todo.append(s)
    t_process, cpu_process = time.perf_counter(), time.process_time()
    _process_shards(run, engine, todo, report, progress)
    report.process_seconds = time.perf_counter() - t_process
    report.process_cpu_seconds = time.process_time() - cpu_process
    report.ce_path = engine.ce_path
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    if all(shard_done(run.out, s, run.num_shards) for s in range(run.num_shards)):
        _finalize(art, art.read_manifest() or {})
        report.complete = True
    if report.nan_rows:
        logger.warning(
            "%d row(s) have no scored token (metric_ce is NaN): %s",
            len(report.nan_rows),
            report.nan_rows[:10],
        )


def _tokenize_shard(run: _Run, index: int) -> dict[str, Any]:
    import pyarrow.compute as pc

    start = index * run.rows_per_shard
    stop = min(start + run.rows_per_shard, run.num_rows)
    part = run.table.slice(start, stop - start)
    col = part.column(run.text_column)
    texts = col.to_pylist()
    backend = run.tok.backend_tokenizer
    if backend.truncation is not None or backend.padding is not None:
        import tokenizers

        backend = tokenizers.Tokenizer.from_str(backend.to_str())
        backend.no_truncation()
        backend.no_padding()
    # With offsets (not encode_batch_fast): the spans are stored, so that alignment never
    # tokenizes again.
    encs = backend.encode_batch(
        [t + run.eos for t in texts], add_special_tokens=run.add_special_tokens
    )
    rows = [np.asarray(e.ids, dtype=np.int32) for e in encs]
    spans = [char_spans(t, e.offsets, run.eos) for t, e in zip(texts, encs, strict=True)]
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    if (lengths == 0).any():
        raise InputError(f"row {start + int(np.argmin(lengths))} tokenizes to no token")
    if run.max_positions and lengths.max() > run.max_positions:
        logger.warning(
            "shard %d: a row has %d tokens, more than the model's %d positions",
            index,
            int(lengths.max()),
            run.max_positions,
        )
    return {
        "index": index,
        "start": start,
        "part": part,
        "rows": rows,
        "spans": spans,
        "lengths": lengths,
        "num_bytes": pc.binary_length(col.cast("large_binary")).to_numpy().astype(np.int32),
    }


def _assemble(
    run: _Run, shard: dict[str, Any], results: dict[int, tuple[Any, int]]
) -> tuple[Any, np.ndarray]:
    """The shard's Arrow table, rows in input order."""
    import pyarrow as pa

    lengths = shard["lengths"]
    n = len(lengths)
    k = run.top_k
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    flat_logits = np.empty((total, k), dtype=np.float16)
    flat_ids = np.empty((total, k), dtype=np.int32)
    ce_sum = np.zeros(n, dtype=np.float64)
    step_offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.maximum(lengths - 1, 0), out=step_offsets[1:])
    flat_steps = np.empty(int(step_offsets[-1]), dtype=np.float32) if run.per_step_ce else None
    for row, (batch, j) in results.items():
        a, b = offsets[row], offsets[row + 1]
        length = b - a
        flat_logits[a:b] = batch.logits[j, :length]
        flat_ids[a:b] = batch.ids[j, :length]
        ce_sum[row] = batch.ce_sum[j]
        if flat_steps is not None:
            flat_steps[step_offsets[row] : step_offsets[row + 1]] = batch.per_step_ce[
                j, : length - 1
            ]
    if total * k >= 2**31:
        raise InputError(
            f"shard {shard['index']} holds {total} positions: too many for one Arrow list column; "
            "lower rows_per_shard"
        )
    scored = lengths - 1
    with np.errstate(invalid="ignore", divide="ignore"):
        metric = np.where(scored > 0, ce_sum / np.maximum(scored, 1), np.nan).astype(np.float32)
    input_ids = np.concatenate(shard["rows"]) if n else np.empty(0, np.int32)

    def nested(values: np.ndarray) -> Any:
        inner = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), k)
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), inner)

    new = {
        "row_index": pa.array(np.arange(shard["start"], shard["start"] + n, dtype=np.int64)),
        "input_ids": pa.ListArray.from_arrays(
            pa.array(offsets.astype(np.int32)), pa.array(input_ids.astype(np.int32))
        ),
        "per_step_logits": nested(flat_logits),
        "per_step_indices": nested(flat_ids),
        "metric_ce": pa.array(metric),
        "num_tokens": pa.array(lengths.astype(np.int32)),
        "num_bytes": pa.array(shard["num_bytes"]),
        SPANS_COLUMN: pa.ListArray.from_arrays(
            pa.array(offsets.astype(np.int32)),
            pa.FixedSizeListArray.from_arrays(
                pa.array(
                    (np.concatenate(shard["spans"]) if n else np.empty((0, 2), np.int64))
                    .astype(np.int32)
                    .reshape(-1)
                ),
                2,
            ),
        ),
    }
    if flat_steps is not None:
        new["per_step_metric_ce"] = pa.ListArray.from_arrays(
            pa.array(step_offsets.astype(np.int32)), pa.array(flat_steps)
        )
    part = shard["part"].combine_chunks()
    schema = run.features.arrow_schema
    arrays = [new[f.name] if f.name in new else part.column(f.name).cast(f.type) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema).combine_chunks(), metric


def _write_shard(
    run: _Run, shard: dict[str, Any], table: Any, metric: np.ndarray
) -> dict[str, Any]:
    nan_rows = (shard["start"] + np.flatnonzero(np.isnan(metric))).tolist()
    info = {
        "index": shard["index"],
        "row_start": shard["start"],
        "num_rows": len(shard["lengths"]),
        "num_tokens": int(shard["lengths"].sum()),
        "nan_rows": nan_rows,
    }
    return write_shard(run.out, shard["index"], run.num_shards, table, run.compression, info)


_KILL_COUNT = [0]


def _maybe_kill() -> None:
    limit = os.environ.get(KILL_ENV)
    if limit:
        _KILL_COUNT[0] += 1
        if _KILL_COUNT[0] >= int(limit):
            os.kill(os.getpid(), signal.SIGKILL)


def _process_shards(
    run: _Run, engine: TopKEngine, todo: Sequence[int], report: ExtractReport, progress: Any
) -> None:
    if not todo:
        return
    total = sum(
        min((s + 1) * run.rows_per_shard, run.num_rows) - s * run.rows_per_shard for s in todo
    )
    bar = progress_bar(progress, total, "extract", "row")
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fusellm-extract") as pool:
        next_tok: Future[dict[str, Any]] = pool.submit(_tokenize_shard, run, todo[0])
        writing: Future[dict[str, Any]] | None = None
        try:
            for pos in range(len(todo)):
                shard = next_tok.result()
                if pos + 1 < len(todo):
                    next_tok = pool.submit(_tokenize_shard, run, todo[pos + 1])
                plan = plan_batches(shard["lengths"], run.max_tokens, run.max_batch_size)
                batches = [pad_batch([shard["rows"][i] for i in b], run.pad_id) for b in plan]
                results: dict[int, tuple[Any, int]] = {}
                for rows, out in zip(plan, engine.run(batches), strict=True):
                    for j, row in enumerate(rows.tolist()):
                        results[row] = (out, j)
                    report.padded_tokens += int(out.logits.shape[0] * out.logits.shape[1])
                    report.num_batches += 1
                    bar.update(len(rows))
                if writing is not None:
                    _record(report, writing.result())
                # Assembling (copies) and writing (compression) overlap the next shard's passes.
                writing = pool.submit(_assemble_and_write, run, shard, results)
            if writing is not None:
                _record(report, writing.result())
        finally:
            bar.close()
    logger.info(
        "extracted %d tokens in %.1f s (%.0f tokens/s)",
        report.num_tokens,
        time.perf_counter() - t0,
        report.num_tokens / max(time.perf_counter() - t0, 1e-9),
    )


def _assemble_and_write(
    run: _Run, shard: dict[str, Any], results: dict[int, tuple[Any, int]]
) -> dict[str, Any]:
    table, metric = _assemble(run, shard, results)
    info = _write_shard(run, shard, table, metric)
    _maybe_kill()
    return info


def _record(report: ExtractReport, info: dict[str, Any]) -> None:
    report.shards_written.append(info["index"])
    report.num_tokens += info["num_tokens"]
    report.bytes_written += info["bytes"]
    report.nan_rows.extend(info["nan_rows"])


def finalize_extract(
    output_dir: str | os.PathLike[str], *, verify_hashes: bool = False
) -> dict[str, Any]:
    """Checks that every shard of an extraction exists with the expected rows, then writes the
    ``save_to_disk`` metadata and completes the manifest (with the output fingerprint,
    :meth:`fusellm.artifact.Artifact.complete`). Returns the manifest.

    Raises :class:`FuseLLMError` listing missing shards, or :class:`StaleArtifactError` when a
    shard does not match its sidecar (size, row range, or SHA-256 with ``verify_hashes``).
    """
    from ..artifact import Artifact
    from ..io import read_manifest

    out = Path(output_dir)
    manifest = read_manifest(out)
    if manifest is None or manifest.get("stage") != "extract":
        raise FuseLLMError(f"{out} is not an extraction output (no extract manifest)")
    art = Artifact(out, "extract", manifest["key"], resumable=True)
    return _finalize(art, manifest, verify_hashes=verify_hashes)


def _finalize(art: Any, manifest: dict[str, Any], *, verify_hashes: bool = False) -> dict[str, Any]:
    import datasets

    from ..io import shard_file_name, write_dataset_metadata

    out = art.path
    key = manifest["key"]
    num_shards, rows_per_shard, num_rows = key["num_shards"], key["rows_per_shard"], key["num_rows"]
    infos = finished_shards(out, num_shards, rows_per_shard, num_rows, verify_hashes=verify_hashes)
    note_shard_digests(art, infos, num_shards)
    features = datasets.Features.from_dict(_features_dict(manifest, out))
    files = [shard_file_name(s, num_shards) for s in range(num_shards)]
    write_dataset_metadata(
        out, features, files, fingerprint=key["input_sha256"][:8] + key["model_sha256"][:8]
    )
    total_tokens = sum(i["num_tokens"] for i in infos)
    total_bytes = sum(i["bytes"] for i in infos)
    totals = {
        "num_rows": num_rows,
        "num_tokens": total_tokens,
        "bytes": total_bytes,
        "bytes_per_token": total_bytes / max(total_tokens, 1),
        "nan_rows": [r for i in infos for r in i["nan_rows"]],
    }
    shards = [
        {k: i[k] for k in ("index", "row_start", "num_rows", "num_tokens", "bytes", "sha256")}
        for i in infos
    ]
    return dict(art.complete({"totals": totals, "shards": shards}))


def _features_dict(manifest: dict[str, Any], out: Path) -> dict[str, Any]:
    """The features of the shards, read from the first shard's schema metadata."""
    import json

    import pyarrow as pa

    arrow, _ = shard_paths(out, 0, manifest["key"]["num_shards"])
    with pa.memory_map(str(arrow)) as src:
        schema = pa.ipc.open_stream(src).schema
    meta = json.loads(schema.metadata[b"huggingface"])
    return meta["info"]["features"]


# --- command line --------------------------------------------------------------------------------


def add_extract_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds the ``extract`` command to an ``argparse`` sub-parser collection."""
    p = subparsers.add_parser(
        "extract",
        help="run a model over split texts and store its top-K distributions",
        description=(
            "Run the causal LM in MODEL (a local directory with its tokenizer) over the rows of "
            "INPUT and store, per position, the top-K logits and ids, plus each row's CE, as a "
            "sharded HF dataset in OUTPUT. Re-running resumes; --shard i/N splits the work "
            "across machines; under torchrun each rank takes its own shards."
        ),
    )
    p.add_argument("input", help="rows (a save_to_disk directory, JSONL, Parquet, ...)")
    p.add_argument("model", help="local model directory")
    p.add_argument("output", help="output directory")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: MODEL)")
    p.add_argument("--text-column", default="text", help="column holding the text")
    p.add_argument("--no-eos", action="store_true", help="do not append the EOS token")
    p.add_argument("--add-special-tokens", action="store_true", help="add BOS etc.")
    add_settings_arguments(p, ExtractSettings)
    add_worker_arguments(p, "extract")
    p.add_argument("--overwrite", action="store_true", help="replace another run's output")
    p.add_argument("--no-check-vocab", action="store_true", help="skip the vocabulary check")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--finalize", action="store_true", help="only check the shards and write the metadata"
    )
    p.set_defaults(func=_extract_cli)
    return p


def _extract_cli(args: argparse.Namespace) -> int:
    if args.finalize:
        manifest = finalize_extract(args.output)
        t = manifest["totals"]
        print(f"{args.output}: complete, {t['num_rows']} rows, {t['num_tokens']} tokens")
        return 0
    report = run_workers(
        "extract",
        args,
        args.input,
        args.model,
        args.output,
        tokenizer=args.tokenizer,
        text_column=args.text_column,
        append_eos=not args.no_eos,
        add_special_tokens=args.add_special_tokens,
        **settings_from_args(args, ExtractSettings),
        overwrite=args.overwrite,
        check_vocab=not args.no_check_vocab,
        progress=False if args.no_progress else None,
    )
    if report.skipped:
        print(f"{args.output}: up to date (same model, tokenizer, rows and settings); skipped")
        return 0
    state = "complete" if report.complete else "partial (other shards pending)"
    print(
        f"{args.output}: {state}; wrote {len(report.shards_written)} shard(s), skipped "
        f"{len(report.shards_skipped)}; {report.num_tokens} tokens in {report.seconds:.1f} s "
        f"({report.tokens_per_second:.0f} tokens/s)"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fusellm.stages.extract`` (e.g. under ``torchrun``): ``fusellm extract``,
    its errors included."""
    from ..cli import main as cli_main

    return cli_main(["extract", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
