"""Training callbacks: throughput display and reconstruction grids."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch
from lightning import Callback, LightningModule, Trainer

from maect.viz import image_grid, save_grid


class Throughput(Callback):
    """Logs images/s (all devices) measured between consecutive training batches."""

    def __init__(self) -> None:
        self._last: float | None = None

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._last = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._last is not None:
            images = len(batch["label"]) * trainer.world_size
            pl_module.log("img_per_s", images / (now - self._last), prog_bar=True, batch_size=1)
        self._last = now


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
