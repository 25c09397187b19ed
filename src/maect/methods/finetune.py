"""Supervised end-to-end fine-tuning of a ViT classifier (facebookresearch/mae, BEiT, DeiT).

One training step: timm's mixup / cutmix with label smoothing on the batch (draws seeded from
(seed, rank, epoch, batch) by the base class), the classifier with stochastic depth, soft-target
cross-entropy; AdamW with layer-wise lr decay and the base class's warmup + cosine. After every
``finetune.eval_every`` epochs (and the last) the classifier, and its EMA if any, is scored on
the evaluation split (top-1 / top-5 / loss, sharded over the ranks and summed), logged as
``val/*`` (``val_ema/*``) before the epoch's checkpoint is written.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn
from torch.utils.data import DataLoader, Subset

from maect.config import RunConfig
from maect.data.datasets import ImageDataset, normalization_stats
from maect.data.loader import build_loader
from maect.data.transforms import finetune_transform
from maect.evaluation.accuracy import accuracy_summary, classifier_counts
from maect.methods.base import PretrainMethod
from maect.methods.schedule import layer_decay_groups
from maect.models.classifier import ViTClassifier
from maect.models.ema import ema_update, frozen_copy


def build_mixup(cfg: RunConfig, num_classes: int) -> Mixup | None:
    """timm's batch-mode mixup / cutmix with label smoothing, or None when both are off."""
    f = cfg.finetune
    if f.mixup == 0 and f.cutmix == 0:
        return None
    return Mixup(
        mixup_alpha=f.mixup,
        cutmix_alpha=f.cutmix,
        prob=f.mixup_prob,
        switch_prob=f.mixup_switch_prob,
        mode="batch",
        label_smoothing=f.smoothing,
        num_classes=num_classes,
    )


def build_criterion(cfg: RunConfig, mixup: Mixup | None) -> nn.Module:
    """Soft-target cross-entropy with mixup (which smooths the targets), else label-smoothing
    cross-entropy, else plain cross-entropy (facebookresearch/mae's choice)."""
    if mixup is not None:
        return SoftTargetCrossEntropy()
    if cfg.finetune.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg.finetune.smoothing)
    return nn.CrossEntropyLoss()


class FineTuning(PretrainMethod):
    """Fine-tunes ``classifier`` (held as ``self.encoder``, so checkpoints keep the base class's
    ``encoder.*`` keys) on labelled images; ``eval_dataset`` (its transform set) is scored."""

    def __init__(
        self, cfg: RunConfig, classifier: ViTClassifier, eval_dataset: ImageDataset
    ) -> None:
        super().__init__(cfg, classifier)
        self.mixup = build_mixup(cfg, classifier.num_classes)
        self.criterion = build_criterion(cfg, self.mixup)
        self.ema = frozen_copy(classifier) if cfg.finetune.model_ema > 0 else None
        self.eval_dataset = eval_dataset
        self._eval_loader: DataLoader | None = None
        self.scores: dict[str, dict[str, float]] = {}  # of the last evaluation, per model

    @property
    def classifier(self) -> ViTClassifier:
        return self.encoder

    def train(self, mode: bool = True) -> FineTuning:
        super().train(mode)
        if self.ema is not None:
            self.ema.eval()
        return self

    def param_groups(self) -> list[dict]:
        """Layer-wise lr decay; no weight decay on biases, norms and the model's own list (timm:
        the position embeddings and the CLS token), as facebookresearch/mae's fine-tuning."""
        f, o = self.cfg.finetune, self.cfg.optim
        exempt = self.classifier.no_weight_decay()
        return layer_decay_groups(
            self.classifier, self.classifier.arch.depth, f.layer_decay, o.weight_decay, exempt
        )

    def train_transform(self) -> Callable:
        m, d, f = self.cfg.model, self.cfg.data, self.cfg.finetune
        mean, std = normalization_stats(d.name, m.in_chans)
        return finetune_transform(
            m.img_size, m.in_chans, mean, std, d.crop_scale, d.hflip, f.auto_augment, f.reprob
        )

    def compute_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        images, targets = batch["image"], batch["label"]
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        logits = self.classifier(images)
        return {"loss": self.criterion(logits, targets)}

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            ema_update(self.ema, self.classifier, self.cfg.finetune.model_ema)

    def export_classifier(self) -> ViTClassifier:
        """The weights written to ``classifier.pt``: the EMA if there is one."""
        return self.ema if self.ema is not None else self.classifier

    # ---------------------------------------------------------------- evaluation

    def models_to_score(self) -> dict[str, nn.Module]:
        """``val``: the classifier; ``val_ema``: its EMA (if any)."""
        models: dict[str, nn.Module] = {"val": self.classifier}
        if self.ema is not None:
            models["val_ema"] = self.ema
        return models

    def eval_loader(self) -> DataLoader:
        """This rank's share of the evaluation split (images ``rank, rank + world, ...``)."""
        if self._eval_loader is None:
            world, rank = self.trainer.world_size, self.global_rank
            indices = range(rank, len(self.eval_dataset), world)
            shard = self.eval_dataset if world == 1 else Subset(self.eval_dataset, indices)
            d = self.cfg.data
            self._eval_loader = build_loader(
                shard, d.batch_size, d.num_workers, shuffle=False, drop_last=False
            )
        return self._eval_loader

    def evaluate(self) -> dict[str, dict[str, float]]:
        """Scores of every model on the whole evaluation split (every rank takes part)."""
        bf16 = "bf16" in str(self.trainer.precision)
        scores = {}
        for name, model in self.models_to_score().items():
            counts = classifier_counts(model, self.eval_loader(), self.device, bf16)
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
            scores[name] = accuracy_summary(counts)
        return scores

    def on_train_epoch_end(self) -> None:
        """The base class's epoch end (guard, epoch means), then the scores when they are due."""
        super().on_train_epoch_end()
        every, epoch = self.cfg.finetune.eval_every, self.current_epoch + 1
        if not (epoch == self.trainer.max_epochs or (every and epoch % every == 0)):
            return
        self.scores = self.evaluate()
        for name, values in self.scores.items():
            for key in ("top1", "top5", "loss"):
                # the same summed value on every rank: written once
                self.log(f"{name}/{key}", values[key], prog_bar=key == "top1", rank_zero_only=True)
