"""Contrastive losses over the globally gathered batch: InfoNCE (SimCLR / CAN) and NNCLR (MAE-CT).

Both losses use the local rows as queries and the rows gathered from all ranks as keys, so each rank
returns the mean over its own queries and the mean over ranks is the loss of the global batch. They
compute in float32 (autocast disabled, inputs cast up) whatever the surrounding precision.
"""

import torch
import torch.nn.functional as F

from maect.distributed import gather_with_grad, rank


def _float32_unit(x: torch.Tensor) -> torch.Tensor:
    """Cast to float32 and L2-normalise the rows."""
    return F.normalize(x.float(), dim=-1)


def info_nce(
    z0: torch.Tensor, z1: torch.Tensor, temperature: float = 0.1, gather: bool = True
) -> torch.Tensor:
    """NT-Xent / InfoNCE loss of SimCLR over the 2N embeddings of a (global) batch of N pairs.

    Each of the 2N embeddings is a query whose positive is the other view of the same sample and
    whose negatives are the remaining 2N - 2 embeddings; embeddings are L2-normalised here.

    Args:
        z0: Embeddings of view 0, ``[B, D]`` (local batch).
        z1: Embeddings of view 1, ``[B, D]``.
        temperature: Softmax temperature.
        gather: Use the keys of all ranks (global negatives); ``False`` keeps them per rank.

    Returns:
        Scalar loss, the mean over the ``2B`` local queries.
    """
    with torch.autocast(device_type=z0.device.type, enabled=False):
        q0, q1 = _float32_unit(z0), _float32_unit(z1)
        batch = q0.shape[0]
        k0, k1 = (gather_with_grad(q0), gather_with_grad(q1)) if gather else (q0, q1)
        n_global = k0.shape[0]
        offset = rank() * batch if gather else 0

        queries = torch.cat([q0, q1])
        logits = queries @ torch.cat([k0, k1]).T / temperature
        own = torch.arange(batch, device=q0.device) + offset
        self_index = torch.cat([own, own + n_global])
        positive_index = torch.cat([own + n_global, own])
        rows = torch.arange(2 * batch, device=q0.device)
        logits[rows, self_index] = float("-inf")
        return F.cross_entropy(logits, positive_index)


def _nn_to_prediction_loss(
    p: torch.Tensor, nn: torch.Tensor, temperature: float, gather: bool
) -> torch.Tensor:
    """``CE(normalize(nn) @ all_gather(normalize(p)).T / τ, label = own global index)``."""
    queries = _float32_unit(nn.detach())
    keys = _float32_unit(p)
    if gather:
        keys = gather_with_grad(keys)
    offset = rank() * queries.shape[0] if gather else 0
    labels = torch.arange(queries.shape[0], device=queries.device) + offset
    return F.cross_entropy(queries @ keys.T / temperature, labels)


def nnclr_loss(
    p0: torch.Tensor,
    p1: torch.Tensor,
    nn0: torch.Tensor,
    nn1: torch.Tensor,
    temperature: float,
    gather: bool = True,
) -> torch.Tensor:
    """Symmetric NNCLR loss: the neighbour of one view must identify the prediction of the other.

    ``L(p, nn) = CE(normalize(nn) @ all_gather(normalize(p)).T / τ, label = own global index)`` and
    ``loss = (L(p0, nn1) + L(p1, nn0)) / 2``. The neighbours are constants (detached).

    Args:
        p0: Predictor outputs of view 0, ``[B, D]`` (local batch).
        p1: Predictor outputs of view 1, ``[B, D]``.
        nn0: Queue neighbours of view 0's target embeddings, ``[B, D]``.
        nn1: Queue neighbours of view 1's target embeddings, ``[B, D]``.
        temperature: Softmax temperature.
        gather: Use the predictions of all ranks as keys; ``False`` keeps them per rank.

    Returns:
        Scalar loss, the mean over the local queries of both terms.
    """
    with torch.autocast(device_type=p0.device.type, enabled=False):
        loss0 = _nn_to_prediction_loss(p0, nn1, temperature, gather)
        loss1 = _nn_to_prediction_loss(p1, nn0, temperature, gather)
        return (loss0 + loss1) / 2
