"""ViT classifier for fine-tuning: a timm ``VisionTransformer`` with a linear head.

The head reads the CLS token after the final norm (``global_pool="token"``) or the LayerNorm
``fc_norm`` of the mean patch token (``"avg"``, facebookresearch/mae's ``global_pool``; timm then
has no final ``norm``), so the state dict loads into
``timm.create_model(<name>, num_classes=..., global_pool=...)`` with strict keys.
"""

from __future__ import annotations

import dataclasses

import torch
from timm.layers import resample_abs_pos_embed, trunc_normal_
from timm.models.vision_transformer import VisionTransformer

from maect.models.vit import ViTArch

HEAD_INIT_STD = 2e-5  # facebookresearch/mae main_finetune.py: trunc_normal_(head.weight, std=2e-5)
# timm model names of the standard ViTs: (patch, width, depth, heads) at 224 px, RGB, MLP x4.
TIMM_NAMES = {
    (16, 192, 12, 3): "vit_tiny_patch16_224",
    (16, 384, 12, 6): "vit_small_patch16_224",
    (16, 768, 12, 12): "vit_base_patch16_224",
    (16, 1024, 24, 16): "vit_large_patch16_224",
    (14, 1280, 32, 16): "vit_huge_patch14_224",
}


class ViTClassifier(VisionTransformer):
    """timm ViT with ``num_classes`` outputs; ``arch`` describes its encoder."""

    def __init__(
        self, arch: ViTArch, num_classes: int, global_pool: str, drop_path: float = 0.0
    ) -> None:
        super().__init__(**classifier_kwargs(arch, num_classes, global_pool, drop_path))
        self.arch = arch


def classifier_kwargs(
    arch: ViTArch, num_classes: int, global_pool: str, drop_path: float = 0.0
) -> dict:
    """Arguments of ``timm.models.VisionTransformer`` for the classifier of ``arch``."""
    return {
        **arch.timm_kwargs(),
        "num_classes": num_classes,
        "global_pool": global_pool,
        "drop_path_rate": drop_path,
    }


def timm_name(arch: ViTArch) -> str | None:
    """The timm model name whose default architecture is ``arch`` (None for other shapes)."""
    standard = arch.img_size == 224 and arch.in_chans == 3 and arch.mlp_ratio == 4.0
    key = (arch.patch_size, arch.embed_dim, arch.depth, arch.num_heads)
    return TIMM_NAMES.get(key) if standard and arch.qkv_bias else None


def resize_pos_embed(state: dict[str, torch.Tensor], grid_size: int) -> None:
    """Resample ``state["pos_embed"]`` (CLS slot first) to a ``grid_size`` square in place, as
    timm does for another image size (bicubic; the CLS slot is kept)."""
    pos_embed = state["pos_embed"]
    if pos_embed.shape[1] != grid_size**2 + 1:
        state["pos_embed"] = resample_abs_pos_embed(
            pos_embed, new_size=[grid_size, grid_size], num_prefix_tokens=1
        )


def classifier_from_state(
    state: dict[str, torch.Tensor],
    arch: ViTArch,
    num_classes: int,
    global_pool: str,
    drop_path: float = 0.0,
) -> ViTClassifier:
    """A classifier of ``arch`` holding the weights of ``state``, the timm state dict of an
    encoder or of a classifier (with ``head.*``). Position embeddings are resampled to
    ``arch.img_size``. What ``state`` lacks is new, as in facebookresearch/mae's fine-tuning: the
    head (truncated normal, std 2e-5, zero bias) and, for ``avg`` pooling of an encoder,
    ``fc_norm`` (unit weight, zero bias; the encoder's final ``norm`` is not used).

    Raises:
        ValueError: If ``state`` has other keys or shapes than the classifier.
    """
    state = dict(state)
    if global_pool == "avg":  # pooled tokens are normed by fc_norm; timm's ViT has no norm then
        state = {k: v for k, v in state.items() if not k.startswith("norm.")}
    resize_pos_embed(state, arch.grid_size)
    classifier = ViTClassifier(arch, num_classes, global_pool, drop_path)
    try:
        result = classifier.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise ValueError(f"weights do not fit the classifier of {arch}: {err}") from None
    allowed = {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    if not set(result.missing_keys) <= allowed or result.unexpected_keys:
        raise ValueError(
            f"weights do not fit the classifier of {arch} ({global_pool} pooling): missing "
            f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    if "head.weight" in result.missing_keys:
        with torch.no_grad():
            trunc_normal_(classifier.head.weight, std=HEAD_INIT_STD)
            classifier.head.bias.zero_()
    return classifier


def classifier_record(model: ViTClassifier) -> dict:
    """What ``classifier.pt`` holds: the timm state dict and how to rebuild the model."""
    return {
        "model": model.state_dict(),
        "arch": dataclasses.asdict(model.arch),
        "num_classes": model.num_classes,
        "global_pool": model.global_pool,
        "timm_name": timm_name(model.arch),
    }
