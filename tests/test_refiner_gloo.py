"""MIM-Refiner's multi-head loss and queues on two CPU (gloo) ranks against one process on the
concatenated batch.

Two steps of ``RefinerTuning.compute_losses`` (every head's multi-crop NNA loss over gathered
predictions, the neighbour lookups and the FIFO update of every queue with the gathered view-0
projections): the mean of the rank losses equals the single-process loss, the rank-averaged
parameter gradients (what DDP applies) equal the single-process gradients, and every head's queue
is identical on both ranks and to the single-process queue. The heads' BatchNorm runs on its
running statistics (row-wise), since torch's SyncBatchNorm needs GPUs; the exact nearest
neighbour (top-1) is drawn, so no random pick differs between the runs.
"""

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from maect.config import load_config
from maect.methods.base import arch_from_config
from maect.methods.refiner import RefinerTuning
from maect.models.vit import MaskedViT
from tests.gloo import init_gloo
from tests.test_refiner import REFINER_TINY

WORLD = 2
LOCAL = 4  # images per rank
STEPS = 2


def _module() -> RefinerTuning:
    cfg = load_config(
        "refiner/fmnist_vit_t", [*REFINER_TINY, "refiner.topk=1", "refiner.queue_size=32"]
    )
    torch.manual_seed(0)
    module = RefinerTuning(cfg, MaskedViT(arch_from_config(cfg))).train()
    module.heads.eval()
    return module


def _batches() -> list[dict]:
    """The global batches (identical in every process)."""
    g = torch.Generator().manual_seed(3)
    n = WORLD * LOCAL
    out = []
    for step in range(STEPS):
        views = [torch.randn(n, 1, 28, 28, generator=g) for _ in range(2)]
        views += [torch.randn(n, 1, 12, 12, generator=g) for _ in range(3)]
        ids = torch.arange(n) + 100 * step
        out.append({"image": views, "label": ids % 10, "index": ids})
    return out


def _run(module: RefinerTuning, rows: slice) -> dict:
    """Losses and gradients of every step on ``rows`` of the global batches, then the state."""
    result: dict = {"loss": [], "grads": []}
    for batch in _batches():
        local = {
            "image": [v[rows] for v in batch["image"]],
            "label": batch["label"][rows],
            "index": batch["index"][rows],
        }
        module.zero_grad()
        losses = module.compute_losses(local)
        losses["loss"].backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        if dist.is_initialized():
            for grad in grads.values():  # what DDP does
                dist.all_reduce(grad)
                grad /= WORLD
        result["loss"].append(losses["loss"].detach())
        result["per_head"] = {k: v.detach() for k, v in losses.items() if k.startswith("loss_")}
        result["grads"].append(grads)
    result["queues"] = {k: v for k, v in module.heads.state_dict().items() if ".queue." in k}
    return result


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    init_gloo(rank, init_file, WORLD)
    try:
        result = _run(_module(), slice(rank * LOCAL, (rank + 1) * LOCAL))
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_rank_on_the_concatenated_batch(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    single = _run(_module(), slice(None))

    assert {k.split(".")[0] for k in single["queues"]} == {"block0", "block1"}
    for step in range(STEPS):
        mean = torch.stack([r["loss"][step] for r in ranks]).mean()
        torch.testing.assert_close(mean, single["loss"][step])
        assert not torch.allclose(ranks[0]["loss"][step], ranks[1]["loss"][step])
        want = single["grads"][step]
        for result in ranks:
            assert result["grads"][step].keys() == want.keys()
            for name, grad in want.items():
                torch.testing.assert_close(
                    result["grads"][step][name], grad, rtol=1e-4, atol=1e-6, msg=name
                )
    for key, value in single["queues"].items():  # every head's queue, after both steps
        assert torch.equal(ranks[0]["queues"][key], ranks[1]["queues"][key]), key
        torch.testing.assert_close(ranks[0]["queues"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert int(single["queues"]["block1.queue.ptr"]) == STEPS * WORLD * LOCAL
