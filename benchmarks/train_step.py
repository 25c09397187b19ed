"""Training-step throughput and memory of MAE, MAE-CT stage 3 and CAN against peers.

Every case is a full optimizer step on a synthetic batch: forward, backward, AdamW over the
method's ``param_groups()`` and the method's ``optimizer_step`` extras (MAE-CT's EMA updates).
maect's cases build AdamW as ``configure_optimizers`` does (fused on CUDA and CPU, PyTorch's
default elsewhere); the peers use PyTorch's default AdamW (foreach on CUDA, a per-tensor loop on
CPU).
bf16 autocast on CUDA, float32 on CPU (``--precision``). Cases take turns within each timing round
in one process; the figure is the median over rounds after warm-up. On CUDA a round runs
``--inner`` steps and synchronises once, so no step synchronises with the host.

Cases and their peers (ratio = our images/s over the peer's):

- ``mae`` vs ``lightly``: the same ViT and decoder assembled from lightly's
  ``MaskedVisionTransformerTIMM`` + ``MaskedVisionTransformerDecoderTIMM`` the way lightly's MAE
  is built (keep/mask indices, mask tokens scattered in, prediction at the masked tokens only),
  with the same normalised-pixel loss and optimizer.
- ``maect`` (``ContrastiveTuning``) vs ``maect_eager``: the straightforward implementation, each
  view through the encoder on its own and the frozen blocks left out of the optimizer only (autograd
  runs through them).
- ``can`` vs ``can_eager``: each view through encoder and decoder on its own.
- ``finetune`` (``FineTuning``: classifier, timm mixup / cutmix, soft-target cross-entropy,
  layer-wise lr) vs ``finetune_plain``: the same timm ViT classifier (drop path, global pool),
  timm ``Mixup`` and ``SoftTargetCrossEntropy`` and timm's layer-decay groups in a plain PyTorch
  step, as facebookresearch/mae's ``engine_finetune.py`` runs it. The per-sample augmentation
  (RandAugment, erasing) is the data side: ``--data`` times it.
- ``simclr`` (CAN's configuration without masking, noise and decoder) is the FLOPs reference of
  ``can``; ``maect_head`` is MAE-CT stage 2 (NNCLR head on the frozen encoder).
- ``refiner`` is MIM-Refiner stage 3 (``refiner/<model>``: every head, 2 global + the local
  views, the whole encoder trained), ``refiner_head`` its stage 2; no peer. ``--model vit_h14``
  and ``vit_2b`` have no CAN recipe: CAN and SimCLR run the ViT-L/16 recipe's objective there.

Peak memory: on CUDA ``max_memory_allocated`` during one step, less what other cases hold; on CPU
(no allocator statistics) the most bytes of tensor storage alive at once during the step,
tracked op by op (:class:`LiveBytes`): parameters, gradients, AdamW state, saved activations and
temporaries, as the CUDA figure counts them.
FLOPs: ``FlopCounterMode`` over one forward + backward (matrix products and attention). On CUDA,
MFU = model FLOPs/s over the measured dense bf16 matmul rate of the device.

``--candidates [NAMES]`` measures single optimisations one against the other (all, or those of
:data:`CANDIDATES` named: fused AdamW, SDPA, bf16 autocast, the sync-free step against one that
reads the guard and the loss on the host every step, activation checkpointing, views in one
batch, frozen blocks without autograd, ``onednn``: ``nn.Linear`` through oneDNN instead of MKL,
CPU only, as ``trainer.cpu_matmul=onednn`` does, ``compile``: every transformer block under
torch.compile as ``trainer.compile=true`` does, ``cudagraphs``: the same with
``mode="reduce-overhead"``, CUDA only); ``--scale`` sweeps batch, image size and width for MAE and
fits lines; ``--memory`` measures peak memory at ``--batch`` and twice that, with and without
activation checkpointing, and fits the memory per image (``docs/performance.md``); ``--set
model.grad_checkpointing=true`` turns checkpointing on in every case. A named ``--candidates``
list runs without the peer comparison; ``--candidates`` alone runs both, as before. ``--clock
cpu`` times CPU seconds of the process (all threads) instead of wall time: the robust figure on a
shared CPU. Every group of cases is printed, and with ``--append`` added to
``docs/benchmarks.md``, as soon as it is measured, so a run stopped at a
time limit keeps what it measured. The last line is a summary::

    summary mae_vs_peer=<images/s ratio> maect_vs_mae_step=<step time ratio> \
can_vs_simclr_flops=<FLOPs ratio> finetune_vs_plain=<images/s ratio>

Usage::

    python benchmarks/train_step.py --model vit_t_fmnist --batch 128 [--candidates] [--append]
    python benchmarks/train_step.py --model vit_b16 --batch 8 --cases mae,lightly
    python benchmarks/train_step.py --model vit_l16 --batch 2 --flops-only
    python benchmarks/train_step.py --model vit_t_fmnist --batch 64 --scale
    python benchmarks/train_step.py --model vit_l16 --batch 1 --cases refiner --rounds 1
    python benchmarks/train_step.py --model vit_l16 --batch 64 --cases mae --candidates sync
    python benchmarks/train_step.py --model vit_h14 --batch 2 --cases mae,maect --memory
    python benchmarks/train_step.py --cases mae,maect,can --candidates onednn --clock cpu
    python benchmarks/train_step.py --model vit_t_fmnist --batch 128 --cases finetune,finetune_plain
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import statistics
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import (
    append_rows,
    command_line,
    device_name,
    git_commit,
    load_average,
    step_times,
    synchronize,
    training_flops,
)
from can_cost import MODELS as CAN_MODELS
from lightly.models import utils as lightly_utils
from lightly.models.modules import (
    MaskedVisionTransformerDecoderTIMM,
    MaskedVisionTransformerTIMM,
)
from PIL import Image
from timm.data import Mixup
from timm.layers import Attention
from timm.loss import SoftTargetCrossEntropy
from timm.models.vision_transformer import VisionTransformer
from timm.optim import param_groups_layer_decay
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from maect.config import RunConfig, available_recipes, load_config
from maect.data.datasets import (
    DataNotFoundError,
    ImageFolderDataset,
    load_fashion_mnist,
    make_synthetic,
)
from maect.engine import compile_blocks
from maect.faults import NonFiniteGuard
from maect.methods import CAN, MAE, PretrainMethod
from maect.methods.base import arch_from_config
from maect.methods.can import CANOutput
from maect.methods.finetune import FineTuning
from maect.methods.maect import ContrastiveTuning, NNCLRHeadTraining
from maect.methods.refiner import RefinerHeadTraining, RefinerTuning
from maect.methods.schedule import decay_groups
from maect.models.classifier import classifier_from_state, classifier_kwargs
from maect.models.cpu_linear import route_linears
from maect.models.vit import build_encoder, set_grad_checkpointing

CASES = (
    "mae",
    "lightly",
    "maect",
    "maect_eager",
    "can",
    "can_eager",
    "simclr",
    "maect_head",
    "refiner",
    "refiner_head",
    "finetune",
    "finetune_plain",
)
# --model -> (recipe suffix, SimCLR recipe); a method without a recipe of that suffix is left out
MODELS = {**CAN_MODELS, "vit_h14": ("in1k_vit_h14", "simclr/in1k_vit_b16")}
DEFAULT_CASES = "mae,lightly,maect,maect_eager,can,can_eager,simclr"
PEERS = {"mae": "lightly", "maect": "maect_eager", "can": "can_eager", "finetune": "finetune_plain"}
CLASSES = 10  # classes of the synthetic batches
SECTION = "### Training step: maect vs peers (`benchmarks/train_step.py`)"
SCALE_SECTION = "### Training-step scaling of MAE (`benchmarks/train_step.py --scale`)"
MEMORY_SECTION = "### Training-step memory (`benchmarks/train_step.py --memory`)"
CANDIDATES = (
    "adamw",
    "sdpa",
    "precision",
    "sync",
    "checkpointing",
    "compile",
    "cudagraphs",
    "views",
    "frozen",
    "onednn",
)
# --model beyond MODELS: (recipe suffix, SimCLR recipe, model overrides). ViT-2B/14 is the
# 2560-wide, 24-block, 32-head ViT of MAE pre-pretraining (Singh et al. 2023; MIM-Refiner's 2B).
LARGE_MODELS = {
    "vit_2b": (
        "in1k_vit_h14",
        "simclr/in1k_vit_b16",
        ["model.embed_dim=2560", "model.depth=24", "model.num_heads=32"],
    ),
}
PRESETS = {name: (suffix, simclr, []) for name, (suffix, simclr) in MODELS.items()} | LARGE_MODELS
HEADER = (
    "| date | commit | machine | load | torch | model | batch | precision | case | images/s "
    "| ms/step | GFLOPs/step | peak MiB | vs | ratio | MFU | args |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)
LR = 1e-4
Group = Callable[[], tuple[list["Bench"], list[tuple[str, str]]]]


# --------------------------------------------------------------------------- peers


class LightlyMAE(nn.Module):
    """Peer of ``mae``: lightly's masked ViT and decoder around a timm ViT of the same
    architecture, wired as lightly's MAE: index masks, mask tokens scattered in at the masked
    positions, prediction head on the masked tokens only, per-patch normalised pixel MSE."""

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__()
        m = cfg.model
        vit = VisionTransformer(**arch_from_config(cfg).timm_kwargs())  # plain timm, our shape
        self.encoder = MaskedVisionTransformerTIMM(vit=vit)
        self.decoder_embed = nn.Linear(m.embed_dim, m.decoder_dim)
        self.decoder = MaskedVisionTransformerDecoderTIMM(
            num_patches=vit.patch_embed.num_patches,
            embed_dim=m.decoder_dim,
            depth=m.decoder_depth,
            num_heads=m.decoder_heads,
            mlp_ratio=m.mlp_ratio,
        )
        self.prediction_head = nn.Linear(m.decoder_dim, m.patch_size**2 * m.in_chans)
        self.patch_size = m.patch_size
        self.mask_ratio = cfg.mae.mask_ratio
        self.weight_decay = cfg.optim.weight_decay

    def compute_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        images = batch["image"]
        size = (images.shape[0], self.encoder.sequence_length)
        keep, masked = lightly_utils.random_token_mask(size, self.mask_ratio, device=images.device)
        encoded = self.decoder_embed(self.encoder.encode(images, idx_keep=keep))
        tokens = lightly_utils.repeat_token(self.decoder.mask_token, size)
        tokens = lightly_utils.set_at_index(tokens, keep, encoded.type_as(tokens))
        pred = self.prediction_head(lightly_utils.get_at_index(self.decoder(tokens), masked))
        patches = lightly_utils.patchify(images, self.patch_size)
        target = lightly_utils.normalize_mean_var(lightly_utils.get_at_index(patches, masked - 1))
        return {"loss": F.mse_loss(pred.float(), target)}

    def param_groups(self) -> list[dict]:
        return decay_groups(self.named_parameters(), self.weight_decay)


class PlainFineTuning(nn.Module):
    """Peer of ``finetune``: timm's ViT classifier of the same architecture, pooling and drop
    path, timm ``Mixup`` (label smoothing inside) and ``SoftTargetCrossEntropy``, timm's
    layer-decay parameter groups, as facebookresearch/mae's fine-tuning step."""

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__()
        f = cfg.finetune
        self.model = VisionTransformer(
            **classifier_kwargs(arch_from_config(cfg), CLASSES, f.global_pool, f.drop_path)
        )
        self.mixup = Mixup(
            mixup_alpha=f.mixup,
            cutmix_alpha=f.cutmix,
            label_smoothing=f.smoothing,
            num_classes=CLASSES,
        )
        self.criterion = SoftTargetCrossEntropy()
        self.weight_decay, self.layer_decay = cfg.optim.weight_decay, f.layer_decay

    def compute_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        images, targets = self.mixup(batch["image"], batch["label"])
        return {"loss": self.criterion(self.model(images), targets)}

    def param_groups(self) -> list[dict]:
        return param_groups_layer_decay(self.model, self.weight_decay, layer_decay=self.layer_decay)


def finetuning_module(cfg: RunConfig) -> FineTuning:
    """maect's fine-tuning method on a fresh classifier (evaluation set: a placeholder)."""
    f, arch = cfg.finetune, arch_from_config(cfg)
    encoder = build_encoder(arch)
    classifier = classifier_from_state(
        encoder.state_dict(), arch, CLASSES, f.global_pool, f.drop_path
    )
    return FineTuning(cfg, classifier, make_synthetic(CLASSES, train=False))


class EagerContrastiveTuning(ContrastiveTuning):
    """MAE-CT stage 3 without its optimisations: ``two_pass`` sends each view through the encoder
    on its own; ``grad_through_frozen`` keeps the frozen blocks out of the optimizer only, so
    autograd records and back-propagates through them."""

    def __init__(
        self, cfg: RunConfig, two_pass: bool = True, grad_through_frozen: bool = True
    ) -> None:
        super().__init__(cfg, build_encoder(arch_from_config(cfg)))
        self.two_pass = two_pass
        self.grad_through_frozen = grad_through_frozen
        self.trainable_groups = super().param_groups()
        if grad_through_frozen:
            for module in self.frozen_modules():
                module.requires_grad_(True)

    def param_groups(self) -> list[dict]:
        return self.trainable_groups

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        views = images.chunk(2) if self.two_pass else (images,)
        if self.grad_through_frozen:
            return torch.cat([self.encoder.forward_features(v) for v in views])
        return torch.cat([ContrastiveTuning.encode(self, v) for v in views])


class EagerCAN(CAN):
    """CAN with each view through noise, encoder and decoder on its own."""

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> CANOutput:
        return concat_outputs([CAN.forward(self, v, generator) for v in images.chunk(2)])


def concat_outputs(parts: list[Any]) -> Any:
    """Concatenate tensors, or dataclasses of tensors (recursively), along dim 0."""
    first = parts[0]
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    fields = dataclasses.fields(first)
    return type(first)(
        **{f.name: concat_outputs([getattr(p, f.name) for p in parts]) for f in fields}
    )


# --------------------------------------------------------------------------- building


def method_configs(model: str, batch: int, overrides: list[str]) -> dict[str, RunConfig]:
    """MAE, MAE-CT, CAN, SimCLR and MIM-Refiner configurations of ``model`` with ``overrides``
    (those with a recipe); the queues are rounded down to a multiple of ``batch`` (they must
    divide by the batch). Models without a CAN recipe take the ViT-L/16 one's objective."""
    suffix, simclr_recipe, model_overrides = PRESETS[model]
    overrides = [*model_overrides, *overrides]
    mae = load_config(f"mae/{suffix}", overrides)
    same_model = [f"model.{k}={v}" for k, v in dataclasses.asdict(mae.model).items()]
    configs = {"mae": mae, "simclr": load_config(simclr_recipe, overrides + same_model)}
    for method in ("maect", "can", "refiner"):
        recipe = f"{method}/{suffix}"
        if recipe not in available_recipes():
            if method == "can":
                configs["can"] = load_config("can/in1k_vit_l16", overrides + same_model)
            continue
        extra = []
        if method != "can":
            queue = getattr(load_config(recipe, overrides), method).queue_size
            extra = [f"{method}.queue_size={batch * max(1, queue // batch)}"]
        configs[method] = load_config(recipe, overrides + extra)
    if f"finetune/{suffix}" in available_recipes():
        configs["finetune"] = load_config(f"finetune/{suffix}", overrides)
    return configs


def build_case(name: str, configs: dict[str, RunConfig]) -> nn.Module:
    """The module of case ``name`` (seeded, so repeated builds are identical)."""
    torch.manual_seed(0)
    if name == "mae":
        return MAE(configs["mae"])
    if name == "lightly":
        return LightlyMAE(configs["mae"])
    if name == "maect":
        cfg = configs["maect"]
        return ContrastiveTuning(cfg, build_encoder(arch_from_config(cfg)))
    if name == "maect_eager":
        return EagerContrastiveTuning(configs["maect"])
    if name == "maect_head":
        cfg = configs["maect"]
        return NNCLRHeadTraining(cfg, build_encoder(arch_from_config(cfg)))
    if name in ("refiner", "refiner_head"):
        cfg = configs["refiner"]
        stage = RefinerTuning if name == "refiner" else RefinerHeadTraining
        return stage(cfg, build_encoder(arch_from_config(cfg)))
    if name == "can":
        return CAN(configs["can"])
    if name == "can_eager":
        return EagerCAN(configs["can"])
    if name == "simclr":
        return CAN(configs["simclr"])
    if name == "finetune":
        return finetuning_module(configs["finetune"])
    if name == "finetune_plain":
        return PlainFineTuning(configs["finetune"])
    raise ValueError(f"unknown case {name}")


def views_of(name: str) -> int:
    """Views per image of case ``name`` at the model's image size."""
    return 1 if name in ("mae", "lightly", "finetune", "finetune_plain") else 2


def synthetic_batch(cfg: RunConfig, views: int, batch: int, device: torch.device) -> dict:
    """Random normalised images (a list of ``views`` tensors when 2, followed by the local views
    of a refiner config), labels and sample ids."""
    m = cfg.model
    images = torch.randn(views, batch, m.in_chans, m.img_size, m.img_size, device=device)
    if cfg.method == "refiner":
        r = cfg.refiner
        shape = (batch, m.in_chans, r.local_size, r.local_size)
        images = [*images, *(torch.randn(shape, device=device) for _ in range(r.local_views))]
    return {
        "image": list(images) if views == 2 else images[0],
        "label": torch.randint(CLASSES, (batch,), device=device),
        "index": torch.arange(batch, device=device),
    }


@dataclasses.dataclass
class Bench:
    """A case ready to run: its module, batch, optimizer, step function and FLOPs per step."""

    name: str
    model: str
    module: nn.Module
    batch: dict
    optimizer: torch.optim.Optimizer
    step: Callable[[], None]
    flops: int


def make_bench(
    name: str,
    configs: dict[str, RunConfig],
    batch_size: int,
    device: torch.device,
    bf16: bool,
    adamw: str,
    compiled: str | None = None,
    sdpa: bool = True,
    module: nn.Module | None = None,
    label: str | None = None,
    guard: str = "none",
    checkpointing: bool = False,
    count_flops: bool = True,
) -> Bench:
    """Case ``name`` (or ``module``, built for it) as a training step under ``label``, with AdamW
    ``adamw`` (``fused``, ``foreach``, ``loop`` or PyTorch's ``default``), optionally with every
    transformer block compiled as ``trainer.compile=true`` does (``compiled``: the compile mode,
    ``"default"`` or ``"reduce-overhead"``), timm attention without SDPA, activation
    checkpointing, or the non-finite guard of a training run: ``device`` as the training step
    runs it (decided on the device, fused AdamW's ``found_inf``), ``host`` as it ran before
    (the flag and the loss read on the host every step, as the progress bar did)."""
    cfg = configs["mae" if name == "lightly" else name.split("_")[0]]
    module = (module or build_case(name, configs)).to(device).train()
    if not sdpa:
        for attention in module.modules():
            if isinstance(attention, Attention):
                attention.fused_attn = False
    set_grad_checkpointing(module.modules(), checkpointing or cfg.model.grad_checkpointing)
    batch = synthetic_batch(cfg, views_of(name), batch_size, device)
    groups = [{**g, "lr": LR * g.get("lr_scale", 1.0)} for g in module.param_groups()]
    flags = {} if adamw == "default" else {"fused": adamw == "fused", "foreach": adamw == "foreach"}
    optimizer = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.95), **flags)
    # before compiling: counting the FLOPs of a compiled module compiles it again
    flops = training_flops(module, batch) if count_flops else 0
    if compiled:
        compile_blocks(module, mode=compiled)
    nonfinite = NonFiniteGuard(skip=True)

    def closure() -> torch.Tensor:
        module.zero_grad(set_to_none=True)
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            losses = module.compute_losses(batch)
        loss = losses["loss"]
        if guard == "device":
            nonfinite.observe(losses, 0, 0, 0)
        elif guard == "host":
            finite = bool(torch.isfinite(loss.detach()).all())
            loss.item()  # what the progress bar read every step
        loss.backward()
        if guard == "device":
            nonfinite.update_flag()
            optimizer.found_inf = nonfinite.drop
        elif guard == "host" and not finite:
            optimizer.zero_grad(set_to_none=True)
        return loss

    def step() -> None:
        if isinstance(module, PretrainMethod):
            module.optimizer_step(0, 0, optimizer, closure)
        else:
            optimizer.step(closure)

    return Bench(label or name, model_label(cfg), module, batch, optimizer, step, flops)


# --------------------------------------------------------------------------- measuring


def _persistent(bench: Bench) -> Iterator[torch.Tensor]:
    """Tensors a case holds for its whole life: parameters, buffers, optimizer state."""
    yield from bench.module.parameters()
    yield from bench.module.buffers()
    for state in bench.optimizer.state.values():
        yield from (v for v in state.values() if isinstance(v, torch.Tensor))


def _grads(bench: Bench) -> Iterator[torch.Tensor]:
    return (p.grad for p in bench.module.parameters() if p.grad is not None)


def _storage_bytes(tensors: Iterator[torch.Tensor]) -> dict[int, int]:
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def peak_bytes(bench: Bench, device: torch.device) -> int:
    """Peak memory of one step (see the module docstring for CPU vs CUDA)."""
    persistent = _storage_bytes(_persistent(bench))
    if device.type == "cuda":
        synchronize(device)
        own = sum(persistent.values()) + sum(_storage_bytes(_grads(bench)).values())
        others = torch.cuda.memory_allocated(device) - own
        torch.cuda.reset_peak_memory_stats(device)
        bench.step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - others
    with LiveBytes([*_persistent(bench), *_grads(bench)]) as tracker:
        bench.step()
    return tracker.peak


class LiveBytes(TorchDispatchMode):
    """The most bytes of tensor storage alive at once while active (for CPU, which keeps no
    allocator statistics): the storages of ``existing`` tensors from the start, and every storage
    an operation creates (forward, backward, recomputation, optimizer) until it is freed.

    Storages are told apart by data pointer; a freed one is noticed through a finaliser on its
    Python object, which torch keeps alive as long as the storage."""

    def __init__(self, existing: list[torch.Tensor]) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0
        for tensor in existing:
            self._track(tensor)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self.live:
            return
        self.live[key] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_leaves(out):
            if isinstance(value, torch.Tensor) and value.device.type == "cpu":
                self._track(value)
        return out


def matmul_peak_flops(device: torch.device, size: int = 8192, repeats: int = 20) -> float:
    """Measured dense bf16 matmul FLOP/s of ``device`` (median of ``repeats``)."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    times = step_times({"mm": lambda: a @ b}, rounds=repeats, warmup=3, device=device, inner=5)
    return 2 * size**3 / statistics.median(times["mm"])


@dataclasses.dataclass
class Result:
    """Measured figures of one case."""

    name: str
    model: str
    batch: int
    seconds: float  # median seconds per step; NaN when not timed
    flops: int  # per step
    peak: int  # bytes; 0 when not measured
    vs: str = ""
    ratio: float = math.nan  # the peer's step time over this one's

    @property
    def images_per_s(self) -> float:
        return self.batch / self.seconds


def measure(
    benches: list[Bench], device: torch.device, args: argparse.Namespace, timed: bool = True
) -> dict[str, Result]:
    """FLOPs, and unless ``timed`` is False peak memory and median step time (interleaved)."""
    steps = {b.name: b.step for b in benches}
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times = step_times(steps, args.rounds, args.warmup, device, args.inner, clock) if timed else {}
    return {
        b.name: Result(
            b.name,
            b.model,
            len(b.batch["label"]),
            statistics.median(times[b.name]) if timed else math.nan,
            b.flops,
            peak_bytes(b, device) if timed else 0,
        )
        for b in benches
    }


def compare(results: dict[str, Result], candidate: str, baseline: str) -> None:
    """Mark ``candidate`` with its speed-up over ``baseline``."""
    results[candidate].vs = baseline
    results[candidate].ratio = results[baseline].seconds / results[candidate].seconds


def data_rate(cfg: RunConfig, module: PretrainMethod, threads: int, seconds: float = 3.0) -> float:
    """Samples/s of reading + the method's training transform with ``threads`` torch threads
    (a DataLoader worker runs with 1; ``num_workers=0`` transforms in the training process with
    all of them). Fashion-MNIST from memory; ``imagefolder``: a 500x375 JPEG decoded by PIL,
    ImageNet's typical image."""
    transform = module.train_transform()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if cfg.data.name == "imagefolder":
                folder = Path(tmp) / "class"
                folder.mkdir()
                gradient = torch.linspace(0, 255, 500).expand(375, 500)
                noise = torch.randint(0, 40, (375, 500, 3))
                pixels = (gradient[..., None] + noise).clamp(0, 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / "image.jpg", quality=90)
                dataset = ImageFolderDataset(Path(tmp), transform=transform)
            else:
                try:
                    dataset = load_fashion_mnist(cfg.data.root, train=True, download=False)
                except DataNotFoundError:
                    dataset = make_synthetic(1000, train=True)
                dataset.transform = transform
            count, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                dataset[count % len(dataset)]
                count += 1
            return count / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- reporting


def model_label(cfg: RunConfig) -> str:
    m = cfg.model
    if cfg.method == "finetune":
        head = f"{cfg.finetune.global_pool} pool, {CLASSES} classes"
        return f"ViT {m.embed_dim}x{m.depth} p{m.patch_size} {m.img_size}px ({head})"
    return (
        f"ViT {m.embed_dim}x{m.depth} p{m.patch_size} {m.img_size}px "
        f"(dec {m.decoder_dim}x{m.decoder_depth})"
    )


COLUMNS = ("case", "images/s", "ms/step", "GFLOPs/step", "peak MiB", "vs", "ratio", "MFU")


def cells(r: Result, peak_rate: float | None) -> list[str]:
    """The :data:`COLUMNS` of one result."""
    timed = not math.isnan(r.seconds)
    return [
        r.name,
        f"{r.images_per_s:.1f}" if timed else "-",
        f"{1000 * r.seconds:.1f}" if timed else "-",
        f"{r.flops / 1e9:.2f}",
        f"{r.peak / 2**20:.0f}" if r.peak else "-",
        r.vs or "-",
        f"{r.ratio:.2f}" if not math.isnan(r.ratio) else "-",
        f"{r.flops / r.seconds / peak_rate:.1%}" if peak_rate and timed else "-",
    ]


def print_table(results: list[Result], peak_rate: float | None) -> None:
    rows = [list(COLUMNS), *(cells(r, peak_rate) for r in results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def log_rows(results: list[Result], peak_rate: float | None, args: argparse.Namespace) -> list[str]:
    """Rows of the ``docs/benchmarks.md`` table: date, commit, machine, load, then the cells."""
    device = torch.device(args.device)
    lead = [str(date.today()), git_commit(), device_name(device), f"{load_average():.1f}"]
    rows = []
    for r in results:
        row = [*lead, torch.__version__, r.model, str(r.batch), args.precision]
        row += [*cells(r, peak_rate), f"`{args.command}`"]
        rows.append("| " + " | ".join(row) + " |")
    return rows


@dataclasses.dataclass
class Reporter:
    """Prints each measured group at once and, with ``--append``, adds its rows to
    ``docs/benchmarks.md``: a run stopped at a time limit keeps every group it finished."""

    args: argparse.Namespace
    section: str
    peak_rate: float | None

    def __call__(self, results: list[Result]) -> None:
        print_table(results, self.peak_rate)
        if self.args.append:
            append_rows(self.section, HEADER, log_rows(results, self.peak_rate, self.args))
            print("appended to docs/benchmarks.md")
        print(flush=True)


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares slope and intercept of ``y = slope * x + intercept``."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )
    return slope, my - slope * mx


# --------------------------------------------------------------------------- modes


def run_cases(
    args: argparse.Namespace, device: torch.device, bf16: bool, adamw: str, report: Reporter
) -> str:
    """Every selected case against its peer (reported as one group); returns the summary."""
    configs = method_configs(args.model, args.batch, args.set)
    names = [n for n in CASES if n in args.cases.split(",")]
    peers = set(PEERS.values())
    if args.flops_only:  # one model at a time: ViT-L cases do not all fit in host memory
        results = {}
        for n in names:
            bench = make_bench(n, configs, args.batch, device, bf16, adamw)
            results |= measure([bench], device, args, timed=False)
            del bench
    else:
        benches = [
            make_bench(n, configs, args.batch, device, bf16, "default" if n in peers else adamw)
            for n in names
        ]
        results = measure(benches, device, args)
        del benches
        for ours, peer in PEERS.items():
            if ours in results and peer in results:
                compare(results, ours, peer)
    report(list(results.values()))
    if args.data and not args.flops_only:
        report(data_results(configs, results))

    def value(fn: Callable[[], float], *needed: str) -> str:
        ok = all(n in results for n in needed) and not math.isnan(fn())
        return f"{fn():.3f}" if ok else "n/a"

    return (
        f"summary mae_vs_peer={value(lambda: results['mae'].ratio, 'mae', 'lightly')} "
        "maect_vs_mae_step="
        f"{value(lambda: results['maect'].seconds / results['mae'].seconds, 'maect', 'mae')} "
        "can_vs_simclr_flops="
        f"{value(lambda: results['can'].flops / results['simclr'].flops, 'can', 'simclr')} "
        "finetune_vs_plain="
        f"{value(lambda: results['finetune'].ratio, 'finetune', 'finetune_plain')}"
    )


def data_results(configs: dict[str, RunConfig], results: dict[str, Result]) -> list[Result]:
    """Samples/s of the training transform of each timed method, in a DataLoader worker (1 thread)
    and in the training process (``num_workers=0``, all threads); ``ratio`` is that rate over the
    step's images/s (below 1: the data does not keep up)."""
    out = []
    threads = torch.get_num_threads()
    for name in ("mae", "maect", "can", "refiner", "finetune"):
        if name in results:
            cfg = configs[name]
            for where, n in (("1 worker", 1), (f"in-process, {threads} threads", threads)):
                rate = data_rate(cfg, build_case(name, configs), n)
                label, ratio = f"data {name} ({where})", rate / results[name].images_per_s
                out.append(
                    Result(label, model_label(cfg), 1, 1 / rate, 0, 0, f"{name} step", ratio)
                )
    return out


def selected_candidates(args: argparse.Namespace, device: torch.device) -> list[str]:
    """The ``--candidates`` names: a comma list, or ``all`` (compile and CUDA graphs only with
    ``--compile``; CUDA graphs only on CUDA)."""
    if args.candidates == "all":
        names = [c for c in CANDIDATES if args.compile or c not in ("compile", "cudagraphs")]
    else:
        names = args.candidates.split(",")
        unknown = sorted(set(names) - set(CANDIDATES))
        if unknown:
            raise SystemExit(f"unknown --candidates {unknown}; choose from {', '.join(CANDIDATES)}")
    cuda_only, cpu_only = ("cudagraphs",), ("onednn",)
    return [n for n in names if n not in (cuda_only if device.type != "cuda" else cpu_only)]


def run_candidates(
    args: argparse.Namespace, device: torch.device, bf16: bool, adamw: str, report: Reporter
) -> None:
    """Single optimisations of ``mae`` and ``maect`` (those in ``--cases``), each timed against
    the alternative in its own interleaved group and reported as soon as it is measured;
    ``ratio`` is the candidate's speed-up over the baseline it names. A group that fails (e.g.
    a compile error) is reported as such and the others still run."""
    configs = method_configs(args.model, args.batch, args.set)
    cfg = configs["maect"]
    half = cfg.model.depth // 2
    frozen_half = {
        **configs,
        "maect": dataclasses.replace(cfg, maect=dataclasses.replace(cfg.maect, frozen_blocks=half)),
    }
    others = [a for a in ("fused", "foreach", "loop") if a != adamw]
    precision = "fp32" if bf16 else "bf16"

    def bench(label: str, name: str = "mae", cfgs: dict | None = None, **kw) -> Bench:
        options = {"bf16": bf16, "adamw": adamw, **kw}
        return make_bench(name, cfgs or configs, args.batch, device, label=label, **options)

    def pair(candidate: Callable[[], Bench], baseline: Callable[[], Bench]) -> Group:
        def build() -> tuple[list[Bench], list[tuple[str, str]]]:
            benches = [candidate(), baseline()]
            return benches, [(benches[0].name, benches[1].name)]

        return build

    def adamw_group() -> tuple[list[Bench], list[tuple[str, str]]]:
        benches = [bench(f"mae AdamW {adamw}"), *(bench(f"mae AdamW {a}", adamw=a) for a in others)]
        return benches, [(b.name, benches[0].name) for b in benches[1:]]

    def sync_group() -> tuple[list[Bench], list[tuple[str, str]]]:
        benches = [
            bench("mae guard on device (sync-free)", guard="device"),
            bench("mae guard and loss read on host", guard="host"),
            bench("mae without guard", guard="none"),
        ]
        names = [b.name for b in benches]
        return benches, [(names[0], names[1]), (names[2], names[0])]

    groups: dict[tuple[str, str], Group] = {
        ("adamw", "mae"): adamw_group,
        ("sdpa", "mae"): pair(lambda: bench("mae SDPA"), lambda: bench("mae no SDPA", sdpa=False)),
        ("precision", "mae"): pair(
            lambda: bench(f"mae {precision}", bf16=not bf16),
            lambda: bench(f"mae {args.precision}"),
        ),
        ("sync", "mae"): sync_group,
        ("compile", "mae"): pair(
            lambda: bench("mae compiled blocks", compiled="default"), lambda: bench("mae eager")
        ),
        ("cudagraphs", "mae"): pair(
            lambda: bench("mae compiled blocks, CUDA graphs", compiled="reduce-overhead"),
            lambda: bench("mae eager"),
        ),
    }
    for name in ("mae", "maect"):
        groups[("checkpointing", name)] = pair(
            lambda name=name: bench(f"{name} activation checkpointing", name, checkpointing=True),
            lambda name=name: bench(f"{name} no checkpointing", name),
        )
    groups[("views", "maect")] = pair(
        lambda: bench("maect views in one batch", "maect"),
        lambda: bench(
            "maect views in two passes",
            "maect",
            module=EagerContrastiveTuning(cfg, two_pass=True, grad_through_frozen=False),
        ),
    )
    groups[("frozen", "maect")] = pair(
        lambda: bench(f"maect {half} frozen blocks, no autograd", "maect", frozen_half),
        lambda: bench(
            f"maect {half} frozen blocks, autograd",
            "maect",
            frozen_half,
            module=EagerContrastiveTuning(
                frozen_half["maect"], two_pass=False, grad_through_frozen=True
            ),
        ),
    )

    def routed(name: str) -> nn.Module:
        module = build_case(name, configs)
        route_linears(module)
        return module

    for name in ("mae", "maect", "can"):
        groups[("onednn", name)] = pair(
            lambda name=name: bench(f"{name} oneDNN linear", name, module=routed(name)),
            lambda name=name: bench(f"{name} MKL linear", name),
        )
    cases = args.cases.split(",")
    for candidate in selected_candidates(args, device):
        for (group, case), build in groups.items():
            if group != candidate or case not in cases:
                continue
            try:
                benches, pairs = build()
                results = measure(benches, device, args)
            except Exception as err:  # one failing candidate must not cost the others
                print(f"candidate {group} ({case}) failed: {type(err).__name__}: {err}", flush=True)
                continue
            for faster, baseline in pairs:
                compare(results, faster, baseline)
            report(list(results.values()))
            del benches, results


def run_scale(
    args: argparse.Namespace, device: torch.device, bf16: bool, adamw: str, report: Reporter
) -> None:
    """MAE step time and memory along three axes from the ``--model`` configuration: batch
    (x1/2, x1, x2), image size (x1, x2, x3: tokens x1, x4, x9) and width (x1, x2, x3, head width
    kept), each axis an interleaved group reported when measured. Prints a least-squares line
    per axis, and at the end of step time over step FLOPs."""
    base = method_configs(args.model, args.batch, args.set)["mae"]
    m = base.model
    axes = {
        "batch": [(f"batch={b}", b, []) for b in (args.batch // 2, args.batch, 2 * args.batch)],
        "tokens": [
            (f"img={f * m.img_size}", args.batch, [f"model.img_size={f * m.img_size}"])
            for f in (1, 2, 3)
        ],
        "params_M": [
            (
                f"width={f * m.embed_dim}",
                args.batch,
                [f"model.embed_dim={f * m.embed_dim}", f"model.num_heads={f * m.num_heads}"],
            )
            for f in (1, 2, 3)
        ],
    }
    overrides = [*PRESETS[args.model][2], *args.set]
    every: list[Result] = []
    for axis, grid in axes.items():
        benches, values = [], []
        for label, batch, extra in grid:
            cfg = load_config(base.recipe, [*overrides, *extra])
            bench = make_bench("mae", {"mae": cfg}, batch, device, bf16, adamw)
            bench.name = f"mae scale {label}"
            benches.append(bench)
            values.append(
                {
                    "batch": batch,
                    "tokens": cfg.model.img_size**2 // cfg.model.patch_size**2,
                    "params_M": sum(p.numel() for p in bench.module.parameters()) / 1e6,
                }[axis]
            )
        measured = list(measure(benches, device, args).values())
        del benches
        report(measured)
        every += measured
        ms = linear_fit(values, [1000 * r.seconds for r in measured])
        mib = linear_fit(values, [r.peak / 2**20 for r in measured])
        print(
            f"least squares {axis}: ms = {ms[0]:.4g} x + {ms[1]:.4g};  MiB = {mib[0]:.4g} x + "
            f"{mib[1]:.4g}  (x = {', '.join(f'{v:g}' for v in values)})",
            flush=True,
        )
    slope, icpt = linear_fit([r.flops / 1e9 for r in every], [1000 * r.seconds for r in every])
    print(
        f"least squares all: ms = {slope:.4g} GFLOP + {icpt:.4g}  "
        f"(marginal {1000 / slope:.1f} GFLOP/s)"
    )


def stored_bytes(bench: Bench, device: torch.device, bf16: bool) -> int:
    """Bytes the forward pass of one step leaves alive for the backward pass (activations saved
    by autograd, or with checkpointing the block inputs it keeps), at the batch of ``bench``."""
    bench.module.zero_grad(set_to_none=True)
    synchronize(device)
    if device.type == "cpu":  # parameters count as existing, so views of them are not new
        tracker = LiveBytes(list(_persistent(bench)))
        before = tracker.current
    else:
        tracker, before = contextlib.nullcontext(), torch.cuda.memory_allocated(device)
    with tracker, torch.autocast(device.type, torch.bfloat16, enabled=bf16):
        loss = bench.module.compute_losses(bench.batch)["loss"]
    synchronize(device)
    after = tracker.current if device.type == "cpu" else torch.cuda.memory_allocated(device)
    stored = after - before
    loss.backward()
    bench.module.zero_grad(set_to_none=True)
    return stored


def run_memory(
    args: argparse.Namespace, device: torch.device, bf16: bool, adamw: str, report: Reporter
) -> None:
    """Memory of each case in ``--cases`` at ``--batch`` and twice that, without and with
    activation checkpointing (after a warm-up step, so AdamW's state exists): what the forward
    pass stores for the backward pass, fitted per image, and the peak of a whole step. Prints the
    persistent part (parameters, AdamW state, buffers) and reports each case when measured."""
    configs = method_configs(args.model, args.batch, args.set)
    names = [n for n in CASES if n in args.cases.split(",") and n not in PEERS.values()]
    for name in names:
        rows = []
        for checkpointing in (False, True):
            label = f"{name}{', activation checkpointing' if checkpointing else ''}"
            points, stored = [], []
            for batch in (args.batch, 2 * args.batch):
                bench = make_bench(
                    name, configs, batch, device, bf16, adamw, count_flops=False,
                    checkpointing=checkpointing, label=label,
                )  # fmt: skip
                bench.step()
                persistent = sum(_storage_bytes(_persistent(bench)).values())
                stored.append(stored_bytes(bench, device, bf16) / 2**20)
                points.append(
                    Result(label, bench.model, batch, math.nan, 0, peak_bytes(bench, device))
                )
                del bench
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            per_image, _ = linear_fit([r.batch for r in points], stored)
            for r in points:
                r.name = f"{label} (stored {per_image:.1f} MiB/image)"
            print(
                f"memory {label}: stored for backward {per_image:.2f} MiB per image "
                f"({', '.join(f'{v:.0f}' for v in stored)} MiB at batch "
                f"{', '.join(str(r.batch) for r in points)}); step peak "
                f"{', '.join(f'{r.peak / 2**20:.0f}' for r in points)} MiB; persistent "
                f"(parameters, AdamW state, buffers) {persistent / 2**20:.0f} MiB",
                flush=True,
            )
            rows += points
        report(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(PRESETS), default="vit_t_fmnist")
    parser.add_argument("--batch", type=int, default=64, help="images (not views) per step")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, all methods"
    )
    parser.add_argument("--cases", default=DEFAULT_CASES, help=f"from {', '.join(CASES)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per case first")
    parser.add_argument("--inner", type=int, default=0, help="steps per round (0: 10 CUDA, 1 CPU)")
    parser.add_argument("--flops-only", action="store_true", help="count FLOPs, skip timing")
    parser.add_argument("--data", action="store_true", help="also time one data worker")
    parser.add_argument(
        "--candidates",
        nargs="?",
        const="all",
        metavar="NAMES",
        help=f"time single optimisations: all, or some of {','.join(CANDIDATES)}",
    )
    parser.add_argument("--compile", action="store_true", help="--candidates all: compile too")
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall", help="wall time or process CPU time"
    )
    parser.add_argument("--scale", action="store_true", help="MAE scaling sweep instead")
    parser.add_argument("--memory", action="store_true", help="memory per image instead")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--append", action="store_true", help="add rows to docs/benchmarks.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.command = command_line()
    device = torch.device(args.device)
    if args.precision == "auto":
        args.precision = "bf16" if device.type == "cuda" else "fp32"
    args.inner = args.inner or (10 if device.type == "cuda" else 1)
    bf16 = args.precision == "bf16"
    adamw = "fused" if device.type in ("cuda", "cpu") else "loop"  # as configure_optimizers
    print(f"{args.command}\n{device_name(device)}, load average {load_average():.1f} at start")
    timed = device.type == "cuda" and not (args.flops_only or args.memory)
    peak_rate = matmul_peak_flops(device) if timed else None
    if peak_rate:
        print(f"measured bf16 matmul rate {peak_rate / 1e12:.0f} TFLOP/s (the MFU denominator)")
    section = SCALE_SECTION if args.scale else MEMORY_SECTION if args.memory else SECTION
    report = Reporter(args, section, peak_rate)

    summary = None
    if args.scale:
        run_scale(args, device, bf16, adamw, report)
    elif args.memory:
        run_memory(args, device, bf16, adamw, report)
    else:
        if args.candidates in (None, "all"):  # named candidates run alone
            summary = run_cases(args, device, bf16, adamw, report)
        if args.candidates is not None:
            run_candidates(args, device, bf16, adamw, report)
    print(f"load average {load_average():.1f} at end")
    if summary:
        print(summary)


if __name__ == "__main__":
    main()
