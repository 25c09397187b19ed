"""k-means clustering of frozen features and clustering metrics.

Against the labels: ACC, NMI, AMI, ARI, following scikit-learn's definitions (natural
logarithm, arithmetic-mean normalisation for NMI and AMI) and returned as fractions in
``[0, 1]`` (ARI and AMI can be slightly negative); :func:`clustering_scores` reports them in
percent. Without the labels, of the k-means assignment itself: silhouette and Davies-Bouldin
(scikit-learn's functions), as they are (silhouette in ``[-1, 1]``, higher is better;
Davies-Bouldin >= 0, lower is better).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from scipy.special import gammaln

from maect.evaluation._common import ArrayLike, as_features, as_labels, check_same_length

_DISTANCE_BUDGET = 256 * 2**20  # bytes for one [chunk, k] distance block


def _sq_dist(x: torch.Tensor, x_sq: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ``[N, k]`` as ``x_sq - 2 x.c + |c|^2`` (``x_sq = |x|^2``)."""
    d = torch.addmm(x_sq, x, centers.T, alpha=-2.0)  # one fused pass instead of three
    return d.add_(centers.square().sum(dim=1)).clamp_min_(0.0)


def _min_sq_dist(
    x: torch.Tensor, x_sq: torch.Tensor, centers: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared distance from each row of ``x`` to its nearest center, and that center's index."""
    chunk = max(1, _DISTANCE_BUDGET // (centers.shape[0] * x.element_size()))
    mins = [
        _sq_dist(x[start : start + chunk], x_sq[start : start + chunk], centers).min(dim=1)
        for start in range(0, x.shape[0], chunk)
    ]
    return torch.cat([m.values for m in mins]), torch.cat([m.indices for m in mins])


def _kmeans_pp(
    x: torch.Tensor, x_sq: torch.Tensor, k: int, generator: torch.Generator
) -> torch.Tensor:
    """Greedy k-means++ seeding (``2 + log k`` candidates per step, as in scikit-learn)."""
    n = x.shape[0]
    n_trials = 2 + int(math.log(k))
    first = torch.randint(n, (1,), generator=generator, device=x.device)
    centers = [x[first]]
    closest, _ = _min_sq_dist(x, x_sq, centers[0])
    for _ in range(1, k):
        # All-zero potentials (fewer distinct points than k): fall back to uniform sampling.
        probs = closest if closest.sum() > 0 else torch.ones_like(closest)
        cand_x = x[torch.multinomial(probs, n_trials, replacement=True, generator=generator)]
        # Potential after adding each candidate: sum_i min(closest_i, ||x_i - c||^2).
        cand_d = _sq_dist(x, x_sq, cand_x)
        potentials = torch.minimum(closest[:, None], cand_d).sum(dim=0)
        best = int(potentials.argmin())
        closest = torch.minimum(closest, cand_d[:, best])
        centers.append(cand_x[best : best + 1])
    return torch.cat(centers)


def _lloyd(
    x: torch.Tensor, x_sq: torch.Tensor, centers: torch.Tensor, max_iter: int, tol: float
) -> tuple[torch.Tensor, torch.Tensor, float]:
    k = centers.shape[0]
    for _ in range(max_iter):
        dist, labels = _min_sq_dist(x, x_sq, centers)
        counts = torch.bincount(labels, minlength=k)
        sums = torch.zeros_like(centers).index_add_(0, labels, x)
        new_centers = sums / counts.clamp_min(1)[:, None].to(x.dtype)
        empty = (counts == 0).nonzero().flatten()
        if empty.numel() > 0:
            # Relocate empty clusters to the points farthest from their centers.
            far = dist.topk(empty.numel()).indices
            new_centers[empty] = x[far]
        shift = (new_centers - centers).square().sum().item()
        centers = new_centers
        if shift <= tol:
            break
    dist, labels = _min_sq_dist(x, x_sq, centers)
    return labels, centers, dist.double().sum().item()


def kmeans(
    x: ArrayLike,
    k: int,
    n_init: int = 5,
    max_iter: int = 100,
    seed: int = 0,
    tol: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """k-means with greedy k-means++ seeding and Lloyd iterations, on ``x``'s device.

    Args:
        x: Data ``[N, D]``.
        k: Number of clusters.
        n_init: Number of restarts; the run with the lowest inertia is returned.
        max_iter: Maximum Lloyd iterations per restart.
        seed: Seed of the restarts' random generator.
        tol: Stop when the squared center shift is below ``tol`` times the mean feature variance.

    Returns:
        ``(labels [N] int64, centroids [k, D], inertia)`` where inertia is the sum of squared
        distances of the samples to their centroid.
    """
    x = as_features(x, "x")
    if not 1 <= k <= x.shape[0]:
        raise ValueError(f"k={k} must be in [1, {x.shape[0]}] (number of samples)")
    if n_init < 1 or max_iter < 1:
        raise ValueError("n_init and max_iter must be >= 1")
    generator = torch.Generator(device=x.device).manual_seed(seed)
    abs_tol = tol * x.var(dim=0, unbiased=False).mean().item()
    x_sq = x.square().sum(dim=1, keepdim=True)  # once: it was half of each Lloyd iteration
    best: tuple[torch.Tensor, torch.Tensor, float] | None = None
    for _ in range(n_init):
        result = _lloyd(x, x_sq, _kmeans_pp(x, x_sq, k, generator), max_iter, abs_tol)
        if best is None or result[2] < best[2]:
            best = result
    return best


def _as_numpy_labels(y: ArrayLike, name: str) -> np.ndarray:
    return as_labels(y, name).cpu().numpy()


def _contingency(y_true: ArrayLike, y_pred: ArrayLike) -> np.ndarray:
    """Contingency table ``[n_true_classes, n_pred_clusters]`` over the labels that occur."""
    a = _as_numpy_labels(y_true, "y_true")
    b = _as_numpy_labels(y_pred, "y_pred")
    if a.shape != b.shape:
        raise ValueError(f"y_true and y_pred have different lengths: {a.size} != {b.size}")
    if a.size == 0:
        raise ValueError("y_true and y_pred must be non-empty")
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    n_b = int(bi.max()) + 1
    table = np.bincount(ai * n_b + bi, minlength=(int(ai.max()) + 1) * n_b)
    return table.reshape(-1, n_b).astype(np.int64)


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def _mutual_info(table: np.ndarray) -> float:
    n = table.sum()
    a = table.sum(axis=1, keepdims=True)
    b = table.sum(axis=0, keepdims=True)
    nz = table > 0
    nij = table[nz].astype(np.float64)
    outer = (a * b)[nz].astype(np.float64)
    return max(float((nij / n * np.log(n * nij / outer)).sum()), 0.0)


def _expected_mutual_info(table: np.ndarray) -> float:
    """Expected mutual information under the permutation model (Vinh et al., 2010)."""
    n = int(table.sum())
    a = table.sum(axis=1)
    b = table.sum(axis=0)
    log_b = gammaln(b + 1.0) + gammaln(n - b + 1.0) - gammaln(n + 1.0)
    emi = 0.0
    for ai in a:
        # All feasible (cluster j, n_ij) pairs for this class, flattened.
        lo = np.maximum(1, ai + b - n)
        lengths = np.maximum(np.minimum(ai, b) - lo + 1, 0)
        j = np.repeat(np.arange(b.size), lengths)
        starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
        nij = (lo[j] + np.arange(j.size) - starts).astype(np.float64)
        bj = b[j].astype(np.float64)
        log_p = (
            gammaln(ai + 1.0)
            + gammaln(n - ai + 1.0)
            + log_b[j]
            - gammaln(nij + 1.0)
            - gammaln(ai - nij + 1.0)
            - gammaln(bj - nij + 1.0)
            - gammaln(n - ai - bj + nij + 1.0)
        )
        emi += float((nij / n * np.log(n * nij / (ai * bj)) * np.exp(log_p)).sum())
    return emi


def cluster_accuracy(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Accuracy under the best one-to-one cluster-to-class mapping (Hungarian matching).

    Returns:
        Fraction of samples whose matched cluster equals their class, in ``[0, 1]``.
    """
    table = _contingency(y_true, y_pred)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / table.sum())


def nmi(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Normalised mutual information, ``MI / mean(H(true), H(pred))``."""
    table = _contingency(y_true, y_pred)
    if table.shape[0] == table.shape[1] == 1:
        return 1.0
    mi = _mutual_info(table)
    if mi == 0.0:
        return 0.0
    return mi / (0.5 * (_entropy(table.sum(axis=1)) + _entropy(table.sum(axis=0))))


def ami(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Adjusted mutual information, ``(MI - E[MI]) / (mean(H(true), H(pred)) - E[MI])``."""
    table = _contingency(y_true, y_pred)
    if table.shape[0] == table.shape[1] == 1:
        return 1.0
    if 1 in table.shape:
        return 0.0
    emi = _expected_mutual_info(table)
    normalizer = 0.5 * (_entropy(table.sum(axis=1)) + _entropy(table.sum(axis=0)))
    # Keep the sign but avoid 0/0 when E[MI] equals the maximum (a perfect match scores 1).
    eps = np.finfo(np.float64).eps
    numerator = _mutual_info(table) - emi
    denominator = normalizer - emi
    numerator = min(numerator, -eps) if numerator < 0 else max(numerator, eps)
    denominator = min(denominator, -eps) if denominator < 0 else max(denominator, eps)
    return numerator / denominator


def ari(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Adjusted Rand index (Hubert & Arabie), computed over sample pairs."""
    table = _contingency(y_true, y_pred)
    n = int(table.sum())
    pairs = int((table * (table - 1) // 2).sum())
    a = table.sum(axis=1)
    b = table.sum(axis=0)
    pairs_a = int((a * (a - 1) // 2).sum())
    pairs_b = int((b * (b - 1) // 2).sum())
    expected = pairs_a * pairs_b / (n * (n - 1) / 2) if n > 1 else 0.0
    maximum = (pairs_a + pairs_b) / 2
    # maximum == expected only for identical trivial partitions (a perfect match).
    if maximum == expected:
        return 1.0
    return (pairs - expected) / (maximum - expected)


def clustering_scores(
    x: ArrayLike,
    y: ArrayLike,
    n_clusters: int | None = None,
    n_init: int = 5,
    seed: int = 0,
    silhouette_samples: int | None = 10_000,
) -> dict[str, float | None]:
    """Runs k-means on L2-normalised features and scores the clusters.

    ACC, NMI, AMI and ARI compare the k-means assignment with the labels ``y``. Silhouette and
    Davies-Bouldin score the k-means assignment itself on the features it clustered (the
    L2-normalised ``x``, Euclidean distance), ignoring ``y``.

    Args:
        x: Features ``[N, D]``.
        y: Ground-truth labels ``[N]`` (integer).
        n_clusters: Number of clusters; defaults to the number of distinct labels in ``y``.
        n_init: k-means restarts.
        seed: k-means seed (and that of the silhouette sample).
        silhouette_samples: The silhouette costs ``O(N^2)``: computed on a random sample of
            this many points when ``N`` is larger (scikit-learn's ``sample_size``); ``None``:
            on all points.

    Returns:
        ``{"acc", "nmi", "ami", "ari"}`` in percent (the metrics multiplied by 100), and
        ``"silhouette"``, ``"davies_bouldin"`` unscaled; both are ``None`` when k-means found a
        single cluster (they are undefined there).
    """
    from sklearn.metrics import davies_bouldin_score, silhouette_score

    x = as_features(x, "x")
    y = as_labels(y, "y")
    check_same_length(x, y, "x", "y")
    if n_clusters is None:
        n_clusters = int(y.unique().numel())
    points = F.normalize(x, dim=1)
    labels, _, _ = kmeans(points, n_clusters, n_init=n_init, seed=seed)
    y_pred = labels.cpu()
    scores = {
        "acc": 100.0 * cluster_accuracy(y, y_pred),
        "nmi": 100.0 * nmi(y, y_pred),
        "ami": 100.0 * ami(y, y_pred),
        "ari": 100.0 * ari(y, y_pred),
        "silhouette": None,
        "davies_bouldin": None,
    }
    found = int(y_pred.unique().numel())
    if 2 <= found < x.shape[0]:  # both scores need 2 <= clusters <= N - 1
        points_np, pred_np = points.double().cpu().numpy(), y_pred.numpy()
        sample = silhouette_samples if silhouette_samples and silhouette_samples < len(x) else None
        scores["silhouette"] = float(
            silhouette_score(points_np, pred_np, sample_size=sample, random_state=seed)
        )
        scores["davies_bouldin"] = float(davies_bouldin_score(points_np, pred_np))
    return scores
