"""Real processes killed with SIGKILL: rerunning the same command ends with the weights, optimizer
state, lr schedule, queue and EMAs of an uninterrupted run (CPU, deterministic mode), also when
training from streaming shards and with device augmentation; a kill while a checkpoint is being
written leaves the previous one readable."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from maect.atomic import leftover_temporaries
from maect.checkpoints import save_encoder
from maect.config import load_config
from maect.data.shards import write_shards
from maect.faults import AtomicCheckpointIO, resume_checkpoint
from maect.methods.base import arch_from_config
from maect.models.vit import MaskedViT
from tests.conftest import TINY_OVERRIDES
from tests.test_maect import MAECT_TINY
from tests.test_refiner import REFINER_TINY

pytestmark = pytest.mark.slow

STEPS_PER_EPOCH = 8
COMMON = [
    *TINY_OVERRIDES,
    "data.synthetic_size=128",
    "trainer.epochs=3",
    "trainer.checkpoint_every_steps=2",
    "trainer.deterministic=true",
    "data.num_workers=0",
    "trainer.recon_every=100",
    "trainer.cpu_matmul=onednn",  # the oneDNN products resume bit for bit too (auto: AMD only)
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _pretrain(recipe: str) -> list[str]:
    return ["pretrain", f"recipe={recipe}"]


def _command(args: list[str], out: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "maect", *args, f"out={out}", *COMMON, *extra]


def _step(path: Path) -> int | None:
    """Global step of a checkpoint, or None while there is none (writes are atomic)."""
    try:
        return int(torch.load(path, weights_only=True)["global_step"])
    except (FileNotFoundError, RuntimeError):
        return None


def _run(command: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=ENV)


def _check(proc: subprocess.Popen, log: Path) -> None:
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]


TUNE_OVERRIDES = {"maect": MAECT_TINY, "refiner": REFINER_TINY}


def _tune_setup(tmp_path: Path, method: str) -> tuple[list[str], list[str]]:
    init = tmp_path / "init.pt"
    overrides = TUNE_OVERRIDES[method]
    cfg = load_config(f"{method}/fmnist_vit_t", overrides)
    torch.manual_seed(0)
    save_encoder(MaskedViT(arch_from_config(cfg)), init)
    extra = [o for o in overrides if o not in TINY_OVERRIDES and not o.startswith("trainer.")]
    return ["tune", f"recipe={method}/fmnist_vit_t", f"init={init}"], extra


def _finetune_setup(tmp_path: Path) -> list[str]:
    """Fine-tuning a saved encoder with every augmentation of the recipe on (RandAugment, random
    erasing, mixup / cutmix draw from Python's and NumPy's generators)."""
    init = tmp_path / "init.pt"
    torch.manual_seed(0)
    save_encoder(MaskedViT(arch_from_config(load_config("mae/fmnist_vit_t", COMMON))), init)
    return ["finetune", str(init), "recipe=finetune/fmnist_vit_t"]


CASES = ["mae", "can", "maect", "refiner", "mae-shards", "can-device", "finetune"]


@pytest.mark.parametrize("case", CASES)
def test_sigkill_then_same_command_gives_the_same_run(tmp_path, case):
    subdir, result = "", "encoder.pt"
    if case in TUNE_OVERRIDES:
        args, extra = _tune_setup(tmp_path, case)
        subdir = "tune"
    elif case == "mae-shards":  # streaming shards read by a loader worker
        root = tmp_path / "shards"
        write_shards("synthetic", root, synthetic_size=128, img_size=28, channels=1)
        args = _pretrain("mae/fmnist_vit_t")
        extra = ["data.name=shards", f"data.root={root}", "data.num_workers=1"]
    elif case == "can-device":  # colour operations batched after the transfer
        args, extra = _pretrain("can/fmnist_vit_t"), ["data.augment_on=device"]
    elif case == "finetune":
        args, extra, result = _finetune_setup(tmp_path), [], "classifier.pt"
    else:
        args, extra = _pretrain(f"{case}/fmnist_vit_t"), []
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    reference = _run(_command(args, whole, extra), tmp_path / "whole.log")
    victim = _run(_command(args, killed, extra), tmp_path / "killed.log")

    # kill at an arbitrary moment after a mid-run checkpoint of the first epoch (not necessarily
    # between steps), leaving two epochs of margin: a fast machine can train 8 tiny steps between
    # two polls, and a kill after the last checkpoint would not test resuming mid-run
    target = random.randint(3, STEPS_PER_EPOCH)
    last = killed / subdir / "checkpoints" / "last.ckpt"
    while (_step(last) or 0) < target:
        assert victim.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    time.sleep(random.uniform(0.0, 0.1))
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    assert not (killed / result).exists()
    killed_at = _step(last)

    rerun = _run(_command(args, killed, extra), tmp_path / "rerun.log")
    _check(rerun, tmp_path / "rerun.log")
    _check(reference, tmp_path / "whole.log")
    assert "resuming" in (tmp_path / "rerun.log").read_text()

    a = torch.load(whole / subdir / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert a["global_step"] == b["global_step"] == 3 * STEPS_PER_EPOCH > killed_at
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():  # includes queues and EMAs (MAE-CT, refiner)
        assert torch.equal(b["state_dict"][key], value), key
    for got, want in zip(
        b["optimizer_states"][0]["state"].values(),
        a["optimizer_states"][0]["state"].values(),
        strict=True,
    ):
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert a["lr_schedulers"] == b["lr_schedulers"]
    encoders = [torch.load(run / result, weights_only=True)["model"] for run in (whole, killed)]
    for key, value in encoders[0].items():
        assert torch.equal(encoders[1][key], value), key


SLOW_SAVE = """
import os, sys, time, torch
from maect.faults import AtomicCheckpointIO
io, path = AtomicCheckpointIO(), sys.argv[1]
io.save_checkpoint({"state_dict": {"w": torch.zeros(10)}, "global_step": 1}, path)
os.fsync = lambda fd: time.sleep(60)  # hold the new file between its write and its rename
io.save_checkpoint({"state_dict": {"w": torch.ones(1_000_000)}, "global_step": 2}, path)
"""


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, str(path)], env=ENV)
    deadline = time.monotonic() + 120
    while not [p for p in leftover_temporaries(path) if p.stat().st_size > 4_000_000]:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    found, ckpt = resume_checkpoint(path.parent, {})
    assert found == path and ckpt["global_step"] == 1
    # the next write of that checkpoint (the resumed run's) removes the killed one's temporary
    AtomicCheckpointIO().save_checkpoint({"state_dict": {}, "global_step": 3}, path)
    assert leftover_temporaries(path) == [] and sorted(path.parent.iterdir()) == [path]
