"""Fork safety: a child forked after the parent's rayon pools started must not deadlock.

The classic hang: ``datasets.map(num_proc>1)`` or DataLoader workers fork a process whose rayon
pool threads do not exist in the child. fusellm rebuilds its pools when the process id changes.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import signal
import sys
import time
import warnings
from collections.abc import Iterator

import numpy as np
import pytest

import fusellm

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

SPM, BBPE = "▁", "Ġ"
WAIT_S = 60.0


def _batch(n_seq: int = 8, length: int = 40, k: int = 4) -> tuple[fusellm.Aligner, dict]:
    rng = np.random.default_rng(5)
    words = ["the", "cat", "sat", "on", "a", "mat", "dog", "s", "at", "ma", "t"]
    base_vocab = [SPM + w for w in words] + words
    blend_vocab = [BBPE + w for w in words] + words + [None]
    aligner = fusellm.Aligner(base_vocab, blend_vocab, base_marker=SPM, blend_marker=BBPE)
    batch = {
        "base_ids": [rng.integers(0, len(base_vocab), length) for _ in range(n_seq)],
        "blend_ids": [rng.integers(0, len(blend_vocab) - 1, length) for _ in range(n_seq)],
        "blend_topk_ids": [
            rng.integers(0, len(blend_vocab) + 2, (length, k)) for _ in range(n_seq)
        ],
        "blend_topk_logits": [rng.normal(size=(length, k)) for _ in range(n_seq)],
    }
    return aligner, batch


def _checksum(rows: list[fusellm.AlignedRow]) -> str:
    h = hashlib.sha256()
    for r in rows:
        for a in (r.ids, r.logits, r.status):
            h.update(np.ascontiguousarray(a).tobytes())
        h.update(f"{r.num_unknown},{r.num_unmapped};".encode())
    return h.hexdigest()


def _align(aligner: fusellm.Aligner, batch: dict, num_threads: int | None) -> str:
    return _checksum(
        aligner.align_batch(
            batch["base_ids"],
            batch["blend_ids"],
            batch["blend_topk_ids"],
            batch["blend_topk_logits"],
            num_threads=num_threads,
        )
    )


@contextlib.contextmanager
def _fork_allowed() -> Iterator[None]:
    """Python 3.12+ warns (DeprecationWarning) when a multi-threaded process forks; that is the
    very situation under test."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message=r".*use of fork\(\) may lead to deadlocks",
            category=DeprecationWarning,
        )
        yield


def _wait(pid: int, timeout: float) -> int | None:
    """Exit status of the child, or None if it is still running after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return status
        time.sleep(0.02)
    return None


def test_forked_child_aligns_with_fresh_pools() -> None:
    aligner, batch = _batch()
    want = _align(aligner, batch, 2)
    assert _align(aligner, batch, 3) == want  # a second pool in the parent
    assert _align(aligner, batch, None) == want
    read_fd, write_fd = os.pipe()
    with _fork_allowed():
        pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            os.close(read_fd)
            sums = [_align(aligner, batch, t) for t in (2, None, 3, 2, 1)]
            os.write(write_fd, (",".join(sums) + "\n").encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    try:
        status = _wait(pid, WAIT_S)
        if status is None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"the forked child hung in align_batch for {WAIT_S:.0f} s (deadlock)")
        with os.fdopen(read_fd, "rb") as f:
            out = f.read().decode()
    finally:
        with contextlib.suppress(OSError):
            os.close(read_fd)
    assert os.WIFEXITED(status), f"child status {status}"
    assert os.WEXITSTATUS(status) == 0, f"child status {status}"
    assert out.strip().split(",") == [want] * 5
    # the parent's pools still work after the fork
    assert _align(aligner, batch, 2) == want


def test_nested_fork() -> None:
    """A grandchild of a process whose pools were rebuilt after a fork works too."""
    aligner, batch = _batch(n_seq=4, length=20)
    want = _align(aligner, batch, 2)
    read_fd, write_fd = os.pipe()
    with _fork_allowed():
        pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read_fd)
            first = _align(aligner, batch, 2)
            with _fork_allowed():
                grandchild = os.fork()
            if grandchild == 0:
                code = 3
                try:
                    os.write(write_fd, (_align(aligner, batch, 2) + "\n").encode())
                    code = 0
                finally:
                    os._exit(code)
            status = _wait(grandchild, WAIT_S)
            if status is None:
                os.kill(grandchild, signal.SIGKILL)
                code = 2
            elif first == want and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
                code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    status = _wait(pid, 2 * WAIT_S)
    if status is None:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read_fd)
        pytest.fail("the forked child or grandchild hung in align_batch (deadlock)")
    with os.fdopen(read_fd, "rb") as f:
        out = f.read().decode()
    assert os.WIFEXITED(status), f"child status {status}"
    assert os.WEXITSTATUS(status) == 0, f"child status {status}"
    assert out.strip() == want


# --- multiprocessing with the "fork" start method ----------------------------------------------

_POOL_STATE: tuple[fusellm.Aligner, dict] | None = None


def _pool_task(num_threads: int | None) -> str:
    assert _POOL_STATE is not None
    return _align(*_POOL_STATE, num_threads)


@pytest.mark.skipif(sys.platform == "win32", reason="no fork start method")
def test_multiprocessing_fork_pool() -> None:
    global _POOL_STATE
    aligner, batch = _batch()
    _POOL_STATE = (aligner, batch)
    want = _align(aligner, batch, 2)  # the parent's pool exists before the workers fork
    ctx = multiprocessing.get_context("fork")
    try:
        with _fork_allowed():
            pool = ctx.Pool(2)
        try:
            result = pool.map_async(_pool_task, [2, None, 1, 3, 2, 2])
            sums = result.get(timeout=WAIT_S)
        except multiprocessing.TimeoutError:
            pytest.fail(f"fork-pool workers hung in align_batch for {WAIT_S:.0f} s (deadlock)")
        finally:
            pool.terminate()
            pool.join()
    finally:
        _POOL_STATE = None
    assert sums == [want] * 6
