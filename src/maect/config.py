"""Typed run configuration: recipes (YAML shipped in the package), dotted overrides, validation.

A recipe is a YAML file under ``maect/recipes`` (or any path) whose keys mirror :class:`RunConfig`.
A recipe may name another as ``base:`` and override parts of it. Every key and type is checked
against the dataclasses below; errors name the key and the accepted values before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

METHODS = ("mae", "can", "maect", "refiner", "finetune")
TUNING_METHODS = ("maect", "refiner")  # run by `maect tune` from an init encoder
VIEW_PAIRS = ("min", "byol", "simclr")
POOLINGS = ("cls", "mean")
DATASETS = ("fashion-mnist", "cifar10", "cifar100", "stl10", "imagefolder", "synthetic", "shards")
AUGMENT_ON = ("loader", "device")
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true")
CPU_MATMULS = ("auto", "onednn", "default")
GLOBAL_POOLS = ("avg", "token")
SCRATCH = "scratch"  # finetune.init of a randomly initialised ViT


class ConfigError(ValueError):
    """A recipe or override is invalid; the message names the key."""


@dataclass
class ModelConfig:
    """ViT encoder and MAE decoder architecture.

    Attributes:
        img_size: Input image side in pixels (images are square).
        patch_size: Patch side in pixels; ``img_size`` must be a multiple of it.
        in_chans: Image channels: 1 (grayscale) or 3 (RGB).
        embed_dim: Encoder width (token dimension).
        depth: Number of encoder transformer blocks.
        num_heads: Attention heads per encoder block; ``embed_dim`` must be divisible by it.
        mlp_ratio: MLP hidden width as a multiple of ``embed_dim``.
        decoder_dim: MAE decoder width.
        decoder_depth: Number of MAE decoder blocks.
        decoder_heads: Attention heads per decoder block.
        grad_checkpointing: Recompute block activations in the backward pass (saves memory).
    """

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    grad_checkpointing: bool = False  # recompute block activations in backward (not the weights)


@dataclass
class DataConfig:
    """Dataset, loader and augmentation settings. ``batch_size`` is per device.

    ``augment_on``: ``loader`` makes every view in the loader workers; ``device`` has the workers
    crop only and applies flip and the colour operations batched on the accelerator
    (:mod:`maect.data.device_augment`), with the same random draws per image.

    Attributes:
        name: Dataset: fashion-mnist, cifar10, cifar100, stl10, imagefolder, synthetic or shards.
        root: Folder holding the dataset (default: the dataset's standard locations).
        download: Let torchvision download the dataset into ``root``.
        subset: Train on a fixed, class-balanced subset of this many images (null: all).
        strict: Stop at an unreadable image instead of skipping and counting it.
        batch_size: Images per device per step (global batch = this x devices x nodes x
            accumulation).
        num_workers: Data loader worker processes per device.
        crop_scale: RandomResizedCrop area range [min, max] as fractions of the image.
        hflip: Random horizontal flips.
        synthetic_size: Number of images of the ``synthetic`` dataset (tests only).
        augment_on: Where the views are augmented: loader (workers) or device (batched).
        label_fraction: Fraction of the labelled training images fine-tuning uses (1: all).
    """

    name: str = "fashion-mnist"
    root: str | None = None
    download: bool = False
    subset: int | None = None
    strict: bool = False
    batch_size: int = 256
    num_workers: int = 2
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    hflip: bool = True
    synthetic_size: int = 512
    augment_on: str = "loader"
    label_fraction: float = 1.0


@dataclass
class OptimConfig:
    """AdamW with per-step linear warmup then cosine; ``lr = base_lr * global_batch / 256``.

    Attributes:
        base_lr: Learning rate per 256 images of global batch (peak lr after warmup).
        weight_decay: AdamW weight decay on weight matrices (none on biases, norms, tokens).
        betas: AdamW betas [beta1, beta2].
        warmup_epochs: Linear warmup length in epochs (fractions allowed), then cosine.
        min_lr: Learning rate at the end of the cosine.
    """

    base_lr: float = 1.5e-4
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_epochs: float = 40.0
    min_lr: float = 0.0


@dataclass
class TrainerConfig:
    """Lightning Trainer settings and run-directory outputs.

    ``checkpoint_every`` (epochs) keeps ``epochNNNN.ckpt``; ``last.ckpt`` is rewritten after every
    epoch and, if ``checkpoint_every_steps > 0``, every that many optimizer steps (exact mid-epoch
    resume). A non-finite loss stops the run naming the step and the terms, unless
    ``skip_nonfinite`` (the step is skipped and counted as ``train/skipped_nonfinite``).
    ``compile`` compiles every transformer block (encoder and decoder) with ``torch.compile``
    in place (regional compilation: state-dict keys and checkpoints are unchanged).
    ``cpu_matmul`` (training on CPU): ``onednn`` runs the float32 ``nn.Linear`` products in oneDNN
    instead of MKL (maect.models.cpu_linear; same parameters and state dict), ``default`` leaves
    them to PyTorch, ``auto`` means ``onednn`` on AMD processors (where MKL takes its AVX2 path)
    and ``default`` elsewhere.

    Attributes:
        epochs: Training epochs (raising it on a finished run continues that run).
        accelerator: Lightning accelerator: auto, cpu, gpu, cuda, mps, tpu ...
        devices: Devices per node: auto, a count (e.g. 8), -1 (all) or a list of ids "0,1".
        num_nodes: Number of machines.
        strategy: Lightning strategy: auto, ddp, fsdp, deepspeed ... (a Lightning registry name).
        precision: auto (bf16 autocast on GPU, fp32 on CPU), 32-true, bf16-mixed, 16-mixed,
            bf16-true.
        accumulate_grad_batches: Batches whose gradients are summed per optimizer step.
        checkpoint_every: Keep ``checkpoints/epochNNNN.ckpt`` every this many epochs.
        checkpoint_every_steps: Also rewrite ``last.ckpt`` every this many steps (0: epoch ends).
        recon_every: Save reconstruction grids every this many epochs (and after the last).
        monitor_every: Log the online k-NN accuracy every this many epochs (0: off).
        log_every_n_steps: Log training metrics every this many steps.
        seed: Seed of the data order, augmentations, masks and initialisation.
        deterministic: Use PyTorch's deterministic kernels (bit-exact resume).
        progress_bar: Show Lightning's progress bar.
        skip_nonfinite: Skip (and count) steps with a NaN/inf loss instead of stopping.
        compile: ``torch.compile`` every transformer block.
        cpu_matmul: CPU float32 matrix products: auto, onednn or default (PyTorch's).
    """

    epochs: int = 800
    accelerator: str = "auto"
    devices: str = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "auto"
    accumulate_grad_batches: int = 1
    checkpoint_every: int = 20
    checkpoint_every_steps: int = 0
    recon_every: int = 20
    monitor_every: int = 1
    log_every_n_steps: int = 20
    seed: int = 0
    deterministic: bool = False
    progress_bar: bool = True
    skip_nonfinite: bool = False
    compile: bool = False
    cpu_matmul: str = "auto"


@dataclass
class MAEConfig:
    """Masked autoencoder objective. ``views`` augmented views of each image are masked and
    reconstructed independently (MAE-CT's stage-1 recipes use 2); the lr scales with
    ``views x global batch``.

    Attributes:
        mask_ratio: Fraction of patches masked (hidden from the encoder), in (0, 1).
        norm_pix_loss: Reconstruct per-patch normalised pixels (mean 0, std 1 per patch).
        views: Augmented views of each image, each masked and reconstructed on its own.
    """

    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    views: int = 1


@dataclass
class CANConfig:
    """CAN objective (Mishra et al. 2022); SimCLR and MAE are special cases of it.

    Each view is masked at ``mask_ratio`` and noised with a per-image ``sigma ~ U[0,
    noise_std_max]``, a standard deviation on the *normalised* pixel scale (the scale the encoder
    sees; 0.05 is about 0.011 in [0, 1] pixel units for ImageNet statistics). The noise level enters
    the decoder as a sinusoidal embedding of ``sigma / noise_std_max * noise_embed_scale`` followed
    by Linear-ReLU-Linear, added to the visible tokens and, if ``condition_mask_tokens``, to the
    mask tokens too (the paper). The loss is ``weight_contrastive * InfoNCE(temperature) +
    weight_reconstruction * masked-patch MSE + weight_denoising * visible-patch MSE against the
    unit-variance noise``; a zero weight removes its modules. ``projector``: ``mlp2`` =
    Linear(D, D)-ReLU-Linear(D, proj_dim) (default), ``mlp3bn`` = 3 layers ``proj_hidden_dim`` wide
    with BatchNorm. ``views`` names the augmentation pair.

    Attributes:
        mask_ratio: Fraction of patches masked in each view, in [0, 1).
        norm_pix_loss: Reconstruct per-patch normalised pixels.
        noise_std_max: Largest noise standard deviation (normalised pixel scale).
        noise_embed_scale: Scale of the noise level before its sinusoidal embedding.
        condition_mask_tokens: Add the noise embedding to the mask tokens too.
        temperature: InfoNCE temperature.
        weight_contrastive: Weight of the InfoNCE term.
        weight_reconstruction: Weight of the masked-patch reconstruction term.
        weight_denoising: Weight of the noise-prediction term.
        projector: Contrastive projector: mlp2 or mlp3bn.
        proj_dim: Projector output width.
        proj_hidden_dim: Hidden width of the mlp3bn projector.
        views: Augmentation pair: min, byol or simclr.
    """

    mask_ratio: float = 0.5
    norm_pix_loss: bool = True
    noise_std_max: float = 0.05
    noise_embed_scale: float = 1000.0
    condition_mask_tokens: bool = True
    temperature: float = 0.1
    weight_contrastive: float = 0.03
    weight_reconstruction: float = 0.67
    weight_denoising: float = 0.30
    projector: str = "mlp2"
    proj_dim: int = 128
    proj_hidden_dim: int = 4096
    views: str = "simclr"


@dataclass
class MAECTConfig:
    """MAE-CT contrastive tuning (Lehner et al. 2023): stage 2 trains an NNCLR head on the frozen
    encoder for ``head_epochs`` at temperature ``head_temperature``; stage 3 tunes the top blocks
    for ``trainer.epochs`` with ``optim`` (lr per block x ``layer_decay`` ** (depth - j)) at
    ``temperature``.

    Attributes:
        init: The MAE run directory or checkpoint to tune (``init=`` of ``maect tune``).
        views: Augmentation pair: min, byol or simclr.
        pooling: Feature fed to the head: cls (CLS token) or mean (mean of patch tokens).
        temperature: Stage-3 NNCLR loss temperature.
        topk: The neighbour is drawn uniformly from the top-k queue entries.
        queue_size: Entries in the nearest-neighbour queue (a multiple of the global batch).
        proj_hidden_dim: Projector hidden width.
        proj_dim: Projector output width.
        pred_hidden_dim: Predictor hidden width.
        target_ema: EMA momentum of the target projector.
        encoder_ema: EMA momentum of the exported encoder (0: export the online encoder).
        frozen_blocks: Bottom blocks kept frozen in stage 3 (null: half the depth).
        layer_decay: Stage-3 lr factor per block below the top: layer_decay ** (depth - j).
        head_epochs: Stage-2 epochs (NNCLR head on the frozen encoder; 0: skip stage 2).
        head_base_lr: Stage-2 base lr (per 256 images, both views counted).
        head_weight_decay: Stage-2 weight decay.
        head_warmup_epochs: Stage-2 warmup epochs.
        tune_head_base_lr: Stage-3 base lr of the head.
        tune_head_weight_decay: Stage-3 weight decay of the head.
        head_temperature: Stage-2 NNCLR loss temperature.
    """

    init: str = ""
    views: str = "min"
    pooling: str = "cls"
    temperature: float = 0.15
    topk: int = 20
    queue_size: int = 65536
    proj_hidden_dim: int = 2048
    proj_dim: int = 256
    pred_hidden_dim: int = 4096
    target_ema: float = 0.99
    encoder_ema: float = 0.9999
    frozen_blocks: int | None = None
    layer_decay: float = 0.65
    head_epochs: int = 20
    head_base_lr: float = 1.0e-4
    head_weight_decay: float = 1.0e-5
    head_warmup_epochs: float = 4.0
    tune_head_base_lr: float = 1.0e-4
    tune_head_weight_decay: float = 1.0e-5
    head_temperature: float = 0.15


@dataclass
class RefinerConfig:
    """MIM-Refiner (Alkin et al. 2024): one NNCLR head (projector, predictor, queue) per block of
    ``blocks`` (0-based, negative from the end; the last block's head pools after the final norm,
    the others the raw block output), trained on ``2`` global views (``model.img_size``,
    ``data.crop_scale``) plus ``local_views`` views of ``local_size`` pixels. ``loss``: ``nna``
    (only the positive logit uses the neighbour) or ``nnclr``. ``local_terms``: ``fixed`` pairs
    each global view's neighbour with each local view's prediction; ``official`` repeats the
    official code's indexing (predictions of views ``0 .. local_views - 1``). Stage 2 trains the
    heads on the frozen encoder for ``head_epochs``; stage 3 the whole encoder (minus the bottom
    ``frozen_blocks``) with ``optim`` and layer decay. lr = base lr x global batch / 256.

    Attributes:
        init: The MAE run directory or checkpoint to refine (``init=`` of ``maect tune``).
        blocks: Blocks with a head (0-based, negative from the end).
        loss: nna (only the positive logit uses the neighbour) or nnclr.
        views: Augmentation pair of the global views: min, byol or simclr.
        local_views: Number of local views per image.
        local_size: Side of the local views in pixels (a multiple of model.patch_size).
        local_crop_scale: Crop area range [min, max] of the local views.
        local_terms: fixed or official pairing of neighbours with local predictions.
        pooling: Feature fed to the heads: cls or mean.
        temperature: NNCLR/NNA loss temperature.
        topk: The neighbour is drawn uniformly from the top-k queue entries.
        queue_size: Entries in each head's nearest-neighbour queue.
        proj_hidden_dim: Projector hidden width.
        proj_dim: Projector output width.
        pred_hidden_dim: Predictor hidden width.
        head_activation: Activation of the heads: relu or gelu.
        encoder_ema: EMA momentum of the exported encoder (0: export the online encoder).
        frozen_blocks: Bottom blocks kept frozen in stage 3.
        layer_decay: Stage-3 lr factor per block below the top: layer_decay ** (depth - j).
        head_epochs: Stage-2 epochs (heads on the frozen encoder; 0: skip stage 2).
        head_base_lr: Stage-2 base lr (per 256 images).
        head_weight_decay: Stage-2 weight decay.
        head_warmup_epochs: Stage-2 warmup epochs.
        tune_head_base_lr: Stage-3 base lr of the heads.
        tune_head_weight_decay: Stage-3 weight decay of the heads.
    """

    init: str = ""
    blocks: list[int] = field(default_factory=lambda: [-1])
    loss: str = "nna"
    views: str = "byol"
    local_views: int = 10
    local_size: int = 96
    local_crop_scale: list[float] = field(default_factory=lambda: [0.05, 0.25])
    local_terms: str = "fixed"
    pooling: str = "cls"
    temperature: float = 0.2
    topk: int = 20
    queue_size: int = 65536
    proj_hidden_dim: int = 2048
    proj_dim: int = 256
    pred_hidden_dim: int = 4096
    head_activation: str = "gelu"
    encoder_ema: float = 0.9999
    frozen_blocks: int = 0
    layer_decay: float = 0.65
    head_epochs: int = 20
    head_base_lr: float = 2.0e-4
    head_weight_decay: float = 1.0e-5
    head_warmup_epochs: float = 4.0
    tune_head_base_lr: float = 4.0e-4
    tune_head_weight_decay: float = 1.0e-5


@dataclass
class FinetuneConfig:
    """Supervised end-to-end fine-tuning (``maect finetune``), the recipe of facebookresearch/mae
    and BEiT. ``init``: the encoder to start from (a run directory or a checkpoint; ``scratch``: a
    freshly initialised ViT of ``model.*``); ``reset_head`` replaces the head of a checkpoint
    that already holds a classifier. The head reads the CLS token (``global_pool: token``) or
    the LayerNorm ``fc_norm`` of the mean patch token (``avg``). Layer-wise lr decay: block ``j``
    gets ``layer_decay ** (depth - j)``. ``drop_path``: stochastic depth, linearly increasing
    over the blocks (timm's ``drop_path_rate``). ``mixup`` / ``cutmix``: the Beta alphas of
    timm's ``Mixup`` (0: off), applied per batch with probability ``mixup_prob``, cutmix chosen
    with ``mixup_switch_prob``; label ``smoothing``. ``auto_augment``: timm's RandAugment string
    (empty: none). ``reprob``: random-erasing probability. ``model_ema``: decay of an EMA of the
    weights (0: off), which is then exported (both are evaluated). The evaluation split is scored
    after every ``eval_every`` epochs (0: only after the last). ``robustness_subset=N`` (0: off)
    then scores the exported classifier on the ImageNet-C corruptions of a class-balanced N
    images of the evaluation split (``robustness_corruptions`` / ``robustness_severities``,
    empty: all 15 / 1-5; ``maect.evaluation.evaluate_classifier``), into ``finetune.json``.

    Attributes:
        init: The encoder to fine-tune: a run directory, a checkpoint, or scratch.
        global_pool: What the head reads: avg (fc_norm of the mean patch token) or token (CLS).
        layer_decay: lr factor per block below the top: layer_decay ** (depth - j).
        drop_path: Stochastic depth rate (linearly increasing over the blocks).
        mixup: Beta alpha of mixup (0: off).
        cutmix: Beta alpha of cutmix (0: off).
        mixup_prob: Probability of mixing a batch.
        mixup_switch_prob: Probability of cutmix instead of mixup.
        smoothing: Label smoothing.
        auto_augment: timm RandAugment string (empty: none).
        reprob: Random-erasing probability.
        model_ema: Decay of an EMA of the weights, exported when on (0: off).
        reset_head: Replace the head of a checkpoint that already holds a classifier.
        eval_every: Score the evaluation split every this many epochs (0: after the last only).
        robustness_subset: Images scored on the ImageNet-C corruptions after training (0: off).
        robustness_corruptions: Corruptions to score (empty: all 15).
        robustness_severities: Severities to score (empty: 1-5).
    """

    init: str = ""
    global_pool: str = "avg"
    layer_decay: float = 0.75
    drop_path: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    smoothing: float = 0.1
    auto_augment: str = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25
    model_ema: float = 0.0
    reset_head: bool = False
    eval_every: int = 1
    robustness_subset: int = 0
    robustness_corruptions: list[str] = field(default_factory=list)
    robustness_severities: list[int] = field(default_factory=list)


@dataclass
class RunConfig:
    """Everything a run needs; written to ``config.yaml`` in the run directory.

    Attributes:
        method: Method: mae, can (pretrain), maect, refiner (tune) or finetune (finetune).
        recipe: Name or path of the recipe the config was built from.
        model: Encoder and decoder architecture.
        data: Dataset, loader and augmentations.
        optim: Optimizer and learning-rate schedule.
        trainer: Lightning Trainer settings and run-directory outputs.
        mae: MAE objective (method mae).
        can: CAN objective (method can).
        maect: MAE-CT contrastive tuning (method maect).
        refiner: MIM-Refiner (method refiner).
        finetune: Supervised end-to-end fine-tuning (method finetune).
    """

    method: str = "mae"
    recipe: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    mae: MAEConfig = field(default_factory=MAEConfig)
    can: CANConfig = field(default_factory=CANConfig)
    maect: MAECTConfig = field(default_factory=MAECTConfig)
    refiner: RefinerConfig = field(default_factory=RefinerConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML-serialisable) without the other methods' sections."""
        data = dataclasses.asdict(self)
        for method in METHODS:
            if method != self.method:
                data.pop(method)
        return data


# --------------------------------------------------------------------------- recipes


def recipe_root() -> Path:
    """Directory of the recipes shipped with the package."""
    return Path(str(resources.files("maect") / "recipes"))


PIPELINE_PREFIX = "pipelines/"


def _shipped_recipes() -> list[str]:
    root = recipe_root()
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def available_recipes() -> list[str]:
    """Names of all shipped run recipes, e.g. ``mae/fmnist_vit_t`` (pipelines excluded)."""
    return [n for n in _shipped_recipes() if not n.startswith(PIPELINE_PREFIX)]


def available_pipelines() -> list[str]:
    """Names of the shipped pipeline recipes (for ``maect run``), e.g. ``pipelines/demo_fmnist``."""
    return [n for n in _shipped_recipes() if n.startswith(PIPELINE_PREFIX)]


def is_pipeline(data: dict[str, Any]) -> bool:
    """Whether a read recipe is a pipeline (it has ``stages``) rather than a method recipe."""
    return "stages" in data


def recipe_path(name: str) -> Path:
    """The file of a recipe given by shipped name or by path; unknown names get a did-you-mean."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"recipe file not found: {name}")
        return path
    path = recipe_root() / f"{name}.yaml"
    if path.is_file():
        return path
    pipeline = name.startswith(PIPELINE_PREFIX)
    close = difflib.get_close_matches(name, _shipped_recipes(), n=3)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    listing = (
        "`maect recipes pipelines` lists the pipelines"
        if pipeline
        else ("`maect recipes` lists them")
    )
    raise ConfigError(f"unknown recipe '{name}'.{hint} ({listing}, or give a YAML file)")


def recipe_summaries(pattern: str = "") -> list[tuple[str, str, str]]:
    """``(name, command that takes it, one-line description)`` of every shipped recipe whose
    name contains ``pattern`` (case-insensitive) or matches it as a shell pattern."""
    rows = []
    for name in _shipped_recipes():
        if pattern and pattern.lower() not in name.lower() and not fnmatch.fnmatch(name, pattern):
            continue
        data = read_recipe(name)
        if is_pipeline(data):
            rows.append((name, "run", f"pipeline: {first_phrase(data.get('description', ''))}"))
        else:
            command = METHOD_COMMANDS.get(data.get("method", RunConfig.method), "?")
            rows.append((name, command, first_phrase(_leading_comment(recipe_path(name)))))
    return rows


def _leading_comment(path: Path) -> str:
    """The ``#`` comment lines at the top of a YAML file, joined."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return " ".join(lines)


def first_phrase(text: str) -> str:
    """``text`` up to its first ``. ``, ``: `` or ``; `` outside parentheses (not ``et al. ``)."""
    depth = 0
    for i, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0 and text[i : i + 2] in (". ", ": ", "; ") and not text[:i].endswith(" al"):
            return text[:i]
    return text.rstrip(".:")


def _load_yaml(path: Path) -> Any:
    """Parse a YAML file; a syntax error names the file and line."""
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read recipe {path}: {err}") from None


def read_recipe(name: str, _chain: tuple[str, ...] = ()) -> dict[str, Any]:
    """Load a recipe by name or path, resolving its ``base:`` chain (a cycle is an error)."""
    if name in _chain:
        raise ConfigError(f"recipe base cycle: {' -> '.join([*_chain, name])}")
    path = recipe_path(name)
    data = _load_yaml(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of keys to values")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"recipe {path}: base must be a recipe name or path, got {base!r}")
    return deep_merge(read_recipe(base, (*_chain, name)), data)


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge ``update`` into a copy of ``base``."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# --------------------------------------------------------------------------- overrides


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=x"]`` into a nested dict; values are parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form dotted.key=value")
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with an earlier override")
        node[parts[-1]] = _override_value(item, raw)
    return nested


def _override_value(item: str, raw: str) -> Any:
    """The YAML value of one override; a syntax error names the override."""
    if raw == "":
        return ""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"override '{item}': the value is not valid YAML ({problem})") from None


# --------------------------------------------------------------------------- typed loading


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if typing.get_origin(tp) is dict:
        key_type, value_type = typing.get_args(tp)
        return f"mapping of {_type_name(key_type)} to {_type_name(value_type)}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert where lossless (int -> float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
    elif tp is type(None):
        if value is None:
            return None
    elif origin is list:
        if isinstance(value, list | tuple):
            (item_type,) = typing.get_args(tp)
            return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            key_type, value_type = typing.get_args(tp)
            return {
                _coerce(k, key_type, key): _coerce(v, value_type, f"{key}.{k}")
                for k, v in value.items()
            }
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{key} expects {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(
                f"unknown key '{prefix}{key}'{hint} (keys of '{prefix.rstrip('.') or 'config'}': "
                f"{', '.join(names)})"
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, f"{prefix}{key}")
    return cls(**kwargs)


def require(ok: bool, key: str, message: str) -> None:
    """Raise ``ConfigError("KEY MESSAGE")`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key} {message}")


def require_choice(value: Any, choices: Iterable[str], key: str) -> None:
    """Raise ``ConfigError("KEY must be one of A, B, got 'VALUE'")`` unless ``value`` is one of
    ``choices``."""
    choices = list(choices)
    require(value in choices, key, f"must be one of {', '.join(choices)}, got '{value}'")


def validate(cfg: RunConfig) -> RunConfig:
    """Check the cross-field rules; return ``cfg`` unchanged when valid."""
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.trainer
    require_choice(cfg.method, METHODS, "method")
    require_choice(d.name, DATASETS, "data.name")
    require(m.patch_size > 0, "model.patch_size", f"must be positive, got {m.patch_size}")
    require(
        m.img_size > 0 and m.img_size % m.patch_size == 0,
        "model.img_size",
        f"must be a positive multiple of model.patch_size={m.patch_size}, got {m.img_size}",
    )
    require(m.in_chans in (1, 3), "model.in_chans", f"must be 1 or 3, got {m.in_chans}")
    require(
        m.embed_dim % m.num_heads == 0 and m.embed_dim % 4 == 0,
        "model.embed_dim",
        f"must be divisible by 4 and by model.num_heads={m.num_heads}, got {m.embed_dim}",
    )
    require(
        m.decoder_dim % m.decoder_heads == 0 and m.decoder_dim % 4 == 0,
        "model.decoder_dim",
        f"must be divisible by 4 and by model.decoder_heads={m.decoder_heads}, got {m.decoder_dim}",
    )
    for key in ("depth", "num_heads", "decoder_depth", "decoder_heads"):
        require(getattr(m, key) >= 1, f"model.{key}", f"must be >= 1, got {getattr(m, key)}")
    require(
        0.0 < cfg.mae.mask_ratio < 1.0,
        "mae.mask_ratio",
        f"must be in the open interval (0, 1), got {cfg.mae.mask_ratio}",
    )
    require(cfg.mae.views >= 1, "mae.views", f"must be >= 1, got {cfg.mae.views}")
    validate_method_sections(cfg)
    require(d.batch_size >= 1, "data.batch_size", f"must be >= 1, got {d.batch_size}")
    require(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
    require_choice(d.augment_on, AUGMENT_ON, "data.augment_on")
    require(
        d.subset is None or d.subset >= 1, "data.subset", f"must be >= 1 or null, got {d.subset}"
    )
    require(
        0.0 < d.label_fraction <= 1.0,
        "data.label_fraction",
        f"must be in (0, 1] (1: all labels), got {d.label_fraction}",
    )
    require(
        d.label_fraction == 1.0 or cfg.method == "finetune",
        "data.label_fraction",
        f"applies to fine-tuning only (method finetune), not to method {cfg.method}",
    )
    require(
        len(d.crop_scale) == 2 and 0.0 < d.crop_scale[0] <= d.crop_scale[1] <= 1.0,
        "data.crop_scale",
        f"must be [min, max] with 0 < min <= max <= 1, got {d.crop_scale}",
    )
    require(o.base_lr > 0, "optim.base_lr", f"must be > 0, got {o.base_lr}")
    require(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    require(
        len(o.betas) == 2 and all(0.0 <= b < 1.0 for b in o.betas),
        "optim.betas",
        f"must be two values in [0, 1), got {o.betas}",
    )
    require(o.warmup_epochs >= 0, "optim.warmup_epochs", f"must be >= 0, got {o.warmup_epochs}")
    min_epochs = 0 if cfg.method == "finetune" else 1  # 0: evaluate the source only
    require(t.epochs >= min_epochs, "trainer.epochs", f"must be >= {min_epochs}, got {t.epochs}")
    require(
        t.precision in PRECISIONS, "trainer.precision", f"must be one of {', '.join(PRECISIONS)}"
    )
    require(
        t.accumulate_grad_batches >= 1,
        "trainer.accumulate_grad_batches",
        f"must be >= 1, got {t.accumulate_grad_batches}",
    )
    require(
        t.monitor_every >= 0,
        "trainer.monitor_every",
        f"must be >= 0 (0: off), got {t.monitor_every}",
    )
    for key in ("checkpoint_every", "recon_every", "log_every_n_steps", "num_nodes"):
        require(getattr(t, key) >= 1, f"trainer.{key}", f"must be >= 1, got {getattr(t, key)}")
    require(
        t.checkpoint_every_steps >= 0,
        "trainer.checkpoint_every_steps",
        f"must be >= 0 (0: only at epoch ends), got {t.checkpoint_every_steps}",
    )
    require_choice(t.cpu_matmul, CPU_MATMULS, "trainer.cpu_matmul")
    return cfg


def validate_method_sections(cfg: RunConfig) -> None:
    """Rules of the ``can``, ``maect`` and ``refiner`` sections (checked only for their own
    method)."""
    if cfg.method == "can":
        c = cfg.can
        require(
            0.0 <= c.mask_ratio < 1.0, "can.mask_ratio", f"must be in [0, 1), got {c.mask_ratio}"
        )
        require(c.noise_std_max >= 0, "can.noise_std_max", f"must be >= 0, got {c.noise_std_max}")
        require(c.temperature > 0, "can.temperature", f"must be > 0, got {c.temperature}")
        weights = (c.weight_contrastive, c.weight_reconstruction, c.weight_denoising)
        require(
            min(weights) >= 0 and sum(weights) > 0,
            "can.weight_*",
            f"must be >= 0 and not all zero, got {weights}",
        )
        require(
            c.weight_reconstruction == 0 or c.mask_ratio > 0,
            "can.mask_ratio",
            "must be > 0 when can.weight_reconstruction > 0 (nothing would be reconstructed)",
        )
        require(
            c.weight_denoising == 0 or c.noise_std_max > 0,
            "can.noise_std_max",
            "must be > 0 when can.weight_denoising > 0 (there would be no noise to predict)",
        )
        require(
            c.noise_embed_scale > 0,
            "can.noise_embed_scale",
            f"must be > 0, got {c.noise_embed_scale}",
        )
        require(c.projector in ("mlp2", "mlp3bn"), "can.projector", "must be mlp2 or mlp3bn")
        for key in ("proj_dim", "proj_hidden_dim"):
            value = getattr(c, key)
            require(value >= 1, f"can.{key}", f"must be >= 1, got {value}")
        require(c.views in VIEW_PAIRS, "can.views", f"must be one of {', '.join(VIEW_PAIRS)}")
    if cfg.method == "maect":
        t = cfg.maect
        validate_nnclr_section(t, "maect")
        require(
            t.head_temperature > 0,
            "maect.head_temperature",
            f"must be > 0, got {t.head_temperature}",
        )
        require(
            0.0 <= t.target_ema < 1.0, "maect.target_ema", f"must be in [0, 1), got {t.target_ema}"
        )
        require(
            t.frozen_blocks is None or 0 <= t.frozen_blocks <= cfg.model.depth,
            "maect.frozen_blocks",
            f"must be null (half the blocks) or in [0, model.depth={cfg.model.depth}], "
            f"got {t.frozen_blocks}",
        )
    if cfg.method == "refiner":
        validate_refiner(cfg)
    if cfg.method == "finetune":
        validate_finetune(cfg)


def validate_nnclr_section(section: MAECTConfig | RefinerConfig, name: str) -> None:
    """Rules of the NNCLR heads that MAE-CT and MIM-Refiner share (section ``name``): views,
    pooling, temperature, queue, head widths, encoder EMA, layer decay and head epochs."""
    s = section
    require(s.views in VIEW_PAIRS, f"{name}.views", f"must be one of {', '.join(VIEW_PAIRS)}")
    require(s.pooling in POOLINGS, f"{name}.pooling", f"must be one of {', '.join(POOLINGS)}")
    require(s.temperature > 0, f"{name}.temperature", f"must be > 0, got {s.temperature}")
    require(s.topk >= 1, f"{name}.topk", f"must be >= 1, got {s.topk}")
    require(
        s.queue_size >= s.topk, f"{name}.queue_size", f"must be >= {name}.topk, got {s.queue_size}"
    )
    for key in ("proj_hidden_dim", "proj_dim", "pred_hidden_dim"):
        value = getattr(s, key)
        require(value >= 1, f"{name}.{key}", f"must be >= 1, got {value}")
    require(
        0.0 <= s.encoder_ema < 1.0, f"{name}.encoder_ema", f"must be in [0, 1), got {s.encoder_ema}"
    )
    require(
        0.0 < s.layer_decay <= 1.0, f"{name}.layer_decay", f"must be in (0, 1], got {s.layer_decay}"
    )
    require(s.head_epochs >= 0, f"{name}.head_epochs", f"must be >= 0, got {s.head_epochs}")


def validate_refiner(cfg: RunConfig) -> None:
    """Rules of the ``refiner`` section."""
    r, depth = cfg.refiner, cfg.model.depth
    validate_nnclr_section(r, "refiner")
    require(
        bool(r.blocks) and all(-depth <= b < depth for b in r.blocks),
        "refiner.blocks",
        f"must be a non-empty list of block indices in [-{depth}, {depth - 1}], got {r.blocks}",
    )
    require(
        len({b % depth for b in r.blocks}) == len(r.blocks),
        "refiner.blocks",
        f"must not name a block twice, got {r.blocks}",
    )
    require(r.loss in ("nna", "nnclr"), "refiner.loss", f"must be nna or nnclr, got '{r.loss}'")
    require(
        cfg.data.augment_on == "loader",
        "data.augment_on",
        "must be loader for method=refiner (device augmentation batches views of one size; the "
        "local views are smaller)",
    )
    require(r.local_views >= 0, "refiner.local_views", f"must be >= 0, got {r.local_views}")
    patch = cfg.model.patch_size
    require(
        0 < r.local_size <= cfg.model.img_size and r.local_size % patch == 0,
        "refiner.local_size",
        f"must be a multiple of model.patch_size={patch} in (0, model.img_size="
        f"{cfg.model.img_size}], got {r.local_size}",
    )
    require(
        len(r.local_crop_scale) == 2 and 0.0 < r.local_crop_scale[0] <= r.local_crop_scale[1] <= 1,
        "refiner.local_crop_scale",
        f"must be [min, max] with 0 < min <= max <= 1, got {r.local_crop_scale}",
    )
    require(
        r.local_terms in ("fixed", "official"),
        "refiner.local_terms",
        f"must be fixed or official, got '{r.local_terms}'",
    )
    require(
        r.head_activation in ("relu", "gelu"),
        "refiner.head_activation",
        f"must be relu or gelu, got '{r.head_activation}'",
    )
    require(
        0 <= r.frozen_blocks <= depth,
        "refiner.frozen_blocks",
        f"must be in [0, model.depth={depth}], got {r.frozen_blocks}",
    )


def validate_finetune(cfg: RunConfig) -> None:
    """Rules of the ``finetune`` section."""
    f = cfg.finetune
    require(
        f.init != "pixels",
        "finetune.init",
        "is 'pixels': raw pixels have no encoder to fine-tune (use scratch for a randomly "
        "initialised ViT, or maect evaluate pixels for the pixel baseline)",
    )
    require_choice(f.global_pool, GLOBAL_POOLS, "finetune.global_pool")
    require(
        0.0 < f.layer_decay <= 1.0,
        "finetune.layer_decay",
        f"must be in (0, 1], got {f.layer_decay}",
    )
    for key in ("drop_path", "smoothing", "model_ema"):
        value = getattr(f, key)
        require(0.0 <= value < 1.0, f"finetune.{key}", f"must be in [0, 1), got {value}")
    for key in ("mixup_prob", "mixup_switch_prob", "reprob"):
        value = getattr(f, key)
        require(0.0 <= value <= 1.0, f"finetune.{key}", f"must be in [0, 1], got {value}")
    for key in ("mixup", "cutmix", "eval_every", "robustness_subset"):
        value = getattr(f, key)
        require(value >= 0, f"finetune.{key}", f"must be >= 0 (0: off), got {value}")
    require(
        f.auto_augment == "" or f.auto_augment.startswith("rand-"),
        "finetune.auto_augment",
        f"must be empty (off) or a timm RandAugment string like rand-m9-mstd0.5-inc1, "
        f"got '{f.auto_augment}'",
    )
    require(
        "fsdp" not in cfg.trainer.strategy.lower(),
        "trainer.strategy",
        "fsdp is not supported for fine-tuning (its per-epoch evaluation, EMA and classifier.pt "
        "use whole weights on every rank); use ddp",
    )
    require(
        cfg.data.augment_on == "loader",
        "data.augment_on",
        "must be loader for fine-tuning (timm's RandAugment and random erasing run per image in "
        f"the loader), got '{cfg.data.augment_on}'",
    )
    require(
        cfg.data.batch_size % 2 == 0 or (f.mixup == 0 and f.cutmix == 0),
        "data.batch_size",
        f"must be even with mixup/cutmix (images are mixed in pairs), got {cfg.data.batch_size}",
    )


def did_you_mean(word: str, choices: list[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``choices``, else ``""``."""
    close = difflib.get_close_matches(word, choices, n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


# The command that trains each method's recipes.
METHOD_COMMANDS = {
    m: "tune" if m in TUNING_METHODS else "finetune" if m == "finetune" else "pretrain"
    for m in METHODS
}


def command_usage(method: str, recipe: str) -> str:
    """The command line that trains ``recipe`` of ``method``."""
    command = METHOD_COMMANDS.get(method)
    if command == "tune":
        return f"maect tune recipe={recipe} init=MAE_RUN out=DIR"
    if command == "finetune":
        return f"maect finetune SOURCE recipe={recipe} out=DIR"
    return f"maect pretrain recipe={recipe} out=DIR"


def check_command(cfg: RunConfig, command: str) -> None:
    """Refuse a method recipe given to a command that does not train its method."""
    if METHOD_COMMANDS[cfg.method] != command:
        raise ConfigError(
            f"recipe {cfg.recipe} (method {cfg.method}) is not for maect {command}: "
            f"train it with `{command_usage(cfg.method, cfg.recipe)}`"
        )


def load_config(recipe: str, overrides: list[str] | None = None) -> RunConfig:
    """Resolve a recipe plus ``dotted.key=value`` overrides into a validated :class:`RunConfig`."""
    data = read_recipe(recipe)
    if is_pipeline(data):
        raise ConfigError(
            f"{recipe} is a pipeline, not a method recipe: run it with `maect run recipe={recipe}`"
        )
    data = deep_merge(data, parse_overrides(overrides or []))
    data.setdefault("recipe", recipe)
    return validate(from_dict(RunConfig, data))


def config_from_yaml(path: Path) -> RunConfig:
    """Read a ``config.yaml`` written into a run directory."""
    return validate(from_dict(RunConfig, yaml.safe_load(path.read_text())))


def diff_configs(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    keys = sorted(set(a) | set(b))
    out: list[str] = []
    for key in keys:
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff_configs(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: {va!r} -> {vb!r}")
    return out


def field_help(cls: type) -> dict[str, str]:
    """Help text of each field of dataclass ``cls``, from the ``Attributes:`` section of its
    docstring (Google style: ``name: text``, continuation lines indented further)."""
    lines = (cls.__doc__ or "").splitlines()
    helps: dict[str, str] = {}
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Attributes:")
    except StopIteration:
        return helps
    indent = None
    current = None
    for line in lines[start + 1 :]:
        if not line.strip():
            current = None
            continue
        depth = len(line) - len(line.lstrip())
        indent = depth if indent is None else indent
        if depth < indent:
            break
        name, sep, text = line.strip().partition(":")
        if depth == indent and sep and name.isidentifier():
            current = name
            helps[name] = text.strip()
        elif current is not None:
            helps[current] += " " + line.strip()
    return helps
