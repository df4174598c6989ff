"""Alignment speed (issue: foundation and the alignment core).

- MinED (compat="fusellm") per 2048-token pair against the pure-Python oracle of spec section 4,
  with identical output;
- offset alignment in base tokens per second per thread, top-K re-expression included, against a
  straightforward Python two-pointer;
- a 64-pair batch on 2 threads against 1 thread.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

import fusellm
import oracle
from corpus import encode, pieces, realistic_topk, report
from fusellm.bundled import load_tokenizer

BASE, BLEND = "mistral", "qwen"


@pytest.fixture(scope="module")
def setup() -> dict:
    base_tok, blend_tok = load_tokenizer(BASE), load_tokenizer(BLEND)
    bv, xv = fusellm.tokenizer_vocab(base_tok), fusellm.tokenizer_vocab(blend_tok)
    texts = pieces(BASE, 64)
    b_ids, b_off = encode(BASE, texts)
    x_ids, x_off = encode(BLEND, texts)
    t_ids, t_logits = realistic_topk(x_ids)
    return {
        "base_vocab": bv,
        "blend_vocab": xv,
        "b_ids": b_ids,
        "b_off": b_off,
        "x_ids": x_ids,
        "x_off": x_off,
        "t_ids": t_ids,
        "t_logits": t_logits,
        "compat": fusellm.Aligner(bv, xv, base_marker="▁", blend_marker="Ġ", compat="fusellm"),
        "default": fusellm.Aligner(bv, xv, base_marker="▁", blend_marker="Ġ"),
    }


def test_mined_compat_vs_python_oracle(benchmark, setup) -> None:
    s = setup
    al = s["compat"]
    n_pairs = 8
    args = [s[k][:n_pairs] for k in ("b_ids", "x_ids", "t_ids", "t_logits")]
    out = benchmark(al.align_batch, *args, method="mined", num_threads=1)
    # The median: this machine is a VM with noisy neighbours, and single slow rounds skew a mean.
    per_pair = benchmark.stats.stats.median / n_pairs
    # The oracle takes seconds per pair, and this VM's speed drifts over seconds: each oracle run
    # is bracketed by Rust runs of the same pair (best of 10 before and after), and the speedup is
    # the median over pairs of oracle time / mean of the two brackets. Outputs agree bit for bit.
    bv, xv = s["base_vocab"], s["blend_vocab"]

    def rust_best(i: int) -> float:
        one = [a[i : i + 1] for a in args]
        times = []
        for _ in range(10):
            t0 = time.perf_counter()
            al.align_batch(*one, method="mined", num_threads=1)
            times.append(time.perf_counter() - t0)
        return min(times)

    ratios, oracle_times = [], []
    for i in range(3):
        bt = [bv[t] for t in s["b_ids"][i]]
        xt = [xv[t] for t in s["x_ids"][i]]
        before = rust_best(i)
        t0 = time.perf_counter()
        want = oracle.mined_base_to_blend(bt, xt, "▁", "Ġ")
        oracle_times.append(time.perf_counter() - t0)
        after = rust_best(i)
        ratios.append(oracle_times[-1] / ((before + after) / 2))
        got = fusellm.mined_base_to_blend(bt, xt, base_marker="▁", blend_marker="Ġ")
        assert got == want
    oracle_per_pair = float(np.mean(oracle_times))
    ratio = float(np.median(ratios))
    lengths = [(len(b), len(x)) for b, x in zip(args[0], args[1], strict=True)]
    benchmark.extra_info.update(
        rust_ms_per_pair=per_pair * 1e3,
        oracle_s_per_pair=oracle_per_pair,
        ratio=ratio,
        ratios=ratios,
    )
    report(
        "mined compat, 1 thread",
        pairs=lengths,
        rust_ms_per_pair=f"{per_pair * 1e3:.2f}",
        oracle_s_per_pair=f"{oracle_per_pair:.2f}",
        speedup_per_pair="/".join(f"{r:.0f}x" for r in ratios),
        speedup_median=f"{ratio:.0f}x",
    )
    assert len(out) == n_pairs


def _python_offsets_baseline(b_off: list[np.ndarray], x_off: list[np.ndarray]) -> list[list[int]]:
    out = []
    for bo, xo in zip(b_off, x_off, strict=True):
        be, xe = bo[:, 1].tolist(), xo[:, 1].tolist()
        last = {e: j for j, e in enumerate(xe)}
        row = []
        for i, e in enumerate(be):
            is_last = i + 1 == len(be) or be[i + 1] != e
            row.append(last.get(e, -1) if is_last else -1)
        out.append(row)
    return out


def test_offsets_tokens_per_second(benchmark, setup) -> None:
    s = setup
    al = s["default"]
    tokens = sum(len(b) for b in s["b_ids"])
    benchmark(
        al.align_batch,
        s["b_ids"],
        s["x_ids"],
        s["t_ids"],
        s["t_logits"],
        method="offsets",
        base_offsets=s["b_off"],
        blend_offsets=s["x_off"],
        num_threads=1,
    )
    rate = tokens / benchmark.stats.stats.median
    best_rate = tokens / benchmark.stats.stats.min
    t0 = time.perf_counter()
    _python_offsets_baseline(s["b_off"], s["x_off"])
    base_rate = tokens / (time.perf_counter() - t0)
    benchmark.extra_info.update(
        tokens_per_s=rate, best_tokens_per_s=best_rate, python_pairing_tokens_per_s=base_rate
    )
    report(
        "offsets, 1 thread, top-K included",
        pairs=len(s["b_ids"]),
        base_tokens=tokens,
        mtokens_per_s_median=f"{rate / 1e6:.1f}",
        mtokens_per_s_best=f"{best_rate / 1e6:.1f}",
        python_pairing_only_mtokens_per_s=f"{base_rate / 1e6:.2f}",
        ratio=f"{rate / base_rate:.0f}x",
    )


def test_batch_two_threads_vs_one(benchmark, setup) -> None:
    s = setup
    al = s["compat"]
    args = [s[k] for k in ("b_ids", "x_ids", "t_ids", "t_logits")]
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    best: dict[str, float] = {}

    def timed(key: str, threads: int) -> None:
        t0 = time.perf_counter()
        al.align_batch(*args, num_threads=threads)
        best[key] = min(best.get(key, float("inf")), time.perf_counter() - t0)

    # Warm up, which also starts the 2-thread pool while this thread may run on every CPU (pool
    # threads inherit the affinity of the thread that starts them).
    for threads in (1, 2):
        al.align_batch(*args, num_threads=threads)
    # Interleaved rounds, best of each: the machine's speed drifts (shared VM), and measuring all
    # one-thread rounds before all two-thread rounds would fold that drift into the ratio. On
    # this VM the two vCPUs also run at different speeds at times (a busy neighbour on one
    # physical core), so the one-thread time is also taken pinned to each of the first two CPUs:
    # the "per-core" speedup compares 2 threads with one thread at the two cores' mean speed.
    pinned = cpus[:2] if len(cpus) >= 2 else []
    for _ in range(12):
        for cpu in pinned:
            os.sched_setaffinity(0, {cpu})
            try:
                timed(f"cpu{cpu}", 1)
            finally:
                os.sched_setaffinity(0, cpus)
        timed("one", 1)
        timed("two", 2)
    benchmark.pedantic(al.align_batch, args=tuple(args), kwargs={"num_threads": 2}, rounds=1)
    speedup = best["one"] / best["two"]
    info = {"one_thread_s": best["one"], "two_threads_s": best["two"], "speedup": speedup}
    if pinned:
        # One thread at the two cores' mean speed: the harmonic mean of their times.
        mean_one = len(pinned) / sum(1 / best[f"cpu{c}"] for c in pinned)
        info["per_core_one_thread_s"] = {c: best[f"cpu{c}"] for c in pinned}
        info["per_core_speedup"] = mean_one / best["two"]
    benchmark.extra_info.update(info)
    report(
        "mined compat, 64 pairs",
        one_thread_s=f"{best['one']:.3f}",
        two_threads_s=f"{best['two']:.3f}",
        speedup=f"{speedup:.2f}x",
        **(
            {
                "one_thread_pinned_s": "/".join(f"{best[f'cpu{c}']:.3f}" for c in pinned),
                "per_core_speedup": f"{info['per_core_speedup']:.2f}x",
            }
            if pinned
            else {}
        ),
    )
