"""Data loaders that tolerate unreadable samples."""

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate


class EpochShuffleSampler(Sampler[int]):
    """Random order that depends only on ``seed + epoch``, so a resumed run sees the same data
    order as an uninterrupted one (Lightning calls ``set_epoch``)."""

    def __init__(self, length: int, seed: int) -> None:
        self.length = length
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch``."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())

    def __len__(self) -> int:
        return self.length


def collate_samples(items: list) -> dict:
    """Collate ``(image_or_views, label, index)`` items, dropping unreadable ones (``None``).

    Returns a dict with ``image`` (tensor, or list of view tensors), ``label``, ``index`` and
    ``skipped`` (how many items in this batch could not be read).
    """
    kept = [item for item in items if item is not None]
    if not kept:
        raise RuntimeError(f"every image of a batch of {len(items)} was unreadable")
    images, labels, indices = default_collate(kept)
    return {
        "image": images,
        "label": labels,
        "index": indices,
        "skipped": torch.tensor(len(items) - len(kept)),
    }


def build_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    shuffle: bool,
    drop_last: bool,
    seed: int = 0,
) -> DataLoader:
    """DataLoader with pinned memory and persistent workers; shuffling is seeded per epoch."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochShuffleSampler(len(dataset), seed) if shuffle else None,
        drop_last=drop_last,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        collate_fn=collate_samples,
    )
