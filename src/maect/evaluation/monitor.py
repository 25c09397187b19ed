"""Online k-NN monitor: k-NN accuracy of the encoder on fixed subsets, logged during training."""

from __future__ import annotations

import logging

from lightning import Callback, LightningModule, Trainer

from maect.config import TUNING_METHODS, RunConfig
from maect.data.datasets import (
    DataNotFoundError,
    ImageDataset,
    SubsetDataset,
    build_dataset,
    normalization_stats,
)
from maect.data.subset import balanced_subset
from maect.data.transforms import eval_transform
from maect.evaluation.features import extract_features, standardize
from maect.evaluation.knn import knn_accuracy

log = logging.getLogger(__name__)

METRIC = "monitor/knn_top1"


class OnlineKNN(Callback):
    """Every ``every`` epochs (and after the last one) logs the k-NN top-1 accuracy (percent) of
    ``pl_module.encoder`` as ``monitor/knn_top1``.

    Features of a fixed bank (train images) and fixed queries (test images) are extracted with
    the datasets' own (evaluation) transforms, standardised with the bank's mean and std (as the
    MAE-CT monitor does) and classified by weighted k-NN. Only global rank 0 computes and logs
    (``rank_zero_only``); other ranks skip, so the metric cannot drive checkpoint monitoring.
    The encoder's train/eval mode is restored afterwards; gradients are never recorded.

    Args:
        bank: Labelled images the neighbours are drawn from (transform set).
        queries: Labelled images that are classified (transform set).
        every: Epoch interval.
        k: Number of neighbours.
        temperature: Vote weight ``exp(cosine / temperature)``.
        pooling: Token pooling (``cls``, ``mean``, ``cls+mean``).
        batch_size: Images per forward pass.
        standardize_features: Standardise features with the bank's statistics first.
    """

    def __init__(
        self,
        bank: ImageDataset,
        queries: ImageDataset,
        every: int = 1,
        k: int = 20,
        temperature: float = 0.07,
        pooling: str = "cls",
        batch_size: int = 256,
        standardize_features: bool = True,
    ) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.bank = bank
        self.queries = queries
        self.every = every
        self.k = min(k, len(bank))
        self.temperature = temperature
        self.pooling = pooling
        self.batch_size = batch_size
        self.standardize_features = standardize_features

    def knn_top1(self, pl_module: LightningModule) -> float:
        """k-NN top-1 accuracy (percent) of ``pl_module.encoder`` on the fixed subsets."""
        extract = {
            "pooling": self.pooling,
            "batch_size": self.batch_size,
            "device": pl_module.device,
            "progress": False,
        }
        bank_x, bank_y = extract_features(pl_module.encoder, self.bank, **extract)
        query_x, query_y = extract_features(pl_module.encoder, self.queries, **extract)
        if self.standardize_features:
            bank_x, query_x = standardize(bank_x, query_x)
        return knn_accuracy(bank_x, bank_y, query_x, query_y, self.k, self.temperature)["top1"]

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if not (epoch % self.every == 0 or epoch == trainer.max_epochs):
            return
        if not trainer.is_global_zero:
            return
        accuracy = self.knn_top1(pl_module)
        pl_module.log(METRIC, accuracy, rank_zero_only=True, prog_bar=True)


def build_monitor(
    cfg: RunConfig,
    every: int | None = None,
    bank_size: int = 1000,
    query_size: int = 500,
) -> OnlineKNN | None:
    """The :class:`OnlineKNN` monitor for a run, or ``None`` where it cannot run.

    The bank is a class-balanced subset of the training split and the queries one of the test
    split, both fixed by ``cfg.trainer.seed`` and seen through the evaluation transform. The
    default sizes keep one evaluation of the Fashion-MNIST ViT-T at a few seconds on 2 CPU cores
    (a trend monitor: 500 queries give a standard error of about 2 points).

    Args:
        cfg: The run's configuration (dataset, image size, channels, seed; MAE-CT runs pool
            as ``maect.pooling``, others take the CLS token).
        every: Epoch interval; ``None`` means ``cfg.trainer.recon_every``; ``0`` disables.
        bank_size: Number of training images in the bank.
        query_size: Number of test images classified.

    Returns:
        ``None`` when ``every == 0``, under FSDP (rank 0 alone cannot run a sharded encoder), or
        when the dataset has no labelled test split; else the callback.
    """
    every = cfg.trainer.recon_every if every is None else every
    if every == 0:
        return None
    if "fsdp" in cfg.trainer.strategy.lower():
        log.warning("k-NN monitor disabled: it runs on rank 0 only, which FSDP cannot do")
        return None
    d, m = cfg.data, cfg.model
    kwargs = {
        "download": d.download,
        "synthetic_size": d.synthetic_size,
        "img_size": m.img_size,
        "channels": m.in_chans,
    }
    try:
        train = build_dataset(d.name, d.root, train=True, **kwargs)
        test = build_dataset(d.name, d.root, train=False, **kwargs)
    except DataNotFoundError as err:
        log.warning("k-NN monitor disabled: %s", err)
        return None
    if (train.labels < 0).any() or (test.labels < 0).any():
        log.warning("k-NN monitor disabled: %s has unlabeled images", d.name)
        return None
    mean, std = normalization_stats(d.name, m.in_chans)
    subsets = []
    for dataset, size in ((train, bank_size), (test, query_size)):
        subset = SubsetDataset(dataset, balanced_subset(dataset.labels, size, cfg.trainer.seed))
        subset.transform = eval_transform(m.img_size, m.in_chans, mean, std)
        subsets.append(subset)
    pooling = getattr(cfg, cfg.method).pooling if cfg.method in TUNING_METHODS else "cls"
    return OnlineKNN(*subsets, every=every, pooling=pooling, batch_size=d.batch_size)
