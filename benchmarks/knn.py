"""Time maect's k-NN against scikit-learn's brute-force ``KNeighborsClassifier`` (same features).

Features: normalised Fashion-MNIST pixels, flattened (60k x 784 bank, 10k queries), when the IDX
files are found; else random class-structured features of the same shape. Both implementations
use cosine similarity and the same vote rule, ``exp(cos / T)``-weighted (scikit-learn through a
``weights`` callable on cosine distances), so their accuracies must agree up to ties; scikit-learn's
uniform vote is reported as well. Measures, never asserts.

    .venv/bin/python benchmarks/knn.py [--k 20] [--device cpu] [--append]

``--append`` adds a dated row (git commit, CPU model, load average, command) to
``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
from datetime import date

import numpy as np
import torch
from _common import BENCHMARKS_MD, append_rows, command_line, git_commit, load_average, timed
from sklearn.neighbors import KNeighborsClassifier

from maect.data.datasets import DataNotFoundError, load_fashion_mnist, normalization_stats
from maect.evaluation.knn import knn_accuracy
from maect.pipeline import cpu_name

SECTION = "### k-NN: maect vs scikit-learn brute force (`benchmarks/knn.py`)"
HEADER = (
    "| date | commit | CPU | threads | load avg | device | bank x queries x dim | k | maect s "
    "| sklearn s | speed-up | top1 maect / sklearn (weighted) / sklearn (uniform) | command |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def load_features(n_train: int, n_test: int) -> tuple[str, tuple[torch.Tensor, ...]]:
    """Normalised, flattened Fashion-MNIST pixels; random features of that shape if absent."""
    try:
        (mean,), (std,) = normalization_stats("fashion-mnist", 1)
        splits = []
        for train, n in ((True, n_train), (False, n_test)):
            ds = load_fashion_mnist(None, train=train, download=False)
            x = (ds.images[:n].flatten(1).float() / 255 - mean) / std
            splits += [x, ds.labels[:n]]
        return "fashion-mnist pixels", tuple(splits)
    except DataNotFoundError:
        gen = torch.Generator().manual_seed(0)
        centers = torch.randn(10, 784, generator=gen)
        splits = []
        for n in (n_train, n_test):
            y = torch.randint(10, (n,), generator=gen)
            splits += [centers[y] + 2.0 * torch.randn(n, 784, generator=gen), y]
        return "synthetic (fashion-mnist not found)", tuple(splits)


def sklearn_top1(train_x, train_y, test_x, test_y, k: int, weights) -> float:
    clf = KNeighborsClassifier(n_neighbors=k, algorithm="brute", metric="cosine", weights=weights)
    clf.fit(train_x.numpy(), train_y.numpy())
    return 100.0 * float((clf.predict(test_x.numpy()) == test_y.numpy()).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--train", type=int, default=60000, help="bank size")
    parser.add_argument("--test", type=int, default=10000, help="number of queries")
    parser.add_argument("--device", default="cpu", help="device of maect's k-NN")
    parser.add_argument("--append", action="store_true", help="add a row to docs/benchmarks.md")
    args = parser.parse_args()

    source, (train_x, train_y, test_x, test_y) = load_features(args.train, args.test)
    k, temp = args.k, args.temperature
    dev = torch.device(args.device)
    on_dev = [t.to(dev) for t in (train_x, train_y, test_x)]
    knn_accuracy(*[t[:100] for t in on_dev[:2]], on_dev[2][:10], test_y[:10], k, temp)  # warm-up
    ours, t_ours = timed(lambda: knn_accuracy(*on_dev, test_y, k, temp)["top1"], dev)

    def vote(distances: np.ndarray) -> np.ndarray:
        return np.exp((1.0 - distances) / temp)

    cpu = torch.device("cpu")
    weighted, t_sklearn = timed(
        lambda: sklearn_top1(train_x, train_y, test_x, test_y, k, vote), cpu
    )
    uniform, t_uniform = timed(
        lambda: sklearn_top1(train_x, train_y, test_x, test_y, k, "uniform"), cpu
    )

    shape = f"{len(train_x)} x {len(test_x)} x {train_x.shape[1]}"
    print(f"features: {source}, {shape}; k={k}, T={temp}; {torch.get_num_threads()} threads")
    print(f"{'implementation':<36} {'vote':<12} {'seconds':>8} {'top1':>7} {'time/maect':>10}")
    rows = [
        (f"maect knn_accuracy ({dev})", "exp(cos/T)", t_ours, ours),
        ("sklearn KNeighborsClassifier brute", "exp(cos/T)", t_sklearn, weighted),
        ("sklearn KNeighborsClassifier brute", "uniform", t_uniform, uniform),
    ]
    for name, rule, seconds, top1 in rows:
        print(f"{name:<36} {rule:<12} {seconds:>8.2f} {top1:>7.2f} {seconds / t_ours:>9.1f}x")
    print(f"speed-up of maect over sklearn (same vote): {t_sklearn / t_ours:.1f}x")
    print(f"top-1 difference, same vote: {abs(ours - weighted):.3f} points")
    if args.append:
        row = (
            f"| {date.today()} | {git_commit()} | {cpu_name()} | {torch.get_num_threads()} "
            f"| {load_average():.1f} | {dev} | {shape} | {k} | {t_ours:.2f} | {t_sklearn:.2f} "
            f"| {t_sklearn / t_ours:.1f}x | {ours:.2f} / {weighted:.2f} / {uniform:.2f} "
            f"| `{command_line()}` |"
        )
        append_rows(SECTION, HEADER, [row])
        print(f"appended to {BENCHMARKS_MD}")


if __name__ == "__main__":
    main()
