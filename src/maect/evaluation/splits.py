"""The labelled train and test splits ``maect evaluate`` reads, cut to their class-balanced
subsets when configured."""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from maect.config import ConfigError
from maect.data.datasets import ImageDataset, SubsetDataset, build_dataset
from maect.data.subset import balanced_subset
from maect.distributed import rank, world_size
from maect.evaluation.config import EvalConfig


@dataclass
class Split:
    """One split and the description of its sample selection (``all`` or
    ``balanced:<n>:seed<s>``, part of the feature cache key)."""

    dataset: ImageDataset
    subset: str


def build_split(
    cfg: EvalConfig,
    name: str,
    root: str | None,
    train: bool,
    synthetic_size: int,
    img_size: int,
    channels: int,
) -> Split:
    """The train or test split, cut to its class-balanced subset when one is configured."""
    d = cfg.data
    downloads = d.download and world_size() > 1  # rank 0 downloads, the others then read
    if downloads and rank() != 0:
        dist.barrier()
    dataset = build_dataset(
        name,
        root,
        train=train,
        download=d.download,
        synthetic_size=synthetic_size,
        img_size=img_size,
        channels=channels,
    )
    if downloads and rank() == 0:
        dist.barrier()
    unlabeled = int((dataset.labels < 0).sum())
    if unlabeled:
        split = "train" if train else "test"
        raise ConfigError(
            f"data.name={name}: {unlabeled} of {len(dataset)} {split} images have no label; "
            "every protocol needs labelled train and test splits (pretrain on unlabelled images, "
            "evaluate on a labelled dataset)"
        )
    size = d.train_subset if train else d.test_subset
    if size is None or size >= len(dataset):
        return Split(dataset, "all")
    indices = balanced_subset(dataset.labels, size, cfg.seed)
    return Split(SubsetDataset(dataset, indices), f"balanced:{size}:seed{cfg.seed}")
