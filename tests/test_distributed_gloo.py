"""Two CPU ranks (gloo) against one process on the concatenated batch.

Gradient relationship checked here: with local queries against gathered keys, the loss of the global
batch is the mean of the rank losses. ``gather_with_grad`` sums the key gradients over ranks, so the
gradient a rank receives for its local inputs is ``world_size`` × the single-process gradient of the
same rows, and the gradients of a DDP-wrapped model (averaged over ranks by DDP) equal the
single-process gradients exactly.
"""

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from maect.distributed import gather_no_grad, gather_with_grad, rank, world_size
from maect.losses import info_nce, nnclr_loss
from maect.models.nn_queue import NNQueue
from tests.gloo import init_gloo

WORLD = 2
BATCH = 4  # per rank
IN_DIM, DIM = 6, 8
TAU = 0.2


def _global_data() -> dict[str, torch.Tensor]:
    """The full (2-rank) batch, identical in every process."""
    generator = torch.Generator().manual_seed(0)
    n = WORLD * BATCH

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    return {
        "x0": draw(n, IN_DIM),
        "x1": draw(n, IN_DIM),
        "z0": draw(n, DIM),
        "z1": draw(n, DIM),
        "nn0": draw(n, DIM),
        "nn1": draw(n, DIM),
        "queue_batches": F.normalize(draw(3, n, DIM), dim=-1),
        "queries": F.normalize(draw(n, DIM), dim=-1),
    }


def _model() -> nn.Linear:
    torch.manual_seed(1)
    return nn.Linear(IN_DIM, DIM)


def _losses(model: nn.Module, data: dict[str, torch.Tensor], gather: bool) -> dict[str, object]:
    """Both losses, their input gradients and (DDP-synchronised) parameter gradients."""
    out: dict[str, object] = {}
    z0 = data["z0"].clone().requires_grad_(True)
    z1 = data["z1"].clone().requires_grad_(True)
    loss = info_nce(z0, z1, TAU, gather=gather)
    loss.backward()
    out["info_nce"], out["info_nce_grad"] = loss.detach(), torch.cat([z0.grad, z1.grad])

    p0 = data["z0"].clone().requires_grad_(True)
    p1 = data["z1"].clone().requires_grad_(True)
    loss = nnclr_loss(p0, p1, data["nn0"], data["nn1"], TAU, gather=gather)
    loss.backward()
    out["nnclr"], out["nnclr_grad"] = loss.detach(), torch.cat([p0.grad, p1.grad])

    for name in ("info_nce", "nnclr"):
        model.zero_grad()
        e0, e1 = model(torch.cat([data["x0"], data["x1"]])).chunk(2)
        if name == "info_nce":
            loss = info_nce(e0, e1, TAU, gather=gather)
        else:
            loss = nnclr_loss(e0, e1, data["nn0"], data["nn1"], TAU, gather=gather)
        loss.backward()
        out[f"{name}_param_grads"] = [p.grad.clone() for p in model.parameters()]
    return out


def _queue_run(data: dict[str, torch.Tensor], local: slice) -> dict[str, torch.Tensor]:
    """Fill a queue with gathered batches, then look up neighbours of the local queries."""
    queue = NNQueue(size=2 * WORLD * BATCH, dim=DIM, seed=5)
    ids = torch.arange(WORLD * BATCH)
    for step, batch in enumerate(data["queue_batches"]):
        z, batch_ids = gather_no_grad(batch[local]), gather_no_grad(ids[local] + 100 * step)
        queue.update(z, batch_ids, labels=batch_ids % 3)
    generator = torch.Generator().manual_seed(7)
    _, index = queue.find_nn(data["queries"][local], topk=3, generator=generator)
    return {**queue.state_dict(), "nn_index": gather_no_grad(index)}


def _worker(rank_: int, init_file: str, out_dir: str) -> None:
    init_gloo(rank_, init_file, WORLD)
    try:
        assert (rank(), world_size()) == (rank_, WORLD)
        full = _global_data()
        local = slice(rank_ * BATCH, (rank_ + 1) * BATCH)
        data = {k: v[local] for k, v in full.items() if k != "queue_batches"}
        data["queue_batches"] = full["queue_batches"]

        result = _losses(DistributedDataParallel(_model()), data, gather=True)
        result["gathered"] = gather_with_grad(data["z0"])
        result["queue"] = _queue_run(full, local)
        torch.save(result, Path(out_dir) / f"rank{rank_}.pt")
    finally:
        dist.destroy_process_group()


def _local_rows(grad: torch.Tensor, r: int) -> torch.Tensor:
    """Rank ``r``'s rows of a single-process gradient laid out as ``cat([view0, view1])``."""
    n = WORLD * BATCH
    rows = slice(r * BATCH, (r + 1) * BATCH)
    return torch.cat([grad[:n][rows], grad[n:][rows]])


def test_two_ranks_match_single_process(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    full = _global_data()
    single = _losses(_model(), full, gather=False)

    for r, result in enumerate(ranks):
        torch.testing.assert_close(result["gathered"], full["z0"])
        for name in ("info_nce", "nnclr"):
            expected_grad = WORLD * _local_rows(single[f"{name}_grad"], r)
            torch.testing.assert_close(result[f"{name}_grad"], expected_grad)
            got_grads, want_grads = result[f"{name}_param_grads"], single[f"{name}_param_grads"]
            for got, want in zip(got_grads, want_grads, strict=True):
                torch.testing.assert_close(got, want)

    for name in ("info_nce", "nnclr"):
        mean = torch.stack([result[name] for result in ranks]).mean()
        torch.testing.assert_close(mean, single[name])
        assert not torch.allclose(ranks[0][name], ranks[1][name])

    queue0, queue1 = ranks[0]["queue"], ranks[1]["queue"]
    for key in queue0:
        assert torch.equal(queue0[key], queue1[key]), key
    reference = NNQueue(size=2 * WORLD * BATCH, dim=DIM, seed=5)
    for step, batch in enumerate(full["queue_batches"]):
        ids = torch.arange(WORLD * BATCH) + 100 * step
        reference.update(batch, ids, labels=ids % 3)
    for key, value in reference.state_dict().items():
        assert torch.equal(queue0[key], value), key
    expected_index = [
        reference.find_nn(
            full["queries"][r * BATCH : (r + 1) * BATCH],
            topk=3,
            generator=torch.Generator().manual_seed(7),
        )[1]
        for r in range(WORLD)
    ]
    assert torch.equal(queue0["nn_index"], torch.cat(expected_index))
