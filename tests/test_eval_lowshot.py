import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression

from maect.evaluation import (
    fit_multinomial,
    logistic_regression,
    lowshot_eval,
    lowshot_split,
    percent_split,
)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Keeps the many tiny ops fast on a loaded 2-core machine (OpenMP threads contend)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _features(n, seed, n_classes=5, dim=24):
    rng = np.random.default_rng(0)
    means = rng.normal(size=(n_classes, dim))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    return means[y] + 2.0 * rng.normal(size=(n, dim)) + 3.0, y


@pytest.fixture(scope="module")
def problem():
    train_x, train_y = _features(300, seed=1)
    test_x, test_y = _features(600, seed=2)
    return train_x, train_y, test_x, test_y


def _labels():
    rng = np.random.default_rng(0)
    return rng.permutation(np.repeat([0, 3, 4, 9], [7, 12, 30, 5]))


@pytest.mark.parametrize("n", [1, 2, 5])
def test_lowshot_split_exact_count_and_seeded(n):
    y = _labels()
    idx = lowshot_split(y, n, seed=0)
    assert idx.dtype == torch.int64 and idx.unique().numel() == idx.numel()
    classes, counts = np.unique(y[idx.numpy()], return_counts=True)
    assert classes.tolist() == [0, 3, 4, 9]
    assert counts.tolist() == [n] * 4
    assert torch.equal(idx, lowshot_split(torch.from_numpy(y), n, seed=0))
    draws = {tuple(lowshot_split(y, n, seed=s).tolist()) for s in range(5)}
    assert len(draws) > 1


def test_lowshot_split_errors():
    y = _labels()
    with pytest.raises(ValueError, match="fewer than 6"):
        lowshot_split(y, 6, seed=0)
    with pytest.raises(ValueError, match="n_per_class"):
        lowshot_split(y, 0, seed=0)
    with pytest.raises(ValueError, match="integer"):
        lowshot_split(y.astype(float), 1, seed=0)


@pytest.mark.parametrize(
    ("percent", "expected"), [(1, [1, 1, 1, 1]), (10, [1, 1, 3, 1]), (50, [4, 6, 15, 2])]
)
def test_percent_split_is_stratified(percent, expected):
    y = _labels()
    idx = percent_split(y, percent, seed=1)
    _, counts = np.unique(y[idx.numpy()], return_counts=True)
    # round(percent / 100 * n_c), at least one; np.round is half-to-even like Python's round.
    assert counts.tolist() == expected
    assert torch.equal(idx, percent_split(y, percent, seed=1))
    assert not torch.equal(percent_split(y, 50, seed=1), percent_split(y, 50, seed=2))
    with pytest.raises(ValueError, match="percent"):
        percent_split(y, 0, seed=0)


def _standardise(train_x, test_x):
    mean = train_x.mean(axis=0)
    return (
        F.normalize(torch.from_numpy(train_x - mean), dim=1).numpy(),
        F.normalize(torch.from_numpy(test_x - mean), dim=1).numpy(),
    )


def _sklearn_model(x, y, l2):
    """sklearn minimises C * sum_i CE_i + ||W||^2 / 2 = N C * (mean CE + ||W||^2 / (2 N C)).

    Ours is mean CE + (l2 / 2) ||W||^2, so l2 = 1 / (N C), i.e. C = 1 / (l2 N). No intercept:
    the features are centred.
    """
    c = 1.0 / (l2 * len(x))
    return LogisticRegression(C=c, fit_intercept=False, tol=1e-10, max_iter=10000).fit(x, y)


@pytest.mark.parametrize("l2", [1e-1, 1e-2, 1e-3])
def test_fit_multinomial_matches_sklearn_weights(problem, l2):
    train_x, train_y, test_x, _ = problem
    xs, _ = _standardise(train_x, test_x)
    w = fit_multinomial(torch.from_numpy(xs), torch.from_numpy(train_y), 5, l2, 1000, 1e-9)
    expected = _sklearn_model(xs, train_y, l2).coef_.T
    np.testing.assert_allclose(w.numpy(), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("l2", [1e-1, 1e-2, 1e-3, 2.5e-4 / 300])
def test_logistic_regression_matches_sklearn(problem, l2):
    train_x, train_y, test_x, test_y = problem
    xs, ts = _standardise(train_x, test_x)
    expected = 100.0 * _sklearn_model(xs, train_y, l2).score(ts, test_y)
    assert logistic_regression(*problem, l2=l2) == pytest.approx(expected, abs=0.34)


def test_unseen_classes_are_never_predicted(problem):
    train_x, train_y, test_x, test_y = problem
    # Labels 10..14 in training: columns 0..9 would be all-zero logits if they were kept.
    acc = logistic_regression(train_x, train_y + 10, test_x, test_y + 10)
    assert acc == logistic_regression(*problem)


def test_regularisation_strength_matters(problem):
    # Guards the test above: accuracies differ across l2, so the C mapping is actually checked.
    accs = {logistic_regression(*problem, l2=l2) for l2 in (1.0, 1e-1, 1e-3)}
    assert len(accs) == 3


def test_logistic_regression_default_l2_and_train_mean(problem):
    train_x, train_y, test_x, test_y = problem
    assert logistic_regression(*problem) == logistic_regression(*problem, l2=2.5e-4 / 300)
    # Test features are centred with the training mean: each prediction depends on that
    # sample alone, so accuracies on two halves of the test set average to the full one.
    half = len(test_x) // 2
    first = logistic_regression(train_x, train_y, test_x[:half], test_y[:half])
    second = logistic_regression(train_x, train_y, test_x[half:], test_y[half:])
    assert logistic_regression(*problem) == pytest.approx((first + second) / 2)


def test_lowshot_eval_keys_and_values(problem):
    train_x, train_y, test_x, test_y = problem
    res = lowshot_eval(*problem, shots=(1, 5), percents=(50,), seeds=(0, 1, 2))
    assert set(res) == {"1", "1_std", "5", "5_std", "50pct", "50pct_std"}
    assert all(isinstance(v, float) for v in res.values())
    accs = []
    for seed in (0, 1, 2):
        idx = lowshot_split(train_y, 5, seed).numpy()
        l2 = 2.5e-4 / len(idx)
        accs.append(logistic_regression(train_x[idx], train_y[idx], test_x, test_y, l2=l2))
    assert res["5"] == pytest.approx(np.mean(accs))
    assert res["5_std"] == pytest.approx(np.std(accs, ddof=1))
    assert 20.0 < res["1"] < res["50pct"] - 10.0


def test_lowshot_eval_single_seed_has_zero_std(problem):
    res = lowshot_eval(*problem, shots=(2,), percents=(), seeds=(4,))
    assert set(res) == {"2", "2_std"} and res["2_std"] == 0.0
