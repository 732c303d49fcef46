"""ROI manifests without a VLM, by source name: the entry point of ``mwm data gt-rois`` and of the benchmark's
ROI parts.

``gt-boxes`` (oracle boxes around ground-truth masks, optionally perturbed) and ``foreground`` (classical
lung-field / body / brain boxes) need no model and live in :mod:`mwm.rois` (:mod:`mwm.rois.gt_rois`,
:mod:`mwm.rois.perturb`, :mod:`mwm.rois.foreground`); ``reconstruction-error`` scores the images with a
pretraining run (:mod:`mwm.localize.recon_error`), so its dispatch sits here, above pretraining's outputs.
The names of :mod:`mwm.rois.gt_rois` are re-exported for code written before the move.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from ..errors import DataError
from ..rois.gt_rois import ROI_SOURCES, gt_rois, perturb_summary, select, with_fallback
from ..rois.gt_rois import write_gt_rois as _write_rois
from ..rois.perturb import PerturbConfig

__all__ = ["ROI_SOURCES", "gt_rois", "perturb_summary", "select", "with_fallback", "write_gt_rois", "PerturbConfig"]


def _recon_records(data, recon: dict | None, seed: int, box_mode: str, expand: float):
    """``records(indices)`` for :func:`mwm.rois.gt_rois.write_gt_rois`: reconstruction-error boxes of a run."""
    def records(indices: list[int] | None) -> tuple[list[dict], dict]:
        from .recon_error import load_run, recon_error_records

        opts = dict(recon or {})
        if opts.get("run") is None:
            raise DataError("source reconstruction-error needs a pretraining run folder (--run RUN, made by "
                            "`mwm pretrain`; a few epochs of random masking suffice)")
        rr = load_run(opts.pop("run"), opts.pop("device", "cpu"))
        recs = recon_error_records(data, rr, seed=seed, box_mode=box_mode, expand=expand, indices=indices, **opts)
        extra = {"run": str(rr.path), "run_sha256": rr.sha256, "seed": seed,
                 **{k: (str(v) if isinstance(v, Path) else v) for k, v in opts.items() if k != "batch_size"}}
        return recs, extra

    return records


def write_gt_rois(data: str | Path, out: str | Path, expand: float = 0.1,
                  box_mode: Literal["union", "per_component"] = "union", fallback: str | Path | None = None, *,
                  source: Literal["gt-boxes", "foreground", "reconstruction-error"] = "gt-boxes",
                  perturb: PerturbConfig | dict | None = None, seed: int = 0,
                  kind: Literal["lungs", "body", "brain"] = "lungs", split: str | None = None,
                  limit: int | None = None, recon: dict | None = None) -> dict:
    """Write the manifest of ``source`` (atomically) and a meta.json beside it; returns the meta (counts,
    settings). As :func:`mwm.rois.gt_rois.write_gt_rois`, plus ``reconstruction-error``
    (:func:`mwm.localize.recon_error.recon_error_records` with the keyword arguments ``recon``: ``run``
    (required), ``masks``, ``ratio``, ``level``, ``binarize``, ``quantile``, ``components``, ``maps_out``,
    ``device``, ``batch_size``; its masks seeded by ``seed``)."""
    records = None
    if source == "reconstruction-error" and perturb is None:
        records = _recon_records(data, recon, seed, box_mode, expand)
    return _write_rois(data, out, expand, box_mode, fallback, source=source, perturb=perturb, seed=seed, kind=kind,
                       split=split, limit=limit, records=records)
