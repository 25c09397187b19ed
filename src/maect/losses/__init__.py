"""Loss functions: masked reconstruction (MAE), noise prediction (CAN), InfoNCE and NNCLR."""

from maect.losses.contrastive import info_nce, nnclr_loss
from maect.losses.reconstruction import masked_mse, noise_prediction_mse, pixel_targets

__all__ = ["info_nce", "masked_mse", "nnclr_loss", "noise_prediction_mse", "pixel_targets"]
