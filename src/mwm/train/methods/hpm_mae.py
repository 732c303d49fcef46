"""HPM on MAE (Wang et al., "Hard Patches Mining for Masked Image Modeling", CVPR 2023): the official code's own
backbone (``Haochen-Wang409/HPM``). What :mod:`.hpm` does on SparK, on a timm ViT:

* the loss predictor is a second transformer decoder beside the reconstructor, fed the **same decoder input** —
  embedded visible tokens, mask tokens, position embeddings (``models_mae_learn_loss.py``, ``forward_decoder``:
  ``loss_pred = x.clone()`` before the reconstructor's blocks; ``decoder_blocks_losspred`` →
  ``decoder_norm_losspred`` → ``decoder_pred_losspred(...).mean(-1)``: one scalar per patch). Its blocks have the
  MAE decoder's own depth, width and heads (``decoder_depth``/``decoder_dim``/``decoder_heads``; the official code
  builds it with ``decoder_depth`` blocks of ``decoder_embed_dim`` too). Its head is ``Linear(dim, 1)``: the
  official ``Linear(dim, p²·3)`` followed by a mean over its outputs is a linear map to one scalar as well;
* its training signal is :func:`~.hpm.relative_loss` against the student's detached per-patch normalized-pixel
  MSE on its masked patches (``engine_pretrain.py``: ``forward_learning_loss(outs['loss_pred'][:, -mask_num:],
  …, loss_outs['matrix'].detach(), relative=True)``); total loss = reconstruction + weight·relative (weight 1);
  nothing but the target is detached, so the predictor's gradient reaches the encoder and the decoder embedding;
* the mask: the EMA teacher (:class:`timm.utils.ModelEmaV3`, decay 0.999 → 0.9999 over the first 100 epochs,
  :mod:`.guided`) predicts the loss of every patch of the whole unmasked image under no_grad
  (``model_ema.ema(samples, mask=visible_mask)`` with nothing masked), and the student masks the ⌊M·α_t⌋ patches it
  predicts hardest plus the rest of the M at random (``generate_mask``, α_t = 0.5·(epoch+1)/epochs), vectorised by
  :func:`~mwm.masking.policies.hard_then_random_keep`. Every image keeps exactly ``N − M`` tokens, the random
  strategy's count, so MAE's token gather takes the count from the config (no host sync).

Ours vs theirs: the official decoder works on ``[cls, visible…, masked…]`` (mask tokens appended, never put back in
patch order; ``pos_embed`` added per slot); ours restores patch order first (:class:`~mwm.mim.MAEDecoder`) — the
same set of tokens with the same position embeddings, and attention is order-equivariant, so the outputs per patch
are the same function. The MAE decoder defaults to mwm's light 192 × 2 (``decoder_dim``/``decoder_depth``; the
official 512 × 8), and the predictor follows it. The pairwise loss uses ``logsigmoid`` (:mod:`.hpm`).

>>> cfg = PretrainConfig(data=..., out=..., model={"method": "hpm_mae", "arch": "vit_small_patch16_224", "size": 224})
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field
from timm.models.vision_transformer import Block
from torch import nn

from ...mim.mae import MAE, _init_linears_and_norms
from ...mim.loss import unpatchify
from ...mim import MAEConfig
from .guided import GuidedMAEConfig, TeacherGuidedMAE, base_model, patch_errors
from .hpm import relative_loss
from .mim import MaskedViews
from .registry import register_method

if TYPE_CHECKING:
    from ..config import PretrainConfig

__all__ = ["HPMMAEConfig", "HPMMAE", "ViTLossPredictor", "HPMMAEMethod"]


class HPMMAEConfig(GuidedMAEConfig):
    """HPM on MAE: MAE's model fields (the predictor copies the decoder's depth / width / heads), the hard-patch
    schedule, the teacher EMA and the predictor's weight."""

    method: Literal["hpm_mae"] = "hpm_mae"
    predictor_weight: float = Field(default=1.0, ge=0, description="weight of the loss predictor's relative loss "
                                    "(HPM: 1)")


class ViTLossPredictor(nn.Module):
    """HPM's loss predictor: ``depth`` timm transformer blocks of width ``dim``, LayerNorm and a linear head to one
    scalar per token. ``forward(x (B, P + N, dim)) → (B, N)`` (prefix tokens dropped), x the MAE decoder's input
    (:meth:`~mwm.mim.MAEDecoder.inputs`). MAE's init (xavier-uniform linears, zero biases, unit LayerNorms), as
    the official ``initialize_weights`` applies to every module."""

    def __init__(self, dim: int, depth: int, heads: int, num_prefix_tokens: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio, qkv_bias=True,
                                            norm_layer=partial(nn.LayerNorm, eps=1e-6)) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, 1)
        _init_linears_and_norms(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pred(self.norm(self.blocks(x)))[:, self.num_prefix_tokens:, 0]


class HPMMAE(MAE):
    """MAE + a loss predictor. ``forward(x, keep, n_visible=None)`` → ``loss`` (reconstruction + weight · relative
    loss), ``recon_loss``, ``rank_loss``, ``pred`` (the image, target space) and ``loss_pred`` (B, h, w);
    :meth:`predict_loss` is the teacher's pass over the whole image (every token, no reconstruction)."""

    def __init__(self, mae: MAE, heads: int, predictor_weight: float = 1.0):
        super().__init__(mae.encoder, mae.decoder, norm_pix=mae.norm_pix, eps=mae.eps)
        dec = mae.decoder
        self.predictor = ViTLossPredictor(dec.embed.out_features, len(dec.blocks), heads, dec.num_prefix_tokens)
        self.predictor_weight = predictor_weight

    def forward(self, x: torch.Tensor, keep: torch.Tensor, n_visible: int | None = None) -> dict[str, torch.Tensor]:
        tokens, ids_restore = self.encoder(x, keep, n_visible)
        dec_in = self.decoder.inputs(tokens, ids_restore)
        patches = self.decoder.head(dec_in)
        pred = unpatchify(patches, self.encoder.stride, keep.shape[-2:], patches.shape[-1] // self.encoder.stride ** 2)
        loss_pred = self.predictor(dec_in)  # (B, N)
        err = patch_errors(x, pred, keep.shape[-2:], self.norm_pix, self.eps)  # (B, N), float32
        masked = ~keep.flatten(1)
        recon = (err * masked).sum() / masked.sum().clamp_min(1)  # = masked_mse(x, pred, keep)
        rank = relative_loss(loss_pred, err.detach(), masked)
        return {"loss": recon + self.predictor_weight * rank, "recon_loss": recon, "rank_loss": rank, "pred": pred,
                "loss_pred": loss_pred.view(keep.shape[0], *keep.shape[-2:])}

    def predict_loss(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted loss of every patch of the unmasked image (B, h, w): every token encoded, none masked."""
        tokens, ids_restore = self.encoder(x)
        out = self.predictor(self.decoder.inputs(tokens, ids_restore))
        return out.view(x.shape[0], *self.encoder.grid_size)


class HPMMAEMethod(TeacherGuidedMAE):
    """HPM on MAE (module doc): the teacher's predicted losses pick the hard patches."""

    reference_ramp_epochs = 100  # engine_pretrain.py: the decay ramps over epochs 0–99 whatever the run's length

    def __init__(self, cfg: "PretrainConfig"):
        mae = base_model(cfg.model, MAEConfig)
        super().__init__(cfg, HPMMAE(mae, cfg.model.heads, cfg.model.predictor_weight))

    def teacher_scores(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.teacher.module.predict_loss(x), None

    def training_step(self, views: MaskedViews) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self.net(views.x, views.keep, **self.forward_kwargs())
        logs = self._mask_logs(out["loss"].detach(), views.stats)
        logs.update(recon_loss=out["recon_loss"].detach(), rank_loss=out["rank_loss"].detach())
        return out["loss"], logs


register_method("hpm_mae", HPMMAEConfig, HPMMAEMethod,
                help="HPM on MAE, timm ViTs + a transformer loss predictor; hardest predicted patches masked")
