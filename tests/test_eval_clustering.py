import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs
from sklearn.metrics import (
    adjusted_mutual_info_score,
    adjusted_rand_score,
    davies_bouldin_score,
    silhouette_score,
)
from sklearn.metrics import normalized_mutual_info_score as sk_nmi

from maect.evaluation import ami, ari, cluster_accuracy, clustering_scores, kmeans, nmi


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Keeps the many tiny ops fast on a loaded 2-core machine (OpenMP threads contend)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _reference_acc(y_true, y_pred):
    true_ids = {c: i for i, c in enumerate(np.unique(y_true))}
    pred_ids = {c: i for i, c in enumerate(np.unique(y_pred))}
    cost = np.zeros((len(pred_ids), len(true_ids)))
    for t, p in zip(y_true, y_pred, strict=True):
        cost[pred_ids[p], true_ids[t]] -= 1
    rows, cols = linear_sum_assignment(cost)
    return -cost[rows, cols].sum() / len(y_true)


def _random_labelings():
    rng = np.random.default_rng(0)
    cases = []
    for n, k_true, k_pred in [(10, 2, 3), (50, 5, 5), (200, 7, 4), (300, 3, 12), (1000, 20, 20)]:
        cases.append((rng.integers(0, k_true, n), rng.integers(0, k_pred, n)))
    # Correlated labelings with non-contiguous label values.
    y = rng.integers(0, 8, 400)
    noisy = np.where(rng.random(400) < 0.3, rng.integers(0, 8, 400), y)
    cases.append((y * 3 + 5, noisy * 7 + 100))
    return cases


_EDGE_CASES = [
    (np.zeros(20, dtype=np.int64), np.zeros(20, dtype=np.int64)),  # single cluster, both
    (np.zeros(20, dtype=np.int64), np.arange(20) % 4),  # single true class
    (np.arange(20) % 4, np.full(20, 3)),  # single predicted cluster
    (np.arange(30) % 5, np.arange(30) % 5),  # perfect match
    (np.arange(30) % 5, (np.arange(30) % 5 + 2) % 5 * 10),  # permuted labels
    (np.arange(15), np.arange(15)[::-1].copy()),  # all singletons, both
    (np.array([0, 1]), np.array([4, 6])),
    (np.array([3]), np.array([1])),
]


@pytest.mark.parametrize(("y_true", "y_pred"), _random_labelings() + _EDGE_CASES)
def test_metrics_match_references(y_true, y_pred):
    assert cluster_accuracy(y_true, y_pred) == pytest.approx(_reference_acc(y_true, y_pred))
    for ours, ref in [
        (nmi, sk_nmi),
        (ami, adjusted_mutual_info_score),
        (ari, adjusted_rand_score),
    ]:
        expected = ref(y_true, y_pred)
        assert ours(y_true, y_pred) == pytest.approx(expected, rel=1e-6, abs=1e-12), ours.__name__


def test_metrics_accept_tensors_and_are_symmetric_where_expected():
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 4, 100), rng.integers(0, 6, 100)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    assert nmi(ta, tb) == pytest.approx(nmi(b, a))
    assert ari(ta, tb) == pytest.approx(ari(b, a))
    assert ami(ta, tb) == pytest.approx(ami(b, a))


def test_perfect_and_permuted_labels_score_one():
    y = np.arange(60) % 6
    perm = np.array([3, 5, 0, 1, 4, 2])[y]
    for metric in (cluster_accuracy, nmi, ami, ari):
        assert metric(y, perm) == pytest.approx(1.0)


def test_metric_input_validation():
    with pytest.raises(ValueError, match="different lengths"):
        nmi(np.zeros(3, dtype=np.int64), np.zeros(4, dtype=np.int64))
    with pytest.raises(ValueError, match="integer"):
        ari(np.zeros(3), np.zeros(3))


@pytest.fixture
def separated_blobs():
    x, y = make_blobs(600, n_features=8, centers=6, cluster_std=0.5, random_state=0)
    return x.astype(np.float32), y


def test_kmeans_recovers_separated_blobs(separated_blobs):
    x, y = separated_blobs
    labels, centroids, inertia = kmeans(torch.from_numpy(x), 6, seed=0)
    assert labels.shape == (600,) and labels.dtype == torch.int64
    assert centroids.shape == (6, 8)
    assert cluster_accuracy(y, labels) == 1.0
    # Inertia is the sum of squared distances to the assigned (= nearest) centroid.
    d = torch.cdist(torch.from_numpy(x).double(), centroids.double()).square()
    assert torch.equal(d.argmin(dim=1), labels)
    assert inertia == pytest.approx(d.min(dim=1).values.sum().item(), rel=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_kmeans_inertia_not_worse_than_sklearn(seed):
    x, _ = make_blobs(1500, n_features=10, centers=10, cluster_std=1.5, random_state=seed)
    _, _, inertia = kmeans(torch.from_numpy(x), 10, n_init=5, seed=seed)
    reference = KMeans(10, n_init=5, random_state=seed).fit(x).inertia_
    assert inertia <= reference * 1.01


def test_kmeans_is_deterministic_and_restarts_help():
    x, _ = make_blobs(800, n_features=4, centers=25, cluster_std=1.0, random_state=3)
    x = torch.from_numpy(x)
    a = kmeans(x, 25, n_init=3, seed=7)
    b = kmeans(x, 25, n_init=3, seed=7)
    assert torch.equal(a[0], b[0]) and a[2] == b[2]
    single = [kmeans(x, 25, n_init=1, seed=s)[2] for s in range(4)]
    assert kmeans(x, 25, n_init=4, seed=0)[2] <= max(single)


def test_kmeans_handles_duplicate_points_and_validates_k():
    x = torch.tensor([[0.0, 0.0]] * 5 + [[1.0, 1.0]] * 5)
    labels, centroids, inertia = kmeans(x, 3, n_init=2)
    assert inertia == pytest.approx(0.0, abs=1e-6)
    assert labels.unique().numel() >= 2
    with pytest.raises(ValueError, match="k=11"):
        kmeans(x, 11)


def test_clustering_scores_on_blobs(separated_blobs):
    x, y = separated_blobs
    scores = clustering_scores(x, y, seed=0)
    assert set(scores) == {"acc", "nmi", "ami", "ari", "silhouette", "davies_bouldin"}
    for key in ("acc", "nmi", "ami", "ari"):
        assert isinstance(scores[key], float)
        assert scores[key] == pytest.approx(100.0)
    # Separated blobs (after L2 normalisation): high silhouette, low Davies-Bouldin.
    assert scores["silhouette"] > 0.8 and 0 <= scores["davies_bouldin"] < 0.3


def test_clustering_scores_are_percent_of_metrics():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 5)).astype(np.float32)
    y = rng.integers(0, 4, 300)
    scores = clustering_scores(x, y, n_clusters=4, seed=1)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    labels, _, _ = kmeans(xn, 4, seed=1)
    assert scores["acc"] == pytest.approx(100 * cluster_accuracy(y, labels))
    assert scores["nmi"] == pytest.approx(100 * sk_nmi(y, labels.numpy()))
    assert scores["ami"] == pytest.approx(100 * adjusted_mutual_info_score(y, labels.numpy()))
    assert scores["ari"] == pytest.approx(100 * adjusted_rand_score(y, labels.numpy()))
    # Silhouette and Davies-Bouldin score the k-means assignment on the clustered features.
    assert scores["silhouette"] == pytest.approx(silhouette_score(xn, labels.numpy()), rel=1e-5)
    assert scores["davies_bouldin"] == pytest.approx(
        davies_bouldin_score(xn, labels.numpy()), rel=1e-5
    )


def test_silhouette_sample_and_single_cluster():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 3)).astype(np.float32)
    y = rng.integers(0, 3, 400)
    scores = clustering_scores(x, y, n_clusters=3, seed=2, silhouette_samples=100)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    labels, _, _ = kmeans(xn, 3, seed=2)
    sampled = silhouette_score(xn, labels.numpy(), sample_size=100, random_state=2)
    assert scores["silhouette"] == pytest.approx(sampled, rel=1e-5)
    one = clustering_scores(x, np.zeros(400, dtype=np.int64), seed=0)
    assert one["silhouette"] is None and one["davies_bouldin"] is None
