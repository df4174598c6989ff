"""A sharded stage's workers as Ray tasks (the ``fusellm[ray]`` extra).

A stage that takes ``shard="i/N"`` computes only the output shards ``s`` with ``s % N == i``, into
the one output directory, under a lock of its own worker slot; whoever finishes last checks that
every shard is there and commits the output (:mod:`fusellm.artifact`). :func:`run_sharded` starts
the ``N`` workers of one stage as Ray tasks, on a local Ray instance or on the cluster at
``address``, and waits for all of them. Each shard is computed by the same code from the same rows
as in a single process, so the output is byte for byte the single-process one (a test compares
them for extract and align). A task's error is raised in the caller once every task has ended.

Every node must see the inputs and the output directory at the same paths (a shared file system),
and relative paths are those of the caller's working directory. The stages: ``"extract"``
(:func:`fusellm.stages.extract.extract_topk`; the model runs on each task's device, one CPU per
task by default) and ``"align"`` (:func:`fusellm.stages.align.align_dataset`).

    from fusellm.distributed import run_sharded
    run_sharded("align", "extract/target", {"src": "extract/src"}, "align", tasks=16,
                address="auto")

On the command line, ``fusellm extract`` and ``fusellm align`` take ``--ray-tasks N`` (and
``--ray-address``) as the alternative to one ``--shard i/N`` per machine.
"""

from __future__ import annotations

import argparse
import importlib
import os
from typing import Any

from .errors import FuseLLMError, InputError, InputTypeError

__all__ = ["SHARDED_STAGES", "add_worker_arguments", "run_sharded", "run_workers"]

#: The stages whose workers take ``shard="i/N"``: name -> (module, function).
SHARDED_STAGES = {
    "extract": ("fusellm.stages.extract", "extract_topk"),
    "align": ("fusellm.stages.align", "align_dataset"),
}
#: More tasks than this is a mistake, not a cluster.
MAX_TASKS = 1 << 16


def run_sharded(
    stage: str,
    *args: Any,
    tasks: int,
    address: str | None = None,
    cpus_per_task: float = 1.0,
    **kwargs: Any,
) -> list[Any]:
    """Runs ``tasks`` workers of ``stage`` as Ray tasks and returns their reports, in shard
    order (module docstring).

    Args:
        stage: a key of :data:`SHARDED_STAGES`.
        args, kwargs: the stage function's arguments, but ``shard`` (each task's is ``"i/N"``).
        tasks: the number of workers ``N``.
        address: the Ray cluster to connect to (``"auto"``, ``"ray://host:10001"``); ``None``: the
            running Ray instance, else a local one that is shut down afterwards.
        cpus_per_task: CPUs Ray reserves per task.

    Raises :class:`InputError` for bad arguments, the stage's own errors for bad inputs (raised by
    a task, the first in shard order), :class:`FuseLLMError` without the ``ray`` package.
    """
    if stage not in SHARDED_STAGES:
        raise InputError(f"stage must be one of {sorted(SHARDED_STAGES)}, got {stage!r}")
    if isinstance(tasks, bool) or not isinstance(tasks, int):
        raise InputTypeError(f"tasks must be an int, got {type(tasks).__name__}")
    if not 1 <= tasks <= MAX_TASKS:
        raise InputError(f"tasks must be between 1 and {MAX_TASKS}, got {tasks}")
    if isinstance(cpus_per_task, bool) or not isinstance(cpus_per_task, (int, float)):
        raise InputTypeError(f"cpus_per_task must be a number, got {type(cpus_per_task).__name__}")
    if not 0 < cpus_per_task <= 1024:
        raise InputError(f"cpus_per_task must be in (0, 1024], got {cpus_per_task}")
    if "shard" in kwargs:
        raise InputError("run_sharded gives each task its shard: do not pass shard")
    try:
        import ray
    except ImportError:
        raise FuseLLMError(
            "the Ray runner needs the ray package: pip install 'fusellm[ray]'"
        ) from None

    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, logging_level="WARNING")
    try:
        work = ray.remote(num_cpus=cpus_per_task, max_retries=0)(_run_shard)
        cwd = os.getcwd()
        refs = [work.remote(stage, f"{i}/{tasks}", cwd, args, kwargs) for i in range(tasks)]
        return _results(ray, refs)
    finally:
        if started:
            ray.shutdown()


def _results(ray: Any, refs: list[Any]) -> list[Any]:
    """Every task's result, once all have ended; the first failure (in shard order) raised as
    its own exception."""
    ray.wait(refs, num_returns=len(refs))
    out = []
    for ref in refs:
        try:
            out.append(ray.get(ref))
        except ray.exceptions.RayTaskError as e:
            cause = e.cause if isinstance(e.cause, BaseException) else None
            if cause is not None:
                raise cause from None
            raise
    return out


def _run_shard(stage: str, shard: str, cwd: str, args: tuple, kwargs: dict) -> Any:
    """One Ray task: the stage's worker ``shard``, in the caller's working directory."""
    os.chdir(cwd)
    module, name = SHARDED_STAGES[stage]
    function = getattr(importlib.import_module(module), name)
    kwargs = {"progress": False, **kwargs}
    return function(*args, shard=shard, **kwargs)


def add_worker_arguments(parser: argparse.ArgumentParser, stage: str) -> None:
    """A sharded stage command's ``--shard i/N`` (this process is one worker) or ``--ray-tasks
    N`` and ``--ray-address`` (all ``N`` workers as Ray tasks, :func:`run_sharded`)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--shard",
        default=None,
        metavar="i/N",
        help=f"{stage} only this worker's shards (s %% N == i) into OUTPUT; the last worker to "
        "finish completes it",
    )
    group.add_argument(
        "--ray-tasks",
        type=int,
        default=None,
        metavar="N",
        help="run the N workers as Ray tasks (pip install 'fusellm[ray]'); every node must see "
        "the inputs and OUTPUT at the same paths",
    )
    parser.add_argument(
        "--ray-address",
        default=None,
        help="the Ray cluster for --ray-tasks (default: a running instance, else a local one)",
    )


def run_workers(stage: str, ns: argparse.Namespace, *args: Any, **kwargs: Any) -> Any:
    """The command's run of ``stage``: this process as the worker ``--shard`` (or the only one),
    or every worker as Ray tasks with ``--ray-tasks``; returns the report that says whether the
    output is complete (with Ray: the task that completed it)."""
    if ns.ray_tasks is None:
        if ns.ray_address is not None:
            raise InputError("--ray-address needs --ray-tasks")
        module, name = SHARDED_STAGES[stage]
        function = getattr(importlib.import_module(module), name)
        return function(*args, shard=ns.shard, **kwargs)
    reports = run_sharded(stage, *args, tasks=ns.ray_tasks, address=ns.ray_address, **kwargs)
    return next((r for r in reversed(reports) if r.complete and not r.skipped), reports[-1])
