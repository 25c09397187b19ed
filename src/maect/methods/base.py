"""Shared training plumbing: optimizer, lr schedule, logging, per-step random seeds and the
non-finite loss guard; methods add their losses.

The training step never reads a device value on the host: the guard decides on the device
(:class:`maect.faults.NonFiniteGuard`), the loss terms are logged as device tensors (Lightning
converts them when it writes the logs, every ``trainer.log_every_n_steps`` steps) and nothing the
step logs is shown in the progress bar (:class:`maect.callbacks.ProgressBar` reads its values at
logging steps only)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Self

import numpy as np
import torch
from lightning import LightningModule
from torch.optim.lr_scheduler import LambdaLR

from maect.config import RunConfig
from maect.data.datasets import normalization_stats
from maect.data.device_augment import BatchAugment, CropsForDevice
from maect.data.loader import derive_seed
from maect.data.transforms import loader_views
from maect.faults import NonFiniteGuard
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
        self.guard = NonFiniteGuard(cfg.trainer.skip_nonfinite)
        self._epoch_sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._skipped_before_epoch = 0
        self._groups: list[dict] | None = None
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

    def check_world(self, world_size: int) -> None:
        """Checks that need the number of processes (raise ConfigError); the engine runs them
        before anything is written to the run directory."""

    # ---------------------------------------------------------------- lightning

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """With ``data.augment_on=device``, turn the crops and parameters of a training batch
        into its augmented views, batched on the device (:class:`BatchAugment`)."""
        if self.batch_augment is not None and isinstance(batch, dict):
            batch["image"] = self.batch_augment(batch["image"])
        return batch

    @property
    def skipped_nonfinite(self) -> int:
        """Optimizer steps skipped for a non-finite loss in this run (as of the last check)."""
        return self.guard.skipped

    def on_fit_start(self) -> None:
        """Run :meth:`check_world` again with the trainer's world size (for trainers the engine
        did not build)."""
        self.check_world(self.trainer.world_size)

    def setup(self, stage: str) -> None:
        """Form the optimizer groups before a strategy wraps the model: FSDP turns parameters
        into flat shards, whose shapes no longer tell weights from biases and norms."""
        if stage == "fit":
            self._groups = self.param_groups()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store where the epoch's data order stands (images of the global order trained on;
        the start of the next epoch after its last batch) and the skipped-step count. A pending
        non-finite loss stops the run here, before a checkpoint of it is written."""
        self.guard.check(log)
        done = self.trainer.fit_loop.epoch_loop.batch_progress.current.ready
        if done >= self.trainer.num_training_batches:
            position = {"epoch": self.current_epoch + 1, "images": 0}
        else:
            images = done * self.cfg.data.batch_size * self.trainer.world_size
            position = {"epoch": self.current_epoch, "images": images}
        checkpoint["data_position"] = position
        checkpoint["skipped_nonfinite"] = self.guard.skipped
        if position["images"]:  # mid-epoch: the running sums of the epoch means (over ranks)
            checkpoint["epoch_sums"] = {
                name: [float(total), float(count)]
                for name, (total, count) in self._epoch_sums.items()
            }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the skipped-step count and a mid-epoch checkpoint's running sums of the epoch
        means (made tensors again in :meth:`on_train_start`; the data position is read by the
        engine)."""
        self.guard.skipped = checkpoint.get("skipped_nonfinite", 0)
        self._epoch_sums = dict(checkpoint.get("epoch_sums", {}))

    def on_train_start(self) -> None:
        """Set the current step's lr from the schedule, and put restored epoch sums on the
        device. After ``trainer.epochs`` was raised on a finished run the schedule spans the new
        total, but the restored optimizer still holds the old schedule's lr for this step; after
        an ordinary resume the value is unchanged."""
        self._epoch_sums = {
            name: tuple(torch.as_tensor(v, dtype=torch.float32, device=self.device) for v in sums)
            for name, sums in self._epoch_sums.items()
        }
        scheduler = self.lr_schedulers()
        if not isinstance(scheduler, LambdaLR):
            return
        groups = scheduler.optimizer.param_groups
        for group, base, factor in zip(
            groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True
        ):
            group["lr"] = base * factor(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in groups]  # what get_last_lr() reports

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # Masks, noise, neighbour picks and mixup depend only on (seed, rank, epoch, batch): a
        # resumed run draws what an uninterrupted one would, and ranks draw independently.
        t = self.cfg.trainer
        seed = derive_seed(t.seed, self.global_rank, self.current_epoch, batch_idx)
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)  # timm's Mixup draws from NumPy
        losses = self.compute_losses(batch)
        bad, means = self.guard.observe(losses, self.global_step, self.current_epoch, batch_idx)
        batch_size = len(batch["label"])
        for name, value in means.items():  # means over ranks; a skipped step counts as NaN here
            self.log(f"train/{name}_step", value, batch_size=batch_size)
            total, count = self._epoch_sums.setdefault(
                name, (torch.zeros_like(value), torch.zeros_like(value))
            )
            total.add_(torch.where(bad, 0.0, value))  # epoch means leave non-finite steps out
            count.add_(~bad)
        if "skipped" in batch:
            self.log("data/skipped", batch["skipped"].float(), reduce_fx="sum", batch_size=1)
        # Lightning forbids returning None under DDP: every rank runs the backward pass, and
        # the guard's flag makes fused AdamW drop the update of a non-finite step
        return losses["loss"]

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if is_logging_step(self.trainer, batch_idx):
            self.guard.check(log)

    def on_train_epoch_start(self) -> None:
        self._skipped_before_epoch = self.guard.skipped

    def on_train_epoch_end(self) -> None:
        """Check the guard; log each term's epoch mean (over ranks and the epoch's finite steps)
        and, in epochs that skipped steps, the run's skipped-step count."""
        self.guard.check(log)
        for name, (total, count) in self._epoch_sums.items():
            mean = total / count  # already a mean over ranks: sync_dist averages equal values
            self.log(f"train/{name}_epoch", mean, on_step=False, on_epoch=True, sync_dist=True)
        self._epoch_sums.clear()
        if self.guard.skipped > self._skipped_before_epoch:
            count = float(self.guard.skipped)
            self.log("train/skipped_nonfinite", count, on_step=False, on_epoch=True)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Drop the update of a step with a non-finite loss: fused AdamW reads the guard's flag
        as ``found_inf`` (no host synchronisation). Other optimizers, and fp16 with its gradient
        scaler (which sets ``found_inf`` itself), read the flag on the host and lose their
        gradients instead; without gradients AdamW leaves parameters and moments unchanged."""
        self.guard.update_flag()
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is None and takes_found_inf(optimizer):
            optimizer.found_inf = self.guard.drop
        elif bool(self.guard.drop):
            optimizer.zero_grad(set_to_none=True)

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
        groups = self.param_groups() if self._groups is None else self._groups
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


class EncoderTuning:
    """Mixin of the stage-3 methods that tune a pretrained encoder (MAE-CT's
    ``ContrastiveTuning``, MIM-Refiner's ``RefinerTuning``; listed before their method base):
    the :meth:`frozen_modules` and the encoder EMA ``ema_encoder`` stay in eval mode, and the
    EMA, when there is one, is the exported encoder."""

    encoder: MaskedViT
    ema_encoder: MaskedViT | None

    def frozen_modules(self) -> list[torch.nn.Module]:
        """The modules that stay frozen (no gradients) and in eval mode."""
        raise NotImplementedError

    def train(self, mode: bool = True) -> Self:
        super().train(mode)  # type: ignore[misc]
        for module in self.frozen_modules():
            module.eval()
        if self.ema_encoder is not None:
            self.ema_encoder.eval()
        return self

    def export_encoder(self) -> MaskedViT:
        return self.ema_encoder if self.ema_encoder is not None else self.encoder


def takes_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` honours a ``found_inf`` tensor attribute (fused Adam/AdamW)."""
    fused = all(group.get("fused") for group in optimizer.param_groups)
    return isinstance(optimizer, torch.optim.Adam) and fused


def is_logging_step(trainer: Any, batch_idx: int) -> bool:
    """Whether the batch just trained ends an optimizer step whose metrics Lightning writes to
    the loggers (every ``trainer.log_every_n_steps`` steps); for ``on_train_batch_end``."""
    stepped = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
    return stepped and trainer.global_step % trainer.log_every_n_steps == 0
