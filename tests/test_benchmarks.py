"""The benchmark scripts stay runnable (tiny sizes, no --append); they never assert speed."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


ONE_ROUND = ("--batch", "4", "--rounds", "1", "--warmup", "1")  # train_step.py: one timed round


def tiny_train_step(*args: str) -> str:
    """``benchmarks/train_step.py`` on the tiny Fashion-MNIST ViT, on the CPU."""
    return run("train_step.py", "--model", "vit_t_fmnist", "--device", "cpu", *args)


def test_train_step_prints_every_case_and_the_summary():
    out = tiny_train_step(*ONE_ROUND, "--inner", "1")
    for case in ("mae", "lightly", "maect", "maect_eager", "can", "can_eager", "simclr"):
        assert f"\n{case} " in out
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("summary mae_vs_peer=") and "can_vs_simclr_flops=" in summary


def test_train_step_refiner_cases():
    out = tiny_train_step("--batch", "4", "--cases", "refiner,refiner_head", "--flops-only")
    assert "\nrefiner " in out and "\nrefiner_head " in out


def test_train_step_named_candidates_and_memory_print_each_group():
    out = tiny_train_step(*ONE_ROUND, "--cases", "mae", "--candidates", "sync,checkpointing")
    assert "mae guard on device (sync-free)" in out and "mae activation checkpointing" in out
    assert "summary" not in out and "\nlightly " not in out  # named candidates run alone
    out = tiny_train_step("--batch", "2", "--cases", "mae", "--memory")
    assert "memory mae: stored for backward" in out
    assert "memory mae, activation checkpointing: stored for backward" in out


def test_sync_check_dry_runs_on_cpu():
    out = run(
        "sync_check.py", "--device", "cpu", "--methods", "mae", "--steps", "3", "--batch", "8",
        "--workers", "0",
    )  # fmt: skip
    row = out.strip().splitlines()[-1].split()
    assert row[:4] == ["mae", "3", "0", "0.00"]


def test_eval_prints_each_task_against_its_peer():
    out = run(
        "eval.py", "--device", "cpu", "--banks", "synthetic", "--tasks", "knn,kmeans,linear",
        "--bank-size", "2000", "--queries", "200", "--dim", "16", "--classes", "5",
    )  # fmt: skip
    assert "sklearn brute cosine" in out and "lightly knn_predict" in out
    assert "maect, whole bank per block" in out and "100.00% same predictions" in out
    assert "sklearn KMeans lloyd" in out and "one lr at a time" in out


def test_eval_reads_a_feature_cache(tmp_path):
    gen = torch.Generator().manual_seed(0)
    for split, n in (("train", 300), ("test", 50)):
        features = torch.randn(n, 8, generator=gen)
        labels = torch.randint(3, (n,), generator=gen)
        torch.save({"features": features, "labels": labels}, tmp_path / f"{split}-cls-0.pt")
    out = run("eval.py", "--device", "cpu", "--banks", f"features:{tmp_path}", "--tasks", "knn")
    assert f"cached features {tmp_path} 300 x 50 x 8" in out and "sklearn brute cosine" in out
    (tmp_path / "test-cls-1.pt").write_bytes(b"")
    with pytest.raises(AssertionError, match="expected one test"):
        run("eval.py", "--device", "cpu", "--banks", f"features:{tmp_path}", "--tasks", "knn")


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="needs Fashion-MNIST"
)
def test_demo_profile_prints_the_table():
    out = run("demo_profile.py", "--stages", "mae", "--steps", "1", "--no-eval")
    assert "| step mae | " in out and "in matrix products |" in out and "| monitor mae | " in out
    assert "| total | | | " in out and "GFLOP per CPU s" in out


def test_wait_policy_times_both_launches():
    out = run("wait_policy.py", "--rounds", "1", "--steps", "2", "--batch", "8", "--busy", "0")
    assert "maect (PASSIVE)    busy=0" in out and "libgomp default    busy=0" in out


def test_data_prints_every_worker_case_and_the_device_augmentation():
    out = run(
        "data.py", "--device", "cpu", "--rounds", "1", "--per-class", "2", "--batch", "4",
        "--images", "2",
    )  # fmt: skip
    for case in ("decode", "mae loader", "mae device", "byol loader", "shards byol device"):
        assert f"\n{case} " in out
    assert "batched device aug, byol x2, batch 4" in out


def test_train_step_candidates_onednn_alone_in_cpu_seconds():
    out = run(
        "train_step.py", "--batch", "2", "--rounds", "1", "--warmup", "0", "--device", "cpu",
        "--cases", "mae", "--candidates", "onednn", "--clock", "cpu",
    )  # fmt: skip
    assert "\nmae oneDNN linear " in out and "mae MKL linear" in out
    assert "lightly" not in out and "summary" not in out  # named groups only, no peer cases


def test_cpu_linear_prints_every_shape():
    out = run("cpu_linear.py", "--tokens", "16", "--rounds", "1")
    assert out.count("\n| 16 | ") == 7 and "rel. error MKL / oneDNN" in out


def test_train_step_times_finetuning_against_a_plain_timm_loop():
    out = tiny_train_step(*ONE_ROUND, "--inner", "1", "--cases", "finetune,finetune_plain")
    assert "\nfinetune " in out and "\nfinetune_plain " in out
    assert "finetune_vs_plain=" in out.strip().splitlines()[-1]
