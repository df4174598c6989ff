"""Resource bounds: thread counts and thread pools, sizes that would drive allocations."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import fusellm
from fusellm.checks import MAX_THREADS

SPM, BBPE = "▁", "Ġ"
TASKS = Path("/proc/self/task")


def live_threads() -> int:
    return len(os.listdir(TASKS))


def small_batch() -> list[list[np.ndarray]]:
    seqs = 8
    return [
        [np.array([0, 1], np.int32)] * seqs,
        [np.array([0, 1], np.int32)] * seqs,
        [np.array([[0, 1], [1, 2]], np.int32)] * seqs,
        [np.array([[1.0, 0.0], [1.0, 0.0]], np.float32)] * seqs,
    ]


@pytest.mark.skipif(not TASKS.is_dir(), reason="counts threads through /proc/self/task")
def test_pools_of_many_thread_counts_do_not_accumulate() -> None:
    aligner = fusellm.Aligner(
        ["▁a", "b", "▁c"], ["Ġa", "b", "Ġc"], base_marker=SPM, blend_marker=BBPE
    )
    batch = small_batch()
    before = live_threads()
    counts = range(2, 40)
    for n in counts:
        aligner.align_batch(*batch, num_threads=n)
    # At most the four most recently used pools survive (36 + 37 + 38 + 39 threads); without the
    # bound every count kept its pool (sum(2..39) = 779 threads). Dropped pools' threads exit
    # asynchronously: wait for them a little.
    bound = before + sum(sorted(counts)[-4:])
    deadline = time.monotonic() + 10
    while live_threads() > bound and time.monotonic() < deadline:
        time.sleep(0.05)
    assert live_threads() <= bound, (live_threads(), bound)


def test_thread_counts_are_capped_with_a_clear_error() -> None:
    aligner = fusellm.Aligner(["▁a", "b"], ["Ġa", "b"], base_marker=SPM, blend_marker=BBPE)
    for bad in (0, -1, MAX_THREADS + 1, 100_000, True, 2.0):
        with pytest.raises(fusellm.InputError, match="num_threads"):
            aligner.align_batch(*small_batch(), num_threads=bad)
        with pytest.raises(fusellm.InputError, match="num_threads"):
            fusellm.VocabMap.build(
                ["▁a"], ["Ġa"], base_marker=SPM, blend_marker=BBPE, num_threads=bad
            )


@pytest.mark.skipif(not TASKS.is_dir(), reason="counts threads through /proc/self/task")
def test_environment_thread_count_is_clamped() -> None:
    """FUSELLM_NUM_THREADS=100000 runs on at most MAX_THREADS threads, and finishes."""
    code = (
        "import os, numpy as np, fusellm\n"
        "a = fusellm.Aligner(['▁a', 'b'], ['Ġa', 'b'], base_marker='▁', blend_marker='Ġ')\n"
        "x = [np.array([0, 1], np.int32)] * 64\n"
        "k = [np.array([[0, 1], [1, 0]], np.int32)] * 64\n"
        "z = [np.array([[1.0, 0.0], [1.0, 0.0]], np.float32)] * 64\n"
        "a.align_batch(x, x, k, z)\n"
        "print(len(os.listdir('/proc/self/task')))\n"
    )
    env = {**os.environ, "FUSELLM_NUM_THREADS": "100000"}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.strip()) <= MAX_THREADS + 16
