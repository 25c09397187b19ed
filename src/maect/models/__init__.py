"""Model building blocks: masked ViT encoder, MAE decoder, heads, nearest-neighbour queue."""

from maect.models.decoder import MAEDecoder
from maect.models.masking import random_masking
from maect.models.patches import patchify, unpatchify
from maect.models.vit import MaskedViT, build_encoder

__all__ = ["MAEDecoder", "MaskedViT", "build_encoder", "patchify", "random_masking", "unpatchify"]
