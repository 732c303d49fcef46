"""Stage 3: transfer of a pretrained encoder to labelled tasks.

Files, one concern each: ``backbone`` (timm model from ``encoder.pth`` / random / a timm hub name), ``data``
(labelled images, masks and splits), ``classify`` (``mwm finetune``: linear probe and full fine-tuning),
``segment`` (``mwm segment``: UNet decoder on timm features), ``detect`` (``mwm detect``: torchvision Mask R-CNN).
"""

from ..weights import BackboneSpec, create_backbone, resolve_weights
from .data import LabelledData, load_labelled

__all__ = ["BackboneSpec", "resolve_weights", "create_backbone", "LabelledData", "load_labelled"]
