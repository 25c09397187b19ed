"""Shapes and layer structure of the projection / prediction heads."""

import pytest
import torch
from torch import nn

from maect.models.heads import MLPProjector, NNCLRPredictor, NNCLRProjector


def _layers(module: nn.Module, kind: type[nn.Module]) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, kind)]


def test_nnclr_projector_structure_and_shape() -> None:
    head = NNCLRProjector(in_dim=32, hidden_dim=64, out_dim=16)
    assert head(torch.randn(5, 32)).shape == (5, 16)
    linears = _layers(head, nn.Linear)
    assert [(m.in_features, m.out_features) for m in linears] == [(32, 64), (64, 64), (64, 16)]
    assert all(m.bias is None for m in linears)
    assert [m.num_features for m in _layers(head, nn.BatchNorm1d)] == [64, 64, 16]
    assert isinstance(head[-1], nn.BatchNorm1d)
    assert len(_layers(head, nn.ReLU)) == 2


def test_nnclr_projector_defaults() -> None:
    head = NNCLRProjector(in_dim=8)
    assert [m.out_features for m in _layers(head, nn.Linear)] == [2048, 2048, 256]


def test_nnclr_predictor_structure_and_shape() -> None:
    head = NNCLRPredictor(in_dim=16, hidden_dim=48, out_dim=16)
    assert head(torch.randn(4, 16)).shape == (4, 16)
    first, last = _layers(head, nn.Linear)
    assert first.bias is None and last.bias is None  # MAE-CT's head: no bias on either
    assert [m.num_features for m in _layers(head, nn.BatchNorm1d)] == [48]
    assert isinstance(head[-1], nn.Linear)


def test_mlp_projector_can_port_variant() -> None:
    head = MLPProjector(in_dim=24, hidden_dim=24, out_dim=8, num_layers=2, batch_norm=False)
    assert head(torch.randn(3, 24)).shape == (3, 8)
    linears = _layers(head, nn.Linear)
    assert [(m.in_features, m.out_features) for m in linears] == [(24, 24), (24, 8)]
    assert all(m.bias is not None for m in linears)
    assert not _layers(head, nn.BatchNorm1d)
    assert [type(m) for m in head] == [nn.Linear, nn.ReLU, nn.Linear]


def test_mlp_projector_bwconrad_variant() -> None:
    head = MLPProjector(in_dim=24, hidden_dim=40, out_dim=8, num_layers=3, batch_norm=True)
    assert head(torch.randn(3, 24)).shape == (3, 8)
    assert [m.num_features for m in _layers(head, nn.BatchNorm1d)] == [40, 40]
    *hidden, last = _layers(head, nn.Linear)
    assert all(m.bias is None for m in hidden) and last.bias is not None
    assert isinstance(head[-1], nn.Linear)


@pytest.mark.parametrize("cls", [NNCLRProjector, MLPProjector])
def test_zero_layers_rejected(cls: type[nn.Module]) -> None:
    kwargs = {"batch_norm": False} if cls is MLPProjector else {}
    with pytest.raises(ValueError, match="num_layers"):
        cls(8, 8, 8, 0, **kwargs)
