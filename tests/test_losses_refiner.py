"""MIM-Refiner's multi-crop nearest-neighbour losses (NNA and NNCLR) against loop references."""

import pytest
import torch
import torch.nn.functional as F

from maect.losses import multicrop_nn_loss, multicrop_pairs, nnclr_loss

B, V, G, D = 5, 4, 2, 6
TAU = 0.2


def _data(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "p": torch.randn(B, V, D, generator=generator),
        "nn": torch.randn(B, G, D, generator=generator),
        "z": torch.randn(B, G, D, generator=generator),
    }


def _reference(p, nn, z, pairs, temperature, alignment: bool) -> torch.Tensor:
    """Written out per query: for anchor view i and prediction view j, the positive logit is
    nn_i[r] . p_j[r] / tau; every other logit c is (z_i[r] if alignment else nn_i[r]) . p_j[c] / tau
    (all vectors normalised); the loss is the mean over pairs and queries of -log softmax."""
    p, nn, z = (F.normalize(x, dim=-1) for x in (p, nn, z))
    terms = []
    for i, j in pairs:
        for r in range(B):
            logits = []
            for c in range(B):
                query = nn[r, i] if c == r or not alignment else z[r, i]
                logits.append(query @ p[c, j] / temperature)
            terms.append(-torch.log_softmax(torch.stack(logits), dim=0)[r])
    return torch.stack(terms).mean()


@pytest.mark.parametrize("alignment", [True, False])
@pytest.mark.parametrize("official", [False, True])
def test_multicrop_loss_matches_loop_reference(alignment: bool, official: bool) -> None:
    data = _data()
    pairs = multicrop_pairs(G, V - G, official)
    p = data["p"].clone().requires_grad_(True)
    anchors = data["z"] if alignment else None
    loss = multicrop_nn_loss(p, data["nn"], pairs, TAU, anchors=anchors, gather=False)
    p_ref = data["p"].clone().requires_grad_(True)
    expected = _reference(p_ref, data["nn"], data["z"], pairs, TAU, alignment)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(p.grad, p_ref.grad)


def test_pairs_fixed_and_official() -> None:
    assert multicrop_pairs(2, 3) == [(0, 1), (1, 0), (0, 2), (0, 3), (0, 4), (1, 2), (1, 3), (1, 4)]
    # the official code indexes the local predictions from view 0
    assert multicrop_pairs(2, 3, official=True)[2:] == [
        (0, 0),
        (0, 1),
        (0, 2),
        (1, 0),
        (1, 1),
        (1, 2),
    ]
    assert multicrop_pairs(2, 0) == [(0, 1), (1, 0)]


def test_two_views_without_alignment_is_nnclr() -> None:
    data = _data(1)
    p0, p1 = data["p"][:, 0], data["p"][:, 1]
    nn0, nn1 = data["nn"][:, 0], data["nn"][:, 1]
    expected = nnclr_loss(p0, p1, nn0, nn1, TAU, gather=False)
    got = multicrop_nn_loss(data["p"][:, :2], data["nn"], [(1, 0), (0, 1)], TAU, gather=False)
    torch.testing.assert_close(got, expected)


def test_alignment_with_the_neighbour_as_anchor_is_nnclr() -> None:
    data = _data(2)
    pairs = multicrop_pairs(G, V - G)
    nnclr = multicrop_nn_loss(data["p"], data["nn"], pairs, TAU, gather=False)
    nna = multicrop_nn_loss(data["p"], data["nn"], pairs, TAU, anchors=data["nn"], gather=False)
    torch.testing.assert_close(nna, nnclr)
    other = multicrop_nn_loss(data["p"], data["nn"], pairs, TAU, anchors=data["z"], gather=False)
    assert not torch.allclose(other, nnclr)


def test_gradient_reaches_predictions_only() -> None:
    data = {k: v.clone().requires_grad_(True) for k, v in _data(3).items()}
    pairs = multicrop_pairs(G, V - G)
    multicrop_nn_loss(data["p"], data["nn"], pairs, TAU, anchors=data["z"], gather=False).backward()
    assert data["p"].grad.abs().sum() > 0
    assert data["nn"].grad is None and data["z"].grad is None


def test_float32_under_bf16_autocast() -> None:
    data = _data(4)
    pairs = multicrop_pairs(G, V - G)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = multicrop_nn_loss(data["p"].bfloat16(), data["nn"], pairs, TAU, anchors=data["z"])
    assert loss.dtype == torch.float32
