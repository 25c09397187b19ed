"""Evaluation protocols on frozen features: k-NN, k-means clustering, linear probe, low-shot.

All functions take tensors or NumPy arrays and return plain Python floats, dicts of floats or
tensors; they never touch global random state.
"""

from maect.evaluation.clustering import (
    ami,
    ari,
    cluster_accuracy,
    clustering_scores,
    kmeans,
    nmi,
)
from maect.evaluation.knn import knn_accuracy, knn_predict, knn_votes
from maect.evaluation.linear import linear_probe
from maect.evaluation.lowshot import (
    fit_multinomial,
    logistic_regression,
    lowshot_eval,
    lowshot_split,
    percent_split,
)

__all__ = [
    "ami",
    "ari",
    "cluster_accuracy",
    "clustering_scores",
    "fit_multinomial",
    "kmeans",
    "knn_accuracy",
    "knn_predict",
    "knn_votes",
    "linear_probe",
    "logistic_regression",
    "lowshot_eval",
    "lowshot_split",
    "nmi",
    "percent_split",
]
