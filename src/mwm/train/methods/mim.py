"""Masked image modeling as pretraining methods: ``spark`` (timm CNNs, :mod:`mwm.mim.spark`) and ``mae`` (timm
ViTs, :mod:`mwm.mim.mae`).

One micro-step: the masking strategy (``cfg.masking``, :mod:`mwm.masking`) draws keep-masks on the device from
this rank's generator, seeing the augmented images in [0, 1], the ROI boxes, saliency maps and the previous
micro-step's outputs as it requires; the images are normalized; ``model(x, keep)["loss"]`` is the loss. The logs
are the realised mask ratio and the masked / total ROI and background cells as fractions of the batch's cells, so
in/out ratios pool over micro-steps and ranks (a batch without any ROI cell adds nothing instead of a ratio of 0).

``model.target: meijering`` (M&M reading (b), :mod:`mwm.mim.loss`): the loader carries each image's Meijering map
(the ``rois`` manifest of ``mwm importance meijering``, cropped and flipped with the image) and the model
reconstructs the map instead of the pixels; there are no reconstruction pictures then.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ...errors import MWMError
from ...mim import MAEConfig, SparKConfig
from .base import PretrainMethod
from .registry import register_method

if TYPE_CHECKING:
    from ..config import PretrainConfig
    from ..data import PretrainData

__all__ = ["MaskedViews", "MaskedImageModeling", "SparKMethod", "MAEMethod", "mean_ratios"]


@dataclass
class MaskedViews:
    """One batch as the MIM model sees it: normalized images, the keep-mask (True = visible) and its statistics."""

    x: torch.Tensor
    keep: torch.Tensor
    stats: dict[str, torch.Tensor]
    target: torch.Tensor | None = None  # (B, 1, H, W) map the model reconstructs (model.target meijering)


def mean_ratios(rows: list[dict], cfg: "PretrainConfig") -> dict:
    """Realised mask ratios averaged over the run's logged rows (metrics.csv): overall, and inside / outside the
    ROI — for the saliency strategies, the salient half of each image's patches / the other half — so
    summary.json shows whether the guided region was masked more."""
    from ...masking import strategy_requires

    out: dict = {}
    for k in ("mask_ratio", "mask_ratio_in", "mask_ratio_out"):
        vals = [r[k] for r in rows if r.get(k) is not None]
        out[k] = float(np.mean(vals)) if vals else None
    saliency = "saliency" in strategy_requires(cfg.masking.strategy)
    out["in_means"] = ("the top half of each image's patches by saliency" if saliency
                       else "the ROI patches" if cfg.rois is not None else None)
    return out


class MaskedImageModeling(PretrainMethod):
    """A MIM model (``forward(x, keep, **forward_kwargs()) -> {"loss", "pred", …}``) with a masking strategy."""

    def __init__(self, cfg: "PretrainConfig"):
        from ...masking import create_masker
        from ...mim import create_mim_model

        try:
            model = create_mim_model(cfg.model)
        except ValueError as e:
            raise MWMError(str(e)) from e
        super().__init__(cfg, model)
        self.grid = model.grid(cfg.size)
        self.masker = create_masker(cfg.masking)
        self.wants_outputs = "model_outputs" in self.masker.requires  # only then are a step's outputs kept
        self._prev_outputs = None

    def forward_kwargs(self) -> dict:
        return {}

    def views(self, batch: tuple[torch.Tensor, ...]) -> MaskedViews:
        from ...masking import MaskingBatch

        x, boxes, valid, *smap = batch
        rois = self.ctx.data.has_rois
        # the saliency map (B, S, S) comes only with the saliency strategies
        keep, stats = self.masker(MaskingBatch(
            batch_size=x.shape[0], grid=self.grid, generator=self.ctx.generator, device=self.ctx.device, images=x,
            boxes=boxes if rois else None, valid=valid if rois else None, importance=smap[0] if smap else None,
            outputs=self._prev_outputs))
        target = smap[0][:, None] if smap and self.map_target else None  # the map in [0, 1], not normalized
        return MaskedViews(self.normalize(x), keep, stats, target)

    @property
    def map_target(self) -> bool:
        """The model reconstructs a map (``model.target`` meijering), not the pixels."""
        return getattr(self.cfg.model, "target", "pixels") != "pixels"

    def training_step(self, views: MaskedViews) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        extra = {} if views.target is None else {"target": views.target}
        outputs = self.net(views.x, views.keep, **self.forward_kwargs(), **extra)
        loss = outputs["loss"]
        if self.wants_outputs:
            self._prev_outputs = {k: v.detach() for k, v in outputs.items() if isinstance(v, torch.Tensor)}
            self.masker.update(self._prev_outputs)
        return loss, self._mask_logs(loss.detach(), views.stats)

    @staticmethod
    def _mask_logs(loss: torch.Tensor, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The realised ratio and the masked-ROI / ROI / masked-background / background fractions of the cells."""
        dt = loss.dtype
        ratio = stats["mask_ratio"].to(dt)
        if "roi_fraction" not in stats:
            z = torch.zeros((), dtype=dt, device=loss.device)
            return {"mask_ratio": ratio, "roi_masked": z, "roi": z, "background_masked": z, "background": z}
        f = stats["roi_fraction"].to(dt)
        return {"mask_ratio": ratio, "roi_masked": stats["mask_ratio_in"].to(dt) * f, "roi": f,
                "background_masked": stats["mask_ratio_out"].to(dt) * (1 - f), "background": 1 - f}

    def log_row(self, means: dict[str, float]) -> dict[str, Any]:
        rois = self.ctx.data.has_rois
        return {"loss": means["loss"], "mask_ratio": means["mask_ratio"],
                "mask_ratio_in": means["roi_masked"] / means["roi"] if rois and means["roi"] > 0 else None,
                "mask_ratio_out": (means["background_masked"] / means["background"]
                                   if rois and means["background"] > 0 else None)}

    def hook_info(self, views: MaskedViews) -> dict:
        return {"keep": views.keep.detach().cpu()}

    def rank_state_dict(self) -> dict[str, Any]:
        return {"masking": self.masker.state_dict()}  # per rank, as the mask generators

    def load_rank_state_dict(self, state: dict[str, Any]) -> None:
        self.masker.load_state_dict(state.get("masking") or {})

    def summary_fields(self, rows: list[dict]) -> dict:
        return {"masking": self.cfg.masking.strategy, "mask_grid": list(self.grid),  # (h, w) cells the masker drew on
                "mask_ratios": mean_ratios(rows, self.cfg)}

    @classmethod
    def check_config(cls, cfg: "PretrainConfig") -> None:
        if getattr(cfg.model, "target", "pixels") == "meijering" and cfg.rois is None:
            raise ValueError("model.target meijering reconstructs each image's Meijering map: give rois = the "
                             "rois.jsonl of `mwm importance meijering DATA --out MAPS` (--rois MAPS/rois.jsonl)")

    def preview_set(self, data: "PretrainData", k: int):
        from ..recon import ReconSet

        if self.map_target:
            return None  # the pictures show pixels; a map target has none to paste in

        return ReconSet(data.images, data.boxes, k, self.masker, self.grid, self.cfg.seed, data.has_rois,
                        saliency=data.saliency)

    def reconstruct(self, previews) -> np.ndarray:
        from ..recon import render_recon

        return render_recon(self.model, previews, self.mean, self.std, self.ctx.device, self.forward_kwargs())


class SparKMethod(MaskedImageModeling):
    """SparK (Tian et al., ICLR 2023): sparse CNN encoder + light UNet decoder; SparK's lr / wd schedule."""

    schedule_defaults = {"warmup_start_ratio": 0.005, "final_lr_ratio": 0.001, "weight_decay_end": 0.2}


class MAEMethod(MaskedImageModeling):
    """MAE (He et al., CVPR 2022) on a timm ViT: the masked tokens are dropped, so every image keeps the same count.
    MAE's schedule: warmup from 0, cosine to 0, constant weight decay."""

    schedule_defaults = {"warmup_start_ratio": 0.0, "final_lr_ratio": 0.0, "weight_decay_end": None}

    @classmethod
    def check_config(cls, cfg: "PretrainConfig") -> None:
        super().check_config(cfg)
        from ...masking import visible_count

        if visible_count(cfg.masking, 16) is None:
            raise ValueError("the MAE (ViT) path drops masked tokens and needs the same visible count in every "
                             f"image; the '{cfg.masking.strategy}' strategy varies it (the two-level 'roi' with ROI "
                             "size). Use --masking roi_overall (MWM at a fixed overall ratio), soft, topk, "
                             "saliency_soft, saliency_topk or random")

    def forward_kwargs(self) -> dict:
        # giving MAE the (exact, known) visible count avoids reading it from the mask, a host sync per step; the
        # strategy says how many it keeps (those that vary it are refused by check_config)
        from ...masking import visible_count

        return {"n_visible": visible_count(self.cfg.masking, self.grid[0] * self.grid[1])}


register_method("spark", SparKConfig, SparKMethod, help="SparK, timm CNNs (resnet*, convnext*)")
register_method("mae", MAEConfig, MAEMethod, help="MAE, timm ViTs (vit_*, deit_*)")
