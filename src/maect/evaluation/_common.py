"""Input validation, accuracy, stratified sampling and timing shared by the evaluation protocols."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

ArrayLike = torch.Tensor | np.ndarray


def as_features(x: ArrayLike, name: str) -> torch.Tensor:
    """Returns ``x`` as a non-empty 2-D floating-point tensor (float16/bfloat16 become float32).

    Raises:
        ValueError: If ``x`` is not 2-D, is empty or is not floating point.
    """
    x = torch.as_tensor(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D [N, D], got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {x.dtype}")
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    return x


def as_labels(y: ArrayLike, name: str, device: torch.device | None = None) -> torch.Tensor:
    """Returns ``y`` as a 1-D int64 tensor of non-negative class indices.

    Raises:
        ValueError: If ``y`` is not 1-D, not of integer dtype or contains negative values.
    """
    y = torch.as_tensor(y)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D [N], got shape {tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"{name} must have an integer dtype, got {y.dtype}")
    y = y.to(device=device, dtype=torch.long)
    if y.numel() > 0 and int(y.min()) < 0:
        raise ValueError(f"{name} must contain non-negative class indices")
    return y


def check_same_length(x: torch.Tensor, y: torch.Tensor, x_name: str, y_name: str) -> None:
    """Raises ``ValueError`` if ``x`` and ``y`` differ in their first dimension."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"{x_name} and {y_name} have different lengths: {x.shape[0]} != {y.shape[0]}"
        )


def check_same_dim(a: torch.Tensor, b: torch.Tensor, a_name: str, b_name: str) -> None:
    """Raises ``ValueError`` if two feature matrices differ in feature dimension."""
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{a_name} and {b_name} have different feature dims: {a.shape[1]} != {b.shape[1]}"
        )


def accuracy(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * (pred == target).double().mean().item()


def predict_within(scores: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
    """The argmax of ``scores [N, C]`` over all classes, or over ``classes`` only (class indices;
    the ImageNet-R/-A protocol for a test set that covers a subset of the training classes).

    Returns:
        Predicted class indices ``[N]`` (int64, in the full class numbering).
    """
    if classes is None:
        return scores.argmax(dim=1)
    classes = classes.to(scores.device)
    return classes[scores[:, classes].argmax(dim=1)]


def stratified_subset(y: torch.Tensor, size: Callable[[int], int], seed: int) -> torch.Tensor:
    """Draws ``size(n_c)`` random samples from every class ``c`` (with ``n_c`` members).

    Deterministic for a given ``seed`` (drawn on the CPU, independently of global RNG state).

    Args:
        y: Labels ``[N]`` (int64).
        size: Maps a class's number of samples to how many of them to keep.
        seed: Seed of the random draw.

    Returns:
        Sorted int64 indices into ``y`` (on the CPU).
    """
    y = y.cpu()
    perm = torch.randperm(y.numel(), generator=torch.Generator().manual_seed(seed))
    order = perm[torch.argsort(y[perm], stable=True)]  # grouped by class, random within class
    _, counts = torch.unique_consecutive(y[order], return_counts=True)
    starts = (counts.cumsum(0) - counts).repeat_interleave(counts)
    rank = torch.arange(y.numel()) - starts
    sizes = torch.tensor([size(int(c)) for c in counts]).repeat_interleave(counts)
    return order[rank < sizes].sort().values


def timed(timing: dict[str, float], name: str, fn: Callable[[], Any]) -> Any:
    """``fn()``, its wall seconds (GPU work included) stored in ``timing[name]``."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    timing[name] = round(time.perf_counter() - start, 3)
    return result
