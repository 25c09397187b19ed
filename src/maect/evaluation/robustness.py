"""Accuracy under the ImageNet-C common corruptions, and the mean corruption error (mCE).

Two protocols share the summary (:func:`summarize`) and the mCE (:func:`corruption_errors`):

- ``maect evaluate ... protocols=robustness``: a linear probe trained on the clean train
  features, applied to the features of the corrupted test images (``evaluation.protocols``);
- :func:`evaluate_classifier`: any module that maps normalised images to logits (a fine-tuned
  classifier), run on the corrupted test images.

The summary (``"robustness"`` in ``eval.json``; accuracies in percent)::

    {"protocol": .., "clean": top1 on the same images uncorrupted,
     "top1": {"gaussian_noise": {"1": .., .., "5": .., "mean": ..}, ..},
     "per_severity": {"1": mean over corruptions, ..}, "mean": mean over all,
     "corruptions": [..], "severities": [..], "n_test": .., "seed": ..,
     "mce": .., "relative_mce": .., "ce": {corruption: ..}, "baseline": ..}

mCE (Hendrycks & Dietterich 2019): per corruption ``CE_c = sum_s E_{s,c} / sum_s E^base_{s,c}``
with ``E = 100 - top1`` the error in percent, ``mCE = mean_c CE_c`` (in percent, 100 = as robust as
the baseline); relative mCE does the same with ``E_{s,c} - E_clean`` (the drop from clean).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from maect.data.datasets import ImageDataset
from maect.data.loader import build_loader
from maect.evaluation._common import accuracy, predict_within
from maect.evaluation.corruptions import CORRUPTIONS, SEVERITIES, CorruptedDataset
from maect.evaluation.features import resolve_device

CLASSIFIER_PROTOCOL = "classifier on corrupted test images"


def summarize(
    top1: Mapping[str, Mapping[int, float]], clean: float, protocol: str, **info: Any
) -> dict[str, Any]:
    """The ``robustness`` block from the accuracies ``top1[corruption][severity]`` (percent).

    Args:
        top1: Accuracy per corruption and severity.
        clean: Accuracy on the same images without corruption.
        protocol: Which protocol produced the numbers (stored as ``"protocol"``).
        info: More entries stored as they are (``n_test``, ``seed``, ...).
    """
    corruptions = list(top1)
    severities = sorted({s for per in top1.values() for s in per})
    table = {
        c: {**{str(s): top1[c][s] for s in severities}, "mean": statistics.fmean(top1[c].values())}
        for c in corruptions
    }
    per_severity = {str(s): statistics.fmean(top1[c][s] for c in corruptions) for s in severities}
    return {
        "protocol": protocol,
        "clean": clean,
        "top1": table,
        "per_severity": per_severity,
        "mean": statistics.fmean(per_severity.values()),
        "corruptions": corruptions,
        "severities": severities,
        **info,
    }


def corruption_errors(result: Mapping[str, Any], baseline: Mapping[str, Any]) -> dict[str, Any]:
    """mCE and relative mCE of a ``robustness`` block against a baseline's (module doc).

    Raises:
        ValueError: When the baseline lacks a corruption or severity of ``result``, or its error
            sum (or error increase, for the relative mCE) is zero.
    """
    ce, relative = {}, {}
    for corruption in result["corruptions"]:
        ours = result["top1"][corruption]
        theirs = baseline.get("top1", {}).get(corruption)
        keys = [str(s) for s in result["severities"]]
        if theirs is None or any(k not in theirs for k in keys):
            raise ValueError(
                f"the baseline has no accuracy for {corruption} at severities {', '.join(keys)}"
            )
        errors = [100.0 - ours[k] for k in keys]
        base_errors = [100.0 - theirs[k] for k in keys]
        if sum(base_errors) <= 0:
            raise ValueError(f"the baseline makes no error on {corruption}: its CE is undefined")
        ce[corruption] = 100.0 * sum(errors) / sum(base_errors)
        drop = sum(e - (100.0 - result["clean"]) for e in errors)
        base_drop = sum(e - (100.0 - baseline["clean"]) for e in base_errors)
        relative[corruption] = 100.0 * drop / base_drop if base_drop > 0 else None
    defined = [v for v in relative.values() if v is not None]
    return {
        "mce": statistics.fmean(ce.values()),
        "relative_mce": statistics.fmean(defined) if len(defined) == len(relative) else None,
        "ce": ce,
    }


def read_baseline(path: str | Path) -> dict[str, Any]:
    """The ``robustness`` block of a baseline: an ``eval.json`` (or any JSON file with a
    ``robustness`` entry, e.g. a fine-tuning result) or a directory holding ``eval.json``.

    Raises:
        ValueError: If the file is missing, unreadable or has no ``robustness`` entry.
    """
    file = Path(path)
    if file.is_dir():
        file = file / "eval.json"
    try:
        data = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {file}: {err}") from None
    block = data.get("robustness") if isinstance(data, dict) else None
    if not isinstance(block, dict) or "top1" not in block or "clean" not in block:
        raise ValueError(f"{file} holds no robustness result (run protocols=robustness on it)")
    return block


@torch.no_grad()
def _predict(
    model: nn.Module,
    dataset: ImageDataset,
    batch_size: int,
    device: torch.device,
    num_workers: int,
    classes: torch.Tensor | None,
    desc: str,
    progress: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted classes and labels of every readable image of ``dataset``."""
    loader = build_loader(dataset, batch_size, num_workers, shuffle=False, drop_last=False)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    preds, labels = [], []
    with torch.inference_mode(), autocast:
        for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
            logits = model(batch["image"].to(device, non_blocking=True)).float()
            preds.append(predict_within(logits, classes).cpu())
            labels.append(batch["label"])
    return torch.cat(preds), torch.cat(labels)


def evaluate_classifier(
    model: nn.Module,
    dataset: ImageDataset,
    normalize: Callable[[torch.Tensor], torch.Tensor],
    view: Callable[[torch.Tensor], torch.Tensor] | None = None,
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
    seed: int = 0,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    classes: torch.Tensor | None = None,
    baseline: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Top-1 of a classifier on ``dataset`` clean and under every corruption and severity.

    One pass over the clean images and one per (corruption, severity): ``len(corruptions) x
    len(severities) + 1`` passes in all (76 for the full benchmark), so pass a class-balanced
    subset on a CPU. The model is put in eval mode and its mode restored.

    Args:
        model: Maps normalised images ``[B, C, H, W]`` to logits ``[B, num_classes]``.
        dataset: Labelled test images; its own ``transform`` is ignored (``view`` and
            ``normalize`` are applied instead).
        normalize: uint8 image -> model input, e.g. ``maect.data.transforms.to_normalized``.
        view: uint8 -> uint8 view at the model's size before the corruption, e.g.
            ``maect.data.transforms.eval_view``; ``None`` when the images have that size.
        corruptions: Names from :data:`~maect.evaluation.corruptions.CORRUPTIONS`.
        severities: Values from 1 to 5.
        seed: Seed of the corruptions (same seed -> same corrupted pixels).
        batch_size: Images per forward pass.
        device: Where the model runs; ``None``: the GPU if there is one (bf16 autocast there).
        num_workers: Data loader workers (they generate the corruptions).
        classes: Score with the argmax over these classes only (a test set that covers a
            subset of the classifier's classes, ImageNet-R style); ``None``: all classes.
        baseline: A baseline's ``robustness`` block (:func:`read_baseline`): adds the mCE.
        progress: Show progress bars.

    Returns:
        The ``robustness`` block of the module doc, ``protocol`` = :data:`CLASSIFIER_PROTOCOL`.
    """
    device = resolve_device(device)
    was_training = model.training
    model.eval().to(device)
    common = (batch_size, device, num_workers, classes)
    clean = CorruptedDataset(dataset, None, view=view, transform=normalize)
    try:
        preds, labels = _predict(model, clean, *common, "clean", progress)
        clean_top1 = accuracy(preds, labels)
        top1: dict[str, dict[int, float]] = {}
        for corruption in corruptions:
            for severity in severities:
                corrupted = CorruptedDataset(dataset, corruption, severity, seed, view, normalize)
                desc = f"{corruption} {severity}"
                preds, labels = _predict(model, corrupted, *common, desc, progress)
                top1.setdefault(corruption, {})[severity] = accuracy(preds, labels)
    finally:
        model.train(was_training)
    result = summarize(top1, clean_top1, CLASSIFIER_PROTOCOL, n_test=int(labels.numel()), seed=seed)
    if baseline is not None:
        result.update(corruption_errors(result, baseline))
    return result
