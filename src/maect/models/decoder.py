"""Lightweight MAE decoder shared by MAE and CAN."""

import torch
from timm.models.vision_transformer import Block
from torch import nn

from maect.models.pos_embed import sincos_2d
from maect.models.vit import init_mae_weights, run_blocks


class MAEDecoder(nn.Module):
    """Transformer decoder that predicts one output vector per patch from encoder tokens.

    Visible tokens are projected to the decoder width, mask tokens are inserted at the masked
    positions, the original order is restored, fixed sin-cos positions are added, and an optional
    per-sample conditioning vector (CAN's noise-level embedding) is added to the patch tokens.

    Args:
        num_patches: Patch tokens per image (a square grid).
        encoder_dim: Width of the encoder tokens.
        out_dim: Output size per patch (``p * p * C`` for pixels).
        embed_dim: Decoder width.
        depth: Number of transformer blocks.
        num_heads: Attention heads per block.
        mlp_ratio: MLP hidden size over width.
    """

    def __init__(
        self,
        num_patches: int,
        encoder_dim: int,
        out_dim: int,
        embed_dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        grid = int(round(num_patches**0.5))
        if grid * grid != num_patches:
            raise ValueError(f"decoder needs a square patch grid, got {num_patches} patches")
        self.embed = nn.Linear(encoder_dim, embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", sincos_2d(embed_dim, grid, cls_token=True))
        self.blocks = nn.Sequential(
            *[
                Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=nn.LayerNorm)
                for _ in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.pred = nn.Linear(embed_dim, out_dim)
        self.apply(init_mae_weights)
        nn.init.normal_(self.mask_token, std=0.02)
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them."""
        self.grad_checkpointing = enable

    def forward(
        self,
        tokens: torch.Tensor,
        ids_restore: torch.Tensor,
        condition: torch.Tensor | None = None,
        condition_mask_tokens: bool = True,
    ) -> torch.Tensor:
        """Predict every patch.

        Args:
            tokens: Encoder output ``[B, 1 + K, D_enc]`` (CLS first, then visible tokens).
            ids_restore: ``[B, N]`` permutation from :func:`random_masking`.
            condition: Optional ``[B, D_dec]`` vector added to the patch tokens.
            condition_mask_tokens: Whether mask tokens also receive ``condition``.

        Returns:
            ``[B, N, out_dim]`` predictions in the original patch order (CLS dropped).
        """
        x = self.embed(tokens)
        batch, num_patches = ids_restore.shape
        num_visible = x.shape[1] - 1
        mask_tokens = self.mask_token.to(x.dtype).expand(batch, num_patches - num_visible, -1)
        patches = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        index = ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2])
        patches = torch.gather(patches, 1, index) + self.pos_embed[:, 1:, :]
        if condition is not None:
            bias = condition.unsqueeze(1).expand_as(patches)
            if not condition_mask_tokens:
                visible = ids_restore < num_visible
                bias = bias * visible.unsqueeze(-1).to(bias.dtype)
            patches = patches + bias
        x = torch.cat([x[:, :1, :] + self.pos_embed[:, :1, :], patches], dim=1)
        x = self.norm(run_blocks(self.blocks, x, self.grad_checkpointing))
        return self.pred(x[:, 1:, :])
