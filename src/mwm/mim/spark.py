"""SparK: sparse masked modeling for CNNs (Tian et al., ICLR 2023) = sparse encoder + light decoder + masked loss.

>>> model = create_mim_model(SparKConfig(arch="resnet50", size=224))
>>> keep, _ = masker(batch=B, grid=model.grid(224), device=x.device)     # bool (B, 1, 7, 7), True = visible
>>> out = model(x, keep); out["loss"].backward()

A finer mask grid (``mask_stride``, e.g. 8 at 64 px: 8 × 8 cells on a stride-32 ResNet) changes what is masked,
not the network: the masker draws at ``size // mask_stride``, the encoder keeps a level's cell active when any
of its sub-cells is visible (masked pixels stay zero everywhere), the decoder fills each level's inactive cells
with its mask token, and the loss scores the masked ``mask_stride``-px patches with per-patch normalization.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator
from torch import nn

from .decoder import LightDecoder
from .encoder import MaskedModel, SparseEncoder, check_mask_stride, encoder_state_dict_for_timm
from .loss import dump_without_default_target, target_field, masked_mse, reconstruct, target_channels, target_for

__all__ = ["SparK", "SparKConfig", "create_spark", "SPARK_DROP_PATH", "spark_drop_path"]

# SparK's per-model pretraining drop-path rates (pretrain/models/__init__.py, pretrain_default_model_kwargs);
# models it does not list (resnet18/34, convnext_tiny, …) pretrain without drop path there
SPARK_DROP_PATH = {"resnet50": 0.05, "resnet101": 0.08, "resnet152": 0.10, "resnet200": 0.15,
                   "convnext_small": 0.2, "convnext_base": 0.3, "convnext_large": 0.4}


def spark_drop_path(arch: str, rate: float | None = None) -> float:
    """The encoder's drop-path rate: ``rate`` when given, else SparK's for ``arch`` (0 for models it lacks)."""
    return float(rate) if rate is not None else SPARK_DROP_PATH.get(arch, 0.0)


class SparKConfig(BaseModel):
    """A SparK model (Tian et al. 2023). ``densify_norm`` defaults to the backbone's kind (BN for BatchNorm
    backbones, LN for ConvNeXt, as SparK).

    ``decoder_width`` 256 (SparK: 768 for every backbone at ImageNet 224). The decoder is extra work a dense
    classification step does not do; at 256 a ResNet-18@64 / ResNet-50@128 pretraining step costs ≈1.4× /
    ≈1.3× a dense step on CPU, at 512 a ResNet-50 step ≈1.6× (``benchmarks/bench_pretrain_step.py``).
    Raise it for capacity when compute allows. ``size`` is validated against the stride; the model itself
    accepts any input whose sides are multiples of 32."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["spark"] = "spark"
    arch: str = Field(default="resnet50", description="timm CNN: resnet18/34/50/101, resnext*, convnext_*")
    size: int = Field(default=224, gt=0, description="input side in pixels; a multiple of the encoder stride (32)")
    in_chans: int = Field(default=3, ge=1)
    decoder_width: int = Field(default=256, ge=32, description="decoder width at stride 32; halves per level")
    decoder_block: Literal["light", "spark"] = "light"
    densify_norm: Literal["bn", "ln", "none"] | None = None
    densify_kernel: Literal[1, 3] = Field(default=3, description="densify projection kernel below the top level")
    decoder_channels_last: bool = True
    norm_pix: bool = True
    eps: float = Field(default=1e-6, gt=0)
    drop_path_rate: float | None = Field(default=None, ge=0, lt=1, description="encoder stochastic depth while "
                                         "pretraining (not exported); default: SparK's per model (resnet50 0.05, "
                                         "resnet101 0.08, convnext_base 0.3 …; 0 for models it lacks)")
    pretrained: bool = False
    mask_stride: int | None = Field(default=None, ge=2, description="pixels per mask cell; default: the encoder's "
                                    "output stride (32). A divisor of it (16, 8, 4) gives a finer grid at the same "
                                    "cost: 8 at 64 px → 8 × 8 cells")
    coarse_active: Literal["any", "all"] = Field(default="any", description="with a finer mask_stride: a cell of "
                                                 "a coarser level is active when any (default) or all of its "
                                                 "mask cells are visible ('all' keeps the deep levels sparse)")
    target: Literal["pixels", "meijering"] = target_field()

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        return dump_without_default_target(handler(self))  # the pinned dump of configs without a target

    @model_validator(mode="after")
    def _size(self) -> "SparKConfig":
        if self.size % 32:
            raise ValueError(f"size {self.size} must be a multiple of 32 (the CNN's output stride)")
        check_mask_stride(self.mask_stride, 32, self.arch)  # the real stride is checked again when the model is built
        return self


class SparK(MaskedModel):
    """``forward(x (B, C, H, W), keep bool (B, 1, h, w)) → {"loss": 0-d tensor, "pred": (B, C, H, W)}``.

    ``pred`` is in target space (per-patch normalized pixels when ``norm_pix``); :meth:`reconstruct` maps it back.
    ``stride`` and :meth:`grid` tell a masker the keep-mask grid.
    """

    def forward(self, x: torch.Tensor, keep: torch.Tensor, target: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        """``target``: the map (B, 1, H, W) a map-target model reconstructs (``model.target``); default ``x``."""
        feats = self.encoder(x, keep)
        pred = self.decoder(feats, keep, self.encoder.coarse_active)
        return {"loss": masked_mse(target_for(x, pred, target), pred, keep, self.norm_pix, self.eps), "pred": pred}

    def reconstruct(self, x: torch.Tensor, pred: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return reconstruct(x, pred, keep, self.norm_pix, self.eps)

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder as a timm state_dict (classifier keys missing only)."""
        return encoder_state_dict_for_timm(self.encoder)

    def convert_sync_batchnorm(self, process_group=None) -> "SparK":
        """Synchronised BatchNorm for multi-GPU training, done right for the sparse parts: the encoder's and the
        densify step's masked BatchNorms all-reduce their visible-position sums; the decoder's dense blocks become
        ``nn.SyncBatchNorm``. Never call ``nn.SyncBatchNorm.convert_sync_batchnorm`` on the whole model: it would
        replace the masked BatchNorms with dense ones (normalizing over the holes again)."""
        import torch.distributed as dist

        from .sparse import MaskedBatchNorm2d

        group = process_group if process_group is not None else dist.group.WORLD
        self.encoder.convert_sync_batchnorm(group)
        for m in self.decoder.densify_norms:
            if isinstance(m, MaskedBatchNorm2d):
                m._mwm_sync_group = group
        self.decoder.blocks = nn.SyncBatchNorm.convert_sync_batchnorm(self.decoder.blocks, process_group)
        return self


def create_spark(cfg: SparKConfig) -> SparK:
    kwargs = {"in_chans": cfg.in_chans}
    dpr = spark_drop_path(cfg.arch, cfg.drop_path_rate)
    if dpr:
        kwargs["drop_path_rate"] = dpr
    enc = SparseEncoder(cfg.arch, pretrained=cfg.pretrained, mask_stride=cfg.mask_stride,
                        coarse_active=cfg.coarse_active, **kwargs)
    enc.grid(cfg.size)  # validates the size against the real stride
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in enc.modules())
    norm = cfg.densify_norm or ("bn" if has_bn else "ln")
    dec = LightDecoder(enc.channels, enc.reductions, width=cfg.decoder_width,
                       out_chans=target_channels(cfg.target, cfg.in_chans), densify_norm=norm,
                       block=cfg.decoder_block, densify_kernel=cfg.densify_kernel,
                       channels_last=cfg.decoder_channels_last)
    return SparK(enc, dec, norm_pix=cfg.norm_pix, eps=cfg.eps)
