"""Reconstruction previews: RUN/recon/epoch_XXX.png, one row per image: input · masked input · reconstruction.

The same images (evenly spaced through the dataset, not augmented) and the same masks (a generator seeded from
the run's seed, independent of the training generators) every time, so successive PNGs show the model
improving rather than a different draw. Rendered with the model in eval mode and no gradients.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

# MASKED_GRAY and vstack live in report (a leaf: it imports nothing from train); re-exported here
from ..report.overlays import MASKED_GRAY, draw_boxes, gray_rgb, hstack, save_png, upscale, vstack

__all__ = ["ReconSet", "render_recon", "vstack", "MASKED_GRAY"]


class ReconSet:
    """A fixed preview batch: x (K, 3, S, S) float in [0, 1] (un-normalized), boxes (K, M, 4), valid (K, M),
    and the keep-mask (K, 1, h, w) drawn once at the model's mask grid (so the PNG shows the cells the masker
    drew, e.g. 8-px cells with ``mask_stride: 8``). ``saliency``: uint8 (N, S, S) maps of all images, given to
    the saliency maskers as ``importance`` (the previews are not augmented, so the maps stay as loaded)."""

    def __init__(self, images: np.ndarray, boxes: list[np.ndarray], k: int, masker, grid: tuple[int, int],
                 seed: int, has_rois: bool, saliency: np.ndarray | None = None):
        from .data import collate

        n = len(images)
        idx = np.unique(np.linspace(0, n - 1, min(k, n)).round().astype(int))
        self.x, self.boxes, self.valid = collate([(torch.from_numpy(images[i]).float() / 255.0,
                                                   torch.from_numpy(boxes[i])) for i in idx])
        from ..masking import MaskingBatch

        importance = None if saliency is None else torch.from_numpy(saliency[idx]).float() / 255.0
        g = torch.Generator().manual_seed(seed + 7919)  # own stream: previews never shift the training RNG
        self.keep, _ = masker(MaskingBatch(batch_size=len(idx), grid=grid, generator=g, images=self.x,
                                           boxes=self.boxes if has_rois else None,
                                           valid=self.valid if has_rois else None, importance=importance))
        self.box_lists = [[b.tolist() for b, v in zip(bs, vs) if v] for bs, vs in zip(self.boxes, self.valid)]


@torch.no_grad()
def render_recon(model: nn.Module, rs: ReconSet, mean: torch.Tensor, std: torch.Tensor, device,
                 forward_kwargs: dict | None = None, min_side: int = 128) -> np.ndarray:
    """One uint8 (H, W, 3) panel grid for ``rs`` with ``model`` (the unwrapped MIM model). mean/std: (1, C, 1, 1)
    input normalization (what training feeds the model)."""
    from ..mim.sparse import upsample_keep

    was_training = model.training
    model.eval()
    try:
        x = rs.x.to(device)
        keep = rs.keep.to(device)
        xn = (x - mean) / std
        out = model(xn, keep, **(forward_kwargs or {}))
        rec = model.reconstruct(xn, out["pred"], keep) * std + mean
    finally:
        model.train(was_training)
    vis = upsample_keep(keep, x.shape[-2:])
    masked = torch.where(vis, x, torch.full_like(x, MASKED_GRAY))
    rows = []
    for i in range(x.shape[0]):
        panels = [a[i].float().mean(0).clamp(0, 1).cpu().numpy() for a in (x, masked, rec)]
        rgb = [upscale(gray_rgb(p), min_side) for p in panels]
        if rs.box_lists[i]:
            rgb[0] = draw_boxes(rgb[0], rs.box_lists[i])  # the ROI the masker used, on the input panel
        rows.append(hstack(rgb))
    return vstack(rows)


def save_recon(path: str | Path, panel: np.ndarray) -> Path:
    return save_png(panel, path)
