"""Evaluation protocols on frozen features: k-NN, k-means clustering, linear probe, low-shot,
and robustness to the ImageNet-C corruptions (of a probe or of any classifier).

All functions take tensors or NumPy arrays and return plain Python floats, dicts of floats or
tensors; they never touch global random state (the corruptions seed NumPy's global generator
inside a call and restore it). ``maect evaluate`` is :func:`maect.evaluation.command.evaluate`.
"""

from maect.evaluation.class_subsets import map_classes
from maect.evaluation.clustering import (
    ami,
    ari,
    cluster_accuracy,
    clustering_scores,
    kmeans,
    nmi,
)
from maect.evaluation.corruptions import CORRUPTIONS, SEVERITIES, CorruptedDataset, corrupt_image
from maect.evaluation.knn import knn_accuracy, knn_predict, knn_votes
from maect.evaluation.linear import LinearProbe, fit_linear_probe, linear_probe
from maect.evaluation.lowshot import (
    fit_multinomial,
    logistic_regression,
    lowshot_eval,
    lowshot_split,
    percent_split,
)
from maect.evaluation.robustness import corruption_errors, evaluate_classifier, read_baseline

__all__ = [
    "CORRUPTIONS",
    "SEVERITIES",
    "CorruptedDataset",
    "LinearProbe",
    "ami",
    "ari",
    "cluster_accuracy",
    "clustering_scores",
    "corrupt_image",
    "corruption_errors",
    "evaluate_classifier",
    "fit_linear_probe",
    "fit_multinomial",
    "kmeans",
    "knn_accuracy",
    "knn_predict",
    "knn_votes",
    "linear_probe",
    "logistic_regression",
    "lowshot_eval",
    "lowshot_split",
    "map_classes",
    "nmi",
    "percent_split",
    "read_baseline",
]
