"""``maect report``: one static, self-contained HTML page for a run or a pipeline directory.

A run directory (``config.yaml`` from ``maect pretrain``/``maect tune``, ``eval.json`` and
``embedding.png`` from ``maect evaluate``) gives a page with a header, the evaluation table, the
training curves of every ``metrics.csv`` (MAE-CT: ``head/`` and ``tune/``), the first, middle and
last reconstruction grid, the embedding plots and the resolved config. A directory whose
subdirectories are run directories (a pipeline) gives the comparison table (``results.json``, or
the stages' ``eval.json``) followed by one such section per stage. Fine-tuning runs
(``maect finetune``) show their ``finetune.json`` and top-1 per epoch instead of the evaluation
table, reconstructions and embeddings; a pipeline's fine-tuning stages get a section of their own.

Images are embedded as data URIs (PNG files as they are, curves as matplotlib SVG), so the page
needs no server, no network and no JavaScript. Anything missing is shown as "not available".
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from html import escape
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from maect.config import TUNING_METHODS, ConfigError
from maect.pipeline import COLUMNS

REPORT_NAME = "report.html"
RUN_TIMES = "run.json"  # {"started": ISO 8601 UTC, "finished": ISO 8601 UTC or null}
TIME_FORMAT = "%Y-%m-%d %H:%M UTC"  # every date on the page
# Rows of a reconstruction grid by their number (the ``preview`` methods of MAE and CAN; CAN
# shows the rows whose modules its configuration has).
GRID_ROWS = {
    1: ("input",),
    2: ("input", "noisy input"),
    3: ("input", "masked", "reconstruction"),
    5: ("input", "masked", "reconstruction", "noisy input", "predicted noise"),
}
GRID_PADDING = 1  # pixels between grid cells (maect.viz.image_grid)
# Stage folders of a ``maect tune`` run, each with its own metrics.csv.
TUNE_STAGES = (("head", "stage 2: NNCLR head"), ("tune", "stage 3: contrastive tuning"))
# eval.json sections shown in the metrics table, in this order; others follow, "config" is shown
# with the configs and "created" in the header.
EVAL_SECTIONS = ("knn", "linear", "lowshot", "cluster", "features", "timing")
# (column title, dotted eval.json key) of the pipeline comparison table.
RECON_PATTERN = re.compile(r"epoch_(\d+)\.png$")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors")
Points = list[tuple[float, float]]

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1280px; padding: 1em 2em;
  color: #1d1d1f; background: #fff; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 2px solid #ddd; padding-bottom: 0.2em; }
h3 { margin-top: 1.4em; } .meta { color: #555; margin: 0 0 1em; }
.meta span { margin-right: 1.5em; } .na { color: #888; font-style: italic; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: left; }
th { background: #f2f2f4; } td.num { text-align: right; }
figure { margin: 0.5em 0 1em; } figcaption { color: #555; font-size: 0.9em; }
img { max-width: 100%; height: auto; } img.pixels { image-rendering: pixelated; min-width: 50%; }
.row { display: flex; flex-wrap: wrap; gap: 1.5em; align-items: flex-start; }
.row figure { flex: 1 1 360px; max-width: 640px; }
pre { background: #f6f6f8; padding: 0.8em; overflow-x: auto; font-size: 12px; }
details { margin: 0.5em 0; } summary { cursor: pointer; font-weight: 600; }
nav a { margin-right: 1em; }
.grid { display: flex; align-items: stretch; gap: 0.5em; }
.grid img { min-width: 0; flex: 1 1 auto; }
.rowlabels { display: flex; flex-direction: column; justify-content: space-around;
  text-align: right; color: #555; font-size: 0.85em; white-space: nowrap; }
"""


# --------------------------------------------------------------------------- reading


@dataclass
class RunFiles:
    """What a run directory holds, read leniently: unreadable files count as missing."""

    path: Path
    config_text: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    eval_result: dict[str, Any] | None = None
    eval_error: str | None = None

    @property
    def method(self) -> str:
        return str(self.config.get("method", "–"))

    @property
    def recipe(self) -> str:
        return str(self.config.get("recipe", "–"))


def read_run(path: Path) -> RunFiles:
    """Read ``config.yaml`` and ``eval.json`` of ``path`` when present and parseable."""
    run = RunFiles(path)
    config_file = path / "config.yaml"
    if config_file.is_file():
        run.config_text = config_file.read_text(errors="replace")
        try:
            loaded = yaml.safe_load(run.config_text)
        except yaml.YAMLError:
            loaded = None
        run.config = loaded if isinstance(loaded, dict) else {}
    eval_file = path / "eval.json"
    if eval_file.is_file():
        try:
            loaded = json.loads(eval_file.read_text(errors="replace"))
        except json.JSONDecodeError as err:
            run.eval_error = f"eval.json is not valid JSON ({err})"
        else:
            if isinstance(loaded, dict):
                run.eval_result = loaded
            else:
                run.eval_error = "eval.json does not hold an object"
    return run


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` holds a run (``config.yaml``) or an evaluation (``eval.json``)."""
    return (path / "config.yaml").is_file() or (path / "eval.json").is_file()


def find_stages(root: Path) -> list[Path]:
    """The run directories directly under ``root``: the stages of a pipeline, sorted by name."""
    return sorted(p for p in root.iterdir() if p.is_dir() and is_run_dir(p))


def number(cell: str | None) -> float | None:
    """``cell`` as a finite float, or ``None`` for empty, non-numeric and non-finite cells."""
    if not cell:
        return None
    try:
        value = float(cell)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def read_metrics(path: Path) -> dict[str, Points]:
    """The columns of a Lightning ``metrics.csv`` as ``(step, value)`` points; empty cells (a
    metric not logged in that row) are skipped. Rows without a step use their row index."""
    series: dict[str, Points] = {}
    with path.open(newline="", errors="replace") as f:
        for index, row in enumerate(csv.DictReader(f)):
            step = number(row.get("step"))
            x = float(index) if step is None else step
            for key, cell in row.items():
                if key is None or key in ("step", "epoch") or not isinstance(cell, str):
                    continue
                value = number(cell)
                if value is not None:
                    series.setdefault(key, []).append((x, value))
    return series


# --------------------------------------------------------------------------- curves


def curve_panels(series: dict[str, Points]) -> list[tuple[str, dict[str, Points]]]:
    """Group metric columns into plot panels ``(title, {legend label: points})``.

    One panel per ``train/<term>`` (its ``_step`` and ``_epoch`` columns together), then the
    NN accuracy, learning rate, throughput and every ``monitor/*`` metric (online k-NN).
    """
    terms: dict[str, dict[str, Points]] = {}
    for key, points in series.items():
        if not key.startswith("train/") or key == "train/lr":
            continue
        name = key.removeprefix("train/")
        label = "per step"
        for suffix, suffix_label in (("_step", "per step"), ("_epoch", "epoch mean")):
            if name.endswith(suffix):
                name, label = name.removesuffix(suffix), suffix_label
        terms.setdefault(name, {})[label] = points
    order = sorted(terms, key=lambda n: (n != "loss", n == "nn_acc", n))
    titles = {"loss": "loss (total)", "nn_acc": "NN accuracy (train/nn_acc)"}
    panels = [(titles.get(n, f"loss term: {n}"), terms[n]) for n in order]
    for key, title in (("train/lr", "learning rate"), ("img_per_s", "images / s")):
        if key in series:
            panels.append((title, {key: series[key]}))
    for key in sorted(k for k in series if k.startswith("monitor/")):
        title = "online k-NN top-1 (%)" if key == "monitor/knn_top1" else key
        panels.append((title, {key: series[key]}))
    return panels


def curves_svg(panels: list[tuple[str, dict[str, Points]]]) -> bytes:
    """The panels as one SVG figure, three per row (matplotlib, no global backend state)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.2 * cols, 2.8 * rows), layout="constrained")
    for i, (title, lines) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        for label, points in lines.items():
            xs, ys = zip(*points, strict=True)
            sparse = len(points) <= 30 or label == "epoch mean"
            ax.plot(xs, ys, label=label, marker="o" if sparse else None, markersize=3, lw=1.2)
        steps = {x for points in lines.values() for x, _ in points}
        if len(steps) == 1:  # one logged step: a marker on a few steps around it, and a note
            (step,) = steps
            ax.set_xlim(step - 1, step + 1)
            ax.text(
                0.5,
                0.05,
                f"only step {step:g} logged so far",
                transform=ax.transAxes,
                ha="center",
                fontsize=7,
                color="#555",
            )
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # optimizer steps are whole
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    return buf.getvalue()


# --------------------------------------------------------------------------- html pieces


def not_available(what: str) -> str:
    return f'<p class="na">{escape(what)}: not available</p>'


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def figure(data: bytes, mime: str, caption: str, pixels: bool = False) -> str:
    """An ``<img>`` with its data embedded, and a caption."""
    css = ' class="pixels"' if pixels else ""
    return (
        f'<figure><img{css} src="{data_uri(data, mime)}" alt="{escape(caption)}">'
        f"<figcaption>{escape(caption)}</figcaption></figure>"
    )


def png_figure(path: Path, caption: str, pixels: bool = False) -> str:
    """A PNG file as a figure, or "not available" when it cannot be read."""
    try:
        data = path.read_bytes()
    except OSError:
        return not_available(caption)
    return figure(data, "image/png", caption, pixels)


def format_value(value: Any) -> str:
    """A table cell: floats with 2 decimals (percentages, seconds) unless tiny or huge."""
    if value is None:
        return "–"
    if isinstance(value, float):
        if value == 0 or 0.01 <= abs(value) < 1e6:
            return f"{value:.2f}"
        return f"{value:.3g}"
    if isinstance(value, list | tuple):
        return ", ".join(format_value(v) for v in value)
    return str(value)


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level with dotted keys."""
    if not isinstance(data, dict):
        return {prefix: data}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def table(header: list[str], rows: list[list[Any]], numeric_from: int = 1) -> str:
    """An HTML table; cells from column ``numeric_from`` on that hold numbers align right."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for i, value in enumerate(row):
            numeric = isinstance(value, int | float) and not isinstance(value, bool)
            css = ' class="num"' if i >= numeric_from and numeric else ""
            cells.append(f"<td{css}>{escape(format_value(value))}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


# Labels of eval.json entries whose key alone does not say what they are.
METRIC_LABELS = {
    ("features", "weights"): "weights id (the feature cache's key for the evaluated weights)",
}


def metric_cells(section: str, metric: str, value: Any) -> list[Any]:
    """The metric and value cells of one eval.json entry; timings carry their unit (seconds)."""
    if section == "timing" and isinstance(value, int | float):
        value = f"{value:.2f} s"
    return [METRIC_LABELS.get((section, metric), metric), value]


def evaluated_on(result: dict[str, Any]) -> str:
    """Which images the numbers are on: the train and test counts, and whether each is a
    class-balanced subset (``data.train_subset`` / ``data.test_subset``) or the whole split."""
    features = result.get("features") or {}
    data = (result.get("config") or {}).get("data") or {}
    parts = []
    for split in ("train", "test"):
        count = features.get(f"n_{split}")
        subset = data.get(f"{split}_subset") if isinstance(data, dict) else None
        if not isinstance(count, int):
            continue
        if isinstance(subset, int) and count == subset:  # a larger subset keeps the whole split
            parts.append(f"{count} {split} images (class-balanced subset, data.{split}_subset)")
        else:
            parts.append(f"{count} {split} images (the whole split)")
    if not parts:
        return ""
    dataset = features.get("dataset")
    on = f" of {dataset}" if dataset else ""
    return f"evaluated on {' and '.join(parts)}{on}; accuracies and clustering scores in %"


def metrics_table(run: RunFiles) -> str:
    """The flattened ``eval.json``: one row per (section, metric), under a line saying which
    images the numbers are on."""
    if run.eval_result is None:
        return not_available(run.eval_error or "evaluation (eval.json; run maect evaluate)")
    result = run.eval_result
    sections = [s for s in EVAL_SECTIONS if s in result]
    skip = ("config", "created", *ANALYSES)  # analyses have their own sections
    sections += [s for s in result if s not in sections and s not in skip]
    rows = []
    for section in sections:
        for i, (metric, value) in enumerate(flatten(result[section]).items()):
            rows.append(["" if i else section, *metric_cells(section, metric, value)])
    if not rows:
        return not_available("evaluation results (eval.json is empty)")
    caption = evaluated_on(result)
    note = f'<p class="meta">{escape(caption)}</p>' if caption else ""
    return note + table(["section", "metric", "value"], rows, numeric_from=2)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; ``{}`` when missing, invalid or not an object."""
    try:
        data = json.loads(path.read_text(errors="replace"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def comparison_section(summary: dict[str, Any], stages: list[RunFiles]) -> str:
    """The pipeline's comparison: the headline numbers of every evaluated source (from the
    ``results.json`` content ``summary``, else from the stages' ``eval.json``), its checked
    claims and its note."""
    results = summary.get("results")
    source = "results.json"
    if not isinstance(results, dict) or not results:
        source = "the eval.json of each stage"
        results = {run.path.name: run.eval_result for run in stages if run.eval_result}
    methods = {run.path.name: run.method for run in stages}
    seconds = summary.get("train_seconds") or {}
    header = ["source", "method", *(title for title, _ in COLUMNS), "train min"]
    rows = []
    for name, result in results.items():
        if isinstance(result, dict) and "finetune" in result:
            continue  # fine-tuning stages have their own section
        flat = flatten(result) if isinstance(result, dict) else {}
        minutes = seconds.get(name) if isinstance(seconds, dict) else None
        rows.append(
            [
                name,
                methods.get(name, "–"),
                *(flat.get(key) for _, key in COLUMNS),
                minutes / 60 if isinstance(minutes, int | float) else None,
            ]
        )
    parts = [f'<p class="meta">from {escape(source)}</p>']
    if summary.get("description"):
        parts.append(f"<p>{escape(str(summary['description']))}</p>")
    parts.append(table(header, rows, numeric_from=2) if rows else not_available("evaluations"))
    captions = {
        name: caption
        for name, result in results.items()
        if isinstance(result, dict) and (caption := evaluated_on(result))
    }
    if len(set(captions.values())) == 1:
        parts.append(f'<p class="meta">{escape(next(iter(captions.values())))}</p>')
    else:
        parts += [f'<p class="meta">{escape(n)}: {escape(c)}</p>' for n, c in captions.items()]
    claims = [c for c in summary.get("comparisons") or [] if isinstance(c, dict)]
    if claims:
        claim_rows = [
            [
                c.get("method"),
                c.get("baseline"),
                c.get("claim"),
                ", ".join(f"{k} {format_value(v)}" for k, v in (c.get("deltas") or {}).items()),
                "yes" if c.get("holds") else "no",
            ]
            for c in claims
        ]
        parts.append("<h3>Claims</h3>")
        header = ["method", "baseline", "claim", "difference", "holds here"]
        parts.append(table(header, claim_rows))
    if summary.get("note"):
        parts.append(f"<p>{escape(str(summary['note']))}</p>")
    return "".join(parts)


def curves_section(run: RunFiles) -> str:
    """Training curves of the run's ``metrics.csv`` files (MAE-CT: one per stage folder)."""
    sources = [(run.path / "metrics.csv", "training")]
    sources += [(run.path / name / "metrics.csv", label) for name, label in TUNE_STAGES]
    present = [(path, label) for path, label in sources if path.is_file()]
    if not present:
        return not_available("training curves (metrics.csv)")
    parts = []
    for path, label in present:
        caption = f"{label} ({path.relative_to(run.path)})"
        try:
            panels = curve_panels(read_metrics(path))
        except (OSError, csv.Error) as err:
            parts.append(not_available(f"{caption}, unreadable: {err}"))
            continue
        if panels:
            parts.append(figure(curves_svg(panels), "image/svg+xml", caption))
        else:
            parts.append(not_available(f"{caption}, no metrics logged yet"))
    return "".join(parts)


def grid_labels(path: Path, img_size: Any) -> tuple[str, ...]:
    """The row labels of a reconstruction grid, from its height: ``rows x (img_size + padding)
    + padding`` pixels. Empty when the height fits no known layout."""
    if not isinstance(img_size, int) or img_size <= 0:
        return ()
    try:
        with Image.open(path) as image:
            height = image.height
    except OSError:
        return ()
    rows, rest = divmod(height - GRID_PADDING, img_size + GRID_PADDING)
    return GRID_ROWS.get(rows, ()) if rest == 0 else ()


def grid_figure(path: Path, caption: str, labels: tuple[str, ...]) -> str:
    """A reconstruction grid with its row labels beside the rows."""
    if not labels:
        return png_figure(path, caption, pixels=True)
    try:
        data = path.read_bytes()
    except OSError:
        return not_available(caption)
    spans = "".join(f"<span>{escape(label)}</span>" for label in labels)
    return (
        f'<figure><div class="grid"><div class="rowlabels">{spans}</div>'
        f'<img class="pixels" src="{data_uri(data, "image/png")}" alt="{escape(caption)}">'
        f"</div><figcaption>{escape(caption)}: rows {' / '.join(labels)}</figcaption></figure>"
    )


def reconstructions_section(run: RunFiles) -> str:
    """The first, middle and last reconstruction grid, rows labelled."""
    if run.method in TUNING_METHODS:
        return not_available("reconstruction grids (MAE-CT and MIM-Refiner train no decoder)")
    grids = sorted(
        (int(m.group(1)), p)
        for p in (run.path / "reconstructions").glob("epoch_*.png")
        if (m := RECON_PATTERN.search(p.name))
    )
    if not grids:
        return not_available("reconstruction grids (reconstructions/epoch_*.png)")
    picks = sorted({0, len(grids) // 2, len(grids) - 1})
    img_size = (run.config.get("model") or {}).get("img_size")
    return "".join(
        grid_figure(path, f"after epoch {epoch}", grid_labels(path, img_size))
        for epoch, path in (grids[i] for i in picks)
    )


def init_run_dir(run: RunFiles) -> Path | None:
    """The run directory named by ``maect.init`` / ``refiner.init`` (the directory, its
    ``encoder.pt`` or one of its checkpoints), as given or as a sibling of this run (a pipeline
    stage), when it exists."""
    tuned = run.method in TUNING_METHODS
    init = (run.config.get(run.method) or {}).get("init") if tuned else None
    if not isinstance(init, str) or not init:
        return None
    given = Path(init)
    if given.suffix in CHECKPOINT_SUFFIXES:
        given = given.parent.parent if given.parent.name == "checkpoints" else given.parent
    for folder in (given, run.path.parent / given.name):
        if folder.is_dir() and is_run_dir(folder) and folder.resolve() != run.path.resolve():
            return folder
    return None


def embeddings_section(run: RunFiles) -> str:
    """``embedding.png``; for MAE-CT and MIM-Refiner beside the embedding of its MAE init (before
    tuning)."""
    own = run.path / "embedding.png"
    if run.method not in TUNING_METHODS:
        if not own.is_file():
            return not_available("embedding plot (embedding.png; run maect evaluate)")
        return f'<div class="row">{png_figure(own, f"t-SNE of {run.path.name}")}</div>'
    init, key = init_run_dir(run), f"{run.method}.init"
    before = init / "embedding.png" if init else None
    parts = [
        png_figure(before, f"before contrastive tuning: {before.parent.name} ({key})")
        if before and before.is_file()
        else not_available(f"embedding before contrastive tuning (embedding.png of {key})"),
        png_figure(own, f"after contrastive tuning: {run.path.name}")
        if own.is_file()
        else not_available("embedding after contrastive tuning (embedding.png)"),
    ]
    return f'<div class="row">{"".join(parts)}</div>'


def config_section(run: RunFiles) -> str:
    """The resolved run config and the evaluation config, collapsed."""
    parts = []
    if run.config_text is not None:
        parts.append(
            f"<details><summary>config.yaml</summary><pre>{escape(run.config_text)}</pre></details>"
        )
    eval_config = (run.eval_result or {}).get("config")
    if eval_config:
        text = yaml.safe_dump(eval_config, sort_keys=False)
        parts.append(
            f"<details><summary>evaluation config (eval.json)</summary>"
            f"<pre>{escape(text)}</pre></details>"
        )
    return "".join(parts) or not_available("config (config.yaml)")


def format_time(stamp: datetime) -> str:
    """A date as every date on the page: UTC, to the minute."""
    return stamp.astimezone(timezone.utc).strftime(TIME_FORMAT)


def parse_time(text: Any) -> str | None:
    """An ISO 8601 time (``run.json``, ``eval.json``) in :data:`TIME_FORMAT`; naive times are
    taken as UTC. ``None`` for anything else."""
    if not isinstance(text, str):
        return None
    try:
        stamp = datetime.fromisoformat(text)
    except ValueError:
        return None
    return format_time(stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc))


def run_times(run: RunFiles) -> list[tuple[str, str]]:
    """Start and end of training from ``run.json``; without that file, the modification time of
    ``config.yaml``, labelled as such (it moves whenever the file is rewritten)."""
    times = read_json(run.path / RUN_TIMES)
    if times:
        started = parse_time(times.get("started")) or "–"
        finished = parse_time(times.get("finished")) or "not finished"
        return [("started", started), ("finished", finished)]
    config = run.path / "config.yaml"
    if not config.is_file():
        return []
    stamp = format_time(datetime.fromtimestamp(config.stat().st_mtime, tz=timezone.utc))
    return [("config.yaml written", f"{stamp} (no {RUN_TIMES}: start and end not recorded)")]


def file_sha256(path: Path) -> str | None:
    """SHA-256 of a file's bytes (first 12 hex digits), when it can be read."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()[:12]


def run_meta(run: RunFiles) -> str:
    """Method, recipe, dataset, dates and the encoder's hash of a run as one line."""
    data = run.config.get("data") or {}
    created = (run.eval_result or {}).get("created")
    items = [
        ("method", run.method),
        ("recipe", run.recipe),
        ("data", data.get("name", "–") if isinstance(data, dict) else "–"),
        *run_times(run),
        ("evaluated", parse_time(created) or created or "not yet"),
    ]
    encoder_hash = file_sha256(run.path / "encoder.pt")
    if encoder_hash:
        items.append(("SHA-256 of encoder.pt (first 12 hex digits)", encoder_hash))
    spans = "".join(f"<span><b>{escape(k)}</b> {escape(str(v))}</span>" for k, v in items)
    return f'<p class="meta">{spans}</p>'


def run_body(run: RunFiles, level: int) -> str:
    """The sections of one run; headings start at ``<h{level}>``."""
    h = f"h{level}"
    if run.method == "finetune":  # the fine-tuning scores instead of frozen-feature sections
        sections = [
            ("Fine-tuning", finetune_section(run.path)),
            ("Training curves", curves_section(run)),
            ("Config", config_section(run)),
        ]
    else:
        sections = [
            ("Metrics", metrics_table(run)),
            ("Training curves", curves_section(run)),
            ("Reconstructions", reconstructions_section(run)),
            ("Embeddings", embeddings_section(run)),
            ("Config", config_section(run)),
        ]
    sections[1:1] = analysis_sections(run)
    return "".join(f"<{h}>{title}</{h}>{body}" for title, body in sections)


def anchor(name: str) -> str:
    return "stage-" + re.sub(r"[^A-Za-z0-9_-]", "-", name)


def page(title: str, body: str) -> str:
    generated = format_time(datetime.now(timezone.utc))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{STYLE}</style></head><body>{body}"
        f'<p class="meta">generated by maect report, {generated}</p></body></html>\n'
    )


def render(root: Path) -> str:
    """The HTML of the report for ``root`` (a run or a pipeline directory)."""
    stages = [] if (root / "config.yaml").is_file() else find_stages(root)
    if not stages:
        run = read_run(root)
        return page(
            f"maect report: {root.name}",
            f"<h1>{escape(root.name)}</h1>{run_meta(run)}{run_body(run, 2)}",
        )
    runs = [read_run(p) for p in stages]
    summary = read_json(root / "results.json")
    nav = "".join(f'<a href="#{anchor(r.path.name)}">{escape(r.path.name)}</a>' for r in runs)
    parts = [
        f"<h1>{escape(root.name)}</h1>",
        f'<p class="meta"><span><b>pipeline</b> {escape(str(summary.get("pipeline", "–")))}'
        f"</span><span><b>stages</b> {len(runs)}</span></p>",
        f"<nav>{nav}</nav>",
        f"<h2>Comparison</h2>{comparison_section(summary, runs)}",
        finetune_pipeline_section(root, summary),
    ]
    parts.append(depth_comparison(runs))
    parts.append(robustness_comparison(runs))
    for run in runs:
        parts.append(
            f'<h2 id="{anchor(run.path.name)}">Stage {escape(run.path.name)}</h2>'
            f"{run_meta(run)}{run_body(run, 3)}"
        )
    return page(f"maect report: {root.name}", "".join(parts))


# --------------------------------------------------------------------------- evaluation analyses
# The per-block analysis (eval.json "layers") and the robustness result ("robustness") of
# maect evaluate: a figure and a table each, and the methods' robustness side by side.

ANALYSES = ("layers", "robustness")


def line_svg(lines: dict[str, Points], title: str, xlabel: str, ylabel: str) -> bytes:
    """One panel of labelled lines (markers on every point) as SVG."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6), layout="constrained")
    ax = fig.add_subplot()
    for label, points in lines.items():
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, label=label, marker="o", markersize=3, lw=1.2)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncols=2 if len(lines) > 8 else 1)
    buf = io.BytesIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    return buf.getvalue()


def _headline(result: Any) -> float | None:
    """The headline number of one protocol's result: top1, else k-means ACC."""
    if not isinstance(result, dict):
        return None
    value = result.get("top1", result.get("acc"))
    return float(value) if isinstance(value, int | float) else None


def depth_lines(layers: dict[str, Any]) -> dict[str, Points]:
    """``{protocol: [(block, headline number)]}`` of the per-block analysis."""
    lines: dict[str, Points] = {}
    blocks = layers.get("blocks") if isinstance(layers.get("blocks"), dict) else {}
    for block, results in sorted(blocks.items(), key=lambda item: int(item[0])):
        for protocol, result in (results or {}).items():
            value = _headline(result)
            if value is not None:
                lines.setdefault(protocol, []).append((int(block), value))
    return lines


def layers_section(layers: dict[str, Any]) -> str:
    """Accuracy against depth (one line per protocol) and its table."""
    lines = depth_lines(layers)
    if not lines:
        return not_available("per-block results (eval.json layers.blocks)")
    caption = str(layers.get("protocol") or "per block")
    svg = line_svg(lines, "accuracy against depth", "block (0 = first)", "top-1 / ACC (%)")
    blocks = sorted({b for points in lines.values() for b, _ in points})
    values = {p: dict(points) for p, points in lines.items()}
    rows = [[b, *(values[p].get(b) for p in lines)] for b in blocks]
    return figure(svg, "image/svg+xml", caption) + table(["block", *lines], rows)


def severity_lines(robustness: dict[str, Any]) -> dict[str, Points]:
    """``{corruption: [(severity, top1)]}`` plus the mean over corruptions, clean at severity 0."""
    clean = robustness.get("clean")
    start = [(0, float(clean))] if isinstance(clean, int | float) else []
    lines: dict[str, Points] = {}
    for corruption, per in (robustness.get("top1") or {}).items():
        points = [(int(s), float(v)) for s, v in per.items() if s.isdigit()]
        lines[corruption] = start + sorted(points)
    mean = [(int(s), float(v)) for s, v in (robustness.get("per_severity") or {}).items()]
    if mean:
        lines["mean"] = start + sorted(mean)
    return lines


def robustness_section(robustness: dict[str, Any]) -> str:
    """Accuracy against severity per corruption (and the mean), and the headline numbers."""
    lines = severity_lines(robustness)
    if not lines:
        return not_available("robustness results (eval.json robustness.top1)")
    svg = line_svg(lines, "accuracy under corruption", "severity (0 = clean)", "top-1 (%)")
    caption = f"{robustness.get('protocol', '')}, {robustness.get('n_test', '?')} test images"
    keys = ("clean", "mean", "mce", "relative_mce", "baseline")
    rows = [[key, robustness[key]] for key in keys if key in robustness]
    return figure(svg, "image/svg+xml", caption) + table(["metric", "value"], rows)


def analysis_sections(run: RunFiles) -> list[tuple[str, str]]:
    """The per-block and robustness sections of a run, for those its eval.json holds."""
    result = run.eval_result or {}
    sections = []
    if isinstance(result.get("layers"), dict):
        sections.append(("Accuracy against depth", layers_section(result["layers"])))
    if isinstance(result.get("robustness"), dict):
        sections.append(("Robustness", robustness_section(result["robustness"])))
    return sections


def stages_figure(
    runs: list[RunFiles],
    section: str,
    points_of: Callable[[dict[str, Any]], Points | None],
    heading: str,
    labels: tuple[str, str, str],
) -> str:
    """One line per stage whose eval.json ``section`` gives points (``points_of``), in one
    figure under ``heading`` (empty if no stage has any); ``labels``: title, x axis, caption."""
    lines = {}
    for run in runs:
        block = (run.eval_result or {}).get(section)
        points = points_of(block) if isinstance(block, dict) else None
        if points:
            lines[run.path.name] = points
    if not lines:
        return ""
    title, x_label, caption = labels
    svg = line_svg(lines, title, x_label, "top-1 (%)")
    return f"<h3>{heading}</h3>" + figure(svg, "image/svg+xml", caption)


def depth_comparison(runs: list[RunFiles], protocol: str = "knn") -> str:
    """``protocol``'s accuracy against depth of every stage with per-block results, in one
    figure (empty if none): where each method's best features sit."""
    labels = (
        f"{protocol} against depth",
        "block (0 = first)",
        f"{protocol} of every block, one line per stage",
    )
    return stages_figure(
        runs,
        "layers",
        lambda block: depth_lines(block).get(protocol),
        "Accuracy against depth",
        labels,
    )


def robustness_comparison(runs: list[RunFiles]) -> str:
    """Mean accuracy against severity of every stage with a robustness result (empty if none)."""
    labels = ("mean accuracy under corruption", "severity (0 = clean)", "mean over the corruptions")
    return stages_figure(
        runs, "robustness", lambda block: severity_lines(block).get("mean"), "Robustness", labels
    )


# --------------------------------------------------------------------------- fine-tuning

# (metrics.csv column, legend label) of the per-epoch fine-tuning curves.
FINETUNE_CURVES = (("val/top1", "top-1"), ("val_ema/top1", "top-1, EMA"))
FINETUNE_FIELDS = ("top1", "top5", "label_fraction", "epochs", "train_images", "source")


def finetune_curves(run_dir: Path, prefix: str = "") -> dict[str, Points]:
    """``{label: [(epochs trained, top-1 %)]}`` from a fine-tuning run's ``metrics.csv``."""
    curves: dict[str, Points] = {}
    try:
        with (run_dir / "metrics.csv").open(newline="", errors="replace") as f:
            rows = list(csv.DictReader(f))
    except (OSError, csv.Error):
        return curves
    for column, label in FINETUNE_CURVES:
        points = [
            (epoch + 1, value)
            for row in rows
            if (epoch := number(row.get("epoch"))) is not None
            and (value := number(row.get(column))) is not None
        ]
        if points:
            curves[f"{prefix}{label}"] = points
    return curves


def finetune_section(run_dir: Path) -> str:
    """A fine-tuning run: its ``finetune.json`` and its top-1 per epoch."""
    result = read_json(run_dir / "finetune.json")
    parts = [
        table(["metric", "value"], [[k, result.get(k)] for k in FINETUNE_FIELDS])
        if result
        else not_available("fine-tuning result (finetune.json)")
    ]
    curves = finetune_curves(run_dir)
    if curves:
        svg = line_svg(curves, "fine-tuning", "epochs trained", "top-1 on the evaluation split (%)")
        parts.append(figure(svg, "image/svg+xml", "fine-tuning curve"))
    else:
        parts.append(not_available("fine-tuning curve (val/top1 in metrics.csv)"))
    if isinstance(result.get("robustness"), dict):
        parts.append("<h4>Robustness of the fine-tuned classifier</h4>")
        parts.append(robustness_section(result["robustness"]))
    return "".join(parts)


def finetune_pipeline_section(root: Path, summary: dict[str, Any]) -> str:
    """The fine-tuning stages of a pipeline (``results.json``): scores and top-1 curves, one
    line per run (per seed where a stage has several)."""
    results = summary.get("results") or {}
    stages = {
        k: r["finetune"] for k, r in results.items() if isinstance(r, dict) and "finetune" in r
    }
    if not stages:
        return ""
    header = ["stage", "from", "labels", "epochs", "runs", "top-1", "± std", "top-5",
              "corrupted top-1"]  # fmt: skip
    rows = [
        [name, r.get("init"), r.get("label_fraction"), r.get("epochs"), r.get("runs"),
         r.get("top1"), r.get("top1_std"), r.get("top5"), r.get("corruption_top1")]
        for name, r in stages.items()
    ]  # fmt: skip
    curves: dict[str, Points] = {}
    for name in stages:
        runs = sorted((root / name).glob("seed*")) or [root / name]
        for run_dir in runs:
            label = name if run_dir.name == name else f"{name}/{run_dir.name}"
            curves |= finetune_curves(run_dir, prefix=f"{label} ")
    parts = ["<h2>Fine-tuning</h2>", table(header, rows)]
    if curves:
        svg = line_svg(curves, "fine-tuning", "epochs trained", "top-1 on the evaluation split (%)")
        parts.append(figure(svg, "image/svg+xml", "fine-tuning curves"))
    return "".join(parts)


def write_report(path: str | Path) -> Path:
    """Write ``<path>/report.html`` for a run or pipeline directory and return its path.

    Raises:
        ConfigError: ``path`` is not a directory, or holds neither a run nor pipeline stages.
    """
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"not a directory: {root}")
    if not (is_run_dir(root) or (root / "metrics.csv").is_file() or find_stages(root)):
        raise ConfigError(f"{root} holds no run (config.yaml, eval.json, metrics.csv) or stages")
    out = root / REPORT_NAME
    out.write_text(render(root), encoding="utf-8")
    return out
