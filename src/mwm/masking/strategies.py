"""The built-in strategies: an importance source × a policy, registered by name.

>>> masker = create_masker(MaskingConfig(strategy="roi", ratio_in=0.8, ratio_out=0.2))
>>> keep, stats = masker(MaskingBatch(batch_size=8, grid=(7, 7), boxes=boxes, valid=valid, generator=g))
>>> masker = create_masker({"strategy": "saliency_topk", "ratio": 0.6})
>>> keep, stats = masker(MaskingBatch(8, (7, 7), generator=g, importance=saliency))  # saliency: (8, H, W) pixels

| source ↓ · policy → | uniform | two-level | two-level-overall | soft | topk |
|---|---|---|---|---|---|
| none | ``random`` | | | | |
| roi (coverage) | | ``roi`` | ``roi_overall`` | ``soft`` | ``topk`` |
| saliency | | | | ``saliency_soft`` | ``saliency_topk`` |

Another cell of the table is one line: ``register_composite("saliency_two_level", "saliency", "two-level")``.
A strategy that is not a source × policy is a :class:`~mwm.masking.protocol.MaskingStrategy` subclass
(see :mod:`mwm.masking.protocol`).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from .policies import POLICIES, Policy, realised_ratios
from .protocol import MaskingBatch, MaskingStrategy, StrategyConfig, register_strategy
from .sources import SOURCES, Source

__all__ = ["MaskingConfig", "SourcePolicyStrategy", "register_composite"]


class MaskingConfig(StrategyConfig):
    """The config of the built-in strategies. ``ratio`` is the overall mask ratio for random / roi_overall / soft /
    topk / saliency_soft / saliency_topk (and roi's images without an ROI); ``ratio_in`` / ``ratio_out`` are MWM's
    ROI / background ratios.

    One class for all seven, because configs written for one of them may set the others' fields (e.g. ``ratio`` on
    ``roi``, kept working), and their dump — every field, whichever strategy — is the identity of finished runs
    (``PretrainConfig.model_dump``, the bench's parts). A new strategy with settings of its own gets its own class.
    """

    ratio_in: float = Field(default=0.8, ge=0, le=1)
    ratio_out: float = Field(default=0.2, ge=0, lt=1)
    min_coverage: float = Field(default=0.0, ge=0, lt=1, description="a patch is ROI when covered by more than this")
    temperature: float = Field(default=0.25, gt=0, description="soft, saliency_soft: lower = more strictly by "
                               "importance")
    no_roi: Literal["ratio", "background", "random"] = Field(
        default="ratio", description="roi: how images without an ROI are masked: uniformly at `ratio` (ours), or "
                                    "at the background ratio `ratio_out` (the MWM reference, whose region mask is "
                                    "then all background); 'random' is the former name of 'ratio'")


class SourcePolicyStrategy(MaskingStrategy):
    """An importance source × a policy: scores from the source, keep-mask from the policy, statistics over the
    source's region. Subclassed per registration by :func:`register_composite`."""

    source: ClassVar[Source]
    policy: ClassVar[Policy]

    def mask(self, batch: MaskingBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        imp = self.source(batch, self.cfg)
        keep = self.policy(imp, batch, self.cfg)
        return keep, realised_ratios(keep, imp.region)

    @classmethod
    def visible_count(cls, cfg: StrategyConfig, n: int) -> int | None:
        return cls.policy.visible(cfg, n)


def register_composite(name: str, source: str, policy: str, config: type[StrategyConfig] = MaskingConfig,
                       doc: str = "") -> type[SourcePolicyStrategy]:
    """Register strategy ``name`` = importance source ``source`` × policy ``policy`` (names in
    :data:`~mwm.masking.sources.SOURCES`, :data:`~mwm.masking.policies.POLICIES`), configured by ``config``."""
    src, pol = SOURCES[source], POLICIES[policy]
    missing = pol.needs - src.provides
    if missing:
        raise ValueError(f"policy '{policy}' needs {sorted(missing)}, which source '{source}' does not provide")
    cls = type(f"{name.title().replace('_', '')}Strategy", (SourcePolicyStrategy,),
               {"__doc__": doc or f"{source} × {policy}", "__module__": __name__, "source": src, "policy": pol,
                "requires": src.requires, "config_class": config})
    return register_strategy(name)(cls)


register_composite("random", "none", "uniform", doc="SparK / MAE: uniform random masking at ``ratio``.")
register_composite("roi", "roi", "two-level",
                   doc="Mask What Matters: ``ratio_in`` inside the ROI, ``ratio_out`` outside (the overall ratio "
                       "follows ROI size); images without a box at ``ratio`` (``no_roi: ratio``) or ``ratio_out`` "
                       "(``no_roi: background``, the MWM reference).")
register_composite("roi_overall", "roi", "two-level-overall",
                   doc="MWM with the overall ratio held at ``ratio``: the ROI at ``ratio_in`` where its size allows, "
                       "the background takes the remainder; every image keeps the same number of cells.")
register_composite("soft", "roi", "soft",
                   doc="Gumbel-top-k at ``ratio`` with ROI coverage as importance.")
register_composite("topk", "roi", "topk", doc="The most-covered cells masked first at ``ratio``.")
register_composite("saliency_soft", "saliency", "soft",
                   doc="No boxes: Gumbel-top-k at ``ratio`` on each cell's mean saliency (min–max per image); "
                       "images without a map uniformly at ``ratio``.")
register_composite("saliency_topk", "saliency", "topk",
                   doc="No boxes: the cells of highest mean saliency masked first at ``ratio``; images without a "
                       "map uniformly at ``ratio``.")


class TopkDiverseConfig(StrategyConfig):
    """``saliency_topk_diverse``: MedIM's high-activated masking with its diversity draw (γ = ``ratio``, 0.5 in
    MedIM; ``top_share`` 0.9 of the masked cells from the top-γ cells, the rest from the others)."""

    strategy: Literal["saliency_topk_diverse"] = "saliency_topk_diverse"
    ratio: float = Field(default=0.5, ge=0, lt=1)
    top_share: float = Field(default=0.9, ge=0, le=1, description="share of the masked cells drawn among the most "
                                                                  "important ones (MedIM: 0.9)")


register_composite("saliency_topk_diverse", "saliency", "topk-diverse", config=TopkDiverseConfig,
                   doc="MedIM (pruning_sort_attDiversity): ``top_share`` of the ``ratio``·N masked cells at random "
                       "among the cells of highest mean saliency, the rest at random elsewhere; images without a map "
                       "uniformly at ``ratio``.")
