"""Low-shot evaluation: L2-regularised logistic regression on few labelled samples (MSN/MAE-CT).

Features are centred with the training mean and L2-normalised per sample. The classifier
minimises ``mean_i CE(W x_i, y_i) + (l2 / 2) * ||W||^2`` (no bias; the features are centred)
with full-batch L-BFGS. The default ``l2 = 2.5e-4 / N`` follows the MAE-CT/MSN protocol, where
``N`` is the number of training samples in the split being fitted (e.g. ``classes * shots``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from maect.evaluation._common import (
    ArrayLike,
    accuracy,
    as_features,
    as_labels,
    check_same_dim,
    check_same_length,
    predict_within,
    stratified_subset,
)

DEFAULT_L2_SCALE = 2.5e-4


def lowshot_split(y: ArrayLike, n_per_class: int, seed: int) -> torch.Tensor:
    """Indices of exactly ``n_per_class`` random samples of every class present in ``y``.

    Args:
        y: Labels ``[N]`` (integer).
        n_per_class: Samples drawn per class.
        seed: Seed of the draw; the same seed always gives the same indices.

    Returns:
        Sorted int64 indices (CPU).

    Raises:
        ValueError: If ``n_per_class < 1`` or some class has fewer than ``n_per_class`` samples.
    """
    y = as_labels(y, "y")
    if n_per_class < 1:
        raise ValueError(f"n_per_class must be >= 1, got {n_per_class}")
    counts = torch.bincount(y.cpu())
    present = counts[counts > 0]
    if int(present.min()) < n_per_class:
        small = (counts > 0) & (counts < n_per_class)
        raise ValueError(
            f"{int(small.sum())} classes have fewer than {n_per_class} samples "
            f"(e.g. class {int(small.nonzero()[0])} has {int(counts[small][0])})"
        )
    return stratified_subset(y, lambda n: n_per_class, seed)


def percent_split(y: ArrayLike, percent: float, seed: int) -> torch.Tensor:
    """Indices of a class-stratified ``percent`` % subset of ``y``.

    Each class keeps ``round(percent / 100 * n_c)`` of its ``n_c`` samples, at least one.

    Args:
        y: Labels ``[N]`` (integer).
        percent: Percentage in ``(0, 100]``.
        seed: Seed of the draw; the same seed always gives the same indices.

    Returns:
        Sorted int64 indices (CPU).
    """
    y = as_labels(y, "y")
    if not 0.0 < percent <= 100.0:
        raise ValueError(f"percent must be in (0, 100], got {percent}")
    return stratified_subset(y, lambda n: max(1, round(percent / 100.0 * n)), seed)


def fit_multinomial(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, max_iter: int, tol: float
) -> torch.Tensor:
    """Minimises ``mean_i CE(x_i W, y_i) + (l2 / 2) * ||W||_F^2`` with full-batch L-BFGS.

    Args:
        x: Features ``[N, D]`` (used as given: no centring or normalisation).
        y: Labels ``[N]`` in ``[0, num_classes)``.
        num_classes: Number of classes ``C``.
        l2: Regularisation strength.
        max_iter: Maximum L-BFGS iterations.
        tol: Stop when the largest gradient entry falls below ``tol``.

    Returns:
        Weights ``W [D, C]`` (no bias), detached, with ``x``'s dtype and device.
    """
    w = torch.zeros(x.shape[1], num_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [w],
        lr=1.0,
        max_iter=max_iter,
        max_eval=2 * max_iter,
        tolerance_grad=tol,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ w, y) + 0.5 * l2 * w.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach()


def logistic_regression(
    train_x: ArrayLike,
    train_y: ArrayLike,
    test_x: ArrayLike,
    test_y: ArrayLike,
    l2: float | None = None,
    max_iter: int = 1000,
    tol: float = 1e-9,
    dtype: torch.dtype = torch.float64,
    classes: torch.Tensor | None = None,
) -> float:
    """Multinomial logistic regression on centred, L2-normalised features; test top-1 in %.

    Minimises ``mean_i CE(W x_i, y_i) + (l2 / 2) * ||W||_F^2`` over ``W [D, C]`` with full-batch
    L-BFGS (strong-Wolfe line search) on ``train_x``'s device. Only classes present in
    ``train_y`` can be predicted.

    Args:
        train_x: Training features ``[N, D]``.
        train_y: Training labels ``[N]`` (integer).
        test_x: Test features ``[M, D]``, centred with the *training* mean.
        test_y: Test labels ``[M]`` (integer).
        l2: Regularisation strength; ``None`` means ``2.5e-4 / N`` with ``N = len(train_x)``.
        max_iter: Maximum L-BFGS iterations.
        tol: Stop when the largest gradient entry falls below ``tol``.
        dtype: Compute dtype.
        classes: Predict only among these classes (a test set covering a subset of the
            training classes); ``None``: every class seen in training.

    Returns:
        Test top-1 accuracy in percent.
    """
    x = as_features(train_x, "train_x").to(dtype)
    t = as_features(test_x, "test_x").to(device=x.device, dtype=dtype)
    y = as_labels(train_y, "train_y", device=x.device)
    ty = as_labels(test_y, "test_y", device=x.device)
    check_same_length(x, y, "train_x", "train_y")
    check_same_length(t, ty, "test_x", "test_y")
    check_same_dim(x, t, "train_x", "test_x")
    l2 = DEFAULT_L2_SCALE / x.shape[0] if l2 is None else l2
    if l2 < 0:
        raise ValueError(f"l2 must be non-negative, got {l2}")

    mean = x.mean(dim=0)
    x = F.normalize(x - mean, dim=1)
    t = F.normalize(t - mean, dim=1)
    # Only classes seen in training can be predicted.
    seen, y_idx = torch.unique(y, return_inverse=True)
    w = fit_multinomial(x, y_idx, seen.numel(), l2, max_iter, tol)
    allowed = None
    if classes is not None:
        allowed = torch.isin(seen, classes.to(seen.device)).nonzero().flatten()
        if allowed.numel() == 0:
            raise ValueError("none of the classes to predict occurs in train_y")
    return accuracy(seen[predict_within(t @ w, allowed)], ty)


def _mean_std(values: list[float]) -> tuple[float, float]:
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return float(np.mean(values)), std


def lowshot_eval(
    train_x: ArrayLike,
    train_y: ArrayLike,
    test_x: ArrayLike,
    test_y: ArrayLike,
    shots: Sequence[int] = (1, 2, 5),
    percents: Sequence[float] = (1, 10),
    seeds: Sequence[int] = (0, 1, 2),
    l2_scale: float = DEFAULT_L2_SCALE,
    classes: torch.Tensor | None = None,
) -> dict[str, float]:
    """Logistic-regression accuracy from ``shots`` images per class and ``percents`` % of labels.

    For each split size and seed a split of the training set is drawn (:func:`lowshot_split` or
    :func:`percent_split`) and :func:`logistic_regression` is fitted with
    ``l2 = l2_scale / N`` (``N`` = number of samples in that split).

    Args:
        train_x: Training features ``[N, D]`` (the pool the splits are drawn from).
        train_y: Training labels ``[N]`` (integer).
        test_x: Test features ``[M, D]``.
        test_y: Test labels ``[M]`` (integer).
        shots: Images per class.
        percents: Percentages of the training set (class-stratified).
        seeds: One split per seed.
        l2_scale: Numerator of the regularisation strength.
        classes: Predict only among these classes (see :func:`logistic_regression`).

    Returns:
        Mean test top-1 (percent) over seeds under ``"<shots>"`` and ``"<percent>pct"``, with the
        sample standard deviation (0 for a single seed) under the same key plus ``"_std"``.
    """
    train_x = as_features(train_x, "train_x")
    train_y = as_labels(train_y, "train_y")
    check_same_length(train_x, train_y, "train_x", "train_y")
    if not seeds:
        raise ValueError("seeds must be non-empty")
    splits = [(str(n), lambda s, n=n: lowshot_split(train_y, n, s)) for n in shots]
    splits += [(f"{p:g}pct", lambda s, p=p: percent_split(train_y, p, s)) for p in percents]
    results = {}
    for key, split in splits:
        accs = []
        for seed in seeds:
            idx = split(seed)
            idx_x = idx.to(train_x.device)
            accs.append(
                logistic_regression(
                    train_x[idx_x],
                    train_y[idx],
                    test_x,
                    test_y,
                    l2=l2_scale / idx.numel(),
                    classes=classes,
                )
            )
        results[key], results[f"{key}_std"] = _mean_std(accs)
    return results
