"""Typed run configuration: recipes (YAML shipped in the package), dotted overrides, validation.

A recipe is a YAML file under ``maect/recipes`` (or any path) whose keys mirror :class:`RunConfig`.
A recipe may name another as ``base:`` and override parts of it. Every key and type is checked
against the dataclasses below; errors name the key and the accepted values before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
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
    """ViT encoder and MAE decoder architecture."""

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
    """AdamW with per-step linear warmup then cosine; ``lr = base_lr * global_batch / 256``."""

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
    ``views x global batch``."""

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
    ``temperature``."""

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
    ``frozen_blocks``) with ``optim`` and layer decay. lr = base lr x global batch / 256."""

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
    empty: all 15 / 1-5; ``maect.evaluation.evaluate_classifier``), into ``finetune.json``."""

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
    """Everything a run needs; written to ``config.yaml`` in the run directory."""

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


def available_recipes() -> list[str]:
    """Names of all shipped run recipes, e.g. ``mae/fmnist_vit_t`` (pipelines excluded)."""
    root = recipe_root()
    names = (str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))
    return sorted(n for n in names if not n.startswith("pipelines/"))


def read_recipe(name: str) -> dict[str, Any]:
    """Load a recipe by name or path, resolving its ``base:`` chain."""
    path = Path(name)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = recipe_root() / f"{name}.yaml"
    if not path.is_file():
        close = difflib.get_close_matches(name, available_recipes(), n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"unknown recipe '{name}'.{hint} Available: {', '.join(available_recipes())}"
        )
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of keys to values")
    base = data.pop("base", None)
    if base is None:
        return data
    return deep_merge(read_recipe(base), data)


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
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
    return nested


# --------------------------------------------------------------------------- typed loading


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
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


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key} {message}")


def validate(cfg: RunConfig) -> RunConfig:
    """Check the cross-field rules; return ``cfg`` unchanged when valid."""
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.trainer
    _require(
        cfg.method in METHODS, "method", f"must be one of {', '.join(METHODS)}, got '{cfg.method}'"
    )
    _require(
        d.name in DATASETS, "data.name", f"must be one of {', '.join(DATASETS)}, got '{d.name}'"
    )
    _require(m.patch_size > 0, "model.patch_size", f"must be positive, got {m.patch_size}")
    _require(
        m.img_size > 0 and m.img_size % m.patch_size == 0,
        "model.img_size",
        f"must be a positive multiple of model.patch_size={m.patch_size}, got {m.img_size}",
    )
    _require(m.in_chans in (1, 3), "model.in_chans", f"must be 1 or 3, got {m.in_chans}")
    _require(
        m.embed_dim % m.num_heads == 0 and m.embed_dim % 4 == 0,
        "model.embed_dim",
        f"must be divisible by 4 and by model.num_heads={m.num_heads}, got {m.embed_dim}",
    )
    _require(
        m.decoder_dim % m.decoder_heads == 0 and m.decoder_dim % 4 == 0,
        "model.decoder_dim",
        f"must be divisible by 4 and by model.decoder_heads={m.decoder_heads}, got {m.decoder_dim}",
    )
    for key in ("depth", "num_heads", "decoder_depth", "decoder_heads"):
        _require(getattr(m, key) >= 1, f"model.{key}", f"must be >= 1, got {getattr(m, key)}")
    _require(
        0.0 < cfg.mae.mask_ratio < 1.0,
        "mae.mask_ratio",
        f"must be in the open interval (0, 1), got {cfg.mae.mask_ratio}",
    )
    _require(cfg.mae.views >= 1, "mae.views", f"must be >= 1, got {cfg.mae.views}")
    validate_method_sections(cfg)
    _require(d.batch_size >= 1, "data.batch_size", f"must be >= 1, got {d.batch_size}")
    _require(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
    _require(
        d.augment_on in AUGMENT_ON,
        "data.augment_on",
        f"must be one of {', '.join(AUGMENT_ON)}, got '{d.augment_on}'",
    )
    _require(
        d.subset is None or d.subset >= 1, "data.subset", f"must be >= 1 or null, got {d.subset}"
    )
    _require(
        0.0 < d.label_fraction <= 1.0,
        "data.label_fraction",
        f"must be in (0, 1] (1: all labels), got {d.label_fraction}",
    )
    _require(
        d.label_fraction == 1.0 or cfg.method == "finetune",
        "data.label_fraction",
        f"applies to fine-tuning only (method finetune), not to method {cfg.method}",
    )
    _require(
        len(d.crop_scale) == 2 and 0.0 < d.crop_scale[0] <= d.crop_scale[1] <= 1.0,
        "data.crop_scale",
        f"must be [min, max] with 0 < min <= max <= 1, got {d.crop_scale}",
    )
    _require(o.base_lr > 0, "optim.base_lr", f"must be > 0, got {o.base_lr}")
    _require(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    _require(
        len(o.betas) == 2 and all(0.0 <= b < 1.0 for b in o.betas),
        "optim.betas",
        f"must be two values in [0, 1), got {o.betas}",
    )
    _require(o.warmup_epochs >= 0, "optim.warmup_epochs", f"must be >= 0, got {o.warmup_epochs}")
    min_epochs = 0 if cfg.method == "finetune" else 1  # 0: evaluate the source only
    _require(t.epochs >= min_epochs, "trainer.epochs", f"must be >= {min_epochs}, got {t.epochs}")
    _require(
        t.precision in PRECISIONS, "trainer.precision", f"must be one of {', '.join(PRECISIONS)}"
    )
    _require(
        t.accumulate_grad_batches >= 1,
        "trainer.accumulate_grad_batches",
        f"must be >= 1, got {t.accumulate_grad_batches}",
    )
    _require(
        t.monitor_every >= 0,
        "trainer.monitor_every",
        f"must be >= 0 (0: off), got {t.monitor_every}",
    )
    for key in ("checkpoint_every", "recon_every", "log_every_n_steps", "num_nodes"):
        _require(getattr(t, key) >= 1, f"trainer.{key}", f"must be >= 1, got {getattr(t, key)}")
    _require(
        t.checkpoint_every_steps >= 0,
        "trainer.checkpoint_every_steps",
        f"must be >= 0 (0: only at epoch ends), got {t.checkpoint_every_steps}",
    )
    _require(
        t.cpu_matmul in CPU_MATMULS,
        "trainer.cpu_matmul",
        f"must be one of {', '.join(CPU_MATMULS)}, got '{t.cpu_matmul}'",
    )
    return cfg


def validate_method_sections(cfg: RunConfig) -> None:
    """Rules of the ``can``, ``maect`` and ``refiner`` sections (checked only for their own
    method)."""
    if cfg.method == "can":
        c = cfg.can
        _require(
            0.0 <= c.mask_ratio < 1.0, "can.mask_ratio", f"must be in [0, 1), got {c.mask_ratio}"
        )
        _require(c.noise_std_max >= 0, "can.noise_std_max", f"must be >= 0, got {c.noise_std_max}")
        _require(c.temperature > 0, "can.temperature", f"must be > 0, got {c.temperature}")
        weights = (c.weight_contrastive, c.weight_reconstruction, c.weight_denoising)
        _require(
            min(weights) >= 0 and sum(weights) > 0,
            "can.weight_*",
            f"must be >= 0 and not all zero, got {weights}",
        )
        _require(
            c.weight_reconstruction == 0 or c.mask_ratio > 0,
            "can.mask_ratio",
            "must be > 0 when can.weight_reconstruction > 0 (nothing would be reconstructed)",
        )
        _require(
            c.weight_denoising == 0 or c.noise_std_max > 0,
            "can.noise_std_max",
            "must be > 0 when can.weight_denoising > 0 (there would be no noise to predict)",
        )
        _require(
            c.noise_embed_scale > 0,
            "can.noise_embed_scale",
            f"must be > 0, got {c.noise_embed_scale}",
        )
        _require(c.projector in ("mlp2", "mlp3bn"), "can.projector", "must be mlp2 or mlp3bn")
        for key in ("proj_dim", "proj_hidden_dim"):
            value = getattr(c, key)
            _require(value >= 1, f"can.{key}", f"must be >= 1, got {value}")
        _require(c.views in VIEW_PAIRS, "can.views", f"must be one of {', '.join(VIEW_PAIRS)}")
    if cfg.method == "maect":
        t = cfg.maect
        _require(t.views in VIEW_PAIRS, "maect.views", f"must be one of {', '.join(VIEW_PAIRS)}")
        _require(t.pooling in POOLINGS, "maect.pooling", f"must be one of {', '.join(POOLINGS)}")
        _require(t.topk >= 1, "maect.topk", f"must be >= 1, got {t.topk}")
        _require(
            t.queue_size >= t.topk, "maect.queue_size", f"must be >= maect.topk, got {t.queue_size}"
        )
        _require(t.temperature > 0, "maect.temperature", f"must be > 0, got {t.temperature}")
        _require(
            t.head_temperature > 0,
            "maect.head_temperature",
            f"must be > 0, got {t.head_temperature}",
        )
        for key in ("target_ema", "encoder_ema"):
            value = getattr(t, key)
            _require(0.0 <= value < 1.0, f"maect.{key}", f"must be in [0, 1), got {value}")
        _require(
            t.frozen_blocks is None or 0 <= t.frozen_blocks <= cfg.model.depth,
            "maect.frozen_blocks",
            f"must be null (half the blocks) or in [0, model.depth={cfg.model.depth}], "
            f"got {t.frozen_blocks}",
        )
        _require(
            0.0 < t.layer_decay <= 1.0,
            "maect.layer_decay",
            f"must be in (0, 1], got {t.layer_decay}",
        )
        _require(t.head_epochs >= 0, "maect.head_epochs", f"must be >= 0, got {t.head_epochs}")
    if cfg.method == "refiner":
        validate_refiner(cfg)
    if cfg.method == "finetune":
        validate_finetune(cfg)


def validate_refiner(cfg: RunConfig) -> None:
    """Rules of the ``refiner`` section."""
    r, depth = cfg.refiner, cfg.model.depth
    _require(
        bool(r.blocks) and all(-depth <= b < depth for b in r.blocks),
        "refiner.blocks",
        f"must be a non-empty list of block indices in [-{depth}, {depth - 1}], got {r.blocks}",
    )
    _require(
        len({b % depth for b in r.blocks}) == len(r.blocks),
        "refiner.blocks",
        f"must not name a block twice, got {r.blocks}",
    )
    _require(r.loss in ("nna", "nnclr"), "refiner.loss", f"must be nna or nnclr, got '{r.loss}'")
    _require(r.views in VIEW_PAIRS, "refiner.views", f"must be one of {', '.join(VIEW_PAIRS)}")
    _require(
        cfg.data.augment_on == "loader",
        "data.augment_on",
        "must be loader for method=refiner (device augmentation batches views of one size; the "
        "local views are smaller)",
    )
    _require(r.local_views >= 0, "refiner.local_views", f"must be >= 0, got {r.local_views}")
    patch = cfg.model.patch_size
    _require(
        0 < r.local_size <= cfg.model.img_size and r.local_size % patch == 0,
        "refiner.local_size",
        f"must be a multiple of model.patch_size={patch} in (0, model.img_size="
        f"{cfg.model.img_size}], got {r.local_size}",
    )
    _require(
        len(r.local_crop_scale) == 2 and 0.0 < r.local_crop_scale[0] <= r.local_crop_scale[1] <= 1,
        "refiner.local_crop_scale",
        f"must be [min, max] with 0 < min <= max <= 1, got {r.local_crop_scale}",
    )
    _require(
        r.local_terms in ("fixed", "official"),
        "refiner.local_terms",
        f"must be fixed or official, got '{r.local_terms}'",
    )
    _require(r.pooling in POOLINGS, "refiner.pooling", f"must be one of {', '.join(POOLINGS)}")
    _require(r.temperature > 0, "refiner.temperature", f"must be > 0, got {r.temperature}")
    _require(r.topk >= 1, "refiner.topk", f"must be >= 1, got {r.topk}")
    _require(
        r.queue_size >= r.topk, "refiner.queue_size", f"must be >= refiner.topk, got {r.queue_size}"
    )
    for key in ("proj_hidden_dim", "proj_dim", "pred_hidden_dim"):
        value = getattr(r, key)
        _require(value >= 1, f"refiner.{key}", f"must be >= 1, got {value}")
    _require(
        r.head_activation in ("relu", "gelu"),
        "refiner.head_activation",
        f"must be relu or gelu, got '{r.head_activation}'",
    )
    _require(
        0.0 <= r.encoder_ema < 1.0,
        "refiner.encoder_ema",
        f"must be in [0, 1), got {r.encoder_ema}",
    )
    _require(
        0 <= r.frozen_blocks <= depth,
        "refiner.frozen_blocks",
        f"must be in [0, model.depth={depth}], got {r.frozen_blocks}",
    )
    _require(
        0.0 < r.layer_decay <= 1.0,
        "refiner.layer_decay",
        f"must be in (0, 1], got {r.layer_decay}",
    )
    _require(r.head_epochs >= 0, "refiner.head_epochs", f"must be >= 0, got {r.head_epochs}")


def validate_finetune(cfg: RunConfig) -> None:
    """Rules of the ``finetune`` section."""
    f = cfg.finetune
    _require(
        f.init != "pixels",
        "finetune.init",
        "is 'pixels': raw pixels have no encoder to fine-tune (use scratch for a randomly "
        "initialised ViT, or maect evaluate pixels for the pixel baseline)",
    )
    _require(
        f.global_pool in GLOBAL_POOLS,
        "finetune.global_pool",
        f"must be one of {', '.join(GLOBAL_POOLS)}, got '{f.global_pool}'",
    )
    _require(
        0.0 < f.layer_decay <= 1.0,
        "finetune.layer_decay",
        f"must be in (0, 1], got {f.layer_decay}",
    )
    for key in ("drop_path", "smoothing", "model_ema"):
        value = getattr(f, key)
        _require(0.0 <= value < 1.0, f"finetune.{key}", f"must be in [0, 1), got {value}")
    for key in ("mixup_prob", "mixup_switch_prob", "reprob"):
        value = getattr(f, key)
        _require(0.0 <= value <= 1.0, f"finetune.{key}", f"must be in [0, 1], got {value}")
    for key in ("mixup", "cutmix", "eval_every", "robustness_subset"):
        value = getattr(f, key)
        _require(value >= 0, f"finetune.{key}", f"must be >= 0 (0: off), got {value}")
    _require(
        f.auto_augment == "" or f.auto_augment.startswith("rand-"),
        "finetune.auto_augment",
        f"must be empty (off) or a timm RandAugment string like rand-m9-mstd0.5-inc1, "
        f"got '{f.auto_augment}'",
    )
    _require(
        "fsdp" not in cfg.trainer.strategy.lower(),
        "trainer.strategy",
        "fsdp is not supported for fine-tuning (its per-epoch evaluation, EMA and classifier.pt "
        "use whole weights on every rank); use ddp",
    )
    _require(
        cfg.data.augment_on == "loader",
        "data.augment_on",
        "must be loader for fine-tuning (timm's RandAugment and random erasing run per image in "
        f"the loader), got '{cfg.data.augment_on}'",
    )
    _require(
        cfg.data.batch_size % 2 == 0 or (f.mixup == 0 and f.cutmix == 0),
        "data.batch_size",
        f"must be even with mixup/cutmix (images are mixed in pairs), got {cfg.data.batch_size}",
    )


def load_config(recipe: str, overrides: list[str] | None = None) -> RunConfig:
    """Resolve a recipe plus ``dotted.key=value`` overrides into a validated :class:`RunConfig`."""
    data = deep_merge(read_recipe(recipe), parse_overrides(overrides or []))
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
