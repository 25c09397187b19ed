"""MAE, CAN and MAE-CT under Lightning DDP on two CPU (gloo) ranks against one process.

Two optimizer steps on 2 ranks x B images must give the parameters, buffers, EMAs and queue of
two steps on 1 rank x 2B images. The training sampler gives rank ``r`` the ``r``-th block of each
global batch and seeds every image's augmentation by (seed, epoch, index), so the images and crops
match. Two things differ on purpose and are bridged here, not in the library:

- Masks and noise are drawn per rank (each rank's stream is seeded by (seed, rank, epoch, batch)),
  so a 2-rank run is the same *distribution* as a 1-rank run, not the same draws. The test makes
  every draw inside ``compute_losses`` a slice of one global-batch draw (:func:`global_draws`).
- BatchNorm (MAE-CT's heads) is synchronised on GPUs only; torch's SyncBatchNorm does not run on
  CPU, so on gloo each rank normalises its own B rows. The single-process reference normalises
  each B-row block separately and updates running statistics from the first block, which is what
  rank 0 (whose buffers DDP broadcasts and whose checkpoint is written) does.

The queue must be identical on both ranks. Further checks: evaluation features computed on
``DistributedSampler`` shards and gathered with
:func:`maect.evaluation.distributed.gather_in_order`, and a NaN loss on one rank stopping (or,
with ``trainer.skip_nonfinite``, skipping) on both.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from lightning import Callback
from torch.utils.data import DistributedSampler

from maect.config import RunConfig, load_config
from maect.engine import fit_module, training_dataset
from maect.evaluation.distributed import gather_in_order
from maect.faults import NonFiniteLossError
from maect.methods import METHOD_CLASSES
from maect.methods.base import arch_from_config
from maect.methods.maect import ContrastiveTuning
from maect.models import noise
from maect.models.vit import MaskedViT
from tests.conftest import TINY_OVERRIDES, free_port, rank_environment

pytestmark = pytest.mark.slow

WORLD = 2
B = 8  # images per rank
GLOBAL = WORLD * B
STEPS = 2
EVAL_LEN = 7  # odd: DistributedSampler pads one rank's share with a repeated sample

MAECT_OVERRIDES = [
    "maect.queue_size=64",
    "maect.topk=1",
    "maect.proj_hidden_dim=32",
    "maect.proj_dim=16",
    "maect.pred_hidden_dim=32",
    "maect.frozen_blocks=1",
    "maect.encoder_ema=0.9",
    "maect.target_ema=0.9",
]
RECIPES = {"mae": "mae/fmnist_vit_t", "can": "can/fmnist_vit_t", "maect": "maect/fmnist_vit_t"}


def _config(method: str, world: int) -> RunConfig:
    extra = MAECT_OVERRIDES if method == "maect" else []
    cfg = load_config(
        RECIPES[method],
        [
            *TINY_OVERRIDES,
            *extra,
            f"data.synthetic_size={STEPS * GLOBAL}",
            f"data.batch_size={GLOBAL // world}",
            "data.num_workers=0",
            "optim.warmup_epochs=0",
            "trainer.epochs=1",
            "trainer.accelerator=cpu",
            f"trainer.devices={world}",
            f"trainer.strategy={'ddp' if world > 1 else 'auto'}",
        ],
    )
    cfg.trainer.precision = "64-true"  # see train()
    return cfg


def _selected_rows(n: int, rank: int, local: int) -> torch.Tensor:
    """Rows of a global draw that a rank with ``local`` images per view owns, for ``n`` local
    rows (views concatenated along dim 0, as CAN and MAE-CT do)."""
    views = n // local
    return torch.cat(
        [
            torch.arange(v * GLOBAL + rank * local, v * GLOBAL + (rank + 1) * local)
            for v in range(views)
        ]
    )


@contextlib.contextmanager
def global_draws(rank: int, local: int) -> Iterator[None]:
    """Make ``torch.rand``/``torch.randn`` return this rank's rows of one draw for the global
    batch (seeded by a call counter, the same in every process)."""
    originals = {"rand": torch.rand, "randn": torch.randn}
    counter = iter(range(10**6))

    def patched(name: str) -> Callable:
        def draw(*size, generator=None, **kwargs):
            shape = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else size
            rows = _selected_rows(shape[0], rank, local)
            full_shape = (shape[0] // local * GLOBAL, *shape[1:])
            g = torch.Generator().manual_seed(1000 + next(counter))
            device = kwargs.pop("device", None)
            full = originals[name](full_shape, generator=g, **kwargs)
            return full[rows].to(device)

        return draw

    with contextlib.ExitStack() as stack:
        for name in originals:
            stack.enter_context(_patched(torch, name, patched(name)))
        yield


@contextlib.contextmanager
def _patched(owner: object, name: str, value: object) -> Iterator[None]:
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


@contextlib.contextmanager
def per_rank_batchnorm() -> Iterator[None]:
    """BatchNorm over each B-row block separately; running stats from the first block only."""
    original = F.batch_norm

    def ghost(x, running_mean, running_var, weight=None, bias=None, training=False, *args):
        if not training or x.shape[0] != GLOBAL:
            return original(x, running_mean, running_var, weight, bias, training, *args)
        blocks = [
            original(
                block,
                *((running_mean, running_var) if i == 0 else (None, None)),
                weight,
                bias,
                True,
                *args,
            )
            for i, block in enumerate(x.split(B))
        ]
        return torch.cat(blocks)

    with _patched(F, "batch_norm", ghost):
        yield


def _module(method: str, cfg: RunConfig):
    torch.manual_seed(0)
    if method == "maect":
        return ContrastiveTuning(cfg, MaskedViT(arch_from_config(cfg)))
    return METHOD_CLASSES[method](cfg)


def train(method: str, world: int, rank: int, run_dir: Path) -> dict[str, torch.Tensor]:
    """Two steps of ``method`` in float64; returns the module's state dict (parameters and buffers).

    In float32, AdamW would turn rounding noise in the gradients of parameters whose true gradient
    is zero (attention key bias, biases followed by BatchNorm) into lr-sized steps.
    """
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    # NoiseLevelEmbedding returns float32 whatever its weights' dtype (to be fixed in noise.py)
    embed = noise.sinusoidal_embedding
    noise.sinusoidal_embedding = lambda *args: embed(*args).to(torch.float64)
    try:
        return _train(method, world, rank, run_dir)
    finally:
        torch.set_default_dtype(default)
        noise.sinusoidal_embedding = embed


def _train(method: str, world: int, rank: int, run_dir: Path) -> dict[str, torch.Tensor]:
    cfg = _config(method, world)
    module = _module(method, cfg)
    compute = module.compute_losses
    local = GLOBAL // world

    def compute_losses(batch: dict) -> dict[str, torch.Tensor]:
        with contextlib.ExitStack() as stack:
            stack.enter_context(global_draws(rank, local))
            if world == 1:
                stack.enter_context(per_rank_batchnorm())
            return compute(batch)

    module.compute_losses = compute_losses
    dataset = training_dataset(cfg)
    dataset.transform = module.train_transform()
    first_grads = FirstGradients()
    trainer = fit_module(cfg, module, dataset, run_dir, [first_grads])
    assert trainer.global_step == STEPS and trainer.world_size == world
    return {**{k: v.detach().clone() for k, v in module.state_dict().items()}, **first_grads.grads}


class FirstGradients(Callback):
    """The (DDP-averaged) gradients of the first optimizer step, as ``grad.<name>``: AdamW's
    update does not depend on the gradient's scale, the gradients do."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == 0:
            for name, p in pl_module.named_parameters():
                if p.grad is not None:
                    self.grads[f"grad.{name}"] = p.grad.detach().clone()


def _nonfinite_run(rank: int, run_dir: Path, skip: bool) -> dict:
    """MAE on two ranks where only rank 1's batch of the second step is NaN."""
    cfg = _config("mae", WORLD)
    cfg.trainer.precision = "32-true"
    cfg.trainer.skip_nonfinite = skip
    module = _module("mae", cfg)
    compute = module.compute_losses

    def poisoned(batch: dict) -> dict[str, torch.Tensor]:
        if rank == 1 and module.global_step == 1:
            batch = {**batch, "image": torch.full_like(batch["image"], float("nan"))}
        return compute(batch)

    module.compute_losses = poisoned
    dataset = training_dataset(cfg)
    dataset.transform = module.train_transform()
    try:
        fit_module(cfg, module, dataset, run_dir, [])
    except NonFiniteLossError as err:
        return {"error": str(err)}
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    return {"state": state, "skipped": module.skipped_nonfinite}


def _eval_shard(rank: int) -> torch.Tensor:
    sampler = DistributedSampler(range(EVAL_LEN), num_replicas=WORLD, rank=rank, shuffle=False)
    indices = torch.tensor(list(sampler))
    features = torch.stack([indices.float(), -indices.float()], dim=1)
    return gather_in_order(features, indices, EVAL_LEN)


def _worker(rank: int, port: int, out: str) -> None:
    rank_environment(rank, WORLD, port)
    torch.set_num_threads(1)
    results = {m: train(m, WORLD, rank, Path(out) / m) for m in RECIPES}
    results["eval"] = _eval_shard(rank)
    results["stop"] = _nonfinite_run(rank, Path(out) / "stop", skip=False)
    results["skip"] = _nonfinite_run(rank, Path(out) / "skip", skip=True)
    torch.save(results, Path(out) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = {m: train(m, 1, 0, out / f"single_{m}") for m in RECIPES}
    finally:
        torch.set_num_threads(threads)
    return {"ranks": ranks, "single": single}


@pytest.mark.parametrize("method", list(RECIPES))
def test_two_ranks_equal_one_rank_with_double_batch(runs, method):
    rank0, rank1 = (r[method] for r in runs["ranks"])
    single = runs["single"][method]
    assert rank0.keys() == single.keys() and any(k.startswith("grad.") for k in single)
    for key, value in single.items():
        # the contrastive losses are computed in float32, so gradients agree to ~1e-7
        tol = (
            {"rtol": 1e-5, "atol": 1e-7}
            if key.startswith("grad.")
            else {"rtol": 1e-6, "atol": 1e-8}
        )
        torch.testing.assert_close(rank0[key], value, **tol, msg=key)
    # parameters (and the queue) are identical on both ranks; BatchNorm buffers are per rank
    for key, value in rank0.items():
        if "running_" not in key and "num_batches_tracked" not in key:
            assert torch.equal(rank1[key], value), key


def test_queue_identical_on_all_ranks_and_filled(runs):
    queues = [
        {k: v for k, v in r["maect"].items() if k.startswith("queue.")} for r in runs["ranks"]
    ]
    assert queues[0].keys() == {"queue.embeddings", "queue.ids", "queue.labels", "queue.ptr"}
    for key in queues[0]:
        assert torch.equal(queues[0][key], queues[1][key]), key
    assert int(queues[0]["queue.ptr"]) == STEPS * GLOBAL
    ids = queues[0]["queue.ids"][: STEPS * GLOBAL]
    assert sorted(ids.tolist()) == list(range(STEPS * GLOBAL))  # every image once


def test_gathered_eval_features_complete_and_in_order(runs):
    expected = torch.stack([torch.arange(EVAL_LEN).float(), -torch.arange(EVAL_LEN).float()], 1)
    for result in runs["ranks"]:
        assert torch.equal(result["eval"], expected)


def test_nonfinite_loss_on_one_rank_stops_or_skips_on_all(runs):
    stop0, stop1 = (r["stop"] for r in runs["ranks"])
    assert "non-finite loss at step 1 (epoch 0, batch 1): loss=nan" in stop1["error"]
    assert "non-finite loss at step 1 (epoch 0, batch 1): on another rank" in stop0["error"]
    skip0, skip1 = (r["skip"] for r in runs["ranks"])
    assert skip0["skipped"] == skip1["skipped"] == 1
    for key, value in skip0["state"].items():
        assert torch.isfinite(value).all() and torch.equal(skip1["state"][key], value), key
