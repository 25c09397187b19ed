"""Faults and bad input: atomic checkpoints, disk full, corrupt checkpoints with fallback,
non-finite losses (stop or skip), exact mid-epoch resume after a crash, the rank-sharded
training order, and one-line errors for bad input."""

from __future__ import annotations

import csv
import logging
import re
import resource
import signal
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

from maect.checkpoints import CheckpointError, CheckpointWriteError, atomic_save, save_encoder
from maect.config import ConfigError, load_config
from maect.data import loader as loader_module
from maect.data.loader import EpochShuffleSampler, SeededItems, collate_samples
from maect.engine import RunCheckpoint, pretrain
from maect.evaluation.knn import knn_accuracy
from maect.faults import (
    AtomicCheckpointIO,
    NonFiniteGuard,
    NonFiniteLossError,
    resume_checkpoint,
)
from maect.methods.base import arch_from_config
from maect.methods.mae import MAE
from maect.models.vit import MaskedViT
from maect.tuning import load_init_encoder
from tests.conftest import TINY_OVERRIDES, cli_error

MODEL = load_config("mae/fmnist_vit_t", TINY_OVERRIDES).to_dict()["model"]


def _fake_checkpoint(step: int, model: dict | None = None) -> dict:
    return {
        "state_dict": {"encoder.w": torch.full((20_000,), float(step))},
        "global_step": step,
        "hyper_parameters": {"config": {"model": model or MODEL}},
    }


def _checkpoint_dir(tmp_path: Path) -> Path:
    """last.ckpt (step 8), epoch0001.ckpt (step 4), epoch0002.ckpt (step 8)."""
    io = AtomicCheckpointIO()
    folder = tmp_path / "checkpoints"
    io.save_checkpoint(_fake_checkpoint(4), folder / "epoch0001.ckpt")
    io.save_checkpoint(_fake_checkpoint(8), folder / "epoch0002.ckpt")
    io.save_checkpoint(_fake_checkpoint(8), folder / "last.ckpt")
    return folder


def _flip_middle_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


# --------------------------------------------------------------------------- checkpoint files


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint(_fake_checkpoint(1), path)
    before = path.read_bytes()
    big = {"state_dict": {"w": torch.zeros(1_000_000)}, "global_step": 2}
    # the kernel refuses writes past 256 KiB, as on a full disk (EFBIG instead of ENOSPC)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, limits[1]))
    try:
        with pytest.raises(CheckpointWriteError, match=r"last\.ckpt.*previous file.*unchanged"):
            io.save_checkpoint(big, path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]  # the partial temporary file is gone
    assert torch.load(path, weights_only=True)["global_step"] == 1


def test_concurrent_saves_of_one_checkpoint_use_their_own_temporary_files(tmp_path):
    """Two writers of one path (threads: one pid) never share a temporary name: every save
    succeeds, the file is one whole checkpoint, no temporary file is left."""
    path = tmp_path / "encoder.pt"
    errors: list[Exception] = []

    def save(value: float) -> None:
        try:
            for _ in range(10):
                atomic_save({"w": torch.full((50_000,), value)}, path)
        except Exception as err:  # a shared temporary name makes a rename or a load fail
            errors.append(err)

    threads = [threading.Thread(target=save, args=(float(i),)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and list(tmp_path.iterdir()) == [path]
    assert torch.load(path, weights_only=True)["w"].unique().numel() == 1


def test_truncated_last_checkpoint_falls_back_to_previous(tmp_path, caplog):
    folder = _checkpoint_dir(tmp_path)
    last = folder / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    path, ckpt = resume_checkpoint(folder, MODEL)
    assert path == folder / "epoch0002.ckpt" and ckpt["global_step"] == 8
    assert f"{last} is truncated or not a checkpoint" in caplog.text


def test_corrupt_checkpoint_detected_by_checksum(tmp_path, caplog):
    folder = _checkpoint_dir(tmp_path)
    _flip_middle_byte(folder / "last.ckpt")
    _flip_middle_byte(folder / "epoch0002.ckpt")
    path, ckpt = resume_checkpoint(folder, MODEL)
    assert path == folder / "epoch0001.ckpt" and ckpt["global_step"] == 4
    assert (
        "epoch0002.ckpt is corrupt: record" in caplog.text and "fails its checksum" in caplog.text
    )


def test_no_readable_checkpoint_is_a_clear_error(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "last.ckpt").write_text("not a checkpoint")
    torch.save({"model": {}}, folder / "epoch0001.ckpt")  # a zip, but no training state
    with pytest.raises(CheckpointError, match=r"no readable checkpoint in .*last\.ckpt is trunc"):
        resume_checkpoint(folder, MODEL)
    with pytest.raises(CheckpointError, match=r"epoch0001\.ckpt is not a training checkpoint"):
        resume_checkpoint(folder, MODEL)
    assert resume_checkpoint(tmp_path / "nothing", MODEL) is None


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    other = {**MODEL, "embed_dim": 64, "in_chans": 3}
    AtomicCheckpointIO().save_checkpoint(_fake_checkpoint(4, other), tmp_path / "last.ckpt")
    with pytest.raises(
        CheckpointError,
        match=r"another architecture: model\.embed_dim: 64 \(checkpoint\) vs 32 \(config\); "
        r"model\.in_chans: 3 \(checkpoint\) vs 1",
    ):
        resume_checkpoint(tmp_path, MODEL)


def test_init_checkpoint_with_another_channel_count_is_refused(tmp_path):
    init = tmp_path / "rgb.pt"
    rgb = load_config("maect/fmnist_vit_t", [*TINY_OVERRIDES, "model.in_chans=3"])
    save_encoder(MaskedViT(arch_from_config(rgb)), init)
    cfg = load_config("maect/fmnist_vit_t", [*TINY_OVERRIDES, f"maect.init={init}"])
    with pytest.raises(CheckpointError, match=r"in_chans: 3 \(checkpoint\) vs 1"):
        load_init_encoder(cfg)


def test_run_resumes_from_the_previous_checkpoint_when_last_is_truncated(tiny_cfg, tmp_path):
    cfg = tiny_cfg(
        "trainer.epochs=2",
        "trainer.checkpoint_every=1",
        "optim.warmup_epochs=1",
        "data.synthetic_size=32",
    )
    run = tmp_path / "run"
    pretrain(cfg, run)
    finished = torch.load(run / "encoder.pt", weights_only=True)["model"]
    # the run "died" while epoch 2 was being saved: last.ckpt is cut, epoch0002.ckpt missing
    (run / "encoder.pt").unlink()
    (run / "checkpoints" / "epoch0002.ckpt").unlink()
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    pretrain(cfg, run)
    resumed = torch.load(run / "encoder.pt", weights_only=True)["model"]
    for key, value in finished.items():
        assert torch.equal(resumed[key], value), key


# --------------------------------------------------------------------------- non-finite losses


def _poison_step(monkeypatch, step: int) -> None:
    """Make every pixel of the batch at optimizer step ``step`` NaN (a corrupt input)."""
    compute = MAE.compute_losses

    def poisoned(self, batch):
        if self.global_step == step:
            batch = {**batch, "image": torch.full_like(batch["image"], float("nan"))}
        return compute(self, batch)

    monkeypatch.setattr(MAE, "compute_losses", poisoned)


def test_nonfinite_loss_stops_then_skip_option_finishes(tiny_cfg, tmp_path, monkeypatch):
    _poison_step(monkeypatch, 2)
    run = tmp_path / "run"
    cfg = tiny_cfg("trainer.epochs=1", "trainer.checkpoint_every_steps=1")
    with pytest.raises(NonFiniteLossError, match=r"at step 2 \(epoch 0, batch 2\): loss=nan"):
        pretrain(cfg, run)
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2 and not (run / "encoder.pt").exists()
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())

    # the same command with the skip option resumes, skips the bad step and counts it
    pretrain(
        tiny_cfg(
            "trainer.epochs=1", "trainer.checkpoint_every_steps=1", "trainer.skip_nonfinite=true"
        ),
        run,
    )
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["skipped_nonfinite"] == 1
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["train/skipped_nonfinite"]) for r in rows if r["train/skipped_nonfinite"]] == [
        1
    ]
    assert (run / "encoder.pt").is_file()


def test_nonfinite_error_names_the_terms():
    guard = NonFiniteGuard(skip=False)
    nan = torch.tensor(float("nan"))
    losses = {"loss": nan, "contrastive": torch.tensor(2.5), "reconstruction": nan}
    guard.observe(losses, step=7, epoch=1, batch=3)
    with pytest.raises(
        NonFiniteLossError, match=r"step 7 \(epoch 1, batch 3\): loss=nan, contrastive=2.5, recon"
    ):
        guard.check(logging.getLogger("test"))


# --------------------------------------------------------------------------- exact resume


def _crash_during_step(monkeypatch, step: int) -> None:
    """The process dies while training the batch that would make optimizer step ``step + 1``."""

    def crashing(self, trainer, *args):
        if trainer.global_step == step:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(RunCheckpoint, "on_train_batch_start", crashing, raising=False)


def _loss_rows(run: Path, column: str = "train/loss_step") -> list[tuple[str, str]]:
    with open(run / "metrics.csv") as f:
        return [(r["step"], r[column]) for r in csv.DictReader(f) if r[column]]


def test_crash_mid_epoch_resumes_exactly(tiny_cfg, tmp_path, monkeypatch):
    cfg = tiny_cfg(
        "trainer.epochs=2",
        "trainer.checkpoint_every_steps=2",
        "trainer.deterministic=true",
        "data.num_workers=1",  # the worker prefetches before Lightning sets the epoch
    )
    pretrain(cfg, tmp_path / "whole")
    with monkeypatch.context() as patch:
        _crash_during_step(patch, 7)  # epoch 1, batch 3 of 4; last checkpoint at step 6
        with pytest.raises(RuntimeError, match="simulated crash"):
            pretrain(cfg, tmp_path / "crashed")
    ckpt = torch.load(tmp_path / "crashed/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 6 and ckpt["data_position"] == {"epoch": 1, "images": 32}
    pretrain(cfg, tmp_path / "crashed")

    whole = torch.load(tmp_path / "whole/checkpoints/last.ckpt", weights_only=True)
    resumed = torch.load(tmp_path / "crashed/checkpoints/last.ckpt", weights_only=True)
    assert resumed["global_step"] == whole["global_step"] == 8
    for key, value in whole["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key
    for got, want in zip(
        resumed["optimizer_states"][0]["state"].values(),
        whole["optimizer_states"][0]["state"].values(),
        strict=True,
    ):
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert resumed["lr_schedulers"] == whole["lr_schedulers"]
    assert _loss_rows(tmp_path / "crashed") == _loss_rows(tmp_path / "whole")
    # the interrupted epoch's mean covers the steps before the crash too (checkpointed sums)
    assert len(_loss_rows(tmp_path / "whole", "train/loss_epoch")) == 2
    assert _loss_rows(tmp_path / "crashed", "train/loss_epoch") == _loss_rows(
        tmp_path / "whole", "train/loss_epoch"
    )


# --------------------------------------------------------------------------- training data order


def _batches(length: int, batch: int, world: int, rank: int, monkeypatch, epoch: int = 0):
    monkeypatch.setattr(loader_module, "world_size", lambda: world)
    monkeypatch.setattr(loader_module, "rank", lambda: rank)
    sampler = EpochShuffleSampler(length, seed=3, batch_size=batch)
    sampler.set_epoch(epoch)
    items = list(sampler)
    return sampler, [items[i : i + batch] for i in range(0, len(items), batch)]


def test_global_batches_do_not_depend_on_the_number_of_ranks(monkeypatch):
    _, single = _batches(50, 12, 1, 0, monkeypatch)
    _, rank0 = _batches(50, 6, 2, 0, monkeypatch)
    _, rank1 = _batches(50, 6, 2, 1, monkeypatch)
    assert len(single) == len(rank0) == len(rank1) == 4  # 50 // 12, the rest dropped
    for step, items in enumerate(single):
        assert items == rank0[step] + rank1[step]
    indices = [i for items in single for i, _ in items]
    assert len(set(indices)) == 48
    _, other_epoch = _batches(50, 12, 1, 0, monkeypatch, epoch=1)
    assert other_epoch != single


def test_sampler_resume_skips_the_trained_batches(monkeypatch):
    sampler, full = _batches(40, 4, 2, 1, monkeypatch, epoch=2)
    sampler.resume(epoch=2, images=3 * 8)  # three global batches of 2 x 4 done
    items = list(sampler)
    assert [items[i : i + 4] for i in range(0, len(items), 4)] == full[3:]
    assert list(sampler) == [item for batch in full for item in batch]  # only once


def test_global_batch_larger_than_dataset_is_refused(monkeypatch):
    monkeypatch.setattr(loader_module, "world_size", lambda: 4)
    with pytest.raises(
        ConfigError,
        match=r"data.batch_size=8 x 4 device\(s\) = 32 images per step "
        r"is more than the 20 training images",
    ):
        len(EpochShuffleSampler(20, seed=0, batch_size=8))


def test_augmentation_depends_only_on_the_item_seed():
    class Noisy(torch.utils.data.Dataset):
        def __getitem__(self, index):
            return torch.rand(3) + index

    items = SeededItems(Noisy())
    first = items[(5, 123)]
    torch.manual_seed(999)
    state = torch.get_rng_state()
    assert torch.equal(items[(5, 123)], first)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's stream is untouched
    assert not torch.equal(items[(5, 124)], first)


def test_training_batches_keep_their_size_when_images_are_unreadable():
    item = (torch.zeros(1, 2, 2), 3, 7)
    batch = collate_samples([item, None, (torch.ones(1, 2, 2), 4, 8)], pad=True)
    assert batch["image"].shape[0] == 3 and int(batch["skipped"]) == 1
    assert collate_samples([item, None], pad=False)["image"].shape[0] == 1


# --------------------------------------------------------------------------- bad input


def _image_tree(root: Path, good: int, broken: int) -> None:
    for i in range(good):
        folder = root / "train" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), (i * 10, 0, 0)).save(folder / f"{i}.png")
    for i in range(broken):
        (root / "train" / "class0" / f"broken{i}.png").write_bytes(b"\x89PNG truncated")


IMAGEFOLDER = [*TINY_OVERRIDES, "data.name=imagefolder", "model.in_chans=3", "data.batch_size=8"]


def test_unreadable_training_images_are_skipped_and_counted(tmp_path):
    _image_tree(tmp_path / "data", good=15, broken=1)
    cfg = load_config(
        "mae/fmnist_vit_t",
        [
            *IMAGEFOLDER,
            f"data.root={tmp_path / 'data'}",
            "trainer.epochs=1",
            "trainer.recon_every=100",
        ],
    )
    pretrain(cfg, tmp_path / "run")
    with open(tmp_path / "run" / "metrics.csv") as f:
        skipped = [float(r["data/skipped"]) for r in csv.DictReader(f) if r.get("data/skipped")]
    assert sum(skipped) == 1


def test_strict_unreadable_image_is_one_cli_line(capsys, tmp_path):
    """data.strict=true: the error raised in a loader worker used to reach the user inside a
    43-line traceback (the worker's, re-raised by torch and Lightning)."""
    _image_tree(tmp_path / "data", good=15, broken=1)
    args = [*IMAGEFOLDER, f"data.root={tmp_path / 'data'}", "data.strict=true", "trainer.epochs=1"]
    err = cli_error(capsys, "pretrain", "recipe=mae/fmnist_vit_t", f"out={tmp_path / 'run'}", *args)
    assert re.fullmatch(
        r"maect pretrain: error: unreadable image \S*broken0\.png: .* \(data\.strict=true\)", err
    ), err


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.name=imagefolder", "data.root={tmp}/missing"], "imagefolder split not found"),
        (["data.name=imagefolder", "data.root={tmp}/empty"], "no class folders in"),
        (["data.synthetic_size=10"], "data.batch_size=16 x 1 device(s) = 16 images per step is"),
        (["trainer.epoch=3"], "did you mean 'trainer.epochs'"),
        (["recipe=mae/fmnist"], "unknown recipe 'mae/fmnist'. Did you mean: mae/fmnist_vit_t"),
    ],
)
def test_bad_input_gives_one_line_cli_errors(capsys, tmp_path, overrides, message):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    overrides = [o.format(tmp=tmp_path) for o in overrides]
    recipe = next((o for o in overrides if o.startswith("recipe=")), "recipe=mae/fmnist_vit_t")
    rest = [o for o in overrides if not o.startswith("recipe=")]
    err = cli_error(capsys, "pretrain", recipe, f"out={tmp_path / 'run'}", *TINY_OVERRIDES, *rest)
    assert message in err


def test_resume_checkpoint_that_is_not_a_checkpoint_is_acli_error(capsys, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_text("hello")
    err = cli_error(capsys, "pretrain", "recipe=mae/fmnist_vit_t", f"out={run}", *TINY_OVERRIDES)
    assert "no readable checkpoint" in err and "last.ckpt is truncated or not a checkpoint" in err


def test_protocols_refuse_missing_labels():
    x = torch.randn(10, 4)
    unlabeled = torch.full((10,), -1)
    with pytest.raises(ValueError, match="train_y must contain non-negative class indices"):
        knn_accuracy(x, unlabeled, x, torch.zeros(10, dtype=torch.long), k=3)


def test_skip_options_may_change_on_resume(tiny_cfg, tmp_path):
    run = tmp_path / "run"
    pretrain(tiny_cfg(), run, dev_run=1)
    pretrain(
        tiny_cfg("trainer.skip_nonfinite=true", "trainer.checkpoint_every_steps=5"), run, dev_run=1
    )
