"""Masking strategies = an importance source × a policy, looked up by name.

>>> masker = create_masker(MaskingConfig(strategy="roi", ratio_in=0.8, ratio_out=0.2))
>>> keep, stats = masker(batch=8, grid=(7, 7), boxes=boxes, valid=valid, generator=g)   # keep: (8, 1, 7, 7)

A new strategy is one function registered with :func:`register_strategy` plus a test.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .grid import roi_coverage, roi_patches
from .policies import random_keep, ratios_for_overall, realised_ratios, soft_keep, topk_keep, two_region_keep


class MaskingConfig(BaseModel):
    """Which strategy and its ratios. ``ratio`` is the overall mask ratio for random / roi_overall / soft / topk;
    ``ratio_in`` / ``ratio_out`` are MWM's ROI / background ratios."""

    model_config = ConfigDict(extra="forbid")

    strategy: str = "random"
    ratio: float = Field(default=0.6, ge=0, lt=1)
    ratio_in: float = Field(default=0.8, ge=0, le=1)
    ratio_out: float = Field(default=0.2, ge=0, lt=1)
    min_coverage: float = Field(default=0.0, ge=0, lt=1, description="a patch is ROI when covered by more than this")
    temperature: float = Field(default=0.25, gt=0, description="soft: lower = more strictly by importance")
    no_roi: Literal["ratio", "background", "random"] = Field(
        default="ratio", description="roi: how images without an ROI are masked: uniformly at `ratio` (ours), or "
                                    "at the background ratio `ratio_out` (the MWM reference, whose region mask is "
                                    "then all background); 'random' is the former name of 'ratio'")

    @model_validator(mode="after")
    def _known(self) -> "MaskingConfig":
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown masking strategy '{self.strategy}'; choose one of {sorted(STRATEGIES)}")
        return self


Masker = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
STRATEGIES: dict[str, Callable[[MaskingConfig], Masker]] = {}
NEEDS_ROI: set[str] = set()


def register_strategy(name: str, needs_roi: bool = False):
    def deco(fn: Callable[[MaskingConfig], Masker]):
        STRATEGIES[name] = fn
        if needs_roi:
            NEEDS_ROI.add(name)
        return fn

    return deco


def create_masker(cfg: MaskingConfig) -> Masker:
    """The masker for ``cfg.strategy``: ``masker(batch, grid, boxes=None, valid=None, generator=None, device=None)``
    → (keep bool (B, 1, h, w), stats of 0-d tensors)."""
    return STRATEGIES[cfg.strategy](cfg)


def _roi(boxes, valid, grid, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    if boxes is None:
        raise ValueError(f"masking strategy '{cfg.strategy}' needs ROI boxes (pass --rois rois.jsonl)")
    cov = roi_coverage(boxes, valid, grid)
    return cov, roi_patches(cov, cfg.min_coverage)


@register_strategy("random")
def _random(cfg: MaskingConfig) -> Masker:
    """SparK / MAE: uniform random masking at ``ratio``."""

    def masker(batch, grid, boxes=None, valid=None, generator=None, device=None):
        keep = random_keep(batch, grid, cfg.ratio, generator, device if boxes is None else boxes.device)
        roi = _roi(boxes, valid, grid, cfg)[1] if boxes is not None else None
        return keep, realised_ratios(keep, roi)

    return masker


@register_strategy("roi", needs_roi=True)
def _roi_two_level(cfg: MaskingConfig) -> Masker:
    """Mask What Matters: ``ratio_in`` inside the ROI, ``ratio_out`` outside (the overall ratio follows ROI size).
    Images without a box are masked uniformly at ``ratio``
    (``no_roi: ratio``, default: a failed localization then costs no more than random masking) or at ``ratio_out``
    (``no_roi: background``: the MWM reference, ``SparK.targeted_mask``, treats an all-zero region mask as all
    background)."""
    no_roi_ratio = cfg.ratio_out if cfg.no_roi == "background" else cfg.ratio

    def masker(batch, grid, boxes=None, valid=None, generator=None, device=None):
        _, roi = _roi(boxes, valid, grid, cfg)
        has = valid.any(1)
        r_in = torch.full((batch,), cfg.ratio_in, dtype=torch.float64, device=roi.device)
        r_out = torch.where(has, torch.tensor(cfg.ratio_out, dtype=torch.float64, device=roi.device),
                            torch.tensor(no_roi_ratio, dtype=torch.float64, device=roi.device))
        keep = two_region_keep(roi, r_in, r_out, generator)
        return keep, realised_ratios(keep, roi)

    return masker


@register_strategy("roi_overall", needs_roi=True)
def _roi_overall(cfg: MaskingConfig) -> Masker:
    """MWM with the overall ratio held at ``ratio``: the ROI is masked at ``ratio_in`` where its size allows and the
    background takes the remainder, so every image has the same number of visible patches."""

    def masker(batch, grid, boxes=None, valid=None, generator=None, device=None):
        _, roi = _roi(boxes, valid, grid, cfg)
        r_in, r_out = ratios_for_overall(roi, cfg.ratio, cfg.ratio_in)
        keep = two_region_keep(roi, r_in, r_out, generator)
        return keep, realised_ratios(keep, roi)

    return masker


@register_strategy("soft", needs_roi=True)
def _soft(cfg: MaskingConfig) -> Masker:
    """Importance-weighted sampling at ``ratio`` with ROI coverage as importance (keep probability falls with it)."""

    def masker(batch, grid, boxes=None, valid=None, generator=None, device=None):
        cov, roi = _roi(boxes, valid, grid, cfg)
        keep = soft_keep(cov, cfg.ratio, cfg.temperature, generator)
        return keep, realised_ratios(keep, roi)

    return masker


@register_strategy("topk", needs_roi=True)
def _topk(cfg: MaskingConfig) -> Masker:
    """Mask the most-covered patches first at ``ratio`` (deterministic up to ties)."""

    def masker(batch, grid, boxes=None, valid=None, generator=None, device=None):
        cov, roi = _roi(boxes, valid, grid, cfg)
        keep = topk_keep(cov, cfg.ratio, generator)
        return keep, realised_ratios(keep, roi)

    return masker
