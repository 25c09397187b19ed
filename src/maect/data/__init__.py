"""Datasets (uint8 images), subsets, transforms and loaders."""

from maect.data.datasets import DataNotFoundError, ImageDataset, build_dataset
from maect.data.loader import build_loader, collate_samples
from maect.data.subset import balanced_subset

__all__ = [
    "DataNotFoundError",
    "ImageDataset",
    "balanced_subset",
    "build_dataset",
    "build_loader",
    "collate_samples",
]
