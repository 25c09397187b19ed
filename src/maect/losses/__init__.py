"""Loss functions: masked reconstruction (MAE) and contrastive (InfoNCE, NNCLR)."""

from maect.losses.contrastive import info_nce, nnclr_loss
from maect.losses.reconstruction import masked_mse, pixel_targets

__all__ = ["info_nce", "masked_mse", "nnclr_loss", "pixel_targets"]
