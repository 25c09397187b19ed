"""Masked autoencoder = masked ViT encoder + MAE decoder + pixel targets (shared by MAE and CAN)."""

from dataclasses import dataclass

import torch
from torch import nn

from maect.losses.reconstruction import masked_mse, pixel_targets
from maect.models.decoder import MAEDecoder
from maect.models.patches import patchify, unpatchify
from maect.models.vit import MaskedViT


@dataclass
class AutoencoderOutput:
    """What one masked forward pass produces."""

    tokens: torch.Tensor  # encoder output [B, 1 + K, D], CLS first
    pred: torch.Tensor  # decoder output [B, N, p*p*C]
    mask: torch.Tensor  # [B, N], 1 = masked
    ids_restore: torch.Tensor  # [B, N]


class MaskedAutoencoder(nn.Module):
    """Encoder on visible patches, light decoder over all positions.

    Args:
        encoder: The masked ViT.
        decoder: Decoder whose output size is ``p * p * C``.
        norm_pix_loss: Reconstruct per-patch normalised pixels (MAE default) instead of raw ones.
    """

    def __init__(self, encoder: MaskedViT, decoder: MAEDecoder, norm_pix_loss: bool = True) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.norm_pix_loss = norm_pix_loss

    @property
    def patch_size(self) -> int:
        return self.encoder.arch.patch_size

    def forward(
        self,
        images: torch.Tensor,
        mask_ratio: float,
        condition: torch.Tensor | None = None,
        condition_mask_tokens: bool = True,
        generator: torch.Generator | None = None,
    ) -> AutoencoderOutput:
        """Encode the visible patches of ``images`` and decode every patch."""
        tokens, masking = self.encoder.forward_masked(images, mask_ratio, generator=generator)
        pred = self.decoder(tokens, masking.ids_restore, condition, condition_mask_tokens)
        return AutoencoderOutput(tokens, pred, masking.mask, masking.ids_restore)

    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """Per-patch reconstruction targets ``[B, N, p*p*C]`` for clean ``images``."""
        return pixel_targets(patchify(images, self.patch_size), self.norm_pix_loss)

    def reconstruction_loss(self, out: AutoencoderOutput, images: torch.Tensor) -> torch.Tensor:
        """MSE over the masked patches only."""
        return masked_mse(out.pred, self.targets(images), out.mask)

    def predicted_pixels(self, out: AutoencoderOutput, images: torch.Tensor) -> torch.Tensor:
        """Decoder output mapped back to pixel patches (undoing per-patch normalisation)."""
        if not self.norm_pix_loss:
            return out.pred
        patches = patchify(images, self.patch_size)
        mean = patches.mean(dim=-1, keepdim=True)
        std = (patches.var(dim=-1, keepdim=True) + 1e-6) ** 0.5
        return out.pred * std + mean

    def preview_rows(self, out: AutoencoderOutput, images: torch.Tensor) -> list[torch.Tensor]:
        """``[input, masked input, reconstruction]`` in image space; the reconstruction keeps the
        visible patches of the input, as in the MAE paper's figures."""
        p, c = self.patch_size, images.shape[1]
        patches = patchify(images, p)
        mask = out.mask.unsqueeze(-1)
        masked = unpatchify(patches * (1 - mask), p, c)
        pred = self.predicted_pixels(out, images).float()
        recon = unpatchify(pred * mask + patches * (1 - mask), p, c)
        return [images, masked, recon]
