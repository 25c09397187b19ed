"""Data loaders that tolerate unreadable samples, with a training order and augmentation that do
not depend on the number of devices, the number of workers or where a run was interrupted."""

import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from maect.config import ConfigError
from maect.distributed import rank, world_size


def derive_seed(*keys: int) -> int:
    """A 64-bit seed that depends on every key (NumPy's ``SeedSequence`` mixing), so that e.g.
    ``(seed, epoch)`` and ``(seed + 1, epoch - 1)`` give unrelated streams."""
    return int(np.random.SeedSequence(keys).generate_state(1, np.uint64)[0])


class EpochShuffleSampler(Sampler[tuple[int, int]]):
    """Training order of this rank: ``(index, sample_seed)`` items, ``batch_size`` per step.

    Each epoch's permutation and per-sample seeds depend only on ``(seed, epoch)``. The permutation
    is cut into global batches of ``batch_size x world_size`` images and rank ``r`` takes the
    ``r``-th block of each, so a global step sees the same images on any number of devices; the
    incomplete last global batch is dropped. Lightning calls :meth:`set_epoch`; :meth:`resume`
    skips the batches an interrupted epoch has already trained on. Rank and world size are read
    when iterating (the process group exists by then).
    """

    def __init__(self, length: int, seed: int, batch_size: int) -> None:
        self.length = length
        self.seed = seed
        self.batch_size = batch_size
        self.epoch = 0
        self._skip: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch``."""
        self.epoch = epoch

    def resume(self, epoch: int, images: int) -> None:
        """Start in ``epoch``, whose first ``images`` images (of the global order, all ranks
        together) were already trained on; the first iteration skips their batches."""
        self.epoch = epoch
        self._skip = (epoch, images)

    def num_batches(self) -> int:
        """Batches per epoch and rank; raises :class:`ConfigError` when there is not one."""
        global_batch = self.batch_size * world_size()
        if self.length < global_batch:
            raise ConfigError(
                f"data.batch_size={self.batch_size} x {world_size()} device(s) = {global_batch} "
                f"images per step is more than the {self.length} training images"
            )
        return self.length // global_batch

    def __len__(self) -> int:
        return self.num_batches() * self.batch_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
        order = torch.randperm(self.length, generator=generator).tolist()
        seeds = torch.randint(2**62, (self.length,), generator=generator).tolist()
        world, me = world_size(), rank()
        skip, self._skip = self._skip, None
        first = skip[1] // (self.batch_size * world) if skip and skip[0] == self.epoch else 0
        for step in range(first, self.num_batches()):
            start = (step * world + me) * self.batch_size
            for index in order[start : start + self.batch_size]:
                yield index, seeds[index]


class SeededItems(Dataset):
    """``dataset[index]`` read with the torch, Python and NumPy generators seeded by the item's
    own seed (from :class:`EpochShuffleSampler`; timm's transforms draw from Python's and NumPy's),
    so random augmentations do not depend on the process or worker that reads the item. The
    caller's generator states are restored afterwards."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        states = torch.get_rng_state(), random.getstate(), np.random.get_state()
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            return self.dataset[index]
        finally:
            torch.set_rng_state(states[0])
            random.setstate(states[1])
            np.random.set_state(states[2])


def collate_samples(items: list, pad: bool = False) -> dict:
    """Collate ``(image_or_views, label, index)`` items, dropping unreadable ones (``None``).

    Args:
        items: Dataset items; ``None`` for an image that could not be read.
        pad: Refill the batch to its full size by repeating readable items (training: every rank
            must keep the same batch shape for the gathers of contrastive losses and queues).

    Returns:
        A dict with ``image`` (tensor, or list of view tensors), ``label``, ``index`` and
        ``skipped`` (how many items in this batch could not be read).
    """
    kept = [item for item in items if item is not None]
    if not kept:
        raise RuntimeError(f"every image of a batch of {len(items)} was unreadable")
    skipped = len(items) - len(kept)
    if pad:
        kept += [kept[i % len(kept)] for i in range(skipped)]
    images, labels, indices = default_collate(kept)
    return {"image": images, "label": labels, "index": indices, "skipped": torch.tensor(skipped)}


def collate_training(items: list) -> dict:
    """:func:`collate_samples` with ``pad=True``."""
    return collate_samples(items, pad=True)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    shuffle: bool,
    drop_last: bool,
    seed: int = 0,
) -> DataLoader:
    """DataLoader with pinned memory and persistent workers.

    ``shuffle=True`` gives the training loader: :class:`EpochShuffleSampler` order (sharded over
    ranks, the incomplete last global batch dropped, so ``drop_last`` must be true), per-sample
    augmentation seeds, unreadable images replaced within the batch. ``shuffle=False`` reads the
    dataset in order and drops unreadable images.
    """
    if shuffle and not drop_last:
        raise ValueError("a shuffled (training) loader always drops the incomplete last batch")
    common = {
        "batch_size": batch_size,
        "drop_last": drop_last,
        "num_workers": num_workers,
        "pin_memory": torch.cuda.is_available(),
        "persistent_workers": num_workers > 0,
    }
    if shuffle:
        sampler = EpochShuffleSampler(len(dataset), seed, batch_size)
        return DataLoader(
            SeededItems(dataset), sampler=sampler, collate_fn=collate_training, **common
        )
    return DataLoader(dataset, collate_fn=collate_samples, **common)
