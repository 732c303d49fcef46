"""Guided masking: importance sources on the patch grid × policies with exact counts, behind one strategy protocol
(:class:`MaskingStrategy` called on a :class:`MaskingBatch`)."""

from .grid import boxes_tensor, pool_importance, roi_coverage, roi_patches, top_half
from .policies import (POLICIES, n_keep, random_keep, ratios_for_overall, realised_ratios, register_policy, soft_keep,
                       topk_keep, two_region_keep)
from .protocol import (NEEDS_ROI, NEEDS_SALIENCY, REQUIREMENTS, STRATEGIES, AnyMaskingConfig, MaskingBatch,
                       MaskingStrategy, StrategyConfig, create_masker, masking_config, register_strategy,
                       strategy_requires, visible_count)
from .sources import SOURCES, Importance, register_source
from .strategies import MaskingConfig, SourcePolicyStrategy, register_composite

__all__ = ["boxes_tensor", "pool_importance", "roi_coverage", "roi_patches", "top_half", "n_keep", "random_keep",
           "ratios_for_overall", "realised_ratios", "soft_keep", "topk_keep", "two_region_keep", "POLICIES",
           "register_policy", "SOURCES", "Importance", "register_source", "MaskingBatch", "MaskingStrategy",
           "StrategyConfig", "MaskingConfig", "AnyMaskingConfig", "SourcePolicyStrategy", "create_masker",
           "masking_config", "register_strategy", "register_composite", "strategy_requires", "visible_count",
           "STRATEGIES", "REQUIREMENTS", "NEEDS_ROI", "NEEDS_SALIENCY"]
