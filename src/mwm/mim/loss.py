"""Reconstruction loss on masked patches with per-patch normalized targets (MAE §3 "Reconstruction
target" with normalized pixels; SparK's loss on masked patches only).

A patch is one cell of the keep-mask grid: ``p = H // h`` pixels square (the mask stride: 32 for CNNs unless
``mask_stride`` sets a finer one such as 8, 16 for ViT-B/16). For
patch i with pixels x_i ∈ R^{p²C} and prediction ŷ_i,

    t_i = (x_i − mean(x_i)) / sqrt(var(x_i) + ε)            (norm_pix; else t_i = x_i)
    L   = Σ_{i masked} ‖ŷ_i − t_i‖² / (p²C) / #masked

``var`` is the unbiased variance over the patch's pixels as in the MAE and SparK reference code. Shared by the
SparK and MAE paths: both predict an image-shaped (B, C, H, W) tensor in target space.
"""

from __future__ import annotations

import torch

from .sparse import upsample_keep

__all__ = ["patchify", "unpatchify", "masked_mse", "reconstruct"]


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
