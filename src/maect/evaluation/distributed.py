"""Collect per-rank evaluation features into one tensor in dataset order."""

from __future__ import annotations

import torch
import torch.distributed as dist

from maect.distributed import rank, world_size


def collective_device() -> torch.device:
    """Where tensors must live for the process group's collectives (NCCL: this rank's GPU)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _padded(x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """``x`` zero-padded to the longest rank's row count, and every rank's row count."""
    count = torch.tensor([x.shape[0]], device=x.device)
    counts = [torch.empty_like(count) for _ in range(world_size())]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    return padded, sizes


def _all_gather_varlen(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (``[n_r, ...]``, ``n_r`` may differ per rank) from all ranks."""
    padded, sizes = _padded(x)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])


@torch.no_grad()
def gather_in_order(
    features: torch.Tensor, indices: torch.Tensor, dataset_len: int
) -> torch.Tensor:
    """Features of the whole dataset, row ``i`` for sample ``i``, from every rank's share.

    Each rank passes the rows it computed and their dataset indices (any order, any count). Rows
    repeated by ``DistributedSampler``'s padding (or by several ranks) land on the same row once.
    In a single process this just reorders.

    Args:
        features: ``[n, D]`` features of this rank.
        indices: ``[n]`` dataset indices of those rows.
        dataset_len: Number of samples in the dataset.

    Returns:
        ``[dataset_len, D]`` on the device of ``features``.

    Raises:
        ValueError: If an index is out of range or some sample has no row on any rank.
    """
    indices = indices.to(features.device).long()
    if world_size() > 1:
        features, indices = _all_gather_varlen(features), _all_gather_varlen(indices)
    if indices.numel() and not 0 <= int(indices.min()) <= int(indices.max()) < dataset_len:
        raise ValueError(
            f"indices must lie in [0, {dataset_len}), got {indices.min()}..{indices.max()}"
        )
    out = features.new_zeros((dataset_len, *features.shape[1:]))
    seen = torch.zeros(dataset_len, dtype=torch.bool, device=features.device)
    out[indices] = features
    seen[indices] = True
    if not bool(seen.all()):
        missing = (~seen).nonzero().flatten()
        raise ValueError(
            f"no features for {missing.numel()} of {dataset_len} samples "
            f"(first missing: {missing[:5].tolist()})"
        )
    return out


@torch.no_grad()
def gather_rows_to_zero(
    features: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's rows on rank 0, ordered by dataset index (CPU); empty tensors elsewhere.

    For disjoint shards that together cover the dataset, less the images no rank could read, rank
    0 gets the rows one process extracting the whole dataset returns. A rank without rows passes
    ``[0, 0]`` features (the width is taken from the others).

    Args:
        features: ``[n, D]`` features of this rank's images.
        labels: ``[n]`` their labels.
        indices: ``[n]`` their dataset indices.

    Returns:
        On rank 0 ``(features [N, D], labels [N])``, rows sorted by dataset index; on the other
        ranks ``([0, D], [0])``.
    """
    device = collective_device()
    width = torch.tensor([features.shape[1]], device=device)
    dist.all_reduce(width, op=dist.ReduceOp.MAX)
    if features.shape[0] == 0:
        features = features.new_zeros((0, int(width)))
    features = _gather_varlen_to_zero(features.to(device))
    ids = _gather_varlen_to_zero(torch.stack([indices.long(), labels.long()], dim=1).to(device))
    order = ids[:, 0].argsort()
    return features[order].cpu(), ids[order, 1].cpu()


def _gather_varlen_to_zero(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (``[n_r, ...]``, ``n_r`` may differ per rank) on rank 0; ``x[:0]`` on
    the other ranks."""
    padded, sizes = _padded(x)
    parts = [torch.empty_like(padded) for _ in sizes] if rank() == 0 else None
    dist.gather(padded, parts, dst=0)
    if rank() != 0:
        return x[:0]
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])
