"""The benchmark scripts stay runnable (tiny sizes, no --append); they never assert speed."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # subprocesses, ~15 s

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=BENCHMARKS.parent,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_train_step_prints_every_case_and_the_summary():
    out = run(
        "train_step.py", "--model", "vit_t_fmnist", "--batch", "4", "--rounds", "1",
        "--warmup", "1", "--inner", "1", "--device", "cpu",
    )  # fmt: skip
    for case in ("mae", "lightly", "maect", "maect_eager", "can", "can_eager", "simclr"):
        assert f"\n{case} " in out
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("summary mae_vs_peer=") and "can_vs_simclr_flops=" in summary


def test_eval_prints_each_task_against_its_peer():
    out = run(
        "eval.py", "--device", "cpu", "--banks", "synthetic", "--tasks", "knn,kmeans,linear",
        "--bank-size", "2000", "--queries", "200", "--dim", "16", "--classes", "5",
    )  # fmt: skip
    assert "sklearn brute cosine" in out and "lightly knn_predict" in out
    assert "sklearn KMeans lloyd" in out and "one lr at a time" in out
