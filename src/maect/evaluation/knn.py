"""Weighted k-nearest-neighbour classification on frozen features (DINO protocol).

Features are L2-normalised, neighbours are ranked by cosine similarity, and each of the
``k`` nearest training samples votes for its class with weight ``exp(sim / temperature)``.
The predicted class is the one with the largest summed vote.

The neighbour search is exact. Where bf16 matrix products are fast (CUDA; CPUs with AMX or
AVX512-BF16) it runs in two passes: a bf16 similarity search keeps ``2k + 8`` candidates per
query, their similarities are recomputed in the bank's precision, and a certificate checks that
no other bank row can beat the k-th of them (bf16's error on a cosine is bounded, see
:func:`bf16_cosine_error`); queries that fail the check are searched again exactly.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from pathlib import Path

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
_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of fast bf16 matmul
SEARCHES = ("auto", "exact", "bf16")


@functools.cache
def _cpu_has_fast_bf16() -> bool:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return any(flag in flags for flag in _BF16_CPU_FLAGS)


def bf16_cosine_error(dim: int) -> float:
    """Bound on ``|bf16 search similarity - exact cosine|`` for unit vectors of width ``dim``.

    Rounding both inputs to bf16 (unit roundoff u = 2^-8) changes each product by at most
    ``(2u + u^2) |q_i x_i|``, at most ``2u + u^2`` summed (Cauchy-Schwarz); float32 accumulation
    adds ``dim * 2^-24`` and rounding the bf16 output at most ``u`` of a value below 1.02.
    """
    u = 2.0**-8
    return 2 * u + u * u + 1.02 * u + dim * 2.0**-23


def _use_bf16_search(search: str, device: torch.device) -> bool:
    if search not in SEARCHES:
        raise ValueError(f"search must be one of {', '.join(SEARCHES)}, got {search!r}")
    if search == "auto":
        return device.type == "cuda" or (device.type == "cpu" and _cpu_has_fast_bf16())
    return search == "bf16"


def _exact_topk(queries: torch.Tensor, bank: torch.Tensor, k: int):
    return (queries @ bank.T).topk(k, dim=1)


def _certified_topk(
    queries: torch.Tensor, bank: torch.Tensor, bank_bf16: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact top-``k`` similarities and indices, searched in bf16 and certified (module doc)."""
    n_candidates = 2 * k + 8
    if n_candidates >= bank.shape[0]:
        return _exact_topk(queries, bank, k)
    approx, candidates = (queries.to(torch.bfloat16) @ bank_bf16.T).topk(n_candidates + 1, dim=1)
    candidates = candidates[:, :n_candidates]
    sim = torch.einsum("qd,qcd->qc", queries, bank[candidates])
    sim, order = sim.topk(k, dim=1)
    idx = candidates.gather(1, order)
    # every row outside the candidates has a bf16 similarity <= approx[:, -1]
    ceiling = approx[:, -1].to(sim.dtype) + bf16_cosine_error(bank.shape[1])
    uncertain = (sim[:, -1] <= ceiling).nonzero().squeeze(1)
    if uncertain.numel():
        sim[uncertain], idx[uncertain] = _exact_topk(queries[uncertain], bank, k)
    return sim, idx


def _chunk_size(row_bytes: int, device: torch.device) -> int:
    """Number of queries whose working set (``row_bytes`` each) fits in the memory budget."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * _CUDA_FREE_FRACTION)
    else:
        budget = _CPU_SIMILARITY_BUDGET
    return max(1, budget // row_bytes)


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
    search: str,
) -> Iterator[tuple[int, dict[int, torch.Tensor]]]:
    """Yields ``(start, {k: votes [chunk, num_classes]})`` over chunks of the queries.

    One top-``max(ks)`` search per chunk; smaller ``k`` reuse its sorted prefix.
    """
    bank = F.normalize(train_x, dim=1)
    k_max = max(ks)
    bank_bf16 = bank.to(torch.bfloat16) if _use_bf16_search(search, bank.device) else None
    if chunk_size is None:
        n, d = bank.shape
        row_bytes = n * bank.element_size()
        if bank_bf16 is not None:  # bf16 similarities, then the candidates' rows
            row_bytes = n * 2 + (2 * k_max + 8) * d * bank.element_size()
        chunk_size = _chunk_size(row_bytes, bank.device)
    for start in range(0, test_x.shape[0], chunk_size):
        queries = test_x[start : start + chunk_size].to(device=bank.device, dtype=bank.dtype)
        queries = F.normalize(queries, dim=1)
        if bank_bf16 is None:
            sim, idx = _exact_topk(queries, bank, k_max)
        else:
            sim, idx = _certified_topk(queries, bank, bank_bf16, k_max)
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
    search: str = "auto",
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
        search: ``exact`` (one float similarity matrix), ``bf16`` (certified two-pass search,
            same neighbours; module doc) or ``auto`` (``bf16`` where it is fast).

    Returns:
        Votes ``[M, num_classes]`` on ``train_x``'s device.
    """
    train_x, train_y, test_x = _prepare(train_x, train_y, test_x, (k,), temperature, chunk_size)
    if num_classes is None:
        num_classes = int(train_y.max()) + 1
    elif num_classes <= int(train_y.max()):
        raise ValueError(f"num_classes={num_classes} is too small for the labels in train_y")
    chunks = _iter_votes(
        train_x, train_y, test_x, (k,), temperature, num_classes, chunk_size, search
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
    search: str = "auto",
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
        search: ``exact`` (one float similarity matrix), ``bf16`` (certified two-pass search,
            same neighbours; module doc) or ``auto`` (``bf16`` where it is fast).

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
        train_x, train_y, test_x, all_ks, temperature, num_classes, chunk_size, search
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
    search: str = "auto",
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
        search: ``exact`` (one float similarity matrix), ``bf16`` (certified two-pass search,
            same neighbours; module doc) or ``auto`` (``bf16`` where it is fast).

    Returns:
        ``{"top1": acc at k, "top1@k<k>": acc for k and each value of ks}``.
    """
    test_y = as_labels(test_y, "test_y")
    check_same_length(torch.as_tensor(test_x), test_y, "test_x", "test_y")
    preds = knn_predict(train_x, train_y, test_x, k, temperature, ks, chunk_size, search)
    accs = {kk: accuracy(p, test_y.to(p.device)) for kk, p in preds.items()}
    return {"top1": accs[k], **{f"top1@k{kk}": acc for kk, acc in accs.items()}}
