"""FSDP (``trainer.strategy=fsdp``): Lightning's strategy with every transformer block as a shard
unit, and whole weights out of the shards where a run needs them (``encoder.pt``, the MAE-CT head
hand-off, EMA updates of the parameters outside the blocks).

Checkpoints are full state dicts (one file, the keys DDP writes), so ``load_encoder`` reads them
and an FSDP run resumes from its own checkpoints. Their optimizer state is keyed the way FSDP
keys it, so a run does not switch between FSDP and DDP on resume (:func:`check_resume_strategy`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from lightning import LightningModule
from lightning.pytorch.strategies import FSDPStrategy
from timm.models.vision_transformer import Block
from torch.distributed.fsdp import (
    FullOptimStateDictConfig,
    FullStateDictConfig,
    MixedPrecision,
    StateDictType,
)
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from maect.config import ConfigError

FSDP_NAMES = ("fsdp",)
# Lightning warns when a model arrives wrapped; BlockFSDPStrategy wraps on CPU itself, on purpose.
warnings.filterwarnings("ignore", message=".*auto_wrap_policy` is set, but the model is already")


class BlockFSDPStrategy(FSDPStrategy):
    """Lightning's FSDP with the timm transformer blocks (encoder and decoder) as shard units, the
    rest of the model in the root unit, full-state-dict checkpoints and original parameters
    (``use_orig_params``, so the optimizer keeps its weight-decay and layer-wise groups).

    Under ``bf16-mixed`` the blocks compute in bfloat16 while gradients are reduced and buffers
    (MAE-CT's queue, BatchNorm statistics) kept in float32, as under DDP with autocast; FSDP's own
    ``bf16-mixed`` reduces gradients in bfloat16. On CPU (gloo; tests only, it saves nothing there)
    the model is wrapped here with the CPU as its device, which torch's FSDP otherwise refuses.
    """

    def __init__(self, precision: str = "32-true", **kwargs: Any) -> None:
        mixed = (
            MixedPrecision(
                param_dtype=torch.bfloat16, reduce_dtype=torch.float32, buffer_dtype=torch.float32
            )
            if precision == "bf16-mixed"
            else None
        )
        super().__init__(
            auto_wrap_policy={Block}, state_dict_type="full", mixed_precision=mixed, **kwargs
        )

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.root_device.type == "cpu" and not isinstance(model, FSDP):
            model = FSDP(
                model,
                device_id=self.root_device,
                sharding_strategy=self.sharding_strategy,
                mixed_precision=self.mixed_precision_config,
                **self.kwargs,
            )
        return super()._setup_model(model)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The whole optimizer state (on rank 0), keyed by parameter name as FSDP writes it.
        Gathered without CPU offload on CPU: there torch's offload returns the gather buffer
        itself, which the next state overwrites (every ``exp_avg`` came out as its
        ``exp_avg_sq`` on 2 gloo ranks; tests/test_fsdp.py resumes exactly now)."""
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer
        offload = self.root_device.type != "cpu"
        whole = FullStateDictConfig(offload_to_cpu=offload, rank0_only=True)
        optim = FullOptimStateDictConfig(offload_to_cpu=offload, rank0_only=True)
        with FSDP.state_dict_type(self.model, StateDictType.FULL_STATE_DICT, whole, optim):
            return FSDP.optim_state_dict(self.model, optimizer)


def is_fsdp(strategy: str) -> bool:
    """Whether ``trainer.strategy`` names FSDP."""
    return strategy.lower() in FSDP_NAMES


def check_resume_strategy(saved: str | None, strategy: str) -> None:
    """Refuse to resume a checkpoint written under FSDP without it, or the other way round: the
    optimizer state is keyed differently (the weights alone would load, the AdamW moments not)."""
    if saved is not None and is_fsdp(saved) != is_fsdp(strategy):
        raise ConfigError(
            f"the checkpoint was written with trainer.strategy={saved}; resume it with that "
            f"strategy, not trainer.strategy={strategy} (FSDP and DDP key the optimizer state "
            "differently). To change strategy, start a new run from its encoder.pt."
        )


def fsdp_root(module: LightningModule) -> FSDP | None:
    """The FSDP-wrapped model that trains ``module``, or None without FSDP (or a trainer)."""
    trainer = module._trainer
    model = getattr(trainer.strategy, "model", None) if trainer is not None else None
    return model if isinstance(model, FSDP) else None


def whole_state_dict(
    module: LightningModule, prefix: str, all_ranks: bool = True
) -> dict[str, torch.Tensor]:
    """The state dict of ``module``'s submodule at ``prefix`` (e.g. ``"encoder"``), with whole
    tensors: gathered from the shards under FSDP (a collective: every rank must call it; with
    ``all_ranks=False`` only rank 0 receives it, the others an empty dict), else read directly."""
    root = fsdp_root(module)
    if root is None:
        return module.get_submodule(prefix).state_dict()
    offload = root.compute_device.type != "cpu"  # see BlockFSDPStrategy.optimizer_state
    config = FullStateDictConfig(offload_to_cpu=offload, rank0_only=not all_ranks)
    with FSDP.state_dict_type(root, StateDictType.FULL_STATE_DICT, config):
        state = root.state_dict()
    start = len(prefix) + 1
    return {key[start:]: value for key, value in state.items() if key.startswith(prefix + ".")}


@contextlib.contextmanager
def whole_root_params(module: LightningModule) -> Iterator[None]:
    """Make the parameters outside the shard units (the root unit: embeddings, norms, heads)
    whole on every rank for the block, writing changes back to the shards; a no-op without FSDP.
    Inside, a parameter and its EMA copy have the same shape again (their shards need not)."""
    root = fsdp_root(module)
    if root is None:
        yield
        return
    with FSDP.summon_full_params(root, recurse=False, writeback=True):
        yield
