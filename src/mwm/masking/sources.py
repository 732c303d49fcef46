"""Importance sources: a :class:`~mwm.masking.protocol.MaskingBatch` → per-cell scores on the mask grid.

A source returns an :class:`Importance`: ``score`` (B, h, w) in [0, 1] (what soft / top-k rank by), ``region``
(B, h, w) bool (the cells two-level policies mask at ``ratio_in``, and the "in" of the realised-ratio
statistics) and ``present`` (B,) bool (images that have a region at all). Registered by name in
:data:`SOURCES`; a new one is a function ``fn(batch, cfg) -> Importance`` under :func:`register_source`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .grid import pool_importance, roi_coverage, roi_patches, top_half

__all__ = ["Importance", "Source", "SOURCES", "register_source"]


@dataclass(frozen=True)
class Importance:
    """Per-cell importance of a batch; fields a source cannot give are None."""

    score: torch.Tensor | None = None  # float (B, h, w) in [0, 1]
    region: torch.Tensor | None = None  # bool (B, h, w)
    present: torch.Tensor | None = None  # bool (B,): images with a region (None: all)


@dataclass(frozen=True)
class Source:
    """A registered importance source: ``fn(batch, cfg) -> Importance``, the batch inputs it requires and the
    Importance fields it provides (checked against a policy's needs at registration)."""

    name: str
    fn: Callable
    requires: frozenset[str]
    provides: frozenset[str]

    def __call__(self, batch, cfg) -> Importance:
        return self.fn(batch, cfg)


SOURCES: dict[str, Source] = {}


def register_source(name: str, requires: tuple[str, ...] = (), provides: tuple[str, ...] = ()):
    def deco(fn: Callable) -> Callable:
        SOURCES[name] = Source(name, fn, frozenset(requires), frozenset(provides))
        return fn

    return deco


def _roi(batch, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    cov = roi_coverage(batch.boxes, batch.valid, batch.grid)
    return cov, roi_patches(cov, getattr(cfg, "min_coverage", 0.0))


@register_source("none")
def _none(batch, cfg) -> Importance:
    """Nothing to guide by (random masking). Boxes, when given, still define the statistics' region."""
    return Importance(region=_roi(batch, cfg)[1]) if batch.boxes is not None else Importance()


@register_source("roi", requires=("boxes",), provides=("score", "region", "present"))
def _roi_coverage(batch, cfg) -> Importance:
    """ROI coverage: the area fraction of each cell inside the image's boxes; the region is the cells covered by
    more than ``min_coverage``; images without a valid box have none."""
    cov, roi = _roi(batch, cfg)
    return Importance(score=cov, region=roi, present=batch.valid.any(1))


@register_source("saliency", requires=("saliency",), provides=("score", "region"))
def _saliency(batch, cfg) -> Importance:
    """Saliency: each cell's mean of the per-pixel map, min–max normalised per image; the region (statistics
    only) is each image's salient half of the cells. An image without a map (all zeros) scores 0 everywhere."""
    score = pool_importance(batch.importance, batch.grid)
    return Importance(score=score, region=top_half(score))
