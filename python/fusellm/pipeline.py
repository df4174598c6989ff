"""``fusellm run``: the whole FuseLLM pipeline from one config, resumable at any point.

Stages, each writing into ``<workdir>/<stage>/``::

    prepare     models/, data/           only the built-in miniature (no config): three tiny LMs
    split       split/                   rows that fit block_size - margin under every tokenizer
    extract     extract/<model>/         each model's top-K next-token distributions
    vocab_map   vocab_map/<source>.json  each source vocabulary mapped onto the target's
    align       align/                   the sources' rows re-expressed on the target's tokens
    pack        pack/                    blocks of block_size tokens (the training schema)
    train       train/<run>/             'fused' (FuseLLM) and 'clm' (the control), per seed
    evaluate    evaluate/perplexity.json held-out perplexity and bits per byte per domain
                evaluate/benchmarks/     benchmark tasks (evaluate.tasks, lm-evaluation-harness)
    report      report/report.md         the Markdown report (fusellm.report)

plus ``config.yaml`` (the resolved config), ``timings.json`` (``{"stages": {stage: seconds}}``),
``fusellm.log`` (every run appends to it) and ``state/fingerprints.json`` (a cache of input file
fingerprints, so unchanged model weights are not read again).

**What is redone.** Every output is an artifact of the one protocol (:mod:`fusellm.artifact`):
its manifest records its key (the settings and the fingerprints of the inputs: the content of
the data, models and tokenizers it reads, the outputs of the stages it reads from), whether it is
complete, and the fingerprint of its own files. The pipeline only orders the stages, gives each
its settings and the replace-stale policy, and records the timings: a stage whose output is
complete with the same key and unchanged files is skipped (and says so); one whose key changed,
or whose output was changed after it was written, is built again, replacing the old output
(half-written output is never trusted); an interrupted one resumes over its own partial output:
extraction keeps its finished shards (each written atomically with a checksummed sidecar),
evaluation keeps the models it finished, training resumes from the newest checkpoint that was
completely written (the Trainer writes checkpoints file by file, so the pipeline marks a
checkpoint complete only after the Trainer is done with it, and deletes the others); the other
stages write their output atomically. The stages' own keys decide for the data stages (split to
pack); the training runs, the evaluation and the benchmarks, which only the pipeline writes, have
keys made here, with the fusellm version. A run killed at any moment (SIGKILL included) and
started again finishes with the outputs of an uninterrupted run (tested).

**The CLM control.** The same trainer, packed data, steps, schedule and seed as the fusion run,
with ``lm_loss_weight = 1``: the fusion term is weighted 0 and costs one gather of K student
log-probabilities per position (the loss is computed sparsely), so the control costs what plain
CLM costs, and the only difference between the two runs is the fusion term.

**The built-in default.** ``fusellm run`` without a config runs a complete miniature of the
paper (:mod:`fusellm.miniature`): three tiny LMs of different architectures and tokenizer
families (the sources pre-trained on different domains), the target continually trained on the
mixed corpus twice, and the held-out perplexity per domain of the target before training, the CLM
control, the fused target and the sources; sized to finish within 10 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import (
    PRESETS,
    ConfigError,
    EvaluateSettings,
    ExtractSettings,
    ModelSpec,
    PipelineConfig,
    describe_config,
    fusion_config,
    load_config,
    validate_config,
)
from .errors import FuseLLMError, InputError
from .io import exclusive_lock

__all__ = [
    "LOG_NAME",
    "STAGES",
    "PipelineResult",
    "StageRun",
    "TrainRun",
    "add_run_parser",
    "builtin_config",
    "run_pipeline",
    "train_runs",
]

logger = logging.getLogger(__name__)

#: The stages, in order.
STAGES = (
    "prepare",
    "split",
    "extract",
    "vocab_map",
    "align",
    "pack",
    "train",
    "evaluate",
    "report",
)
#: The log file every run appends to, in the work directory.
LOG_NAME = "fusellm.log"
#: The evaluation output, in ``evaluate/``.
PERPLEXITY_NAME = "perplexity.json"
#: Marks a Trainer checkpoint whose every file was written.
CHECKPOINT_MARK = "fusellm_checkpoint_complete"
#: Default work directory.
DEFAULT_WORKDIR = "fusellm-run"
#: A log record attribute: the record goes to the log file, not to the console.
_LOG_FILE_ONLY = "fusellm_file_only"
_STATE = "state"


@dataclass
class StageRun:
    """One stage (or sub-stage, such as ``extract/target``) of a pipeline run."""

    stage: str
    #: ``"ran"`` (run now, possibly resuming an interrupted attempt) or ``"skipped"`` (complete).
    status: str
    #: Wall and CPU seconds of the attempt that completed it (for a skipped stage: when it ran).
    seconds: float
    cpu_seconds: float
    output: str
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class PipelineResult:
    """What :func:`run_pipeline` did."""

    workdir: Path
    config: PipelineConfig
    stages: list[StageRun]
    #: Training run name (``fused``, ``clm``, ``fused-seed1``, ...) -> its model directory.
    runs: dict[str, Path]
    #: The evaluation output (:func:`fusellm.stages.evaluate.run_evaluate`), or None.
    perplexity: dict[str, Any] | None
    report: Path | None
    #: This invocation's wall and CPU time (all threads), prepare included.
    wall_seconds: float
    cpu_seconds: float

    @property
    def fused_model(self) -> Path:
        """The fused model directory of the first seed."""
        return self.runs["fused"]

    def stage(self, name: str) -> StageRun:
        for s in self.stages:
            if s.stage == name:
                return s
        raise KeyError(name)


# --- fingerprints and timings ------------------------------------------------------------------


class _Fingerprints:
    """File fingerprints, cached in ``state/fingerprints.json`` by path: a file whose size and
    modification time did not change is not read again."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.cache: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.cache = {}

    def _get(self, kind: str, target: str, compute: Callable[[Any], dict[str, Any]]) -> str:
        ck = f"{kind}:{target}"
        fp = compute(self.cache.get(ck))
        if self.cache.get(ck) != fp:
            self.cache[ck] = fp
            from .io import atomic_write_json

            atomic_write_json(self.path, self.cache)
        return str(fp["sha256"])

    def model(self, path: str) -> str:
        from .io import model_fingerprint

        return self._get("model", path, lambda prev: model_fingerprint(path, previous=prev))

    def data(self, path: str) -> str:
        from .io import fingerprint_files

        p = Path(path)

        def compute(prev: Any) -> dict[str, Any]:
            if p.is_dir():
                files = sorted(
                    f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")
                )
                return fingerprint_files(files, root=p, previous=prev)
            return fingerprint_files([p], root=p.parent, previous=prev)

        return self._get("data", path, compute)


@dataclass
class _Outcome:
    """What a pipeline-owned stage (a training run, the evaluation) did."""

    skipped: bool
    summary: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.summary)


class _Stages:
    """Runs the stages in order and records what each did and how long it took (the decisions
    are the stages' own, :mod:`fusellm.artifact`)."""

    def __init__(self, workdir: Path) -> None:
        state = workdir / _STATE
        state.mkdir(parents=True, exist_ok=True)
        self.fps = _Fingerprints(state / "fingerprints.json")
        self.runs: list[StageRun] = []

    def run(self, stage: str, output: Path, fn: Callable[[], Any]) -> Any:
        """Runs one stage (``fn`` returns its report, whose ``skipped`` says whether its output
        was already complete); a skipped stage is recorded with the time it took when built."""
        from .artifact import build_seconds

        logger.info("%s: running", stage)
        t0, c0 = time.perf_counter(), time.process_time()
        report = fn()
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        skipped = bool(getattr(report, "skipped", False))
        if skipped:
            logger.info("%s: complete with the same inputs, skipped", stage)
            seconds, cpu = build_seconds(output)
        else:
            logger.info("%s: done in %.1f s (%.1f s CPU)", stage, seconds, cpu)
        status = "skipped" if skipped else "ran"
        self.runs.append(StageRun(stage, status, seconds, cpu, str(output), _summary_of(report)))
        return report


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = obj.to_dict() if hasattr(obj, "to_dict") else dataclasses.asdict(obj)
    elif hasattr(obj, "to_dict"):
        obj = obj.to_dict()
    return json.loads(json.dumps(obj, default=str))


def _summary_of(report: Any) -> dict[str, Any]:
    if report is None:
        return {}
    try:
        out = _jsonable(report)
    except (TypeError, ValueError):
        return {"repr": repr(report)}
    return out if isinstance(out, dict) else {"value": out}


# --- logging, threads ----------------------------------------------------------------------------


@contextlib.contextmanager
def _logging(workdir: Path) -> Iterator[None]:
    """Appends fusellm's (and the Trainer's) log records to ``<workdir>/fusellm.log``."""
    handler = logging.FileHandler(workdir / LOG_NAME, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    names = ("fusellm", "transformers.trainer")
    saved = []
    for name in names:
        lg = logging.getLogger(name)
        saved.append((lg, lg.level))
        if lg.getEffectiveLevel() > logging.INFO:
            lg.setLevel(logging.INFO)
        lg.addHandler(handler)
    try:
        yield
    finally:
        for lg, level in saved:
            lg.removeHandler(handler)
            lg.setLevel(level)
        handler.close()


@contextlib.contextmanager
def _threads(num_threads: int | None) -> Iterator[None]:
    if num_threads is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --- training ------------------------------------------------------------------------------------


def _callbacks(run: str) -> list[Any]:
    """A callback marking each checkpoint complete once the Trainer has written it, and one
    copying the training logs into the pipeline's log."""
    from transformers import TrainerCallback

    from .io import atomic_write_bytes

    class CheckpointMark(TrainerCallback):  # type: ignore[misc]
        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.is_world_process_zero:
                ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if ckpt.is_dir():
                    atomic_write_bytes(ckpt / CHECKPOINT_MARK, b"complete\n")

    class LogCopy(TrainerCallback):  # type: ignore[misc]
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if state.is_world_process_zero and logs:
                logger.info(
                    "train/%s step %d: %s",
                    run,
                    state.global_step,
                    json.dumps(logs),
                    extra={_LOG_FILE_ONLY: True},
                )

    return [CheckpointMark(), LogCopy()]


def _resume_checkpoint(output_dir: Path) -> str | None:
    """The newest completely written checkpoint; incomplete ones are deleted."""
    if not output_dir.is_dir():
        return None
    ckpts = []
    for p in output_dir.iterdir():
        if p.is_dir() and p.name.startswith("checkpoint-") and p.name[11:].isdigit():
            ckpts.append((int(p.name[11:]), p))
    best = None
    for _, p in sorted(ckpts):
        if (p / CHECKPOINT_MARK).is_file():
            best = p
        else:
            logger.warning("removing the incompletely written checkpoint %s", p)
            shutil.rmtree(p, ignore_errors=True)
    return str(best) if best is not None else None


def _train_run(
    config: PipelineConfig, tr: TrainRun, pack_dir: Path, out: Path, progress: Any
) -> dict[str, Any]:
    import gc

    from .train import run_train

    run, kind, seed = tr.name, tr.kind, tr.seed
    resume = _resume_checkpoint(out)
    if resume and _finished(Path(resume)):
        # Killed after the last checkpoint: the Trainer, resumed there, would train one step
        # past the end; the checkpoint already holds the final model.
        logger.info("train/%s: %s holds the finished training: it is the final model", run, resume)
        return _finalize_from_checkpoint(Path(resume), out, kind, seed)
    if resume:
        logger.info("train/%s: resuming from %s", run, resume)
    fc = fusion_config(config, tr.overrides, seed=seed, output_dir=str(out))
    fc.resume_from_checkpoint = resume
    if progress is False:
        fc.disable_tqdm = True
    trainer = run_train(
        fc, pack_dir, config.target.path, callbacks=_callbacks(run), print_logs=False
    )
    trainer.save_state()
    history = trainer.state.log_history
    losses = [e for e in history if "loss" in e]
    summary = {
        "kind": kind,
        "seed": seed,
        "steps": int(trainer.state.global_step),
        "resumed_from": resume,
        "first_loss": losses[0]["loss"] if losses else None,
        "last_loss": losses[-1]["loss"] if losses else None,
    }
    del trainer
    gc.collect()
    return summary


#: Checkpoint files that only serve to resume training.
_RESUME_ONLY = ("optimizer.pt", "scheduler.pt", "scaler.pt", CHECKPOINT_MARK)


def _finished(checkpoint: Path) -> bool:
    """Whether a checkpoint was saved at the last step of its training."""
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    max_steps = state.get("max_steps") or 0
    return bool(max_steps) and int(state.get("global_step", 0)) >= int(max_steps)


def _finalize_from_checkpoint(checkpoint: Path, out: Path, kind: str, seed: int) -> dict[str, Any]:
    """Makes a final-step checkpoint the run's output: its model, tokenizer and trainer state are
    copied (atomically, file by file) into ``out``, as the end of training would have saved
    them."""
    from .io import atomic_write_bytes

    for f in sorted(checkpoint.iterdir()):
        if f.is_file() and f.name not in _RESUME_ONLY and not f.name.startswith("rng_state"):
            atomic_write_bytes(out / f.name, f.read_bytes())
    state = json.loads((out / "trainer_state.json").read_text(encoding="utf-8"))
    losses = [e for e in state.get("log_history", []) if "loss" in e]
    return {
        "kind": kind,
        "seed": seed,
        "steps": int(state.get("global_step", 0)),
        "resumed_from": str(checkpoint),
        "first_loss": losses[0]["loss"] if losses else None,
        "last_loss": losses[-1]["loss"] if losses else None,
    }


@dataclass(frozen=True)
class TrainRun:
    """One training run of the pipeline: ``train/<name>/``."""

    name: str
    #: ``"fused"`` (FuseLLM, or a point of the fusion-weight sweep), ``"clm"`` (the control) or
    #: ``"kd"`` (single-source distillation).
    kind: str
    seed: int
    #: The FusionConfig fields this run sets on top of the config's ``train`` settings.
    overrides: dict[str, Any] = field(default_factory=dict)


def train_runs(cfg: PipelineConfig) -> list[TrainRun]:
    """Every training run, per seed: ``fused``, ``clm`` (with ``train.control``), one
    ``kd-<source>`` per source (with ``train.kd_baselines``) and one ``fused-lmw<value>`` per
    ``train.sweep_lm_loss_weight`` value. The first seed's runs have these names; the others'
    get ``-seed<N>`` appended."""
    t = cfg.train
    names = cfg.source_names
    out = []
    for i, seed in enumerate(cfg.seeds):
        suffix = "" if i == 0 else f"-seed{seed}"
        out.append(TrainRun(f"fused{suffix}", "fused", seed))
        if t.control:
            clm = {"lm_loss_weight": 1.0, "combine": "hard"}
            out.append(TrainRun(f"clm{suffix}", "clm", seed, clm))
        if t.kd_baselines:
            for s in names:
                kd = {"sources": [s], "ignore_sources": [n for n in names if n != s]}
                kd.update(with_ref=False, combine="hard")
                out.append(TrainRun(f"kd-{s}{suffix}", "kd", seed, kd))
        for w in t.sweep_lm_loss_weight:
            sweep = {"lm_loss_weight": w, "combine": "hard"}
            out.append(TrainRun(f"fused-lmw{w:g}{suffix}", "fused", seed, sweep))
    return out


# --- the pipeline --------------------------------------------------------------------------------


def _as_config(config: Any, preset: str | None) -> PipelineConfig:
    if isinstance(config, PipelineConfig):
        if preset is not None and preset != config.preset:
            raise InputError(
                "preset applies when a config is loaded: pass it to load_config, not with a "
                "PipelineConfig"
            )
        return config
    if isinstance(config, (str, os.PathLike, Mapping)):
        return load_config(config, preset=preset)
    raise InputError(
        f"config must be a PipelineConfig, a YAML path or a mapping, got {type(config).__name__}"
    )


def run_pipeline(
    config: PipelineConfig | str | os.PathLike[str] | Mapping[str, Any] | None,
    workdir: str | os.PathLike[str] | None = None,
    *,
    seeds: Sequence[int] | None = None,
    progress: bool | None = None,
    preset: str | None = None,
    scale: str = "default",
) -> PipelineResult:
    """Runs every stage of the pipeline (module docstring), skipping what is already done.

    Args:
        config: a :class:`~fusellm.config.PipelineConfig`, a YAML file, a mapping, or ``None``
            for the built-in miniature (:func:`builtin_config`).
        workdir: the work directory (default: the config's ``workdir``, else ``./fusellm-run``).
        seeds: training seeds (override the config's ``seeds``).
        progress: progress bars (``None``: only on a terminal).
        preset: ``"improved"`` or ``"reference"``, overriding a loaded config's ``preset``.
        scale: the built-in miniature's size (``"default"`` or ``"test"``); only without config.

    The config is checked completely (:func:`fusellm.config.validate_config`) before anything is
    written; a bad config raises :class:`~fusellm.config.ConfigError` naming the key. The work
    directory is locked for the whole run: a second run on it raises :class:`fusellm.LockedError`
    at once, naming the process that holds it.
    """
    t0, c0 = time.perf_counter(), time.process_time()
    if config is not None:
        cfg = dataclasses.replace(_as_config(config, preset))  # the caller's object stays as is
        if seeds is not None:
            cfg.seeds = list(seeds)
        wd = Path(workdir or cfg.workdir or DEFAULT_WORKDIR).resolve()
        cfg.workdir = str(wd)
        _check_seeds(cfg.seeds)
        _check_workdir(wd)
        validate_config(cfg)
        wd.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(wd, "work directory"), _logging(wd):
            logger.info("fusellm run: %s (preset %s)", wd, cfg.preset)
            return _run(cfg, wd, progress, t0, c0, prepare=None)
    if scale not in ("default", "test"):
        raise ConfigError("scale", f"must be 'default' or 'test', got {scale!r}")
    if preset is not None and preset not in PRESETS:
        raise ConfigError("preset", f"must be one of {', '.join(map(repr, PRESETS))}")
    if seeds is not None:
        _check_seeds(list(seeds))
    wd = Path(workdir or DEFAULT_WORKDIR).resolve()
    _check_workdir(wd)
    wd.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(wd, "work directory"), _logging(wd):
        logger.info("fusellm run: built-in miniature (scale %s) in %s", scale, wd)
        from .miniature import prepare_miniature

        tp, cp = time.perf_counter(), time.process_time()
        with _threads(1 if scale == "test" else None):
            mini = prepare_miniature(wd, seed=0, scale=scale, progress=progress)
        prep = (time.perf_counter() - tp, time.process_time() - cp)
        logger.info("prepare: %.1f s (%.1f s CPU)", *prep)
        cfg = builtin_config(mini, workdir=wd, scale=scale, preset=preset or "improved")
        if seeds is not None:
            cfg.seeds = list(seeds)
        validate_config(cfg)
        return _run(cfg, wd, progress, t0, c0, prepare=prep)


def _check_workdir(wd: Path) -> None:
    """The work directory, or a path where one can be made: not a file, nor under one."""
    for p in (wd, *wd.parents):
        if p.exists():
            if not p.is_dir():
                what = "is" if p == wd else f"is under {p}, which is"
                raise ConfigError("workdir", f"{wd} {what} a file, not a directory")
            return


def _check_seeds(seeds: Sequence[int]) -> None:
    if not seeds:
        raise ConfigError("seeds", "needs at least one seed")
    for i, s in enumerate(seeds):
        if not isinstance(s, int) or isinstance(s, bool) or s < 0:
            raise ConfigError(f"seeds[{i}]", f"must be an integer >= 0, got {s!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError("seeds", f"has duplicates: {list(seeds)}")


def stage_outputs(cfg: PipelineConfig, workdir: str | os.PathLike[str]) -> dict[str, Path]:
    """Every stage of a run of ``cfg`` in pipeline order (``split``, ``extract/<model>``,
    ``vocab_map/<source>``, ``align``, ``pack``, ``train/<run>``, ``evaluate``,
    ``evaluate/benchmarks``) -> its output artifact in ``workdir`` (the artifacts the config
    enables). :func:`fusellm.artifact.is_complete` says which are done."""
    wd = Path(workdir)
    out: dict[str, Path] = {"split": wd / "split"}
    out.update({f"extract/{m.name}": wd / "extract" / m.name for m in cfg.models})
    out.update({f"vocab_map/{s.name}": wd / "vocab_map" / f"{s.name}.json" for s in cfg.sources})
    out.update(align=wd / "align", pack=wd / "pack")
    out.update({f"train/{tr.name}": wd / "train" / tr.name for tr in train_runs(cfg)})
    if cfg.evaluate.enabled and cfg.data.heldout is not None:
        out["evaluate"] = wd / "evaluate" / PERPLEXITY_NAME
    if cfg.evaluate.enabled and cfg.evaluate.tasks:
        out["evaluate/benchmarks"] = wd / "evaluate" / "benchmarks"
    return out


def _run(
    cfg: PipelineConfig,
    wd: Path,
    progress: bool | None,
    t0: float,
    c0: float,
    *,
    prepare: tuple[float, float] | None,
) -> PipelineResult:
    from .io import atomic_write_bytes

    atomic_write_bytes(wd / "config.yaml", cfg.to_yaml().encode("utf-8"))
    stages = _Stages(wd)
    if prepare is not None:
        stages.runs.append(StageRun("prepare", "ran", prepare[0], prepare[1], str(wd / "models")))
    outputs = stage_outputs(cfg, wd)
    with _threads(cfg.num_threads):
        _data_stages(cfg, outputs, stages, progress)
        model_dirs: dict[str, Path] = {}
        for tr in train_runs(cfg):
            out = outputs[f"train/{tr.name}"]
            model_dirs[tr.name] = out
            stages.run(
                f"train/{tr.name}",
                out,
                lambda tr=tr, out=out: _train_stage(
                    cfg, tr, outputs["pack"], out, stages, progress
                ),
            )
        perplexity = None
        if "evaluate" in outputs:
            perplexity = _evaluate(cfg, outputs["evaluate"], stages, model_dirs, progress)
        elif cfg.evaluate.enabled:
            logger.info("evaluate: skipped (no data.heldout)")
        if "evaluate/benchmarks" in outputs:
            _benchmarks(cfg, outputs["evaluate/benchmarks"], stages, model_dirs, progress)
    return _finish(cfg, wd, stages, model_dirs, perplexity, t0, c0)


def _data_stages(
    cfg: PipelineConfig, outputs: Mapping[str, Path], stages: _Stages, progress: Any
) -> None:
    """Split, extract (per model), vocabulary maps (per source), align and pack: each stage
    decides for its own output, told to replace a stale one."""
    from .stages.align import align_dataset
    from .stages.pack import pack_dataset
    from .stages.split import run_split
    from .stages.vocab_map import run_vocab_map

    threads = cfg.num_threads
    split_dir = outputs["split"]
    split = dataclasses.asdict(cfg.split)
    stages.run(
        "split",
        split_dir,
        lambda: run_split(
            cfg.data.train,
            split_dir,
            [m.tokenizer_path for m in cfg.models],
            on_stale="replace",
            text_column=cfg.data.text_column,
            block_size=cfg.block_size,
            progress=progress,
            **split,
        ),
    )
    for m in cfg.models:
        out = outputs[f"extract/{m.name}"]
        stages.run(f"extract/{m.name}", out, _extract_fn(cfg.extract, m, split_dir, out, progress))
    for s in cfg.sources:
        path = outputs[f"vocab_map/{s.name}"]
        settings = {**dataclasses.asdict(cfg.vocab_map)}
        settings["num_threads"] = cfg.vocab_map.num_threads or threads
        stages.run(
            f"vocab_map/{s.name}",
            path,
            lambda s=s, path=path, settings=settings: run_vocab_map(
                cfg.target.tokenizer_path, s.tokenizer_path, path, on_stale="replace", **settings
            ),
        )
    align_dir = outputs["align"]
    align = {**dataclasses.asdict(cfg.align), "num_threads": cfg.align.num_threads or threads}
    stages.run(
        "align",
        align_dir,
        lambda: align_dataset(
            outputs[f"extract/{cfg.target.name}"],
            {s.name: outputs[f"extract/{s.name}"] for s in cfg.sources},
            align_dir,
            base_tokenizer=cfg.target.tokenizer_path,
            source_tokenizers={s.name: s.tokenizer_path for s in cfg.sources},
            vocab_maps={s.name: str(outputs[f"vocab_map/{s.name}"]) for s in cfg.sources},
            on_stale="replace",
            progress=progress,
            **align,
        ),
    )
    pack_dir = outputs["pack"]
    stages.run(
        "pack",
        pack_dir,
        lambda: pack_dataset(
            align_dir,
            pack_dir,
            block_size=cfg.block_size,
            on_stale="replace",
            progress=progress,
            **dataclasses.asdict(cfg.pack),
        ),
    )


def _extract_fn(
    s: ExtractSettings, m: ModelSpec, split_dir: Path, out: Path, progress: Any
) -> Callable[[], Any]:
    def do() -> Any:
        from .stages.extract import extract_topk

        rep = extract_topk(
            split_dir,
            m.path,
            out,
            tokenizer=m.tokenizer,
            top_k=s.top_k,
            dtype=s.dtype,
            device=s.device,
            attn_implementation=s.attn_implementation,
            per_step_ce=s.per_step_ce,
            values=s.values,
            rows_per_shard=s.rows_per_shard,
            max_tokens_per_batch=s.max_tokens_per_batch,
            max_batch_size=s.max_batch_size,
            compression=s.compression,
            on_stale="replace",
            progress=progress,
        )
        if not rep.complete:
            raise FuseLLMError(f"extraction into {out} is incomplete")
        return rep

    return do


def _train_stage(
    cfg: PipelineConfig, tr: TrainRun, pack_dir: Path, out: Path, stages: _Stages, progress: Any
) -> _Outcome:
    """One training run, a resumable artifact of the pipeline (``train/<run>``): its key is the
    packed data's output fingerprint, the target model and the run's settings."""
    from .artifact import Artifact, fusellm_version, output_sha256

    key = {
        "pack": output_sha256(pack_dir),
        "model": stages.fps.model(cfg.target.path),
        "kind": tr.kind,
        "seed": tr.seed,
        "sources": cfg.source_names,
        "args": cfg.train.args,
        "overrides": tr.overrides,
        "num_threads": cfg.num_threads,
        "fusellm_version": fusellm_version(),
    }
    # The fingerprint covers the saved model (the top-level files), not the checkpoints.
    art = Artifact(out, "train", key, resumable=True, owned=True, fingerprint=("*",))
    return _pipeline_artifact(art, lambda: _train_run(cfg, tr, pack_dir, out, progress))


def _pipeline_artifact(art: Any, fn: Callable[[], dict[str, Any]]) -> _Outcome:
    """Builds (or resumes, or skips) an output only the pipeline writes; ``fn`` does the work
    over what an interrupted attempt left and returns its summary, kept in the manifest."""
    decision = art.decide("replace")
    if decision.done:
        art.skipped()
        return _Outcome(True, dict((decision.manifest or {}).get("summary") or {}))
    with art.building(decision, {}) as current:
        if current.done:  # pragma: no cover - the work directory is locked
            return _Outcome(True, dict((current.manifest or {}).get("summary") or {}))
        summary = fn()
        art.complete({"summary": summary})
    return _Outcome(False, summary)


def _finish(
    cfg: PipelineConfig,
    wd: Path,
    stages: _Stages,
    model_dirs: dict[str, Path],
    perplexity: dict[str, Any] | None,
    t0: float,
    c0: float,
) -> PipelineResult:
    """The timings, then the report that shows them."""
    from .io import atomic_write_json
    from .report import write_report

    timings = {
        "stages": {r.stage: round(r.seconds, 3) for r in stages.runs},
        "cpu_seconds": {r.stage: round(r.cpu_seconds, 3) for r in stages.runs},
        "status": {r.stage: r.status for r in stages.runs},
        "this_run": {
            "wall_seconds": round(time.perf_counter() - t0, 3),
            "cpu_seconds": round(time.process_time() - c0, 3),
        },
    }
    atomic_write_json(wd / "timings.json", timings, sort_keys=False)
    tr, cr = time.perf_counter(), time.process_time()
    report = write_report(wd)
    stages.runs.append(
        StageRun("report", "ran", time.perf_counter() - tr, time.process_time() - cr, str(report))
    )
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    timings["this_run"] = {"wall_seconds": round(wall, 3), "cpu_seconds": round(cpu, 3)}
    atomic_write_json(wd / "timings.json", timings, sort_keys=False)
    logger.info("fusellm run: finished in %.1f s (%.1f s CPU); report: %s", wall, cpu, report)
    return PipelineResult(wd, cfg, stages.runs, model_dirs, perplexity, report, wall, cpu)


def evaluation_labels(cfg: PipelineConfig, model_dirs: Mapping[str, Path]) -> dict[str, str]:
    """Label -> model directory for the evaluation: ``target (before)``, every source
    (``<name> (source, <domain>)``), then the training runs by name (``clm``, ``fused``, ...)."""
    models = {"target (before)": cfg.target.path}
    if cfg.evaluate.sources:
        for s in cfg.sources:
            models[source_label(s)] = s.path
    for run, path in model_dirs.items():
        models[run] = str(path)
    return models


def source_label(s: ModelSpec) -> str:
    """A source's evaluation label."""
    return f"{s.name} (source, {s.domain})" if s.domain else f"{s.name} (source)"


def evaluation_models(
    cfg: PipelineConfig, model_dirs: Mapping[str, Path]
) -> tuple[dict[str, str], dict[str, str]]:
    """The models the evaluation reads: label -> model directory
    (:func:`evaluation_labels`), and label -> tokenizer directory for the models whose
    tokenizer is not saved with them."""
    models = evaluation_labels(cfg, model_dirs)
    tokenizers = {
        source_label(s): s.tokenizer for s in cfg.sources if s.tokenizer and cfg.evaluate.sources
    }
    if cfg.target.tokenizer:
        tokenizers["target (before)"] = cfg.target.tokenizer
    return models, tokenizers


def workdir_models(workdir: str | os.PathLike[str]) -> tuple[dict[str, str], dict[str, str]]:
    """The models of a pipeline work directory, as the pipeline evaluates them
    (:func:`evaluation_models`): from its resolved ``config.yaml``, the training runs whose
    stage finished (the others are left out with a warning)."""
    from .artifact import is_complete

    wd = Path(workdir)
    cfg = load_config(wd / "config.yaml")
    done: dict[str, Path] = {}
    for tr in train_runs(cfg):
        path = wd / "train" / tr.name
        if is_complete(path, "train"):
            done[tr.name] = path
        else:
            logger.warning("%s: training run %s has not finished: not evaluated", wd, tr.name)
    return evaluation_models(cfg, done)


#: The evaluate settings that concern the benchmark step only.
_BENCHMARK_SETTINGS = ("tasks", "num_fewshot", "limit", "include_path", "tasks_batch_size")


def _model_keys(cfg: PipelineConfig, stages: _Stages, models: Mapping[str, str]) -> dict[str, Any]:
    """Label -> what a model's results depend on: a training run's output fingerprint, or the
    fingerprint of a model directory of the config."""
    from .artifact import output_sha256

    train = {tr.name for tr in train_runs(cfg)}
    return {
        label: output_sha256(path) if label in train else stages.fps.model(path)
        for label, path in models.items()
    }


def _evaluate(
    cfg: PipelineConfig,
    out: Path,
    stages: _Stages,
    model_dirs: Mapping[str, Path],
    progress: Any,
) -> dict[str, Any]:
    """The held-out perplexity of every evaluated model (``evaluate/perplexity.json``), a
    resumable artifact of the pipeline: an interrupted attempt keeps the models it finished."""
    from .artifact import Artifact, fusellm_version
    from .stages.evaluate import run_evaluate

    models, tokenizers = evaluation_models(cfg, model_dirs)
    ev: EvaluateSettings = cfg.evaluate
    settings = {
        k: v
        for k, v in dataclasses.asdict(ev).items()
        if k != "batch_size" and k not in _BENCHMARK_SETTINGS
    }
    key = {
        "data": stages.fps.data(cfg.data.heldout),  # type: ignore[arg-type]
        "text_column": cfg.data.text_column,
        "domain_column": cfg.data.domain_column,
        "models": _model_keys(cfg, stages, models),
        "settings": settings,
        "block_size": cfg.block_size,
        "num_threads": cfg.num_threads,
        "fusellm_version": fusellm_version(),
    }
    art = Artifact(out, "evaluate", key, files=(out.name,), resumable=True, owned=True)

    def do() -> dict[str, Any]:
        run_evaluate(
            models,
            cfg.data.heldout,
            out,
            tokenizers=tokenizers or None,
            text_column=cfg.data.text_column,
            domain_column=cfg.data.domain_column,
            max_length=ev.max_length or cfg.block_size,
            stride=ev.stride,
            batch_size=ev.batch_size,
            device=ev.device,
            dtype=None if ev.dtype == "auto" else ev.dtype,
            progress=progress,
        )
        return {"models": list(models)}

    stages.run("evaluate", out, lambda: _pipeline_artifact(art, do))
    return dict(json.loads(out.read_text(encoding="utf-8")))


def _benchmarks(
    cfg: PipelineConfig,
    out: Path,
    stages: _Stages,
    model_dirs: Mapping[str, Path],
    progress: Any,
) -> None:
    """The benchmark tasks (:func:`fusellm.stages.benchmark.run_benchmarks`) on the evaluated
    models, into ``evaluate/benchmarks/``, a resumable artifact of the pipeline: an interrupted
    attempt keeps the models and tasks it finished."""
    from .artifact import Artifact, fusellm_version
    from .stages.benchmark import lm_eval_version, run_benchmarks

    models, tokenizers = evaluation_models(cfg, model_dirs)
    ev: EvaluateSettings = cfg.evaluate
    key = {
        "models": _model_keys(cfg, stages, models),
        "tasks": list(ev.tasks),
        "num_fewshot": ev.num_fewshot,
        "limit": ev.limit,
        "include_path": {p: stages.fps.data(p) for p in ev.include_path},
        "dtype": ev.dtype,
        "device": ev.device,
        "lm_eval": lm_eval_version(),
        "num_threads": cfg.num_threads,
        "fusellm_version": fusellm_version(),
    }
    art = Artifact(out, "benchmarks", key, resumable=True, owned=True)

    def do() -> dict[str, Any]:
        summary = run_benchmarks(
            models,
            ev.tasks,
            out,
            tokenizers=tokenizers or None,
            num_fewshot=ev.num_fewshot,
            limit=ev.limit,
            include_path=ev.include_path,
            batch_size=ev.tasks_batch_size,
            device=ev.device,
            dtype=None if ev.dtype == "auto" else ev.dtype,
            progress=progress,
        )
        return {"models": list(models), "tasks": list(summary.get("tasks") or [])}

    stages.run("evaluate/benchmarks", out, lambda: _pipeline_artifact(art, do))


# --- the built-in default ------------------------------------------------------------------------


#: K of the built-in miniature's extractions with the improved preset (the reference keeps 10).
MINIATURE_TOP_K = 128
#: The built-in miniature's fusion settings on top of the improved preset.
MINIATURE_FUSION: dict[str, Any] = {
    "lm_loss_weight": 0.3,
    "with_ref": False,
    "combine": "decoupled",
}


def builtin_config(
    mini: Any, *, workdir: Path, scale: str = "default", preset: str = "improved"
) -> PipelineConfig:
    """The config of the built-in miniature (:func:`fusellm.miniature.prepare_miniature`).

    The improved preset (or ``preset``) with the miniature's block size and tiny-model training
    settings: a learning rate for a tiny model (1e-3, cosine, 5% warm-up), one epoch over the
    fusion set in batches of 4 blocks (the paper's one epoch; measured: the whole default run
    took 5 min 24 s on 2 idle cores, 31 to 36 s per training, 77 s for the three extractions),
    and a checkpoint every 20 steps (an interrupted run resumes close to where it stopped).
    At the default scale, the miniature's domain benchmark tasks (``evaluate.tasks``, when
    lm-evaluation-harness is installed). ``scale="test"``: 6 steps, a checkpoint every 2, one
    thread everywhere (reproducible bit for bit), no benchmark task.
    """
    test = scale == "test"
    data_train, data_heldout = _miniature_data(mini)
    sources = []
    for name, path in mini.sources.items():
        sources.append({"name": name, "path": str(path), "domain": _miniature_domain(mini, name)})
    raw: dict[str, Any] = {
        "preset": preset,
        "workdir": str(workdir),
        "target": {"name": "target", "path": str(mini.target)},
        "sources": sources,
        "data": {"train": str(data_train), "heldout": str(data_heldout)},
        "block_size": int(mini.block_size),
        "seeds": [0],
        "num_threads": 1 if test else None,
        "extract": {"rows_per_shard": 64 if test else 256, "max_tokens_per_batch": 8192},
        "train": {
            "kd_baselines": not test,
            "learning_rate": 1.0e-3,
            "lr_scheduler_type": "cosine",
            "warmup_steps": 0.05,
            **({"max_steps": 6} if test else {"num_train_epochs": 1}),
            "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 1,
            "logging_steps": 1,
            "save_steps": 2 if test else 20,
            "save_total_limit": 2,
            "dataloader_num_workers": 0,
        },
        "evaluate": {"batch_size": 8, **_miniature_benchmarks(mini, test)},
    }
    if preset == "improved":
        # Tiny teachers spread their mass thin: their top-10 holds 29 % (MPT) to 45 % (NeoX) of
        # it, their top-32 42 % to 61 %; the calibrated teacher keeps what the rows hold, and
        # each doubling of K (32, 64, 128) moved more of each source's advantage to the target.
        # The true token's part of a row teaches only while the rows predict the block better
        # than the student does, and the rest of the row (how the source ranks the tokens that
        # did not occur) always teaches (combine="decoupled": no source knows the third domain,
        # the student soon overtakes them there, yet the MPT rows' shape on that text still
        # carries what it knows of Python). Fusion weight 0.7: the best of 0.5, 0.7 and 0.9
        # under that gate (the tail of each row goes to the next token, so a strong weight does
        # not starve the tokens the rows omit). The target's own rows are no candidate (they
        # are the model before training: distilling them pulls the student back to where it
        # started). Measured in the README and docs/fusion-experiments.md.
        raw["extract"]["top_k"] = MINIATURE_TOP_K
        raw["train"].update(MINIATURE_FUSION)
    return PipelineConfig.from_dict(raw, base_dir=workdir)


def _miniature_data(mini: Any) -> tuple[Any, Any]:
    for train_attr, held_attr in (
        ("train_data", "heldout_data"),
        ("train", "heldout"),
        ("data_train", "data_heldout"),
    ):
        if hasattr(mini, train_attr) and hasattr(mini, held_attr):
            return getattr(mini, train_attr), getattr(mini, held_attr)
    raise FuseLLMError(f"the miniature does not name its train and held-out data: {mini!r}")


_EVAL = 'pip install "fusellm[eval]"'


def _miniature_benchmarks(mini: Any, test: bool) -> dict[str, Any]:
    """The ``evaluate`` settings of the miniature's domain benchmark tasks
    (:func:`fusellm.stages.benchmark.write_domain_tasks`): at the default scale, when
    lm-evaluation-harness is installed (the reduced run stays small)."""
    import importlib.util

    tasks = list(getattr(mini, "benchmark_tasks", None) or ())
    where = getattr(mini, "benchmarks", None)
    if test or not tasks or where is None:
        return {}
    if importlib.util.find_spec("lm_eval") is None:
        logger.info("benchmark tasks skipped: lm-evaluation-harness is not installed (%s)", _EVAL)
        return {}
    return {"tasks": tasks, "include_path": [str(where)]}


def _miniature_domain(mini: Any, name: str) -> str | None:
    for attr in ("domains", "source_domains"):
        d = getattr(mini, attr, None)
        if isinstance(d, Mapping) and name in d:
            return str(d[name])
    return None


# --- command line --------------------------------------------------------------------------------

_EPILOG = """\
Without CONFIG, the built-in miniature of the paper runs: three tiny LMs of different
architectures and tokenizer families (the sources pre-trained on different domains), the target
trained twice on the mixed corpus with the same data, steps and seed (FuseLLM fusion, then the
CLM control, one distillation run per source), held-out perplexity per domain and the
miniature's benchmark tasks: within 10 minutes on 2 CPU cores (5 min 50 s measured on idle
cores; --scale test: a reduced run of about 30 seconds).

A re-run in the same work directory skips the stages that are complete with the same inputs,
redoes those whose inputs or settings changed, and resumes an interrupted one (a killed run can
simply be started again). Outputs: WORKDIR/report/report.md, WORKDIR/train/fused (a model
directory for AutoModelForCausalLM.from_pretrained), WORKDIR/evaluate/perplexity.json,
WORKDIR/timings.json, WORKDIR/fusellm.log. `fusellm run --help-config` lists every config key;
examples/reference.yaml and examples/improved.yaml are documented examples.

exit status: 0 done, 2 bad config or arguments (nothing was run), 1 a stage failed.
"""


def add_run_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds the ``run`` command to an ``argparse`` sub-parser collection."""
    p = subparsers.add_parser(
        "run",
        help="run every stage from a config (default: built-in demo)",
        description=(
            "Run the whole FuseLLM pipeline (split, extract, vocab map, align, pack, train the "
            "fused model and its CLM control, evaluate, report) from a YAML config. The config "
            "is validated completely (unknown keys, missing models, tokenizers that do not load, "
            "a block size over a model's context, ...) before anything runs."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "config",
        nargs="?",
        metavar="CONFIG.yaml",
        help="pipeline config (YAML; relative paths are relative to it); default: the built-in "
        "miniature",
    )
    p.add_argument(
        "--workdir",
        metavar="DIR",
        help=f"work directory (default: the config's workdir, else ./{DEFAULT_WORKDIR})",
    )
    p.add_argument(
        "--preset",
        choices=list(PRESETS),
        help="settings the config does not give: improved (default; fusellm's fixes) or "
        "reference (the published pipeline: MinED DTW, MinED vocabulary map, per-token CE)",
    )
    p.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        metavar="N",
        help="training seeds, replacing the config's (e.g. --seeds 0 1): runs fused/clm, "
        "fused-seed1/clm-seed1, ...",
    )
    p.add_argument(
        "--scale",
        choices=["default", "test"],
        default="default",
        help="size of the built-in miniature (test: a reduced run for tests and a quick look); "
        "only without CONFIG",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="validate CONFIG and print the resolved configuration; run nothing",
    )
    p.add_argument(
        "--help-config",
        action="store_true",
        help="describe every config key (type, default, meaning) and exit",
    )
    p.set_defaults(func=_cli_run)
    return p


def _cli_run(args: argparse.Namespace) -> int:
    if args.help_config:
        print(describe_config())
        return 0
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    # Per-step training logs go to the log file only; the console keeps the progress bars.
    handler.addFilter(lambda record: not getattr(record, _LOG_FILE_ONLY, False))
    root = logging.getLogger("fusellm")
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.INFO)
    try:
        if args.config is None and args.dry_run:
            raise ConfigError("CONFIG", "--dry-run needs a config file")
        if args.config is not None and args.scale != "default":
            raise ConfigError("--scale", "applies to the built-in miniature only (no CONFIG)")
        if args.dry_run:
            cfg = load_config(args.config, preset=args.preset)
            if args.seeds:
                cfg.seeds = list(args.seeds)
                _check_seeds(cfg.seeds)
            if args.workdir:
                cfg.workdir = str(Path(args.workdir).resolve())
            validate_config(cfg)
            print(cfg.to_yaml(), end="")
            return 0
        result = run_pipeline(
            args.config,
            args.workdir,
            seeds=args.seeds,
            progress=False if args.no_progress else None,
            preset=args.preset,
            scale=args.scale,
        )
    except ConfigError as e:
        print(f"fusellm run: error: {e}", file=sys.stderr)
        return 2
    except FuseLLMError as e:
        print(f"fusellm run: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    _print_result(result)
    return 0


def _print_result(result: PipelineResult) -> None:
    lines = ["", "stage                     status    seconds   cpu s"]
    for r in result.stages:
        lines.append(f"{r.stage:<25} {r.status:<8} {r.seconds:8.1f} {r.cpu_seconds:7.1f}")
    lines.append(f"{'this run':<25} {'':<8} {result.wall_seconds:8.1f} {result.cpu_seconds:7.1f}")
    if result.perplexity is not None:
        from .stages.evaluate import format_table

        lines += ["", format_table(result.perplexity)]
    lines += [
        "",
        f"fused model: {result.runs.get('fused')}",
        f"report:      {result.report}",
        f"log:         {result.workdir / LOG_NAME}",
    ]
    print("\n".join(lines), flush=True)
