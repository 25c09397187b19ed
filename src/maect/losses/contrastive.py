"""Contrastive losses over the globally gathered batch: InfoNCE (SimCLR / CAN), NNCLR (MAE-CT)
and the multi-crop nearest-neighbour losses of MIM-Refiner (NNCLR and nearest-neighbour
alignment, NNA).

All losses use the local rows as queries and the rows gathered from all ranks as keys, so each rank
returns the mean over its own queries and the mean over ranks is the loss of the global batch. They
compute in float32 (autocast disabled, inputs cast up) whatever the surrounding precision.
"""

from collections.abc import Sequence

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


def _unit_keys(p: torch.Tensor, gather: bool) -> tuple[torch.Tensor, int]:
    """Normalised float32 predictions of all ranks (rows along dim 0) and the first global row of
    this rank's."""
    keys = _float32_unit(p)
    if not gather:
        return keys, 0
    return gather_with_grad(keys), rank() * p.shape[0]


def _swapped_cross_entropy(
    keys: torch.Tensor,
    offset: int,
    nn: torch.Tensor,
    temperature: float,
    anchor: torch.Tensor | None = None,
) -> torch.Tensor:
    """CE over the gathered ``keys`` with label = own global index ``offset + row``.

    NNCLR (``anchor`` None): every logit is ``normalize(nn) · key / τ``. Nearest-neighbour
    alignment: only the positive logit uses the neighbour; the negatives are
    ``normalize(anchor) · key / τ`` (the sample's own projection). ``nn`` and ``anchor`` are
    constants (detached).
    """
    queries = _float32_unit(nn.detach())
    labels = torch.arange(queries.shape[0], device=queries.device) + offset
    if anchor is None:
        return F.cross_entropy(queries @ keys.T / temperature, labels)
    logits = _float32_unit(anchor.detach()) @ keys.T / temperature
    positive = (queries * keys[labels]).sum(dim=1, keepdim=True) / temperature
    return F.cross_entropy(logits.scatter(1, labels[:, None], positive), labels)


def _nn_to_prediction_loss(
    p: torch.Tensor, nn: torch.Tensor, temperature: float, gather: bool
) -> torch.Tensor:
    """``CE(normalize(nn) @ all_gather(normalize(p)).T / τ, label = own global index)``."""
    keys, offset = _unit_keys(p, gather)
    return _swapped_cross_entropy(keys, offset, nn, temperature)


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


def multicrop_pairs(
    global_views: int, local_views: int, official: bool = False
) -> list[tuple[int, int]]:
    """(anchor view, prediction view) pairs of MIM-Refiner's multi-crop loss.

    Every global view's neighbour is paired with the prediction of every other global view and
    of every local view (views ``global_views ..``). ``official`` repeats the official code's
    local pairs, which index the predictions from view 0: views ``0 .. local_views - 1`` (the
    global views themselves, including each view with itself, and the first local views only).
    """
    pairs = [(i, j) for i in range(global_views) for j in range(global_views) if i != j]
    first = 0 if official else global_views
    pairs += [(i, first + j) for i in range(global_views) for j in range(local_views)]
    return pairs


def multicrop_nn_loss(
    p: torch.Tensor,
    nn: torch.Tensor,
    pairs: Sequence[tuple[int, int]],
    temperature: float,
    anchors: torch.Tensor | None = None,
    gather: bool = True,
) -> torch.Tensor:
    """Mean over ``pairs`` ``(i, j)`` of the swapped cross-entropy between the neighbour of
    global view ``i`` and the gathered predictions of view ``j`` (MIM-Refiner, one head).

    NNCLR (``anchors`` None): ``CE(normalize(nn_i) @ all_gather(normalize(p_j)).T / τ, own
    index)``. Nearest-neighbour alignment (NNA, ``anchors`` given): the same positive logit
    ``nn_i · p_j[own] / τ``, negatives ``anchor_i · p_j[other] / τ`` from the sample's own
    projection. ``nnclr_loss(p0, p1, nn0, nn1)`` is the NNCLR case with pairs ``[(1, 0), (0, 1)]``.

    Args:
        p: Predictions of all views, ``[B, V, D]`` (local batch); gathered once across ranks.
        nn: Queue neighbours of the global views, ``[B, G, D]`` (constants).
        pairs: ``(anchor view < G, prediction view < V)`` pairs, e.g. :func:`multicrop_pairs`.
        temperature: Softmax temperature.
        anchors: Own projections of the global views, ``[B, G, D]`` (constants), for NNA.
        gather: Use the predictions of all ranks as keys; ``False`` keeps them per rank.

    Returns:
        Scalar loss, the mean over pairs of the mean over the local queries.
    """
    with torch.autocast(device_type=p.device.type, enabled=False):
        keys, offset = _unit_keys(p, gather)
        terms = [
            _swapped_cross_entropy(
                keys[:, j],
                offset,
                nn[:, i],
                temperature,
                None if anchors is None else anchors[:, i],
            )
            for i, j in pairs
        ]
        return torch.stack(terms).mean()
