"""Single-process tests of the contrastive losses (the 2-rank case is in test_distributed_gloo)."""

import math

import pytest
import torch
import torch.nn.functional as F
from lightly.loss import NTXentLoss

from maect.losses import info_nce, nnclr_loss


def _pairs(batch: int = 8, dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    z0, z1 = torch.randn(2, batch, dim, generator=torch.Generator().manual_seed(seed))
    return z0, z1


def _nnclr_reference(
    p0: torch.Tensor, p1: torch.Tensor, nn0: torch.Tensor, nn1: torch.Tensor, temperature: float
) -> torch.Tensor:
    """The NNCLR loss with explicit loops over queries."""

    def one_side(p: torch.Tensor, nn: torch.Tensor) -> torch.Tensor:
        p, nn = F.normalize(p, dim=1), F.normalize(nn, dim=1)
        terms = []
        for i in range(len(nn)):
            logits = torch.stack([nn[i] @ p[j] / temperature for j in range(len(p))])
            terms.append(-torch.log_softmax(logits, dim=0)[i])
        return torch.stack(terms).mean()

    return (one_side(p0, nn1) + one_side(p1, nn0)) / 2


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_info_nce_matches_lightly(temperature: float) -> None:
    z0, z1 = _pairs()
    expected = NTXentLoss(temperature=temperature)(z0, z1)
    torch.testing.assert_close(info_nce(z0, z1, temperature), expected)


def test_info_nce_identical_embeddings_closed_form() -> None:
    batch = 6
    z = torch.ones(batch, 4)
    torch.testing.assert_close(info_nce(z, z.clone()), torch.tensor(math.log(2 * batch - 1)))


def test_info_nce_symmetric_in_views() -> None:
    z0, z1 = _pairs(seed=1)
    torch.testing.assert_close(info_nce(z0, z1), info_nce(z1, z0))


def test_info_nce_scale_invariant_and_finite_at_low_temperature() -> None:
    z0, z1 = _pairs(seed=2)
    torch.testing.assert_close(info_nce(z0, z1), info_nce(100 * z0, 0.01 * z1))
    z0.requires_grad_(True)
    loss = info_nce(z0, z1, temperature=1e-3)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(z0.grad).all()


def test_info_nce_float32_under_bf16_autocast() -> None:
    z0, z1 = _pairs(seed=3)
    expected = info_nce(z0, z1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = info_nce(z0.bfloat16(), z1.bfloat16())
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, atol=0.05, rtol=0.0)


def test_nnclr_matches_loop_reference() -> None:
    p0, p1 = _pairs(batch=5, seed=4)
    nn0, nn1 = _pairs(batch=5, seed=5)
    expected = _nnclr_reference(p0, p1, nn0, nn1, temperature=0.2)
    torch.testing.assert_close(nnclr_loss(p0, p1, nn0, nn1, temperature=0.2), expected)


def test_nnclr_identical_embeddings_closed_form() -> None:
    batch = 7
    z = torch.ones(batch, 3)
    loss = nnclr_loss(z, z, z, z, temperature=0.15)
    torch.testing.assert_close(loss, torch.tensor(math.log(batch)))


def test_nnclr_gradient_reaches_predictions_not_neighbours() -> None:
    p0, p1 = (t.requires_grad_(True) for t in _pairs(batch=4, seed=6))
    nn0, nn1 = (t.requires_grad_(True) for t in _pairs(batch=4, seed=7))
    nnclr_loss(p0, p1, nn0, nn1, temperature=0.1).backward()
    assert p0.grad is not None and p0.grad.abs().sum() > 0
    assert p1.grad is not None and p1.grad.abs().sum() > 0
    assert nn0.grad is None and nn1.grad is None


def test_nnclr_float32_under_bf16_autocast() -> None:
    p0, p1 = _pairs(seed=8)
    nn0, nn1 = _pairs(seed=9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nnclr_loss(p0, p1, nn0, nn1, temperature=0.1)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, nnclr_loss(p0, p1, nn0, nn1, temperature=0.1))
