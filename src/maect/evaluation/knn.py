"""Weighted k-nearest-neighbour classification on frozen features (DINO protocol).

Features are L2-normalised, neighbours are ranked by cosine similarity, and each of the
``k`` nearest training samples votes for its class with weight ``exp(sim / temperature)``.
The predicted class is the one with the largest summed vote.

The search is exact (float32 similarities when the features are float32). On a GPU each chunk
of queries is compared with the whole bank and the top-k taken at once. On CPU the search streams
the bank in tiles of 1024 rows against chunks of up to 4096 queries (a 16 MiB similarity block,
the blocking of FAISS's exact flat search): the first tile's top-k sets a per-query threshold,
only the similarities above it in later tiles are merged into the running top-k, and the
products run through oneDNN where PyTorch has it (2.2x MKL's sgemm on an AMD EPYC, equal
accuracy; docs/performance.md). Of bank rows whose similarities tie (or differ by float32
rounding of the product), which are kept is arbitrary and can differ from another exact search.
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

_CPU_TILE = 1024  # bank rows per CPU tile: a tile of 1024 x D floats stays in L2 cache
_CPU_BLOCK_BUDGET = 16 * 2**20  # bytes of one [chunk, tile] similarity block on CPU
_CUDA_FREE_FRACTION = 0.25  # fraction of free GPU memory given to the block (top-k needs more)


def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


_ONEDNN = _onednn_available()


def similarities(queries: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``queries @ rows.T``; float32 on CPU through oneDNN when PyTorch has it (MKL's sgemm ran
    at 0.45x oneDNN's speed on an AMD EPYC, benchmarks/eval.py), else ``torch.mm``."""
    if _ONEDNN and queries.device.type == "cpu" and queries.dtype == torch.float32:
        return torch.ops.mkldnn._linear_pointwise(queries, rows, None, "none", [], "")
    return queries @ rows.T


def _tile_rows(n_bank: int, device: torch.device) -> int:
    """Bank rows per similarity block: CPU tiles, or the whole bank off CPU."""
    return min(_CPU_TILE, n_bank) if device.type == "cpu" else n_bank


def _chunk_size(tile: int, device: torch.device, itemsize: int) -> int:
    """Number of queries whose ``[chunk, tile]`` similarity block fits its memory budget."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * _CUDA_FREE_FRACTION)
    else:
        budget = _CPU_BLOCK_BUDGET
    return max(1, budget // (tile * itemsize))


class _RunningTopK:
    """The ``k`` largest similarities per query seen so far, with their bank indices.

    Later blocks contribute only the entries above each query's current k-th value, so after
    the first tiles a block costs a comparison instead of a top-k."""

    def __init__(self, block: torch.Tensor, k: int) -> None:
        self.k = k
        self.values, self.indices = block.topk(k, dim=1)

    def offer(self, block: torch.Tensor, offset: int) -> None:
        """Merge ``block`` (similarities of bank rows ``offset ...``) into the running top-k."""
        rows, cols = (block > self.values[:, -1:]).nonzero(as_tuple=True)
        if rows.numel() == 0:
            return
        hit, counts = torch.unique_consecutive(rows, return_counts=True)  # rows come sorted
        slot = torch.repeat_interleave(torch.arange(len(hit), device=rows.device), counts)
        first = torch.cumsum(counts, 0) - counts
        position = torch.arange(rows.numel(), device=rows.device) - first[slot]
        width = int(counts.max())
        values = block.new_full((len(hit), width), float("-inf"))
        indices = torch.zeros(len(hit), width, dtype=torch.long, device=block.device)
        values[slot, position] = block[rows, cols]
        indices[slot, position] = cols + offset
        merged, pick = torch.cat([self.values[hit], values], 1).topk(self.k, dim=1)
        self.values[hit] = merged
        self.indices[hit] = torch.cat([self.indices[hit], indices], 1).gather(1, pick)


def _topk_similar(
    queries: torch.Tensor, bank: torch.Tensor, k: int, tile: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` similarities and bank indices, searched ``tile`` bank rows at a time."""
    first = max(tile, k)
    best = _RunningTopK(similarities(queries, bank[:first]), k)
    for start in range(first, bank.shape[0], tile):
        best.offer(similarities(queries, bank[start : start + tile]), start)
    return best.values, best.indices


def knn_neighbours(
    bank: torch.Tensor, queries: torch.Tensor, k: int, chunk_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` inner products of each query with the bank rows (the search of
    :func:`knn_predict`, on already normalised features).

    Returns:
        ``(similarities [M, k], bank indices [M, k])``, most similar first.
    """
    tile = _tile_rows(bank.shape[0], bank.device)
    chunk_size = chunk_size or _chunk_size(tile, bank.device, bank.element_size())
    parts = [
        _topk_similar(queries[start : start + chunk_size].to(bank), bank, k, tile)
        for start in range(0, queries.shape[0], chunk_size)
    ]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _prepare(
    train_x: ArrayLike,
    train_y: ArrayLike,
    test_x: ArrayLike,
    ks: Sequence[int],
    temperature: float,
    chunk_size: int | None,
    tile_rows: int | None,
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
    if tile_rows is not None and tile_rows < 1:
        raise ValueError(f"tile_rows must be >= 1, got {tile_rows}")
    return train_x, train_y, test_x


def _iter_votes(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    ks: Sequence[int],
    temperature: float,
    num_classes: int,
    chunk_size: int | None,
    tile_rows: int | None,
) -> Iterator[tuple[int, dict[int, torch.Tensor]]]:
    """Yields ``(start, {k: votes [chunk, num_classes]})`` over chunks of the queries.

    One top-``max(ks)`` search per chunk; smaller ``k`` reuse its sorted prefix.
    """
    bank = F.normalize(train_x, dim=1)
    k_max = max(ks)
    tile = tile_rows or _tile_rows(bank.shape[0], bank.device)
    if chunk_size is None:
        chunk_size = _chunk_size(min(tile, bank.shape[0]), bank.device, bank.element_size())
    for start in range(0, test_x.shape[0], chunk_size):
        queries = test_x[start : start + chunk_size].to(device=bank.device, dtype=bank.dtype)
        sim, idx = _topk_similar(F.normalize(queries, dim=1), bank, k_max, tile)
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
    tile_rows: int | None = None,
) -> torch.Tensor:
    """Summed neighbour votes per class.

    Args:
        train_x: Bank features ``[N, D]``.
        train_y: Bank labels ``[N]`` (integer).
        test_x: Query features ``[M, D]``.
        k: Number of neighbours.
        temperature: Vote weight is ``exp(cosine_similarity / temperature)``.
        num_classes: Number of vote columns; defaults to ``max(train_y) + 1``.
        chunk_size: Queries per similarity block; ``None`` picks it from the memory budget.
        tile_rows: Bank rows per similarity block; ``None``: 1024 on CPU, the whole bank on
            other devices (module doc).

    Returns:
        Votes ``[M, num_classes]`` on ``train_x``'s device.
    """
    train_x, train_y, test_x = _prepare(
        train_x, train_y, test_x, (k,), temperature, chunk_size, tile_rows
    )
    if num_classes is None:
        num_classes = int(train_y.max()) + 1
    elif num_classes <= int(train_y.max()):
        raise ValueError(f"num_classes={num_classes} is too small for the labels in train_y")
    chunks = _iter_votes(
        train_x, train_y, test_x, (k,), temperature, num_classes, chunk_size, tile_rows
    )
    return torch.cat([votes[k] for _, votes in chunks])


def knn_predict(
    train_x: ArrayLike,
    train_y: ArrayLike,
    test_x: ArrayLike,
    k: int = 20,
    temperature: float = 0.07,
    ks: Sequence[int] | None = None,
    chunk_size: int | None = None,
    tile_rows: int | None = None,
) -> dict[int, torch.Tensor]:
    """Predicted classes for ``k`` and every value in ``ks``, all from one neighbour search.

    Args:
        train_x: Bank features ``[N, D]``.
        train_y: Bank labels ``[N]`` (integer).
        test_x: Query features ``[M, D]``.
        k: Number of neighbours.
        temperature: Vote weight is ``exp(cosine_similarity / temperature)``.
        ks: Additional numbers of neighbours evaluated in the same pass.
        chunk_size: Queries per similarity block; ``None`` picks it from the memory budget.
        tile_rows: Bank rows per similarity block; ``None``: 1024 on CPU, the whole bank on
            other devices (module doc).

    Returns:
        ``{k: predictions [M] (int64, on train_x's device)}`` for each distinct k.
    """
    all_ks = sorted({k, *(ks or ())})
    train_x, train_y, test_x = _prepare(
        train_x, train_y, test_x, all_ks, temperature, chunk_size, tile_rows
    )
    num_classes = int(train_y.max()) + 1
    preds = {
        kk: torch.empty(test_x.shape[0], dtype=torch.long, device=train_x.device) for kk in all_ks
    }
    for start, votes in _iter_votes(
        train_x, train_y, test_x, all_ks, temperature, num_classes, chunk_size, tile_rows
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
    tile_rows: int | None = None,
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
        chunk_size: Queries per similarity block; ``None`` picks it from the memory budget.
        tile_rows: Bank rows per similarity block; ``None``: 1024 on CPU, the whole bank on
            other devices (module doc).

    Returns:
        ``{"top1": acc at k, "top1@k<k>": acc for k and each value of ks}``.
    """
    test_y = as_labels(test_y, "test_y")
    check_same_length(torch.as_tensor(test_x), test_y, "test_x", "test_y")
    preds = knn_predict(train_x, train_y, test_x, k, temperature, ks, chunk_size, tile_rows)
    accs = {kk: accuracy(p, test_y.to(p.device)) for kk, p in preds.items()}
    return {"top1": accs[k], **{f"top1@k{kk}": acc for kk, acc in accs.items()}}
