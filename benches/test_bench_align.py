"""Alignment speed (issue: foundation and the alignment core).

- MinED (compat="fusellm") per 2048-token pair against the pure-Python oracle of spec section 4,
  with identical output;
- offset alignment in base tokens per second per thread, top-K re-expression included, against a
  straightforward Python two-pointer;
- a 64-pair batch on 2 threads against 1 thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

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


def _concurrently(run: Callable[[], float], copies: int) -> list[float]:
    """Runs `copies` calls of `run` at once, on Python threads; returns their results."""
    results: list[float] = []
    threads = [threading.Thread(target=lambda: results.append(run())) for _ in range(copies)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_batch_two_threads_vs_one(benchmark, setup) -> None:
    s = setup
    al = s["compat"]
    args = [s[k] for k in ("b_ids", "x_ids", "t_ids", "t_logits")]
    best: dict[str, float] = {}

    def one_thread() -> float:
        t0 = time.perf_counter()
        al.align_batch(*args, num_threads=1)
        return time.perf_counter() - t0

    def keep(key: str, seconds: float) -> None:
        best[key] = min(best.get(key, float("inf")), seconds)

    for threads in (1, 2):
        al.align_batch(*args, num_threads=threads)  # warm the pool
    # Interleaved rounds, best of each: the machine's speed drifts (shared VM), and measuring all
    # one-thread rounds before all two-thread rounds would fold that drift into the ratio.
    # "loaded": two independent one-thread runs at once (align_batch releases the GIL), the
    # slower one. It takes as long as one thread alone on a machine whose two cores run at full
    # speed together; on this VM it often takes longer (1.3x to 1.6x measured), and then no
    # implementation can reach 2x. Against it, the 2-thread ratio shows what our scheduling
    # gains or loses.
    for _ in range(8):
        keep("one", one_thread())
        keep("loaded", max(_concurrently(one_thread, 2)))
        t0 = time.perf_counter()
        al.align_batch(*args, num_threads=2)
        keep("two", time.perf_counter() - t0)
    benchmark.pedantic(al.align_batch, args=tuple(args), kwargs={"num_threads": 2}, rounds=1)
    speedup = best["one"] / best["two"]
    benchmark.extra_info.update(
        one_thread_s=best["one"],
        two_threads_s=best["two"],
        two_loaded_one_thread_runs_s=best["loaded"],
        speedup=speedup,
        speedup_vs_loaded=best["loaded"] / best["two"],
    )
    report(
        "mined compat, 64 pairs",
        one_thread_s=f"{best['one']:.3f}",
        two_threads_s=f"{best['two']:.3f}",
        speedup=f"{speedup:.2f}x",
        one_thread_with_both_cores_busy_s=f"{best['loaded']:.3f}",
        speedup_vs_loaded=f"{best['loaded'] / best['two']:.2f}x",
    )
