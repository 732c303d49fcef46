"""Stage 2 training: (guided) masked image modeling on Lightning Fabric, and encoder export.

>>> from mwm.train import PretrainConfig, pretrain
>>> summary = pretrain(PretrainConfig(data="scans.npz", out="run/", model={"arch": "resnet18", "size": 64}))

Files, one concern each: ``config`` (PretrainConfig), ``data`` (decode, ROI join, sampler), ``augment`` (paired
crop/flip), ``optim`` (lr rule, optimizer, schedule), ``loop`` (the training loop), ``checkpoint`` (exact resume),
``metrics`` (CSV + TensorBoard), ``recon`` (preview PNGs), ``export`` (timm / Detectron2 weights),
``pretrain`` (the Fabric launch).
"""

from .augment import paired_random_resized_crop, transform_boxes
from .config import AugmentConfig, PretrainConfig
from .export import check_encoder, export_encoder
from .optim import effective_batch, resolve_lr
from .pretrain import pretrain

__all__ = ["PretrainConfig", "AugmentConfig", "pretrain", "paired_random_resized_crop", "transform_boxes",
           "resolve_lr", "effective_batch", "export_encoder", "check_encoder"]
