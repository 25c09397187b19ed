"""Linear probing of frozen features with a learning-rate sweep in a single training pass.

The probe is ``BatchNorm1d(affine=False)`` followed by a linear layer (MAE protocol). All
learning rates are trained at once as independent heads on a shared batch-norm: the heads'
weights are stacked into ``[n_lr, D, C]`` and applied with one einsum, and every head is its
own SGD parameter group with its own learning rate. The learning rate is selected on a
class-stratified validation split carved out of the training set, never on the test set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

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

DEFAULT_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)
_EVAL_BATCH = 4096


class _Heads(nn.Module):
    """Shared parameter-free batch-norm followed by ``n_heads`` independent linear heads.

    All heads start from the same initial weights, so they differ only in their learning rate.
    """

    def __init__(self, dim: int, num_classes: int, n_heads: int, generator: torch.Generator):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        init = nn.init.trunc_normal_(torch.empty(dim, num_classes), std=0.01, generator=generator)
        self.weights = nn.ParameterList(init.clone() for _ in range(n_heads))
        self.biases = nn.ParameterList(torch.zeros(num_classes) for _ in range(n_heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns logits ``[n_heads, B, num_classes]``."""
        w = torch.stack(list(self.weights))
        b = torch.stack(list(self.biases))
        return torch.einsum("bd,hdc->hbc", self.norm(x), w) + b[:, None]


def _train_heads(
    x: torch.Tensor,
    y: torch.Tensor,
    lrs: Sequence[float],
    num_classes: int,
    epochs: int,
    batch_size: int,
    seed: int,
) -> _Heads:
    generator = torch.Generator().manual_seed(seed)
    heads = _Heads(x.shape[1], num_classes, len(lrs), generator).to(x.device)
    params = zip(heads.weights, heads.biases, lrs, strict=True)
    groups = [{"params": [w, b], "lr": lr} for w, b, lr in params]
    optimizer = torch.optim.SGD(groups, momentum=0.9, weight_decay=0.0)
    batch_size = min(batch_size, x.shape[0])
    steps_per_epoch = x.shape[0] // batch_size  # drop the last partial batch
    total = epochs * steps_per_epoch
    warmup = max(1, int(0.1 * total))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    heads.train()
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=generator).to(x.device)
        for step in range(steps_per_epoch):
            idx = perm[step * batch_size : (step + 1) * batch_size]
            logits = heads(x[idx])
            # Sum of the heads' mean losses: every head gets exactly its own gradient.
            loss = F.cross_entropy(logits.flatten(0, 1), y[idx].repeat(len(lrs)), reduction="sum")
            optimizer.zero_grad(set_to_none=True)
            (loss / batch_size).backward()
            optimizer.step()
            scheduler.step()
    return heads.eval()


@torch.no_grad()
def _head_accuracies(heads: _Heads, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Top-1 accuracy in percent of every head."""
    correct = torch.zeros(len(heads.weights), dtype=torch.long, device=x.device)
    for start in range(0, x.shape[0], _EVAL_BATCH):
        logits = heads(x[start : start + _EVAL_BATCH])
        correct += (logits.argmax(dim=2) == y[start : start + _EVAL_BATCH]).sum(dim=1)
    return (100.0 * correct.double() / x.shape[0]).tolist()


@dataclass
class LinearProbe:
    """A trained probe: one head of :class:`_Heads` and how it was selected.

    Attributes:
        heads: The trained heads (one after a refit, else the whole sweep).
        head: Index of the selected head in ``heads``.
        best_lr: Its learning rate.
        val_top1: Its accuracy (percent) on the held-out validation split.
        per_lr: Validation accuracy of every learning rate of the sweep.
    """

    heads: _Heads
    head: int
    best_lr: float
    val_top1: float
    per_lr: dict[float, float]

    @torch.no_grad()
    def logits(self, x: ArrayLike) -> torch.Tensor:
        """Class scores ``[N, C]`` of features ``x`` (float32, on the probe's device)."""
        device = self.heads.weights[0].device
        x = as_features(x, "x").float().to(device)
        parts = [
            self.heads(x[start : start + _EVAL_BATCH])[self.head]
            for start in range(0, x.shape[0], _EVAL_BATCH)
        ]
        return torch.cat(parts)

    def predict(self, x: ArrayLike, classes: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted classes of ``x``; with ``classes`` the argmax runs over those classes only
        (:func:`~maect.evaluation._common.predict_within`)."""
        return predict_within(self.logits(x), classes)

    def score(
        self, test_x: ArrayLike, test_y: ArrayLike, classes: torch.Tensor | None = None
    ) -> dict[str, float | dict[float, float]]:
        """The result of :func:`linear_probe`: test accuracy (argmax over ``classes`` when given)
        and the learning-rate selection."""
        return {
            "top1": accuracy(self.predict(test_x, classes), test_y),
            "val_top1": self.val_top1,
            "best_lr": self.best_lr,
            "per_lr": self.per_lr,
        }


def fit_linear_probe(
    train_x: ArrayLike,
    train_y: ArrayLike,
    lrs: Sequence[float] = DEFAULT_LRS,
    epochs: int = 20,
    batch_size: int = 256,
    val_fraction: float = 0.1,
    refit: bool = True,
    seed: int = 0,
    num_classes: int | None = None,
) -> LinearProbe:
    """Train the probe of :func:`linear_probe` (learning rate chosen on a held-out split of
    train, then refitted on all of train when ``refit``) and return it.

    Args:
        train_x: Training features ``[N, D]``.
        train_y: Training labels ``[N]`` (integer).
        lrs: Absolute learning rates to sweep (not scaled by batch size).
        epochs: Training epochs, for the sweep and for the refit.
        batch_size: Mini-batch size (the last partial batch of an epoch is dropped).
        val_fraction: Fraction of each class held out for learning-rate selection (each class
            keeps at least one training sample).
        refit: Retrain on the full training set at the chosen learning rate.
        seed: Seed for the split, the initialisation and the batch order.
        num_classes: Width of the classifier; ``None``: ``max(train_y) + 1``.
    """
    train_x = as_features(train_x, "train_x").float()
    train_y = as_labels(train_y, "train_y", device=train_x.device)
    check_same_length(train_x, train_y, "train_x", "train_y")
    if not lrs or min(lrs) <= 0:
        raise ValueError("lrs must be a non-empty sequence of positive learning rates")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if epochs < 1 or batch_size < 2:
        raise ValueError("epochs must be >= 1 and batch_size >= 2")
    if num_classes is None:
        num_classes = int(train_y.max()) + 1

    val_idx = stratified_subset(train_y, lambda n: min(round(val_fraction * n), n - 1), seed).to(
        train_x.device
    )
    is_val = torch.zeros(train_x.shape[0], dtype=torch.bool, device=train_x.device)
    is_val[val_idx] = True
    if not is_val.any() or int((~is_val).sum()) < 2:
        raise ValueError("val_fraction leaves an empty validation or training split")
    fit_x, fit_y = train_x[~is_val], train_y[~is_val]

    heads = _train_heads(fit_x, fit_y, lrs, num_classes, epochs, batch_size, seed)
    val_accs = _head_accuracies(heads, train_x[val_idx], train_y[val_idx])
    best = max(range(len(lrs)), key=lambda i: val_accs[i])
    head = best
    if refit:
        heads = _train_heads(train_x, train_y, [lrs[best]], num_classes, epochs, batch_size, seed)
        head = 0
    return LinearProbe(
        heads=heads,
        head=head,
        best_lr=float(lrs[best]),
        val_top1=val_accs[best],
        per_lr={float(lr): acc for lr, acc in zip(lrs, val_accs, strict=True)},
    )


def linear_probe(
    train_x: ArrayLike,
    train_y: ArrayLike,
    test_x: ArrayLike,
    test_y: ArrayLike,
    classes: torch.Tensor | None = None,
    **options: Any,
) -> dict[str, float | dict[float, float]]:
    """Linear probe with learning-rate selection on a held-out validation split.

    Every learning rate is trained as a separate head (SGD, momentum 0.9, no weight decay,
    linear warmup over the first 10% of steps then cosine decay) on the training set minus a
    class-stratified ``val_fraction``. The learning rate with the best validation accuracy
    (first in ``lrs`` on ties) is chosen. With ``refit=True`` a fresh head is then trained at
    that learning rate on the full training set and evaluated on the test set; otherwise the
    chosen head from the sweep is evaluated. Runs on ``train_x``'s device in float32.

    Args:
        train_x: Training features ``[N, D]``.
        train_y: Training labels ``[N]`` (integer).
        test_x: Test features ``[M, D]``.
        test_y: Test labels ``[M]`` (integer).
        classes: Score the test set with the argmax over these classes only (a test set whose
            classes are a subset of the training classes); ``None``: all classes.
        options: ``lrs``, ``epochs``, ``batch_size``, ``val_fraction``, ``refit`` and ``seed``
            of :func:`fit_linear_probe`.

    Returns:
        ``{"top1": test accuracy, "val_top1": validation accuracy of the chosen lr,
        "best_lr": chosen lr, "per_lr": {lr: validation accuracy}}``, accuracies in percent.
    """
    train_x = as_features(train_x, "train_x").float()
    test_x = as_features(test_x, "test_x").float().to(train_x.device)
    train_y = as_labels(train_y, "train_y", device=train_x.device)
    test_y = as_labels(test_y, "test_y", device=train_x.device)
    check_same_length(test_x, test_y, "test_x", "test_y")
    check_same_dim(train_x, test_x, "train_x", "test_x")
    num_classes = int(torch.maximum(train_y.max(), test_y.max())) + 1
    probe = fit_linear_probe(train_x, train_y, num_classes=num_classes, **options)
    return probe.score(test_x, test_y, classes)
