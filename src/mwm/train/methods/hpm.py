"""HPM — Hard Patches Mining (Wang et al., "Hard Patches Mining for Masked Image Modeling", CVPR 2023) on SparK.

The model learns to predict its own per-patch reconstruction loss, and an EMA copy of it chooses the patches to
mask: the ones it predicts hardest. From the official code (``Haochen-Wang409/HPM``):

* a loss predictor: a second decoder beside the reconstructor, fed the same decoder input, one scalar per patch
  (``models_mae_learn_loss.py``, ``decoder_blocks_losspred`` … ``decoder_pred_losspred(...).mean(-1)``). Here: SparK's
  densified features (shared with the reconstructing decoder) → the light decoder's upsampling blocks down to the
  mask grid → 3×3 conv, BN, ReLU → 1×1 conv to one channel, i.e. one scalar per mask cell; its gradient reaches
  the encoder as HPM's does (nothing is detached on the student's side);
* its training signal: the relative loss (``forward_learning_loss(..., relative=True)``, HPM's default): for every
  ordered pair (i, j) of masked patches of an image with target losses ``t_j > t_i`` the binary cross-entropy of
  ``σ(p_j − p_i)`` being 1 (and 0 when ``t_j < t_i``; ties are skipped), summed over the batch and divided by the
  number of untied pairs; the targets are the student's detached per-patch reconstruction losses on its masked
  patches (``loss_outs['matrix'].detach()``, normalized-pixel MSE). Total loss = reconstruction + this, weight 1
  (``engine_pretrain.py``);
* the mask: the EMA model predicts the loss of every patch of the whole, unmasked image (``model_ema.ema(samples,
  mask=visible_mask)`` with nothing masked, under no_grad) and ``generate_mask`` masks the ⌊M·α_t⌋ patches it predicts
  hardest plus the rest of the M at random, α_t = 0.5·(epoch+1)/epochs; EMA decay 0.999 → 0.9999 over the first
  100 epochs (:mod:`.guided`).

Ours vs theirs: vectorised over the batch on the device (theirs: a per-image loop with a numpy shuffle); the
pairwise loss uses ``logsigmoid`` (theirs ``log(σ + 1e-6)``, which caps a pair's loss at ≈13.8); the predictor is a
SparK-style light CNN decoder (theirs: 8 transformer blocks on MAE); the official code's MAE (ViT) variant is
:mod:`.hpm_mae` (``hpm_mae``).

>>> cfg = PretrainConfig(data=..., out=..., model={"method": "hpm", "arch": "resnet18", "size": 64, "mask_stride": 8})
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ...mim.decoder import spark_decoder_init
from ...mim.spark import SparK
from ...mim import SparKConfig
from .guided import GuidedSparKConfig, TeacherGuidedSparK, base_model, patch_errors
from .mim import MaskedViews
from .registry import register_method

if TYPE_CHECKING:
    from ..config import PretrainConfig

__all__ = ["HPMConfig", "HPMSparK", "LossPredictor", "HPMMethod", "relative_loss"]


class HPMConfig(GuidedSparKConfig):
    """HPM on SparK: SparK's model fields, the hard-patch schedule, the teacher EMA and the predictor's weight."""

    method: Literal["hpm"] = "hpm"
    predictor_weight: float = Field(default=1.0, ge=0, description="weight of the loss predictor's relative loss "
                                    "(HPM: 1)")


def relative_loss(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """HPM's relative (pairwise ranking) loss, ``forward_learning_loss(relative=True)``.

    Args:
        pred: predicted losses (B, L).
        target: the true per-patch losses (B, L), detached.
        valid: bool (B, L): the patches that take part (the masked ones).

    Returns:
        0-d: Σ over images and ordered pairs (i, j) of valid patches with t_j ≠ t_i of
        −log σ(±(p_j − p_i)) (+ when t_j > t_i), divided by the number of such pairs (0 when there is none).
    """
    pred, target = pred.float(), target.float()
    d = pred.unsqueeze(1) - pred.unsqueeze(2)  # [b, i, j] = p_j − p_i
    pair = valid.unsqueeze(1) & valid.unsqueeze(2)
    pos = (target.unsqueeze(1) > target.unsqueeze(2)) & pair
    neg = (target.unsqueeze(1) < target.unsqueeze(2)) & pair
    loss = -(pos * F.logsigmoid(d) + neg * F.logsigmoid(-d))
    return loss.sum() / (pos | neg).sum().clamp_min(1)


class LossPredictor(nn.Module):
    """The second light decoder: dense decoder inputs (top level first, as :meth:`LightDecoder.densify` gives them)
    → one scalar per mask cell (B, h, w). Upsampling blocks of the reconstructing decoder's kind and widths from the
    top stride down to the mask stride (none when they are equal), then 3×3 conv, BN, ReLU and a 1×1 conv."""

    def __init__(self, decoder: nn.Module, mask_stride: int):
        super().__init__()
        n_up = round(math.log2(decoder.stride // mask_stride))
        widths = [decoder.width // 2 ** i for i in range(n_up + 1)]
        block = type(decoder.blocks[0])  # the decoder's own block kind ("light" or "spark")
        self.blocks = nn.ModuleList([block(widths[i], widths[i + 1]) for i in range(n_up)])
        c = widths[-1]
        self.head = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                                  nn.Conv2d(c, 1, 1))
        # SparK's decoder init over every module (norms too: BatchNorm's defaults are already ones / zeros)
        spark_decoder_init(self.modules())

    def forward(self, dense: list[torch.Tensor]) -> torch.Tensor:
        x = dense[0]
        for i, blk in enumerate(self.blocks):
            if i > 0:
                x = x + dense[i]
            x = blk(x)
        if 0 < len(self.blocks) < len(dense):
            x = x + dense[len(self.blocks)]  # the skip at the mask stride
        return self.head(x)[:, 0]


class HPMSparK(SparK):
    """SparK + a loss predictor. ``forward(x, keep)`` → ``loss`` (reconstruction + weight · relative loss),
    ``recon_loss``, ``rank_loss``, ``pred`` (the image, target space) and ``loss_pred`` (B, h, w);
    :meth:`predict_loss` is the teacher's pass over the whole image (nothing masked, no reconstruction)."""

    def __init__(self, spark: SparK, predictor_weight: float = 1.0):
        super().__init__(spark.encoder, spark.decoder, norm_pix=spark.norm_pix, eps=spark.eps)
        self.predictor = LossPredictor(spark.decoder, self.stride)
        self.predictor_weight = predictor_weight

    def _decode(self, dense: list[torch.Tensor]) -> torch.Tensor:
        # LightDecoder.forward after its densify step (densified once here, shared with the predictor)
        dec = self.decoder
        x = dense[0].contiguous(memory_format=torch.channels_last) if dec.channels_last else dense[0]
        for i, blk in enumerate(dec.blocks):
            if 0 < i < len(dense):
                x = x + dense[i]
            x = blk(x)
        return dec.head(x)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> dict[str, torch.Tensor]:
        dense = self.decoder.densify(self.encoder(x, keep), keep, self.encoder.coarse_active)
        pred = self._decode(dense)
        loss_pred = self.predictor(dense)
        err = patch_errors(x, pred, keep.shape[-2:], self.norm_pix, self.eps)  # (B, L)
        masked = ~keep.flatten(1)
        recon = (err * masked).sum() / masked.sum().clamp_min(1)  # = masked_mse(x, pred, keep)
        rank = relative_loss(loss_pred.flatten(1), err.detach(), masked)
        return {"loss": recon + self.predictor_weight * rank, "recon_loss": recon, "rank_loss": rank, "pred": pred,
                "loss_pred": loss_pred}

    def predict_loss(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted loss of every cell of the unmasked image (B, h, w)."""
        keep = torch.ones((x.shape[0], 1, *self.grid(x.shape[-2:])), dtype=torch.bool, device=x.device)
        return self.predictor(self.decoder.densify(self.encoder(x, keep), keep, self.encoder.coarse_active))

    def convert_sync_batchnorm(self, process_group=None) -> "HPMSparK":
        super().convert_sync_batchnorm(process_group)
        self.predictor = nn.SyncBatchNorm.convert_sync_batchnorm(self.predictor, process_group)
        return self


class HPMMethod(TeacherGuidedSparK):
    """HPM on SparK (module doc): the teacher's predicted losses pick the hard patches."""

    reference_ramp_epochs = 100  # engine_pretrain.py: the decay ramps over epochs 0–99 whatever the run's length

    def __init__(self, cfg: "PretrainConfig"):
        spark = base_model(cfg.model, SparKConfig)
        super().__init__(cfg, HPMSparK(spark, cfg.model.predictor_weight))

    def teacher_scores(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.teacher.module.predict_loss(x), None

    def training_step(self, views: MaskedViews) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self.net(views.x, views.keep)
        logs = self._mask_logs(out["loss"].detach(), views.stats)
        logs.update(recon_loss=out["recon_loss"].detach(), rank_loss=out["rank_loss"].detach())
        return out["loss"], logs


register_method("hpm", HPMConfig, HPMMethod, help="HPM, SparK + loss predictor; hardest predicted patches masked")
