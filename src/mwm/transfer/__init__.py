"""Stage 3: transfer of a pretrained encoder to labelled tasks.

Files, one concern each: ``config`` (:class:`TransferConfig`, the options every task shares), ``data`` (labelled
images, masks and splits), ``results`` (:class:`TaskMetrics`, what every task returns and writes to
``metrics.json``), ``selection`` (best-on-val early stopping), ``classify`` (``mwm finetune``: linear probe and full
fine-tuning), ``segment`` (``mwm segment``: UNet decoder on timm features), ``detect`` (``mwm detect``:
torchvision Mask R-CNN). The backbones come from :mod:`mwm.weights`; device, precision, Fabric, the lr schedule and
seeding from :mod:`mwm.engine`; the paired crop + flip from :mod:`mwm.data.paired`.
"""

from ..weights import BackboneSpec, create_backbone, resolve_weights
from .config import TransferConfig
from .data import LabelledData, load_labelled
from .results import TaskMetrics

__all__ = ["BackboneSpec", "resolve_weights", "create_backbone", "LabelledData", "load_labelled", "TransferConfig",
           "TaskMetrics"]
