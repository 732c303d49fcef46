"""Guided masking: importance sources on the patch grid × policies with exact counts."""

from .grid import boxes_tensor, roi_coverage, roi_patches
from .policies import (n_keep, random_keep, ratios_for_overall, realised_ratios, soft_keep, topk_keep,
                       two_region_keep)
from .strategies import NEEDS_ROI, STRATEGIES, MaskingConfig, create_masker, register_strategy

__all__ = ["boxes_tensor", "roi_coverage", "roi_patches", "n_keep", "random_keep", "ratios_for_overall",
           "realised_ratios", "soft_keep", "topk_keep", "two_region_keep", "MaskingConfig", "create_masker",
           "register_strategy", "STRATEGIES", "NEEDS_ROI"]
