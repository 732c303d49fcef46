"""Stage 2 training: (guided) masked image modeling on Lightning Fabric, and encoder export.

>>> from mwm.train import PretrainConfig, pretrain
>>> summary = pretrain(PretrainConfig(data="scans.npz", out="run/", model={"arch": "resnet18", "size": 64}))

Files, one concern each: ``config`` (PretrainConfig), ``methods`` (PretrainMethod and the method registry: SparK,
MAE), ``data`` (decode, ROI join, sampler), ``augment`` (paired crop/flip), ``optim`` (lr rule, optimizer,
schedule), ``loop`` (the trainer), ``checkpoint`` (exact resume), ``metrics`` (CSV + TensorBoard), ``recon``
(preview PNGs), ``export`` (timm / Detectron2 weights), ``summary`` (PretrainSummary, summary.json),
``pretrain`` (the Fabric launch).
"""

from .augment import paired_random_resized_crop, transform_boxes
from .config import AugmentConfig, PretrainConfig
from .export import check_encoder, export_encoder
from .methods import PretrainMethod, method_names, register_method
from .optim import effective_batch, resolve_lr
from .pretrain import pretrain
from .summary import PretrainSummary, read_summary

__all__ = ["PretrainConfig", "AugmentConfig", "pretrain", "paired_random_resized_crop", "transform_boxes",
           "resolve_lr", "effective_batch", "export_encoder", "check_encoder", "PretrainMethod", "register_method",
           "method_names", "PretrainSummary", "read_summary"]
