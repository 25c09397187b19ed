"""``maect finetune``: supervised end-to-end fine-tuning of a pretrained (or fresh) ViT.

A fine-tuning run directory holds ``config.yaml``, ``checkpoints/``, ``metrics.csv`` (training
loss, lr and the per-epoch ``val/top1``, ``val/top5``, ``val/loss``), and once finished
``classifier.pt`` (timm format, see :func:`maect.checkpoints.save_classifier`) and
``finetune.json`` (the final scores on the evaluation split). Training goes through the engine
(:func:`maect.engine.fit_module`), so devices, precision, checkpoints, exact resume and the
non-finite guard are those of pretraining. ``trainer.epochs=0`` only evaluates the source.
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only

from maect.atomic import atomic_write_text
from maect.checkpoints import (
    HEADS_BY_WIDTH,
    CheckpointError,
    holds_classifier,
    load_classifier,
    load_encoder,
    save_classifier,
)
from maect.config import SCRATCH, ConfigError, RunConfig
from maect.data.datasets import ImageDataset, SubsetDataset, normalization_stats
from maect.data.loader import build_loader
from maect.data.subset import balanced_subset
from maect.data.transforms import eval_transform, eval_view, to_normalized
from maect.engine import (
    fit_module,
    resolve_precision,
    split_dataset,
    train_run,
    training_dataset,
)
from maect.evaluation.accuracy import accuracy_summary, classifier_counts
from maect.evaluation.corruptions import CORRUPTIONS, SEVERITIES
from maect.evaluation.features import resolve_device
from maect.methods.base import arch_from_config
from maect.methods.finetune import FineTuning
from maect.models.classifier import ViTClassifier, classifier_from_state
from maect.models.vit import MaskedViT, ViTArch
from maect.rundir import RunDirectory

log = logging.getLogger(__name__)

RESULT_FILE = "finetune.json"
PROTOCOL = "fine-tuning"


# --------------------------------------------------------------------------- data


def require_labels(dataset: ImageDataset, cfg: RunConfig, split: str) -> None:
    """Fine-tuning needs a label for every image."""
    if (dataset.labels < 0).any():
        raise ConfigError(
            f"data.name={cfg.data.name}: the {split} split has unlabeled images; fine-tuning "
            "needs labelled training and evaluation splits"
        )


def label_subset(dataset: ImageDataset, fraction: float, seed: int) -> ImageDataset:
    """The class-balanced ``fraction`` of ``dataset`` (at least one image per class), the same
    images for the same seed; the dataset itself for ``fraction == 1``."""
    if fraction >= 1.0:
        return dataset
    classes = int(torch.unique(dataset.labels).numel())
    size = max(classes, round(fraction * len(dataset)))
    return SubsetDataset(dataset, balanced_subset(dataset.labels, size, seed))


def finetune_datasets(cfg: RunConfig) -> tuple[ImageDataset, ImageDataset]:
    """The labelled training images (``data.subset``, then ``data.label_fraction``) and the
    evaluation split with the evaluation transform."""
    d, m = cfg.data, cfg.model
    train = training_dataset(cfg)
    require_labels(train, cfg, "training")
    train = label_subset(train, d.label_fraction, cfg.trainer.seed)
    test = split_dataset(cfg, train=False)
    require_labels(test, cfg, "evaluation")
    mean, std = normalization_stats(d.name, m.in_chans)
    test.transform = eval_transform(m.img_size, m.in_chans, mean, std)
    return train, test


# --------------------------------------------------------------------------- source


def check_arch(source: ViTArch, target: ViTArch, init: str) -> None:
    """``source`` (the checkpoint's) must be ``target`` (``model.*``) up to the image size."""
    diffs = {
        name: getattr(source, name)
        for name in ("patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio")
        if getattr(source, name) != getattr(target, name)
    }
    if not diffs:
        return
    if "embed_dim" in diffs:  # the head count is not in the weights: the standard one
        diffs["num_heads"] = HEADS_BY_WIDTH.get(source.embed_dim, max(1, source.embed_dim // 64))
    fix = " ".join(f"model.{k}={v}" for k, v in diffs.items())
    raise CheckpointError(
        f"finetune.init={init} does not fit model.* of the recipe; add {fix} "
        "(position embeddings are resampled to model.img_size; images are converted to "
        "model.in_chans)"
    )


def source_classifier(cfg: RunConfig, num_classes: int) -> ViTClassifier:
    """The classifier to fine-tune: ``finetune.init``'s weights (an encoder gets a new head; a
    classifier keeps its head unless ``finetune.reset_head``) or, for ``scratch``, a fresh
    MAE-initialised ViT of ``model.*`` with a new head."""
    f, arch = cfg.finetune, arch_from_config(cfg)
    if f.init == SCRATCH:
        state = MaskedViT(arch).state_dict()
    elif holds_classifier(f.init):
        source = load_classifier(f.init, num_heads=cfg.model.num_heads)
        check_arch(source.arch, arch, f.init)
        if source.global_pool != f.global_pool:
            raise CheckpointError(
                f"finetune.init={f.init} is a classifier with global_pool={source.global_pool}; "
                f"set finetune.global_pool={source.global_pool} (or finetune.reset_head=true "
                "with a token-pooled source)"
            )
        state = source.state_dict()
        if f.reset_head:
            state = {k: v for k, v in state.items() if not k.startswith("head.")}
        elif source.num_classes != num_classes:
            raise CheckpointError(
                f"finetune.init={f.init} has a {source.num_classes}-class head (head.weight) "
                f"but data.name={cfg.data.name} has {num_classes} classes; set "
                "finetune.reset_head=true to fine-tune it with a new head"
            )
    else:
        encoder = load_encoder(f.init, num_heads=cfg.model.num_heads)
        check_arch(encoder.arch, arch, f.init)
        state = encoder.state_dict()
    try:
        return classifier_from_state(state, arch, num_classes, f.global_pool, f.drop_path)
    except ValueError as err:
        raise CheckpointError(f"finetune.init={f.init}: {err}") from None


# --------------------------------------------------------------------------- runs


def result_record(
    cfg: RunConfig, scores: dict[str, dict[str, float]], train_images: int
) -> dict[str, Any]:
    """``finetune.json``: the exported model's scores (accuracies in percent on the evaluation
    split) and what produced them."""
    exported = scores.get("val_ema", scores["val"])
    record = {
        "protocol": PROTOCOL,
        "top1": exported["top1"],
        "top5": exported["top5"],
        "loss": exported["loss"],
        "eval_images": exported["images"],
        "epochs": cfg.trainer.epochs,
        "label_fraction": cfg.data.label_fraction,
        "train_images": train_images,
        "source": cfg.finetune.init,
        "dataset": cfg.data.name,
        "recipe": cfg.recipe,
        "seed": cfg.trainer.seed,
        "global_pool": cfg.finetune.global_pool,
        "model_ema": cfg.finetune.model_ema,
    }
    if "val_ema" in scores:
        record["online"] = scores["val"]
    return record


def robustness_settings(cfg: RunConfig) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The corruptions and severities of ``finetune.robustness_*`` (empty: all), checked."""
    f = cfg.finetune
    corruptions = tuple(f.robustness_corruptions) or CORRUPTIONS
    severities = tuple(f.robustness_severities) or SEVERITIES
    unknown = [c for c in corruptions if c not in CORRUPTIONS]
    if unknown:
        raise ConfigError(
            f"finetune.robustness_corruptions has unknown {unknown}; choose from "
            f"{', '.join(CORRUPTIONS)}"
        )
    if not set(severities) <= set(SEVERITIES):
        raise ConfigError(
            f"finetune.robustness_severities must be values from 1 to 5, got {list(severities)}"
        )
    return corruptions, severities


def classifier_robustness(cfg: RunConfig, model: ViTClassifier, test: ImageDataset) -> dict:
    """``evaluate_classifier``'s robustness block of ``model`` on a class-balanced
    ``finetune.robustness_subset`` of the evaluation split (the same images for the same seed)."""
    from maect.evaluation.robustness import evaluate_classifier

    d, m, seed = cfg.data, cfg.model, cfg.trainer.seed
    corruptions, severities = robustness_settings(cfg)
    subset = SubsetDataset(test, balanced_subset(test.labels, cfg.finetune.robustness_subset, seed))
    mean, std = normalization_stats(d.name, m.in_chans)
    return evaluate_classifier(
        model,
        subset,
        to_normalized(mean, std),
        view=eval_view(m.img_size, m.in_chans),
        corruptions=corruptions,
        severities=severities,
        seed=seed,
        batch_size=d.batch_size,
        device="cpu" if cfg.trainer.accelerator == "cpu" else None,
        num_workers=d.num_workers,
    )


def evaluate_only(cfg: RunConfig, classifier: ViTClassifier, dataset: ImageDataset) -> dict:
    """Scores of ``classifier`` on ``dataset`` in this process (``trainer.epochs=0``)."""
    accelerator = cfg.trainer.accelerator
    device = resolve_device("cpu" if accelerator == "cpu" else "auto")
    loader = build_loader(
        dataset, cfg.data.batch_size, cfg.data.num_workers, shuffle=False, drop_last=False
    )
    bf16 = "bf16" in resolve_precision(cfg.trainer.precision)
    counts = classifier_counts(classifier.to(device), loader, device, bf16)
    return {"val": accuracy_summary(counts)}


def finetune(
    cfg: RunConfig, out: str | Path, dev_run: int = 0, callbacks: list[Callback] | None = None
) -> Path:
    """Fine-tune ``cfg.finetune.init`` on ``cfg.data`` into run directory ``out`` (resuming an
    interrupted run), then write ``classifier.pt`` and ``finetune.json``.

    Args:
        cfg: Validated configuration of method ``finetune``.
        out: Run directory.
        dev_run: If > 0, run only this many batches (Lightning ``fast_dev_run``), no outputs.
        callbacks: Extra Lightning callbacks for the training (e.g. ``maect run``'s progress).

    Returns:
        The run directory.
    """
    if cfg.method != "finetune":
        raise ConfigError(
            f"recipe={cfg.recipe} is a {cfg.method} recipe; maect finetune takes a finetune/ "
            "recipe (maect recipes lists them)"
        )
    if not cfg.finetune.init:
        raise ConfigError(
            "finetune.init is empty: name the encoder to fine-tune (a run directory, a "
            f"checkpoint, or {SCRATCH})"
        )
    robustness_settings(cfg)  # bad names fail before any work
    return train_run(
        cfg,
        out,
        lambda run: _finetune(cfg, run, dev_run, callbacks),
        dev_run,
        done_file=RESULT_FILE,
        final_outputs=("classifier.pt", RESULT_FILE),
        extendable=False,
    )


def _finetune(
    cfg: RunConfig, run: RunDirectory, dev_run: int, callbacks: list[Callback] | None
) -> None:
    run_dir = run.path
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)  # the new head's init
    train, test = finetune_datasets(cfg)  # bad data and sources fail before the run directory
    classifier = source_classifier(cfg, train.num_classes)
    if cfg.trainer.epochs == 0:
        run.commit()  # (training commits after its own checks, in fit_module)
        scores, exported = evaluate_only(cfg, classifier, test), classifier
        main = rank_zero_only.rank == 0  # under a launcher every process scores; one writes
    else:
        module = FineTuning(cfg, classifier, test)
        train.transform = module.train_transform()
        trainer = fit_module(cfg, module, train, run_dir, callbacks or [], dev_run, run)
        if not module.scores:  # resumed after the last epoch's checkpoint: score again
            module.trainer = trainer
            module.scores = module.evaluate()
        scores, exported, main = module.scores, module.export_classifier(), trainer.is_global_zero
    if main and not dev_run:
        save_classifier(exported, run_dir / "classifier.pt")
        record = result_record(cfg, scores, len(train))
        if cfg.finetune.robustness_subset:
            record["robustness"] = classifier_robustness(cfg, exported, test)
        atomic_write_text(run_dir / RESULT_FILE, json.dumps(record, indent=2))
        log.info("fine-tuned top-1 %.2f %%, top-5 %.2f %%", record["top1"], record["top5"])
    if cfg.trainer.epochs > 0:
        trainer.strategy.barrier(RESULT_FILE)  # a next pipeline stage on any rank reads it
    run.finish()


# --------------------------------------------------------------------------- seeds


def aggregate(paths: list[str | Path]) -> dict[str, Any]:
    """Mean and sample standard deviation (None for one run) of top-1 / top-5 (and of the mean
    corruption top-1, ``corruption_top1``, when every run has a robustness result) over several
    ``finetune.json`` files (or run directories), e.g. the seeds of one label fraction. The runs
    must share protocol, dataset, label fraction and epochs."""
    records = []
    for path in paths:
        path = Path(path)
        file = path / RESULT_FILE if path.is_dir() else path
        if not file.is_file():
            raise ConfigError(f"no {RESULT_FILE} at {path}")
        records.append(json.loads(file.read_text()))
    shared = ("protocol", "dataset", "label_fraction", "epochs")
    for key in shared:
        values = {json.dumps(r.get(key)) for r in records}
        if len(values) > 1:
            raise ConfigError(f"runs differ in {key} ({', '.join(sorted(values))}); not aggregated")
    summary: dict[str, Any] = {key: records[0].get(key) for key in shared}
    summary["runs"] = len(records)
    summary["seeds"] = [r.get("seed") for r in records]
    metrics = {"top1": [r["top1"] for r in records], "top5": [r["top5"] for r in records]}
    if all("robustness" in r for r in records):
        metrics["corruption_top1"] = [r["robustness"]["mean"] for r in records]
    for metric, values in metrics.items():
        summary[metric] = {
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None,
            "values": [float(v) for v in values],
        }
    return summary
