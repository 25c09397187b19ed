import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from maect.evaluation import linear_probe


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Keeps the many tiny ops fast on a loaded 2-core machine (OpenMP threads contend)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


LRS = (1e-5, 1e-3, 1e-2, 0.1, 1.0)


def _features(n, seed, n_classes=5, dim=32):
    """Overlapping Gaussian classes with an arbitrary offset and per-dimension scale."""
    rng = np.random.default_rng(0)
    means = rng.normal(size=(n_classes, dim))
    scale = rng.uniform(0.2, 5.0, size=dim)
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    x = (means[y] + 1.5 * rng.normal(size=(n, dim))) * scale + 10.0
    return x.astype(np.float32), y


@pytest.fixture(scope="module")
def problem():
    train_x, train_y = _features(3000, seed=1)
    test_x, test_y = _features(1000, seed=2)
    return train_x, train_y, test_x, test_y


@pytest.fixture(scope="module")
def result(problem):
    return linear_probe(*problem, lrs=LRS, epochs=10, batch_size=128)


def test_reaches_sklearn_logistic_regression(problem, result):
    train_x, train_y, test_x, test_y = problem
    scaler = StandardScaler().fit(train_x)
    clf = LogisticRegression(max_iter=2000).fit(scaler.transform(train_x), train_y)
    reference = 100.0 * clf.score(scaler.transform(test_x), test_y)
    assert 60.0 < reference < 99.0  # separable-ish, not trivial
    assert result["top1"] >= reference - 3.0


def test_output_structure(result):
    assert set(result) == {"top1", "val_top1", "best_lr", "per_lr"}
    assert list(result["per_lr"]) == list(LRS)
    assert all(isinstance(v, float) for v in result["per_lr"].values())
    assert result["val_top1"] == max(result["per_lr"].values())
    assert result["per_lr"][result["best_lr"]] == result["val_top1"]
    # A learning rate of 1e-5 cannot move the weights from their ~0 init in 10 epochs.
    assert result["best_lr"] != 1e-5
    assert result["per_lr"][1e-5] < result["val_top1"] - 10.0


def test_lr_is_selected_without_looking_at_test_labels(problem, result):
    train_x, train_y, test_x, test_y = problem
    shuffled = np.random.default_rng(0).permutation(test_y)
    other = linear_probe(train_x, train_y, test_x, shuffled, lrs=LRS, epochs=10, batch_size=128)
    assert other["per_lr"] == result["per_lr"]
    assert other["best_lr"] == result["best_lr"]
    assert other["top1"] < 40.0  # chance level on the scrambled test labels


def test_parallel_heads_equal_separate_runs(problem):
    train_x, train_y, test_x, test_y = problem
    kwargs = {"epochs": 2, "batch_size": 256, "refit": False}
    lrs = (0.003, 0.3)
    together = linear_probe(train_x, train_y, test_x, test_y, lrs=lrs, **kwargs)
    assert together["per_lr"][0.003] != together["per_lr"][0.3]
    for lr in lrs:
        alone = linear_probe(train_x, train_y, test_x, test_y, lrs=(lr,), **kwargs)
        # Same split, init and batch order: a head must not feel the other heads.
        assert alone["per_lr"][lr] == pytest.approx(together["per_lr"][lr], abs=0.35)


def test_refit_and_determinism(problem):
    train_x, train_y, test_x, test_y = problem
    kwargs = {"lrs": (0.01, 0.1), "epochs": 3, "batch_size": 256}
    a = linear_probe(train_x, train_y, test_x, test_y, refit=True, seed=3, **kwargs)
    b = linear_probe(train_x, train_y, test_x, test_y, refit=True, seed=3, **kwargs)
    c = linear_probe(train_x, train_y, test_x, test_y, refit=False, seed=3, **kwargs)
    assert a == b
    assert a["per_lr"] == c["per_lr"] and a["best_lr"] == c["best_lr"]
    assert a["top1"] > 70.0 and c["top1"] > 70.0


def test_accepts_tensors_and_reports_percent(problem):
    train_x, train_y, test_x, test_y = problem
    res = linear_probe(
        torch.from_numpy(train_x[:500]),
        torch.from_numpy(train_y[:500]),
        torch.from_numpy(test_x),
        torch.from_numpy(test_y),
        lrs=(0.1,),
        epochs=2,
        batch_size=64,
    )
    assert 1.0 < res["top1"] <= 100.0 and res["best_lr"] == 0.1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"val_fraction": 1e-4}, "empty validation"),
        ({"lrs": ()}, "lrs"),
        ({"lrs": (0.1, -1.0)}, "lrs"),
        ({"train_y": np.zeros(3000)}, "integer"),
        ({"test_y": np.zeros(10, dtype=np.int64)}, "different lengths"),
        ({"test_x": np.zeros((1000, 3), dtype=np.float32)}, "feature dims"),
    ],
)
def test_invalid_inputs_raise(problem, kwargs, match):
    train_x, train_y, test_x, test_y = problem
    args = {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        linear_probe(**args, epochs=1)
