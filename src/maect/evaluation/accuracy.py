"""Top-1 / top-5 accuracy and cross-entropy of a classifier over a labelled loader.

Sums (not means) are returned, so that the shards of several processes add up exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

TOP_K = 5
# Order of the entries of a counts tensor.
COUNT_FIELDS = ("top1", "top5", "loss", "images")


def accuracy_counts(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[top-1 hits, top-5 hits, summed cross-entropy, images]`` of one batch (float64).
    Top-5 is top-``min(5, classes)``."""
    k = min(TOP_K, logits.shape[1])
    hits = logits.topk(k, dim=1).indices == labels[:, None]
    loss = F.cross_entropy(logits.float(), labels, reduction="sum")
    return torch.stack(
        [
            hits[:, 0].sum().double(),
            hits.any(dim=1).sum().double(),
            loss.double(),
            torch.tensor(float(len(labels)), dtype=torch.float64, device=logits.device),
        ]
    )


@torch.no_grad()
def classifier_counts(
    model: nn.Module, loader: Iterable[dict], device: torch.device, bf16: bool = False
) -> torch.Tensor:
    """Summed :func:`accuracy_counts` of ``model`` (in eval mode for the pass, its mode restored)
    over the batches of ``loader`` (``{"image", "label"}`` dicts); bf16 autocast if ``bf16``."""
    was_training = model.training
    model.eval()
    total = torch.zeros(len(COUNT_FIELDS), dtype=torch.float64, device=device)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    )
    try:
        for batch in loader:
            images = batch["image"].to(device, non_blocking=True)
            labels = batch["label"].to(device, non_blocking=True)
            with autocast:
                logits = model(images)
            total += accuracy_counts(logits, labels)
    finally:
        model.train(was_training)
    return total


def accuracy_summary(counts: torch.Tensor) -> dict[str, float]:
    """Percent top-1 / top-5, mean loss and the image count from summed counts."""
    top1, top5, loss, images = counts.tolist()
    images = max(images, 1.0)
    return {
        "top1": 100.0 * top1 / images,
        "top5": 100.0 * top5 / images,
        "loss": loss / images,
        "images": int(counts[3].item()),
    }
