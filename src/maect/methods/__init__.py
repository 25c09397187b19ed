"""One LightningModule per method; shared plumbing lives in :mod:`maect.methods.base`."""

from maect.methods.base import PretrainMethod
from maect.methods.can import CAN
from maect.methods.mae import MAE

METHOD_CLASSES: dict[str, type[PretrainMethod]] = {"mae": MAE, "can": CAN}

__all__ = ["CAN", "MAE", "METHOD_CLASSES", "PretrainMethod"]
