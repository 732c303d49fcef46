"""Reconstruction loss on masked patches with per-patch normalized targets (MAE §3 "Reconstruction
target" with normalized pixels; SparK's loss on masked patches only).

A patch is one cell of the keep-mask grid: ``p = H // h`` pixels square (the mask stride: 32 for CNNs unless
``mask_stride`` sets a finer one such as 8, 16 for ViT-B/16). For
patch i with pixels x_i ∈ R^{p²C} and prediction ŷ_i,

    t_i = (x_i − mean(x_i)) / sqrt(var(x_i) + ε)            (norm_pix; else t_i = x_i)
    L   = Σ_{i masked} ‖ŷ_i − t_i‖² / (p²C) / #masked

``var`` is the unbiased variance over the patch's pixels as in the MAE and SparK reference code. Shared by the
SparK and MAE paths: both predict an image-shaped (B, C, H, W) tensor in target space.

**Reconstruction target** (``model.target`` of SparK and MAE, :data:`TARGETS`): ``pixels`` (the above, x = the
input image) or ``meijering`` — M&M's reading (b). The seed paper 003 (M&M) has no code and no formula; it says
the image is ridge-filtered "into an intermediate form for reconstruction" and that "Meijering-based masking"
replaces random masking. Reading (a) (the ridge response as masking importance) is
:mod:`mwm.importance.meijering`; reading (b) is this target: the model still sees the masked *image*, but the
loss compares its prediction with the image's Meijering map (1 channel, in [0, 1], from a ``mwm importance
meijering`` manifest, cropped and flipped with the image) — x_i above is the map's patch, with the same per-patch
normalisation and the same masked patches. The decoder then predicts 1 channel (:func:`target_channels`).
"""

from __future__ import annotations

import torch

from .sparse import upsample_keep

__all__ = ["patchify", "unpatchify", "masked_mse", "reconstruct", "TARGETS", "target_channels", "target_for",
           "dump_without_default_target"]

# what the decoder reconstructs (see the module docstring); "pixels" is the default and is left out of config dumps
TARGETS = ("pixels", "meijering")


def target_field():
    """The ``target`` option of SparK / MAE configs (one definition, so the two cannot drift apart)."""
    from pydantic import Field

    return Field(default="pixels", description="what the masked patches are reconstructed as: the image's pixels, "
                 "or its Meijering ridge map (M&M reading (b), mwm.mim.loss; needs rois = a `mwm importance meijering` "
                 "manifest)")


def target_channels(target: str, in_chans: int) -> int:
    """Channels the decoder predicts: the image's for ``pixels``, 1 for a map target (``meijering``)."""
    return in_chans if target == "pixels" else 1


def target_for(x: torch.Tensor, pred: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """The loss target: ``target`` (B, 1, H, W) when given (a map target), else the input ``x``. Raises
    ``ValueError`` when the prediction's channels do not fit (a map-target model called without its map)."""
    t = x if target is None else target
    if t.shape[1] != pred.shape[1] or t.shape[-2:] != x.shape[-2:]:
        raise ValueError(f"the model predicts {pred.shape[1]} channel(s) but the target is {tuple(t.shape)}: a model "
                         "with model.target meijering needs target= (B, 1, H, W), the Meijering maps of the batch")
    return t


def dump_without_default_target(d: dict) -> dict:
    """A SparK / MAE config dump with ``target`` left out at its default ``pixels``: the dumps of configs that do not
    set it stay byte for byte what finished runs were identified by (tests/train/test_pinned_config.py)."""
    if d.get("target") == "pixels":
        d.pop("target")
    return d


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) → (B, L = h·w, p²·C), pixels ordered (row, col, channel) within a patch as MAE/SparK."""
    B, C, H, W = x.shape
    h, w = H // p, W // p
    return x.reshape(B, C, h, p, w, p).permute(0, 2, 4, 3, 5, 1).reshape(B, h * w, p * p * C)


def unpatchify(t: torch.Tensor, p: int, grid: tuple[int, int], channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, h·w, p²·C) → (B, C, h·p, w·p)."""
    B = t.shape[0]
    h, w = grid
    return t.reshape(B, h, w, p, p, channels).permute(0, 5, 1, 3, 2, 4).reshape(B, channels, h * p, w * p)


def _patch_size(x: torch.Tensor, keep: torch.Tensor) -> int:
    H, W = x.shape[-2:]
    h, w = keep.shape[-2:]
    if H % h or W % w or H // h != W // w:
        raise ValueError(f"image {H}×{W} is not tiled by square patches of the keep grid {h}×{w}")
    return H // h


def _target_stats(patches: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    mean = patches.mean(-1, keepdim=True)
    std = (patches.var(-1, keepdim=True) + eps).sqrt()
    return mean, std


def masked_mse(x: torch.Tensor, pred: torch.Tensor, keep: torch.Tensor, norm_pix: bool = True,
               eps: float = 1e-6) -> torch.Tensor:
    """MSE over masked patches only. x, pred: (B, C, H, W); keep: bool (B, 1, h, w), True = visible.

    Returns a 0-d float32 tensor (no host sync; 0 when nothing is masked). Computed in float32 whatever the
    prediction dtype, so bf16 autocast does not quantize the target.
    """
    p = _patch_size(x, keep)
    target = patchify(x.float(), p)
    if norm_pix:
        mean, std = _target_stats(target, eps)
        target = (target - mean) / std
    err = (patchify(pred.float(), p) - target).pow(2).mean(-1)  # (B, L)
    masked = (~keep).flatten(1).to(err.dtype)
    return (err * masked).sum() / masked.sum().clamp_min(1)


@torch.no_grad()
def reconstruct(x: torch.Tensor, pred: torch.Tensor, keep: torch.Tensor, norm_pix: bool = True,
                eps: float = 1e-6) -> torch.Tensor:
    """The image to look at: visible patches from ``x``, masked ones from ``pred`` mapped back to pixel space with
    the input patch's own mean/std (what SparK's visualisation does). → (B, C, H, W) in x's dtype."""
    p = _patch_size(x, keep)
    rec = patchify(pred.float(), p)
    if norm_pix:
        mean, std = _target_stats(patchify(x.float(), p), eps)
        rec = rec * std + mean
    rec = unpatchify(rec, p, keep.shape[-2:], x.shape[1]).to(x.dtype)
    return torch.where(upsample_keep(keep, x.shape[-2:]), x, rec)
