"""Training engine: run directories, data, Lightning Trainer, resume and export.

A run directory holds ``config.yaml``, ``checkpoints/`` (``last.ckpt`` + every N epochs),
``metrics.csv``, TensorBoard events under ``tb/``, ``reconstructions/*.png`` and, once training
has finished, ``encoder.pt``. Re-running the same command on an unfinished run resumes it.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from maect.callbacks import ReconstructionGrid, Throughput
from maect.checkpoints import save_encoder
from maect.config import ConfigError, RunConfig, diff_configs
from maect.data.datasets import ImageDataset, SubsetDataset, build_dataset, normalization_stats
from maect.data.loader import build_loader
from maect.data.subset import balanced_subset
from maect.data.transforms import eval_transform
from maect.methods import METHOD_CLASSES, PretrainMethod

log = logging.getLogger(__name__)

# Keys that may change between an interrupted run and its resumption.
RESUMABLE_KEYS = (
    "data.num_workers",
    "data.root",
    "trainer.progress_bar",
    "trainer.devices",
    "trainer.accelerator",
    "trainer.num_nodes",
    "trainer.strategy",
)
PREVIEW_IMAGES = 8
# The CSV logger writes metrics.csv into the run directory, which is never empty.
warnings.filterwarnings("ignore", message=".*exists and is not empty.*")


class EpochCheckpoint(ModelCheckpoint):
    """Names periodic checkpoints by epochs completed (``epoch0005.ckpt`` after five epochs),
    like the reconstruction grids, instead of Lightning's 0-based epoch index."""

    def format_checkpoint_name(self, metrics, filename=None, ver=None, prefix=None):
        if "epoch" in metrics:
            metrics = {**metrics, "epoch": metrics["epoch"] + 1}
        return super().format_checkpoint_name(metrics, filename, ver, prefix)


def prepare_run_dir(run_dir: Path, cfg: RunConfig) -> None:
    """Create ``run_dir`` and write ``config.yaml``; refuse to resume with a different config."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    if path.is_file():
        changed = [
            d
            for d in diff_configs(yaml.safe_load(path.read_text()), cfg.to_dict())
            if not d.startswith(RESUMABLE_KEYS)
        ]
        if changed:
            raise ConfigError(
                f"{run_dir} already holds a run with another config ({'; '.join(changed)}). "
                "Use a new out= directory, or repeat the original command to resume."
            )
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def resolve_precision(precision: str) -> str:
    """``auto`` means bf16 autocast on GPU and fp32 on CPU."""
    if precision != "auto":
        return precision
    return "bf16-mixed" if torch.cuda.is_available() else "32-true"


def training_dataset(cfg: RunConfig) -> ImageDataset:
    """The training split, cut to the class-balanced ``data.subset`` when set."""
    d = cfg.data
    dataset = build_dataset(
        d.name,
        d.root,
        train=True,
        download=d.download,
        strict=d.strict,
        synthetic_size=d.synthetic_size,
        img_size=cfg.model.img_size,
        channels=cfg.model.in_chans,
    )
    if d.subset is not None:
        dataset = SubsetDataset(
            dataset, balanced_subset(dataset.labels, d.subset, cfg.trainer.seed)
        )
    return dataset


def preview_images(cfg: RunConfig, dataset: ImageDataset) -> torch.Tensor:
    """A fixed batch of evaluation-view images spread over the training set."""
    mean, std = normalization_stats(cfg.data.name, cfg.model.in_chans)
    first = dataset.load_image(0)
    transform = eval_transform(cfg.model.img_size, first.shape[-1], cfg.model.in_chans, mean, std)
    stride = max(1, len(dataset) // PREVIEW_IMAGES)
    images = []
    for index in range(0, len(dataset), stride):
        image = dataset.load_image(index)
        if image is not None:
            images.append(transform(image))
        if len(images) == PREVIEW_IMAGES:
            break
    return torch.stack(images)


def build_trainer(
    cfg: RunConfig, run_dir: Path, callbacks: list[Callback], dev_run: int = 0
) -> L.Trainer:
    """Lightning Trainer with checkpoints, CSV + TensorBoard loggers and throughput display."""
    t = cfg.trainer
    checkpoint = EpochCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="epoch{epoch:04d}",
        auto_insert_metric_name=False,
        every_n_epochs=t.checkpoint_every,
        save_top_k=-1,
        save_last=True,
        enable_version_counter=False,
    )
    loggers = [
        CSVLogger(run_dir, name="", version=""),
        TensorBoardLogger(run_dir, name="tb", version="", default_hp_metric=False),
    ]
    return L.Trainer(
        max_epochs=t.epochs,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=resolve_precision(t.precision),
        accumulate_grad_batches=t.accumulate_grad_batches,
        log_every_n_steps=t.log_every_n_steps,
        deterministic=t.deterministic,
        enable_progress_bar=t.progress_bar,
        sync_batchnorm=True,
        callbacks=[checkpoint, Throughput(), *callbacks],
        logger=loggers,
        default_root_dir=run_dir,
        fast_dev_run=dev_run or False,
        enable_model_summary=False,
    )


def fit_module(
    cfg: RunConfig,
    module: PretrainMethod,
    dataset: ImageDataset,
    run_dir: Path,
    callbacks: list[Callback],
    dev_run: int = 0,
) -> L.Trainer:
    """Train ``module`` on ``dataset`` (whose transform is already set), resuming from
    ``run_dir/checkpoints/last.ckpt`` when it exists."""
    d = cfg.data
    loader = build_loader(
        dataset, d.batch_size, d.num_workers, shuffle=True, drop_last=True, seed=cfg.trainer.seed
    )
    if len(loader) == 0:
        raise ConfigError(
            f"data.batch_size={d.batch_size} is larger than the {len(dataset)} training images"
        )
    trainer = build_trainer(cfg, run_dir, callbacks, dev_run)
    last = run_dir / "checkpoints" / "last.ckpt"
    resume = str(last) if last.is_file() and not dev_run else None
    if resume:
        log.warning("resuming %s from %s", run_dir, last)
    trainer.fit(module, train_dataloaders=loader, ckpt_path=resume)
    return trainer


def pretrain(cfg: RunConfig, out: str | Path, dev_run: int = 0) -> Path:
    """Train ``cfg.method`` from scratch into run directory ``out`` (resuming it if interrupted).

    Args:
        cfg: Validated run configuration.
        out: Run directory.
        dev_run: If > 0, run only this many batches (Lightning ``fast_dev_run``), no outputs.

    Returns:
        The run directory.
    """
    run_dir = Path(out)
    prepare_run_dir(run_dir, cfg)
    if (run_dir / "encoder.pt").is_file() and not dev_run:
        log.warning("%s is complete (encoder.pt exists); nothing to do", run_dir)
        return run_dir
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    dataset = training_dataset(cfg)
    mean, std = normalization_stats(cfg.data.name, cfg.model.in_chans)
    recon = ReconstructionGrid(
        preview_images(cfg, dataset),
        run_dir / "reconstructions",
        mean,
        std,
        cfg.trainer.recon_every,
    )
    module = METHOD_CLASSES[cfg.method](cfg)
    dataset.transform = module.train_transform()
    trainer = fit_module(cfg, module, dataset, run_dir, [recon], dev_run)
    if trainer.is_global_zero and not dev_run:
        save_encoder(module.export_encoder(), run_dir / "encoder.pt")
    return run_dir
