"""Loss functions: masked reconstruction (MAE), noise prediction (CAN), InfoNCE, NNCLR and the
multi-crop nearest-neighbour losses of MIM-Refiner."""

from maect.losses.contrastive import info_nce, multicrop_nn_loss, multicrop_pairs, nnclr_loss
from maect.losses.reconstruction import masked_mse, noise_prediction_mse, pixel_targets

__all__ = [
    "info_nce",
    "masked_mse",
    "multicrop_nn_loss",
    "multicrop_pairs",
    "nnclr_loss",
    "noise_prediction_mse",
    "pixel_targets",
]
