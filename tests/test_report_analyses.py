"""``maect report``: the per-block (accuracy against depth) and robustness sections."""

import json

from maect.report import depth_lines, render, severity_lines

LAYERS = {
    "protocol": "per block: each block's tokens through the final norm, pooled, frozen",
    "protocols": ["knn", "linear"],
    "blocks": {
        "10": {"knn": {"protocol": "k", "top1": 70.0}},
        "0": {"knn": {"protocol": "k", "top1": 50.0}, "linear": {"top1": 60.0}},
        "2": {"knn": {"top1": 65.0}, "linear": {"top1": 75.0}},
    },
}
ROBUSTNESS = {
    "protocol": "linear probe on clean frozen features, applied to corrupted test features",
    "clean": 90.0,
    "top1": {"fog": {"1": 80.0, "2": 60.0, "mean": 70.0}, "snow": {"1": 70.0, "2": 50.0}},
    "per_severity": {"1": 75.0, "2": 55.0},
    "mean": 65.0,
    "n_test": 10,
    "mce": 88.5,
}


def test_lines_from_eval_json():
    lines = depth_lines(LAYERS)
    assert lines == {"knn": [(0, 50.0), (2, 65.0), (10, 70.0)], "linear": [(0, 60.0), (2, 75.0)]}
    lines = severity_lines(ROBUSTNESS)
    assert lines["fog"] == [(0, 90.0), (1, 80.0), (2, 60.0)]  # "mean" is not a severity
    assert lines["mean"] == [(0, 90.0), (1, 75.0), (2, 55.0)]


def test_run_and_pipeline_pages_show_the_analyses(tmp_path):
    for name, robust in (("mae", ROBUSTNESS), ("maect", {**ROBUSTNESS, "per_severity": {"1": 80}})):
        run = tmp_path / name
        run.mkdir()
        (run / "config.yaml").write_text(f"method: {name}\n")
        result = {"knn": {"top1": 1.0}, "layers": LAYERS, "robustness": robust}
        (run / "eval.json").write_text(json.dumps(result))
    page = render(tmp_path / "mae")
    assert "Accuracy against depth" in page and "Robustness" in page
    assert "per block: each block" in page and "per block: per block" not in page
    assert page.count("<svg") == 0 and page.count("image/svg+xml") == 2
    assert "88.50" in page  # the mCE
    assert "fog.1" not in page  # the analyses are not repeated in the flat metrics table
    pipeline = render(tmp_path)
    assert "<h3>Robustness</h3>" in pipeline  # the stages' mean accuracy against severity
    assert "<h3>Accuracy against depth</h3>" in pipeline  # the stages' k-NN against depth
    assert pipeline.count("image/svg+xml") == 2 + 2 * 2
