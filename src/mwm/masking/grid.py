"""Importance sources on the encoder's patch grid: ROI boxes → per-patch coverage by AREA; pixel maps
(saliency) → per-patch mean, also by area.

Nearest-neighbour downsampling of an ROI mask (what the MWM reference does) drops any box
smaller than a patch that happens to miss the sampled pixel; coverage by area never does.
"""

from __future__ import annotations

import torch


def boxes_tensor(boxes: list[list[list[float]]], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged per-image box lists → padded ``(B, M, 4)`` float and validity ``(B, M)`` bool (M ≥ 1)."""
    m = max(1, max((len(b) for b in boxes), default=0))
    t = torch.zeros(len(boxes), m, 4, device=device)
    v = torch.zeros(len(boxes), m, dtype=torch.bool, device=device)
    for i, bl in enumerate(boxes):
        if bl:
            t[i, : len(bl)] = torch.as_tensor(bl, dtype=torch.float32, device=device)
            v[i, : len(bl)] = True
    return t, v


def _overlap_1d(lo: torch.Tensor, hi: torch.Tensor, n: int) -> torch.Tensor:
    """lo, hi: (B, M) in [0, 1] → (B, M, n): the fraction of each of n equal cells covered by [lo, hi]."""
    edges = torch.arange(n + 1, device=lo.device, dtype=lo.dtype) / n
    a = torch.maximum(lo[..., None], edges[:-1])
    b = torch.minimum(hi[..., None], edges[1:])
    return (b - a).clamp_min(0) * n


def roi_coverage(boxes: torch.Tensor, valid: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Fraction of each patch covered by the union of an image's boxes.

    boxes: (B, M, 4) normalized ``[x0, y0, x1, y1]``; valid: (B, M) bool; grid: (h, w).
    Returns float (B, h, w) in [0, 1]. Per box the coverage is exact (separable overlap
    lengths); several boxes are combined by a sum clipped at 1, exact unless two boxes of one
    image overlap inside the same patch (then it over-counts that patch).
    """
    h, w = grid
    b = boxes.clamp(0, 1)
    cx = _overlap_1d(b[..., 0], b[..., 2], w)  # (B, M, w)
    cy = _overlap_1d(b[..., 1], b[..., 3], h)  # (B, M, h)
    cov = cy[..., :, None] * cx[..., None, :]  # (B, M, h, w)
    cov = cov * valid[..., None, None].to(cov.dtype)
    return cov.sum(1).clamp_(0, 1)


def roi_patches(coverage: torch.Tensor, min_coverage: float = 0.0) -> torch.Tensor:
    """coverage (B, h, w) → bool (B, h, w): a patch is ROI when its covered fraction exceeds ``min_coverage``
    (default 0: any overlap)."""
    return coverage > min_coverage


def pool_importance(importance: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """A pixel map (B, H, W) (e.g. M2IB saliency, any non-negative scale) → per-patch importance (B, h, w) in [0, 1].

    Each patch gets the **mean** of its pixels (area pooling, as ROI boxes are mapped by area; adaptive pooling,
    so H, W need not be multiples of the grid), then the patch means are min–max normalised per image: the policy
    sees where an image's saliency is high relative to the rest of *that* image (``soft``'s temperature then means
    the same on every image), and a constant map — an image without one is all zeros — becomes all zeros, which
    both policies mask uniformly. A map already on the grid is only normalised.
    """
    if importance.ndim != 3:
        raise ValueError(f"importance must be (B, H, W), got {tuple(importance.shape)}")
    x = importance.float()
    if tuple(x.shape[-2:]) != tuple(grid):
        x = torch.nn.functional.adaptive_avg_pool2d(x[:, None], grid)[:, 0]
    flat = x.flatten(1)
    lo = flat.amin(1)[:, None, None]
    span = (flat.amax(1)[:, None, None] - lo)
    # span 0 (a constant map) → 0 everywhere; no branch, no host sync
    return torch.where(span > 0, (x - lo) / span.clamp_min(1e-12), torch.zeros_like(x))


def top_half(importance: torch.Tensor) -> torch.Tensor:
    """importance (B, h, w) → bool (B, h, w): each image's ⌊N/2⌋ most important patches (ties by patch order).

    The "ROI" of importance-only strategies for the realised-ratio statistics: ``mask_ratio_in`` is then the ratio
    over the salient half and ``mask_ratio_out`` over the rest. A fixed half (rather than "above the median") keeps
    the two groups the same size even when many patches tie, e.g. a constant map (no saliency), whose half is then
    an arbitrary but unbiased one.
    """
    B, h, w = importance.shape
    n = h * w
    order = torch.sort(-importance.reshape(B, n), dim=1, stable=True).indices
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=order.device).expand_as(order))
    return (ranks < n // 2).view(B, h, w)
