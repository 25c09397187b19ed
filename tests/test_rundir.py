"""Run directories: nothing written before the checks pass, one process per directory (a lock a
killed run does not leave stale), run.json's times, no-op reruns that write nothing, and
extending a finished run by raising trainer.epochs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from maect.atomic import atomic_write_text
from maect.config import ConfigError, load_config
from maect.engine import pretrain
from maect.methods.schedule import warmup_cosine
from maect.rundir import LOCK_FILE, RunDirectory, RunDirectoryError, RunLock
from maect.tuning import tune
from tests.conftest import TINY_OVERRIDES, run_cli
from tests.test_maect import MAECT_TINY

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def _cli(capsys, *argv: str) -> tuple[int, str]:
    code = run_cli(*argv)
    return code, capsys.readouterr().err


# --------------------------------------------------------------------------- nothing written early


def test_a_failing_command_writes_nothing_and_the_corrected_one_runs(tiny_cfg, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match="more than the 10 training images"):
        pretrain(tiny_cfg("data.synthetic_size=10"), run)  # batch 16 > 10 images
    assert not run.exists()
    run.mkdir()  # an existing, empty directory stays empty too
    with pytest.raises(ConfigError, match="more than the 10 training images"):
        pretrain(tiny_cfg("data.synthetic_size=10"), run)
    assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]
    pretrain(tiny_cfg("trainer.epochs=1", "trainer.recon_every=100"), run)  # not "another config"
    assert (run / "encoder.pt").is_file()


def test_a_wrong_init_writes_nothing_and_the_corrected_tune_runs(tmp_path, capsys):
    from maect.checkpoints import save_encoder
    from maect.methods.base import arch_from_config
    from maect.models.vit import MaskedViT

    init = tmp_path / "init.pt"
    cfg = load_config("maect/fmnist_vit_t", [*MAECT_TINY, f"maect.init={init}"])
    save_encoder(MaskedViT(arch_from_config(cfg)), init)
    out = tmp_path / "tune"
    args = ["tune", "recipe=maect/fmnist_vit_t", f"out={out}", *MAECT_TINY]
    code, err = _cli(capsys, *args, f"init={tmp_path / 'nothing.pt'}")
    assert code == 2 and "checkpoint not found" in err and not out.exists()
    # the queue check needs the number of processes: it too runs before anything is written
    code, err = _cli(capsys, *args, f"init={init}", "maect.queue_size=60")
    assert code == 2 and "maect.queue_size=60 is not a multiple" in err and not out.exists()
    tune(cfg, out, dev_run=1)
    assert (out / "config.yaml").is_file()


def test_trainer_settings_lightning_refuses_write_nothing(tiny_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"Lightning refuses .*strategy=deepspeed.*DeepSpeed ins"):
        pretrain(tiny_cfg("trainer.strategy=deepspeed"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- run.json, reruns


def _finished_run(tiny_cfg, run: Path, *overrides: str) -> None:
    pretrain(tiny_cfg("trainer.recon_every=100", "trainer.monitor_every=0", *overrides), run)


def test_a_no_op_rerun_writes_nothing(tiny_cfg, tmp_path):
    run = tmp_path / "run"
    _finished_run(tiny_cfg, run, "trainer.epochs=1")
    record = json.loads((run / "run.json").read_text())
    assert ISO_UTC.match(record["started"]) and ISO_UTC.match(record["finished"])
    assert record["started"] <= record["finished"] and record["resumed"] == []
    assert record["maect_version"] and record["host"] and record["cpu"] and record["command"]
    before = _files(run)
    time.sleep(0.01)
    _finished_run(tiny_cfg, run, "trainer.epochs=1")
    assert _files(run) == before  # config.yaml and run.json included


def _files(run: Path) -> dict[Path, tuple[int, bytes]]:
    """Every file's mtime and content, but the lock's (it names its latest holder)."""
    return {
        p: (p.stat().st_mtime_ns, p.read_bytes())
        for p in run.rglob("*")
        if p.is_file() and p.name != LOCK_FILE
    }


def test_a_resumed_run_keeps_its_start_time(tiny_cfg, tmp_path):
    run = tmp_path / "run"
    _finished_run(tiny_cfg, run, "trainer.epochs=2", "trainer.checkpoint_every=1")
    first = json.loads((run / "run.json").read_text())
    (run / "encoder.pt").unlink()  # as if killed after epoch 1
    (run / "checkpoints" / "last.ckpt").write_bytes(
        (run / "checkpoints" / "epoch0001.ckpt").read_bytes()
    )
    _finished_run(tiny_cfg, run, "trainer.epochs=2", "trainer.checkpoint_every=1")
    record = json.loads((run / "run.json").read_text())
    assert record["started"] == first["started"] and len(record["resumed"]) == 1
    assert ISO_UTC.match(record["resumed"][0]) and record["finished"] >= first["finished"]


def test_temporary_names_never_collide(tmp_path):
    """Concurrent writers of one file (threads of one process, so one pid) each use their own
    temporary name: every rename succeeds and no temporary file is left."""
    path = tmp_path / "config.yaml"
    errors: list[Exception] = []

    def write(i: int) -> None:
        try:
            for _ in range(20):
                atomic_write_text(path, f"writer {i}\n" * 1000)
        except Exception as err:  # a shared name makes one rename fail
            errors.append(err)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and [p.name for p in tmp_path.iterdir()] == ["config.yaml"]
    assert len(set(path.read_text().splitlines())) == 1  # one whole write, not a mix
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --------------------------------------------------------------------------- lock

HOLD_LOCK = """
import sys, time
from pathlib import Path
from maect.rundir import RunLock
RunLock(Path(sys.argv[1])).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def _hold_lock(run: Path) -> subprocess.Popen:
    run.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(run)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_process_is_refused_and_a_killed_one_leaves_no_lock(tiny_cfg, tmp_path, capsys):
    run = tmp_path / "run"
    holder = _hold_lock(run)
    try:
        code, err = _cli(
            capsys, "pretrain", "recipe=mae/fmnist_vit_t", f"out={run}", *TINY_OVERRIDES
        )
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert err.startswith(
            f"maect pretrain: error: {run} is in use by another maect process (pid {holder.pid} "
        )
        assert err.strip().endswith("wait for it to finish or stop it")
        assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]  # refused before any write
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the kernel released the killed holder's lock: the next run goes ahead
    pretrain(tiny_cfg(), run, dev_run=1)
    lock = RunLock(run)
    lock.acquire()
    assert f"pid {os.getpid()} " in (run / LOCK_FILE).read_text()
    lock.release()


HOLD_AND_FORK = """
import os, sys, time
from pathlib import Path
from maect.rundir import RunLock
RunLock(Path(sys.argv[1])).acquire()
child = os.fork()  # like a loader worker: outlives a killed parent for a while
if child == 0:
    time.sleep(120)
    os._exit(0)
print(child, flush=True)
time.sleep(120)
"""


def test_a_killed_run_s_forked_workers_do_not_keep_the_lock(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_AND_FORK, str(run)], stdout=subprocess.PIPE, text=True
    )
    child = int(holder.stdout.readline())
    try:
        with pytest.raises(RunDirectoryError, match=f"pid {holder.pid} "):
            RunLock(run).acquire()
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        lock = RunLock(run)
        lock.acquire()  # at once, while the forked child still runs
        lock.release()
    finally:
        holder.kill()
        os.kill(child, signal.SIGKILL)


def test_ranks_of_one_launch_do_not_refuse_each_other(tiny_cfg, tmp_path, monkeypatch):
    run = tmp_path / "run"
    holder = _hold_lock(run)  # rank 0 of the launch holds the lock
    config = tiny_cfg().to_dict()
    try:
        for env in ({"RANK": "1"}, {"LOCAL_RANK": "1"}, {"SLURM_PROCID": "3"}):
            with monkeypatch.context() as patch:
                for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "NODE_RANK", "GROUP_RANK"):
                    patch.delenv(key, raising=False)
                for key, value in env.items():
                    patch.setenv(key, value)
                with RunDirectory(run, config) as rank:
                    assert not rank.leader and not rank.lock.held
                    rank.commit()  # writes nothing: the leader does
                assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(RunDirectoryError, match="in use by another maect process"):
            RunDirectory(run, config)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


@pytest.mark.slow
def test_two_maect_processes_on_one_directory(tmp_path):
    """The real thing: a second `maect pretrain` on a running one's out= is refused at once."""
    run = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "maect",
        "pretrain",
        "recipe=mae/fmnist_vit_t",
        f"out={run}",
        *TINY_OVERRIDES,
        "trainer.epochs=1000",
        "data.num_workers=0",
    ]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (run / "checkpoints" / "last.ckpt").is_file():  # training has started
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        second = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2
        assert (
            second.stderr.strip()
            .splitlines()[-1]
            .startswith(
                f"maect pretrain: error: {run} is in use by another maect process (pid {first.pid} "
            )
        )
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    lock = RunLock(run)
    lock.acquire()  # not stale after kill -9
    lock.release()


# --------------------------------------------------------------------------- extending


class StepLR(Callback):
    """Records the lr each optimizer step is taken with."""

    def __init__(self) -> None:
        self.lrs: dict[int, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]


def test_raising_epochs_continues_a_finished_run(tiny_cfg, tmp_path):
    """4 steps per epoch; 1 epoch, then raised to 3: steps 4-11 continue from the checkpoint on
    the warmup + cosine schedule recomputed over the new total (12 steps)."""
    run = tmp_path / "run"
    common = ("optim.warmup_epochs=0.5", "trainer.checkpoint_every=1")
    first, longer = StepLR(), StepLR()
    quiet = ("trainer.recon_every=100", "trainer.monitor_every=0")
    pretrain(tiny_cfg(*quiet, "trainer.epochs=1", *common), run, callbacks=[first])
    first_encoder = (run / "encoder.pt").read_bytes()
    first_record = json.loads((run / "run.json").read_text())

    pretrain(tiny_cfg(*quiet, "trainer.epochs=3", *common), run, callbacks=[longer])
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 12 and last["epoch"] == 2  # 0-based, saved at its end
    assert (run / "encoder.epoch0001.pt").read_bytes() == first_encoder  # the 1-epoch result
    assert (run / "encoder.pt").read_bytes() != first_encoder
    record = json.loads((run / "run.json").read_text())
    assert record["started"] == first_record["started"]
    assert [(e["epochs_before"], e["epochs"]) for e in record["extended"]] == [(1, 3)]

    peak = tiny_cfg().optim.base_lr * 16 / 256
    assert sorted(first.lrs) == [0, 1, 2, 3] and sorted(longer.lrs) == list(range(4, 12))
    for step, lr in first.lrs.items():
        assert lr == pytest.approx(peak * warmup_cosine(step, 2, 4), rel=1e-6), step
    for step, lr in longer.lrs.items():  # step 4 included: not the old schedule's 0
        assert lr == pytest.approx(peak * warmup_cosine(step, 2, 12), rel=1e-6), step
    # where the 1-epoch schedule ended (min_lr = 0), the longer one is near its peak: a restart
    assert warmup_cosine(4, 2, 4) == 0 and longer.lrs[4] > 0.8 * peak

    # only trainer.epochs may change on a finished run, and only upwards
    with pytest.raises(RunDirectoryError, match="finished after 3 epochs; trainer.epochs=2"):
        _finished_run(tiny_cfg, run, "trainer.epochs=2", *common)
    with pytest.raises(RunDirectoryError, match=r"another config \(mae.mask_ratio"):
        _finished_run(tiny_cfg, run, "trainer.epochs=4", "mae.mask_ratio=0.5", *common)


def test_raising_epochs_continues_a_finished_tune(tmp_path):
    from maect.checkpoints import save_encoder
    from maect.methods.base import arch_from_config
    from maect.models.vit import MaskedViT

    init = tmp_path / "init.pt"
    cfg = load_config("maect/fmnist_vit_t", [*MAECT_TINY, f"maect.init={init}"])
    save_encoder(MaskedViT(arch_from_config(cfg)), init)
    run = tmp_path / "tune"
    tune(cfg, run)
    head = (run / "head" / "head.pt").stat().st_mtime_ns
    longer = load_config(
        "maect/fmnist_vit_t", [*MAECT_TINY, f"maect.init={init}", "trainer.epochs=2"]
    )
    tune(longer, run)
    last = torch.load(run / "tune" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2 * 4 and last["epoch"] == 1
    assert (run / "head" / "head.pt").stat().st_mtime_ns == head  # stage 2 is not repeated
    assert (run / "encoder.epoch0001.pt").is_file() and (run / "encoder.pt").is_file()
