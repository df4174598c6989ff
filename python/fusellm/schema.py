"""The columns of every stage output, declared once.

Extraction (stage 2), alignment (3b) and packing (4) write ``save_to_disk`` datasets whose
columns are built here; the stages, :func:`fusellm.build_packed_dataset` and the tests read the
same declarations. A candidate is the target's own distribution (``ref``) or a source's; its
columns are prefixed with its name. The packed layout is the training schema of
``docs/training.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "DOMAIN_COLUMN",
    "PLAN_COLUMNS",
    "REF",
    "SPANS_COLUMN",
    "align_features",
    "candidate_features",
    "extract_features",
    "pack_features",
]

#: The target's own candidate.
REF = "ref"
#: Each row's (and packed block's majority) domain, when the input has one.
DOMAIN_COLUMN = "domain"
#: A plan-layout pack output's columns: per block, the aligned rows its pieces come from, each
#: piece's first token in its row and its length.
PLAN_COLUMNS = ("segment_rows", "segment_starts", "segment_lengths")
#: Per token of an extraction, its character span ``[start, end)`` in ``text + eos``
#: (:func:`fusellm.tokenization.char_spans`): the offsets alignment reads it instead of
#: tokenizing the texts again.
SPANS_COLUMN = "token_spans"


def _topk(dtype: str, k: int) -> Any:
    from datasets import List, Value

    return List(List(Value(dtype), length=k))


def extract_features(input_features: Mapping[str, Any], top_k: int, per_step_ce: bool) -> Any:
    """Stage 2: the input's columns, then per row its tokens, top-K values (float16) and ids,
    the row's mean next-token CE, its sizes and every token's character span."""
    import datasets
    from datasets import List, Value

    cols = dict(input_features)
    cols["row_index"] = Value("int64")
    cols["input_ids"] = List(Value("int32"))
    cols["per_step_logits"] = _topk("float16", top_k)
    cols["per_step_indices"] = _topk("int32", top_k)
    cols["metric_ce"] = Value("float32")
    if per_step_ce:
        cols["per_step_metric_ce"] = List(Value("float32"))
    cols["num_tokens"] = Value("int32")
    cols["num_bytes"] = Value("int32")
    cols[SPANS_COLUMN] = _topk("int32", 2)
    return datasets.Features(cols)


def candidate_features(
    name: str, k: int, logits_dtype: str, *, status: bool, scores: str
) -> dict[str, Any]:
    """One candidate's columns: its top-K ids and values, its alignment status per token
    (sources), and its scores: ``"row"`` (mean CE and token count of a row, stage 3b) or
    ``"block"`` (token-weighted mean CE and CE per byte of a packed block, stage 4)."""
    from datasets import List, Value

    cols: dict[str, Any] = {
        f"{name}_ids": _topk("int32", k),
        f"{name}_logits": _topk(logits_dtype, k),
    }
    status_col = {f"{name}_status": List(Value("uint8"))} if status else {}
    # (The orders are those of the first releases, so that outputs stay byte-identical.)
    if scores == "row":
        cols[f"{name}_metric_ce"] = Value("float32")
        cols[f"{name}_num_tokens"] = Value("int32")
        cols.update(status_col)
    elif scores == "block":
        cols.update(status_col)
        cols[f"{name}_metric_ce"] = Value("float32")
        cols[f"{name}_metric_ce_per_byte"] = Value("float32")
    else:  # pragma: no cover - internal
        raise ValueError(f"scores must be 'row' or 'block', got {scores!r}")
    return cols


def align_features(
    k_ref: int, sources: Mapping[str, int], logits_dtype: str, *, has_domain: bool
) -> Any:
    """Stage 3b: per row its text, index, bytes, domain, the target's tokens, then the ``ref``
    candidate and each source (``sources``: name -> K)."""
    import datasets
    from datasets import List, Value

    feats: dict[str, Any] = {
        "text": Value("string"),
        "row_index": Value("int64"),
        "num_bytes": Value("int32"),
        **({DOMAIN_COLUMN: Value("string")} if has_domain else {}),
        "input_ids": List(Value("int32")),
    }
    feats.update(candidate_features(REF, k_ref, logits_dtype, status=False, scores="row"))
    for name, k in sources.items():
        feats.update(candidate_features(name, k, logits_dtype, status=True, scores="row"))
    return datasets.Features(feats)


def pack_features(
    candidates: Mapping[str, tuple[int, str, bool]],
    *,
    position_ids: bool,
    has_domain: bool,
    layout: str = "copy",
) -> Any:
    """Stage 4, the training schema: per block its tokens, mask, position ids (``bfd``), bytes
    of text, majority domain, then per candidate (name -> (K, logits dtype, has status)) its
    columns with block scores. With ``layout="plan"``, instead of the per-token columns, the
    pieces of aligned rows the block is made of (:data:`PLAN_COLUMNS`: the aligned row, its
    first token, its length), in order."""
    import datasets
    from datasets import List, Value

    feats: dict[str, Any] = {}
    if layout == "plan":
        feats.update({name: List(Value("int64")) for name in PLAN_COLUMNS})
    else:
        feats["input_ids"] = List(Value("int32"))
        feats["attention_mask"] = List(Value("int8"))
        if position_ids:
            feats["position_ids"] = List(Value("int32"))
    feats["num_bytes"] = Value("float64")
    if has_domain:
        feats[DOMAIN_COLUMN] = Value("string")
    for name, (k, logits_dtype, status) in candidates.items():
        cols = candidate_features(name, k, logits_dtype, status=status, scores="block")
        if layout == "plan":
            cols = {c: f for c, f in cols.items() if c.endswith(("_metric_ce", "_per_byte"))}
        feats.update(cols)
    return datasets.Features(feats)
