"""Fusion losses, the packed-data schema that training reads, and the batch collator.

The loss (spec section 7)
-------------------------
Candidates are ``ref`` (the target model's own top-K) and the aligned sources. Each candidate has,
per position ``t`` of a packed block, a row of at most ``K`` (id, logit) pairs, and one score per
block (a cross-entropy, lower is better) turned into ``s_c = exp(-score_c)``. A row with no valid
entry is "empty" and is replaced by the ref row at that position.

- teacher distribution of a row: ``P^c_t = softmax(logits / T)`` over its valid entries only;
- MinCE (``fusion="mince"``): per block ``c* = argmax_c s_c`` (ties: first, i.e. ref), ``Q = P^c*``;
- AvgCE (``fusion="avgce"``): per block ``w = softmax(s)`` across candidates, ``Q = Σ_c w_c P^c``;
- ``L_fuse = Σ_t m_t · (-Σ_v Q_t[v] · log softmax(z_t)[v]) / Σ_t m_t`` with ``m`` the attention
  mask and NO shift: teacher row ``t`` and student logits ``z_t`` both predict token ``t + 1``;
  ``distill_loss="kl"`` adds ``Σ_v Q log Q`` (a constant: same gradient, the value is a KL);
- ``L = λ L_clm + (1-λ) L_fuse`` (``combine="hard"``); ``"hard_and_decay"`` raises ``λ`` linearly
  to 1 over training (``λ + (1-λ)·progress``); ``"soft"`` uses ``(1-s_max) L_clm + s_max L_fuse``
  with ``s_max`` the block's largest candidate score; ``"gated"`` uses ``λ`` where the fused rows
  predict the block better than the student does now, else ``L_clm`` alone; ``"decoupled"`` is
  that gate on the true token's part of each row only (below).

With several blocks in a batch every term is a token-level mean over the batch (as the usual CLM
loss is): per-block weights (``soft``) multiply that block's token losses before the sums.

The calibrated teacher (``teacher="calibrated"``, spec section 11)
-----------------------------------------------------------------
The reference's softmax over a row's K entries teaches the row as if it held all the teacher's
probability; a weak teacher whose top-K holds half of its mass is then taught as twice as sure
as it is, and the student is pushed to put nearly nothing elsewhere. With rows of exact
log-probabilities (``fusellm extract --values logprobs``) the row's entries ``p_k`` keep their
mass and the rest, ``1 - Σ p_k``, is one more bin, "every other token". Per position::

    -Σ_k p_k log q_k - (1 - Σ_k p_k) log(1 - Σ_k q_k),     q_k = softmax(z)[id_k]

the exact cross-entropy between the teacher's and the student's coarsening of the vocabulary into
the row's ids and the rest. It stays sparse: ``log(1 - Σ q)`` comes from the gathered values,
except where the student puts more than ``1 - 1e-3`` of its mass on the row, where it is summed
over the other ids (exact, see :class:`_LogSoftmaxGatherTail`). Empty rows are replaced by the ref
row as above; AvgCE mixes the candidates' rows id by id and their tails by weight, and the
student's tail is the mass outside every id of the mixture. With ``T != 1`` a row keeps its mass
and is reshaped within it, ``Σ p · softmax(log p / T)``: the tail is the teacher's at ``T = 1``,
all the row can tell.

Where the tail goes (``teacher_tail``) and when a teacher teaches (``combine="gated"``)
-----------------------------------------------------------------------------------
``teacher_tail="label"`` (default): where the next target token is not among the fused row's
ids, the data says which of the tokens the teacher did not list occurred, so the tail mass is a
target on that token, ``-(1 - Σ p) log q_y``, instead of on the student's whole outside mass;
elsewhere the tail stays one bin (``"bin"``: one bin everywhere, the formula above). A row with
no entry at all (nothing aligned, no ref row) teaches nothing either way. The teacher then
constrains only what it is sure of and the data fills the rest, so a stronger fusion weight no
longer starves the student of the tokens the rows do not list.

``combine="gated"`` (calibrated rows): per block, the fused rows and the student, as it is at
this step, are judged on the same coarsening (the row's ids and the tail bin) by the summed
log-probability of the bin that holds each true next token, over the positions with a next
token whose picked row is the candidate's own (``teacher_matched``; an alignment fallback is a
one-hot of the true token and would always win). Where the rows are better the block trains
with ``λ L_clm + (1-λ) L_fuse``; elsewhere with ``L_clm`` alone (``λ = 1``). The judge is what
the rows actually teach (their aligned, truncated form, not the source's own CE, which
overstates it), in the units of the loss (target tokens), and a log score is proper: the better
of the two in expectation is the one closer to the true coarse distribution.

``combine="decoupled"`` (calibrated rows) closes only what the gate judges. Per position the
fusion CE splits exactly into a target part and a non-target part (decoupled knowledge
distillation, Zhao et al., CVPR 2022): with ``P_y`` the fused row's mass on the bin holding the
true next token ``y`` (its id; with the label tail, the tail mass where the row does not list
it) and ``q_y`` the student's,

    CE(P, q) = CE((P_y, 1 - P_y), (q_y, 1 - q_y)) + NCKD,
    NCKD = -Σ_{b ≠ y} P_b log(q_b / (1 - q_y))

over the row's other bins. The gate compares ``P_y`` with ``q_y``, so that is what it may
refuse: in a closed block the target part's ``P_y`` is replaced by the data's one-hot (the CLM
term) and the non-target part stays, ``L_clm + (1-λ) NCKD``; open blocks train as ``"gated"``
does. NCKD does not move the student's logit of ``y`` at all (its gradient there is 0): it
teaches how the teacher ranks the tokens that did not occur, which the data cannot tell and
which a source knows on text where it predicts the true token no better than the student. Its
``log(1 - q_y)`` is the student's mass outside ``y`` gathered as one more tail (exact however
close ``q_y`` comes to 1); ``distill_loss="kl"`` makes it a KL over the same bins.

Selection (``selection``) and the student (``with_student``)
------------------------------------------------------------
``"block"`` ranks the candidates per block by their block score (above); ``"token"`` ranks them
per position by each row's probability of the next target token (a row's tail spread evenly
over the ids it does not list), among the rows that are the candidate's own distribution (not an
alignment fallback: ``teacher_matched``). With ``with_student`` (MinCE) the student itself, as it
is at this step, is one more candidate, judged the same way (its CE on the block, or its
probability of the next token): where it is the best, its own detached distribution is the
target, which has no gradient, so a teacher only teaches where it knows more than the student
does now, and the stale ``ref`` distribution never pulls the student back.

Trade-off: the reference builds a dense ``[L, V]`` target per candidate and stacks them (gigabytes
per sample). The same loss needs only a gather of at most ``K`` student log-probabilities per
position per candidate, so this module never materialises a dense teacher tensor. The student's
float32 log-softmax is never stored either: :func:`log_softmax_gather` computes it once, in
float32 and in chunks of rows, gathers the CLM target and the teacher ids from the same pass, and
recomputes the softmax chunk by chunk in the backward pass. Its peak memory is the logits and their
gradient, below a plain CLM step's (which also keeps a float32 log-softmax and a dense gradient of
it), and it runs torch's fused softmax kernels, as fast as the plain cross-entropy.

Packed-data schema (one row = one block of ``L`` tokens)
--------------------------------------------------------
==================================== ================= ==========================================
column                               type              meaning
==================================== ================= ==========================================
``input_ids``                        int32 ``[L]``     target-model token ids
``attention_mask`` (optional)        int ``[L]``       1 = real token (default: all ones)
``position_ids`` (optional)          int ``[L]``       passed to the model as is
``{c}_ids``                          int32 ``[L, K]``  candidate ``c``'s top-K ids, ``-1`` padded
``{c}_logits``                       float16/32        matching logits, ``-inf`` padded
                                     ``[L, K]``
``{c}_metric_ce``                    float32           ``c``'s mean next-token CE on the block
``{c}_metric_ce_per_byte``           float32           ``c``'s CE per byte of the block's text
(for ``score="ce_per_byte"``)                          (nats); or, instead, ``num_bytes`` (block)
                                                       and ``{c}_num_tokens`` (tokens ``c``
                                                       scored; ref defaults to the block's tokens)
==================================== ================= ==========================================

Candidates ``c`` are ``"ref"`` and the source names. An entry is valid when its id is ``>= 0``
and its logit is ``> -inf``; a row with no valid entry is empty. Rows must not repeat an id (the
alignment stage guarantees it); a repeated id would count twice. Blocks may be shorter than the
others (the remainder block): the collator pads to the longest block of the batch. ``K`` may
differ between candidates. :func:`build_packed_dataset` writes this schema from arrays.
"""

from __future__ import annotations

import math
import re
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from .errors import InputError, InputTypeError
from .schema import REF

if TYPE_CHECKING:
    import datasets

__all__ = [
    "REF",
    "FusionCollator",
    "FusionLossOutput",
    "build_packed_dataset",
    "detect_candidates",
    "fusion_loss",
    "log_softmax_gather",
    "validate_packed",
]

Fusion = Literal["mince", "avgce"]
Combine = Literal["hard", "hard_and_decay", "soft", "advantage", "gated", "decoupled"]
DistillLoss = Literal["ce", "kl"]
Score = Literal["ce", "ce_per_byte"]
Teacher = Literal["renormalized", "calibrated"]
Selection = Literal["block", "token"]
TeacherTail = Literal["bin", "label"]

# The choices as tuples, from the Literals above (each declared once; FusionConfig's fields are
# annotated with the same Literals).
FUSIONS: tuple[str, ...] = typing.get_args(Fusion)
COMBINES: tuple[str, ...] = typing.get_args(Combine)
#: The combines that judge the fused rows against the student (calibrated rows only).
GATED_COMBINES = ("gated", "decoupled")
DISTILL_LOSSES: tuple[str, ...] = typing.get_args(DistillLoss)
SCORES: tuple[str, ...] = typing.get_args(Score)
TEACHERS: tuple[str, ...] = typing.get_args(Teacher)
SELECTIONS: tuple[str, ...] = typing.get_args(Selection)
TEACHER_TAILS: tuple[str, ...] = typing.get_args(TeacherTail)

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")
#: Float32 elements per chunk of rows in :func:`log_softmax_gather`, by device type: chunks that
#: stay in cache between the softmax and the scaled write (CPU: 1 MiB, ~2x faster than one pass
#: over the whole tensor; CUDA: 16 MiB, a third of an H100's L2, a few dozen launches per step).
CHUNK_ELEMENTS = {"cpu": 1 << 18, "cuda": 1 << 22}


def check_choice(name: str, value: object, choices: Sequence[object]) -> None:
    """Raise :class:`InputError` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise InputError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_candidate_name(name: object) -> str:
    """Return ``name`` if it is a usable candidate (column prefix) name."""
    if not isinstance(name, str):
        raise InputTypeError(f"a candidate name must be a str, got {type(name).__name__}")
    if not _NAME.match(name) or name in ("input", "position", "labels", "attention"):
        raise InputError(
            f"bad candidate name {name!r}: use letters, digits, '_', '.', '-'; start with a letter"
        )
    return name


# ------------------------------------------------------------------------------------------------
# The sparse loss
# ------------------------------------------------------------------------------------------------


class _LogSoftmaxGather(torch.autograd.Function):
    """``log_softmax(logits.float())`` gathered at ``index``, without storing the log-softmax.

    Forward and backward run chunk by chunk of rows through torch's fused (log-)softmax kernels:
    one pass over each chunk forward, one softmax pass plus one scaled write backward.
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, index: torch.Tensor, rows: int) -> torch.Tensor:
        n = logits.shape[0]
        out = torch.empty(index.shape, dtype=torch.float32, device=logits.device)
        for a in range(0, n, rows):
            lp = torch.log_softmax(logits[a : a + rows].float(), dim=-1)
            out[a : a + rows] = lp.gather(1, index[a : a + rows])
            del lp
        ctx.save_for_backward(logits, index)
        ctx.rows = rows
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        logits, index = ctx.saved_tensors
        rows = ctx.rows
        grad = torch.empty_like(logits)
        grad_out = grad_out.float()
        neg_total = grad_out.sum(-1, keepdim=True).neg_()
        for a in range(0, logits.shape[0], rows):
            # d(z_i - lse)/dz = e_i - softmax(z): minus p * the summed gradient, plus a scatter.
            p = torch.softmax(logits[a : a + rows].float(), dim=-1)
            g = grad[a : a + rows]
            if g.dtype == torch.float32:
                torch.mul(p, neg_total[a : a + rows], out=g)
                g.scatter_add_(1, index[a : a + rows], grad_out[a : a + rows])
            else:
                p.mul_(neg_total[a : a + rows])
                p.scatter_add_(1, index[a : a + rows], grad_out[a : a + rows])
                g.copy_(p)
            del p
        return grad, None, None


#: Rows whose gathered ids hold more than ``1 - TAIL_EXACT_BELOW`` of the student's mass get their
#: tail summed over the other ids (exact); the others take ``log1p(-Σ p)`` (relative error below
#: ``float32 eps / TAIL_EXACT_BELOW`` ~ 1e-4).
TAIL_EXACT_BELOW = 1e-3


class _LogSoftmaxGatherTail(torch.autograd.Function):
    """:class:`_LogSoftmaxGather` plus, per row, the log of the softmax mass OUTSIDE a set of ids:
    ``log Σ_{v ∉ R} softmax(z)_v`` with ``R`` the gathered ids flagged in ``first`` (each id of
    ``R`` flagged once: :func:`_first_in_row`).

    Cost: the passes over the vocabulary of :class:`_LogSoftmaxGather` (one forward, one
    backward); the tail and its gradient ``1[v ∉ R] p_v / T - p_v`` come from the gathered
    values, ``T = 1 - Σ_R p``, and a scatter over ``R``. Where ``T < TAIL_EXACT_BELOW`` (the
    student puts nearly all its mass on the row) that cancels, so those rows (rare, found with
    one synchronisation per call) are recomputed with the tail summed over the vocabulary minus
    ``R``: exact however close ``Σ_R p`` comes to 1.
    """

    @staticmethod
    def forward(
        ctx: Any, logits: torch.Tensor, index: torch.Tensor, first: torch.Tensor, rows: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = logits.shape[0]
        out = torch.empty(index.shape, dtype=torch.float32, device=logits.device)
        for a in range(0, n, rows):
            lp = torch.log_softmax(logits[a : a + rows].float(), dim=-1)
            out[a : a + rows] = lp.gather(1, index[a : a + rows])
            del lp
        mass = torch.where(first, out.exp(), 0.0).sum(-1)
        tail = torch.log1p(-mass.clamp(max=1.0))
        exact = (mass > 1.0 - TAIL_EXACT_BELOW).nonzero().squeeze(1)
        for a in range(0, exact.numel(), rows):
            r = exact[a : a + rows]
            lp = torch.log_softmax(logits[r].float(), dim=-1)
            lp.masked_fill_(_row_mask(lp, index[r], first[r]), -math.inf)
            tail[r] = torch.logsumexp(lp, dim=-1)
            del lp
        ctx.save_for_backward(logits, index, first, out, tail, exact)
        ctx.rows = rows
        return out, tail

    @staticmethod
    def backward(
        ctx: Any, grad_out: torch.Tensor, grad_tail: torch.Tensor
    ) -> tuple[torch.Tensor | None, None, None, None]:
        logits, index, first, gathered, tail, exact = ctx.saved_tensors
        rows = ctx.rows
        grad = torch.empty_like(logits)
        grad_out = grad_out.float()
        finite = torch.isfinite(tail)
        g_tail = torch.where(finite, grad_tail.float(), torch.zeros_like(tail)).unsqueeze(-1)
        inv_t = torch.where(finite, torch.exp(-tail), torch.zeros_like(tail)).unsqueeze(-1)
        # d/dz_v: p_v (-Σ g_out - g_t + g_t / T) + g_out at the ids - g_t p_v / T at the row ids
        scale = grad_out.sum(-1, keepdim=True).neg_() + g_tail * (inv_t - 1.0)
        at_ids = grad_out - torch.where(first, gathered.exp() * g_tail * inv_t, 0.0)
        for a in range(0, logits.shape[0], rows):
            sl = slice(a, a + rows)
            p = torch.softmax(logits[sl].float(), dim=-1)
            p.mul_(scale[sl]).scatter_add_(1, index[sl], at_ids[sl])
            grad[sl].copy_(p)
            del p
        for a in range(0, exact.numel(), rows):  # the rows whose tail is nearly empty, exactly
            r = exact[a : a + rows]
            lp = torch.log_softmax(logits[r].float(), dim=-1)
            outside = torch.exp(lp - tail[r].unsqueeze(-1)).mul_(g_tail[r])
            outside.masked_fill_(_row_mask(lp, index[r], first[r]), 0.0)
            neg = grad_out[r].sum(-1, keepdim=True).neg_() - g_tail[r]
            g = lp.exp_().mul_(neg).add_(outside).scatter_add_(1, index[r], grad_out[r])
            grad[r] = g.to(grad.dtype)
            del lp, outside, g
        return grad, None, None, None


def _row_mask(like: torch.Tensor, index: torch.Tensor, in_row: torch.Tensor) -> torch.Tensor:
    """``[n, V]`` bool: True at the ids of ``index`` whose ``in_row`` flag is set (repeats and
    unflagged columns are harmless: the flags are summed, not scattered)."""
    hits = torch.zeros(like.shape, dtype=torch.float32, device=like.device)
    return hits.scatter_add_(1, index, in_row.float()) > 0


def _first_in_row(index: torch.Tensor, in_row: torch.Tensor) -> torch.Tensor:
    """``[n, J]`` bool: ``in_row`` columns whose id no earlier ``in_row`` column of the row has."""
    key = torch.where(in_row, index, -1 - torch.arange(index.shape[1], device=index.device))
    sid, perm = key.sort(dim=-1, stable=True)
    new = torch.ones_like(sid, dtype=torch.bool)
    new[:, 1:] = sid[:, 1:] != sid[:, :-1]
    first = torch.empty_like(new).scatter_(1, perm, new)
    return first & in_row


def log_softmax_gather(
    logits: torch.Tensor,
    index: torch.Tensor,
    *,
    in_row: torch.Tensor | None = None,
    chunk_elements: int | None = None,
) -> Any:
    """Float32 ``log_softmax(logits, -1).gather(-1, index)``, differentiable w.r.t. ``logits``.

    ``logits`` is ``[..., V]`` in any float dtype, ``index`` ``[..., J]`` (same leading shape,
    values in ``[0, V)``). The log-softmax is computed once per row in float32, ``chunk_elements``
    floats at a time (default: :data:`CHUNK_ELEMENTS` for the device), and only the gathered
    values are kept; nothing of size ``[..., V]`` is saved
    for the backward pass except ``logits`` itself (the softmax is recomputed chunk by chunk), and
    the gradient is returned in ``logits.dtype``.

    With ``in_row`` (bool ``[..., J]``) it returns ``(gathered, log_tail)``: ``log_tail[...]`` is
    the log of the softmax mass outside the ids ``index[..., j]`` whose ``in_row`` is set, exact
    (summed over the other ids, not ``log(1 - Σ p)``) and differentiable.
    """
    if logits.shape[:-1] != index.shape[:-1]:
        raise InputError(
            f"logits {tuple(logits.shape)} and index {tuple(index.shape)} leading shapes differ"
        )
    if in_row is not None and in_row.shape != index.shape:
        raise InputError(f"in_row {tuple(in_row.shape)} must have index's shape")
    if in_row is not None:
        return _gather_with_tail(logits, index, _first_of(index, in_row), chunk_elements)
    v = logits.shape[-1]
    flat_index = index.reshape(-1, index.shape[-1]).long()
    flat = _LogSoftmaxGather.apply(
        logits.reshape(-1, v), flat_index, _chunk_rows(logits, chunk_elements)
    )
    return flat.view(*logits.shape[:-1], index.shape[-1])


def _chunk_rows(logits: torch.Tensor, chunk_elements: int | None) -> int:
    """Rows of ``logits`` per chunk of at most ``chunk_elements`` floats (default: by device)."""
    if chunk_elements is None:
        chunk_elements = CHUNK_ELEMENTS.get(logits.device.type, 1 << 22)
    return max(1, chunk_elements // max(1, logits.shape[-1]))


def _first_of(index: torch.Tensor, in_row: torch.Tensor) -> torch.Tensor:
    """:func:`_first_in_row` of ``[..., J]`` ids and flags, in their shape."""
    j = index.shape[-1]
    flat = _first_in_row(index.reshape(-1, j).long(), in_row.reshape(-1, j).bool())
    return flat.view(index.shape)


def _gather_with_tail(
    logits: torch.Tensor, index: torch.Tensor, first: torch.Tensor, chunk_elements: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`log_softmax_gather` with ``in_row`` given as its first occurrences (``first``,
    :func:`_first_of`), for a caller that also needs them."""
    lead, j = logits.shape[:-1], index.shape[-1]
    flat, tail = _LogSoftmaxGatherTail.apply(
        logits.reshape(-1, logits.shape[-1]), index.reshape(-1, j).long(),
        first.reshape(-1, j), _chunk_rows(logits, chunk_elements),
    )  # fmt: skip
    return flat.view(*lead, j), tail.view(lead)


@dataclass
class FusionLossOutput:
    """What :func:`fusion_loss` returns.

    Attributes:
        loss: the training loss (scalar, float32, differentiable).
        clm_loss: the CLM term alone (detached), this batch's mean per token.
        fusion_loss: the fusion term alone (detached), this batch's mean per position.
        lm_weight: the effective weight of the CLM term, per block ``[B]`` (detached).
        candidate_weights: ``[B, C]`` each block's weight per stacked candidate: the share of
            the block's positions that selected it for MinCE (a one-hot with block selection),
            the mean softmax weight for AvgCE (zeros for non-candidates).
        student_share: ``[B]`` with ``with_student``, the share of each block's positions where
            the student predicted better than the selected candidate (no fusion gradient there);
            zeros otherwise.
    """

    loss: torch.Tensor
    clm_loss: torch.Tensor
    fusion_loss: torch.Tensor
    lm_weight: torch.Tensor
    candidate_weights: torch.Tensor
    student_share: torch.Tensor


@dataclass
class _Teacher:
    """The stacked candidates' rows as probabilities (no grad): ``ids`` int64 ``[B, C, L, K]``
    (invalid entries 0), ``probs`` float32 (0 on invalid entries), ``valid``, and per row the
    mass outside it, ``tail`` ``[B, C, L]`` (zeros for renormalised rows)."""

    ids: torch.Tensor
    probs: torch.Tensor
    valid: torch.Tensor
    tail: torch.Tensor


def _teacher_rows(
    ids: torch.Tensor,
    values: torch.Tensor,
    temperature: float,
    ref_index: int | None,
    teacher: str,
    compat: str | None,
) -> _Teacher:
    """Empty rows replaced by the ref row, then each row as probabilities.

    ``renormalized``: ``softmax(values / T)`` over the valid entries (the reference; with
    ``compat="fusellm"`` in bfloat16, as the reference computes it). ``calibrated``: the values
    are log-probabilities; ``p = exp(value)`` keeps the row's true mass ``Σ p`` and its tail
    ``1 - Σ p``; with ``T != 1`` the row is reshaped within itself, ``Σ p · softmax(value / T)``
    (the tail is the teacher's at ``T = 1``, which is all the row can tell).
    """
    ids = ids.long()
    values = values.float()
    valid = (ids >= 0) & (values > -math.inf)
    if ref_index is not None:
        empty = ~valid.any(-1, keepdim=True)  # [B, C, L, 1]
        sl = slice(ref_index, ref_index + 1)
        ids = torch.where(empty, ids[:, sl], ids)
        values = torch.where(empty, values[:, sl], values)
        valid = torch.where(empty, valid[:, sl], valid)
    ids = torch.where(valid, ids, torch.zeros_like(ids))
    if teacher == "calibrated":
        p = torch.where(valid, torch.exp(torch.where(valid, values, 0.0)), 0.0)
        mass = p.sum(-1, keepdim=True)
        if temperature != 1.0:
            p = mass * _masked_softmax(values / temperature, valid)
        return _Teacher(ids, p, valid, (1.0 - mass.squeeze(-1)).clamp_(0.0, 1.0))
    if compat == "fusellm":
        z = torch.where(valid, values, -math.inf).to(torch.bfloat16) / temperature
        p = torch.where(valid, torch.softmax(z, dim=-1).float(), 0.0)
    else:
        p = _masked_softmax(values / temperature, valid)
    return _Teacher(ids, p, valid, torch.zeros(p.shape[:-1], device=p.device))


def _masked_softmax(z: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    z = torch.where(valid, z, -math.inf)
    zmax = z.amax(-1, keepdim=True)
    zmax = torch.where(torch.isfinite(zmax), zmax, torch.zeros_like(zmax))
    e = torch.exp(z - zmax)  # exactly 0 on invalid entries
    return e / e.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def _rewards(scores: torch.Tensor, compat: str | None) -> torch.Tensor:
    """``exp(-score)`` per block and candidate; the reference computes ``1 / exp(score)`` in
    bfloat16, so scores within one bfloat16 step tie (and a tie goes to ref)."""
    if compat == "fusellm":
        return (1 / torch.exp(scores.to(torch.bfloat16))).float()
    return torch.exp(-scores.float())


def _next_token_probs(t: _Teacher, nxt: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[B, C, L]`` each row's probability of the next target token (``nxt`` ``[B, L]``,
    ``-100``: none): the entry's where the row lists it, else the row's tail spread evenly over
    the ids it does not list (zero for renormalised rows, which have no tail)."""
    hit = t.valid & (t.ids == nxt[:, None, :, None])
    listed = (t.probs * hit).sum(-1)
    rest = (vocab_size - t.valid.sum(-1)).clamp_min(1)
    return torch.where(hit.any(-1), listed, t.tail / rest)


def _candidate_scores(
    t: _Teacher,
    block: torch.Tensor,
    cmask: torch.Tensor,
    nxt: torch.Tensor,
    selection: str,
    matched: torch.Tensor | None,
    vocab_size: int,
) -> torch.Tensor:
    """``[B, C, L]`` what ranks the candidates at each position (higher is better): the block
    reward, or with ``selection="token"`` the row's probability of the next target token, where
    there is one and the candidate's row is its own distribution (``matched``)."""
    b, c, length = t.tail.shape
    s = block[:, :, None].expand(b, c, length)
    if selection == "token":
        tok = _next_token_probs(t, nxt, vocab_size)
        ok = (nxt != -100)[:, None, :] & cmask[None, :, None]
        if matched is not None:
            ok = ok & matched.bool()
        ok_any = ok.any(1, keepdim=True)
        s = torch.where(ok_any, torch.where(ok, tok, -math.inf), s)
    return torch.where(cmask[None, :, None], s, -math.inf)


def _fused_target(
    t: _Teacher, s: torch.Tensor, fusion: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused target per position: ``(ids [B, L, J], q, in_row, tail [B, L], weights
    [B, C, L])`` from the candidates' rows and scores (MinCE: the best candidate's row, ties to
    the first; AvgCE: the softmax-weighted mixture of all rows, ids side by side)."""
    b, c, length, k = t.ids.shape
    if fusion == "mince":
        pick = s.argmax(1)  # [B, L]: the first maximum, ref on ties
        weights = torch.nn.functional.one_hot(pick, c).permute(0, 2, 1).float()
        g = pick[:, None, :, None].expand(b, 1, length, k)
        sel = [x.gather(1, g).squeeze(1) for x in (t.ids, t.probs, t.valid)]
        tail = t.tail.gather(1, pick[:, None, :]).squeeze(1)
        return sel[0], sel[1], sel[2], tail, weights
    weights = torch.softmax(s, dim=1)  # [B, C, L]

    def side_by_side(x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 1, 3).reshape(b, length, c * k)

    q = side_by_side(weights[..., None] * t.probs)
    in_row = side_by_side(t.valid & (weights[..., None] > 0))
    tail = (weights * t.tail).sum(1)
    return side_by_side(t.ids), q, in_row, tail, weights


def _neg_entropy(ids: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``Σ_v Q[v] log Q[v]`` per row of a sparse ``Q`` given as entries (ids, q); ids may repeat."""
    sid, perm = ids.sort(-1)
    sq = q.gather(-1, perm)
    new = torch.ones_like(sid, dtype=torch.bool)
    new[..., 1:] = sid[..., 1:] != sid[..., :-1]
    group = new.long().cumsum(-1) - 1
    merged = torch.zeros_like(sq).scatter_add_(-1, group, sq)
    return torch.where(merged > 0, merged * torch.log(merged), torch.zeros_like(merged)).sum(-1)


def _xlogx(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x * torch.log(x.clamp_min(torch.finfo(x.dtype).tiny)), 0.0)


def fusion_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logits: torch.Tensor,
    teacher_scores: torch.Tensor,
    *,
    fusion: Fusion = "mince",
    combine: Combine = "hard",
    distill_loss: DistillLoss = "ce",
    teacher: Teacher = "renormalized",
    selection: Selection = "block",
    teacher_tail: TeacherTail = "label",
    lm_loss_weight: float = 0.9,
    temperature: float = 1.0,
    progress: float = 0.0,
    ref_index: int | None = 0,
    candidate_mask: Sequence[bool] | torch.Tensor | None = None,
    teacher_matched: torch.Tensor | None = None,
    with_student: bool = False,
    block_bytes: torch.Tensor | None = None,
    compat: str | None = None,
    clm_denominator: torch.Tensor | float | None = None,
    fusion_denominator: torch.Tensor | float | None = None,
    chunk_elements: int | None = None,
) -> FusionLossOutput:
    """The FuseLLM loss ``λ L_clm + (1-λ) L_fuse`` from sparse teacher rows (module docstring).

    Args:
        logits: student logits ``[B, L, V]``, any float dtype (the loss runs in float32).
        labels: ``[B, L]`` CLM targets (``-100``: none); ``logits[:, t]`` predicts
            ``labels[:, t + 1]``.
        attention_mask: ``[B, L]``, the fusion term's mask ``m`` (no shift).
        teacher_ids: ``[B, C, L, K]`` stacked candidates' ids, ``-1`` padded.
        teacher_logits: ``[B, C, L, K]`` matching values (logits, or log-probabilities for
            ``teacher="calibrated"``), ``-inf`` padded.
        teacher_scores: ``[B, C]`` per-block CE of each candidate (lower is better).
        fusion, combine, distill_loss, lm_loss_weight, temperature: see the module docstring.
        teacher: ``"renormalized"`` (the reference: each row's softmax over its kept entries) or
            ``"calibrated"`` (rows of log-probabilities keep their true mass; one extra "every
            other token" bin per position).
        teacher_tail: calibrated rows: ``"label"`` (where the next token is outside the fused
            row, the tail mass is a target on it) or ``"bin"`` (the tail is one bin). No effect
            on renormalized rows, which have no tail.
        selection: ``"block"`` (a candidate per block, by ``teacher_scores``: the paper's) or
            ``"token"`` (per position, by each row's probability of the next target token).
        progress: training progress in ``[0, 1]`` (``combine="hard_and_decay"``).
        ref_index: the stacked index of the ref rows that replace empty rows (None: no ref rows).
        candidate_mask: ``[C]`` which stacked rows take part in the fusion (default: all); a ref
            excluded here still fills empty rows.
        teacher_matched: optional bool ``[B, C, L]``: where a candidate's row is its own
            distribution (not an alignment fallback); token selection considers only those.
        with_student: MinCE only: the student itself, as it is now, is a candidate too, judged
            the same way (its block CE, per byte with ``block_bytes``; or its probability of the
            next token); where it is the best, no fusion gradient (module docstring).
        block_bytes: ``[B]`` bytes of text per block (the student's per-byte block score).
        compat: ``"fusellm"``: the reference's bfloat16 teacher probabilities and rewards (so
            MinCE ties within one bfloat16 step go to ref).
        clm_denominator, fusion_denominator: token counts to normalise the sums by (e.g. over a
            whole gradient-accumulation window); default: this batch's counts.
        chunk_elements: float32 elements per chunk of the student log-softmax (default: by
            device, :data:`CHUNK_ELEMENTS`).
    """
    b, length, c = _check_loss_args(
        logits, labels, attention_mask, teacher_ids, teacher_logits, teacher_scores,
        fusion=fusion, combine=combine, distill_loss=distill_loss, teacher=teacher,
        selection=selection, teacher_tail=teacher_tail, temperature=temperature,
        ref_index=ref_index, compat=compat, with_student=with_student,
    )  # fmt: skip
    device = logits.device
    cmask = _candidate_mask(candidate_mask, (b, c, length), teacher_matched, block_bytes, device)

    calibrated = teacher == "calibrated"
    with torch.no_grad():
        rows = _teacher_rows(teacher_ids, teacher_logits, temperature, ref_index, teacher, compat)
        block = torch.where(cmask, _rewards(teacher_scores, compat), -math.inf)  # [B, C]
        nxt = torch.full_like(labels, -100)  # the CLM target of position t: labels[t + 1]
        nxt[:, :-1] = labels[:, 1:]
        clm_mask = nxt != -100
        s = _candidate_scores(rows, block, cmask, nxt, selection, teacher_matched, logits.shape[-1])
        sel_ids, q, in_row, q_tail, weights = _fused_target(rows, s, fusion)
        index = torch.cat([nxt.clamp_min(0).unsqueeze(-1), sel_ids], dim=-1)
        m = attention_mask.float()
        hit = in_row & (sel_ids == nxt[..., None])  # the fused row lists the next token there
        if distill_loss == "kl":
            neg_ent = _neg_entropy(sel_ids, q) + (_xlogx(q_tail) if calibrated else 0.0)

    decoupled = combine == "decoupled"
    if calibrated:
        # "decoupled" also flags the next token (column 0) where the row does not list it: the
        # tail is then the mass outside the row and y, and the row's tail adds q_y back.
        y_apart = clm_mask & ~hit.any(-1) if decoupled else torch.zeros_like(clm_mask)
        first = _first_of(index, torch.cat([y_apart.unsqueeze(-1), in_row], dim=-1))
        logp, log_rest = _gather_with_tail(logits, index, first, chunk_elements)
        log_tail = log_rest
        if decoupled:
            log_tail = torch.where(y_apart, torch.logaddexp(log_rest, logp[..., 0]), log_rest)
        tail_term = _tail_term(teacher_tail, hit, in_row, q_tail, logp, log_tail, nxt)
    else:
        logp = log_softmax_gather(logits, index, chunk_elements=chunk_elements)
        log_tail, tail_term = None, torch.zeros((), device=device)
    clm_tok = torch.where(clm_mask, -logp[..., 0], torch.zeros((), device=device))
    fuse_tok = -(q * logp[..., 1:]).sum(-1) - tail_term
    if distill_loss == "kl":
        fuse_tok = fuse_tok + neg_ent
    fuse_tok = fuse_tok * m

    lm_w = _clm_weights(
        combine, lm_loss_weight, progress, block, logp, log_tail, nxt, m, block_bytes,
        (hit, q, q_tail, weights), teacher_matched,
    )  # fmt: skip
    fuse_w = 1.0 - lm_w
    if decoupled:
        nckd = _non_target_term(
            teacher_tail, distill_loss, sel_ids, in_row, hit, q, q_tail, logp, log_tail,
            log_rest, first[..., 1:], nxt,
        )  # fmt: skip
        closed = lm_w >= 1.0
        fuse_tok = torch.where(closed[:, None], nckd * m, fuse_tok)
        fuse_w = torch.full_like(lm_w, 1.0 - float(lm_loss_weight))
    student = torch.zeros(b, length, dtype=torch.bool, device=device)
    if with_student:
        student = _student_wins(
            rows, weights, block, -logp[..., 0].detach(), clm_mask, nxt, selection, block_bytes,
            logits.shape[-1],
        )  # fmt: skip
        # The student is the best candidate there: its own (detached) distribution is the
        # target, whose CE has no gradient; reported as its KL to itself, 0.
        fuse_tok = torch.where(student, 0.0, fuse_tok)

    return _loss_output(
        lm_w, fuse_w, clm_tok, fuse_tok, clm_mask, m, weights, student, clm_denominator,
        fusion_denominator,
    )  # fmt: skip


def _clm_weights(
    combine: str,
    lm_loss_weight: float,
    progress: float,
    block: torch.Tensor,
    logp: torch.Tensor,
    log_tail: torch.Tensor | None,
    nxt: torch.Tensor,
    m: torch.Tensor,
    block_bytes: torch.Tensor | None,
    fused: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    teacher_matched: torch.Tensor | None,
) -> torch.Tensor:
    """``[B]`` the CLM term's weight per block, by ``combine`` (module docstring)."""
    lam = lm_loss_weight
    if combine == "hard_and_decay":
        lam = lam + (1.0 - lam) * min(max(float(progress), 0.0), 1.0)
    lm_w = torch.full((block.shape[0],), float(lam), device=block.device)
    clm_mask = nxt != -100
    if combine == "soft":
        return 1.0 - block.amax(1)
    if combine == "advantage":
        mine = _student_block_reward(-logp[..., 0].detach(), clm_mask, block_bytes)
        return (mine / block.amax(1).clamp_min(torch.finfo(torch.float32).tiny)).clamp(max=1.0)
    if combine in GATED_COMBINES:
        hit, q, q_tail, weights = fused
        assert log_tail is not None  # calibrated rows (checked)
        judged = clm_mask & (m > 0)
        if teacher_matched is not None:  # alignment fallbacks are one-hots of the true token
            judged = judged & ((weights > 0) & teacher_matched.bool()).any(1)
        wins = _teacher_gains(hit, q, q_tail, logp, log_tail, judged)
        return torch.where(wins, lm_w, torch.ones_like(lm_w))
    return lm_w


def _loss_output(
    lm_w: torch.Tensor,
    fuse_w: torch.Tensor,
    clm_tok: torch.Tensor,
    fuse_tok: torch.Tensor,
    clm_mask: torch.Tensor,
    m: torch.Tensor,
    weights: torch.Tensor,
    student: torch.Tensor,
    clm_denominator: torch.Tensor | float | None,
    fusion_denominator: torch.Tensor | float | None,
) -> FusionLossOutput:
    """The weighted token-level means of the two terms (per-block weights ``lm_w`` and
    ``fuse_w``), and what the loss reports."""
    clm_n = clm_mask.sum().clamp_min(1)
    fuse_n = m.sum().clamp_min(1)
    clm_den = clm_n if clm_denominator is None else clm_denominator
    fuse_den = fuse_n if fusion_denominator is None else fusion_denominator
    clm_sum, fuse_sum = clm_tok.sum(-1), fuse_tok.sum(-1)  # [B]
    loss = (lm_w * clm_sum).sum() / clm_den + (fuse_w * fuse_sum).sum() / fuse_den
    share = m.sum(-1).clamp_min(1)
    return FusionLossOutput(
        loss=loss,
        clm_loss=(clm_sum.sum() / clm_n).detach(),
        fusion_loss=(fuse_sum.sum() / fuse_n).detach(),
        lm_weight=lm_w.detach(),
        candidate_weights=(weights * (m * ~student)[:, None, :]).sum(-1) / share[:, None],
        student_share=(student * m).sum(-1) / share,
    )


def _candidate_mask(
    candidate_mask: Sequence[bool] | torch.Tensor | None,
    shape: tuple[int, int, int],
    teacher_matched: torch.Tensor | None,
    block_bytes: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor:
    """Checks the optional per-candidate / per-block inputs against ``shape`` ``(B, C, L)``;
    returns the ``[C]`` candidate mask (default: all)."""
    b, c = shape[:2]
    if teacher_matched is not None and tuple(teacher_matched.shape) != shape:
        raise InputError(f"teacher_matched must be [B, C, L] = {shape}")
    if block_bytes is not None and tuple(block_bytes.shape) != (b,):
        raise InputError(f"block_bytes must be [B] = [{b}], got {tuple(block_bytes.shape)}")
    if candidate_mask is None:
        return torch.ones(c, dtype=torch.bool, device=device)
    cmask = torch.as_tensor(candidate_mask, dtype=torch.bool, device=device)
    if cmask.shape != (c,) or not bool(cmask.any()):
        raise InputError(f"candidate_mask must be [C] = [{c}] with at least one True")
    return cmask


def _tail_term(
    teacher_tail: str,
    hit: torch.Tensor,
    in_row: torch.Tensor,
    q_tail: torch.Tensor,
    logp: torch.Tensor,
    log_tail: torch.Tensor,
    nxt: torch.Tensor,
) -> torch.Tensor:
    """``[B, L]`` ``q_tail`` times the student's log-probability of the tail's target: its mass
    outside the row (``"bin"``), or with ``"label"`` the next token's where a non-empty row does
    not list it."""
    log_rest = log_tail
    if teacher_tail == "label":
        outside = (nxt != -100) & in_row.any(-1) & ~hit.any(-1)
        log_rest = torch.where(outside, logp[..., 0], log_tail)
    return torch.where(q_tail > 0, q_tail * log_rest, torch.zeros((), device=q_tail.device))


def _non_target_term(
    teacher_tail: str,
    distill_loss: str,
    ids: torch.Tensor,
    in_row: torch.Tensor,
    hit: torch.Tensor,
    q: torch.Tensor,
    q_tail: torch.Tensor,
    logp: torch.Tensor,
    log_tail: torch.Tensor,
    log_rest: torch.Tensor,
    first: torch.Tensor,
    nxt: torch.Tensor,
) -> torch.Tensor:
    """``[B, L]`` the non-target part of the fusion term (``combine="decoupled"``, module
    docstring): over the fused row's bins other than the one holding the next token, the
    teacher's masses against the student's, both renormalised without that bin. 0 where there is
    no next token or no row. ``log_rest``: the student's log-mass outside the row and, where the
    row does not list it, the next token; ``log_tail``: outside the row; ``first``: the row's
    entries that are the first of their id (AvgCE rows repeat ids)."""
    listed = hit.any(-1)
    has = (nxt != -100) & in_row.any(-1)
    other = in_row & ~hit  # the row's entries that are not the next token
    lp_row = logp[..., 1:]
    # the student's log-mass outside the target bin: the row's other ids, and the rest (outside
    # the row and y), except with the bin tail where y is in the tail bin (not listed): the row
    parts = torch.where(first & other, lp_row, -math.inf)
    rest_in = (teacher_tail == "label") | listed
    rest = torch.where(rest_in, log_rest, torch.full_like(log_rest, -math.inf))
    bins = torch.cat([parts, rest.unsqueeze(-1)], -1)
    # no next token or no row: nothing to renormalise (0 in, so no NaN in the backward pass)
    log_not_y = torch.logsumexp(torch.where(has.unsqueeze(-1), bins, 0.0), -1)
    q_other = torch.where(other, q, 0.0)
    tail_p = torch.where(listed, q_tail, torch.zeros_like(q_tail))  # the tail bin is non-target
    ce = -torch.where(q_other > 0, q_other * (lp_row - log_not_y.unsqueeze(-1)), 0.0).sum(-1)
    ce = ce - torch.where(tail_p > 0, tail_p * (log_tail - log_not_y), 0.0)
    if distill_loss == "kl":
        mass = q_other.sum(-1) + tail_p
        ce = ce + _neg_entropy(ids, q_other) + _xlogx(tail_p) - _xlogx(mass)
    return torch.where(has, ce, torch.zeros_like(ce))


def _teacher_gains(
    hit: torch.Tensor,
    q: torch.Tensor,
    q_tail: torch.Tensor,
    logp: torch.Tensor,
    log_tail: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """``[B]`` whether the fused target predicts the block's next tokens better than the student
    does now, both judged on the target's own coarsening (its row's ids and the tail bin): the
    mean log-probability of the bin holding the true next token (no grad)."""
    with torch.no_grad():
        listed = hit.any(-1)
        p_true = (q * hit).sum(-1)
        tiny = torch.finfo(torch.float32).tiny
        t_lp = torch.log(torch.where(listed, p_true, q_tail).clamp_min(tiny))
        s_lp = torch.where(listed, logp[..., 0].detach(), log_tail.detach())
        gain = torch.where(mask, t_lp - s_lp, 0.0).sum(-1)
        return gain > 0


def _student_block_reward(
    student_ce: torch.Tensor, clm_mask: torch.Tensor, block_bytes: torch.Tensor | None
) -> torch.Tensor:
    """``[B]`` the student's ``exp(-CE)`` on each block, CE per byte with ``block_bytes`` (else
    per token): on the scale of the candidates' block rewards."""
    with torch.no_grad():
        ce = torch.where(clm_mask, student_ce, 0.0).sum(-1)
        den = block_bytes.float() if block_bytes is not None else clm_mask.sum(-1).float()
        return torch.exp(-ce / den.clamp_min(1e-9))


def _student_wins(
    rows: _Teacher,
    weights: torch.Tensor,
    block: torch.Tensor,
    student_ce: torch.Tensor,
    clm_mask: torch.Tensor,
    nxt: torch.Tensor,
    selection: str,
    block_bytes: torch.Tensor | None,
    vocab_size: int,
) -> torch.Tensor:
    """``[B, L]`` where the student predicts better than the MinCE-selected candidate (no grad):
    per block, its CE (per byte with ``block_bytes``, else per token) against the selected
    candidate's score; per token, its probability of the next token against the row's."""
    with torch.no_grad():
        pick = weights.argmax(1)  # [B, L]
        if selection == "block":
            mine = _student_block_reward(student_ce, clm_mask, block_bytes)
            theirs = block.gather(1, pick[:, :1]).squeeze(1)
            return (mine >= theirs)[:, None].expand_as(pick)
        p_rows = _next_token_probs(rows, nxt, vocab_size)  # [B, C, L]
        theirs_t = p_rows.gather(1, pick[:, None, :]).squeeze(1)
        return clm_mask & (torch.exp(-student_ce) >= theirs_t)


def _check_loss_args(
    logits: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logits: torch.Tensor,
    teacher_scores: torch.Tensor,
    **choices: Any,
) -> tuple[int, int, int]:
    """Checks the arguments of :func:`fusion_loss`; returns ``(B, L, C)``."""
    check_choice("fusion", choices["fusion"], FUSIONS)
    check_choice("combine", choices["combine"], COMBINES)
    check_choice("distill_loss", choices["distill_loss"], DISTILL_LOSSES)
    check_choice("teacher", choices["teacher"], TEACHERS)
    check_choice("selection", choices["selection"], SELECTIONS)
    check_choice("teacher_tail", choices["teacher_tail"], TEACHER_TAILS)
    if choices["with_student"] and choices["fusion"] != "mince":
        raise InputError("with_student works with fusion='mince' (a candidate to compete with)")
    if choices["teacher"] != "calibrated" and choices["combine"] in GATED_COMBINES:
        raise InputError(
            f"combine={choices['combine']!r} judges rows with their tail: teacher='calibrated'"
        )
    check_choice("compat", choices["compat"], (None, "fusellm"))
    if choices["compat"] == "fusellm" and choices["teacher"] != "renormalized":
        raise InputError("compat='fusellm' reproduces the reference: teacher must be renormalized")
    temperature = choices["temperature"]
    if not temperature > 0:
        raise InputError(f"temperature must be > 0, got {temperature}")
    if logits.dim() != 3:
        raise InputError(f"logits must be [B, L, V], got shape {tuple(logits.shape)}")
    b, length, _ = logits.shape
    if teacher_ids.dim() != 4 or teacher_ids.shape != teacher_logits.shape:
        raise InputError(
            f"teacher ids {tuple(teacher_ids.shape)} and logits {tuple(teacher_logits.shape)} "
            "must both be [B, C, L, K]"
        )
    c = teacher_ids.shape[1]
    if teacher_ids.shape[0] != b or teacher_ids.shape[2] != length:
        raise InputError(
            f"teacher rows {tuple(teacher_ids.shape)} do not match logits {tuple(logits.shape)}"
        )
    if tuple(labels.shape) != (b, length) or tuple(attention_mask.shape) != (b, length):
        raise InputError("labels and attention_mask must be [B, L] like the logits")
    if tuple(teacher_scores.shape) != (b, c):
        raise InputError(
            f"teacher_scores must be [B, C] = {(b, c)}, got {tuple(teacher_scores.shape)}"
        )
    ref_index = choices["ref_index"]
    if ref_index is not None and not 0 <= ref_index < c:
        raise InputError(f"ref_index {ref_index} out of range for {c} candidates")
    return b, length, c


# ------------------------------------------------------------------------------------------------
# Schema: scores, detection, validation, building
# ------------------------------------------------------------------------------------------------


def detect_candidates(column_names: Iterable[str]) -> list[str]:
    """Candidate names present in a packed dataset's columns (``{c}_logits``), ref first."""
    names = sorted(col[: -len("_logits")] for col in column_names if col.endswith("_logits"))
    return sorted(names, key=lambda n: n != REF)


def score_columns(candidate: str, score: Score, column_names: Iterable[str]) -> list[str]:
    """The columns :func:`block_scores` reads for ``candidate`` (raises if they are missing)."""
    cols = set(column_names)
    if score == "ce":
        need = [f"{candidate}_metric_ce"]
    elif f"{candidate}_metric_ce_per_byte" in cols:
        need = [f"{candidate}_metric_ce_per_byte"]
    else:
        need = [f"{candidate}_metric_ce", "num_bytes"]
        if candidate != REF or f"{candidate}_num_tokens" in cols:
            need.append(f"{candidate}_num_tokens")
    missing = [n for n in need if n not in cols]
    if missing:
        hint = (
            f" (score='ce_per_byte' needs {candidate}_metric_ce_per_byte, or num_bytes and "
            f"{candidate}_num_tokens; use score='ce' for per-token CE)"
            if score == "ce_per_byte"
            else ""
        )
        raise InputError(f"candidate {candidate!r}: missing column(s) {missing}{hint}")
    return need


def block_scores(
    get: Callable[[str], np.ndarray],
    candidates: Sequence[str],
    score: Score,
    column_names: Iterable[str],
    num_tokens: np.ndarray,
) -> np.ndarray:
    """``float32 [N, C]`` block scores (lower is better) from a column getter.

    ``num_tokens`` is each block's number of real tokens (the ref's token count for per-byte CE).
    """
    cols = list(column_names)
    out = []
    for c in candidates:
        need = score_columns(c, score, cols)
        if need[0].endswith("_per_byte") or score == "ce":
            v = np.asarray(get(need[0]), dtype=np.float64)
        else:
            n_tok = (
                np.asarray(get(need[2]), dtype=np.float64)
                if len(need) > 2
                else np.asarray(num_tokens, dtype=np.float64)
            )
            n_bytes = np.asarray(get("num_bytes"), dtype=np.float64)
            with np.errstate(divide="ignore", invalid="ignore"):
                v = np.asarray(get(need[0]), dtype=np.float64) * n_tok / n_bytes
            v = np.where(n_bytes > 0, v, np.nan)
        out.append(v)
    return np.stack(out, axis=-1).astype(np.float32).reshape(-1, len(candidates))


def _flat_chunks(col: Any) -> Iterable[Any]:
    """The leaf values of a (possibly nested, possibly extension-typed) Arrow column."""
    import pyarrow as pa

    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    for arr in chunks:
        while True:
            if isinstance(arr, pa.ExtensionArray):
                arr = arr.storage
            elif isinstance(arr, (pa.ListArray, pa.LargeListArray, pa.FixedSizeListArray)):
                arr = arr.flatten()
            else:
                break
        yield arr


def _list_lengths(col: Any) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.compute as pc

    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    out = []
    for arr in chunks:
        if isinstance(arr, pa.ExtensionArray):
            arr = arr.storage
        out.append(pc.list_value_length(arr).to_numpy(zero_copy_only=False))
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def _rows(where: np.ndarray, offset: int) -> str:
    idx = np.flatnonzero(where)[:5] + offset
    return ", ".join(map(str, idx.tolist())) + (" ..." if np.count_nonzero(where) > 5 else "")


def validate_packed(
    dataset: Any,
    *,
    sources: Sequence[str],
    with_ref: bool,
    score: Score,
    vocab_size: int | None,
    full: bool = True,
    batch_size: int = 1024,
    teacher: Teacher = "renormalized",
    ignore: Sequence[str] = (),
) -> list[str]:
    """Check a packed dataset (a ``datasets.Dataset`` of blocks, or the
    :class:`fusellm.stages.pack.PlannedBlocks` of a plan-layout pack) against the training
    configuration before the first step.

    Raises :class:`InputError` naming the column and rows when: a configured candidate is missing
    or the data holds candidates the configuration lists neither in ``sources`` nor in
    ``ignore``; an id is ``>= vocab_size`` (the model's logits width) or below ``-1``; lengths
    disagree between ``input_ids``, ``{c}_ids`` and ``{c}_logits``, or a candidate's ``K`` is not
    constant; a logit is NaN or ``+inf``; a score is NaN or infinite; with
    ``teacher="calibrated"``, a row that does not hold log-probabilities.
    With ``full`` it reads every column once (Arrow compute, batch by batch); without, it checks
    only the column names.

    Returns the stacked candidate order (``["ref", *sources]``, ref only when its columns exist).
    """
    cols = set(dataset.column_names)
    if "input_ids" not in cols:
        raise InputError("packed dataset has no 'input_ids' column")
    for s in sources:
        check_candidate_name(s)
    if len(set(sources)) != len(sources):
        raise InputError(f"sources has duplicates: {list(sources)}")
    if REF in sources:
        raise InputError(f"{REF!r} is the target's own candidate; do not list it in sources")
    present = detect_candidates(cols)
    expected = ([REF] if with_ref else []) + list(sources)
    missing = [c for c in expected if c not in present]
    extra = [c for c in present if c not in expected and c != REF and c not in ignore]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"configured but absent from the data: {missing}")
        if extra:
            parts.append(f"in the data but not configured (add them to sources): {extra}")
        raise InputError(
            "packed data's candidate columns do not match the config: "
            + "; ".join(parts)
            + f" (data candidates: {present}, config: with_ref={with_ref}, sources={list(sources)})"
        )
    stack = ([REF] if REF in present else []) + list(sources)
    for c in stack:
        if f"{c}_ids" not in cols:
            raise InputError(f"candidate {c!r} has {c}_logits but no {c}_ids column")
    needed = {"input_ids"}
    for c in stack:
        needed |= {f"{c}_ids", f"{c}_logits"}
        if c in expected:
            needed |= set(score_columns(c, score, cols))
    if "attention_mask" in cols:
        needed.add("attention_mask")
    if not full:
        return stack

    if hasattr(dataset, "iter_tables"):  # fusellm.stages.pack.PlannedBlocks
        tables = dataset.iter_tables(sorted(needed), batch_size)
    else:
        tables = dataset.select_columns(sorted(needed)).with_format("arrow").iter(batch_size)
    offset = 0
    ks: dict[str, int] = {}
    for table in tables:
        lengths = _list_lengths(table.column("input_ids"))
        for leaf in _flat_chunks(table.column("input_ids")):
            x = leaf.to_numpy(zero_copy_only=False)
            if x.size and (x.min() < 0 or (vocab_size is not None and x.max() >= vocab_size)):
                raise InputError(
                    f"input_ids hold ids outside [0, {vocab_size}) (min {x.min()}, max {x.max()}) "
                    f"in blocks {offset}..{offset + table.num_rows - 1}: the data does not match "
                    "the model's vocabulary"
                )
        for c in stack:
            for kind in ("ids", "logits"):
                _check_row_column(table, c, kind, lengths, offset, ks, vocab_size, teacher)
        _check_block_scores(table, [c for c in stack if c in expected], score, lengths, offset)
        offset += table.num_rows
    if offset == 0:
        raise InputError("packed dataset is empty")
    return stack


def _check_row_column(
    table: Any,
    c: str,
    kind: str,
    lengths: np.ndarray,
    offset: int,
    ks: dict[str, int],
    vocab_size: int | None,
    teacher: str,
) -> None:
    """One candidate's ``{c}_ids`` or ``{c}_logits`` column of a batch of packed blocks: a row per
    token, no nulls, one width ``K`` (recorded in ``ks``), ids in range, finite log-probs."""
    name = f"{c}_{kind}"
    col = table.column(name)
    outer = _list_lengths(col)
    if not np.array_equal(outer, lengths):
        raise InputError(
            f"{name}: row count differs from len(input_ids) in blocks "
            f"{_rows(outer != lengths, offset)}"
        )
    for leaf in _flat_chunks(col):
        if leaf.null_count:
            raise InputError(f"{name} has null values near block {offset}")
    ks_here = np.concatenate([_inner_lengths(ch) for ch in col.chunks] or [np.zeros(0, np.int64)])
    if ks_here.size:
        k_min, k_max = int(ks_here.min()), int(ks_here.max())
        if k_min != k_max or ks.setdefault(c, k_max) != k_max:
            raise InputError(
                f"{name}: rows of different widths K ({k_min}..{k_max}, first seen "
                f"{ks.get(c)}); every row of a candidate must have the same K"
            )
    for leaf in _flat_chunks(col):
        x = leaf.to_numpy(zero_copy_only=False)
        if not x.size:
            continue
        if kind == "ids":
            lo, hi = int(x.min()), int(x.max())
            if lo < -1:
                raise InputError(f"{name} holds id {lo} < -1 near block {offset}")
            if vocab_size is not None and hi >= vocab_size:
                raise InputError(
                    f"{name} holds id {hi} >= the model's logits width {vocab_size} "
                    f"near block {offset}: the data does not match the model's "
                    "vocabulary"
                )
        elif np.isnan(x).any() or np.isposinf(x).any():
            raise InputError(f"{name} holds NaN or +inf logits near block {offset}")
        elif teacher == "calibrated":
            check_logprob_rows(x.reshape(-1, ks[c]), f"{name} near block {offset}")


def _check_block_scores(
    table: Any, scored: list[str], score: Score, lengths: np.ndarray, offset: int
) -> None:
    """The scored candidates' block scores of a batch of packed blocks are finite."""
    if "attention_mask" in table.column_names:
        am = np.concatenate(
            [leaf.to_numpy(zero_copy_only=False) for leaf in _flat_chunks(table["attention_mask"])]
            or [np.zeros(0)]
        )
        cs = np.concatenate([[0.0], np.cumsum(am > 0, dtype=np.float64)])
        ends = np.cumsum(lengths)
        ntok = cs[ends] - cs[ends - lengths]
    else:
        ntok = lengths.astype(np.float64)
    sc = block_scores(
        _column_getter(table),
        scored,
        score,
        table.column_names,
        ntok,
    )
    bad = ~np.isfinite(sc)
    if bad.any():
        j = int(np.flatnonzero(bad.any(0))[0])
        raise InputError(
            f"candidate {scored[j]!r}: score ({score}) is NaN or infinite in blocks "
            f"{_rows(bad[:, j], offset)}; drop or repair those blocks before training"
        )


def _column_getter(table: Any) -> Callable[[str], np.ndarray]:
    def get(name: str) -> np.ndarray:
        return np.asarray(table.column(name).to_numpy(zero_copy_only=False))

    return get


def _inner_lengths(chunk: Any) -> np.ndarray:
    """Lengths of the inner lists of a ``list<list<...>>`` (or Array2D) chunk."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = chunk.storage if isinstance(chunk, pa.ExtensionArray) else chunk
    inner = arr.flatten()
    if isinstance(inner, pa.ExtensionArray):
        inner = inner.storage
    return pc.list_value_length(inner).to_numpy(zero_copy_only=False)


def build_packed_dataset(
    input_ids: Sequence[Any] | np.ndarray,
    candidates: Mapping[str, Mapping[str, Any]],
    *,
    attention_mask: Sequence[Any] | np.ndarray | None = None,
    position_ids: Sequence[Any] | np.ndarray | None = None,
    num_bytes: Sequence[int] | np.ndarray | None = None,
    domain: Sequence[str] | None = None,
    logits_dtype: str = "float32",
) -> datasets.Dataset:
    """A packed dataset in the training schema, from arrays (for tests and small experiments).

    Args:
        input_ids: ``N`` blocks, each ``[L_i]`` (or an ``[N, L]`` array).
        candidates: name -> ``{"ids": N x [L_i, K], "logits": N x [L_i, K], "metric_ce": [N]}``
            plus optional ``"metric_ce_per_byte"``, ``"num_tokens"`` (``[N]``) and
            ``"status"`` (``N x [L_i]`` alignment statuses).
        attention_mask, position_ids: optional, like ``input_ids``.
        num_bytes: optional ``[N]`` bytes of text per block.
        domain: optional ``[N]`` domain of each block.
        logits_dtype: ``"float32"`` or ``"float16"``.
    """
    import datasets

    if logits_dtype not in ("float16", "float32"):
        raise InputError(f"logits_dtype must be 'float16' or 'float32', got {logits_dtype!r}")
    blocks = [np.asarray(x, dtype=np.int32).reshape(-1) for x in input_ids]
    n = len(blocks)
    data: dict[str, Any] = {"input_ids": blocks}
    feats: dict[str, Any] = {"input_ids": datasets.Sequence(datasets.Value("int32"))}
    for key, val in (("attention_mask", attention_mask), ("position_ids", position_ids)):
        if val is not None:
            data[key] = [np.asarray(x, dtype=np.int32).reshape(-1) for x in val]
            feats[key] = datasets.Sequence(datasets.Value("int32"))
    if num_bytes is not None:
        data["num_bytes"] = np.asarray(num_bytes, dtype=np.int64)
        feats["num_bytes"] = datasets.Value("int64")
    if domain is not None:
        if len(domain) != n:
            raise InputError(f"domain has {len(domain)} entries for {n} blocks")
        data["domain"] = [str(d) for d in domain]
        feats["domain"] = datasets.Value("string")
    for name, cols in candidates.items():
        check_candidate_name(name)
        ids = [np.asarray(x, dtype=np.int32) for x in cols["ids"]]
        logits = [np.asarray(x, dtype=np.dtype(logits_dtype)) for x in cols["logits"]]
        if len(ids) != n or len(logits) != n:
            raise InputError(f"candidate {name!r}: expected {n} blocks of ids and logits")
        k = ids[0].shape[1] if ids and ids[0].ndim == 2 else 0
        for i, (a, z) in enumerate(zip(ids, logits, strict=True)):
            if a.ndim != 2 or a.shape != z.shape or a.shape[0] != blocks[i].size or a.shape[1] != k:
                raise InputError(
                    f"candidate {name!r} block {i}: ids {a.shape} / logits {z.shape} must be "
                    f"[{blocks[i].size}, {k}]"
                )
        data[f"{name}_ids"] = ids
        data[f"{name}_logits"] = logits
        if "status" in cols:
            status = [np.asarray(x, dtype=np.uint8).reshape(-1) for x in cols["status"]]
            if [x.size for x in status] != [x.size for x in blocks]:
                raise InputError(f"candidate {name!r}: status must have one entry per token")
            data[f"{name}_status"] = status
            feats[f"{name}_status"] = datasets.Sequence(datasets.Value("uint8"))
        feats[f"{name}_ids"] = datasets.Array2D(shape=(None, k), dtype="int32")
        feats[f"{name}_logits"] = datasets.Array2D(shape=(None, k), dtype=logits_dtype)
        for key, dtype in (
            ("metric_ce", "float32"),
            ("metric_ce_per_byte", "float32"),
            ("num_tokens", "int64"),
        ):
            if key in cols:
                data[f"{name}_{key}"] = np.asarray(cols[key], dtype=dtype).reshape(n)
                feats[f"{name}_{key}"] = datasets.Value(dtype)
    return datasets.Dataset.from_dict(data, features=datasets.Features(feats))


# ------------------------------------------------------------------------------------------------
# The collator
# ------------------------------------------------------------------------------------------------


@dataclass
class FusionCollator:
    """Pads packed blocks into a batch and stacks the teacher candidates.

    Output keys: ``input_ids`` / ``attention_mask`` / ``labels`` ``[B, L]`` (int64; labels are the
    input ids with ``-100`` on padding), ``position_ids`` when the data has them,
    ``teacher_ids`` ``int32 [B, C, L, K]`` (``-1`` padded), ``teacher_logits`` ``float32
    [B, C, L, K]`` (``-inf`` padded), ``teacher_scores`` ``float32 [B, C]`` and
    ``teacher_matched`` ``bool [B, C, L]`` (where a candidate's row is its own distribution: the
    ``{c}_status`` column says MATCHED; every position of a candidate without one), candidates
    in :attr:`stack` order, ``block_domain`` ``int64 [B]`` (the index of each block's
    ``domain`` in :attr:`domains`, ``-1`` without one) and, when the data has ``num_bytes``,
    ``block_bytes`` ``float32 [B]``. Blocks are padded on the right to
    the longest block (times ``pad_to_multiple_of``), candidates to the largest ``K``.

    Args:
        sources: the source candidates' names, in order.
        with_ref: whether ref is a fusion candidate.
        ref_rows: whether ref rows are stacked (to fill empty rows) although ``with_ref`` is False.
        score: ``"ce"`` or ``"ce_per_byte"``: which block score to read.
        vocab_size: when set, ids ``>= vocab_size`` raise :class:`InputError`.
        teacher: ``"calibrated"`` checks that every row holds log-probabilities (its
            probabilities sum to at most 1, up to float16 rounding).
        domains: the values of the packed data's ``domain`` column, for ``block_domain``.
    """

    sources: Sequence[str]
    with_ref: bool = True
    ref_rows: bool = True
    score: Score = "ce_per_byte"
    teacher: Teacher = "renormalized"
    pad_token_id: int = 0
    pad_to_multiple_of: int | None = None
    vocab_size: int | None = None
    domains: Sequence[str] = ()
    stack: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        check_choice("score", self.score, SCORES)
        check_choice("teacher", self.teacher, TEACHERS)
        self.sources = tuple(check_candidate_name(s) for s in self.sources)
        use_ref = self.with_ref or self.ref_rows
        self.stack = ((REF,) if use_ref else ()) + tuple(self.sources)
        if not self.with_ref and not self.sources:
            raise InputError("no fusion candidate: with_ref is False and sources is empty")

    @property
    def ref_index(self) -> int | None:
        """Index of the ref rows in the stack (they replace empty rows), or None."""
        return 0 if self.stack and self.stack[0] == REF else None

    def _domain_index(self, value: Any) -> int:
        if value is None:
            return -1
        try:
            return list(self.domains).index(str(value))
        except ValueError:
            raise InputError(
                f"block domain {value!r} is not one of the collator's domains {list(self.domains)}"
            ) from None

    @property
    def candidate_mask(self) -> list[bool]:
        """Which stacked candidates take part in the fusion."""
        return [c != REF or self.with_ref for c in self.stack]

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise InputError("empty batch")
        b = len(features)
        blocks = [np.asarray(f["input_ids"], dtype=np.int64).reshape(-1) for f in features]
        lens = [x.size for x in blocks]
        length = max(lens)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = np.full((b, length), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((b, length), dtype=np.int64)
        labels = np.full((b, length), -100, dtype=np.int64)
        has_pos = "position_ids" in features[0]
        pos = np.zeros((b, length), dtype=np.int64) if has_pos else None
        for i, f in enumerate(features):
            n = lens[i]
            input_ids[i, :n] = blocks[i]
            am = (
                np.asarray(f["attention_mask"], dtype=np.int64).reshape(-1)
                if "attention_mask" in f
                else np.ones(n, np.int64)
            )
            if am.size != n:
                raise InputError(f"attention_mask has {am.size} entries for {n} tokens")
            mask[i, :n] = am
            lab = np.asarray(f["labels"], np.int64).reshape(-1) if "labels" in f else blocks[i]
            labels[i, :n] = np.where(am > 0, lab, -100)
            if pos is not None:
                pos[i, :n] = np.asarray(f["position_ids"], dtype=np.int64).reshape(-1)
        if self.vocab_size is not None and (
            input_ids.max() >= self.vocab_size or input_ids.min() < 0
        ):
            raise InputError(
                f"input_ids outside [0, {self.vocab_size}): the data does not match the model's "
                "vocabulary"
            )

        rows: list[list[tuple[np.ndarray, np.ndarray]]] = []
        kmax = 1
        for c in self.stack:
            per = []
            for i, f in enumerate(features):
                try:
                    ids = _as_2d(f[f"{c}_ids"], np.int32)
                    lg = _as_2d(f[f"{c}_logits"], np.float32)
                except KeyError as e:
                    raise InputError(
                        f"batch lacks column {e.args[0]!r} of candidate {c!r}"
                    ) from None
                if ids.shape != lg.shape or ids.shape[0] != lens[i]:
                    raise InputError(
                        f"candidate {c!r}: ids {ids.shape} / logits {lg.shape} do not match a "
                        f"block of {lens[i]} tokens"
                    )
                kmax = max(kmax, ids.shape[1])
                per.append((ids, lg))
            rows.append(per)
        t_ids = np.full((b, len(self.stack), length, kmax), -1, dtype=np.int32)
        t_logits = np.full((b, len(self.stack), length, kmax), -np.inf, dtype=np.float32)
        matched = np.zeros((b, len(self.stack), length), dtype=bool)
        for j, per in enumerate(rows):
            status_col = f"{self.stack[j]}_status"
            for i, (ids, lg) in enumerate(per):
                t_ids[i, j, : ids.shape[0], : ids.shape[1]] = ids
                t_logits[i, j, : lg.shape[0], : lg.shape[1]] = lg
                if status_col in features[i]:
                    st = np.asarray(features[i][status_col]).reshape(-1)
                    if st.size != lens[i]:
                        raise InputError(f"{status_col} has {st.size} entries for {lens[i]} tokens")
                    matched[i, j, : lens[i]] = st == 0  # MATCHED
                else:
                    matched[i, j, : lens[i]] = True
        if t_ids.size:
            if t_ids.min() < -1 or (self.vocab_size is not None and t_ids.max() >= self.vocab_size):
                raise InputError(
                    f"teacher ids outside [-1, {self.vocab_size}): the data does not match the "
                    "model's vocabulary"
                )
            if np.isnan(t_logits).any() or np.isposinf(t_logits).any():
                raise InputError("teacher logits hold NaN or +inf")
            if self.teacher == "calibrated":
                check_logprob_rows(t_logits, "the batch's teacher rows")

        scored = [c for c, keep in zip(self.stack, self.candidate_mask, strict=True) if keep]
        cols = list(features[0].keys())
        sc = block_scores(
            lambda n: np.asarray([f[n] for f in features]),
            scored,
            self.score,
            cols,
            mask.sum(1),
        )
        scores = np.zeros((b, len(self.stack)), dtype=np.float32)
        scores[:, [j for j, keep in enumerate(self.candidate_mask) if keep]] = sc
        if not np.isfinite(scores).all():
            raise InputError(f"NaN or infinite {self.score} score in the batch")
        out = {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(mask),
            "labels": torch.from_numpy(labels),
            "teacher_ids": torch.from_numpy(t_ids),
            "teacher_logits": torch.from_numpy(t_logits),
            "teacher_scores": torch.from_numpy(scores),
            "teacher_matched": torch.from_numpy(matched),
            "block_domain": torch.tensor(
                [self._domain_index(f.get("domain")) for f in features], dtype=torch.int64
            ),
        }
        if "num_bytes" in features[0]:
            nb = np.asarray([f["num_bytes"] for f in features], dtype=np.float32).reshape(b)
            out["block_bytes"] = torch.from_numpy(nb)
        if pos is not None:
            out["position_ids"] = torch.from_numpy(pos)
        return out


#: How far above 1 a row's probabilities may sum (float16 storage of log-probabilities).
MASS_TOLERANCE = 1e-2


def check_logprob_rows(values: np.ndarray, what: str) -> None:
    """Raise :class:`InputError` unless every row of ``values`` (``[..., K]``, ``-inf`` padded)
    holds log-probabilities: entries ``<= 0`` whose probabilities sum to at most 1."""
    with np.errstate(over="ignore"):
        mass = np.exp(values.astype(np.float64)).sum(-1)
    bad = mass > 1.0 + MASS_TOLERANCE
    if bad.any():
        raise InputError(
            f"{what} are not log-probabilities: a row's probabilities sum to "
            f"{float(mass[bad].max()):.3g} > 1 (raw logits?). The calibrated teacher needs "
            "`fusellm extract --values logprobs`; use teacher='renormalized' for raw logits"
        )


def _as_2d(x: Any, dtype: Any) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype == object:  # a list of per-row arrays
        a = np.stack([np.asarray(r) for r in a]) if len(a) else np.zeros((0, 0))
    if a.ndim == 1 and a.size == 0:
        a = a.reshape(0, 0)
    if a.ndim != 2:
        raise InputError(f"teacher rows must be [L, K], got shape {a.shape}")
    return a.astype(dtype, copy=False)
