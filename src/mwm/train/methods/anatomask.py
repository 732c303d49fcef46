"""AnatoMask (Li et al., "AnatoMask: Enhancing Medical Image Segmentation with Reconstruction-guided Self-masking",
ECCV 2024) on SparK, in 2D: the version the Mask What Matters paper compares against. The official code
(``ricklisz/AnatoMask``) is a 3D SparK inside nnU-Net; the rule carries over per 2D mask cell.

From the official code (``nnunetv2/training/nnUNetTrainer/variants/pretrain/AnatoMask.py`` and the training script
``pretrain_AntoMask.py`` beside it):

* no loss predictor: an EMA copy of the model (``model_ema.ema``) reconstructs the image under its own independent
  random mask (``model.mask(...)``, mask ratio 0.6), and its **actual** per-patch L2 error, times "was masked"
  (``l2_loss * non_active``: 0 on the patches it saw), ranks the patches;
* ``SparK.generate_mask``: mask the ⌊M·α_t⌋ patches of highest teacher error plus the rest of the M at random, α_t =
  0.5·(epoch+1)/(epochs−1) there (we use HPM's /epochs: :mod:`.guided`);
* the student is trained with SparK's loss only (``forward_loss``: per-patch normalized MSE on its masked patches);
  the EMA decay ramps 0.999 → 0.9999 over the first quarter of the epochs, the teacher is updated every step.

Ours vs theirs: vectorised; the teacher's visible cells are excluded from the hard set explicitly (theirs gives
them error 0, which can only tie with a perfectly reconstructed masked patch); the teacher's error is measured
against the same per-patch normalized target the model is trained to predict (``teacher_target: norm_pix``) — their
script compares the prediction with the raw patches (``(rec1 - inp1) ** 2`` with ``inp1 = patchify(inp)``), which
``teacher_target: pixels`` reproduces.

>>> cfg = PretrainConfig(data=..., out=..., model={"method": "anatomask", "arch": "resnet18", "size": 64})
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field

from ...mim import SparKConfig
from .guided import GuidedSparKConfig, TeacherGuidedSparK, base_model, patch_errors
from .registry import register_method

if TYPE_CHECKING:
    from ..config import PretrainConfig

__all__ = ["AnatoMaskConfig", "AnatoMaskMethod", "teacher_errors"]


class AnatoMaskConfig(GuidedSparKConfig):
    """AnatoMask on SparK: SparK's model fields, the hard-patch schedule, the teacher EMA and the teacher's mask."""

    method: Literal["anatomask"] = "anatomask"
    teacher_ratio: float = Field(default=0.6, gt=0, lt=1, description="mask ratio of the teacher's own random mask "
                                 "(AnatoMask: 0.6)")
    teacher_target: Literal["norm_pix", "pixels"] = Field(
        default="norm_pix", description="the teacher's error against per-patch normalized pixels (what it predicts) "
                                        "or the raw input patches (the official script)")


def teacher_errors(model, x: torch.Tensor, keep: torch.Tensor, target: str = "norm_pix") -> torch.Tensor:
    """The teacher's per-cell L2 error on the cells its ``keep`` masked, 0 on the cells it saw. → (B, h, w)."""
    pred = model(x, keep)["pred"]
    err = patch_errors(x, pred, keep.shape[-2:], norm_pix=target == "norm_pix" and model.norm_pix, eps=model.eps)
    return (err * (~keep.flatten(1))).view(keep.shape[0], *keep.shape[-2:])


class AnatoMaskMethod(TeacherGuidedSparK):
    """AnatoMask on SparK (module doc): the EMA teacher's actual errors under its own random mask pick the hard
    patches; the student's loss is SparK's."""

    reference_ramp_epochs = None  # pretrain_AntoMask.py: the decay ramps over the first epochs // 4

    def __init__(self, cfg: "PretrainConfig"):
        model = base_model(cfg.model, SparKConfig)
        super().__init__(cfg, model)

    def teacher_scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from ...masking.policies import random_keep

        keep = random_keep(x.shape[0], self.grid, self.cfg.model.teacher_ratio, self.ctx.generator, x.device)
        scores = teacher_errors(self.teacher.module, x, keep, self.cfg.model.teacher_target)
        return scores, ~keep[:, 0]


register_method("anatomask", AnatoMaskConfig, AnatoMaskMethod,
                help="AnatoMask (2D), SparK; hardest patches by an EMA teacher's reconstruction error")
