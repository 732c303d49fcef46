"""The bench's figures: what to draw from the result rows of :func:`mwm.bench.runner.run_bench` (the figures
themselves are :mod:`mwm.report.plots`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..report.plots import loss_curves, metric_bars, ratio_sweep, roi_quality_curve
from .config import run_dir
from .tables import MAIN_METRICS, choose_baseline, describe_rois, summarize

__all__ = ["bench_plots"]


def bench_plots(cfg, rows: list[dict], out: str | Path) -> list[Path]:
    """Per task: bars of the first main metric per arm; a mask-ratio sweep (a line per method × strategy, and the
    arm's own ROI source) when ≥ 2 arms of one of them differ in realised ratio, the others as single points; loss
    curves of every arm's first seed."""
    out = Path(out)
    paths: list[Path] = []
    summary = summarize(cfg, rows)
    for task in cfg.tasks:
        metric = MAIN_METRICS[task.kind][0]
        recs = [r for r in summary if r["task"] == task.label and r["metric"] == metric]
        if recs:
            paths.append(metric_bars([r["arm"] for r in recs], [r["mean"] for r in recs], [r["std"] for r in recs],
                                     out / f"{task.label}_{metric}.png", metric, f"{cfg.name}: {task.label}"))
        pts: dict[str, list] = {}
        several = len({cfg.method_of(a) for a in cfg.arms if a.pretrain}) > 1
        for arm in cfg.arms:
            sel = [r for r in rows if r["arm"] == arm.name and r["task"] == task.label and r.get(metric) is not None
                   and r.get("realised_mask_ratio") is not None]
            if sel:
                vals = [r[metric] for r in sel]
                # one line per method × strategy (× the arm's own ROI source); the method named when there are two
                line = f"{cfg.method_of(arm)} {cfg.strategy_of(arm)}" if several else str(cfg.strategy_of(arm))
                line = line if arm.rois is None else f"{line}, {describe_rois(arm.rois)}"
                pts.setdefault(line, []).append(
                    (float(np.mean([r["realised_mask_ratio"] for r in sel])), float(np.mean(vals)),
                     float(np.std(vals, ddof=1)) if len(vals) > 1 else None))
        # drawn when some family sweeps the ratio (a line needs 2 ratios); a family at one ratio (e.g. MWM 0.4)
        # is then a point with its std beside the lines, the comparison the paper's Fig. 4 makes
        if any(len({round(p[0], 2) for p in v}) >= 2 for v in pts.values()):
            paths.append(ratio_sweep(pts, out / f"{task.label}_sweep.png", metric,
                                     f"{cfg.name}: {task.label} vs mask ratio"))
        quality = []
        arms = {a.name: a for a in cfg.arms}
        for r in recs:
            q = [x for x in rows if x["arm"] == r["arm"] and x["task"] == task.label and x.get("roi_precision") is not None]
            if q and "diff" in r:
                quality.append((r["arm"], float(np.mean([x["roi_precision"] for x in q])),
                                float(np.mean([x["roi_recall"] for x in q])), r["diff"], r.get("diff_ci"),
                                _masking_label(cfg, arms[r["arm"]])))
        if len(quality) >= 2:
            paths.append(roi_quality_curve(quality, out / f"{task.label}_roi_quality.png", metric,
                                           choose_baseline(cfg, rows), f"{cfg.name}: {task.label} vs ROI quality"))
    curves = {a.name: run_dir(cfg, a.name, cfg.seeds_of(a)[0]) / "pretrain" / "metrics.csv"
              for a in cfg.arms if a.pretrain}
    p = loss_curves(curves, out / "pretrain_loss.png", f"{cfg.name}: pretraining loss (each arm's first seed)")
    if p is not None:
        paths.append(p)
    return paths


def _masking_label(cfg, arm) -> str:
    """The arm's masking without its ROI source, e.g. ``spark roi_overall ratio=0.4 ratio_in=0.8``: arms that share
    it differ only in their ROIs, so they form one benefit-vs-ROI-quality curve."""
    params = " ".join(f"{k}={v}" for k, v in sorted(arm.masking.items()) if k != "strategy")
    return f"{cfg.method_of(arm)} {cfg.strategy_of(arm)} {params}".strip()
