"""ViT encoder with per-sample random masking, built on timm's ``VisionTransformer``.

The module *is* a ``timm.models.VisionTransformer`` (timm key names, fused attention), so its
``forward_features`` is timm's and its state dict loads into timm unchanged. The position embedding
is the fixed 2-D sin-cos table of MAE, stored in ``pos_embed`` with a (zero) CLS slot.

Activation checkpointing (timm's ``set_grad_checkpointing``, ``model.grad_checkpointing``) applies
to every forward path: ``forward_features`` (timm's), ``forward_masked`` and the trained blocks of
``forward_blocks`` (and so of ``forward_partially_frozen``); the MAE decoder has the same switch.
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from timm.layers import resample_abs_pos_embed
from timm.models import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from maect.models.masking import Masking, random_masking
from maect.models.pos_embed import sincos_2d


@dataclass(frozen=True)
class ViTArch:
    """Architecture of a ViT encoder: everything needed to rebuild it from weights."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True

    def timm_kwargs(self) -> dict:
        """Arguments of ``timm.models.VisionTransformer`` for this encoder (MAE's: CLS token,
        no head, LayerNorm eps 1e-6)."""
        return {
            "img_size": self.img_size,
            "patch_size": self.patch_size,
            "in_chans": self.in_chans,
            "num_classes": 0,
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "mlp_ratio": self.mlp_ratio,
            "qkv_bias": self.qkv_bias,
            "class_token": True,
            "global_pool": "token",
            "norm_layer": partial(nn.LayerNorm, eps=1e-6),
        }

    @property
    def grid_size(self) -> int:
        """Number of patches along one side."""
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Number of patch tokens."""
        return self.grid_size**2


class MaskedViT(VisionTransformer):
    """timm ViT whose ``forward_masked`` encodes only a random subset of patches."""

    def __init__(self, arch: ViTArch) -> None:
        super().__init__(**arch.timm_kwargs())
        self.arch = arch
        self.pos_embed.requires_grad_(False)
        self.patch_embed.strict_img_size = False  # other sizes go through embed() (local crops)
        self.initialize_mae()

    @torch.no_grad()
    def initialize_mae(self) -> None:
        """MAE initialisation: sin-cos positions, xavier-uniform linears, normal(0.02) CLS."""
        self.pos_embed.copy_(sincos_2d(self.embed_dim, self.arch.grid_size, cls_token=True))
        init_like_linear(self.patch_embed.proj.weight)
        nn.init.normal_(self.cls_token, std=0.02)
        self.apply(init_mae_weights)

    def forward_masked(
        self, images: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, Masking]:
        """Encode the visible patches of ``images``.

        Returns:
            Normed tokens ``[B, 1 + K, D]`` (CLS first) and the :class:`Masking` that was applied.
        """
        tokens = self.patch_embed(images) + self.pos_embed[:, 1:, :]
        masking = random_masking(tokens, mask_ratio, generator=generator)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, masking.visible], dim=1)
        x = self.norm(run_blocks(self.blocks, self.norm_pre(x), self.grad_checkpointing))
        return x, masking

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Tokens ``[B, 1 + N, D]`` (CLS first) with position embeddings, before the blocks.

        Images of another size (a multiple of the patch size, e.g. MIM-Refiner's local crops)
        get the sin-cos table resampled bicubically to their grid (no antialiasing, as the
        official code interpolates); the weights and ``encoder.pt`` do not change.
        """
        tokens = self.patch_embed(images)
        grid = [side // self.arch.patch_size for side in images.shape[-2:]]
        if grid == [self.arch.grid_size] * 2:
            return self._pos_embed(tokens)
        pos = resample_abs_pos_embed(self.pos_embed, grid, num_prefix_tokens=1, antialias=False)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        return self.pos_drop(torch.cat([cls, tokens], dim=1) + pos)

    def forward_blocks(
        self, images: torch.Tensor, blocks: Sequence[int], frozen_blocks: int = 0
    ) -> list[torch.Tensor]:
        """Tokens ``[B, 1 + N, D]`` after each block of ``blocks`` (0-based, in that order).

        The last block's tokens come after the final norm (what ``forward_features`` returns),
        the others are the raw block outputs (the residual stream, as MIM-Refiner pools them).
        Blocks above the deepest requested one are not run. With ``frozen_blocks > 0`` the
        embedding and the first ``frozen_blocks`` blocks run without autograd (no activations
        stored for them).
        """
        wanted, last = set(blocks), self.arch.depth - 1
        # runs of blocks that end at a requested block or at the last frozen one
        ends = sorted(wanted | ({frozen_blocks - 1} if 0 < frozen_blocks <= max(wanted) else set()))
        grad = torch.is_grad_enabled()
        outputs: dict[int, torch.Tensor] = {}
        with torch.set_grad_enabled(grad and frozen_blocks == 0):
            x = self.norm_pre(self.embed(images))
        start = 0
        for end in ends:
            with torch.set_grad_enabled(grad and start >= frozen_blocks):
                x = run_blocks(self.blocks[start : end + 1], x, self.grad_checkpointing)
            if end in wanted:
                outputs[end] = self.norm(x) if end == last else x
            start = end + 1
        return [outputs[index] for index in blocks]

    def forward_partially_frozen(self, images: torch.Tensor, frozen_blocks: int) -> torch.Tensor:
        """``forward_features`` with the first ``frozen_blocks`` blocks and, if there are any, the
        embedding run without autograd (no activations stored for them). Returns normed
        ``[B, 1 + N, D]``."""
        return self.forward_blocks(images, [self.arch.depth - 1], frozen_blocks)[0]


def run_blocks(blocks: nn.Sequential, x: torch.Tensor, checkpointed: bool) -> torch.Tensor:
    """``blocks(x)``; with ``checkpointed`` (and autograd recording) each block keeps only its
    input for the backward pass and runs its forward again there (activation checkpointing)."""
    if checkpointed and torch.is_grad_enabled():
        return checkpoint_seq(blocks, x, use_reentrant=False)
    return blocks(x)


def set_grad_checkpointing(modules: Iterable[nn.Module], enable: bool = True) -> int:
    """Switch activation checkpointing of every module in ``modules`` (e.g. a method's
    ``.modules()``) that has a ``set_grad_checkpointing``; returns how many were switched."""
    switched = [m for m in modules if hasattr(m, "set_grad_checkpointing")]
    for module in switched:
        module.set_grad_checkpointing(enable)
    return len(switched)


def init_like_linear(weight: torch.Tensor) -> None:
    """Xavier-uniform init of a conv kernel viewed as a ``[out, in * k * k]`` linear layer."""
    nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))


def init_mae_weights(module: nn.Module) -> None:
    """Per-module MAE init: xavier-uniform linears with zero bias, unit LayerNorm."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def build_encoder(arch: ViTArch) -> MaskedViT:
    """Build a freshly MAE-initialised encoder."""
    return MaskedViT(arch)
