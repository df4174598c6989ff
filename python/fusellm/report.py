"""The Markdown report of a pipeline run: what was aligned, how training went, what it gained.

:func:`write_report` reads a pipeline work directory (the layout the orchestrator writes) and
writes ``report.md`` plus PNG plots into ``<workdir>/report`` (or ``output_dir``)::

    <workdir>/config.yaml                  the resolved run config
    <workdir>/vocab_map/<source>.json      vocabulary maps, <source>.json.meta.json: statistics
    <workdir>/align/align_stats.json       per-source alignment counters
    <workdir>/train/<run>/trainer_state.json   HF Trainer state per run ("fused", "clm",
                                           "fused-seed1", "clm-seed1", ...)
    <workdir>/evaluate/perplexity.json     the stages.evaluate.run_evaluate output
    <workdir>/evaluate/benchmarks/benchmarks.json  the stages.benchmark.run_benchmarks summary
    <workdir>/timings.json                 {"stages": {stage: seconds}} (optional)

Sections: run summary (stages present, key settings of the config, the headline fused-vs-CLM
result), vocabulary-map statistics per source, alignment statistics per source (the share of
base positions that receive a source distribution, exact-span and fallback rates, empty and
masked rows, top-K entries dropped as unknown or unmapped ids), each candidate's MinCE selection
share or AvgCE weight over training (a line plot per fused run), loss curves (total, CLM, fusion;
fused runs against the CLM-only control), the held-out perplexity and bits per byte per model and
domain with the fused-minus-CLM difference per domain and, when several seeds were trained, the
mean and the sample standard deviation across seeds, the benchmark tasks (lm-evaluation-harness)
with models as rows and tasks as columns as in the FuseLLM model card, the fused model's gain
over the control per task (mean ± sd across seeds, paired by seed), and the stage timings.

Choices and trade-offs:

- A missing piece (a stage that did not run) gives the line "not available (stage not run)"
  in its section, never an error: a report of a partial run is useful. A file that exists but is
  not valid JSON / YAML, or lacks the structure above, raises :class:`~fusellm.errors.InputError`
  naming the file: a silently empty section would hide a broken run.
- A candidate's share over training is the mean of the logged values weighted by the optimizer
  steps each log covers (the Trainer logs a mean over its logging interval), so a short last
  interval does not count as much as a full one.
- Seeds are recognised from the model labels and run names ``fused``, ``fused-seed1``, ...
  (``clm`` likewise); differences are paired by seed where both runs exist.
- Plots use matplotlib's object-oriented API on an Agg canvas (no ``pyplot``, no global backend
  switch), imported inside the function; every file (PNGs, then ``report.md``) is written
  atomically, so a reader never sees a torn report.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError, InputTypeError
from .io import read_json_object

__all__ = ["NOT_AVAILABLE", "add_report_parser", "write_report"]

#: What a section says when its stage has not run.
NOT_AVAILABLE = "not available (stage not run)"
#: Most configuration entries listed in the run summary.
_MAX_CONFIG_ROWS = 80
_MAX_VALUE_CHARS = 120
#: A training run's label: its kind (``fused``, ``clm``, ``kd-<source>``, ``fused-lmw<λ>``), then
#: an optional ``-seed<N>``.
_RUN_LABEL = re.compile(r"^(fused|clm|kd-.+?|fused-lmw[0-9.]+)(?:-seed(\d+))?$")
_CONTROL = "clm"
_SELECT = "fusion/select_"
_WEIGHT = "fusion/weight_"


# --- reading -------------------------------------------------------------------------------------


def _read_yaml(path: Path) -> dict[str, Any] | None:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {path}: {e}") from e
    import yaml

    try:
        obj = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InputError(f"{path} is not valid YAML: {e}") from e
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise InputError(f"{path} does not hold a mapping (got {type(obj).__name__})")
    return obj


def _number(value: Any, path: Path, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{path}: {what} must be a number, got {value!r}")
    return float(value)


@dataclass
class _Run:
    name: str
    path: Path
    state: dict[str, Any]
    logs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def fused(self) -> bool:
        if self.name.lower().startswith("fused"):
            return True
        if self.name.lower().startswith("clm"):
            return False
        return any(k.startswith((_SELECT, _WEIGHT)) for e in self.logs for k in e)


@dataclass
class _Workdir:
    root: Path
    config: dict[str, Any] | None
    vocab_maps: dict[str, dict[str, Any] | None] | None
    align: dict[str, Any] | None
    runs: list[_Run]
    perplexity: dict[str, Any] | None
    timings: dict[str, Any] | None
    files: dict[str, bool]
    benchmarks: dict[str, Any] | None = None


def _read_benchmarks(path: Path) -> dict[str, Any] | None:
    """The benchmark summary (:func:`fusellm.stages.benchmark.run_benchmarks`), checked."""
    obj = read_json_object(path)
    if obj is None:
        return None
    models = obj.get("models")
    if not isinstance(models, dict) or not isinstance(obj.get("tasks", []), list):
        raise InputError(f"{path} has no 'models' object")
    for label, entry in models.items():
        tasks = entry.get("tasks") if isinstance(entry, dict) else None
        if not isinstance(tasks, dict) or not all(isinstance(t, dict) for t in tasks.values()):
            raise InputError(f"{path}: models[{label!r}] has no 'tasks' object")
        for name, t in tasks.items():
            if not isinstance(t.get("metric"), str):
                raise InputError(f"{path}: models[{label!r}].tasks[{name!r}] names no metric")
    return obj


def _collect(root: Path) -> _Workdir:
    config = _read_yaml(root / "config.yaml")

    vocab_maps: dict[str, dict[str, Any] | None] | None = None
    vdir = root / "vocab_map"
    if vdir.is_dir():
        vocab_maps = {}
        for f in sorted(vdir.glob("*.json")):
            if f.name.endswith(".meta.json") or f.name.startswith("."):
                continue
            meta = read_json_object(f.with_name(f.name + ".meta.json"))
            if meta is not None and not isinstance(meta.get("stats"), dict):
                raise InputError(f"{f.name}.meta.json in {vdir} has no 'stats' object")
            vocab_maps[f.name.removesuffix(".json")] = meta
        for f in sorted(vdir.glob("*.json.meta.json")):  # a sidecar whose map is missing
            name = f.name.removesuffix(".json.meta.json")
            if name not in vocab_maps and not f.name.startswith("."):
                meta = read_json_object(f)
                if meta is not None and not isinstance(meta.get("stats"), dict):
                    raise InputError(f"{f} has no 'stats' object")
                vocab_maps[name] = meta
        if not vocab_maps:
            vocab_maps = None

    align_path = root / "align" / "align_stats.json"
    align = read_json_object(align_path)
    if align is not None:
        if not isinstance(align.get("sources"), dict):
            raise InputError(f"{align_path} has no 'sources' object")
        for name, s in align["sources"].items():
            if not isinstance(s, dict):
                raise InputError(f"{align_path}: sources[{name!r}] is not an object")

    runs: list[_Run] = []
    tdir = root / "train"
    if tdir.is_dir():
        for sub in sorted(p for p in tdir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            path = sub / "trainer_state.json"
            state = read_json_object(path)
            if state is None:
                continue
            history = state.get("log_history", [])
            if not isinstance(history, list) or not all(isinstance(e, dict) for e in history):
                raise InputError(f"{path}: log_history must be a list of objects")
            logs = [e for e in history if "loss" in e and "step" in e]
            for e in logs:
                _number(e["step"], path, "log_history step")
            runs.append(_Run(sub.name, path, state, logs))

    ppl_path = root / "evaluate" / "perplexity.json"
    perplexity = read_json_object(ppl_path)
    if perplexity is not None:
        models = perplexity.get("models")
        if not isinstance(models, dict):
            raise InputError(f"{ppl_path} has no 'models' object")
        for label, entry in models.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("groups"), dict):
                raise InputError(f"{ppl_path}: models[{label!r}] has no 'groups' object")

    timings_path = root / "timings.json"
    timings = read_json_object(timings_path)
    if timings is not None:
        stages = timings.get("stages")
        if not isinstance(stages, dict):
            raise InputError(f"{timings_path} has no 'stages' object")
        for stage, seconds in stages.items():
            _number(seconds, timings_path, f"stages[{stage!r}]")

    files = {
        "config": config is not None,
        "vocab_map": vocab_maps is not None,
        "align": align is not None,
        "train": bool(runs),
        "evaluate": perplexity is not None,
        "timings": timings is not None,
    }
    benchmarks = _read_benchmarks(root / "evaluate" / "benchmarks" / "benchmarks.json")
    return _Workdir(
        root, config, vocab_maps, align, runs, perplexity, timings, files, benchmarks=benchmarks
    )


# --- formatting ----------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    text = str(value).replace("\n", " ")
    if len(text) > _MAX_VALUE_CHARS:
        text = text[: _MAX_VALUE_CHARS - 1] + "…"
    return text.replace("|", "\\|")


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], numeric_from: int = 1) -> str:
    align = ["---" if i < numeric_from else "---:" for i in range(len(headers))]
    lines = ["| " + " | ".join(_cell(h) for h in headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _f(x: Any, digits: int = 3, signed: bool = False) -> str:
    if not _finite(x):
        return "–"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def _g(x: Any) -> str:
    return f"{x:.3g}" if _finite(x) else "–"


def _int(x: Any) -> str:
    return f"{int(x):,}" if _finite(x) else "–"


def _pct(num: Any, den: Any) -> str:
    if not (_finite(num) and _finite(den)) or den == 0:
        return "–"
    share = 100.0 * num / den
    if 0 < abs(share) < 0.05:
        return "<0.1%" if share > 0 else "-<0.1%"
    return f"{share:.1f}%"


def _count_pct(num: Any, den: Any) -> str:
    if not _finite(num):
        return "–"
    share = _pct(num, den)
    return f"{_int(num)} ({share})" if share != "–" else _int(num)


def _flatten(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    if isinstance(obj, Mapping):
        if not obj and prefix:
            out.append((prefix, "{}"))
        for k, v in obj.items():
            out += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, list) and any(isinstance(v, (Mapping, list)) for v in obj):
        for i, v in enumerate(obj):
            out += _flatten(v, f"{prefix}[{i}]")
    elif isinstance(obj, list):
        out.append((prefix, ", ".join(str(v) for v in obj) if obj else "[]"))
    else:
        out.append((prefix, "null" if obj is None else obj))
    return out


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    mean = math.fsum(values) / len(values)
    if len(values) < 2:
        return mean, None
    var = math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var)


def _pm(values: Sequence[float], digits: int, signed: bool = False) -> str:
    if not values:
        return "–"
    mean, std = _mean_std(values)
    text = _f(mean, digits, signed)
    return f"{text} ± {_f(std, digits)}" if std is not None else text


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "run"


# --- series --------------------------------------------------------------------------------------


def _series(run: _Run, key: str) -> tuple[list[float], list[float]]:
    steps, values = [], []
    for e in run.logs:
        v = e.get(key)
        if _finite(v):
            steps.append(float(e["step"]))
            values.append(float(v))
    return steps, values


def _clm_key(run: _Run) -> str:
    """The CLM loss of a run: ``clm_loss``, or for a control without it, its total loss."""
    return "clm_loss" if run.fused or _series(run, "clm_loss")[0] else "loss"


def _last(run: _Run, key: str) -> float | None:
    values = _series(run, key)[1]
    return values[-1] if values else None


def _candidates(run: _Run) -> tuple[str, list[str]]:
    """("select" | "weight", candidate names, ref first then by first appearance)."""
    names: dict[str, None] = {}
    kind = ""
    for e in run.logs:
        for k in e:
            for prefix, what in ((_SELECT, "select"), (_WEIGHT, "weight")):
                if k.startswith(prefix) and "/" not in k[len(prefix) :]:
                    kind = kind or what
                    names.setdefault(k[len(prefix) :], None)
    ordered = sorted(names, key=lambda n: n != "ref")
    return kind, ordered


def _logged_domains(run: _Run, prefix: str) -> list[str]:
    """The domains of the per-domain candidate shares a run logged (``<prefix><name>/<d>``)."""
    found: dict[str, None] = {}
    for e in run.logs:
        for k in e:
            if k.startswith(prefix) and "/" in k[len(prefix) :]:
                found.setdefault(k.rsplit("/", 1)[1], None)
    return sorted(found)


def _step_weighted_mean(steps: list[float], values: list[float]) -> float:
    """Mean over training steps: each log covers the steps since the previous log."""
    weights = []
    prev = 0.0
    for s in steps:
        weights.append(s - prev)
        prev = s
    if any(w <= 0 for w in weights):  # unordered or repeated steps: plain mean
        weights = [1.0] * len(values)
    return math.fsum(w * v for w, v in zip(weights, values, strict=True)) / math.fsum(weights)


# --- plots ---------------------------------------------------------------------------------------


def _figure(ncols: int = 1) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0 * ncols, 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _moving_average(values: Sequence[float], window: int) -> list[float]:
    """The mean of each value and the ``window - 1`` before it (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _selection_plot(run: _Run, kind: str, names: list[str]) -> bytes:
    fig, (ax,) = _figure()
    prefix = _SELECT if kind == "select" else _WEIGHT
    for i, name in enumerate(names):
        steps, values = _series(run, prefix + name)
        if steps:
            window = max(1, len(values) // 10)
            color = f"C{i % 10}"
            ax.plot(steps, values, color=color, alpha=0.3, linewidth=0.8)
            ax.plot(steps, _moving_average(values, window), color=color, label=f"{name}")
    ax.set_xlabel("step")
    ax.set_ylabel("selection share (MinCE)" if kind == "select" else "mean weight (AvgCE)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{run.name}: fusion candidates (faint: per log; bold: moving average)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return _png(fig)


def _loss_plot(runs: list[_Run]) -> bytes | None:
    panels = [("total loss", "loss"), ("CLM loss", "clm_loss"), ("fusion loss", "fusion_loss")]
    fig, axes = _figure(len(panels))
    drawn = False
    for ax, (title, key) in zip(axes, panels, strict=True):
        lines = 0
        for i, run in enumerate(runs):
            k = _clm_key(run) if key == "clm_loss" else key
            steps, values = _series(run, k)
            if steps:
                style = "-" if run.fused else "--"
                label = run.name if run.fused else f"{run.name} (control)"
                ax.plot(steps, values, style, color=f"C{i % 10}", label=label)
                lines += 1
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if lines:
            ax.legend(loc="best", fontsize="small")
            drawn = True
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    return _png(fig) if drawn else None


# --- sections ------------------------------------------------------------------------------------


def _summary(wd: _Workdir, headline: str | None) -> list[str]:
    out = ["## Run summary", "", f"Work directory: `{wd.root}`", ""]
    stages = [
        ("config", "config.yaml"),
        ("vocab_map", "vocab_map/"),
        ("align", "align/align_stats.json"),
        ("train", "train/*/trainer_state.json"),
        ("evaluate", "evaluate/perplexity.json"),
        ("timings", "timings.json"),
    ]
    rows = [
        [name, f"`{path}`", "present" if wd.files[name] else NOT_AVAILABLE] for name, path in stages
    ]
    out += [_table(["stage", "file", "status"], rows, numeric_from=99), ""]
    if headline:
        out += [headline, ""]
    out += ["### Settings", ""]
    if wd.config is None:
        out += [NOT_AVAILABLE, ""]
    else:
        items = _flatten(wd.config)
        if not items:
            out += ["The configuration is empty.", ""]
        else:
            shown = items[:_MAX_CONFIG_ROWS]
            out += [_table(["setting", "value"], shown, numeric_from=99), ""]
            if len(items) > len(shown):
                out += [f"… and {len(items) - len(shown)} more in `config.yaml`.", ""]
    return out


def _vocab_section(wd: _Workdir) -> list[str]:
    out = ["## Vocabulary maps", ""]
    if wd.vocab_maps is None:
        return [*out, NOT_AVAILABLE, ""]
    rows = []
    for source, meta in wd.vocab_maps.items():
        if meta is None:
            rows.append([source, "no statistics (no .meta.json sidecar)", *["–"] * 6])
            continue
        s = meta["stats"]
        n = s.get("blend_tokens")
        by = s.get("by_distance") or {}
        dist = ", ".join(f"{d}: {_int(c)}" for d, c in sorted(by.items(), key=lambda x: int(x[0])))
        rows.append(
            [
                source,
                meta.get("method", "–"),
                _int(n),
                _count_pct(s.get("exact"), n),
                _count_pct(s.get("surface"), n),
                _count_pct(s.get("mined"), n),
                dist or "–",
                _count_pct(s.get("unmapped"), n),
            ]
        )
    headers = [
        "source",
        "method",
        "blend tokens",
        "exact",
        "surface",
        "mined",
        "mined by edit distance",
        "unmapped",
    ]
    out += [_table(headers, rows, numeric_from=2), ""]
    out += [
        "Shares are of the source (blend) vocabulary: *exact* = the marker-swapped string is a "
        "target token, *surface* = same decoded bytes, *mined* = nearest target string by edit "
        "distance.",
        "",
    ]
    return out


def _align_section(wd: _Workdir) -> list[str]:
    out = ["## Alignment", ""]
    if wd.align is None:
        return [*out, NOT_AVAILABLE, ""]
    a = wd.align
    base = a.get("base_positions")
    out += [
        f"Method: `{a.get('method', '–')}`, vocabulary mode: `{a.get('vocab', '–')}`, "
        f"rows: {_int(a.get('rows'))}, target (base) positions: {_int(base)}.",
        "",
    ]
    rows = []
    for source, s in a["sources"].items():
        exact = s.get("exact_span")
        topk = s.get("topk_entries")
        rows.append(
            [
                source,
                _count_pct(s.get("matched"), base),
                _count_pct(exact, base) if exact is not None else "n/a",
                _count_pct(s.get("fallback"), base),
                _count_pct(s.get("empty"), base),
                _count_pct(s.get("masked"), base),
                _count_pct(s.get("unknown_ids"), topk),
                _count_pct(s.get("unmapped_ids"), topk),
                _int(topk),
            ]
        )
    headers = [
        "source",
        "matched (receives a distribution)",
        "exact span",
        "fallback",
        "empty",
        "masked",
        "unknown ids dropped",
        "unmapped ids dropped",
        "top-K entries",
    ]
    out += [_table(headers, rows), ""]
    out += [
        "Position shares are of the target positions; dropped ids are shares of the source top-K "
        "entries at matched positions (*unknown*: no token string, e.g. padded vocabularies; "
        "*unmapped*: no target token). *exact span* is n/a for MinED alignment.",
        "",
    ]
    return out


def _teacher_section(wd: _Workdir) -> list[str]:
    """Teacher quality per candidate and domain (``align_stats.json`` ``teachers``)."""
    out = ["### Teacher quality", ""]
    teachers = (wd.align or {}).get("teachers") or {}
    cands = teachers.get("candidates") or {}
    if not cands:
        return [*out, NOT_AVAILABLE, ""]
    if not isinstance(cands, dict) or not all(isinstance(v, dict) for v in cands.values()):
        raise InputError("align_stats.json: teachers.candidates must map names to objects")
    rows = []
    for name, per in cands.items():
        for domain, r in per.items():
            if not isinstance(r, dict):
                raise InputError(f"align_stats.json: teachers {name}/{domain} is not an object")
            src = name != "ref"
            rows.append(
                [
                    name,
                    domain,
                    _int(r.get("positions")),
                    _pct(r.get("matched_share"), 1) if src else "–",
                    _pct(r.get("top1"), 1),
                    _pct(r.get("ref_top1"), 1) if src else "–",
                    _pct(r.get("coverage"), 1),
                    _pct(r.get("ref_coverage"), 1) if src else "–",
                    _f(r.get("ce"), 3),
                    _f(r.get("ref_ce"), 3) if src else "–",
                    _pct(r.get("topk_mass"), 1) if "topk_mass" in r else "–",
                    _pct(r.get("dropped_mass"), 1) if "dropped_mass" in r else "–",
                ]
            )
    headers = [
        "candidate",
        "domain",
        "positions",
        "matched",
        "top-1",
        "ref top-1",
        "coverage",
        "ref coverage",
        "CE (nats)",
        "ref CE",
        "top-K mass",
        "mass sent to the tail",
    ]
    merged = {n: s.get("duplicate_ids") for n, s in (wd.align or {}).get("sources", {}).items()}
    return [
        *out,
        "Each candidate's aligned rows scored against the target's true next token: *top-1* "
        "(the row's first entry is it), *coverage* (it is among the row's ids) and the CE of it "
        "under the row (the row's tail spread evenly over the ids it does not list). A source "
        "is scored where its row is its own distribution (*matched*), the target's own rows "
        "(*ref*) on the same positions beside it. *top-K mass*: the share of probability the "
        "source's top-K holds; *mass sent to the tail*: the share whose token has no target "
        "token (unmapped).",
        "",
        _table(headers, rows, numeric_from=2),
        "",
        "Duplicate entries merged into one target id: "
        + ", ".join(f"{n}: {_int(v)}" for n, v in merged.items())
        + ".",
        "",
    ]


def _training_section(wd: _Workdir, plots: dict[str, bytes]) -> list[str]:
    out = ["## Training", ""]
    if not wd.runs:
        return [*out, NOT_AVAILABLE, ""]
    rows = []
    for run in wd.runs:
        steps, losses = _series(run, "loss")
        rows.append(
            [
                run.name,
                "fused" if run.fused else "control (CLM only)",
                _int(run.state.get("global_step", steps[-1] if steps else None)),
                _f(losses[0] if losses else None, 4),
                _f(_last(run, "loss"), 4),
                _f(_last(run, _clm_key(run)), 4),
                _f(_last(run, "fusion_loss"), 4),
                _g(_last(run, "optimizer/lr")),
            ]
        )
    headers = [
        "run",
        "kind",
        "steps",
        "first loss",
        "last loss",
        "last CLM loss",
        "last fusion loss",
        "last lr",
    ]
    out += [_table(headers, rows, numeric_from=2), ""]
    betas = []
    for run in wd.runs:
        b1, b2 = _last(run, "optimizer/beta1"), _last(run, "optimizer/beta2")
        if b1 is not None and b2 is not None:
            betas.append(f"{run.name}: ({b1:g}, {b2:g})")
    if betas:
        out += ["Effective Adam betas: " + "; ".join(betas) + ".", ""]

    out += ["### Fusion candidates", ""]
    fused = [r for r in wd.runs if r.fused]
    any_candidates = False
    for run in fused:
        kind, names = _candidates(run)
        if not names:
            continue
        any_candidates = True
        what = "selection share (MinCE)" if kind == "select" else "mean weight (AvgCE)"
        prefix = _SELECT if kind == "select" else _WEIGHT
        crow = []
        for name in names:
            steps, values = _series(run, prefix + name)
            crow.append(
                [
                    name,
                    _pct(_step_weighted_mean(steps, values), 1) if values else "–",
                    _pct(values[0], 1) if values else "–",
                    _pct(values[-1], 1) if values else "–",
                ]
            )
        domains = _logged_domains(run, prefix)
        if domains:
            drow = []
            for name in names:
                cells = []
                for d in domains:
                    steps, values = _series(run, f"{prefix}{name}/{d}")
                    cells.append(_pct(_step_weighted_mean(steps, values), 1) if values else "–")
                drow.append([name, *cells])
            crow_domain = _table(["candidate", *domains], drow)
        png = f"selection_{_safe_name(run.name)}.png"
        plots[png] = _selection_plot(run, kind, names)
        out += [
            f"**{run.name}**: each candidate's {what}, over the training steps.",
            "",
            _table(["candidate", "over training", "first log", "last log"], crow),
            "",
        ]
        if domains:
            out += ["Per domain of the block (its commonest domain), over training:", ""]
            out += [crow_domain, ""]
        out += [f"![{run.name}: fusion candidates]({png})", ""]
    if not any_candidates:
        out += [NOT_AVAILABLE if not fused else "No fusion candidate was logged.", ""]

    out += ["### Loss curves", ""]
    png = _loss_plot(wd.runs)
    if png is None:
        out += ["No loss was logged.", ""]
    else:
        plots["loss_curves.png"] = png
        out += [
            "Total, CLM and fusion losses per logged step; dashed: the CLM-only control.",
            "",
            "![loss curves](loss_curves.png)",
            "",
        ]
    return out


def _seed_groups(labels: Sequence[str]) -> dict[str, dict[str, str]]:
    """``{run kind: {seed: label}}`` for the training runs (``fused``, ``clm``, ``kd-<source>``,
    ``fused-lmw<λ>``) among ``labels``; the unsuffixed run is seed ``""``."""
    out: dict[str, dict[str, str]] = {}
    for label in labels:
        m = _RUN_LABEL.match(label.strip())
        if m:
            out.setdefault(m.group(1), {})[m.group(2) or ""] = label
    return out


def _stat(models: Mapping[str, Any], label: str, group: str, key: str) -> float | None:
    v = ((models.get(label) or {}).get("groups") or {}).get(group, {})
    v = v.get(key) if isinstance(v, dict) else None
    return float(v) if _finite(v) else None


def _perplexity_section(wd: _Workdir) -> tuple[list[str], str | None]:
    out = ["## Held-out perplexity", ""]
    if wd.perplexity is None:
        return [*out, NOT_AVAILABLE, ""], None
    models: dict[str, Any] = wd.perplexity["models"]
    if not models:
        return [*out, "No model was evaluated.", ""], None
    data = wd.perplexity.get("data") or {}
    if isinstance(data, dict) and data:
        desc = []
        if data.get("source"):
            desc.append(f"`{data['source']}`")
        if data.get("rows") is not None:
            desc.append(f"{_int(data.get('rows'))} documents")
        if data.get("fingerprint"):
            desc.append(f"fingerprint `{str(data['fingerprint'])[:12]}`")
        if desc:
            out += ["Data: " + ", ".join(desc) + ".", ""]
    groups: list[str] = []
    for entry in models.values():
        for g in entry["groups"]:
            if g not in groups and g != "all":
                groups.append(g)
    groups = [*sorted(groups), "all"]
    for title, key, digits in (("Perplexity", "ppl", 3), ("Bits per byte", "bits_per_byte", 4)):
        rows = [
            [label, *[_f(_stat(models, label, g, key), digits) for g in groups]] for label in models
        ]
        out += [
            f"**{title}** (rows: models, columns: domains)",
            "",
            _table(["model", *groups], rows),
            "",
        ]
    out += [
        "Bits per byte compare models with different tokenizers; perplexity compares models "
        "that share one (the fused model and its CLM control).",
        "",
    ]

    seeds = _seed_groups(list(models))
    lines, headline = _fused_vs_control(models, seeds, groups)
    out += lines
    out += _runs_vs_control(models, seeds, groups)
    closure_lines, closure = _gap_closure(models, seeds)
    out += closure_lines
    if headline and closure:
        headline += " " + closure
    return out, headline


def _paired(
    models: Mapping[str, Any], runs: Mapping[str, str], ctrl: Mapping[str, str], g: str, key: str
) -> tuple[list[float], list[float]]:
    """Per seed with both runs: ``(run - control, 100 (run - control) / control)`` of ``key``."""
    diff, rel = [], []
    for seed in sorted(set(runs) & set(ctrl)):
        a, b = _stat(models, runs[seed], g, key), _stat(models, ctrl[seed], g, key)
        if a is not None and b is not None:
            diff.append(a - b)
            rel.append(100.0 * (a - b) / b if b else math.nan)
    return diff, rel


def _fused_vs_control(
    models: Mapping[str, Any], seeds: Mapping[str, Mapping[str, str]], groups: Sequence[str]
) -> tuple[list[str], str | None]:
    out = ["### Fused vs CLM control", ""]
    fused, ctrl = seeds.get("fused", {}), seeds.get(_CONTROL, {})
    if not set(fused) & set(ctrl):
        return [*out, "not available (no `fused` and `clm` pair of models was evaluated)", ""], None
    several = len(fused) > 1 or len(ctrl) > 1
    rows = []
    headline = None
    for g in groups:
        vals = {
            (kind, key): [
                v for v in (_stat(models, x, g, key) for x in runs.values()) if v is not None
            ]
            for kind, runs in (("fused", fused), ("clm", ctrl))
            for key in ("ppl", "bits_per_byte")
        }
        dp, rel = _paired(models, fused, ctrl, g, "ppl")
        db, _ = _paired(models, fused, ctrl, g, "bits_per_byte")
        rows.append(
            [
                g,
                _pm(vals["fused", "ppl"], 3),
                _pm(vals["clm", "ppl"], 3),
                _pm(dp, 3, True),
                _pm(rel, 2, True) + ("%" if rel else ""),
                _pm(vals["fused", "bits_per_byte"], 4),
                _pm(vals["clm", "bits_per_byte"], 4),
                _pm(db, 4, True),
                str(len(dp)),
            ]
        )
        if g == "all" and dp:
            if several:
                headline = (
                    f"Headline: fused minus CLM-control perplexity on all held-out data: "
                    f"{_pm(dp, 3, True)} ({_pm(rel, 2, True)}%) over {len(dp)} seed(s); "
                    "negative is better."
                )
            else:
                verdict = "lower (better)" if dp[0] < 0 else "higher (worse)" if dp[0] else "equal"
                headline = (
                    f"Headline: the fused model's held-out perplexity is "
                    f"{_pm(vals['fused', 'ppl'], 3)} against {_pm(vals['clm', 'ppl'], 3)} for the "
                    f"CLM-only control ({_pm(dp, 3, True)}, {_pm(rel, 2, True)}%: {verdict})."
                )
    headers = [
        "domain",
        "fused ppl",
        "CLM ppl",
        "Δ ppl",
        "Δ ppl (relative)",
        "fused bits/byte",
        "CLM bits/byte",
        "Δ bits/byte",
        "pairs",
    ]
    if several:
        out += [
            f"Mean ± sample standard deviation across seeds ({len(fused)} fused, {len(ctrl)} "
            "CLM runs); differences are paired by seed.",
            "",
        ]
    out += [_table(headers, rows), "", "Δ = fused − CLM: negative is better.", ""]
    return out, headline


def _runs_vs_control(
    models: Mapping[str, Any], seeds: Mapping[str, Mapping[str, str]], groups: Sequence[str]
) -> list[str]:
    """Every training run kind (FuseLLM, the KD baselines, the weight sweep) against the control,
    in one table."""
    ctrl = seeds.get(_CONTROL, {})
    kinds = [k for k in seeds if k != _CONTROL and set(seeds[k]) & set(ctrl)]
    if not kinds or kinds == ["fused"]:
        return []
    rows = []
    for kind in kinds:
        cells = []
        for g in groups:
            _, rel = _paired(models, seeds[kind], ctrl, g, "ppl")
            cells.append(_pm(rel, 2, True) + ("%" if rel else ""))
        rows.append([_RUN_KIND.get(kind.split("-")[0], kind) + f" `{kind}`", *cells])
    return [
        "### Every run against the CLM control",
        "",
        "Relative held-out perplexity difference to the control of the same seed (mean ± sd "
        "across seeds); negative is better. KD: the same training distilling one source alone.",
        "",
        _table(["run", *groups], rows),
        "",
    ]


_RUN_KIND = {"fused": "FuseLLM", "kd": "KD"}
_SOURCE_LABEL = re.compile(r"^(.+) \(source(?:, (.+))?\)$")


def _gap_closure(
    models: Mapping[str, Any], seeds: Mapping[str, Mapping[str, str]]
) -> tuple[list[str], str | None]:
    """Per source with a domain: the share of the control-to-source gap on that domain that each
    run closed, in perplexity and in bits per byte."""
    ctrl = seeds.get(_CONTROL, {})
    sources = []
    for label in models:
        m = _SOURCE_LABEL.match(label)
        if m and m.group(2):
            sources.append((m.group(1), m.group(2), label))
    kinds = [k for k in seeds if k != _CONTROL and set(seeds[k]) & set(ctrl)]
    if not sources or not kinds:
        return [], None
    rows, parts = [], []
    for name, domain, label in sources:
        for kind in kinds:
            shares: dict[str, list[float]] = {"ppl": [], "bits_per_byte": []}
            for key, vals in shares.items():
                src = _stat(models, label, domain, key)
                for seed in sorted(set(seeds[kind]) & set(ctrl)):
                    run = _stat(models, seeds[kind][seed], domain, key)
                    base = _stat(models, ctrl[seed], domain, key)
                    if None not in (src, run, base) and base != src:
                        vals.append(100.0 * (base - run) / (base - src))  # type: ignore[operator]
            cells = [_pm(v, 1, True) + ("%" if v else "") for v in shares.values()]
            rows.append([f"{name} ({domain})", f"`{kind}`", *cells])
            if kind == "fused" and shares["ppl"]:
                parts.append(f"{domain}: {_pm(shares['ppl'], 1)}%")
    lines = [
        "### Gap closed on each source's domain",
        "",
        "The share of the gap between the CLM control and the source, on the source's own "
        "domain, that a run closed: `(control − run) / (control − source)`, per seed, mean ± sd. "
        "In perplexity (the source's is per token of its own tokenizer) and in bits per byte "
        "(comparable across tokenizers; the stricter measure).",
        "",
        _table(["source (domain)", "run", "of the perplexity gap", "of the bits/byte gap"], rows),
        "",
    ]
    headline = (
        "Gap to each source closed on its domain (perplexity): " + ", ".join(parts) + "."
        if parts
        else None
    )
    return lines, headline


def _bench_value(entry: Mapping[str, Any] | None) -> float | None:
    """A task result's headline value as the report shows it (fractions in percent)."""
    from .stages.benchmark import PERCENT_METRICS

    if not entry or not _finite(entry.get("value")):
        return None
    return float(entry["value"]) * (100.0 if entry.get("metric") in PERCENT_METRICS else 1.0)


def _bench_values(models: Mapping[str, Any], runs: Mapping[str, str], task: str) -> list[float]:
    vals = (_bench_value(models[r]["tasks"].get(task)) for r in runs.values() if r in models)
    return [v for v in vals if v is not None]


def _bench_gains(
    models: Mapping[str, Any], fused: Mapping[str, str], ctrl: Mapping[str, str], task: str
) -> list[float]:
    """Fused minus control per seed with both, in the shown unit (percentage points)."""
    out = []
    for seed in sorted(set(fused) & set(ctrl)):
        a = _bench_value(models[fused[seed]]["tasks"].get(task))
        b = _bench_value(models[ctrl[seed]]["tasks"].get(task))
        if a is not None and b is not None:
            out.append(a - b)
    return out


def _bench_header(task: str, entry: Mapping[str, Any]) -> str:
    shots = entry.get("num_fewshot")
    parts = [str(entry.get("metric")), f"{shots}-shot" if isinstance(shots, int) else "n-shot ?"]
    if entry.get("higher_is_better") is False:
        parts.append("lower is better")
    return f"{task} ({', '.join(parts)})"


def _benchmark_section(wd: _Workdir) -> tuple[list[str], str | None]:
    """Models as rows, tasks as columns (the FuseLLM model card's layout), the fused model's
    gain over the CLM control per task (mean ± sd across seeds, paired by seed)."""
    out = ["## Benchmarks", ""]
    b = wd.benchmarks
    if b is None:
        configured = ((wd.config or {}).get("evaluate") or {}).get("tasks")
        text = NOT_AVAILABLE if configured else "No benchmark task configured (`evaluate.tasks`)."
        return [*out, text, ""], None
    models: dict[str, Any] = b["models"]
    names = list(
        dict.fromkeys([*b.get("tasks", []), *(t for m in models.values() for t in m["tasks"])])
    )
    tasks = {
        t: next(m["tasks"][t] for m in models.values() if t in m["tasks"])
        for t in names
        if any(t in m["tasks"] for m in models.values())
    }
    if not tasks:
        return [*out, "No benchmark result.", ""], None
    rows = [
        [label, *[_f(_bench_value(m["tasks"].get(t)), 2) for t in tasks]]
        for label, m in models.items()
    ]
    seeds = _seed_groups(list(models))
    fused, ctrl = seeds.get("fused", {}), seeds.get(_CONTROL, {})
    several = len(fused) > 1 or len(ctrl) > 1
    if several:
        for kind, runs in (("fused", fused), (_CONTROL, ctrl)):
            cells = [_pm(_bench_values(models, runs, t), 2) for t in tasks]
            rows.append([f"{kind}: mean ± sd over {len(runs)} seeds", *cells])
    gains = {t: _bench_gains(models, fused, ctrl, t) for t in tasks}
    if any(gains.values()):
        rows.append(["gain: fused − CLM", *[_pm(g, 2, True) for g in gains.values()]])
    items = sorted({e.get("samples") for e in tasks.values() if isinstance(e.get("samples"), int)})
    errors = sorted(
        100.0 * float(e["stderr"])
        for m in models.values()
        for t, e in m["tasks"].items()
        if t in tasks and _finite(e.get("stderr")) and e.get("metric") in _percent_metrics()
    )
    out += [
        f"lm-evaluation-harness {b.get('lm_eval_version') or '(version unknown)'}. Rows: models; "
        "columns: tasks (metric, few-shot examples); fractions in percent.",
        "",
        _table(["model", *(_bench_header(t, e) for t, e in tasks.items())], rows),
        "",
    ]
    notes = []
    if items:
        notes.append(f"Items per task: {', '.join(map(str, items))}")
    if errors:
        notes.append(f"median standard error of a cell: ±{errors[len(errors) // 2]:.2f} points")
    if any(gains.values()):
        paired = "paired by seed, mean ± sd" if several else "one seed"
        notes.append(f"gain = fused − CLM control ({paired}): positive is better")
    if notes:
        out += ["; ".join(notes) + ".", ""]
    means = [sum(g) / len(g) for g in gains.values() if g]
    headline = None
    if means:
        better = sum(m > 0 for m in means)
        headline = (
            f"Benchmarks: the fused model's gain over the CLM control averages "
            f"{sum(means) / len(means):+.2f} points over {len(means)} task(s) (better on "
            f"{better}, worse on {sum(m < 0 for m in means)})."
        )
    return out, headline


def _percent_metrics() -> frozenset[str]:
    from .stages.benchmark import PERCENT_METRICS

    return PERCENT_METRICS


def _timings_section(wd: _Workdir) -> list[str]:
    out = ["## Stage timings", ""]
    if wd.timings is None:
        return [*out, NOT_AVAILABLE, ""]
    stages: dict[str, float] = {k: float(v) for k, v in wd.timings["stages"].items()}
    if not stages:
        return [*out, "No stage was timed.", ""]
    total = math.fsum(stages.values())
    rows = [[k, f"{v:.1f}", _hms(v), _pct(v, total)] for k, v in stages.items()]
    rows.append(["total", f"{total:.1f}", _hms(total), "100.0%" if total else "–"])
    return [*out, _table(["stage", "seconds", "h:mm:ss", "share"], rows), ""]


def _hms(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


# --- entry points --------------------------------------------------------------------------------


def write_report(
    workdir: str | os.PathLike[str], *, output_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Writes ``report.md`` and its PNG plots for a pipeline work directory.

    Args:
        workdir: the pipeline work directory (layout in the module docstring).
        output_dir: where to write (default ``<workdir>/report``).

    Returns:
        The path of ``report.md``.

    Raises:
        InputError: ``workdir`` is not a directory, or one of its files is not valid JSON / YAML
            or lacks the expected structure (the message names the file).
    """
    from . import __version__
    from .io import atomic_write_bytes

    if not isinstance(workdir, (str, os.PathLike)):
        raise InputTypeError(f"workdir must be a path, got {type(workdir).__name__}")
    root = Path(workdir)
    if not root.is_dir():
        raise InputError(f"work directory {str(root)!r} does not exist")
    out_dir = Path(output_dir) if output_dir is not None else root / "report"
    wd = _collect(root)

    plots: dict[str, bytes] = {}
    ppl_lines, headline = _perplexity_section(wd)
    bench_lines, bench_headline = _benchmark_section(wd)
    headline = " ".join(h for h in (headline, bench_headline) if h) or None
    lines = ["# FuseLLM run report", "", f"Generated by fusellm {__version__}.", ""]
    lines += _summary(wd, headline)
    lines += _vocab_section(wd)
    lines += _align_section(wd)
    lines += _teacher_section(wd)
    lines += _training_section(wd, plots)
    lines += ppl_lines
    lines += bench_lines
    lines += _timings_section(wd)

    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*out_dir.glob("selection_*.png"), out_dir / "loss_curves.png"]:
        if stale.name not in plots and stale.is_file():
            stale.unlink()
    for name, data in plots.items():
        atomic_write_bytes(out_dir / name, data)
    text = "\n".join(lines).rstrip() + "\n"
    return atomic_write_bytes(out_dir / "report.md", text.encode("utf-8"))


def add_report_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds the ``report`` command to an ``argparse`` sub-parser collection."""
    p = subparsers.add_parser(
        "report",
        help="write the Markdown report of a pipeline run",
        description=(
            "Write WORKDIR/report/report.md and PNG plots from a pipeline work directory: run "
            "summary and settings, vocabulary-map and alignment statistics per source, each "
            "fusion candidate's selection share over training, loss curves (fused vs the "
            "CLM-only control), held-out perplexity and bits per byte per domain with the "
            "fused-minus-control difference (mean ± standard deviation across seeds), and stage "
            "timings. Stages that did not run are reported as not available."
        ),
    )
    p.add_argument("workdir", metavar="WORKDIR", help="the pipeline work directory")
    p.add_argument(
        "--output", "-o", default=None, metavar="DIR", help="output directory (WORKDIR/report)"
    )
    p.set_defaults(func=_report_cli)
    return p


def _report_cli(args: argparse.Namespace) -> int:
    path = write_report(args.workdir, output_dir=args.output)
    print(path)
    return 0
