"""CAN: contrastive learning + masked autoencoding + noise prediction (Mishra et al. 2022).

Both augmented views of a batch go through the encoder as one batch: each view is noised with its
own level σ ~ U[0, σ_max] (added out of place to the normalised image) and masked independently.
The encoder output feeds all three losses: InfoNCE on the projected mean of the visible tokens,
normalised-pixel MSE on the masked patches and MSE against the unit-variance noise ε on the
visible patches, the last two predicted by one MAE decoder conditioned on σ. Terms whose weight is
zero build no modules, so SimCLR (mask ratio 0, no noise, contrastive only) and MAE (no contrast,
no noise) are configurations of this class.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from maect.config import CANConfig, RunConfig
from maect.data.transforms import VIEW_PAIRS
from maect.losses import info_nce, noise_prediction_mse
from maect.methods.base import PretrainMethod, arch_from_config
from maect.methods.mae import build_autoencoder
from maect.models.autoencoder import AutoencoderOutput
from maect.models.heads import MLPProjector
from maect.models.noise import NoiseLevelEmbedding
from maect.models.patches import patchify, unpatchify
from maect.models.vit import build_encoder


@dataclass
class CANOutput:
    """One forward pass over a batch of views."""

    tokens: torch.Tensor  # encoder output [B, 1 + K, D], CLS first
    mask: torch.Tensor  # [B, N], 1 = masked
    sigma: torch.Tensor  # [B] noise standard deviation (zeros without noise)
    noise: torch.Tensor | None  # unit-variance ε [B, C, H, W]; the encoder saw x + σ·ε
    decoded: AutoencoderOutput | None  # decoder output, None without decoder


def build_projector(c: CANConfig, in_dim: int) -> MLPProjector:
    """``mlp2``: Linear(D, D)–ReLU–Linear(D, proj_dim) (the PyTorch port's head, the default);
    ``mlp3bn``: three linear layers ``proj_hidden_dim`` wide with BatchNorm (bwconrad/can)."""
    if c.projector == "mlp2":
        return MLPProjector(in_dim, in_dim, c.proj_dim, num_layers=2, batch_norm=False)
    return MLPProjector(in_dim, c.proj_hidden_dim, c.proj_dim, num_layers=3, batch_norm=True)


class CAN(PretrainMethod):
    """Contrastive masked autoencoder with noise prediction on two views per image."""

    def __init__(self, cfg: RunConfig) -> None:
        encoder = build_encoder(arch_from_config(cfg))
        super().__init__(cfg, encoder)
        c = cfg.can
        self.loss_weights = {
            "contrastive": c.weight_contrastive,
            "reconstruction": c.weight_reconstruction,
            "denoising": c.weight_denoising,
        }
        has_decoder = c.weight_reconstruction > 0 or c.weight_denoising > 0
        self.projector = (
            build_projector(c, cfg.model.embed_dim) if c.weight_contrastive > 0 else None
        )
        self.autoencoder = (
            build_autoencoder(cfg, encoder, cfg.can.norm_pix_loss) if has_decoder else None
        )
        self.noise_embed = (
            NoiseLevelEmbedding(cfg.model.decoder_dim, c.noise_std_max, c.noise_embed_scale)
            if has_decoder and c.noise_std_max > 0
            else None
        )

    def view_specs(self) -> list[dict]:
        """Two augmented views per image (``can.views``, SimCLR's pair by default)."""
        return list(VIEW_PAIRS[self.cfg.can.views])

    def draw_noise(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image noise levels ``σ ~ U[0, noise_std_max]`` ``[B]`` and unit-variance ε."""
        sigma = self.cfg.can.noise_std_max * torch.rand(
            images.shape[0], device=images.device, generator=generator
        )
        noise = torch.randn(
            images.shape, device=images.device, dtype=images.dtype, generator=generator
        )
        return sigma, noise

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> CANOutput:
        """Noise, mask, encode and (if a decoder exists) decode a batch of views ``[B, C, H, W]``.

        ``images`` is left untouched: the encoder sees ``images + σ·ε``, a new tensor.
        """
        c = self.cfg.can
        sigma = torch.zeros(images.shape[0], device=images.device)
        noise = None
        inputs = images
        if c.noise_std_max > 0:
            sigma, noise = self.draw_noise(images, generator)
            inputs = images + sigma.to(images.dtype).view(-1, 1, 1, 1) * noise
        if self.autoencoder is None:
            tokens, masking = self.encoder.forward_masked(inputs, c.mask_ratio, generator=generator)
            return CANOutput(tokens, masking.mask, sigma, noise, None)
        condition = None if self.noise_embed is None else self.noise_embed(sigma)
        out = self.autoencoder(inputs, c.mask_ratio, condition, c.condition_mask_tokens, generator)
        return CANOutput(out.tokens, out.mask, sigma, noise, out)

    def compute_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """The non-zero-weighted terms of both views and their weighted sum under ``"loss"``."""
        views = batch["image"]
        if isinstance(views, torch.Tensor) or len(views) != 2:
            raise ValueError("CAN needs two views per image: batch['image'] = [view0, view1]")
        images = torch.cat(list(views))
        out = self(images)
        terms: dict[str, torch.Tensor] = {}
        if self.projector is not None:
            z0, z1 = self.projector(out.tokens[:, 1:, :].mean(dim=1)).chunk(2)
            terms["contrastive"] = info_nce(z0, z1, self.cfg.can.temperature)
        if out.decoded is not None:
            if self.loss_weights["reconstruction"] > 0:
                terms["reconstruction"] = self.autoencoder.reconstruction_loss(out.decoded, images)
            if self.loss_weights["denoising"] > 0:
                target = patchify(out.noise, self.encoder.arch.patch_size)
                terms["denoising"] = noise_prediction_mse(out.decoded.pred, target, out.mask)
        loss = sum(self.loss_weights[name] * value for name, value in terms.items())
        return {"loss": loss, **terms}

    @torch.no_grad()
    def preview(self, images: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        """Rows for the reconstruction grid: input, masked input, reconstruction (visible patches
        pasted in), noisy input, predicted noise ε̂ at the visible patches (normalised scale) —
        the rows whose modules this configuration has."""
        out = self(images, generator)
        rows = (
            [images] if out.decoded is None else self.autoencoder.preview_rows(out.decoded, images)
        )
        if out.noise is not None:
            rows.append(images + out.sigma.view(-1, 1, 1, 1) * out.noise)
            if out.decoded is not None:
                visible = 1.0 - out.mask.unsqueeze(-1)
                pred = out.decoded.pred.float() * visible
                rows.append(unpatchify(pred, self.encoder.arch.patch_size, images.shape[1]))
        return rows
