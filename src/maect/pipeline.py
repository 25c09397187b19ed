"""``maect run``: chain pretraining, MAE-CT tuning, fine-tuning and evaluation, then compare.

A pipeline recipe (``recipes/pipelines/*.yaml``) names stages; each stage is a run directory
``<out>/<stage name>`` made by ``pretrain``, ``tune`` or ``finetune`` (``tune`` and ``finetune``
stages name their ``init`` stage; ``finetune`` also takes ``scratch``), so a finished stage is
skipped and an interrupted one resumes. A ``finetune`` stage with ``seeds`` runs once per seed in
``<out>/<stage name>/seed<k>`` and reports the mean and standard deviation. Evaluation writes
``eval.json`` in each evaluated directory (``<out>/pixels`` for the raw-pixel baseline) and is
skipped when that file exists; fine-tuning stages are scored by their ``finetune.json``. The
comparison goes to stdout, ``results.json`` and ``results.md``: each of the recipe's
``comparisons`` (``method``, ``baseline``, ``metrics``, ``claim``, optional ``margins``, the
least gain in points per metric) shows or does not show; a stage resumed after an interruption
has its training minutes marked, since only the resuming call was timed.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maect.config import (
    SCRATCH,
    ConfigError,
    RunConfig,
    check_command,
    command_usage,
    from_dict,
    is_pipeline,
    load_config,
    read_recipe,
)

COMMANDS = ("pretrain", "tune", "finetune")
# The file whose presence marks a stage of each command as complete.
DONE_FILES = {"pretrain": "encoder.pt", "tune": "encoder.pt", "finetune": "finetune.json"}
PIXELS = "pixels"
TIMING_FILE = "train_time.json"  # written by the pipeline when it trains a stage
# Comparison-table columns: (title, dotted path into eval.json).
COLUMNS = (
    ("k-NN", "knn.top1"),
    ("linear", "linear.top1"),
    ("1-shot", "lowshot.1"),
    ("2-shot", "lowshot.2"),
    ("5-shot", "lowshot.5"),
    ("1%", "lowshot.1pct"),
    ("k-means ACC", "cluster.acc"),
    ("NMI", "cluster.nmi"),
    ("ARI", "cluster.ari"),
)


@dataclass
class StageSpec:
    """One training stage of a pipeline."""

    name: str = ""
    command: str = "pretrain"
    recipe: str = ""
    init: str = ""
    overrides: list[str] = field(default_factory=list)
    gpu_overrides: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)  # finetune: one run per trainer.seed

    def run_dirs(self, out: Path) -> list[tuple[Path, list[str]]]:
        """Run directories of this stage with the overrides that tell them apart."""
        if not self.seeds:
            return [(out / self.name, [])]
        return [(out / self.name / f"seed{s}", [f"trainer.seed={s}"]) for s in self.seeds]


@dataclass
class Comparison:
    """A claim to check: ``method`` should beat ``baseline`` on ``metrics``, by at least
    ``margins[metric]`` points where a margin is given (an aim such as "+3 k-NN")."""

    method: str = ""
    baseline: str = ""
    metrics: list[str] = field(default_factory=list)
    claim: str = ""
    margins: dict[str, float] = field(default_factory=dict)


@dataclass
class PipelineSpec:
    """A pipeline recipe."""

    description: str = ""
    out: str = "runs/pipeline"
    overrides: list[str] = field(default_factory=list)
    gpu_overrides: list[str] = field(default_factory=list)
    evaluate: list[str] = field(default_factory=list)
    eval_overrides: list[str] = field(default_factory=list)
    gpu_eval_overrides: list[str] = field(default_factory=list)
    note: str = ""
    gpu_note: str = ""  # replaces ``note`` on a GPU, where the gpu_* overrides change the budget


def load_pipeline(name: str) -> tuple[PipelineSpec, list[StageSpec], list[Comparison]]:
    """Read and check a pipeline recipe (``pipelines/NAME`` or a YAML path)."""
    data = read_recipe(name if "/" in name or name.endswith(".yaml") else f"pipelines/{name}")
    if not is_pipeline(data):
        usage = command_usage(data.get("method", RunConfig.method), name)
        raise ConfigError(
            f"{name} is a method recipe, not a pipeline: train it with `{usage}` "
            "(`maect recipes pipelines` lists the pipelines)"
        )
    stages_raw = data.pop("stages", [])
    comparisons_raw = data.pop("comparisons", [])
    spec = from_dict(PipelineSpec, data)
    if not isinstance(stages_raw, list) or not stages_raw:
        raise ConfigError(f"pipeline {name}: 'stages' must be a non-empty list")
    stages = [from_dict(StageSpec, s, f"stages[{i}].") for i, s in enumerate(stages_raw)]
    comparisons = [
        from_dict(Comparison, c, f"comparisons[{i}].") for i, c in enumerate(comparisons_raw)
    ]
    seen: set[str] = set()
    for i, stage in enumerate(stages):
        if not stage.name or stage.name == PIXELS or stage.name in seen:
            raise ConfigError(f"stages[{i}].name must be unique, non-empty and not '{PIXELS}'")
        if stage.command not in COMMANDS:
            raise ConfigError(f"stages[{i}].command must be one of {', '.join(COMMANDS)}")
        starts = seen | ({SCRATCH} if stage.command == "finetune" else set())
        if stage.command in ("tune", "finetune") and stage.init not in starts:
            scratch = f" or {SCRATCH}" if stage.command == "finetune" else ""
            raise ConfigError(
                f"stages[{i}].init must name an earlier stage{scratch}, got '{stage.init}'"
            )
        if stage.seeds and stage.command != "finetune":
            raise ConfigError(f"stages[{i}].seeds applies to finetune stages only")
        seen.add(stage.name)
    known = seen | {PIXELS}
    finetuned = {s.name for s in stages if s.command == "finetune"}
    for source in spec.evaluate:
        if source not in known:
            raise ConfigError(f"evaluate: unknown source '{source}' (stages: {', '.join(seen)})")
        if source in finetuned:
            raise ConfigError(f"evaluate: '{source}' is a finetune stage (finetune.json scores it)")
    for i, c in enumerate(comparisons):
        if {c.method, c.baseline} - known:
            raise ConfigError(f"comparisons[{i}] names a source that is not evaluated")
        stray = sorted(set(c.margins) - set(c.metrics))
        if stray:
            raise ConfigError(f"comparisons[{i}].margins: '{stray[0]}' is not in its metrics")
        if any(m < 0 for m in c.margins.values()):
            raise ConfigError(f"comparisons[{i}].margins must be >= 0 (points of gain)")
    return spec, stages, comparisons


def on_gpu() -> bool:
    """Whether a GPU is available (the ``gpu_*`` overrides and notes apply)."""
    import torch

    return torch.cuda.is_available()


def stage_config(spec: PipelineSpec, stage: StageSpec, out: Path, extra: list[str]):
    """The validated run config of one stage, with the pipeline-wide and CLI overrides."""
    gpu = on_gpu()
    overrides = [
        *spec.overrides,
        *(spec.gpu_overrides if gpu else []),
        *stage.overrides,
        *(stage.gpu_overrides if gpu else []),
        *extra,
    ]
    cfg = load_config(stage.recipe, overrides)
    check_command(cfg, stage.command)
    if stage.command == "tune":
        from maect.tuning import with_init

        cfg = with_init(cfg, str(out / stage.init))
    if stage.command == "finetune":
        init = stage.init if stage.init == SCRATCH else str(out / stage.init)
        cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, init=init))
    return cfg


def pipeline_note(spec: PipelineSpec) -> str:
    """The note printed under the table: ``gpu_note`` on a GPU when the recipe has one."""
    return spec.gpu_note if on_gpu() and spec.gpu_note else spec.note


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo`` on Linux), else the machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(cfg: Any | None = None) -> str:
    """The GPU's name when training runs on one, else the CPU's."""
    import torch

    gpu = on_gpu() and (cfg is None or cfg.trainer.accelerator != "cpu")
    return torch.cuda.get_device_name() if gpu else cpu_name()


def run_stage(stage: StageSpec, cfg: Any, run_dir: Path) -> dict[str, Any] | None:
    """Train one stage (skipped when complete) and return the timing record of the call that
    completed it (``train_seconds``, ``device``, ``resumed``), kept in ``TIMING_FILE`` so a stage
    trained by an earlier call (or on another machine) still reports its cost. A stage resumed
    after an interruption counts only the resuming call (``"resumed": true``). Progress lines
    with the time left in the stage are printed as it trains
    (:class:`maect.callbacks.StageProgress`)."""
    from maect.callbacks import StageProgress
    from maect.engine import pretrain
    from maect.finetuning import finetune
    from maect.tuning import tune

    timing_file = run_dir / TIMING_FILE
    complete = (run_dir / DONE_FILES[stage.command]).is_file()
    resumed = (run_dir / "config.yaml").is_file() and not complete
    started = time.perf_counter()
    progress = [StageProgress(root=run_dir.parent.parent if stage.seeds else run_dir.parent)]
    runner = {"pretrain": pretrain, "tune": tune, "finetune": finetune}[stage.command]
    runner(cfg, run_dir, callbacks=progress)
    if not complete:
        record = {
            "train_seconds": time.perf_counter() - started,
            "device": device_name(cfg),
            "resumed": resumed,
        }
        timing_file.write_text(json.dumps(record))
    if not timing_file.is_file():
        return None
    return json.loads(timing_file.read_text())


@dataclass
class ResolvedPipeline:
    """A pipeline with every stage's config (per run directory) and the evaluation settings
    checked."""

    name: str
    spec: PipelineSpec
    stages: list[StageSpec]
    comparisons: list[Comparison]
    out: Path
    configs: dict[Path, RunConfig]
    eval_items: list[str]


def resolve_pipeline(
    name: str, out: str | None = None, overrides: list[str] | None = None
) -> ResolvedPipeline:
    """Load pipeline ``name`` and check everything a run needs before the first stage trains:
    every stage's config, trainer settings and run directories, and the evaluation settings.

    Overrides starting with ``eval.`` go to every evaluation, the others to every stage.
    """
    from maect.rundir import check_out_dir, plan_run

    spec, stages, comparisons = load_pipeline(name)
    from maect.engine import check_trainer  # after the cheap checks: torch loads here
    from maect.evaluation.command import load_eval_config

    out_dir = Path(out or spec.out)
    check_out_dir(out_dir)
    extra = overrides or []
    stage_extra = [o for o in extra if not o.startswith("eval.")]
    eval_extra = [o[len("eval.") :] for o in extra if o.startswith("eval.")]
    configs = {}
    for stage in stages:
        for run_dir, seed in stage.run_dirs(out_dir):
            cfg = stage_config(spec, stage, out_dir, [*stage_extra, *seed])
            check_trainer(cfg)
            plan_run(run_dir, cfg.to_dict(), DONE_FILES[stage.command])  # another config: now
            configs[run_dir] = cfg
    gpu_eval = spec.gpu_eval_overrides if on_gpu() else []
    eval_items = [*spec.eval_overrides, *gpu_eval, *eval_extra, "progress=false"]
    load_eval_config(eval_items)
    return ResolvedPipeline(name, spec, stages, comparisons, out_dir, configs, eval_items)


def source_eval_items(items: list[str], source: str, target: Path) -> list[str]:
    """The evaluation settings of one source: the pipeline's ``items``; for raw pixels also their
    ``out=`` directory and no per-block analysis (pixels have no blocks)."""
    if source != PIXELS:
        return list(items)
    return [*items, f"out={target}", "layers=null"]


def plan_pipeline(
    name: str, out: str | None = None, overrides: list[str] | None = None
) -> dict[str, Any]:
    """What ``maect run`` would do (the dry run): every stage's command, plan and config (per
    run directory), and the evaluation settings."""
    from maect.evaluation.command import load_eval_config
    from maect.rundir import plan_run

    p = resolve_pipeline(name, out, overrides)
    stages = {}
    for stage in p.stages:
        for run_dir, _ in stage.run_dirs(p.out):
            cfg = p.configs[run_dir]
            init = f" init={p.out / stage.init}" if stage.command == "tune" else ""
            source = f" {cfg.finetune.init}" if stage.command == "finetune" else ""
            stages[str(run_dir.relative_to(p.out))] = {
                "command": f"maect {stage.command}{source} recipe={stage.recipe}{init} "
                f"out={run_dir}",
                "plan": plan_run(run_dir, cfg.to_dict(), DONE_FILES[stage.command]).describe(),
                "config": cfg.to_dict(),
            }
    evaluation = dataclasses.asdict(load_eval_config(p.eval_items))
    return {
        "pipeline": name,
        "out": str(p.out),
        "stages": stages,
        "evaluate": {"sources": p.spec.evaluate, "settings": evaluation},
    }


def run_pipeline(
    name: str, out: str | None = None, overrides: list[str] | None = None
) -> dict[str, Any]:
    """Run every stage and evaluation of pipeline ``name``; returns ``results.json``'s content.

    Overrides starting with ``eval.`` go to every evaluation, the others to every stage. Every
    stage's config and the evaluation settings are checked before the first stage trains; the
    pipeline directory is locked against a second ``maect run`` on it. Prints the device, the
    time each stage and evaluation took, the time left in a training stage as it trains, and
    the total.
    """
    from maect.rundir import RunLock, is_launch_leader

    started = time.perf_counter()
    p = resolve_pipeline(name, out, overrides)
    p.out.mkdir(parents=True, exist_ok=True)
    lock = RunLock(p.out)
    if is_launch_leader():
        lock.acquire()
    try:
        return _run_pipeline(p, started)
    finally:
        lock.release()


def _run_pipeline(p: ResolvedPipeline, started: float) -> dict[str, Any]:
    import torch

    from maect.callbacks import format_duration
    from maect.evaluation.command import evaluate, load_eval_config

    out_dir, spec, name, stages = p.out, p.spec, p.name, p.stages
    print(
        f"maect run {name}: {len(stages)} training stages, {len(spec.evaluate)} evaluations on "
        f"{device_name()} ({torch.get_num_threads()} CPU threads)",
        flush=True,
    )

    def done(what: str, since: float, left: list[str]) -> None:
        to_do = f"; still to run: {', '.join(left)}" if left else ""
        print(
            f"{what} in {format_duration(time.perf_counter() - since)} "
            f"({format_duration(time.perf_counter() - started)} since the start){to_do}",
            flush=True,
        )

    pending = [f"stage {s.name}" for s in stages] + [f"evaluate {e}" for e in spec.evaluate]
    train_seconds: dict[str, float | None] = {}
    resumed: list[str] = []
    for stage in stages:
        stage_started = time.perf_counter()
        timings: list[dict[str, Any] | None] = []
        for run_dir, seed in stage.run_dirs(out_dir):
            where = f" ({run_dir.name})" if seed else ""
            print(
                f"\n=== stage {stage.name}{where}: maect {stage.command} recipe={stage.recipe}",
                flush=True,
            )
            timings.append(run_stage(stage, p.configs[run_dir], run_dir))
        known = [t for t in timings if t is not None]
        complete = len(known) == len(timings)
        train_seconds[stage.name] = sum(t["train_seconds"] for t in known) if complete else None
        if any(t.get("resumed") for t in known):
            resumed.append(stage.name)
        pending.pop(0)
        done(f"stage {stage.name} done", stage_started, pending)

    results: dict[str, Any] = {}
    for source in spec.evaluate:
        target = out_dir / source
        eval_file = target / "eval.json"
        pending.pop(0)
        if not eval_file.is_file():
            print(f"\n=== evaluate {source}", flush=True)
            eval_started = time.perf_counter()
            cfg = load_eval_config(source_eval_items(p.eval_items, source, target))
            evaluate(PIXELS if source == PIXELS else target, cfg)
            done(f"evaluate {source} done", eval_started, pending)
        results[source] = json.loads(eval_file.read_text())
    for stage in stages:
        if stage.command == "finetune":
            results[stage.name] = {"finetune": finetune_result(stage, out_dir)}

    summary = {
        "pipeline": name,
        "description": spec.description,
        "note": pipeline_note(spec),
        "train_seconds": train_seconds,
        "resumed": resumed,
        "results": results,
        "comparisons": [check(c, results) for c in p.comparisons],
    }
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2))
    table = format_results(summary)
    (out_dir / "results.md").write_text(table + "\n")
    print("\n" + table)
    print(
        f"\nmaect run {name}: {format_duration(time.perf_counter() - started)} in all on "
        f"{device_name()}",
        flush=True,
    )
    return summary


def finetune_result(stage: StageSpec, out: Path) -> dict[str, Any]:
    """A fine-tuning stage's scores: its ``finetune.json``, or over ``seeds`` the mean top-1 /
    top-5 with ``top1_std`` / ``top5_std`` (sample standard deviation)."""
    from maect.finetuning import RESULT_FILE, aggregate

    dirs = [run_dir for run_dir, _ in stage.run_dirs(out)]
    if not stage.seeds:
        record = json.loads((dirs[0] / RESULT_FILE).read_text())
        if "robustness" in record:
            record["corruption_top1"] = record["robustness"]["mean"]
        return {**record, "init": stage.init, "runs": 1}
    summary = aggregate(dirs)
    flat = {k: v for k, v in summary.items() if not isinstance(v, dict)}
    for key in ("top1", "top5", "corruption_top1"):
        if key in summary:
            flat[key], flat[f"{key}_std"] = summary[key]["mean"], summary[key]["std"]
    return {**flat, "init": stage.init}


def metric(result: dict[str, Any], path: str) -> float | None:
    """A number from ``eval.json`` by dotted path, e.g. ``"knn.top1"``."""
    node: Any = result
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return float(node) if isinstance(node, int | float) else None


def check(comparison: Comparison, results: dict[str, Any]) -> dict[str, Any]:
    """Per metric: method value minus baseline value (positive = the papers' direction); the
    claim holds when every delta is positive and at least its margin."""
    deltas = {}
    for name in comparison.metrics:
        a = metric(results.get(comparison.method, {}), name)
        b = metric(results.get(comparison.baseline, {}), name)
        deltas[name] = None if a is None or b is None else a - b
    holds = all(
        d is not None and d > 0 and d >= comparison.margins.get(k, 0) for k, d in deltas.items()
    )
    return {**comparison.__dict__, "deltas": deltas, "holds": holds}


def protocol_notes(results: dict[str, Any]) -> list[str]:
    """One line saying which protocol produced which columns, from the ``protocol`` labels of
    the eval.json sections (so that frozen-feature numbers are not read as fine-tuning ones)."""
    columns: dict[str, list[str]] = {}
    for title, path in COLUMNS:
        for result in results.values():
            section = result.get(path.split(".")[0]) if isinstance(result, dict) else None
            if isinstance(section, dict) and isinstance(section.get("protocol"), str):
                columns.setdefault(section["protocol"], []).append(title)
                break
    if not columns:
        return []
    return ["\n" + "; ".join(f"{', '.join(t)}: {label}" for label, t in columns.items())]


RESUMED_MARK = "*"
RESUMED_NOTE = (
    f"{RESUMED_MARK} resumed after an interruption: the minutes of the resuming calls only"
)


def train_minutes(summary: dict[str, Any], source: str) -> str:
    """A table cell: the stage's training minutes (marked when only the resuming call was
    timed), or a dash."""
    seconds = summary["train_seconds"].get(source)
    if seconds is None:
        return "–"
    return f"{seconds / 60:.1f}" + (RESUMED_MARK if source in summary.get("resumed", []) else "")


def finetune_table(summary: dict[str, Any]) -> list[str]:
    """Markdown rows of the fine-tuning stages (mean ± std over seeds where there are several)."""
    rows = {k: r["finetune"] for k, r in summary["results"].items() if "finetune" in r}
    if not rows:
        return []
    metrics = ["top1", "top5"]
    titles = ["top-1", "top-5"]
    if any("corruption_top1" in r for r in rows.values()):
        metrics.append("corruption_top1")
        titles.append("corrupted top-1")
    lines = [
        f"| fine-tuned | from | labels | epochs | runs | {' | '.join(titles)} | train min |",
        "|---|---|---|---|---|" + "---|" * len(titles) + "---|",
    ]
    for source, r in rows.items():
        scores = [
            "–"
            if k not in r
            else f"{r[k]:.1f}"
            + (f" ± {r[f'{k}_std']:.1f}" if r.get(f"{k}_std") is not None else "")
            for k in metrics
        ]
        cells = [source, r["init"], f"{100 * r['label_fraction']:g} %", str(r["epochs"])]
        cells += [str(r["runs"]), *scores, train_minutes(summary, source)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def format_results(summary: dict[str, Any]) -> str:
    """Markdown tables of all evaluated sources and of the fine-tuned stages, then the checked
    claims, then the note."""
    header = "| method | " + " | ".join(title for title, _ in COLUMNS) + " | train min |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 2)]
    evaluated = {k: r for k, r in summary["results"].items() if "finetune" not in r}
    if not evaluated:
        lines = []
    for source, result in evaluated.items():
        cells = []
        for _, path in COLUMNS:
            value = metric(result, path)
            cells.append("–" if value is None else f"{value:.1f}")
        cells.append(train_minutes(summary, source))
        lines.append(f"| {source} | " + " | ".join(cells) + " |")
    lines += protocol_notes(summary["results"])
    finetuned = finetune_table(summary)
    lines += ([""] if lines and finetuned else []) + finetuned
    if summary.get("resumed"):
        lines.append(f"\n{RESUMED_NOTE}")
    for c in summary["comparisons"]:
        margins = c.get("margins", {})
        deltas = ", ".join(
            f"{k} {'n/a' if v is None else f'{v:+.1f}'}"
            + (f" (aim ≥ +{margins[k]:g})" if k in margins else "")
            for k, v in c["deltas"].items()
        )
        verdict = "shows here" if c["holds"] else "does NOT show here at this budget"
        lines.append(f"\n- {c['method']} vs {c['baseline']} ({c['claim']}): {deltas} — {verdict}")
    if summary["note"]:
        lines.append(f"\n{summary['note'].strip()}")
    return "\n".join(lines)
