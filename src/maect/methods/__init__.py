"""One LightningModule per method; shared plumbing lives in :mod:`maect.methods.base`."""

from maect.methods.base import PretrainMethod
from maect.methods.mae import MAE

METHOD_CLASSES: dict[str, type[PretrainMethod]] = {"mae": MAE}

__all__ = ["MAE", "METHOD_CLASSES", "PretrainMethod"]
