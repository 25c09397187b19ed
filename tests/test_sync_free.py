"""The training step never reads a device value on the host, and the device-side non-finite guard
keeps the semantics of the host-side one it replaced.

On CPU a host read is a Python call of ``Tensor.item``, ``__bool__``, ``tolist``, ``cpu``... (on a
GPU each of them waits for the device); the test counts them over ``optimizer_step`` of every
method, which runs the whole step under Lightning: ``training_step`` (the loss, the guard, the
logging), the backward pass, ``on_before_optimizer_step``, AdamW and the EMA updates.
``benchmarks/sync_check.py`` checks the same on a GPU with ``torch.cuda.set_sync_debug_mode``.
"""

from __future__ import annotations

import contextlib
import logging
import traceback
from collections.abc import Iterator

import pytest
import torch
from lightning import Callback

from maect.config import RunConfig, load_config
from maect.engine import fit_module, training_dataset
from maect.faults import NonFiniteGuard, NonFiniteLossError
from maect.methods import CAN, MAE, PretrainMethod
from maect.methods.base import arch_from_config
from maect.methods.maect import ContrastiveTuning, NNCLRHeadTraining
from maect.methods.refiner import RefinerHeadTraining, RefinerTuning
from maect.models.vit import MaskedViT
from tests.conftest import TINY_OVERRIDES

HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
REFINER_TINY = [
    "refiner.blocks=[0,1]",
    "refiner.local_views=2",
    "refiner.local_size=12",
    "refiner.queue_size=32",
    "refiner.proj_hidden_dim=32",
    "refiner.proj_dim=16",
    "refiner.pred_hidden_dim=32",
    "refiner.encoder_ema=0.9",
]
MAECT_TINY = [
    "maect.queue_size=32",
    "maect.proj_hidden_dim=32",
    "maect.proj_dim=16",
    "maect.pred_hidden_dim=32",
    "maect.frozen_blocks=1",
    "maect.encoder_ema=0.99",
]
COMMON = ["data.synthetic_size=48", "data.num_workers=0", "trainer.epochs=1"]


def _config(recipe: str, *overrides: str) -> RunConfig:
    extra = {"maect": MAECT_TINY, "refiner": REFINER_TINY}.get(recipe.split("/")[0], [])
    return load_config(recipe, [*TINY_OVERRIDES, *extra, *COMMON, *overrides])


METHODS = {
    "mae": lambda: MAE(_config("mae/fmnist_vit_t", "data.batch_size=8")),
    "can": lambda: CAN(_config("can/fmnist_vit_t", "data.batch_size=8")),
    "simclr": lambda: CAN(_config("simclr/fmnist_vit_t", "data.batch_size=8")),
    "maect_head": lambda: NNCLRHeadTraining(
        cfg := _config("maect/fmnist_vit_t", "data.batch_size=8"), MaskedViT(arch_from_config(cfg))
    ),
    "maect": lambda: ContrastiveTuning(
        cfg := _config("maect/fmnist_vit_t", "data.batch_size=8"), MaskedViT(arch_from_config(cfg))
    ),
    "refiner_head": lambda: RefinerHeadTraining(
        cfg := _config("refiner/fmnist_vit_t", "data.batch_size=8"),
        MaskedViT(arch_from_config(cfg)),
    ),
    "refiner": lambda: RefinerTuning(
        cfg := _config("refiner/fmnist_vit_t", "data.batch_size=8"),
        MaskedViT(arch_from_config(cfg)),
    ),
    "mae_accumulate": lambda: MAE(
        _config("mae/fmnist_vit_t", "data.batch_size=4", "trainer.accumulate_grad_batches=2")
    ),
}


@contextlib.contextmanager
def counting_host_reads() -> Iterator[list[str]]:
    """Record every host read of a tensor (the method and the caller's line) while active."""
    calls: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counting(name: str):
        original = originals[name]

        def read(self, *args, **kwargs):
            caller = traceback.extract_stack(limit=2)[0]
            calls.append(f"Tensor.{name} at {caller.filename}:{caller.lineno}")
            return original(self, *args, **kwargs)

        return read

    for name in HOST_READS:
        setattr(torch.Tensor, name, counting(name))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def _fit(module: PretrainMethod, run_dir, callbacks=()) -> None:
    dataset = training_dataset(module.cfg)
    dataset.transform = module.train_transform()
    fit_module(module.cfg, module, dataset, run_dir, list(callbacks))


@pytest.mark.parametrize("method", list(METHODS))
def test_no_host_read_inside_the_training_step(method, tmp_path):
    module = METHODS[method]()
    step = module.optimizer_step
    reads: list[str] = []
    steps = []

    def counted_step(*args, **kwargs):
        with counting_host_reads() as calls:
            step(*args, **kwargs)
        reads.extend(calls)
        steps.append(module.global_step)

    module.optimizer_step = counted_step
    _fit(module, tmp_path / method)
    assert len(steps) == module.trainer.global_step >= 3
    assert reads == [], "\n".join(reads[:20])
    # the check itself works: a host read inside the step is seen
    with counting_host_reads() as calls:
        torch.ones(()).item()
    assert calls and calls[0].startswith("Tensor.item")


class Snapshot(Callback):
    """Parameters and AdamW state just before and just after the optimizer step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.before: dict[str, torch.Tensor] = {}
        self.after: dict[str, torch.Tensor] = {}

    def _state(self, pl_module, optimizer) -> dict[str, torch.Tensor]:
        state = {f"param.{n}": p.detach().clone() for n, p in pl_module.named_parameters()}
        for i, (p, s) in enumerate(optimizer.state.items()):
            del p
            state |= {f"optim.{i}.{k}": v.detach().clone() for k, v in s.items()}
        return state

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            self.before = self._state(pl_module, trainer.optimizers[0])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step + 1:
            self.after = self._state(pl_module, trainer.optimizers[0])


def _poison(module: PretrainMethod, step: int) -> None:
    compute = module.compute_losses

    def poisoned(batch: dict) -> dict[str, torch.Tensor]:
        if module.global_step == step:
            batch = {**batch, "image": torch.full_like(batch["image"], float("nan"))}
        return compute(batch)

    module.compute_losses = poisoned


def test_skipped_step_leaves_parameters_and_adamw_state_unchanged(tmp_path):
    module = MAE(_config("mae/fmnist_vit_t", "data.batch_size=8", "trainer.skip_nonfinite=true"))
    _poison(module, 2)
    bad, good = Snapshot(2), Snapshot(3)
    _fit(module, tmp_path / "run", [bad, good])
    assert module.skipped_nonfinite == 1
    assert bad.before.keys() == bad.after.keys() and any(k.endswith(".step") for k in bad.before)
    for key, value in bad.before.items():
        assert torch.equal(bad.after[key], value), key
    assert not torch.equal(
        good.after["param.encoder.cls_token"], good.before["param.encoder.cls_token"]
    )
    # the epoch mean leaves the skipped step out; its step value is logged as it was (NaN)
    loss_epoch = module.trainer.logged_metrics["train/loss_epoch"]
    assert torch.isfinite(loss_epoch)


def test_stop_mode_drops_every_update_until_the_check(tmp_path):
    """With checks every 4 steps, a NaN at step 1 is reported at step 4 naming step 1; the
    updates of steps 1 to 3 were dropped on the device, so the weights are those after step 0."""
    module = MAE(_config("mae/fmnist_vit_t", "data.batch_size=8", "trainer.log_every_n_steps=4"))
    _poison(module, 1)
    after_first = Snapshot(0)
    with pytest.raises(NonFiniteLossError, match=r"at step 1 \(epoch 0, batch 1\): loss=nan"):
        _fit(module, tmp_path / "run", [after_first])
    assert module.global_step == 4
    for name, p in module.named_parameters():
        assert torch.equal(p.detach(), after_first.after[f"param.{name}"]), name


def test_guard_drops_steps_and_counts_skips(caplog):
    """Stop mode drops every step from the first bad one on (the run is stopping) and names that
    step; skip mode drops the bad step only and counts it at the check."""
    nan, finite = torch.tensor(float("nan")), {"loss": torch.tensor(1.0)}
    log = logging.getLogger("test")
    stop = NonFiniteGuard(skip=False)
    stop.observe(finite, step=6, epoch=1, batch=2)
    stop.update_flag()
    stop.check(log)  # nothing to report
    assert stop.drop.item() == 0
    stop.observe({"loss": nan}, 7, 1, 3)
    stop.update_flag()
    stop.observe(finite, 8, 1, 4)
    stop.update_flag()
    assert stop.drop.item() == 1
    with pytest.raises(NonFiniteLossError, match=r"step 7 \(epoch 1, batch 3\): loss=nan"):
        stop.check(log)

    skip = NonFiniteGuard(skip=True)
    skip.observe({"loss": nan}, 7, 1, 3)
    skip.update_flag()
    assert skip.drop.item() == 1
    skip.observe(finite, 8, 1, 4)
    skip.update_flag()
    assert skip.drop.item() == 0
    with caplog.at_level(logging.WARNING):
        skip.check(log)
    assert skip.skipped == 1 and "first at step 7 (epoch 1, batch 3)" in caplog.text
    skip.check(log)
    assert skip.skipped == 1
