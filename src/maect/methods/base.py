"""Shared training plumbing: optimizer, lr schedule, logging, per-step random seeds and the
non-finite loss guard; methods add their losses."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from lightning import LightningModule
from torch.optim.lr_scheduler import LambdaLR

from maect.config import RunConfig
from maect.data.datasets import normalization_stats
from maect.data.device_augment import BatchAugment, CropsForDevice
from maect.data.loader import derive_seed
from maect.data.transforms import loader_views
from maect.faults import NonFiniteLossError
from maect.methods.schedule import decay_groups, warmup_cosine
from maect.models.vit import MaskedViT, ViTArch

log = logging.getLogger(__name__)


def arch_from_config(cfg: RunConfig) -> ViTArch:
    """Encoder architecture described by ``cfg.model``."""
    m = cfg.model
    return ViTArch(
        img_size=m.img_size,
        patch_size=m.patch_size,
        in_chans=m.in_chans,
        embed_dim=m.embed_dim,
        depth=m.depth,
        num_heads=m.num_heads,
        mlp_ratio=m.mlp_ratio,
    )


class PretrainMethod(LightningModule):
    """Base class of every method.

    Subclasses build their modules in ``__init__``, implement :meth:`compute_losses` (a dict of
    named scalar terms with the total under ``"loss"``) and may override :meth:`param_groups`
    (for layer-wise lr) and :meth:`export_encoder` (for EMA weights).
    """

    def __init__(self, cfg: RunConfig, encoder: MaskedViT) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        self.skipped_nonfinite = 0
        self._drop_update = False
        m, d = cfg.model, cfg.data
        self.batch_augment = (
            BatchAugment(self.view_specs(), m.img_size, *normalization_stats(d.name, m.in_chans))
            if d.augment_on == "device"
            else None
        )
        self.save_hyperparameters({"config": cfg.to_dict()})

    # ---------------------------------------------------------------- hooks for subclasses

    def compute_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """Named loss terms for one batch; ``"loss"`` is what is optimised."""
        raise NotImplementedError

    def param_groups(self) -> list[dict]:
        """Optimizer groups; each may carry ``lr_scale`` (multiplies the scheduled lr)."""
        return decay_groups(self.named_parameters(), self.cfg.optim.weight_decay)

    def view_specs(self) -> list[dict]:
        """Pixel keywords of :func:`maect.data.transforms.pixel_ops` per training view (default:
        MAE's single view, crop and flip only)."""
        return [{}]

    def train_transform(self) -> Callable:
        """Per-sample training transform of :meth:`view_specs`: every view made in the loader
        (``data.augment_on=loader``), or only the crops, with the random parameters of the rest
        for :meth:`on_after_batch_transfer` (``device``)."""
        m, d = self.cfg.model, self.cfg.data
        if d.augment_on == "device":
            return CropsForDevice(self.view_specs(), m.img_size, m.in_chans, d.crop_scale, d.hflip)
        mean, std = normalization_stats(d.name, m.in_chans)
        return loader_views(
            self.view_specs(), m.img_size, m.in_chans, mean, std, d.crop_scale, d.hflip
        )

    def export_encoder(self) -> MaskedViT:
        """The encoder whose weights are written to ``encoder.pt``."""
        return self.encoder

    # ---------------------------------------------------------------- lightning

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """With ``data.augment_on=device``, turn the crops and parameters of a training batch
        into its augmented views, batched on the device (:class:`BatchAugment`)."""
        if self.batch_augment is not None and isinstance(batch, dict):
            batch["image"] = self.batch_augment(batch["image"])
        return batch

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store where the epoch's data order stands (images of the global order trained on;
        the start of the next epoch after its last batch) and the skipped-step count."""
        done = self.trainer.fit_loop.epoch_loop.batch_progress.current.ready
        if done >= self.trainer.num_training_batches:
            position = {"epoch": self.current_epoch + 1, "images": 0}
        else:
            images = done * self.cfg.data.batch_size * self.trainer.world_size
            position = {"epoch": self.current_epoch, "images": images}
        checkpoint["data_position"] = position
        checkpoint["skipped_nonfinite"] = self.skipped_nonfinite

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the skipped-step count (the data position is read by the engine)."""
        self.skipped_nonfinite = checkpoint.get("skipped_nonfinite", 0)

    def nonfinite_step(self, losses: dict[str, torch.Tensor], batch_idx: int) -> bool:
        """Whether this step's loss is NaN/inf on any rank (all ranks agree, so they skip or stop
        together). Raises :class:`NonFiniteLossError` naming the step and the terms, unless
        ``trainer.skip_nonfinite``: then the step is counted and True returned."""
        local = not bool(torch.isfinite(losses["loss"].detach()).all())
        if not self.trainer.strategy.reduce_boolean_decision(local, all=False):
            return False
        where = (
            ", ".join(f"{k}={v.detach().float().mean().item():.4g}" for k, v in losses.items())
            if local
            else "on another rank"
        )
        step = f"step {self.global_step} (epoch {self.current_epoch}, batch {batch_idx})"
        if not self.cfg.trainer.skip_nonfinite:
            raise NonFiniteLossError(
                f"non-finite loss at {step}: {where}. Training stopped; checkpoints written "
                "before this step are intact. trainer.skip_nonfinite=true skips such steps."
            )
        self.skipped_nonfinite += 1
        log.warning("skipping %s: non-finite loss (%s)", step, where)
        return True

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # Masks, noise and neighbour picks depend only on (seed, rank, epoch, batch): a resumed
        # run draws what an uninterrupted one would, and ranks draw independently.
        t = self.cfg.trainer
        torch.manual_seed(derive_seed(t.seed, self.global_rank, self.current_epoch, batch_idx))
        losses = self.compute_losses(batch)
        if self.nonfinite_step(losses, batch_idx):
            count = float(self.skipped_nonfinite)  # run total, logged once per epoch with skips
            self.log(
                "train/skipped_nonfinite", count, on_step=False, on_epoch=True, reduce_fx="max"
            )
            # Lightning forbids returning None under DDP: every rank runs the backward pass and
            # on_before_optimizer_step drops the (non-finite) gradients instead
            self._drop_update = True
            return losses["loss"]
        batch_size = len(batch["label"])
        for name, value in losses.items():
            self.log(
                f"train/{name}",
                value.detach(),
                prog_bar=name == "loss",
                on_epoch=True,
                batch_size=batch_size,
                sync_dist=True,  # mean over ranks (a no-op on one device)
            )
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0], prog_bar=True)
        if "skipped" in batch:
            self.log("data/skipped", batch["skipped"].float(), reduce_fx="sum", batch_size=1)
        return losses["loss"]

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Skip the update of a step with a non-finite loss: without gradients, AdamW leaves the
        parameters and their moments unchanged."""
        if self._drop_update:
            optimizer.zero_grad(set_to_none=True)
            self._drop_update = False

    @property
    def global_batch_size(self) -> int:
        """Images per optimizer step over all devices and accumulation steps."""
        accumulate = self.trainer.accumulate_grad_batches
        return self.cfg.data.batch_size * self.trainer.world_size * accumulate

    lr_views = 1  # views per image counted by the lr scaling (MAE-CT counts both of its views)

    @property
    def peak_lr(self) -> float:
        """``base_lr * lr_views * global_batch / 256`` (the linear scaling rule of MAE, MAE-CT
        and CAN; MAE-CT's code counts every view as a sample)."""
        return self.cfg.optim.base_lr * self.lr_views * self.global_batch_size / 256

    def configure_optimizers(self):
        optim = self.cfg.optim
        groups = self.param_groups()
        for group in groups:
            group["lr"] = self.peak_lr * group.get("lr_scale", 1.0)
        # Fused AdamW: 1.11x the per-tensor loop on CPU too (benchmarks/train_step.py --candidates)
        fused = self.device.type in ("cuda", "cpu")
        optimizer = torch.optim.AdamW(
            groups, lr=self.peak_lr, betas=tuple(optim.betas), fused=fused
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = round(optim.warmup_epochs * total / self.cfg.trainer.epochs)
        min_ratio = optim.min_lr / self.peak_lr
        schedule = LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, total, min_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
