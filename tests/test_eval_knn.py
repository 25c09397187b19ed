import numpy as np
import pytest
import torch

from maect.evaluation import knn as knn_module
from maect.evaluation import knn_accuracy, knn_predict, knn_votes


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Keeps the many tiny ops fast on a loaded 2-core machine (OpenMP threads contend)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _reference_votes(train_x, train_y, test_x, k, temperature, num_classes):
    """Brute-force NumPy weighted k-NN votes (DINO formula), one query at a time."""
    bank = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    queries = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
    votes = np.zeros((len(test_x), num_classes))
    for i, q in enumerate(queries):
        sim = bank @ q
        for j in np.argsort(-sim)[:k]:
            votes[i, train_y[j]] += np.exp(sim[j] / temperature)
    return votes


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    n_classes, dim = 6, 16
    means = rng.normal(size=(n_classes, dim))
    train_y = rng.integers(0, n_classes, 300)
    test_y = rng.integers(0, n_classes, 120)
    train_x = means[train_y] + 1.5 * rng.normal(size=(300, dim))
    test_x = means[test_y] + 1.5 * rng.normal(size=(120, dim))
    return train_x, train_y, test_x, test_y


@pytest.mark.parametrize(("k", "temperature"), [(1, 0.07), (5, 0.07), (20, 0.5), (300, 0.1)])
def test_votes_match_bruteforce(data, k, temperature):
    train_x, train_y, test_x, _ = data
    expected = _reference_votes(train_x, train_y, test_x, k, temperature, 6)
    votes = knn_votes(torch.from_numpy(train_x), torch.from_numpy(train_y), test_x, k, temperature)
    np.testing.assert_allclose(votes.numpy(), expected, rtol=1e-9)


@pytest.mark.parametrize("k", [1, 7, 20])
def test_predictions_and_accuracy_match_bruteforce(data, k):
    train_x, train_y, test_x, test_y = data
    ref_pred = _reference_votes(train_x, train_y, test_x, k, 0.07, 6).argmax(axis=1)
    pred = knn_predict(train_x, train_y, test_x, k=k)[k]
    np.testing.assert_array_equal(pred.numpy(), ref_pred)
    acc = knn_accuracy(train_x, train_y, test_x, test_y, k=k)
    assert acc["top1"] == pytest.approx(100.0 * np.mean(ref_pred == test_y))
    assert acc[f"top1@k{k}"] == acc["top1"]


def test_float32_accuracy_matches_bruteforce(data):
    train_x, train_y, test_x, test_y = data
    ref_pred = _reference_votes(train_x, train_y, test_x, 20, 0.07, 6).argmax(axis=1)
    acc = knn_accuracy(
        torch.tensor(train_x, dtype=torch.float32),
        torch.tensor(train_y),
        torch.tensor(test_x, dtype=torch.float32),
        torch.tensor(test_y),
    )
    assert abs(acc["top1"] - 100.0 * np.mean(ref_pred == test_y)) <= 100.0 / len(test_y)


def test_temperature_weighting_beats_majority():
    # Two moderately similar class-0 neighbours vs one almost identical class-1 neighbour.
    train_x = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8], [-1.0, 0.0]])
    train_y = torch.tensor([1, 0, 0, 2])
    test_x = torch.tensor([[1.0, 0.01]])
    assert knn_predict(train_x, train_y, test_x, k=3, temperature=0.07)[3].item() == 1
    assert knn_predict(train_x, train_y, test_x, k=3, temperature=100.0)[3].item() == 0


@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_chunked_equals_unchunked(data, chunk_size):
    train_x, train_y, test_x, test_y = data
    full = knn_votes(train_x, train_y, test_x, k=10)
    chunked = knn_votes(train_x, train_y, test_x, k=10, chunk_size=chunk_size)
    torch.testing.assert_close(chunked, full, rtol=1e-12, atol=0.0)
    ks = (1, 10, 50)
    assert knn_accuracy(
        train_x, train_y, test_x, test_y, ks=ks, chunk_size=chunk_size
    ) == knn_accuracy(train_x, train_y, test_x, test_y, ks=ks)


def test_tile_rows_rule():
    cpu = torch.device("cpu")
    assert knn_module._tile_rows(60_000, cpu) == 1024
    assert knn_module._tile_rows(500, cpu) == 500  # a small bank is one tile
    assert knn_module._tile_rows(60_000, torch.device("meta")) == 60_000  # off CPU: one block
    assert knn_module._chunk_size(1024, cpu, 4) == 4096  # 16 MiB float32 blocks


@pytest.mark.parametrize("k", [1, 5, 20])
def test_running_topk_equals_one_topk(k):
    """Blocks merged one after another (a threshold per query) give the top-k of the whole."""
    gen = torch.Generator().manual_seed(k)
    sims = torch.randn(50, 700, generator=gen, dtype=torch.float64)
    sims[3] = torch.linspace(-1, 1, 700, dtype=torch.float64)  # increasing: every block merges
    sims[4] = torch.linspace(1, -1, 700, dtype=torch.float64)  # decreasing: no block merges
    best = knn_module._RunningTopK(sims[:, :64], k)
    for start in range(64, 700, 64):
        best.offer(sims[:, start : start + 64], start)
    values, indices = sims.topk(k, dim=1)
    torch.testing.assert_close(best.values, values, rtol=0, atol=0)
    assert torch.equal(best.indices.sort(1).values, indices.sort(1).values)


def test_similarities_are_float32_exact():
    """The CPU product (oneDNN where available) agrees with float64 to float32 rounding, and
    with the plain matmul fallback."""
    gen = torch.Generator().manual_seed(0)
    queries, rows = torch.randn(300, 96, generator=gen), torch.randn(1100, 96, generator=gen)
    reference = queries.double() @ rows.double().T
    product = knn_module.similarities(queries, rows)
    assert product.dtype == torch.float32 and product.shape == (300, 1100)
    error = (product.double() - reference).norm() / reference.norm()
    assert error < 1e-6
    torch.testing.assert_close(product, queries @ rows.T, rtol=1e-5, atol=1e-5)


def test_float32_search_with_and_without_onednn(data, monkeypatch):
    """The CPU tiles with oneDNN products find the neighbours of the plain matmul search."""
    train_x, train_y, test_x, _ = (torch.as_tensor(a) for a in data)
    train_x, test_x = train_x.float().repeat(8, 1), test_x.float()  # 2400 rows: 3 tiles
    train_y = train_y.repeat(8)
    fast = knn_votes(train_x, train_y, test_x, k=20, num_classes=6)
    monkeypatch.setattr(knn_module, "_ONEDNN", False)
    plain = knn_votes(train_x, train_y, test_x, k=20, num_classes=6)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("k", "tile_rows"), [(1, 40), (7, 40), (20, 40), (100, 100), (20, 7)])
def test_tiled_search_matches_bruteforce(data, k, tile_rows):
    """Bank searched in tiles (the last one, or all, shorter than k) gives the same votes."""
    train_x, train_y, test_x, _ = data
    train_x, train_y = train_x[:290], train_y[:290]  # 7 x 40 + 10 rows; 2 x 100 + 90
    expected = _reference_votes(train_x, train_y, test_x, k, 0.07, 6)
    for chunk_size in (None, 13):
        votes = knn_votes(
            train_x, train_y, test_x, k, num_classes=6, chunk_size=chunk_size, tile_rows=tile_rows
        )
        np.testing.assert_allclose(votes.numpy(), expected, rtol=1e-9)


def test_default_tiles_are_used_on_cpu(data, monkeypatch):
    monkeypatch.setattr(knn_module, "_CPU_TILE", 40)
    calls = []
    search = knn_module._topk_similar
    monkeypatch.setattr(knn_module, "_topk_similar", lambda *a: calls.append(a[-1]) or search(*a))
    train_x, train_y, test_x, test_y = data
    tiled = knn_accuracy(train_x, train_y, test_x, test_y, k=20, ks=(1, 10))
    assert calls and set(calls) == {40}
    untiled = knn_accuracy(train_x, train_y, test_x, test_y, k=20, ks=(1, 10), tile_rows=300)
    assert calls[-1] == 300 and untiled == tiled


def test_several_k_in_one_pass_equal_separate_calls(data):
    train_x, train_y, test_x, test_y = data
    ks = (1, 10, 20, 100, 200)
    together = knn_accuracy(train_x, train_y, test_x, test_y, k=20, ks=ks)
    assert set(together) == {"top1"} | {f"top1@k{k}" for k in ks}
    for k in ks:
        separate = knn_accuracy(train_x, train_y, test_x, test_y, k=k)
        assert together[f"top1@k{k}"] == separate["top1"]
    assert together["top1"] == together["top1@k20"]
    # Different k must actually give different results on this data (guards the slicing).
    assert len({together[f"top1@k{k}"] for k in ks}) > 1


def test_num_classes_pads_vote_columns(data):
    train_x, train_y, test_x, _ = data
    votes = knn_votes(train_x, train_y, test_x, k=5, num_classes=9)
    assert votes.shape == (len(test_x), 9)
    assert torch.all(votes[:, 6:] == 0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"train_y": np.zeros(5, dtype=np.int64)}, "different lengths"),
        ({"test_y": np.zeros(3, dtype=np.int64)}, "different lengths"),
        ({"train_x": np.zeros(300)}, "2-D"),
        ({"test_x": np.zeros((120, 16, 1))}, "2-D"),
        ({"test_x": np.zeros((120, 8))}, "feature dims"),
        ({"k": 301}, "k=301"),
        ({"k": 0}, "k=0"),
        ({"ks": (10, 1000)}, "k=1000"),
        ({"train_y": np.zeros(300)}, "integer"),
        ({"test_y": np.zeros(120, dtype=bool)}, "integer"),
        ({"train_y": -np.ones(300, dtype=np.int64)}, "non-negative"),
        ({"temperature": 0.0}, "temperature"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"tile_rows": 0}, "tile_rows"),
    ],
)
def test_invalid_inputs_raise(data, kwargs, match):
    train_x, train_y, test_x, test_y = data
    args = {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        knn_accuracy(**args)
