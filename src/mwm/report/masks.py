"""Mask examples: the same images masked by several strategies side by side (what each masker hides)."""

from __future__ import annotations

import numpy as np
import torch

from .overlays import MASKED_GRAY, draw_boxes, gray_rgb, hstack, upscale, vstack

__all__ = ["mask_examples"]


def mask_examples(images: np.ndarray, boxes: list[list[list[float]]], strategies: dict[str, dict], stride: int,
                  seed: int = 0, min_side: int = 128, saliency: np.ndarray | None = None) -> np.ndarray:
    """uint8 (H, W, 3) grid: one row per image — the scan with its ROI box(es), then one panel per strategy
    with the masked patches gray (as in the reconstruction previews).

    images: uint8 (B, C, S, S); boxes: per image, normalized [x0, y0, x1, y1] lists; strategies: name →
    strategy config fields (``{"strategy": "roi", "ratio_in": 0.8, ...}``); stride: the mask stride in pixels (the
    model's ``stride``: 32 for ResNets by default, 8 with ``mask_stride: 8``); saliency: per-pixel maps (B, S, S)
    of the images (uint8 0–255 or float in [0, 1]), needed by the saliency strategies (``saliency_soft``,
    ``saliency_topk``) and ignored by the others. Strategies that look at the image get it (``images``).
    """
    from ..masking import MaskingBatch, create_masker, masking_config
    from ..masking.grid import boxes_tensor
    from ..mim.sparse import upsample_keep

    x = torch.from_numpy(images).float().mean(1, keepdim=True) / 255.0  # (B, 1, S, S)
    b, s = x.shape[0], x.shape[-1]
    grid = (s // stride, s // stride)
    bt, valid = boxes_tensor(boxes)
    importance = None
    if saliency is not None:
        sal = torch.from_numpy(np.asarray(saliency)).float()
        importance = sal / 255.0 if np.asarray(saliency).dtype == np.uint8 else sal
    rgb = torch.from_numpy(images).float() / 255.0  # (B, C, S, S) in [0, 1], for strategies that look at the image
    panels = []
    for name, fields in strategies.items():
        g = torch.Generator().manual_seed(seed)
        keep, _ = create_masker(masking_config(fields))(MaskingBatch(
            batch_size=b, grid=grid, generator=g, images=rgb, boxes=bt, valid=valid, importance=importance))
        vis = upsample_keep(keep, (grid[0] * stride, grid[1] * stride))
        vis = torch.nn.functional.pad(vis, (0, s - vis.shape[-1], 0, s - vis.shape[-2]), value=True)
        panels.append(torch.where(vis, x, torch.full_like(x, MASKED_GRAY))[:, 0].numpy())
    rows = []
    for i in range(b):
        first = upscale(gray_rgb(x[i, 0].numpy()), min_side)
        if boxes[i]:
            first = draw_boxes(first, boxes[i], width=max(1, first.shape[0] // 100))
        rows.append(hstack([first] + [upscale(gray_rgb(p[i]), min_side) for p in panels]))
    return vstack(rows)
