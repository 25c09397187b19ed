"""The t-SNE plot of test features that ``maect evaluate`` saves as ``embedding.png``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from maect.data.subset import balanced_subset

MAX_LEGEND_CLASSES = 20


def save_embedding_plot(
    x: torch.Tensor,
    y: torch.Tensor,
    path: Path,
    max_points: int,
    seed: int,
    title: str,
    class_names: Sequence[str] = (),
) -> None:
    """t-SNE of a class-balanced subset of ``max_points`` rows of ``x``, coloured by ``y``
    (legend entries named from ``class_names`` where given, else the label index; no legend
    beyond ``MAX_LEGEND_CLASSES`` classes).

    The features are L2-normalised (the k-NN geometry) and reduced to 50 dimensions by PCA
    before t-SNE (scikit-learn Barnes-Hut, PCA initialisation, perplexity 30 or less for few
    points).
    """
    from matplotlib.figure import Figure
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    idx = balanced_subset(y.cpu(), max_points, seed)
    points = F.normalize(x[idx.to(x.device)].float(), dim=1).cpu().numpy()
    labels = y.cpu()[idx].numpy()
    if points.shape[1] > 50 and points.shape[0] > 50:
        points = PCA(50, random_state=seed).fit_transform(points)
    perplexity = min(30.0, (points.shape[0] - 1) / 3)
    tsne = TSNE(2, perplexity=perplexity, init="pca", random_state=seed)
    # Per-iteration work is tiny at this size: OpenMP synchronisation would dominate (and is
    # catastrophic on a busy machine), so t-SNE runs on one thread.
    with threadpool_limits(1, user_api="openmp"):
        xy = tsne.fit_transform(points)
    fig = Figure(figsize=(6, 6), dpi=120)
    ax = fig.add_subplot()
    scatter = ax.scatter(xy[:, 0], xy[:, 1], c=labels, cmap="tab10", s=4, linewidths=0)
    present = sorted({int(label) for label in labels})
    if len(present) <= MAX_LEGEND_CLASSES:  # beyond that a legend is unreadable
        handles, _ = scatter.legend_elements(num=None)  # one handle per label present, sorted
        names = [class_names[c] if c < len(class_names) else str(c) for c in present]
        # Beside the axes, never over the points (bbox_inches="tight" below keeps it in the file).
        legend = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0), "borderaxespad": 0.0}
        ax.legend(handles, names, fontsize=7, title="class", markerscale=0.8, **legend)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
