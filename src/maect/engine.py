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
import os
import warnings
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback, Checkpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from timm.models.vision_transformer import Block

from maect.callbacks import ProgressBar, ReconstructionGrid, Throughput
from maect.checkpoints import save_encoder
from maect.config import ConfigError, RunConfig, diff_configs
from maect.data.datasets import ImageDataset, SubsetDataset, build_dataset, normalization_stats
from maect.data.loader import build_loader
from maect.data.subset import balanced_subset
from maect.data.transforms import eval_transform
from maect.evaluation.monitor import build_monitor
from maect.faults import AtomicCheckpointIO, DeviceMemoryError, resume_checkpoint
from maect.methods import METHOD_CLASSES, PretrainMethod
from maect.models.cpu_linear import apply_cpu_matmul
from maect.models.vit import MaskedViT, set_grad_checkpointing
from maect.sharding import BlockFSDPStrategy, check_resume_strategy, is_fsdp, whole_state_dict

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
    "trainer.checkpoint_every_steps",
    "trainer.skip_nonfinite",
    "trainer.compile",
    "model.grad_checkpointing",
    "trainer.cpu_matmul",
)
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


def prepare_run_dir(run_dir: Path, cfg: RunConfig) -> None:
    """Create ``run_dir`` and write ``config.yaml``; refuse to resume with a different config.

    Every rank calls this; the file is replaced atomically so no rank reads a partial one.
    """
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
    tmp = path.with_name(f"config.yaml.{os.getpid()}.tmp")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    tmp.replace(path)


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
) -> L.Trainer:
    """Train ``module`` on ``dataset`` (whose transform is already set), resuming from the newest
    readable checkpoint in ``run_dir/checkpoints`` (see :func:`maect.faults.resume_checkpoint`)."""
    d = cfg.data
    loader = build_loader(
        dataset, d.batch_size, d.num_workers, shuffle=True, drop_last=True, seed=cfg.trainer.seed
    )
    loader.sampler.num_batches()  # ConfigError now if there is not one full batch
    trainer = build_trainer(cfg, run_dir, callbacks, dev_run)
    if cfg.model.grad_checkpointing:
        log.info("activation checkpointing in %d modules", set_grad_checkpointing(module.modules()))
    if cfg.trainer.compile:
        log.info("torch.compile: %d transformer blocks", compile_blocks(module))
    routed = apply_cpu_matmul(module, cfg.trainer.cpu_matmul, trainer.strategy.root_device)
    if routed:
        log.info("trainer.cpu_matmul: %d linear layers through oneDNN", routed)
    found = None if dev_run else resume_checkpoint(run_dir / "checkpoints", cfg.to_dict()["model"])
    resume = None
    if found is not None:
        resume, ckpt = found
        saved = ckpt.get("hyper_parameters", {}).get("config", {}).get("trainer", {})
        check_resume_strategy(saved.get("strategy"), cfg.trainer.strategy)
        log.warning("resuming %s from %s", run_dir, resume)
        if "data_position" in ckpt:
            loader.sampler.resume(**ckpt["data_position"])
        keep_metrics(trainer.loggers[0], ckpt["global_step"])
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


def pretrain(
    cfg: RunConfig, out: str | Path, dev_run: int = 0, callbacks: list[Callback] | None = None
) -> Path:
    """Train ``cfg.method`` from scratch into run directory ``out`` (resuming it if interrupted).

    Args:
        cfg: Validated run configuration.
        out: Run directory.
        dev_run: If > 0, run only this many batches (Lightning ``fast_dev_run``), no outputs.
        callbacks: Extra Lightning callbacks (e.g. ``maect run``'s progress lines).

    Returns:
        The run directory.
    """
    if cfg.method not in METHOD_CLASSES:
        command = "maect finetune SOURCE" if cfg.method == "finetune" else "maect tune ... init=RUN"
        raise ConfigError(
            f"maect pretrain trains {', '.join(METHOD_CLASSES)}; {cfg.recipe or 'this config'} has "
            f"method={cfg.method}, which starts from a pretrained encoder: {command}"
        )
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
    monitor = build_monitor(cfg, every=cfg.trainer.monitor_every)
    extra = [*([monitor] if monitor is not None else []), *(callbacks or [])]  # after the monitor
    if is_fsdp(cfg.trainer.strategy):  # rank 0 alone cannot run a sharded model
        log.warning("reconstruction grids disabled under FSDP")
    else:
        extra.insert(0, recon)
    trainer = fit_module(cfg, module, dataset, run_dir, extra, dev_run)
    encoder = exported_encoder(module) if not dev_run else None
    if trainer.is_global_zero and encoder is not None:
        save_encoder(encoder, run_dir / "encoder.pt")
    trainer.strategy.barrier("encoder.pt")  # a next stage on any rank reads it (maect run)
    return run_dir
