"""AttMask (Kakogeorgiou et al., "What to Hide from Your Students: Attention-Guided Masked Image Modeling",
ECCV 2022) on MAE: an EMA teacher's last-layer [CLS] attention says which tokens matter, and the student masks
the most attended ones. From the official code (``gkakogeorgiou/attmask``):

* importance: the teacher's last block's self-attention on the whole, unmasked image, the [CLS] query's row over
  the patch tokens, averaged over heads (``main_attmask.py``: ``teacher(images, return_attention=True)`` →
  ``teacher_attention[:, :, 0, 1:].mean(1)``; ``models/vision_transformer.py``: the attention of the last block,
  ``softmax(q kᵀ·scale)`` over all tokens, [CLS] included). Here from timm's ViT: a forward pre-hook on
  ``blocks[-1].attn`` takes the block's attention input and :func:`cls_attention` recomputes ``softmax(q_cls kᵀ ·
  scale)`` for the [CLS] query only from the module's own ``qkv``/``q_norm``/``k_norm``, so it holds with timm's
  fused attention (``F.scaled_dot_product_attention`` returns no weights) and costs one (1 × L) row per head;
  the last block's output is never needed, so the teacher stops there;
* ``attmask.py``, ``attention_masking``: AttMask-High masks the ``int(N·r)`` most attended tokens
  (``argsort(attention, descending=True)[:, :N]``), AttMask-Low the least attended;
* AttMask-Hint (``AttMask(..., show_ratio, show_max)`` → ``show_hints``): after High masking, ``int(show_ratio·N)``
  tokens drawn uniformly without replacement (``torch.multinomial`` over a 0/1 mask) among the ``int(show_max·N)``
  most attended are revealed again; the training script passes ``show_ratio = show_max·r`` (``--show_max`` 0.1), so
  ``show_max`` of the masked tokens come back, all from the top ``show_max`` of the image. Here ``show_ratio`` is
  that share of the masked tokens (default: ``show_max``, the script's tie), counted as the script does:
  ``int(show_ratio·r·N)`` revealed from the top ``int(show_max·N)``;
* the teacher: an EMA of the student (iBOT's, momentum 0.996 → 1 by a per-iteration cosine); here the guided
  methods' :class:`~.guided.EMATeacherMixin` (timm ``ModelEmaV3`` after every optimizer step, eval mode), decay
  0.996 → 0.9999 linearly per epoch over the whole run by default (``ema``, ``ema_ramp_epochs``).

Ours vs theirs: the student is MAE (pixel reconstruction of the dropped tokens), not iBOT (self-distillation with
[MASK] tokens); every image is masked (the script's ``--masking_prob 0.5`` leaves half the images of iBOT unmasked
— in MAE an unmasked image has no loss and breaks the equal token count); the mask count is mwm's
``M = N − round(N·(1−r))`` (theirs ``int(N·r)``), the hints' counts are theirs; ties in attention are broken at
random (theirs: the sort's order); the ratio is fixed (theirs: iBOT's per-batch ``pred_ratio`` draw). Every image
keeps ``N − M (+ the hints)`` tokens, so MAE's gather takes the count from the config. Vectorised: one stable sort
per batch (and one more with hints), no host sync.

>>> cfg = PretrainConfig(data=..., out=..., model={"method": "attmask", "arch": "vit_small_patch16_224",
...                      "mode": "hint"}, masking={"strategy": "random", "ratio": 0.75})
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from ...mim import MAEConfig
from .guided import EMATeacherMixin, TeacherEMAFields, _autocast, base_model
from .mim import MAEMethod, MaskedViews
from .registry import register_method

if TYPE_CHECKING:
    from ..config import PretrainConfig

__all__ = ["AttMaskConfig", "AttMaskMethod", "cls_attention", "teacher_cls_attention", "hint_counts",
           "attmask_keep"]


class AttMaskConfig(TeacherEMAFields, MAEConfig):
    """AttMask on MAE: MAE's model fields, the variant, the hints' shares and the teacher's EMA."""

    method: Literal["attmask"] = "attmask"
    ema: tuple[float, float] = Field(default=(0.996, 0.9999), description="the teacher's EMA decay at the first "
                                     "epoch and after the ramp (AttMask/iBOT: 0.996 → 1, cosine per iteration)")
    ema_ramp_epochs: int | None = Field(default=None, ge=0, description="epochs of the linear decay ramp; None: "
                                        "the whole run")
    mode: Literal["high", "hint", "low"] = Field(
        default="high", description="AttMask-High (mask the most attended tokens), -Hint (High, then reveal a few "
                                    "of the top ones), -Low (mask the least attended)")
    show_max: float = Field(default=0.1, gt=0, le=1, description="hint: the hints come from the int(show_max·N) "
                            "most attended tokens (official --show_max 0.1)")
    show_ratio: float | None = Field(default=None, gt=0, le=1, description="hint: share of the masked tokens "
                                     "revealed, int(show_ratio·ratio·N); None: show_max (the official script's)")


def cls_attention(attn: nn.Module, x: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """The [CLS] row of a timm ``Attention`` module's attention, averaged over heads, over the patch tokens.

    Args:
        attn: a timm ``Attention`` (``qkv``, ``num_heads``, ``head_dim``, ``scale``, ``q_norm``, ``k_norm``).
        x: its input (B, L, C), L = prefix + N tokens, [CLS] first.
        num_prefix_tokens: P (class + register tokens); the returned columns are the N patch tokens.

    Returns:
        (B, N) float32: mean over heads of ``softmax(q_cls·kᵀ·scale)`` over all L tokens, columns P.. (as AttMask's
        ``attention[:, :, 0, 1:].mean(1)``: not renormalised over the patches).
    """
    B, L, _ = x.shape
    qkv = attn.qkv(x).reshape(B, L, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0][:, :, :1]), attn.k_norm(qkv[1])  # (B, H, 1, d), (B, H, L, d)
    logits = (q.float() * attn.scale) @ k.float().transpose(-2, -1)  # (B, H, 1, L)
    return logits.softmax(-1)[:, :, 0, num_prefix_tokens:].mean(1)


class _Captured(Exception):
    """Stops the teacher once the last block's attention input is captured (its output is not needed)."""


def teacher_cls_attention(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """AttMask's importance: the last block's [CLS] attention of a :class:`~mwm.mim.ViTEncoder` on every token of
    ``x`` (B, C, H, W). → (B, h, w) float32. The forward runs through the encoder's own token path (patch and
    position embedding, ``norm_pre``, blocks) up to the last block's attention, whose input a pre-hook takes."""
    attn = encoder.model.blocks[-1].attn
    seen: dict[str, torch.Tensor] = {}

    def grab(module, args):
        seen["x"] = args[0]
        raise _Captured

    handle = attn.register_forward_pre_hook(grab)
    try:
        encoder(x)
    except _Captured:
        pass
    finally:
        handle.remove()
    return cls_attention(attn, seen["x"], encoder.num_prefix_tokens).view(x.shape[0], *encoder.grid_size)


def hint_counts(n: int, ratio: float, show_max: float, show_ratio: float | None = None) -> tuple[int, int]:
    """(n_top, n_reveal) of AttMask-Hint for N tokens, as the official script counts them: the hints come from
    the ``int(N·show_max)`` most attended, ``int(show_ratio·ratio·N)`` of them are revealed (``show_ratio`` None:
    ``show_max``; ``main_attmask.py`` passes ``show_max·pred_ratio`` as ``show_ratio``, ``show_hints`` takes
    ``int(show_ratio·n_tokens)``)."""
    share = show_max if show_ratio is None else show_ratio
    return int(n * show_max), int(share * ratio * n)


def _ranks_desc(scores: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """(B, N) → the rank of each entry in descending order (0 = highest), exact, ties in random order: a random
    permutation, then one stable sort by score."""
    B, n = scores.shape
    perm = torch.rand(scores.shape, generator=generator, device=scores.device).argsort(1)
    order = perm.gather(1, torch.argsort(-scores.gather(1, perm), dim=1, stable=True))
    ranks = torch.empty_like(order)
    return ranks.scatter_(1, order, torch.arange(n, device=scores.device).expand(B, n))


def attmask_keep(attention: torch.Tensor, ratio: float, mode: str = "high", show_max: float = 0.1,
                 show_ratio: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """AttMask's keep-mask from per-token attention (``attmask.py``: ``attention_masking`` + ``show_hints``).

    Args:
        attention: (B, h, w) importance (the teacher's [CLS] attention).
        ratio: the mask ratio; ``M = N − round(N·(1−ratio))`` tokens are masked per image.
        mode: ``high`` masks the M most attended, ``low`` the M least attended, ``hint`` masks as ``high`` and then
            reveals ``n_reveal`` tokens drawn uniformly among the ``n_top`` most attended (:func:`hint_counts`;
            needs ``n_top ≤ M`` so every hint was masked).
        show_max, show_ratio: the hints' shares (:func:`hint_counts`).
        generator: for the tie-breaks and the hints' draw.

    Returns:
        keep (B, 1, h, w), True = visible: exactly ``N − M`` (hint: ``N − M + n_reveal``) per image.
    """
    from ...masking.policies import n_keep

    B, h, w = attention.shape
    n = h * w
    m = n - int(n_keep(n, ratio))
    x = attention.reshape(B, n).float()
    rank = _ranks_desc(-x if mode == "low" else x, generator)
    masked = rank < m
    if mode == "hint":
        n_top, n_reveal = hint_counts(n, ratio, show_max, show_ratio)
        if n_top > m or n_reveal > n_top:
            raise ValueError(f"AttMask-Hint reveals {n_reveal} of the {n_top} most attended tokens, which must all "
                             f"be masked (M = {m}): show_max ≤ ratio and show_ratio·ratio ≤ show_max")
        u = torch.rand(x.shape, generator=generator, device=x.device)
        pick = (rank < n_top).float() * 2 + u  # the top tokens first, in random order
        masked.scatter_(1, pick.topk(n_reveal, dim=1).indices, False)
    elif mode != "high" and mode != "low":
        raise ValueError(f"AttMask mode must be high, hint or low, got {mode!r}")
    return (~masked).view(B, 1, h, w)


class AttMaskMethod(EMATeacherMixin, MAEMethod):
    """AttMask on MAE (module doc): an EMA teacher's last-layer [CLS] attention picks the masked tokens."""

    def __init__(self, cfg: "PretrainConfig"):
        from ...errors import MWMError

        mae = base_model(cfg.model, MAEConfig)
        vit = mae.encoder.model
        if getattr(vit, "cls_token", None) is None:
            raise MWMError(f"AttMask reads the [CLS] token's attention; {cfg.model.arch} has no class token")
        attn = vit.blocks[-1].attn
        missing = [a for a in ("qkv", "num_heads", "head_dim", "scale", "q_norm", "k_norm") if not hasattr(attn, a)]
        if missing:
            raise MWMError(f"AttMask computes the [CLS] attention from timm's Attention module; {cfg.model.arch}'s "
                           f"last block's {type(attn).__name__} lacks {missing}")
        super().__init__(cfg, mae)
        n = self.grid[0] * self.grid[1]
        m = cfg.model
        self.n_reveal = hint_counts(n, cfg.masking.ratio, m.show_max, m.show_ratio)[1] if m.mode == "hint" else 0
        self.n_visible = n - self.n_mask + self.n_reveal

    @classmethod
    def check_config(cls, cfg: "PretrainConfig") -> None:
        super().check_config(cfg)
        m, r = cfg.model, cfg.masking.ratio
        share = m.show_max if m.show_ratio is None else m.show_ratio
        if m.mode == "hint" and (m.show_max > r or share * r > m.show_max):
            raise ValueError(f"attmask hint: the hints are revealed from the top show_max {m.show_max} of the tokens, "
                             f"which must all be masked: need show_max ≤ ratio ({r}) and show_ratio·ratio ≤ show_max")

    def ramp_epochs(self) -> int:
        ramp = self.cfg.model.ema_ramp_epochs
        return self.cfg.epochs if ramp is None else ramp

    def forward_kwargs(self) -> dict:
        return {"n_visible": self.n_visible}  # N − M (+ the hints): the same in every image, known up front

    def reconstruct(self, previews) -> np.ndarray:
        from ..recon import render_recon

        # the pictures' masks come from the random strategy (N − M visible), not from AttMask (+ the hints)
        return render_recon(self.model, previews, self.mean, self.std, self.ctx.device,
                            MAEMethod.forward_kwargs(self))

    def teacher_attention(self, x: torch.Tensor) -> torch.Tensor:
        """The EMA teacher's [CLS] attention (B, h, w) on the normalized images ``x`` (call under no_grad)."""
        return teacher_cls_attention(self.teacher.module.encoder, x)

    def views(self, batch: tuple[torch.Tensor, ...]) -> MaskedViews:
        from ...masking.policies import realised_ratios

        x = self.normalize(batch[0])
        with torch.no_grad(), _autocast(self.cfg.precision, x.device):
            att = self.teacher_attention(x)
        m = self.cfg.model
        keep = attmask_keep(att.float(), self.cfg.masking.ratio, m.mode, m.show_max, m.show_ratio, self.ctx.generator)
        return MaskedViews(x, keep, realised_ratios(keep))

    def summary_fields(self, rows: list[dict]) -> dict[str, Any]:
        out = super().summary_fields(rows)
        what = {"high": "the most attended tokens", "low": "the least attended tokens",
                "hint": "the most attended tokens, a few of the top ones revealed"}[self.cfg.model.mode]
        out["masking"] = f"attmask ({self.cfg.model.mode}): {what} by its EMA teacher's [CLS] attention"
        return out


register_method("attmask", AttMaskConfig, AttMaskMethod,
                help="AttMask, MAE on timm ViTs; the EMA teacher's most [CLS]-attended tokens masked (high/hint/low)")
