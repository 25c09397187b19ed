"""Training engine: run directories, data, Lightning Trainer, resume and export.

A run directory holds ``config.yaml``, ``checkpoints/`` (``last.ckpt`` + every N epochs),
``metrics.csv``, TensorBoard events under ``tb/``, ``reconstructions/*.png`` and, once training
has finished, ``encoder.pt``. Re-running the same command on an unfinished run resumes it exactly:
weights, optimizer, lr schedule, queues and EMAs from the checkpoint, the data order from its
position in the epoch, and the random draws from (seed, rank, epoch, batch).
"""

from __future__ import annotations

import csv
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, Checkpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from timm.models.vision_transformer import Block

from maect.callbacks import ProgressBar, ReconstructionGrid, Throughput
from maect.checkpoints import save_encoder
from maect.config import ConfigError, RunConfig, check_command, did_you_mean
from maect.data.datasets import ImageDataset, SubsetDataset, build_dataset, normalization_stats
from maect.data.loader import build_loader
from maect.data.subset import balanced_subset
from maect.data.transforms import eval_transform
from maect.evaluation.monitor import build_monitor
from maect.faults import AtomicCheckpointIO, DeviceMemoryError, resume_checkpoint
from maect.methods import METHOD_CLASSES, PretrainMethod
from maect.models.cpu_linear import apply_cpu_matmul
from maect.models.vit import MaskedViT, set_grad_checkpointing
from maect.rundir import RunDirectory
from maect.sharding import BlockFSDPStrategy, check_resume_strategy, is_fsdp, whole_state_dict

log = logging.getLogger(__name__)

PREVIEW_IMAGES = 8
# The CSV logger writes metrics.csv into the run directory, which is never empty.
warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
# The training sampler resumes mid-epoch itself (EpochShuffleSampler.resume).
warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")


class RunCheckpoint(Checkpoint):
    """Writes ``last.ckpt`` after every epoch and, if ``every_steps > 0``, every that many
    optimizer steps within an epoch; keeps ``epochNNNN.ckpt`` (epochs completed, like the
    reconstruction grids) every ``every_epochs`` epochs. Writes are atomic (AtomicCheckpointIO)."""

    def __init__(self, dirpath: Path, every_epochs: int, every_steps: int) -> None:
        self.dirpath = dirpath
        self.every_epochs = every_epochs
        self.every_steps = every_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        stepped = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        last_batch = batch_idx + 1 == trainer.num_training_batches  # the epoch end saves it
        if (
            self.every_steps
            and stepped
            and not last_batch
            and trainer.global_step % self.every_steps == 0
            and not trainer.fast_dev_run
        ):
            trainer.save_checkpoint(self.dirpath / "last.ckpt")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.fast_dev_run:
            return
        epochs = trainer.current_epoch + 1
        if epochs % self.every_epochs == 0:
            trainer.save_checkpoint(self.dirpath / f"epoch{epochs:04d}.ckpt")
        trainer.save_checkpoint(self.dirpath / "last.ckpt")


def check_trainer(cfg: RunConfig) -> None:
    """Check ``trainer.accelerator``, ``trainer.devices`` and ``trainer.strategy`` against
    Lightning's accelerator and strategy registries and this machine, before anything is written
    (combinations that only Lightning's Trainer refuses are caught in :func:`fit_module`)."""
    from lightning.pytorch.accelerators import AcceleratorRegistry
    from lightning.pytorch.strategies import StrategyRegistry

    t = cfg.trainer
    registered = sorted(AcceleratorRegistry.available_accelerators())
    names = ["auto", "gpu", *registered]
    if t.accelerator not in names:
        raise ConfigError(
            f"trainer.accelerator must be one of {', '.join(names)}, got '{t.accelerator}'"
            + did_you_mean(t.accelerator, names)
        )
    strategies = StrategyRegistry.available_strategies()
    if t.strategy.lower() != "auto" and t.strategy.lower() not in strategies:
        main_names = [s for s in strategies if s.count("_") <= 1]  # not the option variants
        raise ConfigError(
            f"trainer.strategy '{t.strategy}' is not a Lightning strategy"
            + did_you_mean(t.strategy.lower(), strategies)
            + f" (auto, {', '.join(main_names)} or their variants in Lightning's StrategyRegistry)"
        )
    available = [n for n in registered if AcceleratorRegistry[n]["accelerator"].is_available()]
    if t.accelerator == "auto":
        name = next((n for n in ("tpu", "mps", "cuda") if n in available), "cpu")
    elif t.accelerator == "gpu":
        name = next((n for n in ("mps", "cuda") if n in available), "")
    else:
        name = t.accelerator if t.accelerator in available else ""
    if not name:
        raise ConfigError(
            f"trainer.accelerator={t.accelerator} is not available on this machine "
            f"(available: {', '.join(available)})"
        )
    if t.devices == "auto":
        return
    try:
        devices = AcceleratorRegistry[name]["accelerator"].parse_devices(t.devices)
    except Exception as err:  # Lightning raises TypeError, ValueError or its own exception
        raise ConfigError(f"trainer.devices={t.devices!r} is not valid for {name}: {err}") from None
    if devices in ([], 0, "0"):
        raise ConfigError(f"trainer.devices must name at least one device, got {t.devices!r}")


def resolve_precision(precision: str) -> str:
    """``auto`` means bf16 autocast on GPU and fp32 on CPU."""
    if precision != "auto":
        return precision
    return "bf16-mixed" if torch.cuda.is_available() else "32-true"


def split_dataset(cfg: RunConfig, train: bool) -> ImageDataset:
    """The training (``train``) or evaluation split of ``data.*`` (no transform set)."""
    d = cfg.data
    return build_dataset(
        d.name,
        d.root,
        train=train,
        download=d.download,
        strict=d.strict,
        synthetic_size=d.synthetic_size,
        img_size=cfg.model.img_size,
        channels=cfg.model.in_chans,
    )


def training_dataset(cfg: RunConfig) -> ImageDataset:
    """The training split, cut to the class-balanced ``data.subset`` when set."""
    d = cfg.data
    dataset = split_dataset(cfg, train=True)
    if d.subset is not None:
        dataset = SubsetDataset(
            dataset, balanced_subset(dataset.labels, d.subset, cfg.trainer.seed)
        )
    return dataset


def preview_images(cfg: RunConfig, dataset: ImageDataset) -> torch.Tensor:
    """A fixed batch of evaluation-view images spread over the training set."""
    mean, std = normalization_stats(cfg.data.name, cfg.model.in_chans)
    transform = eval_transform(cfg.model.img_size, cfg.model.in_chans, mean, std)
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
    """Lightning Trainer with atomic checkpoints, CSV + TensorBoard loggers and throughput display.

    The training loader shards itself over ranks (no Lightning DistributedSampler). BatchNorm is
    synchronised across GPUs; on CPU (gloo) it stays per rank, as torch's SyncBatchNorm needs GPUs.
    ``trainer.strategy=fsdp`` is :class:`maect.sharding.BlockFSDPStrategy`.
    """
    t = cfg.trainer
    checkpoint = RunCheckpoint(
        run_dir / "checkpoints", t.checkpoint_every, t.checkpoint_every_steps
    )
    on_gpu = t.accelerator in ("gpu", "cuda") or (
        t.accelerator == "auto" and torch.cuda.is_available()
    )
    precision = resolve_precision(t.precision)
    loggers = [
        CSVLogger(run_dir, name="", version="", flush_logs_every_n_steps=1),
        TensorBoardLogger(run_dir, name="tb", version="", default_hp_metric=False),
    ]
    return L.Trainer(
        max_epochs=t.epochs,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=BlockFSDPStrategy(precision) if is_fsdp(t.strategy) else t.strategy,
        precision=precision,
        accumulate_grad_batches=t.accumulate_grad_batches,
        log_every_n_steps=t.log_every_n_steps,
        deterministic=t.deterministic,
        enable_progress_bar=t.progress_bar,
        sync_batchnorm=on_gpu,
        use_distributed_sampler=False,
        plugins=[AtomicCheckpointIO()],
        callbacks=[
            checkpoint,
            Throughput(),
            *callbacks,
            *([ProgressBar()] if t.progress_bar else []),
        ],
        logger=loggers,
        default_root_dir=run_dir,
        fast_dev_run=dev_run or False,
        enable_model_summary=False,
    )


@rank_zero_only
def keep_metrics(logger: CSVLogger, before_step: int) -> None:
    """Carry the ``metrics.csv`` rows of an interrupted run logged before ``before_step`` over to
    the resumed one (Lightning's CSV logger deletes an existing file)."""
    path = Path(logger.log_dir) / "metrics.csv"
    if not path.is_file():
        return
    with open(path, newline="") as f:
        rows = [row for row in csv.DictReader(f) if int(row["step"]) < before_step]
    logger.experiment.metrics[:0] = rows  # creating the writer deleted the file


def compile_blocks(module: torch.nn.Module, mode: str | None = None) -> int:
    """``torch.compile`` every timm transformer block of ``module`` in place (``mode`` as
    torch.compile takes it, e.g. ``"reduce-overhead"`` for CUDA graphs); returns how many.

    Blocks are the repeated unit, so compiling them (not the whole method) keeps the compile short
    and the methods' custom entry points (``forward_masked``, partially frozen passes) eager.
    """
    blocks = [m for m in module.modules() if isinstance(m, Block)]
    for block in blocks:
        block.compile(mode=mode)
    return len(blocks)


def fit_module(
    cfg: RunConfig,
    module: PretrainMethod,
    dataset: ImageDataset,
    run_dir: Path,
    callbacks: list[Callback],
    dev_run: int = 0,
    run: RunDirectory | None = None,
) -> L.Trainer:
    """Train ``module`` on ``dataset`` (whose transform is already set), resuming from the newest
    readable checkpoint in ``run_dir/checkpoints`` (see :func:`maect.faults.resume_checkpoint`).

    ``run`` (the command's run directory) is committed, i.e. ``config.yaml`` and ``run.json``
    written, only after the loader has one full batch, Lightning accepted the trainer, the
    module's world-size checks passed and the checkpoint to resume from (if any) was found
    readable and of a compatible strategy."""
    d = cfg.data
    loader = build_loader(
        dataset, d.batch_size, d.num_workers, shuffle=True, drop_last=True, seed=cfg.trainer.seed
    )
    batches = loader.sampler.num_batches()  # ConfigError now if there is not one full batch
    t = cfg.trainer
    try:
        trainer = build_trainer(cfg, run_dir, callbacks, dev_run)
    # combinations only Lightning checks, strategies whose package is missing (deepspeed, xla)
    except (MisconfigurationException, ValueError, ImportError, TypeError) as err:
        raise ConfigError(
            f"Lightning refuses trainer.accelerator={t.accelerator}, trainer.devices={t.devices}, "
            f"trainer.strategy={t.strategy}, trainer.num_nodes={t.num_nodes}: {err}"
        ) from None
    module.check_world(trainer.world_size)
    found = None if dev_run else resume_checkpoint(run_dir / "checkpoints", cfg.to_dict()["model"])
    if found is not None:
        saved = found[1].get("hyper_parameters", {}).get("config", {}).get("trainer", {})
        check_resume_strategy(saved.get("strategy"), cfg.trainer.strategy)
    if run is not None:
        run.commit()
    if cfg.model.grad_checkpointing:
        log.info("activation checkpointing in %d modules", set_grad_checkpointing(module.modules()))
    if cfg.trainer.compile:
        log.info("torch.compile: %d transformer blocks", compile_blocks(module))
    routed = apply_cpu_matmul(module, cfg.trainer.cpu_matmul, trainer.strategy.root_device)
    if routed:
        log.info("trainer.cpu_matmul: %d linear layers through oneDNN", routed)
    resume = None
    if found is not None:
        resume, ckpt = found
        log.warning("resuming %s from %s", run_dir, resume)
        if "data_position" in ckpt:
            loader.sampler.resume(**ckpt["data_position"])
        keep_metrics(trainer.loggers[0], ckpt["global_step"])
    log.info(
        "training %s: %d batches per epoch to epoch %d on %s x %d (%s)",
        run_dir,
        batches,
        t.epochs,
        type(trainer.accelerator).__name__.removesuffix("Accelerator").lower(),
        trainer.num_devices,
        trainer.precision,
    )
    try:
        trainer.fit(module, train_dataloaders=loader, ckpt_path=resume)
    except torch.OutOfMemoryError as err:
        raise DeviceMemoryError.from_oom(
            cfg, resolve_precision(cfg.trainer.precision), err
        ) from None
    return trainer


def exported_encoder(module: PretrainMethod) -> MaskedViT:
    """``module.export_encoder()`` with whole weights: under FSDP a copy gathered from the shards
    (a collective: every rank calls it; rank 0 receives the weights), else the encoder itself."""
    encoder = module.export_encoder()
    if not is_fsdp(module.cfg.trainer.strategy):
        return encoder
    prefix = next(name for name, m in module.named_modules() if m is encoder)
    whole = MaskedViT(encoder.arch)
    state = whole_state_dict(module, prefix, all_ranks=False)
    if state:
        whole.load_state_dict(state)
    return whole


def with_monitor(cfg: RunConfig, callbacks: list[Callback] | None) -> list[Callback]:
    """The k-NN monitor of ``trainer.monitor_every`` (when it can run) followed by ``callbacks``."""
    monitor = build_monitor(cfg, every=cfg.trainer.monitor_every)
    return [*([monitor] if monitor is not None else []), *(callbacks or [])]


def finish_with_encoder(
    run: RunDirectory, trainer: L.Trainer, module: PretrainMethod, dev_run: int
) -> None:
    """Write ``module``'s exported encoder to ``encoder.pt`` of the run directory (rank 0; not in
    a dev run), wait for every rank, and mark the run finished."""
    encoder = exported_encoder(module) if not dev_run else None
    if trainer.is_global_zero and encoder is not None:
        save_encoder(encoder, run.path / "encoder.pt")
    trainer.strategy.barrier("encoder.pt")  # a next stage on any rank reads it (maect run)
    run.finish()


def train_run(
    cfg: RunConfig,
    out: str | Path,
    train: Callable[[RunDirectory], None],
    dev_run: int = 0,
    **run_options: Any,
) -> Path:
    """What every training command does around its training: check the trainer settings, open
    run directory ``out`` (lock and plan; ``run_options`` go to :class:`RunDirectory`) and, unless
    the run is complete, ``train`` into it. Returns the run directory."""
    check_trainer(cfg)
    with RunDirectory(out, cfg.to_dict(), dev_run=bool(dev_run), **run_options) as run:
        if not run.complete:
            train(run)
    return run.path


def pretrain(
    cfg: RunConfig, out: str | Path, dev_run: int = 0, callbacks: list[Callback] | None = None
) -> Path:
    """Train ``cfg.method`` from scratch into run directory ``out``: resume it if interrupted,
    do nothing if finished, continue it if ``trainer.epochs`` was raised on a finished run.

    Every check (the recipe's method, the trainer settings, ``out=``, the dataset, one full
    batch) runs before anything is written (see :mod:`maect.rundir`).

    Args:
        cfg: Validated run configuration.
        out: Run directory.
        dev_run: If > 0, run only this many batches (Lightning ``fast_dev_run``), no outputs.
        callbacks: Extra Lightning callbacks (e.g. ``maect run``'s progress lines).

    Returns:
        The run directory.
    """
    check_command(cfg, "pretrain")
    return train_run(cfg, out, lambda run: _pretrain(cfg, run, dev_run, callbacks), dev_run)


def _pretrain(
    cfg: RunConfig, run: RunDirectory, dev_run: int, callbacks: list[Callback] | None
) -> None:
    run_dir = run.path
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
    extra = with_monitor(cfg, callbacks)
    if is_fsdp(cfg.trainer.strategy):  # rank 0 alone cannot run a sharded model
        log.warning("reconstruction grids disabled under FSDP")
    else:
        extra.insert(0, recon)
    trainer = fit_module(cfg, module, dataset, run_dir, extra, dev_run, run)
    finish_with_encoder(run, trainer, module, dev_run)
