"""Why a method moved the evaluation numbers: diagnostics on the cached features of run directories.

Reads ``<run>/features/{train,test}-cls-*.pt`` written by ``maect evaluate`` (no extraction) and
prints, per run:

- ``knn``: weighted k-NN top-1 (k=20, T=0.07) on the full splits, and per class;
- ``linear - knn``: the probe's top-1 (from ``eval.json``) minus k-NN, the headroom MAE-CT's
  paper closes (ImageNet ViT-L/16 MAE: 75.9 - 60.6 = 15.3 points);
- ``nn purity``: share of test images whose nearest train neighbour (CLS features) has their
  class, a proxy for how often NNCLR's nearest-neighbour positives (looked up in a queue of
  projected train features) share the sample's class;
- ``top-10 purity``: the same over the 10 nearest neighbours;
- ``moved``: with ``--reference RUN``, the mean cosine between this run's and the reference's
  test features (how far tuning moved the representation; 1 = unchanged, compared in a common
  basis by an orthogonal Procrustes fit on the train features).

Usage::

    python scripts/feature_diagnostics.py runs/reproduce_fmnist/{mae,maect,maectaug} \\
        --reference runs/reproduce_fmnist/mae
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from maect.data.datasets import CLASS_NAMES
from maect.evaluation import knn_predict


def read_eval(run: Path) -> dict:
    """``run/eval.json``."""
    return json.loads((run / "eval.json").read_text())


def load_split(run: Path, split: str, result: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached CLS features and labels of ``split`` in ``run`` that ``result`` (its
    ``eval.json``) was computed on (the cache may also hold other evaluations, e.g. of a subset)."""
    size, layer = result["features"][f"n_{split}"], result["features"].get("layer")
    for path in sorted((run / "features").glob(f"{split}-cls-*.pt")):
        stored = torch.load(path, map_location="cpu", weights_only=True)
        key = stored.get("key", {})
        if key.get("layer") != layer or "+robustness" in key.get("subset", ""):
            continue  # another block (layers=...) or a corrupted test subset (robustness)
        if len(stored["labels"]) == size:
            return stored["features"], stored["labels"]
    raise SystemExit(f"{run}: no cached {split}-cls features of {size} images (run maect evaluate)")


def neighbour_purity(train_x, train_y, test_x, test_y, ks: tuple[int, ...]) -> dict[int, float]:
    """For each ``k`` in ``ks``: share of the ``k`` nearest train neighbours (cosine) that carry
    the query's label (one top-``max(ks)`` search; smaller ``k`` use its sorted prefix)."""
    bank = F.normalize(train_x, dim=1)
    hits = dict.fromkeys(ks, 0)
    for start in range(0, len(test_x), 2048):
        queries = F.normalize(test_x[start : start + 2048], dim=1)
        idx = (queries @ bank.T).topk(max(ks), dim=1).indices
        same = train_y[idx] == test_y[start : start + 2048, None]
        for k in ks:
            hits[k] += int(same[:, :k].sum())
    return {k: 100.0 * hits[k] / (len(test_x) * k) for k in ks}


def moved(train_a, test_a, train_b, test_b) -> float:
    """Mean cosine of ``test_a`` and ``test_b`` after aligning ``b`` to ``a`` by orthogonal
    Procrustes on the (centred, normalised) train features."""
    a, b = (
        F.normalize(train_a - train_a.mean(0), dim=1),
        F.normalize(train_b - train_b.mean(0), dim=1),
    )
    u, _, vh = torch.linalg.svd(b.T @ a, full_matrices=False)
    rotation = u @ vh
    ta = F.normalize(test_a - train_a.mean(0), dim=1)
    tb = F.normalize((test_b - train_b.mean(0)) @ rotation, dim=1)
    return float((ta * tb).sum(1).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--reference", type=Path, help="run to measure 'moved' against")
    parser.add_argument("--classes", help="comma-separated names (default: the dataset's)")
    args = parser.parse_args()
    results = {run: read_eval(run) for run in args.runs}
    dataset = results[args.runs[0]]["features"]["dataset"]
    names = args.classes.split(",") if args.classes else list(CLASS_NAMES.get(dataset, ()))
    ref = None
    if args.reference:
        result = read_eval(args.reference)
        ref = (
            *load_split(args.reference, "train", result),
            *load_split(args.reference, "test", result),
        )
    per_class = {}
    print("run | knn | linear | linear - knn | nn purity | top-10 purity | moved")
    print("|---|---|---|---|---|---|---|")
    for run in args.runs:
        train_x, train_y = load_split(run, "train", results[run])
        test_x, test_y = load_split(run, "test", results[run])
        pred = knn_predict(train_x, train_y, test_x, k=20, temperature=0.07)[20]
        knn = 100.0 * float((pred == test_y).double().mean())
        linear = results[run].get("linear", {}).get("top1")
        gap = "–" if linear is None else f"{linear - knn:.2f}"
        purity = neighbour_purity(train_x, train_y, test_x, test_y, (1, 10))
        shift = "–" if ref is None else f"{moved(ref[0], ref[2], train_x, test_x):.3f}"
        lin = "–" if linear is None else f"{linear:.2f}"
        print(
            f"| {run} | {knn:.2f} | {lin} | {gap} | {purity[1]:.2f} | {purity[10]:.2f} | {shift} |"
        )
        per_class[run] = [
            100.0 * float((pred[test_y == c] == c).double().mean())
            for c in range(int(test_y.max()) + 1)
        ]
    print("\nper-class k-NN top-1\n")
    print("| class | " + " | ".join(str(r) for r in args.runs) + " |")
    print("|---|" + "---|" * len(args.runs))
    for c in range(len(per_class[args.runs[0]])):
        name = names[c] if c < len(names) else str(c)
        print(f"| {name} | " + " | ".join(f"{per_class[r][c]:.1f}" for r in args.runs) + " |")


if __name__ == "__main__":
    main()
