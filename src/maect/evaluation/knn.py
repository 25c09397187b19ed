"""Weighted k-nearest-neighbour classification on frozen features (DINO protocol).

Features are L2-normalised, neighbours are ranked by cosine similarity, and each of the
``k`` nearest training samples votes for its class with weight ``exp(sim / temperature)``.
The predicted class is the one with the largest summed vote.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from maect.evaluation._common import (
    ArrayLike,
    accuracy,
    as_features,
    as_labels,
    check_same_dim,
    check_same_length,
)

_CPU_SIMILARITY_BUDGET = 512 * 2**20  # bytes for one [chunk, N_train] similarity block on CPU
_CUDA_FREE_FRACTION = 0.25  # fraction of free GPU memory given to the block (top-k needs more)


def _chunk_size(n_bank: int, device: torch.device, itemsize: int) -> int:
    """Number of queries whose similarity block to the whole bank fits in the memory budget."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * _CUDA_FREE_FRACTION)
    else:
        budget = _CPU_SIMILARITY_BUDGET
    return max(1, budget // (n_bank * itemsize))


def _prepare(
    train_x: ArrayLike,
    train_y: ArrayLike,
    test_x: ArrayLike,
    ks: Sequence[int],
    temperature: float,
    chunk_size: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    train_x = as_features(train_x, "train_x")
    test_x = as_features(test_x, "test_x")
    train_y = as_labels(train_y, "train_y", device=train_x.device)
    check_same_length(train_x, train_y, "train_x", "train_y")
    check_same_dim(train_x, test_x, "train_x", "test_x")
    for k in ks:
        if not 1 <= k <= train_x.shape[0]:
            raise ValueError(f"k={k} must be in [1, {train_x.shape[0]}] (size of the train bank)")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return train_x, train_y, test_x


def _iter_votes(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    ks: Sequence[int],
    temperature: float,
    num_classes: int,
    chunk_size: int | None,
) -> Iterator[tuple[int, dict[int, torch.Tensor]]]:
    """Yields ``(start, {k: votes [chunk, num_classes]})`` over chunks of the queries.

    One top-``max(ks)`` search per chunk; smaller ``k`` reuse its sorted prefix.
    """
    bank = F.normalize(train_x, dim=1)
    if chunk_size is None:
        chunk_size = _chunk_size(bank.shape[0], bank.device, bank.element_size())
    k_max = max(ks)
    for start in range(0, test_x.shape[0], chunk_size):
        queries = test_x[start : start + chunk_size].to(device=bank.device, dtype=bank.dtype)
        sim, idx = (F.normalize(queries, dim=1) @ bank.T).topk(k_max, dim=1)
        weights = (sim / temperature).exp()
        neighbour_labels = train_y[idx]
        votes = {}
        for k in ks:
            v = torch.zeros(queries.shape[0], num_classes, device=bank.device, dtype=bank.dtype)
            votes[k] = v.scatter_add_(1, neighbour_labels[:, :k], weights[:, :k])
        yield start, votes


def knn_votes(
    train_x: ArrayLike,
    train_y: ArrayLike,
    test_x: ArrayLike,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Summed neighbour votes per class.

    Args:
        train_x: Bank features ``[N, D]``.
        train_y: Bank labels ``[N]`` (integer).
        test_x: Query features ``[M, D]``.
        k: Number of neighbours.
        temperature: Vote weight is ``exp(cosine_similarity / temperature)``.
        num_classes: Number of vote columns; defaults to ``max(train_y) + 1``.
        chunk_size: Queries per similarity block; ``None`` picks it from free memory.

    Returns:
        Votes ``[M, num_classes]`` on ``train_x``'s device.
    """
    train_x, train_y, test_x = _prepare(train_x, train_y, test_x, (k,), temperature, chunk_size)
    if num_classes is None:
        num_classes = int(train_y.max()) + 1
    elif num_classes <= int(train_y.max()):
        raise ValueError(f"num_classes={num_classes} is too small for the labels in train_y")
    chunks = _iter_votes(train_x, train_y, test_x, (k,), temperature, num_classes, chunk_size)
    return torch.cat([votes[k] for _, votes in chunks])


def knn_predict(
    train_x: ArrayLike,
    train_y: ArrayLike,
    test_x: ArrayLike,
    k: int = 20,
    temperature: float = 0.07,
    ks: Sequence[int] | None = None,
    chunk_size: int | None = None,
) -> dict[int, torch.Tensor]:
    """Predicted classes for ``k`` and every value in ``ks``, all from one neighbour search.

    Args:
        train_x: Bank features ``[N, D]``.
        train_y: Bank labels ``[N]`` (integer).
        test_x: Query features ``[M, D]``.
        k: Number of neighbours.
        temperature: Vote weight is ``exp(cosine_similarity / temperature)``.
        ks: Additional numbers of neighbours evaluated in the same pass.
        chunk_size: Queries per similarity block; ``None`` picks it from free memory.

    Returns:
        ``{k: predictions [M] (int64, on train_x's device)}`` for each distinct k.
    """
    all_ks = sorted({k, *(ks or ())})
    train_x, train_y, test_x = _prepare(train_x, train_y, test_x, all_ks, temperature, chunk_size)
    num_classes = int(train_y.max()) + 1
    preds = {
        kk: torch.empty(test_x.shape[0], dtype=torch.long, device=train_x.device) for kk in all_ks
    }
    for start, votes in _iter_votes(
        train_x, train_y, test_x, all_ks, temperature, num_classes, chunk_size
    ):
        for kk, v in votes.items():
            preds[kk][start : start + v.shape[0]] = v.argmax(dim=1)
    return preds


def knn_accuracy(
    train_x: ArrayLike,
    train_y: ArrayLike,
    test_x: ArrayLike,
    test_y: ArrayLike,
    k: int = 20,
    temperature: float = 0.07,
    ks: Sequence[int] | None = None,
    chunk_size: int | None = None,
) -> dict[str, float]:
    """Weighted k-NN top-1 accuracy in percent.

    Args:
        train_x: Bank features ``[N, D]``.
        train_y: Bank labels ``[N]`` (integer).
        test_x: Query features ``[M, D]``.
        test_y: Query labels ``[M]`` (integer).
        k: Number of neighbours reported as ``"top1"``.
        temperature: Vote weight is ``exp(cosine_similarity / temperature)``.
        ks: More numbers of neighbours evaluated in the same pass, e.g. ``(10, 20, 100, 200)``.
        chunk_size: Queries per similarity block; ``None`` picks it from free memory.

    Returns:
        ``{"top1": acc at k, "top1@k<k>": acc for k and each value of ks}``.
    """
    test_y = as_labels(test_y, "test_y")
    check_same_length(torch.as_tensor(test_x), test_y, "test_x", "test_y")
    preds = knn_predict(train_x, train_y, test_x, k, temperature, ks, chunk_size)
    accs = {kk: accuracy(p, test_y.to(p.device)) for kk, p in preds.items()}
    return {"top1": accs[k], **{f"top1@k{kk}": acc for kk, acc in accs.items()}}
