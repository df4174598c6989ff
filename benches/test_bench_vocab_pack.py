"""Vocabulary mapping and packing speed (issue: vocabulary mapping and sequence packing).

- the full MinED map of Qwen (151k tokens) onto Mistral v1 (32k), against the brute-force
  definition measured in the same process on a random sample of 2,000 blend tokens (compiled,
  bit-parallel Levenshtein: the strongest brute force) and on a handful of tokens in pure Python;
  the sample must agree exactly, and the full brute force is extrapolated from it;
- reference packing (concat) of int32 columns in tokens per second on one thread, against the
  numpy formulation and the reference pipeline's pure-Python ``group_texts``;
- best-fit-decreasing packing of the same rows.

Run: ``python -m pytest benches/test_bench_vocab_pack.py --benchmark-only -s``.
"""

from __future__ import annotations

import itertools
import os
import resource
import time

import numpy as np
import pytest

import fusellm
import oracle
from corpus import report
from fusellm import VocabMap, _native
from fusellm.bundled import load_tokenizer


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


@pytest.fixture(scope="module")
def vocabs() -> tuple[list[str | None], list[str | None]]:
    base = fusellm.tokenizer_vocab(load_tokenizer("mistral"))
    blend = fusellm.tokenizer_vocab(load_tokenizer("qwen"))
    return base, blend


def test_mined_map_qwen_onto_mistral(benchmark, vocabs) -> None:
    base, blend = vocabs
    cpu0 = _cpu()
    vm = benchmark.pedantic(
        VocabMap.build,
        args=(base, blend),
        kwargs={"base_marker": "▁", "blend_marker": "Ġ", "method": "mined"},
        rounds=3,
        iterations=1,
    )
    cpu_per_map = (_cpu() - cpu0) / 3
    wall = benchmark.stats.stats.min

    # The brute-force definition on 2,000 random blend tokens, compiled (same process).
    rng = np.random.default_rng(0)
    sample = rng.choice(len(blend), size=2000, replace=False)
    keys = [blend[i].replace("Ġ", "▁") for i in sample]  # type: ignore[union-attr]
    t0 = time.perf_counter()
    ids, dist = _native.nearest_brute_force(base, keys, None)
    brute_sample = time.perf_counter() - t0
    assert vm.base_ids[sample].tolist() == ids.tolist()
    assert vm.distances[sample].tolist() == dist.tolist()
    brute_full = brute_sample * len(blend) / len(sample)

    # ... and in pure Python (the oracle's Levenshtein), on 3 tokens.
    t0 = time.perf_counter()
    for t in keys[:3]:
        min(oracle.levenshtein(t, y) for y in base if y is not None)
    python_full = (time.perf_counter() - t0) / 3 * len(blend)

    s = vm.stats()
    benchmark.extra_info.update(
        wall_s=wall,
        cpu_s=cpu_per_map,
        brute_sample_s=brute_sample,
        brute_full_est_s=brute_full,
        python_full_est_s=python_full,
        ratio_vs_brute=brute_full / wall,
        ratio_vs_python=python_full / wall,
    )
    report(
        "MinED map qwen -> mistral",
        threads=os.environ.get("FUSELLM_NUM_THREADS", os.cpu_count()),
        wall_s=f"{wall:.2f}",
        cpu_s_per_map=f"{cpu_per_map:.2f}",
        exact=s["exact"],
        mined=s["mined"],
        brute_2000_s=f"{brute_sample:.2f}",
        brute_full_est_s=f"{brute_full:.0f}",
        speedup_vs_brute=f"{brute_full / wall:.0f}x",
        python_full_est_h=f"{python_full / 3600:.1f}",
        speedup_vs_python=f"{python_full / wall:.0f}x",
    )


def test_surface_map_qwen_onto_mistral(benchmark, vocabs) -> None:
    base, blend = vocabs
    vm = benchmark.pedantic(
        VocabMap.build,
        args=(base, blend),
        kwargs={"base_marker": "▁", "blend_marker": "Ġ", "method": "surface"},
        rounds=1,
        iterations=1,
    )
    s = vm.stats()
    report(
        "surface map qwen -> mistral",
        wall_s=f"{benchmark.stats.stats.min:.2f}",
        exact=s["exact"],
        surface=s["surface"],
        mined=s["mined"],
    )


# --- packing -----------------------------------------------------------------------------------

N_TOKENS = 20_000_000


@pytest.fixture(scope="module")
def rows() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    lengths = rng.integers(50, 2000, size=N_TOKENS // 500)
    k = int(np.searchsorted(np.cumsum(lengths), N_TOKENS))
    lengths = lengths[: k + 1]
    lengths[-1] -= lengths.sum() - N_TOKENS
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return {
        "offsets": offsets,
        "input_ids": rng.integers(0, 32000, size=N_TOKENS, dtype=np.int32),
        "labels": rng.integers(0, 32000, size=N_TOKENS, dtype=np.int32),
        "ce": rng.random(len(lengths)),
    }


def numpy_concat(ids: np.ndarray, labels: np.ndarray, offsets: np.ndarray, ce, block: int):
    """The reference packing in numpy: copy the columns, cut, token-weighted score means."""
    n = int(offsets[-1])
    out_ids, out_labels = ids.copy(), labels.copy()
    bounds = np.arange(0, n, block)
    row_of = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    means = np.add.reduceat(ce[row_of], bounds) / np.diff(np.append(bounds, n))
    return out_ids, out_labels, means


def python_group_texts(examples: dict[str, list], block: int) -> dict[str, list]:
    """The reference pipeline's pure-Python packing (HF ``group_texts`` style)."""
    concatenated = {k: list(itertools.chain(*examples[k])) for k in ("input_ids", "labels")}
    total = len(concatenated["input_ids"])
    out = {k: [v[i : i + block] for i in range(0, total, block)] for k, v in concatenated.items()}
    weights = [(ce, len(r)) for ce, r in zip(examples["ce"], examples["input_ids"], strict=True)]
    flat_ce = [ce for ce, n in weights for _ in range(n)]
    out["ce"] = [
        sum(flat_ce[i : i + block]) / len(flat_ce[i : i + block]) for i in range(0, total, block)
    ]
    return out


def test_pack_concat_int32(benchmark, rows) -> None:
    r, block = rows, 2048
    cols = {"input_ids": r["input_ids"], "labels": r["labels"]}
    out = benchmark.pedantic(
        fusellm.pack,
        args=(cols, r["offsets"]),
        kwargs={"block_size": block, "scores": {"metric_ce": r["ce"]}},
        rounds=5,
        iterations=1,
    )
    rust_s = benchmark.stats.stats.min
    np.testing.assert_array_equal(out.columns["input_ids"], r["input_ids"])

    t0 = time.perf_counter()
    np_ids, _, np_means = numpy_concat(r["input_ids"], r["labels"], r["offsets"], r["ce"], block)
    numpy_s = time.perf_counter() - t0
    np.testing.assert_array_equal(np_ids, out.columns["input_ids"])
    np.testing.assert_allclose(np_means, out.scores["metric_ce"], rtol=1e-9)

    # Pure Python on 1/20 of the rows, scaled.
    k = len(r["ce"]) // 20
    bounds = r["offsets"][: k + 1]
    sub: dict[str, list] = {
        name: [r[name][a:b].tolist() for a, b in itertools.pairwise(bounds)]
        for name in ("input_ids", "labels")
    }
    sub["ce"] = r["ce"][:k].tolist()
    sub_tokens = int(r["offsets"][k])
    t0 = time.perf_counter()
    python_group_texts(sub, block)
    python_s = (time.perf_counter() - t0) * N_TOKENS / sub_tokens

    rate = N_TOKENS / rust_s
    benchmark.extra_info.update(
        tokens_per_s=rate, numpy_tokens_per_s=N_TOKENS / numpy_s, ratio_vs_numpy=numpy_s / rust_s
    )
    report(
        "pack concat, int32 x2 + 1 score, 1 thread",
        tokens=N_TOKENS,
        blocks=out.num_blocks,
        rust_Mtok_s=f"{rate / 1e6:.0f}",
        numpy_Mtok_s=f"{N_TOKENS / numpy_s / 1e6:.0f}",
        python_Mtok_s=f"{N_TOKENS / python_s / 1e6:.2f}",
        speedup_vs_numpy=f"{numpy_s / rust_s:.1f}x",
        speedup_vs_python=f"{python_s / rust_s:.0f}x",
    )


def test_pack_bfd_int32(benchmark, rows) -> None:
    r = rows
    cols = {"input_ids": r["input_ids"], "labels": r["labels"]}
    out = benchmark.pedantic(
        fusellm.pack,
        args=(cols, r["offsets"]),
        kwargs={"block_size": 2048, "scores": {"metric_ce": r["ce"]}, "mode": "bfd"},
        rounds=3,
        iterations=1,
    )
    s = benchmark.stats.stats.min
    fill = N_TOKENS / (out.num_blocks * 2048)
    report(
        "pack bfd, int32 x2 + 1 score, 1 thread",
        tokens=N_TOKENS,
        rows=len(r["ce"]),
        blocks=out.num_blocks,
        fill=f"{fill:.3f}",
        Mtok_s=f"{N_TOKENS / s / 1e6:.0f}",
    )
