"""maect: masked image modelling meets contrastive learning (MAE, MAE-CT, CAN) on one ViT.

Importing the package is cheap: torch, timm and Lightning load with the first module that needs
them (``maect.load_encoder`` and ``maect.load_classifier`` are resolved on first use), so
``maect --help`` answers at once.
"""

import os
import sys

__version__ = "0.1.0"
__all__ = ["__version__", "load_classifier", "load_encoder"]

# OpenMP threads sleep instead of spinning while they wait: on a shared CPU the default busy-wait
# made training steps many times slower (docs/performance.md). libgomp reads the variable once,
# when torch loads it, so it is set here (before torch) unless the user chose a policy.
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def __getattr__(name: str):
    if name in ("load_encoder", "load_classifier"):
        from maect import checkpoints

        return getattr(checkpoints, name)
    raise AttributeError(f"module 'maect' has no attribute {name!r}")
