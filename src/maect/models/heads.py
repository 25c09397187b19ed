"""Projection and prediction MLP heads for the contrastive objectives (NNCLR / MAE-CT,
MIM-Refiner, CAN)."""

from functools import partial

from torch import nn

# Hidden-layer activations of the NNCLR heads: MAE-CT's ReLU, MIM-Refiner's GELU.
ACTIVATIONS = {"relu": partial(nn.ReLU, inplace=True), "gelu": nn.GELU}


class NNCLRProjector(nn.Sequential):
    """NNCLR projector: ``(Linear(no bias)–BN–ReLU) × (num_layers − 1)``, then Linear(no bias)–BN.

    Args:
        in_dim: Input (encoder feature) width.
        hidden_dim: Width of the hidden layers.
        out_dim: Output (embedding) width.
        num_layers: Number of linear layers, at least 1.
        activation: ``relu`` or ``gelu`` (MIM-Refiner) after each hidden layer.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 2048,
        out_dim: int = 256,
        num_layers: int = 3,
        activation: str = "relu",
    ) -> None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(width, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim)]
            layers.append(ACTIVATIONS[activation]())
            width = hidden_dim
        layers += [nn.Linear(width, out_dim, bias=False), nn.BatchNorm1d(out_dim)]
        super().__init__(*layers)


class NNCLRPredictor(nn.Sequential):
    """NNCLR predictor: Linear(no bias)–BN–ReLU–Linear(no bias), as MAE-CT's official head (the
    NNCLR paper's last layer has a bias; MAE-CT drops it); with ``out_norm`` (MIM-Refiner) a
    final BN follows.

    Args:
        in_dim: Input width (the projector's output).
        hidden_dim: Hidden width.
        out_dim: Output width.
        activation: ``relu`` or ``gelu`` (MIM-Refiner) after the hidden layer.
        out_norm: Follow the last Linear with BN.
    """

    def __init__(
        self,
        in_dim: int = 256,
        hidden_dim: int = 4096,
        out_dim: int = 256,
        activation: str = "relu",
        out_norm: bool = False,
    ) -> None:
        layers: list[nn.Module] = [
            nn.Linear(in_dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            ACTIVATIONS[activation](),
            nn.Linear(hidden_dim, out_dim, bias=False),
        ]
        if out_norm:
            layers.append(nn.BatchNorm1d(out_dim))
        super().__init__(*layers)


class MLPProjector(nn.Sequential):
    """Generic projector: ``(Linear–[BN]–ReLU) × (num_layers − 1)``, then Linear with bias.

    Hidden linear layers carry a bias only without batch norm (BN's shift makes it redundant).
    CAN's variants: ``MLPProjector(D, D, 128, 2, batch_norm=False)`` (the PyTorch port) and
    ``MLPProjector(D, 4096, 128, 3, batch_norm=True)`` (bwconrad/can).

    Args:
        in_dim: Input width.
        hidden_dim: Width of the hidden layers.
        out_dim: Output width.
        num_layers: Number of linear layers, at least 1.
        batch_norm: Put BatchNorm1d after each hidden linear layer.
    """

    def __init__(
        self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int, batch_norm: bool
    ) -> None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(num_layers - 1):
            layers.append(nn.Linear(width, hidden_dim, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.ReLU(inplace=True))
            width = hidden_dim
        layers.append(nn.Linear(width, out_dim))
        super().__init__(*layers)
