"""MAE: masked autoencoder pretraining (He et al. 2022)."""

from __future__ import annotations

import torch

from maect.config import RunConfig
from maect.methods.base import PretrainMethod, arch_from_config
from maect.models.autoencoder import MaskedAutoencoder
from maect.models.decoder import MAEDecoder
from maect.models.vit import MaskedViT, build_encoder


def build_autoencoder(cfg: RunConfig, encoder: MaskedViT, norm_pix_loss: bool) -> MaskedAutoencoder:
    """Encoder plus the decoder described by ``cfg.model``."""
    m = cfg.model
    decoder = MAEDecoder(
        num_patches=encoder.arch.num_patches,
        encoder_dim=m.embed_dim,
        out_dim=m.patch_size**2 * m.in_chans,
        embed_dim=m.decoder_dim,
        depth=m.decoder_depth,
        num_heads=m.decoder_heads,
        mlp_ratio=m.mlp_ratio,
    )
    return MaskedAutoencoder(encoder, decoder, norm_pix_loss=norm_pix_loss)


class MAE(PretrainMethod):
    """Reconstruct the masked patches of each view from its visible ones. With ``mae.views > 1``
    every image gives that many independently cropped and masked views, all in one batch, and the
    lr counts them (MAE-CT's stage 1)."""

    def __init__(self, cfg: RunConfig) -> None:
        encoder = build_encoder(arch_from_config(cfg))
        super().__init__(cfg, encoder)
        self.autoencoder = build_autoencoder(cfg, encoder, cfg.mae.norm_pix_loss)

    @property
    def lr_views(self) -> int:
        return self.cfg.mae.views

    def view_specs(self) -> list[dict]:
        return [{}] * self.cfg.mae.views  # crop and flip only, each view its own crop

    def compute_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        images = batch["image"]
        if isinstance(images, list | tuple):  # mae.views > 1: one batch of all views
            images = torch.cat(images)
        out = self.autoencoder(images, self.cfg.mae.mask_ratio)
        return {"loss": self.autoencoder.reconstruction_loss(out, images)}

    @torch.no_grad()
    def preview(self, images: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        """Rows for the reconstruction grid: input, masked input, reconstruction (pixels pasted in
        at the visible patches)."""
        out = self.autoencoder(images, self.cfg.mae.mask_ratio, generator=generator)
        return self.autoencoder.preview_rows(out, images)
