"""``maect report``: the HTML page of a run and of a pipeline, and its rendering in Chromium."""

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from maect.cli import main
from maect.report import curve_panels, curves_svg, read_metrics, write_report

CONFIG = """method: mae
recipe: mae/fmnist_vit_t
data:
  name: fashion-mnist
mae:
  mask_ratio: 0.75
"""
# Lightning CSVLogger layout: step rows, epoch-end rows and a monitor metric, each sparse.
METRICS = """\
epoch,step,train/loss_step,train/mse_step,train/lr,img_per_s,train/loss_epoch,monitor/knn_top1
0,0,1.20,0.90,1e-4,500.5,,
0,1,1.00,0.80,2e-4,510.0,,
0,1,,,,,1.10,
0,1,,,,,,42.5
1,2,0.80,0.70,3e-4,,,
1,3,0.70,0.60,2e-4,505.0,,
1,3,,,,,0.75,
1,3,,,,,,55.25
"""
TUNE_METRICS = """epoch,step,train/loss_step,train/nn_acc_step,train/lr,train/nn_acc_epoch
0,0,5.5,0.10,1e-4,
0,1,5.0,0.20,1e-4,
0,1,,,,0.15
"""
EVAL = {
    "knn": {"top1": 71.25, "k": 20},
    "linear": {"top1": 80.5},
    "lowshot": {"1": 30.125, "2": 40.0, "5": 50.0, "1pct": 60.0},
    "cluster": {"acc": 55.5, "nmi": 50.0, "ami": 49.0, "ari": 33.0},
    "features": {"source": "<run & co>", "pooling": "cls", "n_train": 64},
    "timing": {"knn": 0.5, "total": 3.0},
    "config": {"seed": 0},
    "created": "2025-01-01T00:00:00+00:00",
}
# Distinct colours, so the Chromium screenshot shows which images were decoded.
RECON_COLOR = (255, 0, 255)
EMBED_COLOR = (0, 160, 255)


def write_png(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (48, 24)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def make_run(path: Path, config: str = CONFIG, metrics: str = METRICS, evaluated: bool = True):
    """A pretrain run directory as the engine and ``maect evaluate`` leave it."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(config)
    (path / "metrics.csv").write_text(metrics)
    for epoch in range(1, 6):
        write_png(path / "reconstructions" / f"epoch_{epoch:04d}.png", RECON_COLOR, (96, 12))
    if evaluated:
        (path / "eval.json").write_text(json.dumps(EVAL))
        write_png(path / "embedding.png", EMBED_COLOR, (64, 64))
    return path


def make_pipeline(root: Path) -> Path:
    """Two stages: an MAE run and an MAE-CT run initialised from it (by a path that no longer
    resolves from here, so the sibling stage is found by name), plus ``results.json``."""
    make_run(root / "mae")
    tuned = root / "maect"
    tuned.mkdir()
    (tuned / "config.yaml").write_text(
        "method: maect\nrecipe: maect/fmnist_vit_t\nmaect:\n  init: /elsewhere/runs/mae\n"
    )
    for stage in ("head", "tune"):
        (tuned / stage).mkdir()
        (tuned / stage / "metrics.csv").write_text(TUNE_METRICS)
    eval_tuned = {**EVAL, "knn": {"top1": 77.75}}
    (tuned / "eval.json").write_text(json.dumps(eval_tuned))
    write_png(tuned / "embedding.png", (255, 128, 0), (64, 64))
    summary = {
        "pipeline": "fmnist_compare",
        "train_seconds": {"mae": 120.0, "maect": 60.0},
        "results": {"mae": EVAL, "maect": eval_tuned},
        "comparisons": [
            {
                "method": "maect",
                "baseline": "mae",
                "claim": "k-NN gain",
                "deltas": {"knn.top1": 6.5},
            }
        ],
    }
    (root / "results.json").write_text(json.dumps(summary))
    return root


def test_run_report(tmp_path):
    run = make_run(tmp_path / "my-run")
    out = write_report(run)
    assert out == run / "report.html"
    page = out.read_text()
    assert "<table" in page and "71.25" in page and "80.50" in page and "30.12" in page
    assert "&lt;run &amp; co&gt;" in page and "<run & co>" not in page
    assert not re.search(r"https?:", page, re.IGNORECASE)
    assert "<script" not in page and "<link" not in page
    images = re.findall(r'<img[^>]* src="data:(image/[a-z+]+);base64,([^"]+)"', page)
    kinds = [kind for kind, _ in images]
    assert kinds.count("image/svg+xml") == 1  # the curves
    assert kinds.count("image/png") == 4  # three reconstruction grids and the embedding
    for kind, data in images:
        assert base64.b64decode(data, validate=True).startswith(
            b"\x89PNG" if kind == "image/png" else b"<?xml"
        )
    assert [f"epoch {e}" in page for e in (1, 2, 3, 4, 5)] == [True, False, True, False, True]
    assert "<details><summary>config.yaml</summary>" in page and "mask_ratio: 0.75" in page
    assert "mae/fmnist_vit_t" in page and "not available" not in page


def test_curve_panels_from_sparse_metrics(tmp_path):
    (tmp_path / "metrics.csv").write_text(METRICS)
    series = read_metrics(tmp_path / "metrics.csv")
    assert series["train/loss_epoch"] == [(1.0, 1.10), (3.0, 0.75)]
    assert series["img_per_s"] == [(0.0, 500.5), (1.0, 510.0), (3.0, 505.0)]
    panels = dict(curve_panels(series))
    assert list(panels) == [
        "loss (total)",
        "loss term: mse",
        "learning rate",
        "images / s",
        "online k-NN top-1 (%)",
    ]
    assert set(panels["loss (total)"]) == {"per step", "epoch mean"}
    (tmp_path / "metrics.csv").write_text(TUNE_METRICS)
    assert "NN accuracy (train/nn_acc)" in dict(
        curve_panels(read_metrics(tmp_path / "metrics.csv"))
    )


def test_missing_pieces_say_not_available(tmp_path):
    run = tmp_path / "bare"
    run.mkdir()
    (run / "config.yaml").write_text(": not yaml : [")
    (run / "metrics.csv").write_text("epoch,step\n")
    (run / "eval.json").write_text("{broken")
    page = write_report(run).read_text()
    assert "eval.json is not valid JSON" in page
    assert "no metrics logged yet" in page
    assert "reconstruction grids (reconstructions/epoch_*.png): not available" in page
    assert "embedding plot (embedding.png; run maect evaluate): not available" in page
    assert "<img" not in page


def test_pipeline_report(tmp_path):
    root = make_pipeline(tmp_path / "pipe")
    page = write_report(root).read_text()
    order = [page.index(s) for s in ("<h2>Comparison", "Stage mae<", "Stage maect<")]
    assert order == sorted(order)
    comparison = page[order[0] : order[1]]
    assert "fmnist_compare" in page and "77.75" in comparison and "2.00" in comparison  # minutes
    assert "k-NN gain" in comparison and "6.50" in comparison
    tuned = page[order[2] :]
    assert "stage 2: NNCLR head (head/metrics.csv)" in tuned
    assert "stage 3: contrastive tuning (tune/metrics.csv)" in tuned
    assert "before contrastive tuning: mae (maect.init)" in tuned
    assert "after contrastive tuning: maect" in tuned
    assert 'href="#stage-maect"' in page and 'id="stage-maect"' in page
    assert not re.search(r"https?:", page, re.IGNORECASE)


def test_cli_report(tmp_path, capsys):
    run = make_run(tmp_path / "run", evaluated=False)
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "report.html")
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err


# --------------------------------------------------------------------------- Chromium

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL_SECONDS = 180


def find_chromium() -> str | None:
    return next((p for name in CHROMIUM_NAMES if (p := shutil.which(name))), None)


def chromium_or_skip() -> str:
    """A Chromium binary; installs the Debian package ``chromium`` (as root, with apt-get,
    within three minutes) when none is found, and skips the test when that is not possible."""
    found = find_chromium()
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(
            "Chromium not found and not installable here (needs root and apt-get): "
            "install the Debian package 'chromium' to run the rendering test"
        )
    deadline = time.monotonic() + INSTALL_SECONDS
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    apt = ["apt-get", "-qq", "-o", "DPkg::Lock::Timeout=60"]
    install = [*apt, "install", "-y", "--no-install-recommends", "chromium"]
    # Install from the present package lists; refresh them only when that fails.
    for command in (install, [*apt, "update"], install):
        try:
            done = subprocess.run(
                command,
                env=env,
                capture_output=True,
                text=True,
                timeout=deadline - time.monotonic(),
            )
        except subprocess.TimeoutExpired:
            pytest.skip(f"installing Chromium took over {INSTALL_SECONDS} s: skipped")
        if done.returncode == 0 and command is install:
            break
    found = find_chromium()
    if not found:
        pytest.skip(f"'apt-get install chromium' failed: {(done.stderr or done.stdout)[-300:]}")
    return found


def render(chromium: str, page: Path, work: Path) -> tuple[str, str, Image.Image]:
    """Load ``page`` headless; returns the serialised DOM, Chromium's log and a screenshot."""
    shot = work / "shot.png"
    command = [
        chromium,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={work / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
        "--window-size=1280,4000",
        f"--screenshot={shot}",
        "--dump-dom",
        page.as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    with Image.open(shot) as image:
        return done.stdout, done.stderr, image.convert("RGB")


def console_errors(log: str) -> list[str]:
    """The console messages in Chromium's log (the page has no scripts: any is an error)."""
    return [line for line in log.splitlines() if ":CONSOLE" in line]


def has_color(image: Image.Image, color: tuple[int, int, int]) -> bool:
    return any(c == color for _, c in image.getcolors(maxcolors=1 << 24))


def test_report_renders_in_chromium(tmp_path):
    chromium = chromium_or_skip()
    # The log check sees the error of a page built to have one.
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>undefinedCall()</script></body></html>")
    _, log, _ = render(chromium, bad, tmp_path / "bad")
    assert console_errors(log), f"the console error check is blind:\n{log[-2000:]}"

    page = write_report(make_pipeline(tmp_path / "pipe"))
    dom, log, shot = render(chromium, page, tmp_path / "good")
    assert not console_errors(log), console_errors(log)
    assert "<table>" in dom and "77.75" in dom and "Stage maect" in dom
    assert dom.count('src="data:image/png;base64,') == 6
    assert dom.count('src="data:image/svg+xml;base64,') == 3
    # Decoded and laid out: the reconstruction and embedding colours are on screen.
    assert has_color(shot, RECON_COLOR) and has_color(shot, EMBED_COLOR)


# --------------------------------------------------------------------------- header, labels, units

DATE = r"\d{4}-\d\d-\d\d \d\d:\d\d UTC"


def meta_line(page: str) -> str:
    return re.search(r'<p class="meta">(<span>.*?)</p>', page).group(1)


def test_times_come_from_run_json_in_one_format(tmp_path):
    """'started' was the modification time of config.yaml (moved by any rerun), and the
    evaluation date was printed in another format (ISO) than the others."""
    run = make_run(tmp_path / "run")
    times = {"started": "2024-03-05T07:08:09+00:00", "finished": "2024-03-05T09:10:11Z"}
    (run / "run.json").write_text(json.dumps(times))
    os.utime(run / "config.yaml", (1e9, 1e9))  # 2001: must not show
    page = write_report(run).read_text()
    meta = meta_line(page)
    assert "<b>started</b> 2024-03-05 07:08 UTC" in meta
    assert "<b>finished</b> 2024-03-05 09:10 UTC" in meta
    assert "<b>evaluated</b> 2025-01-01 00:00 UTC" in meta and "2001" not in meta
    dates = re.findall(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d[^<]*", re.sub(r"<pre>.*?</pre>", "", page))
    assert dates and all(re.fullmatch(DATE, d) for d in dates), dates
    (run / "run.json").write_text(json.dumps({"started": times["started"], "finished": None}))
    assert "<b>finished</b> not finished" in meta_line(write_report(run).read_text())
    (run / "run.json").unlink()
    meta = meta_line(write_report(run).read_text())
    assert re.search(r"<b>config.yaml written</b> 2001-09-09 01:46 UTC \(no run.json", meta)
    assert "<b>started</b>" not in meta


def test_units_labels_and_subsets(tmp_path):
    """Timings without a unit, an unlabelled 16-digit hash, and no word on train/test subsets."""
    run = make_run(tmp_path / "run")
    result = {
        **EVAL,
        "features": {**EVAL["features"], "n_test": 2000, "dataset": "fashion-mnist"},
        "config": {"data": {"train_subset": 64, "test_subset": None}},
    }
    result["features"]["weights"] = "0123456789abcdef"
    (run / "eval.json").write_text(json.dumps(result))
    (run / "encoder.pt").write_bytes(b"weights")
    page = write_report(run).read_text()
    assert "<td>knn</td>" in page and ">0.50 s</td>" in page and ">3.00 s</td>" in page
    expected = hashlib.sha256(b"weights").hexdigest()[:12]
    assert f"<b>SHA-256 of encoder.pt (first 12 hex digits)</b> {expected}" in page
    assert "weights id (the feature cache&#x27;s key for the evaluated weights)" in page
    assert (
        "evaluated on 64 train images (class-balanced subset, data.train_subset) and 2000 test "
        "images (the whole split) of fashion-mnist" in page
    )
    pipeline = write_report(make_pipeline(tmp_path / "pipe")).read_text()
    comparison = pipeline[pipeline.index("<h2>Comparison") : pipeline.index("Stage mae<")]
    assert "evaluated on 64 train images (the whole split)" in comparison


def test_reconstruction_rows_are_labelled(tmp_path):
    run = make_run(tmp_path / "run", config=CONFIG + "model:\n  img_size: 28\n")
    for epoch in range(1, 6):  # three rows of 28-pixel images with 1-pixel padding
        write_png(run / "reconstructions" / f"epoch_{epoch:04d}.png", RECON_COLOR, (88, 88))
    page = write_report(run).read_text()
    labels = "<span>input</span><span>masked</span><span>reconstruction</span>"
    assert page.count(f'<div class="rowlabels">{labels}</div>') == 3
    assert "after epoch 5: rows input / masked / reconstruction" in page
    write_png(run / "reconstructions" / "epoch_0005.png", RECON_COLOR, (88, 146))  # five rows
    assert "rows input / masked / reconstruction / noisy input / predicted noise" in (
        write_report(run).read_text()
    )


def test_single_point_curves_get_a_marker_a_note_and_whole_steps(monkeypatch):
    import matplotlib

    monkeypatch.setitem(matplotlib.rcParams, "svg.fonttype", "none")  # text stays text
    svg = curves_svg([("loss (total)", {"per step": [(3.0, 0.5)]})]).decode()
    assert "only step 3 logged so far" in svg and "optimizer step" in svg
    texts = re.findall(r"<text[^>]*>([^<]*)</text>", svg)
    assert texts[:4] == ["2", "3", "4", "optimizer step"], (
        texts
    )  # whole steps around the point, not 2.96 ... 3.04
    assert svg.count('id="m') >= 1  # the point is drawn as a marker


def test_embedding_legend_is_beside_the_points(tmp_path, monkeypatch):
    """The t-SNE legend was placed 'best' inside the axes, over points."""
    from matplotlib.figure import Figure

    from maect.evaluation.command import save_embedding_plot

    saved = []
    original = Figure.savefig
    monkeypatch.setattr(
        Figure, "savefig", lambda fig, *a, **k: (saved.append(fig), original(fig, *a, **k))
    )
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=gen) + torch.arange(200).remainder(10)[:, None]
    y = torch.arange(200).remainder(10)
    save_embedding_plot(x, y, tmp_path / "embedding.png", 200, 0, "test", ("a",) * 10)
    (fig,) = saved
    (ax,) = fig.axes
    legend = ax.get_legend().get_window_extent()
    assert not legend.overlaps(ax.get_window_extent())
    assert fig.bbox.x0 <= legend.x0 and legend.x1 <= fig.bbox.x1  # and inside the image
