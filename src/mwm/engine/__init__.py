"""Pieces every training stage shares, below both pretraining (``mwm.train``) and transfer (``mwm.transfer``):

* :mod:`.runtime`: the device / precision / Lightning Fabric factory (``make_fabric`` for pretraining's hardware
  options, ``device_fabric`` for the one-device transfer tasks).
* :mod:`.schedules`: per-step lr multipliers (linear warmup, then cosine or steps) as picklable ``LambdaLR``
  lambdas.
* :mod:`.seeding`: seeding Python, NumPy and torch in one call.

Nothing here imports from ``mwm.train`` or ``mwm.transfer``.
"""

from .runtime import PRECISIONS, Precision, check_device, device_fabric, make_fabric, split_device
from .schedules import LrSchedule, build_scheduler, lr_factor
from .seeding import seed_all

__all__ = ["PRECISIONS", "Precision", "check_device", "device_fabric", "make_fabric", "split_device", "LrSchedule",
           "build_scheduler", "lr_factor", "seed_all"]
