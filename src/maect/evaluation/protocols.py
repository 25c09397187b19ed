"""Dispatch of the frozen-feature protocols of ``maect evaluate`` on one :class:`FeatureSet`
(and on each block of the per-block analysis)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from maect.evaluation._common import accuracy, timed
from maect.evaluation.clustering import clustering_scores
from maect.evaluation.config import PROTOCOLS, EvalConfig
from maect.evaluation.featureset import FeatureSet
from maect.evaluation.knn import knn_accuracy
from maect.evaluation.linear import LinearProbe, fit_linear_probe
from maect.evaluation.lowshot import lowshot_eval
from maect.evaluation.robustness import corruption_errors, summarize

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _single_thread_on_cpu(device: torch.device) -> Iterator[None]:
    """Run the block on one intra-op thread when ``device`` is the CPU.

    The linear probe's steps are many small ops on a ``[256, D]`` batch; their intra-op thread
    synchronisation costs more than it saves. On a busy 2-core machine one thread made the probe
    about 10x faster (1.6 s vs 14-18 s on a 12k x 784 problem); it was never slower.
    """
    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


PROTOCOL_LABELS = {
    "knn": "weighted k-NN on frozen features",
    "linear": "linear probe on frozen features",
    "lowshot": "logistic regression on frozen features",
    "cluster": "k-means on frozen features",
    "robustness": "linear probe on clean frozen features, applied to corrupted test features",
}
LAYERS_LABEL = "per block: each block's tokens through the final norm, pooled, frozen"


class _SharedProbe:
    """The linear probe of ``f``'s train features, fitted once for ``linear`` and
    ``robustness``."""

    def __init__(self, f: FeatureSet, cfg: EvalConfig) -> None:
        self.f, self.cfg = f, cfg
        self.probe: LinearProbe | None = None

    def get(self) -> LinearProbe:
        if self.probe is None:
            c, f = self.cfg, self.f
            num_classes = int(torch.maximum(f.train_y.max(), f.test_y.max())) + 1
            with _single_thread_on_cpu(f.train_x.device):
                self.probe = fit_linear_probe(
                    f.train_x,
                    f.train_y,
                    lrs=c.linear.lrs,
                    epochs=c.linear.epochs,
                    batch_size=c.linear.batch_size,
                    val_fraction=c.linear.val_fraction,
                    refit=c.linear.refit,
                    seed=c.seed,
                    num_classes=num_classes,
                )
        return self.probe


def _knn(f: FeatureSet, cfg: EvalConfig) -> dict[str, Any]:
    """k-NN; for a class-subset test set the bank holds only the train images of its classes."""
    bank_x, bank_y = f.train_x, f.train_y
    if f.classes is not None:
        keep = torch.isin(bank_y, f.classes)
        bank_x, bank_y = bank_x[keep], bank_y[keep]
    ks = [k for k in cfg.knn.ks if k <= len(bank_y)]  # the others: noted before extraction
    k, temperature = cfg.knn.k, cfg.knn.temperature
    return {
        **knn_accuracy(bank_x, bank_y, f.test_x, f.test_y, k=k, temperature=temperature, ks=ks),
        "k": k,
        "temperature": temperature,
    }


def _robustness(f: FeatureSet, cfg: EvalConfig, probe: LinearProbe) -> dict[str, Any]:
    r = f.robustness
    clean = accuracy(probe.predict(r.clean_x, f.classes), r.y)
    top1 = {
        c: {s: accuracy(probe.predict(x, f.classes), r.y) for s, x in per.items()}
        for c, per in r.corrupted.items()
    }
    result = summarize(top1, clean, PROTOCOL_LABELS["robustness"], **r.info)
    if r.baseline is not None:
        result.update(corruption_errors(result, r.baseline), baseline=cfg.robustness.baseline)
    return result


def run_protocols(
    f: FeatureSet,
    cfg: EvalConfig,
    timing: dict[str, float],
    protocols: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Run ``protocols`` (default ``cfg.protocols``) on ``f``; each one's seconds go to
    ``timing[protocol]`` and each result names its protocol (:data:`PROTOCOL_LABELS`)."""
    protocols = cfg.protocols if protocols is None else protocols
    probe = _SharedProbe(f, cfg)
    data = (f.train_x, f.train_y, f.test_x, f.test_y)
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "knn": lambda: _knn(f, cfg),
        "linear": lambda: probe.get().score(f.test_x, f.test_y, f.classes),
        "lowshot": lambda: lowshot_eval(
            *data,
            shots=cfg.lowshot.shots,
            percents=cfg.lowshot.percents,
            seeds=cfg.lowshot.seeds,
            l2_scale=cfg.lowshot.l2_scale,
            classes=f.classes,
        ),
        "cluster": lambda: clustering_scores(
            *(data[:2] if cfg.cluster.split == "train" else data[2:]),
            n_init=cfg.cluster.n_init,
            seed=cfg.seed,
            silhouette_samples=cfg.cluster.silhouette_samples,
        ),
        "robustness": lambda: _robustness(f, cfg, probe.get()),
    }
    result = {}
    for protocol in PROTOCOLS:
        if protocol in protocols:
            numbers = timed(timing, protocol, runners[protocol])
            result[protocol] = {"protocol": PROTOCOL_LABELS[protocol], **numbers}
            log.info("%s done in %.1f s", protocol, timing[protocol])
    return result


def run_layers(f: FeatureSet, cfg: EvalConfig, timing: dict[str, float]) -> dict[str, Any] | None:
    """``cfg.layer_protocols`` on every block of the per-block analysis (``layers``); the
    seconds of all go to ``timing["layers"]``. ``None`` without blocks."""
    if not f.blocks:
        return None

    def run() -> dict[str, Any]:
        scratch: dict[str, float] = {}
        return {
            str(b): run_protocols(f.block(b), cfg, scratch, cfg.layer_protocols)
            for b in sorted(f.blocks)
        }

    blocks = timed(timing, "layers", run)
    return {
        "protocol": LAYERS_LABEL,
        "protocols": list(cfg.layer_protocols),
        "pooling": f.info["pooling"],
        "depth": int(f.info["arch"]["depth"]) if f.info.get("arch") else None,
        "blocks": blocks,
    }
