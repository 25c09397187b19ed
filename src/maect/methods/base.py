"""Shared training plumbing: optimizer, lr schedule, logging; methods add their losses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from lightning import LightningModule
from torch.optim.lr_scheduler import LambdaLR

from maect.config import RunConfig
from maect.data.datasets import normalization_stats
from maect.data.transforms import mae_transform
from maect.methods.schedule import decay_groups, warmup_cosine
from maect.models.vit import MaskedViT, ViTArch
from maect.rng import capture_rng, restore_rng


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
        self.save_hyperparameters({"config": cfg.to_dict()})

    # ---------------------------------------------------------------- hooks for subclasses

    def compute_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """Named loss terms for one batch; ``"loss"`` is what is optimised."""
        raise NotImplementedError

    def param_groups(self) -> list[dict]:
        """Optimizer groups; each may carry ``lr_scale`` (multiplies the scheduled lr)."""
        return decay_groups(self.named_parameters(), self.cfg.optim.weight_decay)

    def train_transform(self) -> Callable:
        """Per-sample training transform (default: MAE's crop + flip, one view)."""
        m, d = self.cfg.model, self.cfg.data
        mean, std = normalization_stats(d.name, m.in_chans)
        return mae_transform(m.img_size, m.in_chans, mean, std, d.crop_scale, d.hflip)

    def export_encoder(self) -> MaskedViT:
        """The encoder whose weights are written to ``encoder.pt``."""
        return self.encoder

    # ---------------------------------------------------------------- lightning

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the random state so a resumed run draws the same crops and masks."""
        checkpoint["rng"] = capture_rng()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the random state saved by :meth:`on_save_checkpoint`."""
        if "rng" in checkpoint:
            restore_rng(checkpoint["rng"])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        losses = self.compute_losses(batch)
        batch_size = len(batch["label"])
        for name, value in losses.items():
            self.log(
                f"train/{name}",
                value.detach(),
                prog_bar=name == "loss",
                on_epoch=True,
                batch_size=batch_size,
            )
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0], prog_bar=True)
        if "skipped" in batch:
            self.log("data/skipped", batch["skipped"].float(), reduce_fx="sum", batch_size=1)
        return losses["loss"]

    @property
    def global_batch_size(self) -> int:
        """Images per optimizer step over all devices and accumulation steps."""
        accumulate = self.trainer.accumulate_grad_batches
        return self.cfg.data.batch_size * self.trainer.world_size * accumulate

    @property
    def peak_lr(self) -> float:
        """``base_lr * global_batch / 256`` (the linear scaling rule of MAE, MAE-CT and CAN)."""
        return self.cfg.optim.base_lr * self.global_batch_size / 256

    def configure_optimizers(self):
        optim = self.cfg.optim
        groups = self.param_groups()
        for group in groups:
            group["lr"] = self.peak_lr * group.get("lr_scale", 1.0)
        fused = self.device.type == "cuda"
        optimizer = torch.optim.AdamW(
            groups, lr=self.peak_lr, betas=tuple(optim.betas), fused=fused
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = round(optim.warmup_epochs * total / self.cfg.trainer.epochs)
        min_ratio = optim.min_lr / self.peak_lr
        schedule = LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, total, min_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
