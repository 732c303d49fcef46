"""Importance sources on the encoder's patch grid: ROI boxes → per-patch coverage by AREA.

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
