"""Masked image modeling: SparK for timm CNNs (sparse encoder + light UNet decoder) and MAE for timm ViTs.

>>> from mwm.mim import SparKConfig, create_mim_model
>>> model = create_mim_model(SparKConfig(arch="resnet50", size=224))
>>> keep, _ = masker(batch=x.shape[0], grid=model.grid(x.shape[-2:]), device=x.device)
>>> out = model(x, keep)                      # {"loss": 0-d tensor, "pred": (B, C, H, W)}
>>> SparKConfig(arch="resnet18", size=64, mask_stride=8)   # a finer mask grid: 8 × 8 cells, same network
>>> out["loss"].backward()
>>> sd = model.encoder_state_dict()           # timm.create_model(arch).load_state_dict(sd, strict=False)
"""

from .decoder import LightDecoder
from .encoder import SparseEncoder, classifier_keys, encoder_state_dict_for_timm, grid_for, to_detectron2
from .loss import masked_mse, patchify, reconstruct, unpatchify
from .mae import MAE, MAEConfig, MAEDecoder, ViTEncoder, create_mae, visible_index
from .registry import MIM_MODELS, create_mim_model, mim_config, register_mim_model
from .sparse import (MaskContext, MaskedBatchNorm2d, UnsupportedLayerError, keep_at, masked_batch_norm, sparsify,
                     upsample_keep)
from .spark import SparK, SparKConfig, create_spark

__all__ = ["SparK", "SparKConfig", "create_spark", "MAE", "MAEConfig", "create_mae", "ViTEncoder", "MAEDecoder",
           "visible_index", "SparseEncoder", "LightDecoder", "encoder_state_dict_for_timm", "to_detectron2",
           "classifier_keys", "grid_for", "masked_mse", "reconstruct", "patchify", "unpatchify", "MIM_MODELS",
           "create_mim_model", "mim_config", "register_mim_model", "MaskContext", "MaskedBatchNorm2d",
           "UnsupportedLayerError", "masked_batch_norm", "sparsify", "upsample_keep", "keep_at"]
