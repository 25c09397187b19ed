"""The labelled train and test splits ``maect evaluate`` reads, cut to their class-balanced
subsets when configured, and the checks of the protocol settings against them (run before any
feature is extracted)."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from maect.config import ConfigError
from maect.data.datasets import (
    DataNotFoundError,
    ImageDataset,
    ImageFolderDataset,
    SubsetDataset,
    build_dataset,
)
from maect.data.subset import balanced_subset
from maect.distributed import rank, world_size
from maect.evaluation.class_subsets import (
    RelabeledDataset,
    class_names,
    map_classes,
    read_class_map,
)
from maect.evaluation.config import EvalConfig

log = logging.getLogger(__name__)


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
    return _cut(dataset, d.train_subset if train else d.test_subset, cfg.seed, train)


def _cut(dataset: ImageDataset, size: int | None, seed: int, train: bool) -> Split:
    """``dataset``, or its class-balanced subset of ``size`` images."""
    split = "train" if train else "test"
    if size is not None and size > len(dataset):
        raise ConfigError(
            f"data.{split}_subset={size} exceeds the {len(dataset)} images of the {split} split"
        )
    if size is None or size == len(dataset):
        return Split(dataset, "all")
    indices = balanced_subset(dataset.labels, size, seed)
    return Split(SubsetDataset(dataset, indices), f"balanced:{size}:seed{seed}")


def build_folder_test_split(cfg: EvalConfig, train: Split, name: str) -> tuple[Split, torch.Tensor]:
    """The test split from ``data.test_folder`` (a class per folder), its labels mapped onto the
    training classes (:func:`~maect.evaluation.class_subsets.map_classes`).

    Returns:
        The split (cut to ``data.test_subset``) and the training classes it covers (sorted).
    """
    d = cfg.data
    folder = Path(d.test_folder)
    if not folder.is_dir():
        raise ConfigError(f"data.test_folder: no such folder {folder}")
    try:
        dataset = ImageFolderDataset(folder)
    except DataNotFoundError as err:
        raise ConfigError(f"data.test_folder: {err}") from None
    class_map = read_class_map(d.class_map) if d.class_map else None
    mapping = map_classes(dataset.classes, class_names(train.dataset, name), class_map)
    relabeled = RelabeledDataset(dataset, mapping, train.dataset.num_classes)
    split = _cut(relabeled, d.test_subset, cfg.seed, train=False)
    # The labels depend on the mapping: it is part of the feature cache key.
    digest = hashlib.sha256(json.dumps(mapping.tolist()).encode()).hexdigest()[:12]
    return Split(split.dataset, f"{split.subset}:classes{digest}"), mapping.unique()


def class_counts(labels: torch.Tensor) -> torch.Tensor:
    """Images per class of the classes present (in class order)."""
    counts = torch.bincount(labels)
    return counts[counts > 0]


def check_against_splits(
    cfg: EvalConfig, train_labels: torch.Tensor, test_labels: torch.Tensor, bank: int
) -> None:
    """Settings that only the split sizes can refute, checked before the feature extraction.

    Args:
        cfg: The settings.
        train_labels: Labels of the train split.
        test_labels: Labels of the test split.
        bank: Train images k-NN searches (fewer than the split for a class-subset test set).

    Raises:
        ConfigError: Naming the key, e.g. ``knn.k`` larger than the bank, ``lowshot.shots``
            larger than the smallest train class, a ``robustness.test_subset`` larger than the
            test split.
    """
    protocols = {*cfg.protocols, *(cfg.layer_protocols if cfg.layers is not None else ())}
    if "knn" in protocols and cfg.knn.k > bank:
        raise ConfigError(f"knn.k={cfg.knn.k} exceeds the {bank} train images k-NN searches")
    skipped = [k for k in cfg.knn.ks if k > bank]
    if "knn" in protocols and skipped:
        log.warning(
            "knn.ks: skipping %s, more than the %d train images k-NN searches", skipped, bank
        )
    smallest = int(class_counts(train_labels).min())
    if "lowshot" in protocols and max(cfg.lowshot.shots) > smallest:
        raise ConfigError(
            f"lowshot.shots={max(cfg.lowshot.shots)} exceeds the {smallest} images of the "
            "smallest train class"
        )
    if {"linear", "robustness"} & protocols:  # the probe's held-out split (linear.py)
        counts = class_counts(train_labels).tolist()
        held_out = sum(min(round(cfg.linear.val_fraction * n), n - 1) for n in counts)
        if held_out < 1 or len(train_labels) - held_out < 2:
            raise ConfigError(
                f"linear.val_fraction={cfg.linear.val_fraction} leaves {held_out} of the "
                f"{len(train_labels)} train images for validation; the probe needs at least 1 "
                "and 2 to train on"
            )
    size = cfg.robustness.test_subset
    if "robustness" in protocols and size is not None and size > len(test_labels):
        raise ConfigError(
            f"robustness.test_subset={size} exceeds the {len(test_labels)} images of the test "
            "split (null: all of them)"
        )
