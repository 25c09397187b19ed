"""``trainer.strategy=fsdp`` on two CPU (gloo) ranks against DDP on the same two ranks.

The same seeds give both strategies the same images, masks and neighbour picks, so after the same
steps the weights agree up to float32 reduction order (FSDP reduce-scatters where DDP
all-reduces): MAE through ``pretrain`` (under FSDP with activation checkpointing) and MAE-CT
through ``tune`` (stage 2 hands its head over, stage 3 updates EMAs of parameters FSDP shards).
Further checks: the optimizer groups (weight decay, layer-wise lr) hold the same parameters,
``encoder.pt`` and the checkpoints load like DDP's, an FSDP run killed mid-epoch resumes to the
uninterrupted run's weights, and resuming an FSDP checkpoint under DDP is refused in one line.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from maect.checkpoints import load_encoder, save_encoder
from maect.config import ConfigError, RunConfig, load_config
from maect.engine import RunCheckpoint, pretrain
from maect.methods.base import PretrainMethod, arch_from_config
from maect.models.vit import MaskedViT
from maect.tuning import tune
from tests.conftest import TINY_OVERRIDES, free_port, rank_environment
from tests.test_maect import MAECT_TINY

pytestmark = pytest.mark.slow

WORLD = 2
COMMON = [
    *TINY_OVERRIDES,
    "data.synthetic_size=48",  # 3 steps of 2 ranks x 8 images
    "data.batch_size=8",
    "data.num_workers=0",
    "optim.warmup_epochs=0",
    "trainer.epochs=1",
    "trainer.accelerator=cpu",
    f"trainer.devices={WORLD}",
    "trainer.monitor_every=0",
    "trainer.checkpoint_every_steps=1",
]
# applied after test_maect's MAECT_TINY and COMMON
MAECT = ["maect.queue_size=32", "maect.topk=1", "maect.encoder_ema=0.9", "maect.target_ema=0.9"]


def _mae(strategy: str) -> RunConfig:
    """MAE; under FSDP with activation checkpointing too (around the FSDP-wrapped blocks)."""
    checkpointing = f"model.grad_checkpointing={str(strategy == 'fsdp').lower()}"
    return load_config("mae/fmnist_vit_t", [*COMMON, f"trainer.strategy={strategy}", checkpointing])


def _maect(strategy: str, init: Path) -> RunConfig:
    extra = [*MAECT, f"maect.init={init}", f"trainer.strategy={strategy}"]
    return load_config("maect/fmnist_vit_t", [*MAECT_TINY, *COMMON, *extra])


def spy_on_groups(groups: list) -> None:
    """Make every run record its optimizer groups as (weight decay, lr, sorted names)."""
    original = PretrainMethod.configure_optimizers

    def configure_optimizers(module: PretrainMethod):
        result = original(module)
        names = {
            id(p): n.replace("_fsdp_wrapped_module.", "") for n, p in module.named_parameters()
        }
        optimizer = result["optimizer"]
        groups.append(
            sorted(
                (
                    g["weight_decay"],
                    round(g["lr"], 12),
                    tuple(sorted(names[id(p)] for p in g["params"])),
                )
                for g in optimizer.param_groups
            )
        )
        return result

    PretrainMethod.configure_optimizers = configure_optimizers


def _crash_at(step: int):
    def crashing(self, trainer, *args):
        if trainer.global_step == step:
            raise RuntimeError("simulated crash")

    return crashing


def _worker(rank: int, port: int, out: str, init: str) -> None:
    rank_environment(rank, WORLD, port)
    torch.set_num_threads(1)
    out_dir = Path(out)
    results: dict = {"groups": []}
    spy_on_groups(results["groups"])  # ddp: mae, head, tune; then fsdp: the same three
    for strategy in ("ddp", "fsdp"):
        pretrain(_mae(strategy), out_dir / strategy / "mae")
        tune(_maect(strategy, Path(init)), out_dir / strategy / "maect")

    crashed = out_dir / "fsdp_resumed"
    RunCheckpoint.on_train_batch_start = _crash_at(2)
    try:
        pretrain(_mae("fsdp"), crashed)
    except RuntimeError as err:
        results["crash"] = str(err)
    del RunCheckpoint.on_train_batch_start
    try:
        pretrain(_mae("ddp"), crashed)
    except ConfigError as err:
        results["switch"] = str(err)
    pretrain(_mae("fsdp"), crashed)
    torch.save(results, out_dir / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("fsdp")
    init = out / "init" / "encoder.pt"
    torch.manual_seed(0)
    save_encoder(MaskedViT(arch_from_config(_mae("ddp"))), init)
    mp.spawn(_worker, args=(free_port(), str(out), str(init)), nprocs=WORLD, join=True)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    return {"out": out, "ranks": ranks}


@pytest.mark.parametrize("method", ["mae", "maect"])
def test_fsdp_trains_the_weights_ddp_trains(runs, method):
    ddp = load_encoder(runs["out"] / "ddp" / method / "encoder.pt").state_dict()
    fsdp = load_encoder(runs["out"] / "fsdp" / method / "encoder.pt").state_dict()
    init = load_encoder(runs["out"] / "init" / "encoder.pt").state_dict()
    assert ddp.keys() == fsdp.keys()
    for key, value in ddp.items():
        torch.testing.assert_close(fsdp[key], value, rtol=1e-4, atol=1e-5, msg=key)
    moved = {key for key, value in ddp.items() if not torch.equal(value, init[key])}
    assert {k for k in ddp if k.startswith(("blocks.1.", "norm."))} <= moved  # it trained


def test_fsdp_checkpoints_hold_whole_weights_under_ddp_keys(runs):
    for method, ckpt in (("mae", "last.ckpt"), ("maect", "tune/checkpoints/last.ckpt")):
        path = runs["out"] / "{}" / method / (ckpt if "/" in ckpt else f"checkpoints/{ckpt}")
        ddp = torch.load(str(path).format("ddp"), weights_only=True, map_location="cpu")
        fsdp = torch.load(str(path).format("fsdp"), weights_only=True, map_location="cpu")
        assert fsdp["global_step"] == ddp["global_step"] == 3
        assert fsdp["state_dict"].keys() == ddp["state_dict"].keys()
        for key, value in ddp["state_dict"].items():
            assert fsdp["state_dict"][key].shape == value.shape, key
    head = torch.load(runs["out"] / "fsdp" / "maect" / "head" / "head.pt", weights_only=True)
    assert head["projector"]["0.weight"].shape == (32, 32)


def test_optimizer_groups_are_the_same_under_fsdp(runs):
    groups = runs["ranks"][0]["groups"]
    assert len(groups) == 8  # then the interrupted FSDP run and its resumption
    for ddp, fsdp in zip(groups[:3], groups[3:6], strict=True):
        assert ddp == fsdp
    decayed = {name for wd, _, names in groups[0] if wd > 0 for name in names}
    assert "encoder.blocks.0.attn.qkv.weight" in decayed
    assert "encoder.blocks.0.attn.qkv.bias" not in decayed


def test_fsdp_run_resumes_exactly_and_refuses_a_switch_to_ddp(runs):
    for result in runs["ranks"]:
        assert result["crash"] == "simulated crash"
        assert "written with trainer.strategy=fsdp" in result["switch"]
        assert "\n" not in result["switch"]
    resumed = load_encoder(runs["out"] / "fsdp_resumed").state_dict()
    straight = load_encoder(runs["out"] / "fsdp" / "mae").state_dict()
    for key, value in straight.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=0, msg=key)
