"""Small helpers around ``torch.distributed`` that degrade to no-ops in a single process.

Gradient convention of :func:`gather_with_grad`: every rank computes a loss on its *local* queries
against the *gathered* keys, and DDP then averages parameter gradients over ranks. For the averaged
gradient to equal the gradient of the global loss (the mean of the rank losses), each rank's input
must receive the gradient of the *sum* of all rank losses. The backward pass therefore sums the
incoming gradients over ranks (``all_reduce``) and returns the local slice: the local input gradient
is ``world_size`` times the gradient of the global mean loss, and DDP's average undoes the factor.
"""

import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """Whether a process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Global rank of this process (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def init_from_env() -> bool:
    """Join the process group that a launcher (``torchrun``, ``srun`` with torch's variables)
    describes in ``WORLD_SIZE``/``RANK``/``MASTER_ADDR``; NCCL with one GPU per ``LOCAL_RANK``
    where CUDA is available, else gloo. Returns whether this call created the group (then the
    caller destroys it); False for one process or a group that already exists."""
    if is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


class _GatherWithGrad(torch.autograd.Function):
    """``all_gather`` along dim 0; backward sums the gradients over ranks, keeps the local slice."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        ctx.local_size = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = dist.get_rank() * ctx.local_size
        return grad[start : start + ctx.local_size]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0, differentiably.

    All ranks must pass tensors of the same shape, and all must run the backward pass (it is a
    collective). See the module docstring for the gradient scaling.

    Args:
        x: Local tensor ``[B, ...]``.

    Returns:
        ``[world_size * B, ...]``, rank ``r``'s rows at ``r * B``; ``x`` itself in a single process.
    """
    if world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0, without gradient.

    Args:
        x: Local tensor ``[B, ...]``, the same shape on every rank.

    Returns:
        ``[world_size * B, ...]`` (``x`` detached in a single process).
    """
    if world_size() == 1:
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)
