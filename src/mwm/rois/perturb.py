"""Degraded oracle ROIs: boxes with a chosen occlusion precision and recall against the ground-truth mask, or boxes
of the same size at random places.

For MWM's question "does masking the *right* place matter, or any compact region?" and for a curve of benefit vs
ROI quality (the paper's localizer reaches occlusion precision ≈ 0.3, recall ≈ 0.9 in its Table 1).

With the metrics of :func:`mwm.rois.boxes.region_metrics` — precision ``|box ∩ mask| / |box|``, recall
``|box ∩ mask| / |mask|`` — a target ``(p, r)`` for a mask of area ``A`` asks for a box of area ``r·A/p`` that
overlaps the mask in ``r·A`` pixels. :func:`target_box` grows (or shrinks) the tight box around the mask to that
area, keeping its aspect ratio (a side that would exceed the image is capped and the other side takes the rest
of the area), then places it, among all pixel-aligned positions inside the image, at one drawn uniformly from
those whose overlap is within ``tolerance·A`` of ``r·A`` (or the closest ones when none is): the box is grown
and shifted in a random direction. Overlaps of every position come from one summed-area table per mask, so
the achieved values are exact (pixel-aligned boxes rasterize to whole pixels). When a target cannot be met — a
box of area ``r·A/p`` larger than the image, as for lung fields that cover more than ``p`` of it — the box is
the whole image and the achieved values say so.

``place: random`` ignores the mask for the position: the box (of the target size when ``precision``/``recall``
are given, else each gt box's own size) goes to a uniformly random position inside the image.

Every draw uses a generator seeded by ``(seed, image id)`` (:func:`mwm.rois.manifest.image_seed`), so a box does
not depend on the order or the subset of images.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["PerturbConfig", "target_box", "random_place", "perturb_boxes", "achieved"]


class PerturbConfig(BaseModel):
    """How to degrade gt boxes. ``precision`` + ``recall``: the targets (both or neither); ``place``: ``target``
    (a box that meets them) or ``random`` (the same size at a random place); ``tolerance``: how far (in recall)
    an overlap may be from the target and still be a candidate position."""

    model_config = ConfigDict(extra="forbid")

    precision: float | None = Field(default=None, gt=0, le=1)
    recall: float | None = Field(default=None, gt=0, le=1)
    place: Literal["target", "random"] = "target"
    tolerance: float = Field(default=0.02, ge=0, le=1)

    @model_validator(mode="after")
    def _targets(self) -> "PerturbConfig":
        if (self.precision is None) != (self.recall is None):
            raise ValueError("perturb needs both precision and recall (or neither, with place: random)")
        if self.place == "target" and self.precision is None:
            raise ValueError("perturb with place 'target' needs precision and recall, e.g. {precision: 0.3, "
                             "recall: 0.9}; for same-size boxes at random places use {place: random}")
        return self

    @property
    def has_targets(self) -> bool:
        return self.precision is not None


def _rng(seed: int, image_id: str) -> np.random.Generator:
    from .manifest import image_seed

    return np.random.default_rng(image_seed(seed, image_id))


def _target_size(mask: np.ndarray, precision: float, recall: float) -> tuple[int, int]:
    """(height, width) in pixels of a box of area ``recall·A/precision``, the tight box's aspect ratio."""
    h, w = mask.shape
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    th, tw = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    area = recall * mask.sum() / precision
    s = np.sqrt(area / (th * tw))
    bw = int(np.clip(round(tw * s), 1, w))
    bh = int(np.clip(round(area / bw), 1, h))
    if bh == h:  # capped: the width takes the rest of the area
        bw = int(np.clip(round(area / bh), 1, w))
    return bh, bw


def target_box(mask: np.ndarray, precision: float, recall: float, rng: np.random.Generator,
               tolerance: float = 0.02) -> list[float]:
    """A normalized box ``[x0, y0, x1, y1]`` (pixel-aligned) whose precision/recall against ``mask`` (bool
    ``(H, W)``, not empty) are as near ``(precision, recall)`` as the pixel grid allows; see the module docstring."""
    h, w = mask.shape
    bh, bw = _target_size(mask, precision, recall)
    sat = np.zeros((h + 1, w + 1), np.int64)
    sat[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
    # overlap of the box with its top-left corner at (y0, x0), for every position inside the image
    ov = sat[bh:, bw:] - sat[:h - bh + 1, bw:] - sat[bh:, :w - bw + 1] + sat[:h - bh + 1, :w - bw + 1]
    area = int(mask.sum())
    dev = np.abs(ov - recall * area)
    cand = np.flatnonzero(dev.ravel() <= max(dev.min(), tolerance * area))
    y0, x0 = np.unravel_index(cand[rng.integers(len(cand))], ov.shape)
    return [x0 / w, y0 / h, (x0 + bw) / w, (y0 + bh) / h]


def random_place(box: list[float], rng: np.random.Generator) -> list[float]:
    """The box, same width and height, at a uniformly random position inside [0, 1]²."""
    bw, bh = min(max(box[2] - box[0], 0.0), 1.0), min(max(box[3] - box[1], 0.0), 1.0)
    x0, y0 = rng.uniform() * (1 - bw), rng.uniform() * (1 - bh)
    return [x0, y0, x0 + bw, y0 + bh]


def perturb_boxes(masks: np.ndarray, ids: list[str], boxes: list[list[list[float]]], cfg: PerturbConfig,
                  seed: int = 0) -> list[list[list[float]]]:
    """Degraded boxes per image.

    Args:
        masks: ``(N, H, W)``, nonzero = target.
        ids: the N image ids (they seed each image's draws).
        boxes: the gt boxes per image (normalized; empty = no ROI, left empty).
        cfg: targets and placement.
        seed: the run's seed.

    Returns:
        One list of boxes per image: one box for an image with targets, every box moved for ``place: random``
        without targets, ``[]`` where ``boxes`` has none.
    """
    out: list[list[list[float]]] = []
    for m, image_id, bxs in zip(masks, ids, boxes):
        if not bxs:
            out.append([])
            continue
        rng = _rng(seed, image_id)
        m = np.asarray(m) != 0
        if cfg.has_targets:
            if cfg.place == "target":
                out.append([target_box(m, cfg.precision, cfg.recall, rng, cfg.tolerance)])
                continue
            bh, bw = _target_size(m, cfg.precision, cfg.recall)
            bxs = [[0.0, 0.0, bw / m.shape[1], bh / m.shape[0]]]
        out.append([random_place(b, rng) for b in bxs])
    return out


def achieved(masks: np.ndarray, boxes: list[list[list[float]]], batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Occlusion precision and recall ``(N,)`` each of ``boxes`` against ``masks`` (:func:`region_metrics` on
    the boxes rasterized at the masks' resolution, in stacks of ``batch_size``); NaN recall for an empty mask."""
    import torch

    from .boxes import boxes_to_masks, region_metrics

    n, h, w = masks.shape
    p, r = np.zeros(n), np.zeros(n)
    for s in range(0, n, batch_size):
        res = region_metrics(boxes_to_masks(boxes[s: s + batch_size], h, w),
                             torch.from_numpy(np.asarray(masks[s: s + batch_size]) != 0))
        p[s: s + batch_size], r[s: s + batch_size] = res["precision"].numpy(), res["recall"].numpy()
    return p, r

