"""Training callbacks: throughput and learning rate, the progress bar, reconstruction grids and
stage progress.

None of them reads a device value on the host more often than every ``trainer.log_every_n_steps``
optimizer steps (see :mod:`maect.methods.base`)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar

from maect.methods.base import is_logging_step
from maect.viz import image_grid, save_grid

SHOWN = {"train/loss_step": "loss", "train/lr": "lr", "img_per_s": "img/s"}


class Throughput(Callback):
    """Logs images/s (all devices) and the learning rate every ``trainer.log_every_n_steps``
    optimizer steps; images/s is the mean over the batches since the previous log, timed on the
    host (the step does not wait for the device, so a window's first batches can be queued work)."""

    def __init__(self) -> None:
        self._start: float | None = None
        self._images = 0

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._start is None:  # the first batch of an epoch includes the loader's start-up
            self._start, self._images = now, 0
            return
        self._images += len(batch["label"]) * trainer.world_size
        if is_logging_step(trainer, batch_idx):
            pl_module.log("img_per_s", self._images / (now - self._start), batch_size=1)
            pl_module.log("train/lr", trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0])
            self._start, self._images = now, 0


class ProgressBar(TQDMProgressBar):
    """Lightning's progress bar showing the loss, lr and images/s as last logged: read on the host
    at logging steps only (a value shown with ``self.log(..., prog_bar=True)`` is read every
    batch, which waits for the device each step)."""

    def __init__(self) -> None:
        super().__init__()
        self._shown: dict[str, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if is_logging_step(trainer, batch_idx):
            metrics = trainer.callback_metrics
            self._shown = {
                label: float(metrics[name]) for name, label in SHOWN.items() if name in metrics
            }
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict:
        return {**super().get_metrics(trainer, pl_module), **self._shown}


class ReconstructionGrid(Callback):
    """Every ``every`` epochs (and after the last one) saves input / masked / reconstruction rows
    for a fixed set of images and a fixed mask, as PNG and to TensorBoard."""

    def __init__(
        self,
        images: torch.Tensor,
        out_dir: Path,
        mean: Sequence[float],
        std: Sequence[float],
        every: int,
    ) -> None:
        self.images = images
        self.out_dir = out_dir
        self.mean, self.std = mean, std
        self.every = every

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if not (epoch % self.every == 0 or epoch == trainer.max_epochs):
            return
        if not trainer.is_global_zero or not hasattr(pl_module, "preview"):
            return
        was_training = pl_module.training
        pl_module.eval()
        generator = torch.Generator(device=pl_module.device).manual_seed(0)
        rows = pl_module.preview(self.images.to(pl_module.device), generator)
        pl_module.train(was_training)
        grid = image_grid(rows, self.mean, self.std)
        save_grid(grid, self.out_dir / f"epoch_{epoch:04d}.png")
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):
                experiment.add_image("reconstructions", grid, global_step=trainer.global_step)


def format_duration(seconds: float) -> str:
    """``42 s``, ``3.5 min`` or ``2.1 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class StageProgress(Callback):
    """Prints the time a training stage has taken and an estimate of what is left: the measured
    seconds per optimizer step since the stage started (or resumed) times the steps still to do.
    Printed once after ``measure_steps`` steps, then after every epoch (so the per-epoch work,
    k-NN monitor and checkpoints included, enters from the first epoch on). Rank 0 only.

    Lines start with the trainer's run directory relative to ``root`` (e.g. ``maect/head``).
    """

    def __init__(self, root: Path, measure_steps: int = 10) -> None:
        self.root = root
        self.measure_steps = measure_steps
        self._started = 0.0
        self._first_step = 0
        self._measured = False

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._started = time.perf_counter()
        self._first_step = trainer.global_step
        self._measured = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._measured and trainer.global_step - self._first_step >= self.measure_steps:
            self._measured = True
            self._report(trainer, f"{trainer.global_step - self._first_step} steps")

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._report(trainer, f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}")

    def _report(self, trainer: Trainer, where: str) -> None:
        done = trainer.global_step - self._first_step
        if not trainer.is_global_zero or done <= 0 or trainer.sanity_checking:
            return
        elapsed = time.perf_counter() - self._started
        left = (trainer.estimated_stepping_batches - trainer.global_step) * elapsed / done
        label = os.path.relpath(trainer.default_root_dir, self.root)
        print(
            f"[{label}] {where}: {format_duration(elapsed)} so far, about "
            f"{format_duration(left)} left in this stage ({elapsed / done:.2f} s per step)",
            flush=True,
        )
