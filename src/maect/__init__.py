"""maect: masked image modelling meets contrastive learning (MAE, MAE-CT, CAN) on one ViT."""

from maect.checkpoints import load_classifier, load_encoder

__version__ = "0.1.0"
__all__ = ["__version__", "load_classifier", "load_encoder"]
