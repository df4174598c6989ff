"""Stage 5: continual training of the target model with the fusion loss.

- :class:`FusionConfig`: a :class:`transformers.TrainingArguments` dataclass with the fusion fields
  (every field has help text; it loads from YAML and the command line through
  :class:`transformers.HfArgumentParser`).
- :class:`FusionTrainer`: a :class:`transformers.Trainer` whose ``compute_loss`` runs the sparse
  fusion loss of :mod:`fusellm.fuse` on the batches of :class:`fusellm.fuse.FusionCollator`.
  It checks the packed data against the configuration and the model's vocabulary before the first
  step, normalises the loss over whole gradient-accumulation windows (``num_items_in_batch``),
  and logs the CLM and fusion terms, each candidate's selection share (MinCE) or mean weight
  (AvgCE), and the optimizer's effective learning rate and Adam betas.
- :func:`run_train`: load a packed dataset directory and a model, train, save.
- :func:`add_train_parser`: the ``fusellm train`` command.

DeepSpeed configurations ship in ``fusellm/configs`` (``--deepspeed zero2`` / ``zero2_offload`` /
``zero3`` / ``zero3_offload`` or a path). Without offload they leave the optimizer and the schedule
to the Trainer (``optim``, ``learning_rate``, ``adam_beta1/2``, ``lr_scheduler_type``, ...), exactly
as without DeepSpeed; with offload the optimizer is DeepSpeed's CPU AdamW with every
hyper-parameter taken from this configuration ("auto"), and the schedule is still the Trainer's.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from transformers import HfArgumentParser, Trainer, TrainingArguments

from .errors import InputError, InputTypeError
from .fuse import (
    COMBINES,
    DISTILL_LOSSES,
    FUSIONS,
    GATED_COMBINES,
    REF,
    SCORES,
    SELECTIONS,
    TEACHER_TAILS,
    TEACHERS,
    Combine,
    DistillLoss,
    Fusion,
    FusionCollator,
    Selection,
    TeacherTail,
    check_candidate_name,
    check_choice,
    fusion_loss,
    validate_packed,
)
from .stages.pack import PlannedBlocks, load_packed

__all__ = [
    "DEEPSPEED_CONFIGS",
    "FusionConfig",
    "FusionTrainer",
    "add_train_parser",
    "deepspeed_config_path",
    "run_train",
]

logger = logging.getLogger(__name__)

#: Names of the shipped DeepSpeed configurations (``fusellm/configs/{name}.json``).
DEEPSPEED_CONFIGS = ("zero2", "zero2_offload", "zero3", "zero3_offload")


def deepspeed_config_path(name: str) -> str:
    """Path of a shipped DeepSpeed configuration (one of :data:`DEEPSPEED_CONFIGS`)."""
    check_choice("deepspeed config", name, DEEPSPEED_CONFIGS)
    return str(resources.files("fusellm").joinpath("configs").joinpath(f"{name}.json"))


@dataclass
class FusionConfig(TrainingArguments):
    """Training arguments for FuseLLM fusion (spec sections 1 and 7).

    The fusion fields come first; every :class:`transformers.TrainingArguments` field applies. The
    defaults that differ from the Trainer's: ``remove_unused_columns=False`` (the teacher columns
    are not model inputs), ``logging_steps=1`` and ``report_to="tensorboard"``.
    """

    sources: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Names of the source (blend) candidates, in order: the packed data must hold "
            "{name}_ids, {name}_logits and {name}_metric_ce* columns for each, and no other "
            "candidate. Any number, including none (self-distillation on the ref rows)."
        },
    )
    ignore_sources: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Source candidates present in the packed data that this run leaves out "
            "(e.g. a single-source distillation baseline on data packed with every source)."
        },
    )
    with_ref: bool = field(
        default=True,
        metadata={
            "help": "Whether the target's own top-K ('ref') is a fusion candidate. Ref rows, "
            "when present in the data, replace empty source rows either way."
        },
    )
    fusion: Fusion = field(
        default="mince",
        metadata={
            "help": "How candidates are fused per block: 'mince' takes the candidate with the "
            "lowest score (ties go to ref), 'avgce' weights them by softmax(exp(-score))."
        },
    )
    combine: Combine = field(
        default="hard",
        metadata={
            "help": "How the CLM and fusion terms combine: 'hard' = lm_loss_weight * CLM + "
            "(1 - lm_loss_weight) * fusion; 'hard_and_decay' raises the CLM weight linearly to 1 "
            "over training; 'soft' = (1 - s_max) * CLM + s_max * fusion with s_max = "
            "exp(-best score) per block; 'advantage' = (1 - a) * fusion + a * CLM per block with "
            "a = exp(-student CE) / exp(-best score) (capped at 1): the fusion weight is the best "
            "candidate's likelihood advantage over the student as it is now (0 where the student "
            "is already better); 'gated' = the 'hard' mix in the blocks where the fused "
            "calibrated rows give the true next tokens more probability than the student does "
            "now (both on the rows' ids plus the tail bin), CLM alone elsewhere; 'decoupled' = "
            "the same gate on the true token's part of the rows only: a closed block trains "
            "with CLM plus (1 - lm_loss_weight) times the rows' distribution over the other "
            "tokens (each side renormalised without the true token; decoupled KD)."
        },
    )
    distill_loss: DistillLoss = field(
        default="ce",
        metadata={
            "help": "Fusion term: cross-entropy against the fused target ('ce') or KL divergence "
            "('kl'; the same gradient, the value excludes the target's entropy)."
        },
    )
    teacher: str | None = field(
        default=None,
        metadata={
            "choices": list(TEACHERS),
            "help": "How a teacher row becomes a target: 'calibrated' keeps the row's true "
            "probability mass (rows of log-probabilities, from `fusellm extract --values "
            "logprobs`) and adds one bin for every other token, so a teacher that is unsure is "
            "taught as unsure; 'renormalized' is the reference's softmax over the K kept entries, "
            "which teaches a row as if it held all the mass. Default: calibrated, or "
            "renormalized with compat=fusellm.",
        },
    )
    with_student: bool = field(
        default=False,
        metadata={
            "help": "MinCE only: the student competes with the selected candidate, judged as "
            "the candidates are (its CE on the block, or its probability of the next token with "
            "selection=token). Where the student already predicts better, the position is "
            "trained by the CLM term alone: a teacher is used only where it knows more than the "
            "student does now."
        },
    )
    teacher_tail: TeacherTail = field(
        default="label",
        metadata={
            "help": "Calibrated teacher: where the teacher's mass outside its row goes. 'label': "
            "where the next token is outside the row, onto that token (the data names which "
            "of the tokens the teacher did not list occurred); 'bin': one 'every other token' "
            "bin against the student's mass outside the row. No effect on renormalized rows."
        },
    )
    selection: Selection = field(
        default="block",
        metadata={
            "help": "Where candidates are compared: 'block' (the paper: one candidate per block "
            "by its block score) or 'token' (per position, by each row's probability of the "
            "next target token; rows that are alignment fallbacks do not compete)."
        },
    )
    lm_loss_weight: float = field(
        default=0.9,
        metadata={"help": "Weight λ of the CLM term (the fusion term gets 1 - λ); paper: 0.9."},
    )
    teacher_temperature: float = field(
        default=1.0,
        metadata={"help": "Temperature T of the teacher rows: P = softmax(logits / T)."},
    )
    score: str | None = field(
        default=None,
        metadata={
            "choices": list(SCORES),
            "help": "Block score that ranks candidates: 'ce' (mean next-token cross-entropy, the "
            "reference's; penalises coarser tokenizers) or 'ce_per_byte' (nats per byte of text, "
            "comparable across tokenizers). Default: ce_per_byte, or ce with compat=fusellm.",
        },
    )
    compat: str | None = field(
        default=None,
        metadata={
            "choices": ["fusellm"],
            "help": "'fusellm' reproduces the reference training choices (per-token CE score, "
            "renormalized rows, bfloat16 teacher probabilities and rewards: MinCE ties within "
            "one bfloat16 step go to ref); unset: fusellm's defaults.",
        },
    )
    validate_data: bool = field(
        default=True,
        metadata={
            "help": "Scan the whole packed dataset before the first step (id ranges against the "
            "model's vocabulary, lengths, NaN logits and scores). Costs one read of the data; the "
            "candidate columns are always checked."
        },
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={
            "help": "Attention kernel when fusellm loads the model: default flash_attention_2 on a "
            "GPU when flash_attn is importable, else sdpa."
        },
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Must stay False: the teacher columns are not model inputs."},
    )
    logging_steps: float = field(
        default=1,
        metadata={"help": "Log every N update steps (float < 1: a ratio of the total steps)."},
    )
    # HfArgumentParser needs this order (it tests isinstance(None, second member)).
    report_to: None | str | list[str] = field(  # noqa: RUF036
        default="tensorboard",
        metadata={"help": "Integrations to report to ('tensorboard', 'none', 'all', ...)."},
    )

    def __post_init__(self) -> None:
        check_choice("fusion", self.fusion, FUSIONS)
        check_choice("combine", self.combine, COMBINES)
        check_choice("distill_loss", self.distill_loss, DISTILL_LOSSES)
        check_choice("compat", self.compat, (None, "fusellm"))
        if self.score is None:
            self.score = "ce" if self.compat == "fusellm" else "ce_per_byte"
        check_choice("score", self.score, SCORES)
        if self.teacher is None:
            self.teacher = "renormalized" if self.compat == "fusellm" else "calibrated"
        check_choice("teacher", self.teacher, TEACHERS)
        check_choice("selection", self.selection, SELECTIONS)
        check_choice("teacher_tail", self.teacher_tail, TEACHER_TAILS)
        if self.teacher != "calibrated" and self.combine in GATED_COMBINES:
            raise InputError(
                f"combine={self.combine!r} needs teacher='calibrated' (rows of log-probabilities "
                f"with their tail), got teacher={self.teacher!r}"
            )
        if self.with_student and self.fusion != "mince":
            raise InputError("with_student works with fusion='mince'")
        if self.compat == "fusellm" and (self.teacher, self.selection) != ("renormalized", "block"):
            raise InputError(
                "compat='fusellm' reproduces the reference: teacher='renormalized' and "
                f"selection='block', got {self.teacher!r} and {self.selection!r}"
            )
        if not 0.0 <= self.lm_loss_weight <= 1.0:
            raise InputError(f"lm_loss_weight must be in [0, 1], got {self.lm_loss_weight}")
        lr = self.learning_rate
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (0 <= lr < math.inf):
            raise InputError(f"learning_rate must be a finite number >= 0, got {lr!r}")
        if not (self.teacher_temperature > 0 and math.isfinite(self.teacher_temperature)):
            raise InputError(f"teacher_temperature must be > 0, got {self.teacher_temperature}")
        if isinstance(self.sources, str):
            self.sources = [self.sources]
        if isinstance(self.ignore_sources, str):
            self.ignore_sources = [self.ignore_sources]
        self.sources = [check_candidate_name(s) for s in self.sources]
        self.ignore_sources = [check_candidate_name(s) for s in self.ignore_sources]
        both = sorted(set(self.sources) & set(self.ignore_sources))
        if both:
            raise InputError(f"sources {both} are also in ignore_sources")
        if len(set(self.sources)) != len(self.sources):
            raise InputError(f"sources has duplicates: {self.sources}")
        if REF in self.sources:
            raise InputError(f"{REF!r} is the target's own candidate: use with_ref, not sources")
        if not self.with_ref and not self.sources:
            raise InputError("no fusion candidate: with_ref is False and sources is empty")
        if self.remove_unused_columns:
            raise InputError("remove_unused_columns must be False: it would drop the teacher rows")
        if isinstance(self.deepspeed, str) and self.deepspeed in DEEPSPEED_CONFIGS:
            self.deepspeed = deepspeed_config_path(self.deepspeed)
        if self.deepspeed:
            check_launcher()
        super().__post_init__()

    @property
    def candidates(self) -> list[str]:
        """The fusion candidates, ref first."""
        return ([REF] if self.with_ref else []) + list(self.sources)


#: What DeepSpeed reads to join the process group without MPI.
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def check_launcher() -> None:
    """Fail early, with the fix, where DeepSpeed would fail at the first step looking for MPI.

    DeepSpeed joins its process group from the launcher's variables (``deepspeed``,
    ``torchrun`` and ``accelerate launch`` set them); without them it falls back to MPI
    discovery, which needs ``mpi4py``.
    """
    if all(v in os.environ for v in LAUNCHER_ENV):
        return
    if importlib.util.find_spec("mpi4py") is not None:
        return
    if any(v in os.environ for v in ("AZUREML_EXPERIMENT_ID", "SM_TRAINING_ENV")):
        return  # DeepSpeed has its own discovery there
    missing = [v for v in LAUNCHER_ENV if v not in os.environ]
    raise InputError(
        "DeepSpeed needs a launcher: run under `deepspeed`, `torchrun` or `accelerate launch` "
        "(for one process: `torchrun --nproc_per_node 1 ...`), or set "
        f"{', '.join(LAUNCHER_ENV)}; missing {missing} and mpi4py is not installed"
    )


def logits_width(model: Any) -> int | None:
    """The width of a causal LM's logits (its output embedding rows), or None if unknown."""
    try:
        out = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        out = None
    width = getattr(out, "out_features", None)
    if width is None:
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "get_text_config"):
            config = config.get_text_config()
        width = getattr(config, "vocab_size", None)
    return int(width) if width is not None else None


class FusionTrainer(Trainer):
    """A :class:`transformers.Trainer` that trains with the FuseLLM loss.

    ``args`` must be a :class:`FusionConfig`. ``data_collator`` defaults to a
    :class:`~fusellm.fuse.FusionCollator` built from it; a ``datasets.Dataset`` is checked
    against the configuration (and, with ``validate_data``, scanned in full) before training.
    """

    def __init__(
        self,
        model: Any = None,
        args: FusionConfig | None = None,
        data_collator: FusionCollator | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(args, FusionConfig):
            raise InputTypeError(f"args must be a FusionConfig, got {type(args).__name__}")
        width = logits_width(model) if model is not None else None
        ref_rows = args.with_ref
        for ds in _datasets(train_dataset, eval_dataset):
            stack = validate_packed(
                ds,
                sources=args.sources,
                ignore=args.ignore_sources,
                with_ref=args.with_ref,
                score=args.score,  # type: ignore[arg-type]
                vocab_size=width,
                full=args.validate_data,
                teacher=args.teacher,  # type: ignore[arg-type]
            )
            ref_rows = ref_rows or REF in stack
        domains = _domains(train_dataset, eval_dataset)
        if data_collator is None:
            data_collator = FusionCollator(
                args.sources,
                with_ref=args.with_ref,
                ref_rows=ref_rows,
                score=args.score,  # type: ignore[arg-type]
                vocab_size=width,
                teacher=args.teacher,  # type: ignore[arg-type]
                domains=domains,
            )
        elif not isinstance(data_collator, FusionCollator):
            raise InputTypeError(
                f"data_collator must be a FusionCollator, got {type(data_collator).__name__}"
            )
        elif (
            tuple(data_collator.sources) != tuple(args.sources)
            or data_collator.with_ref != args.with_ref
            or data_collator.score != args.score
            or data_collator.teacher != args.teacher
        ):
            raise InputError(
                "data_collator's sources / with_ref / score / teacher differ from args"
            )
        train_dataset = _numpy_format(train_dataset)
        eval_dataset = _numpy_format(eval_dataset)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            **kwargs,
        )
        self.fusion_collator: FusionCollator = data_collator
        self._metric_sums: dict[str, torch.Tensor] = {}
        self._metric_counts: dict[str, torch.Tensor] = {}
        self._optim_state: dict[str, float] = {}

    # -- batches ---------------------------------------------------------------------------------

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> Any:
        """Also count the fusion positions of the whole accumulation window (all ranks)."""
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if num_items is not None and batches:
            total = sum(b["attention_mask"].sum() for b in batches)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                total = self.accelerator.gather(total.to(device)).sum()
            for b in batches:
                b["num_fuse_items"] = total
        return batches, num_items

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        # The Trainer casts float inputs to DeepSpeed's dtype (bf16): keep the teacher in float32.
        keep = {
            k: inputs[k] for k in ("teacher_logits", "teacher_scores", "block_bytes") if k in inputs
        }
        out = super()._prepare_inputs({k: v for k, v in inputs.items() if k not in keep})
        for k, v in keep.items():
            out[k] = v.to(self.args.device)
        return out

    # -- loss ------------------------------------------------------------------------------------

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        t_ids = inputs.pop("teacher_ids")
        t_logits = inputs.pop("teacher_logits")
        t_scores = inputs.pop("teacher_scores")
        t_matched = inputs.pop("teacher_matched", None)
        block_domain = inputs.pop("block_domain", None)
        block_bytes = inputs.pop("block_bytes", None)
        fuse_items = inputs.pop("num_fuse_items", None)
        outputs = model(**inputs, use_cache=False)
        clm_den = fuse_den = None
        scale = 1
        if num_items_in_batch is not None and fuse_items is not None:
            clm_den, fuse_den = num_items_in_batch, fuse_items
            if self.args.average_tokens_across_devices:
                scale = self.accelerator.num_processes // max(1, self.get_tp_size())
        max_steps = self.state.max_steps or 0
        progress = self.state.global_step / max_steps if max_steps > 0 else 0.0
        args: FusionConfig = self.args  # type: ignore[assignment]
        col = self.fusion_collator
        out = fusion_loss(
            outputs.logits,
            labels,
            inputs["attention_mask"],
            t_ids,
            t_logits,
            t_scores,
            fusion=args.fusion,
            combine=args.combine,
            distill_loss=args.distill_loss,
            teacher=args.teacher,  # type: ignore[arg-type]
            selection=args.selection,
            teacher_tail=args.teacher_tail,  # type: ignore[arg-type]
            lm_loss_weight=args.lm_loss_weight,
            temperature=args.teacher_temperature,
            progress=progress,
            ref_index=col.ref_index,
            candidate_mask=col.candidate_mask,
            teacher_matched=t_matched,
            with_student=args.with_student,
            block_bytes=block_bytes if args.score == "ce_per_byte" else None,
            compat=args.compat,
            clm_denominator=clm_den,
            fusion_denominator=fuse_den,
        )
        loss = out.loss * scale if scale != 1 else out.loss
        if model.training:
            self._record(out, block_domain)
        return (loss, outputs) if return_outputs else loss

    # -- logging ---------------------------------------------------------------------------------

    def _add(self, key: str, total: torch.Tensor, count: torch.Tensor | float = 1.0) -> None:
        total = total.detach().float()
        count = torch.as_tensor(count, dtype=torch.float32, device=total.device)
        if key in self._metric_sums:
            self._metric_sums[key] = self._metric_sums[key] + total
            self._metric_counts[key] = self._metric_counts[key] + count
        else:
            self._metric_sums[key], self._metric_counts[key] = total, count

    def _record(self, out: Any, block_domain: torch.Tensor | None) -> None:
        """Per step: the loss terms and each candidate's share, overall and per block domain
        (``fusion/select_<candidate>/<domain>``); means over the logging interval."""
        col = self.fusion_collator
        kind = "select" if self.args.fusion == "mince" else "weight"  # type: ignore[attr-defined]
        w = out.candidate_weights  # [B, C]
        for k, v in (("clm_loss", out.clm_loss), ("fusion_loss", out.fusion_loss)):
            self._add(k, v)
        self._add("lm_weight", out.lm_weight.mean())
        if block_domain is not None:
            for d, domain in enumerate(col.domains):
                in_d = block_domain.to(out.lm_weight.device) == d
                self._add(f"lm_weight/{domain}", out.lm_weight[in_d].sum(), in_d.sum())
        shares = [(n, w[:, j]) for j, n in enumerate(col.stack) if col.candidate_mask[j]]
        if self.args.with_student:  # type: ignore[attr-defined]
            shares.append(("student", out.student_share))
        for name, share in shares:
            self._add(f"fusion/{kind}_{name}", share.mean())
            if block_domain is None:
                continue
            for d, domain in enumerate(col.domains):
                in_d = block_domain.to(share.device) == d
                self._add(f"fusion/{kind}_{name}/{domain}", share[in_d].sum(), in_d.sum())
        opt = self.optimizer
        if opt is not None and getattr(opt, "param_groups", None):
            pg = opt.param_groups[0]
            self._optim_state = {"optimizer/lr": float(pg.get("lr", float("nan")))}
            betas = pg.get("betas")
            if betas is not None:
                self._optim_state["optimizer/beta1"] = float(betas[0])
                self._optim_state["optimizer/beta2"] = float(betas[1])

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._metric_sums:
            names = sorted(self._metric_sums)
            sums = torch.stack([self._metric_sums[k] for k in names])
            counts = torch.stack([self._metric_counts[k] for k in names])
            if self.args.world_size > 1:
                sums = self.accelerator.reduce(sums, reduction="sum")
                counts = self.accelerator.reduce(counts, reduction="sum")
            means = {
                k: s / c for k, s, c in zip(names, sums.tolist(), counts.tolist(), strict=True) if c
            }
            logs = {**logs, **means, **self._optim_state}
            self._metric_sums = {}
            self._metric_counts = {}
        super().log(logs, start_time)


def _datasets(*items: Any) -> list[Any]:
    """The packed datasets among ``items`` (``datasets.Dataset``, :class:`PlannedBlocks`, or
    dicts of them)."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is in the train extra
        return []
    kinds = (datasets.Dataset, PlannedBlocks)
    out = []
    for x in items:
        if isinstance(x, kinds):
            out.append(x)
        elif isinstance(x, dict):
            out.extend(v for v in x.values() if isinstance(v, kinds))
    return out


def _domains(*items: Any) -> list[str]:
    """The sorted values of the ``domain`` column of the datasets that have one."""
    found: set[str] = set()
    for ds in _datasets(*items):
        if "domain" in ds.column_names:
            found.update(str(v) for v in ds.unique("domain"))
    return sorted(found)


def _numpy_format(ds: Any) -> Any:
    try:
        import datasets
    except ImportError:  # pragma: no cover
        return ds
    if isinstance(ds, datasets.Dataset) and ds.format["type"] is None:
        return ds.with_format("numpy")
    if isinstance(ds, dict):
        return {k: _numpy_format(v) for k, v in ds.items()}
    return ds


def _attn_implementation(config: FusionConfig) -> str:
    if config.attn_implementation:
        return config.attn_implementation
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def run_train(
    config: FusionConfig,
    data: Any,
    model: Any,
    *,
    tokenizer: Any = None,
    callbacks: Sequence[Any] | None = None,
    print_logs: bool = True,
) -> FusionTrainer:
    """Train ``model`` on a packed dataset with the fusion loss, then save it to ``output_dir``.

    Args:
        config: the training configuration.
        data: a packed dataset directory (``datasets.save_to_disk``), or a ``datasets.Dataset``.
        model: a model directory / hub id (loaded with ``AutoModelForCausalLM``: float32, or
            bfloat16 under DeepSpeed with ``bf16``; flash-attention 2 when importable on a GPU,
            else sdpa), or a model instance.
        tokenizer: saved with the checkpoints; by default loaded from the model directory when
            it has one.
        callbacks: extra Trainer callbacks.
        print_logs: print every log entry to the console (the Trainer's default); ``False``
            keeps the progress bar and leaves the logs to ``log_history`` and the callbacks.

    ``config.resume_from_checkpoint``: a checkpoint directory, or ``"last"`` for the newest
    checkpoint in ``output_dir`` (a fresh start when there is none).

    Returns:
        The trainer after training (``trainer.state.log_history`` holds the logs).
    """
    if not isinstance(config, FusionConfig):
        raise InputTypeError(f"config must be a FusionConfig, got {type(config).__name__}")
    dataset = load_packed(data)
    if isinstance(model, (str, Path)):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dtype = torch.bfloat16 if (config.deepspeed and config.bf16) else torch.float32
        name = str(model)
        if tokenizer is None:
            try:
                tokenizer = AutoTokenizer.from_pretrained(name)
            except (OSError, ValueError, TypeError, KeyError):
                tokenizer = None
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype=dtype, attn_implementation=_attn_implementation(config)
        )
    if (
        not hasattr(config, "activation_checkpointing")  # transformers before the rename
        and config.gradient_checkpointing
        and config.gradient_checkpointing_kwargs is None
    ):
        config.gradient_checkpointing_kwargs = {"use_reentrant": False}
    trainer = FusionTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=list(callbacks) if callbacks else None,
    )
    if not print_logs:
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        class _QuietProgress(ProgressCallback):  # type: ignore[misc]
            def on_log(self, *args: Any, **kwargs: Any) -> None:
                return None

        if trainer.pop_callback(ProgressCallback) is not None:
            trainer.add_callback(_QuietProgress)
        trainer.pop_callback(PrinterCallback)
    resume: str | None = config.resume_from_checkpoint
    if resume == "last":
        from transformers.trainer_utils import get_last_checkpoint

        out_dir = Path(config.output_dir or ".")
        resume = get_last_checkpoint(str(out_dir)) if out_dir.is_dir() else None
        if resume is None:
            logger.info("no checkpoint in %s: starting from scratch", out_dir)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    return trainer


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def add_train_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``train`` command to an ``argparse`` subparsers object.

    Every :class:`FusionConfig` field is an option (``--fusion avgce``, ``--sources a b``, ...);
    ``--config FILE.yaml`` supplies any of them, options given on the command line win. The
    parser's ``func`` default runs the command: ``args.func(args)`` returns an exit status.
    """
    fields_parser = HfArgumentParser(FusionConfig, add_help=False)  # type: ignore[arg-type]
    for action in fields_parser._actions:
        # Only options given on the command line reach the namespace (YAML fills the rest).
        action.default = argparse.SUPPRESS
        action.required = False
    p = subparsers.add_parser(
        "train",
        parents=[fields_parser],
        help="train the target model on a packed dataset with the fusion loss",
        description="Continual training with the FuseLLM loss (see docs/training.md). Launch "
        "with `deepspeed` or `torchrun` for several GPUs.",
    )
    p.add_argument("data", help="packed dataset directory (datasets.save_to_disk)")
    p.add_argument("--model", required=True, help="target model directory or hub id")
    p.add_argument("--config", help="YAML file of FusionConfig fields (command line wins)")
    p.set_defaults(func=_cli_train)
    return p


def config_from_args(args: argparse.Namespace) -> FusionConfig:
    """The :class:`FusionConfig` of a parsed ``train`` command line (YAML, then options)."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        import yaml

        path = Path(args.config)
        if not path.is_file():
            raise InputError(f"config file {str(path)!r} does not exist")
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise InputError(f"{path}: expected a mapping of FusionConfig fields")
        values.update(loaded)
    names = {f.name for f in fields(FusionConfig) if f.init}
    unknown = sorted(set(values) - names)
    if unknown:
        raise InputError(f"unknown FusionConfig field(s) in {args.config}: {unknown}")
    values.update({k: v for k, v in vars(args).items() if k in names})
    (config,) = HfArgumentParser(FusionConfig).parse_dict(values)  # type: ignore[arg-type]
    return config


def _cli_train(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    trainer = run_train(config, args.data, args.model)
    if trainer.is_world_process_zero():
        last = trainer.state.log_history[-1] if trainer.state.log_history else {}
        print(json.dumps({"output_dir": config.output_dir, **last}, default=str), flush=True)
    # Tear the process group down before interpreter shutdown, not during it.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        trainer.accelerator.wait_for_everyone()
        torch.distributed.destroy_process_group()
    return 0
