"""Memory per device of a training step, computed for ViT-B/16, L/16, H/14 and 2B/14 and each
method (MAE, MAE-CT stage 3, CAN, SimCLR), with and without activation checkpointing.

Two parts, per device:

- **Fixed**: parameters, gradients and AdamW's two moments, 16 bytes per trained parameter, 4 per
  frozen one (MAE-CT's frozen blocks and its encoder EMA), counted on the real modules built on the
  ``meta`` device; on a GPU under ``bf16-mixed`` plus autocast's bfloat16 copy of the weights
  (2 bytes per parameter) during the step.
- **Per image**: what the forward pass stores for the backward pass. A transformer block stores
  about ``c`` bytes per token per channel (the inputs of its norms, linears, attention and GELU);
  summed over the blocks each image goes through (encoder tokens x width x blocks, views and the
  decoder included). ``c`` is measured: ``--fp32-bytes`` from the CPU (float32) rows of
  ``train_step.py --memory`` for ViT-B/16 (66.7 for MAE, 64.8 MAE-CT, 66.6 CAN: one constant fits
  all methods), ``--bf16-bytes`` from the two GPU peaks of ViT-L/16 MAE under bf16 autocast
  (9,217 MiB at batch 64 on an H100, 23,626 MiB at 256 on an H200: 75.0 MiB per image). With
  checkpointing a block keeps only its float32 input (4 bytes per token per channel) and
  recomputes one block at a time in the backward pass (``c`` bytes per token per channel of that
  block, counted once).

The model-independent part (patch embedding, masks, loss) is left out: 3 MiB per image of
ViT-B/16 MAE measured in float32, under 4 % without checkpointing. ``--gpu-gib`` sets the memory
the "images per GPU" column divides (before allocator fragmentation and workspace).

Usage::

    python benchmarks/memory_table.py [--gpu-gib 80]
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
from train_step import method_configs

from maect.config import RunConfig
from maect.methods.base import arch_from_config
from maect.methods.can import build_projector
from maect.methods.mae import build_autoencoder
from maect.methods.maect import frozen_block_count
from maect.models.heads import NNCLRPredictor, NNCLRProjector
from maect.models.masking import num_visible
from maect.models.vit import MaskedViT

MODELS = {
    "vit_b16": "ViT-B/16",
    "vit_l16": "ViT-L/16",
    "vit_h14": "ViT-H/14",
    "vit_2b": "ViT-2B/14 (2560x24)",
}
METHODS = {"mae": "MAE", "maect": "MAE-CT stage 3", "can": "CAN", "simclr": "SimCLR"}
MIB = 2**20


@dataclasses.dataclass
class Step:
    """Parameter counts and block traffic of one method on one model."""

    trained: int  # parameters with AdamW state
    frozen: int  # parameters without (frozen blocks, EMA copies)
    token_channels: int  # sum over the blocks an image passes of tokens x width
    largest_block: int  # tokens x width of the biggest single block pass of one image


def _count(module: torch.nn.Module) -> tuple[int, int]:
    trained = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return trained, sum(p.numel() for p in module.parameters()) - trained


def step_of(method: str, cfg: RunConfig) -> Step:
    """Counts for ``method`` under ``cfg``; modules built on the ``meta`` device (no memory)."""
    m = cfg.model
    tokens = m.img_size**2 // m.patch_size**2
    with torch.device("meta"):
        encoder = MaskedViT(arch_from_config(cfg))
        decoder = build_autoencoder(cfg, encoder, True).decoder if method != "maect" else None
    if method == "maect":
        frozen_blocks = frozen_block_count(cfg)
        width = m.embed_dim * (2 if cfg.maect.pooling == "cls+mean" else 1)
        t = cfg.maect
        heads = [
            NNCLRProjector(width, t.proj_hidden_dim, t.proj_dim),
            NNCLRPredictor(t.proj_dim, t.pred_hidden_dim, t.proj_dim),
        ]
        per_block = sum(p.numel() for p in encoder.blocks[0].parameters())
        total = sum(p.numel() for p in encoder.parameters())
        head = sum(p.numel() for h in heads for p in h.parameters())
        projector = sum(p.numel() for p in heads[0].parameters())
        trained_blocks = m.depth - frozen_blocks
        trained = trained_blocks * per_block + 2 * m.embed_dim + head  # + the final norm
        # frozen: bottom blocks and embeddings, the encoder EMA and the target projector
        frozen = (total - trained_blocks * per_block - 2 * m.embed_dim) + total + projector
        channels = 2 * (tokens + 1) * m.embed_dim * trained_blocks
        return Step(trained, frozen, channels, 2 * (tokens + 1) * m.embed_dim)
    trained, frozen = _count(encoder)
    c = cfg.can if method in ("can", "simclr") else None
    views = 2 if c is not None else 1
    ratio = cfg.mae.mask_ratio if c is None else c.mask_ratio
    visible = num_visible(tokens, ratio) + 1
    channels = views * visible * m.embed_dim * m.depth
    largest = views * visible * m.embed_dim
    if decoder is not None and (c is None or c.weight_reconstruction > 0 or c.weight_denoising > 0):
        dec_trained, dec_frozen = _count(decoder)
        trained, frozen = trained + dec_trained, frozen + dec_frozen
        channels += views * (tokens + 1) * m.decoder_dim * m.decoder_depth
        largest = max(largest, views * (tokens + 1) * m.decoder_dim)
    if c is not None and c.weight_contrastive > 0:
        trained += sum(p.numel() for p in build_projector(c, m.embed_dim).parameters())
    return Step(trained, frozen, channels, largest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fp32-bytes", type=float, default=66.6, help="c, float32 (CPU)")
    parser.add_argument("--bf16-bytes", type=float, default=38.6, help="c, bf16 autocast (GPU)")
    parser.add_argument("--gpu-gib", type=float, default=80.0, help="GPU memory for the batch")
    args = parser.parse_args()
    print(
        "| model | method | trained / frozen params (M) | fixed GiB fp32 / bf16 | MiB per image "
        "fp32 / bf16 | with checkpointing (kept + one block recomputed) fp32 / bf16 | images per "
        f"{args.gpu_gib:.0f} GiB GPU, bf16: plain / checkpointed |"
    )
    print("|---|---|---|---|---|---|---|")
    for model, model_name in MODELS.items():
        overrides = ["maect.frozen_blocks=null"] if model == "vit_2b" else []
        configs = method_configs(model, 256, overrides)
        for method, method_name in METHODS.items():
            step = step_of(method, configs[method])
            fixed32 = (16 * step.trained + 4 * step.frozen) / 2**30
            fixed16 = fixed32 + 2 * (step.trained + step.frozen) / 2**30
            plain = [c * step.token_channels / MIB for c in (args.fp32_bytes, args.bf16_bytes)]
            recompute = [c * step.largest_block / MIB for c in (args.fp32_bytes, args.bf16_bytes)]
            kept = 4 * step.token_channels / MIB
            checkpointed = [kept + r for r in recompute]
            room = (args.gpu_gib - fixed16) * 1024
            fits = [max(0, int(room // per_image)) for per_image in (plain[1], checkpointed[1])]
            print(
                f"| {model_name} | {method_name} | {step.trained / 1e6:.0f} / "
                f"{step.frozen / 1e6:.0f} | {fixed32:.1f} / {fixed16:.1f} | {plain[0]:.0f} / "
                f"{plain[1]:.0f} | {checkpointed[0]:.1f} / {checkpointed[1]:.1f} | "
                f"{fits[0]} / {fits[1]} |"
            )


if __name__ == "__main__":
    main()
