"""The sparse fusion loss against the dense formula of spec section 7, the collator, the schema.

The dense reference below is written straight from the spec, loop by loop: a ``[V]`` target per
candidate and position, empty rows replaced by the ref row, MinCE / AvgCE on ``exp(-CE)``, then
``-Σ_v Q log softmax(z)`` with no shift. The sparse loss must agree with it to 1e-6 in float32,
value and gradient, for every fusion / combine / distill_loss combination.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fusellm import InputError, InputTypeError
from fusellm.fuse import (
    FusionCollator,
    build_packed_dataset,
    detect_candidates,
    fusion_loss,
    log_softmax_gather,
    validate_packed,
)

# ------------------------------------------------------------------------------------------------
# The dense reference
# ------------------------------------------------------------------------------------------------


def dense_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    t_ids: torch.Tensor,
    t_logits: torch.Tensor,
    scores: torch.Tensor,
    *,
    fusion: str,
    combine: str,
    distill_loss: str,
    lam: float,
    temperature: float,
    progress: float,
    ref_index: int | None,
    cand_mask: list[bool],
) -> torch.Tensor:
    b, length, v = logits.shape
    c = t_ids.shape[1]
    logp = torch.log_softmax(logits.float(), dim=-1)
    dense = torch.zeros(b, c, length, v)
    for i, j, t in itertools.product(range(b), range(c), range(length)):
        ids, lg = t_ids[i, j, t], t_logits[i, j, t]
        ok = (ids >= 0) & (lg > -math.inf)
        if not ok.any() and ref_index is not None:
            ids, lg = t_ids[i, ref_index, t], t_logits[i, ref_index, t]
            ok = (ids >= 0) & (lg > -math.inf)
        if ok.any():
            p = torch.softmax(lg[ok].float() / temperature, dim=0)
            for idx, pv in zip(ids[ok].tolist(), p, strict=True):
                dense[i, j, t, idx] += pv
    s = torch.exp(-scores.float())
    cands = [j for j in range(c) if cand_mask[j]]
    total_clm = logits.new_zeros((), dtype=torch.float32)
    total_fuse = logits.new_zeros((), dtype=torch.float32)
    n_clm = n_fuse = 0
    for i in range(b):
        if fusion == "mince":
            best = max(s[i, j].item() for j in cands)
            pick = next(j for j in cands if s[i, j].item() == best)  # first max: ref on ties
            q = dense[i, pick]
        else:
            w = torch.softmax(s[i, cands], dim=0)
            q = sum(w[n] * dense[i, j] for n, j in enumerate(cands))
        s_max = max(s[i, j] for j in cands)
        if combine == "soft":
            lm_w = 1 - s_max
        elif combine == "hard_and_decay":
            lm_w = lam + (1 - lam) * progress
        else:
            lm_w = lam
        fuse_rows = -(q * logp[i]).sum(-1)
        if distill_loss == "kl":
            qlogq = torch.where(q > 0, q * torch.log(q.clamp_min(1e-45)), torch.zeros_like(q))
            fuse_rows = fuse_rows + qlogq.sum(-1)
        for t in range(length):
            if mask[i, t]:
                total_fuse = total_fuse + (1 - lm_w) * fuse_rows[t]
                n_fuse += 1
            if t + 1 < length and labels[i, t + 1] != -100:
                total_clm = total_clm + lm_w * -logp[i, t, labels[i, t + 1]]
                n_clm += 1
    return total_clm / max(n_clm, 1) + total_fuse / max(n_fuse, 1)


def random_batch(
    seed: int, *, b: int = 3, c: int = 3, length: int = 7, k: int = 4, v: int = 23
) -> dict[str, Any]:
    """Random inputs with every special case: empty rows (also in ref), ties, padding."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, length, v, generator=g) * 2
    input_ids = torch.randint(0, v, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    mask[1, length - 2 :] = 0  # padding at the end of block 1
    mask[2, length - 1 :] = 0
    labels = torch.where(mask > 0, input_ids, -100)
    # Distinct ids per row (the alignment stage guarantees it).
    t_ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(b * c * length)]).view(
        b, c, length, k
    )
    t_logits = torch.randn(b, c, length, k, generator=g) * 3
    drop = torch.rand(b, c, length, k, generator=g) < 0.3
    t_ids = torch.where(drop, -1, t_ids)
    t_logits = torch.where(drop, -math.inf, t_logits)
    # Some entries have a valid id but a -inf logit: invalid too.
    t_logits[0, 1, 0, 0] = -math.inf
    empty = torch.rand(b, c, length, generator=g) < 0.25
    t_ids[empty] = -1
    t_logits[empty] = -math.inf
    t_ids[0, 0, 3] = -1  # an empty ref row: the whole position has no target where sources are
    t_logits[0, 0, 3] = -math.inf  # empty too
    t_ids[0, 1:, 3] = -1
    t_logits[0, 1:, 3] = -math.inf
    scores = torch.rand(b, c, generator=g) * 3
    scores[0, 2] = scores[0, 0]  # a tie between ref and a source in block 0: ref wins
    scores[1, 1] = scores[1, 2] = scores[1, 0] - 0.5  # a tie between two sources in block 1
    return {
        "logits": logits,
        "labels": labels,
        "attention_mask": mask,
        "teacher_ids": t_ids.int(),
        "teacher_logits": t_logits,
        "teacher_scores": scores,
    }


COMBOS = list(
    itertools.product(("mince", "avgce"), ("hard", "hard_and_decay", "soft"), ("ce", "kl"))
)


@pytest.mark.parametrize(("fusion", "combine", "distill_loss"), COMBOS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sparse_loss_equals_dense_reference(
    fusion: str, combine: str, distill_loss: str, seed: int
) -> None:
    batch = random_batch(seed)
    kw = {
        "fusion": fusion,
        "combine": combine,
        "distill_loss": distill_loss,
        "temperature": [1.0, 0.7, 2.0][seed],
        "progress": 0.3,
    }
    logits = batch["logits"].clone().requires_grad_(True)
    out = fusion_loss(
        logits,
        batch["labels"],
        batch["attention_mask"],
        batch["teacher_ids"],
        batch["teacher_logits"],
        batch["teacher_scores"],
        lm_loss_weight=0.9,
        chunk_elements=50,  # several chunks per batch
        **kw,
    )
    out.loss.backward()
    ref_logits = batch["logits"].clone().requires_grad_(True)
    ref = dense_reference(
        ref_logits,
        batch["labels"],
        batch["attention_mask"],
        batch["teacher_ids"],
        batch["teacher_logits"],
        batch["teacher_scores"],
        lam=0.9,
        ref_index=0,
        cand_mask=[True] * 3,
        **kw,
    )
    ref.backward()
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fusion", ["mince", "avgce"])
@pytest.mark.parametrize(
    ("ref_index", "cand_mask"), [(0, [False, True, True]), (None, [True, True, True])]
)
def test_ref_not_a_candidate_or_absent(
    fusion: str, ref_index: int | None, cand_mask: list[bool]
) -> None:
    batch = random_batch(5)
    kw = {"fusion": fusion, "combine": "soft", "distill_loss": "ce", "temperature": 1.0}
    out = fusion_loss(
        batch["logits"],
        batch["labels"],
        batch["attention_mask"],
        batch["teacher_ids"],
        batch["teacher_logits"],
        batch["teacher_scores"],
        ref_index=ref_index,
        candidate_mask=cand_mask,
        **kw,
    )
    ref = dense_reference(
        batch["logits"],
        batch["labels"],
        batch["attention_mask"],
        batch["teacher_ids"],
        batch["teacher_logits"],
        batch["teacher_scores"],
        lam=0.9,
        progress=0.0,
        ref_index=ref_index,
        cand_mask=cand_mask,
        **kw,
    )
    torch.testing.assert_close(out.loss, ref, rtol=1e-6, atol=1e-6)
    assert (out.candidate_weights[:, 0] == 0).all() == (not cand_mask[0])


def test_mince_ties_go_to_ref_and_selection_is_reported() -> None:
    batch = random_batch(0)
    scores = torch.tensor([[1.0, 1.0, 1.0], [2.0, 0.5, 0.5], [0.1, 3.0, 0.2]])
    out = fusion_loss(
        batch["logits"],
        batch["labels"],
        batch["attention_mask"],
        batch["teacher_ids"],
        batch["teacher_logits"],
        scores,
    )
    assert out.candidate_weights.tolist() == [[1, 0, 0], [0, 1, 0], [1, 0, 0]]
    avg = fusion_loss(
        batch["logits"],
        batch["labels"],
        batch["attention_mask"],
        batch["teacher_ids"],
        batch["teacher_logits"],
        scores,
        fusion="avgce",
    )
    torch.testing.assert_close(avg.candidate_weights.sum(1), torch.ones(3))
    torch.testing.assert_close(avg.candidate_weights[0], torch.full((3,), 1 / 3))


def test_lambda_one_is_plain_clm_and_matches_cross_entropy() -> None:
    batch = random_batch(3)
    out = fusion_loss(
        batch["logits"],
        batch["labels"],
        batch["attention_mask"],
        batch["teacher_ids"],
        batch["teacher_logits"],
        batch["teacher_scores"],
        lm_loss_weight=1.0,
    )
    shift = batch["labels"][:, 1:]
    ce = torch.nn.functional.cross_entropy(
        batch["logits"][:, :-1].reshape(-1, batch["logits"].shape[-1]), shift.reshape(-1)
    )
    torch.testing.assert_close(out.loss, ce, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.clm_loss, ce, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# The calibrated loss (spec section 11) and token-level selection, against a dense float64 oracle
# ------------------------------------------------------------------------------------------------


def as_logprobs(batch: dict[str, Any], seed: int) -> dict[str, Any]:
    """The batch's teacher rows as log-probabilities of rows holding a random share of the mass
    (one-entry rows hold all of it, as alignment fallbacks do)."""
    g = torch.Generator().manual_seed(seed)
    z = batch["teacher_logits"]
    valid = (batch["teacher_ids"] >= 0) & (z > -math.inf)
    lse = torch.logsumexp(torch.where(valid, z, -math.inf), -1, keepdim=True)
    mass = torch.rand((*z.shape[:-1], 1), generator=g) * 0.8 + 0.2
    mass = torch.where(valid.sum(-1, keepdim=True) == 1, torch.ones_like(mass), mass)
    lp = torch.where(valid, z - torch.where(torch.isfinite(lse), lse, 0) + mass.log(), -math.inf)
    return {**batch, "teacher_logits": lp}


def dense_calibrated(
    logits: torch.Tensor,
    batch: dict[str, Any],
    *,
    fusion: str,
    distill_loss: str,
    selection: str,
    temperature: float,
    lam: float,
    cand_mask: list[bool],
    matched: torch.Tensor | None = None,
    with_student: bool = False,
    block_bytes: torch.Tensor | None = None,
    teacher_tail: str = "label",
    gated: bool = False,
    decoupled: bool = False,
) -> torch.Tensor:
    """Position by position, in float64: the fused teacher over the row ids plus one tail bin.
    With ``with_student``, a position where the student beats the picked row (per block: its CE
    per byte / per token against the candidate's score; per token: its probability of the next
    token against the row's) gets no fusion term (the student's own distribution as the target:
    no gradient, reported as 0); its CLM weight stays ``lam``. ``teacher_tail="label"``: where
    the next token is not in the fused row, the tail mass is a target on that token instead of
    on the bin. ``gated``: a block uses ``lam`` only where the fused rows give the true next
    token's bin (its id, or the tail) a larger summed log-probability than the student does, on
    the positions with a next token whose picked row is matched; elsewhere CLM alone.
    ``decoupled``: the same gate, but a closed block keeps, with weight ``1 - lam``, the rows'
    distribution over the bins other than the one holding the next token against the student's,
    each renormalised without that bin (with its CLM term at weight 1)."""
    labels, mask = batch["labels"], batch["attention_mask"]
    t_ids, t_lp, scores = batch["teacher_ids"], batch["teacher_logits"], batch["teacher_scores"]
    b, length, v = logits.shape
    c = t_ids.shape[1]
    p_student = torch.softmax(logits.double(), -1)
    clm_sum = [logits.new_zeros((), dtype=torch.float64) for _ in range(b)]
    fuse_sum = [logits.new_zeros((), dtype=torch.float64) for _ in range(b)]
    nckd_sum = [logits.new_zeros((), dtype=torch.float64) for _ in range(b)]
    gain = [0.0] * b
    n_clm = n_fuse = 0
    student_reward = []
    for i in range(b):
        nll = [
            -math.log(float(p_student[i, t, int(labels[i, t + 1])].detach()))
            for t in range(length - 1)
            if labels[i, t + 1] != -100
        ]
        den = float(block_bytes[i]) if block_bytes is not None else len(nll)
        student_reward.append(math.exp(-sum(nll) / den))
    for i, t in itertools.product(range(b), range(length)):
        rows = []
        for j in range(c):
            ids, lp = t_ids[i, j, t], t_lp[i, j, t]
            ok = (ids >= 0) & (lp > -math.inf)
            if not ok.any():  # empty: the ref row
                ids, lp = t_ids[i, 0, t], t_lp[i, 0, t]
                ok = (ids >= 0) & (lp > -math.inf)
            ids, lp = ids[ok].tolist(), lp[ok].double()
            p = torch.exp(lp)
            if temperature != 1.0 and len(ids):
                p = p.sum() * torch.softmax(lp / temperature, 0)
            rows.append((ids, p, max(0.0, 1.0 - float(p.sum()))))
        y = int(labels[i, t + 1]) if t + 1 < length else -100
        reward = [math.exp(-float(scores[i, j])) for j in range(c)]
        usable = [cand_mask[j] and (matched is None or bool(matched[i, j, t])) for j in range(c)]
        if selection == "token" and y != -100 and any(usable):
            reward = []
            for j, (ids, p, tail) in enumerate(rows):
                py = float(p[ids.index(y)]) if y in ids else tail / max(1, v - len(ids))
                reward.append(py if usable[j] else -math.inf)
        reward = [r if cand_mask[j] else -math.inf for j, r in enumerate(reward)]
        own = False  # the student is the best candidate
        if fusion == "mince":
            pick = reward.index(max(reward))
            weights = [1.0 if j == pick else 0.0 for j in range(c)]
            if with_student and selection == "block":
                own = student_reward[i] >= math.exp(-float(scores[i, pick]))
            elif with_student and y != -100:
                ids, p, row_tail = rows[pick]
                py = float(p[ids.index(y)]) if y in ids else row_tail / max(1, v - len(ids))
                own = float(p_student[i, t, y].detach()) >= py
        else:
            weights = torch.softmax(torch.tensor(reward, dtype=torch.float64), 0).tolist()
        q = torch.zeros(v, dtype=torch.float64)
        in_row = torch.zeros(v, dtype=torch.bool)
        tail = 0.0
        for w, (ids, p, row_tail) in zip(weights, rows, strict=True):
            if w > 0:
                for idx, pv in zip(ids, p.tolist(), strict=True):
                    q[idx] += w * pv
                    in_row[idx] = True
                tail += w * row_tail
        ps = p_student[i, t]
        loss_t = -(q[in_row] * torch.log(ps[in_row])).sum()
        listed = y != -100 and bool(in_row[y])
        if tail > 0:
            if teacher_tail == "label" and y != -100 and not listed and bool(in_row.any()):
                loss_t = loss_t - tail * torch.log(ps[y])
            else:
                loss_t = loss_t - tail * torch.log(ps[~in_row].sum())
        picked_ok = matched is None or any(
            w > 0 and bool(matched[i, j, t]) for j, w in enumerate(weights)
        )
        if decoupled and y != -100 and bool(in_row.any()) and mask[i, t]:
            y_bin = listed or teacher_tail == "label"  # else the tail bin holds y
            s_y = ps[y] if y_bin else ps[~in_row].sum()
            others = [int(v_) for v_ in torch.nonzero(in_row).flatten() if int(v_) != y]
            bins = [(float(q[v_]), ps[v_]) for v_ in others]
            if listed:
                bins.append((tail, ps[~in_row].sum()))
            total = sum(pb for pb, _ in bins)
            for pb, sb in bins:
                if pb > 0:
                    nckd_sum[i] = nckd_sum[i] - pb * torch.log(sb / (1 - s_y))
                    if distill_loss == "kl":
                        nckd_sum[i] = nckd_sum[i] + pb * math.log(pb / total)
        if (gated or decoupled) and y != -100 and mask[i, t] and picked_ok:
            mine = float((ps[y] if listed else ps[~in_row].sum()).detach())
            theirs = float(q[y]) if listed else tail
            gain[i] += math.log(max(theirs, 1e-300)) - math.log(mine)
        if distill_loss == "kl":
            qq = q[in_row & (q > 0)]
            loss_t = loss_t + (qq * torch.log(qq)).sum() + (tail * math.log(tail) if tail else 0)
        if mask[i, t]:
            fuse_sum[i] = fuse_sum[i] + (0.0 if own else loss_t)
            n_fuse += 1
        if y != -100:
            clm_sum[i] = clm_sum[i] - torch.log(ps[y])
            n_clm += 1
    opened = [not (gated or decoupled) or gain[i] > 0 for i in range(b)]
    lams = [lam if opened[i] else 1.0 for i in range(b)]
    total_clm = sum(lm * x for lm, x in zip(lams, clm_sum, strict=True))
    if decoupled:
        terms = [fuse_sum[i] if opened[i] else nckd_sum[i] for i in range(b)]
        total_fuse = sum((1 - lam) * x for x in terms)
    else:
        total_fuse = sum((1 - lm) * x for lm, x in zip(lams, fuse_sum, strict=True))
    return total_clm / max(n_clm, 1) + total_fuse / max(n_fuse, 1)


CALIBRATED = list(
    itertools.product(("mince", "avgce"), ("block", "token"), ("ce", "kl"), (1.0, 0.7))
)


@pytest.mark.parametrize(("fusion", "selection", "distill_loss", "temperature"), CALIBRATED)
@pytest.mark.parametrize("seed", [0, 1])
def test_calibrated_loss_equals_the_dense_definition(
    fusion: str, selection: str, distill_loss: str, temperature: float, seed: int
) -> None:
    batch = as_logprobs(random_batch(seed), seed)
    g = torch.Generator().manual_seed(seed + 7)
    matched = torch.rand((*batch["teacher_scores"].shape, 7), generator=g) < 0.8
    matched[:, 0] = True  # ref rows are always the target's own
    cand_mask = [True, True, seed == 0]
    kw = {"fusion": fusion, "distill_loss": distill_loss, "temperature": temperature}
    logits = batch["logits"].clone().requires_grad_(True)
    out = fusion_loss(
        logits,
        batch["labels"],
        batch["attention_mask"],
        batch["teacher_ids"],
        batch["teacher_logits"],
        batch["teacher_scores"],
        teacher="calibrated",
        selection=selection,
        lm_loss_weight=0.6,
        candidate_mask=cand_mask,
        teacher_matched=matched,
        chunk_elements=50,
        **kw,
    )
    out.loss.backward()
    ref_logits = batch["logits"].clone().requires_grad_(True)
    want = dense_calibrated(
        ref_logits,
        batch,
        selection=selection,
        lam=0.6,
        cand_mask=cand_mask,
        matched=matched,
        **kw,
    )
    want.backward()
    torch.testing.assert_close(out.loss.double(), want, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-5, atol=1e-6)


GATES = [
    (combine, loss) for combine in ("hard", "gated", "decoupled") for loss in ("ce", "kl")
    if loss == "ce" or combine == "decoupled"
]  # fmt: skip


@pytest.mark.parametrize("fusion", ["mince", "avgce"])
@pytest.mark.parametrize(("combine", "distill_loss"), GATES)
@pytest.mark.parametrize("teacher_tail", ["bin", "label"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_label_tail_and_gate_equal_the_dense_definition(
    fusion: str, combine: str, distill_loss: str, teacher_tail: str, seed: int
) -> None:
    batch = as_logprobs(random_batch(seed), seed)
    g = torch.Generator().manual_seed(seed + 11)
    matched = torch.rand((*batch["teacher_scores"].shape, 7), generator=g) < 0.8
    matched[:, 0] = True
    logits = batch["logits"].clone()
    # block 1: the student already knows its continuations (the gate closes there)
    labels = batch["labels"]
    for t in range(6):
        if labels[1, t + 1] != -100:
            logits[1, t, labels[1, t + 1]] += 12.0
    x = logits.clone().requires_grad_(True)
    out = fusion_loss(
        x,
        labels,
        batch["attention_mask"],
        batch["teacher_ids"],
        batch["teacher_logits"],
        batch["teacher_scores"],
        fusion=fusion,
        combine=combine,
        distill_loss=distill_loss,
        teacher="calibrated",
        teacher_tail=teacher_tail,
        lm_loss_weight=0.3,
        teacher_matched=matched,
        chunk_elements=50,
    )
    out.loss.backward()
    y = logits.clone().requires_grad_(True)
    want = dense_calibrated(
        y,
        batch,
        fusion=fusion,
        distill_loss=distill_loss,
        selection="block",
        temperature=1.0,
        lam=0.3,
        cand_mask=[True] * 3,
        matched=matched,
        teacher_tail=teacher_tail,
        gated=combine == "gated",
        decoupled=combine == "decoupled",
    )
    want.backward()
    torch.testing.assert_close(out.loss.double(), want, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-6)
    if combine != "hard":
        assert float(out.lm_weight[1]) == 1.0  # the student is better: CLM alone (gated)


def _closed_batch(seed: int, boost: float) -> tuple[dict[str, Any], torch.Tensor]:
    """A calibrated batch whose student puts ``boost`` more logit on every next token (the gate
    closes on every block for a large boost)."""
    batch = as_logprobs(random_batch(seed), seed)
    logits = batch["logits"].clone()
    labels = batch["labels"]
    for i, t in itertools.product(range(labels.shape[0]), range(labels.shape[1] - 1)):
        if labels[i, t + 1] != -100:
            logits[i, t, labels[i, t + 1]] += boost
    return batch, logits


def _decoupled(batch: dict[str, Any], logits: torch.Tensor, combine: str = "decoupled") -> Any:
    return fusion_loss(
        logits, batch["labels"], batch["attention_mask"], batch["teacher_ids"],
        batch["teacher_logits"], batch["teacher_scores"], combine=combine,
        teacher="calibrated", lm_loss_weight=0.4, chunk_elements=50,
    )  # fmt: skip


@pytest.mark.parametrize("seed", [0, 1])
def test_decoupled_gate_leaves_the_next_token_to_the_data(seed: int) -> None:
    # Every block closed: the true token's logits get CLM's gradient alone, as with "gated";
    # the other logits also get the rows' non-target shape, which "gated" drops.
    batch, logits = _closed_batch(seed, 12.0)
    x = logits.clone().requires_grad_(True)
    y = logits.clone().requires_grad_(True)
    out, gated = _decoupled(batch, x), _decoupled(batch, y, "gated")
    assert torch.all(out.lm_weight == 1.0)
    assert torch.all(gated.lm_weight == 1.0)
    out.loss.backward()
    gated.loss.backward()
    labels = batch["labels"]
    nxt = torch.full_like(labels, -100)
    nxt[:, :-1] = labels[:, 1:]
    at_y = torch.zeros_like(logits, dtype=torch.bool)
    at_y.scatter_(-1, nxt.clamp_min(0).unsqueeze(-1), (nxt != -100).unsqueeze(-1))
    torch.testing.assert_close(x.grad[at_y], y.grad[at_y], rtol=1e-5, atol=5e-6)
    assert float((x.grad - y.grad)[~at_y].abs().max()) > 1e-4  # the non-target part teaches
    assert float(out.fusion_loss) > 0.0


def test_decoupled_non_target_part_is_exact_when_the_student_is_sure() -> None:
    # The non-target part does not depend on the true token's logit at all: with q_y within
    # float32 rounding of 1 (boost 60) it equals its value at boost 12, where 1 - q_y is
    # representable, and the gradient stays finite.
    batch, a = _closed_batch(0, 12.0)
    _, b = _closed_batch(0, 60.0)
    x = b.clone().requires_grad_(True)
    sure = _decoupled(batch, x)
    sure.loss.backward()
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(
        sure.fusion_loss, _decoupled(batch, a).fusion_loss, rtol=1e-5, atol=0
    )


@pytest.mark.parametrize(
    ("student_p", "teacher_p", "opens"), [(0.2, 0.9, True), (0.95, 0.9, False)]
)
def test_gate_opens_where_the_teacher_gives_the_next_token_more_mass(
    student_p: float, teacher_p: float, opens: bool
) -> None:
    v, length = 6, 3
    labels = torch.tensor([[1, 2, 3]])
    # the student: student_p on each next token, the rest spread evenly
    probs = torch.full((1, length, v), (1 - student_p) / (v - 1))
    probs[0, 0, 2] = probs[0, 1, 3] = student_p
    ids = torch.tensor([[[[2, 4], [3, 4], [0, 4]]]])  # the next token listed (the last: no next)
    lp = torch.log(torch.tensor([[[[teacher_p, 0.05]] * length]]))
    out = fusion_loss(
        probs.log(), labels, torch.ones(1, length), ids, lp, torch.zeros(1, 1),
        teacher="calibrated", combine="gated", lm_loss_weight=0.25, ref_index=None,
    )  # fmt: skip
    assert round(float(out.lm_weight[0]), 6) == (0.25 if opens else 1.0)


def test_gate_needs_calibrated_rows_and_the_tail_mode_is_checked() -> None:
    batch = random_batch(0)
    args = [batch[k] for k in ("logits", "labels", "attention_mask", "teacher_ids")]
    rest = (batch["teacher_logits"], batch["teacher_scores"])
    for combine in ("gated", "decoupled"):
        with pytest.raises(InputError, match="calibrated"):
            fusion_loss(*args, *rest, combine=combine)
    with pytest.raises(InputError, match="teacher_tail"):
        fusion_loss(*args, *rest, teacher="calibrated", teacher_tail="uniform")
    # renormalized rows have no tail: the two tail modes are one loss
    a = fusion_loss(*args, *rest, teacher_tail="label").loss
    b = fusion_loss(*args, *rest, teacher_tail="bin").loss
    assert torch.equal(a, b)


def sub_batch(batch: dict[str, Any], block: int, cands: int, length: int) -> dict[str, Any]:
    """One block, the first ``cands`` candidates and ``length`` positions of a batch."""
    out = {k: v[block : block + 1, ..., :length] for k, v in batch.items() if v.dim() == 2}
    out["teacher_scores"] = batch["teacher_scores"][block : block + 1, :cands]
    out["logits"] = batch["logits"][block : block + 1, :length]
    for k in ("teacher_ids", "teacher_logits"):
        out[k] = batch[k][block : block + 1, :cands, :length]
    return out


@pytest.mark.parametrize("selection", ["block", "token"])
@pytest.mark.parametrize("per_byte", [False, True])
def test_student_competes_with_the_selected_candidate(selection: str, per_byte: bool) -> None:
    batch = as_logprobs(random_batch(4), 4)
    logits = batch["logits"].clone()
    labels = batch["labels"]
    # the student already knows some continuations well: those positions train by CLM alone
    for i, t in [(0, 0), (0, 1), (1, 2), (2, 3), (2, 4)]:
        logits[i, t, labels[i, t + 1]] += 9.0
    kw: dict[str, Any] = {"selection": selection, "lm_loss_weight": 0.4}
    block_bytes = torch.tensor([40.0, 25.0, 3.0]) if per_byte else None
    scores = torch.tensor([[1.0, 0.6, 0.9], [0.2, 0.1, 0.3], [3.0, 2.5, 2.6]])
    batch = {**batch, "teacher_scores": scores}
    x = logits.clone().requires_grad_(True)
    out = fusion_loss(
        x,
        labels,
        batch["attention_mask"],
        batch["teacher_ids"],
        batch["teacher_logits"],
        scores,
        teacher="calibrated",
        with_student=True,
        block_bytes=block_bytes,
        **kw,
    )
    out.loss.backward()
    y = logits.clone().requires_grad_(True)
    want = dense_calibrated(
        y,
        batch,
        fusion="mince",
        distill_loss="ce",
        temperature=1.0,
        lam=0.4,
        cand_mask=[True] * 3,
        with_student=True,
        block_bytes=block_bytes,
        selection=selection,
    )
    want.backward()
    torch.testing.assert_close(out.loss.double(), want, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-6)
    assert 0 < float(out.student_share.sum()) < 3  # the student wins somewhere, not everywhere
    torch.testing.assert_close(
        out.candidate_weights.sum(1) + out.student_share, torch.ones(3), rtol=1e-6, atol=1e-6
    )
    with pytest.raises(InputError, match="mince"):
        fusion_loss(x, labels, batch["attention_mask"], batch["teacher_ids"],
                    batch["teacher_logits"], scores, fusion="avgce", with_student=True)  # fmt: skip


def test_calibrated_tail_is_exact_when_the_row_holds_almost_all_student_mass() -> None:
    ids = torch.tensor([[[[1, 4, 5, -1], [2, 3, 7, 8], [10, 14, 1, 11]]]], dtype=torch.int32)
    lp = torch.where(ids >= 0, math.log(0.2), -math.inf)  # rows holding 60 % and 80 %
    logits = torch.zeros(1, 3, 23)
    for t in range(3):
        logits[0, t, ids[0, 0, t][ids[0, 0, t] >= 0].long()] = 60.0
    # the student's mass outside each row is ~e^-60: log(1 - Σ p) would be log(0) in float32
    x = logits.clone().requires_grad_(True)
    row = ids[:, 0]
    _, log_tail = log_softmax_gather(x, row.clamp_min(0).long(), in_row=row >= 0)
    p = torch.softmax(logits.double(), -1)
    for t in range(3):
        outside = torch.ones(23, dtype=torch.bool)
        outside[row[0, t][row[0, t] >= 0].long()] = False
        want = torch.log(p[0, t][outside].sum())
        assert float(want) < -50
        assert float(log_tail[0, t].detach()) == pytest.approx(float(want), rel=1e-5)
    log_tail.sum().backward()
    assert torch.isfinite(x.grad).all()
    student = logits.clone().requires_grad_(True)
    labels, mask = torch.tensor([[1, 2, 10]]), torch.ones(1, 3, dtype=torch.long)
    out = fusion_loss(student, labels, mask, ids, lp, torch.ones(1, 1), teacher="calibrated")
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert torch.isfinite(student.grad).all()
    assert float(out.fusion_loss) > 10  # the tail bin's ~0.3 x 60 nats are counted


@pytest.mark.parametrize("lift", [0.0, 3.0, 12.0, 40.0])
def test_log_tail_and_its_gradient_match_float64(lift: float) -> None:
    """Rows where the student's tail is large (the fast path), small and vanishing (exact path):
    value and gradient against float64 autograd, with repeated and unflagged ids."""
    g = torch.Generator().manual_seed(int(lift))
    z = torch.randn(6, 19, generator=g, dtype=torch.float64)
    index = torch.randint(0, 19, (6, 5), generator=g)
    index[:, 2] = index[:, 1]  # a repeated id
    in_row = torch.ones(6, 5, dtype=torch.bool)
    in_row[:, 0] = False  # e.g. the CLM column
    for r in range(6):
        z[r, index[r, 1:]] += lift * (r % 2)  # odd rows: the row holds nearly all the mass
    w = torch.randn(6, 5, generator=g, dtype=torch.float64)
    x = z.clone().requires_grad_(True)
    got, tail = log_softmax_gather(x, index, in_row=in_row, chunk_elements=40)
    ((got.double() * w).sum() + (tail.double() * torch.arange(6.0)).sum()).backward()
    y = z.clone().requires_grad_(True)
    lp = torch.log_softmax(y, -1)
    outside = torch.ones(6, 19, dtype=torch.bool)
    for r in range(6):
        outside[r, index[r, 1:]] = False
    want = torch.logsumexp(torch.where(outside, lp, -math.inf), -1)
    ((lp.gather(-1, index) * w).sum() + (want * torch.arange(6.0)).sum()).backward()
    torch.testing.assert_close(tail.double(), want.detach(), rtol=2e-4, atol=1e-5)
    torch.testing.assert_close(x.grad, y.grad, rtol=2e-4, atol=2e-5)


def test_calibrated_equals_renormalized_for_rows_that_hold_all_the_mass() -> None:
    """Rows whose probabilities sum to 1 have an empty tail: both targets are the same."""
    batch = random_batch(3)
    valid = (batch["teacher_ids"] >= 0) & (batch["teacher_logits"] > -math.inf)
    lse = torch.logsumexp(batch["teacher_logits"], -1, keepdim=True)
    full = torch.where(
        valid, batch["teacher_logits"] - torch.where(valid.any(-1, True), lse, 0), -math.inf
    )
    args = [batch[k] for k in ("logits", "labels", "attention_mask", "teacher_ids")]
    cal = fusion_loss(*args, full, batch["teacher_scores"], teacher="calibrated")
    ren = fusion_loss(*args, full, batch["teacher_scores"], teacher="renormalized")
    torch.testing.assert_close(cal.loss, ren.loss, rtol=1e-5, atol=1e-6)


def test_token_selection_picks_the_row_that_predicts_the_next_token() -> None:
    # one block, 3 positions, candidates ref and a; labels 5 -> 6 -> 7
    ids = torch.tensor([[[[6, 1], [7, 2], [9, 3]], [[1, 6], [2, 3], [4, 5]]]], dtype=torch.int32)
    lp = torch.log(torch.tensor([[[[0.5, 0.1], [0.2, 0.1], [0.5, 0.5]],
                                  [[0.6, 0.3], [0.5, 0.4], [0.5, 0.5]]]]))  # fmt: skip
    labels = torch.tensor([[5, 6, 7]])
    mask = torch.ones(1, 3, dtype=torch.long)
    scores = torch.tensor([[1.0, 2.0]])  # block selection: ref
    args = (torch.zeros(1, 3, 10), labels, mask, ids, lp, scores)
    block = fusion_loss(*args, teacher="calibrated")
    assert block.candidate_weights.tolist() == [[1.0, 0.0]]
    tok = fusion_loss(*args, teacher="calibrated", selection="token")
    # t=0 (next 6): ref 0.5 > a 0.3; t=1 (next 7): ref 0.2 > a's tail 0.1 / 8; t=2: no next
    # token, the block's choice (ref)
    assert tok.candidate_weights.tolist() == [[1.0, 0.0]]
    lp[0, 1, 0] = torch.log(torch.tensor([0.3, 0.6]))  # now a gives 6 more: t=0 goes to a
    tok = fusion_loss(*args[:4], lp, scores, teacher="calibrated", selection="token")
    torch.testing.assert_close(tok.candidate_weights, torch.tensor([[2 / 3, 1 / 3]]))
    matched = torch.tensor([[[True] * 3, [False, True, True]]])
    tok = fusion_loss(
        *args[:4], lp, scores, teacher="calibrated", selection="token", teacher_matched=matched
    )
    assert tok.candidate_weights.tolist() == [[1.0, 0.0]]  # a's row at t=0 is a fallback


def test_compat_rewards_tie_within_one_bfloat16_step() -> None:
    """The reference ranks candidates by 1 / exp(CE) in bfloat16: CEs that round to the same
    bfloat16 value tie, and the tie goes to ref; fusellm compares them in float32."""
    batch = sub_batch(random_batch(0), 2, 2, 7)
    scores = torch.tensor([[2.0, 1.997]])  # the source is better, by less than a bf16 step
    assert torch.equal(scores.to(torch.bfloat16)[0, 0], scores.to(torch.bfloat16)[0, 1])
    args = [batch[k] for k in ("logits", "labels", "attention_mask", "teacher_ids")]
    ours = fusion_loss(*args, batch["teacher_logits"], scores)
    ref = fusion_loss(*args, batch["teacher_logits"], scores, compat="fusellm")
    assert ours.candidate_weights.tolist() == [[0.0, 1.0]]
    assert ref.candidate_weights.tolist() == [[1.0, 0.0]]
    with pytest.raises(InputError, match="renormalized"):
        fusion_loss(*args, batch["teacher_logits"], scores, compat="fusellm", teacher="calibrated")


def test_compat_teacher_probabilities_are_rounded_to_bfloat16() -> None:
    batch = sub_batch(random_batch(1), 2, 1, 2)
    args = [batch[k] for k in ("logits", "labels", "attention_mask", "teacher_ids")]
    z = batch["teacher_logits"]
    got = fusion_loss(*args, z, batch["teacher_scores"], compat="fusellm", lm_loss_weight=0.0)
    logp = torch.log_softmax(batch["logits"].float(), -1)
    total = 0.0
    for t in range(2):
        ids, zz = batch["teacher_ids"][0, 0, t], z[0, 0, t]
        ok = (ids >= 0) & (zz > -math.inf)
        p = torch.softmax(zz[ok].to(torch.bfloat16), 0).float()
        total += float(-(p * logp[0, t, ids[ok].long()]).sum())
    assert float(got.loss) == pytest.approx(total / 2, rel=1e-6)


def test_denominators_normalise_over_a_window() -> None:
    batch = random_batch(4)
    args = [batch[k] for k in ("logits", "labels", "attention_mask")]
    teacher = [batch[k] for k in ("teacher_ids", "teacher_logits", "teacher_scores")]
    local = fusion_loss(*args, *teacher)
    n_clm = int((batch["labels"][:, 1:] != -100).sum())
    n_fuse = int(batch["attention_mask"].sum())
    doubled = fusion_loss(*args, *teacher, clm_denominator=2 * n_clm, fusion_denominator=2 * n_fuse)
    torch.testing.assert_close(doubled.loss, local.loss / 2)
    torch.testing.assert_close(doubled.clm_loss, local.clm_loss)  # reported per batch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_log_softmax_gather_matches_autograd(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 5, 37, generator=g) * 4).to(dtype)
    idx = torch.randint(0, 37, (2, 5, 6), generator=g)
    a = x.clone().requires_grad_(True)
    b = x.clone().requires_grad_(True)
    w = torch.randn(2, 5, 6, generator=g)
    ours = log_softmax_gather(a, idx, chunk_elements=80)
    theirs = torch.log_softmax(b.float(), -1).gather(-1, idx)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    (ours * w).sum().backward()
    (theirs * w).sum().backward()
    assert a.grad is not None
    assert a.grad.dtype == dtype
    torch.testing.assert_close(a.grad, b.grad)


def test_log_softmax_gather_gradcheck() -> None:
    x = torch.randn(3, 4, 11, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, 11, (3, 4, 5))

    def f(t: torch.Tensor) -> torch.Tensor:
        # float64 in, float32 inside: compare on a float64 re-implementation of the same map.
        return log_softmax_gather(t, idx, chunk_elements=30).double()

    got = f(x)
    want = torch.log_softmax(x, -1).gather(-1, idx)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class _BigAllocations(TorchDispatchMode):
    """Counts op outputs with at least ``limit`` elements."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.big: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        flat = [*args, *(kwargs or {}).values()]
        seen = {a.untyped_storage().data_ptr() for a in flat if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if not isinstance(t, torch.Tensor) or t.untyped_storage().data_ptr() in seen:
                continue  # a view of an input, no allocation
            if t.numel() >= self.limit:
                self.big.append(str(func))
        return out


@pytest.mark.parametrize("teacher", ["renormalized", "calibrated"])
def test_no_dense_teacher_and_no_stored_log_softmax(teacher: str) -> None:
    """The forward pass allocates nothing of size [B, L, V]; the backward only the gradient."""
    batch = random_batch(1, b=3, c=3, length=16, k=4, v=101)
    if teacher == "calibrated":
        batch = as_logprobs(batch, 1)
    logits = batch["logits"].clone().requires_grad_(True)
    n = logits.numel()
    with _BigAllocations(n) as fwd:
        out = fusion_loss(
            logits,
            batch["labels"],
            batch["attention_mask"],
            batch["teacher_ids"],
            batch["teacher_logits"],
            batch["teacher_scores"],
            fusion="avgce",
            distill_loss="kl",
            teacher=teacher,  # type: ignore[arg-type]
            chunk_elements=8 * 101,
        )
    assert fwd.big == []
    with _BigAllocations(n) as bwd:
        out.loss.backward()
    assert len(bwd.big) == 1, bwd.big  # the gradient of the logits itself


def test_loss_rejects_bad_arguments() -> None:
    batch = random_batch(0)
    args = [batch[k] for k in ("logits", "labels", "attention_mask")]
    teacher = [batch[k] for k in ("teacher_ids", "teacher_logits", "teacher_scores")]
    with pytest.raises(InputError, match="fusion"):
        fusion_loss(*args, *teacher, fusion="max")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="temperature"):
        fusion_loss(*args, *teacher, temperature=0.0)
    with pytest.raises(InputError, match="teacher_scores"):
        fusion_loss(*args, *teacher[:2], teacher[2][:, :2])
    with pytest.raises(InputError, match="candidate_mask"):
        fusion_loss(*args, *teacher, candidate_mask=[False, False, False])


# ------------------------------------------------------------------------------------------------
# Schema, collator, validation
# ------------------------------------------------------------------------------------------------

V = 50


def make_rows(n: int, lengths: list[int], k: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    ids = [rng.integers(0, V, (ln, k)).astype(np.int32) for ln in lengths]
    logits = [rng.normal(size=(ln, k)).astype(np.float32) for ln in lengths]
    for a, z in zip(ids, logits, strict=True):
        a[::3, k - 1] = -1
        z[::3, k - 1] = -np.inf
    return {
        "ids": ids,
        "logits": logits,
        "metric_ce": rng.uniform(1, 3, n),
        "metric_ce_per_byte": rng.uniform(0.1, 1, n),
        "num_tokens": rng.integers(3, 9, n),
    }


def make_packed(logits_dtype: str = "float16", edit: Any = None) -> Any:
    lengths = [6, 6, 4]
    rng = np.random.default_rng(0)
    cands = {"ref": make_rows(3, lengths, 3, 1), "a": make_rows(3, lengths, 5, 2)}
    if edit is not None:
        edit(cands)
    return build_packed_dataset(
        [rng.integers(0, V, ln) for ln in lengths],
        cands,
        num_bytes=[20, 30, 10],
        logits_dtype=logits_dtype,
    )


@pytest.fixture
def packed() -> Any:
    return make_packed()


def test_collator_pads_blocks_and_candidates(packed: Any) -> None:
    col = FusionCollator(["a"], score="ce")
    feats = list(packed.with_format("numpy"))
    batch = col(feats)
    assert col.stack == ("ref", "a")
    assert batch["input_ids"].shape == (3, 6)
    assert batch["teacher_ids"].shape == (3, 2, 6, 5)
    assert batch["teacher_ids"].dtype == torch.int32
    assert batch["teacher_logits"].dtype == torch.float32
    assert batch["attention_mask"][2].tolist() == [1, 1, 1, 1, 0, 0]
    assert batch["labels"][2, 4:].tolist() == [-100, -100]
    # ref has K = 3: columns 3 and 4 are padding
    assert (batch["teacher_ids"][:, 0, :, 3:] == -1).all()
    assert torch.isneginf(batch["teacher_logits"][:, 0, :, 3:]).all()
    assert (batch["teacher_ids"][2, :, 4:] == -1).all()
    want = np.stack([packed["ref_metric_ce"], packed["a_metric_ce"]], 1)
    np.testing.assert_allclose(batch["teacher_scores"].numpy(), want)
    # Plain lists (no numpy format) give the same batch.
    again = col([packed[i] for i in range(3)])
    for key in batch:
        torch.testing.assert_close(again[key], batch[key])


def test_collator_scores_per_byte(packed: Any) -> None:
    feats = list(packed.with_format("numpy"))
    direct = FusionCollator(["a"], score="ce_per_byte")(feats)
    want = np.stack([packed["ref_metric_ce_per_byte"], packed["a_metric_ce_per_byte"]], 1)
    np.testing.assert_allclose(direct["teacher_scores"].numpy(), want)
    # Derived from num_bytes and num_tokens when the per-byte column is absent.
    stripped = packed.remove_columns(["ref_metric_ce_per_byte", "a_metric_ce_per_byte"])
    feats = list(stripped.with_format("numpy"))
    derived = FusionCollator(["a"], score="ce_per_byte")(feats)
    nb = np.asarray(packed["num_bytes"], np.float64)
    for j, c in enumerate(["ref", "a"]):
        ce = np.asarray(packed[f"{c}_metric_ce"], np.float64)
        nt = np.asarray(packed[f"{c}_num_tokens"], np.float64)
        np.testing.assert_allclose(derived["teacher_scores"][:, j].numpy(), ce * nt / nb, rtol=1e-6)
    # ref defaults to the block's own token count.
    no_nt = stripped.remove_columns(["ref_num_tokens"])
    got = FusionCollator(["a"], score="ce_per_byte")(list(no_nt.with_format("numpy")))
    ce = np.asarray(packed["ref_metric_ce"], np.float64)
    np.testing.assert_allclose(
        got["teacher_scores"][:, 0].numpy(), ce * np.array([6, 6, 4]) / nb, rtol=1e-6
    )


def test_collator_errors(packed: Any) -> None:
    feats = list(packed.with_format("numpy"))
    with pytest.raises(InputError, match="'b_ids'"):
        FusionCollator(["a", "b"], score="ce")(feats)
    with pytest.raises(InputError, match="vocabulary"):
        FusionCollator(["a"], score="ce", vocab_size=10)(feats)
    with pytest.raises(InputError, match="no fusion candidate"):
        FusionCollator([], with_ref=False)
    with pytest.raises(InputTypeError):
        FusionCollator([3])  # type: ignore[list-item]
    bad = [dict(f) for f in feats]
    bad[0]["a_metric_ce"] = np.float32("nan")
    with pytest.raises(InputError, match="NaN"):
        FusionCollator(["a"], score="ce")(bad)


def test_detect_candidates() -> None:
    cols = ["input_ids", "position_ids", "b_ids", "b_logits", "ref_logits", "ref_ids", "a_logits"]
    assert detect_candidates(cols) == ["ref", "a", "b"]


def test_validate_packed_accepts_good_data(packed: Any) -> None:
    stack = validate_packed(packed, sources=["a"], with_ref=True, score="ce", vocab_size=V)
    assert stack == ["ref", "a"]
    # ref is stacked to fill empty rows even when it is not a candidate.
    assert validate_packed(packed, sources=["a"], with_ref=False, score="ce", vocab_size=V) == [
        "ref",
        "a",
    ]
    # a filtered view (indices mapping) is validated through the view
    validate_packed(packed.select([2, 0]), sources=["a"], with_ref=True, score="ce", vocab_size=V)


@pytest.mark.parametrize(
    ("mutate", "kwargs", "match"),
    [
        (lambda d: d, {"sources": ["a", "b"]}, "absent from the data: \\['b'\\]"),
        (lambda d: d, {"sources": []}, "not configured .*\\['a'\\]"),
        (lambda d: d.remove_columns(["ref_ids", "ref_logits"]), {}, "absent from the data"),
        (lambda d: d, {"vocab_size": 20}, "vocabulary"),
        (lambda d: d.remove_columns(["a_metric_ce"]), {}, "a_metric_ce"),
        (
            lambda d: d.remove_columns(["a_metric_ce_per_byte", "a_num_tokens"]),
            {"score": "ce_per_byte"},
            "ce_per_byte",
        ),
    ],
)
def test_validate_packed_rejects_mismatches(
    packed: Any, mutate: Any, kwargs: dict[str, Any], match: str
) -> None:
    args: dict[str, Any] = {"sources": ["a"], "with_ref": True, "score": "ce", "vocab_size": V}
    args.update(kwargs)
    with pytest.raises(InputError, match=match):
        validate_packed(mutate(packed), **args)


def _replace_column(ds: Any, name: str, values: list[Any]) -> Any:
    feature = ds.features[name]
    return ds.remove_columns([name]).add_column(name, values, feature=feature)


def test_validate_packed_rejects_nan_scores_and_logits(packed: Any) -> None:
    args: dict[str, Any] = {"sources": ["a"], "with_ref": True, "vocab_size": V}
    ce = list(packed["a_metric_ce"])
    ce[1] = float("nan")
    bad = _replace_column(packed, "a_metric_ce", ce)
    with pytest.raises(InputError, match=r"'a'.*NaN.*blocks 1"):
        validate_packed(bad, score="ce", **args)
    validate_packed(bad, score="ce_per_byte", **args)  # the per-token CE is not used

    def nan_logit(c: dict[str, Any]) -> None:
        c["ref"]["logits"][2][1, 0] = np.nan

    for dtype in ("float16", "float32"):
        with pytest.raises(InputError, match=r"ref_logits.*NaN"):
            validate_packed(make_packed(dtype, nan_logit), score="ce", **args)
    nb = list(packed["num_bytes"])
    nb[0] = 0
    bad = _replace_column(packed.remove_columns(["a_metric_ce_per_byte"]), "num_bytes", nb)
    with pytest.raises(InputError, match="NaN or infinite"):
        validate_packed(bad, score="ce_per_byte", **args)


def test_validate_packed_rejects_bad_shapes(packed: Any) -> None:
    ids = [np.asarray(x) for x in packed["a_ids"]]
    ids[1] = ids[1][:-1]
    with pytest.raises(InputError, match="must be"):
        build_packed_dataset(
            packed["input_ids"],
            {"a": {"ids": ids, "logits": packed["a_logits"], "metric_ce": [1, 1, 1]}},
        )
    # The packing stage may write plain nested lists: ragged K and short rows are caught.
    import datasets

    def plain(ref_ids: list[Any], ref_logits: list[Any]) -> Any:
        return datasets.Dataset.from_dict(
            {
                "input_ids": [[1, 2], [3, 4]],
                "ref_ids": ref_ids,
                "ref_logits": ref_logits,
                "ref_metric_ce": [1.0, 2.0],
            }
        )

    args: dict[str, Any] = {"sources": [], "with_ref": True, "score": "ce", "vocab_size": V}
    ragged = plain(
        [[[1, 2], [3, 4]], [[1, 2], [3]]], [[[0.0, 1.0], [0.0, 1.0]], [[0.0, 1.0], [0.0]]]
    )
    with pytest.raises(InputError, match="widths K"):
        validate_packed(ragged, **args)
    short = plain([[[1, 2], [3, 4]], [[1, 2]]], [[[0.0, 1.0], [0.0, 1.0]], [[0.0, 1.0]]])
    with pytest.raises(InputError, match=r"ref_ids: row count differs.*blocks 1"):
        validate_packed(short, **args)
    ok = plain([[[1, 2], [3, -1]]] * 2, [[[0.0, 1.0], [0.0, -math.inf]]] * 2)
    assert validate_packed(ok, **args) == ["ref"]
    batch = FusionCollator([], score="ce")(list(ok.with_format("numpy")))
    assert batch["teacher_ids"].shape == (2, 1, 2, 2)
    assert batch["teacher_ids"][0, 0, 1].tolist() == [3, -1]
