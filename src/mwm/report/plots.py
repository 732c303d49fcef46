"""Matplotlib figures for runs and benches (Agg backend, written atomically as PNG)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..io import atomic_path

__all__ = ["loss_curves", "metric_bars", "ratio_sweep", "bench_plots"]


def _fig(w: float = 5.5, h: float = 3.5):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(w, h), dpi=110)


def _save(plt, fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def loss_curves(runs: dict[str, str | Path], path: str | Path, title: str = "pretraining loss") -> Path | None:
    """One line per run: masked-patch loss vs optimizer step from each run's ``metrics.csv``."""
    from ..train.metrics import read_metrics

    plt, fig, ax = _fig()
    drawn = 0
    for name, csv_path in runs.items():
        if not Path(csv_path).is_file():
            continue
        rows = [r for r in read_metrics(csv_path) if r.get("loss") is not None]
        if rows:
            ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=name, lw=1.4)
            drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("masked-patch MSE")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, Path(path))


def metric_bars(names: list[str], means: list[float], stds: list[float | None], path: str | Path,
                metric: str, title: str = "") -> Path:
    """Bar per arm with ±1 std error bars (metric ×100)."""
    plt, fig, ax = _fig(max(4.0, 0.9 * len(names) + 2), 3.5)
    x = np.arange(len(names))
    ax.bar(x, np.asarray(means) * 100, yerr=[0 if s is None else s * 100 for s in stds], capsize=4,
           color=["#888888" if n.startswith(("scratch", "none")) else "#3b75af" for n in names])
    ax.set_xticks(x, names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(f"{metric} ×100")
    lo = min(m - (s or 0) for m, s in zip(means, stds)) * 100
    ax.set_ylim(max(0.0, lo - 5), None)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    return _save(plt, fig, Path(path))


def ratio_sweep(points: dict[str, list[tuple[float, float, float | None]]], path: str | Path, metric: str,
                title: str = "") -> Path:
    """Metric vs overall mask ratio, one line per strategy: points[strategy] = [(ratio, mean, std), …]."""
    plt, fig, ax = _fig()
    for name, pts in points.items():
        pts = sorted(pts)
        r = [p[0] for p in pts]
        m = np.array([p[1] for p in pts]) * 100
        s = np.array([0.0 if p[2] is None else p[2] for p in pts]) * 100
        ax.plot(r, m, marker="o", label=name)
        ax.fill_between(r, m - s, m + s, alpha=0.15)
    ax.set_xlabel("overall mask ratio (realised)")
    ax.set_ylabel(f"{metric} ×100")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, Path(path))


def roi_quality_curve(points: list[tuple[str, float, float, float, float | None]], path: str | Path, metric: str,
                      baseline: str, title: str = "") -> Path:
    """Benefit vs ROI quality: one point per guided arm at its ROIs' occlusion precision (x), the paired
    difference of ``metric`` to ``baseline`` (y, ×100) with its 95 % interval; labelled with the arm and its
    ROI recall. points = [(arm, precision, recall, diff, ci half-width or None), …]."""
    plt, fig, ax = _fig()
    for name, p, r, d, ci in sorted(points, key=lambda t: t[1]):
        ax.errorbar([p], [d * 100], yerr=[[0 if ci is None else ci * 100]], fmt="o", capsize=4)
        ax.annotate(f"{name} (recall {r:.2f})", (p, d * 100), textcoords="offset points", xytext=(5, 5), fontsize=7)
    ax.axhline(0, color="#888888", lw=1)
    ax.set_xlabel("ROI occlusion precision (|box ∩ mask| / |box|)")
    ax.set_ylabel(f"Δ {metric} vs {baseline} ×100 (95 % CI)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _save(plt, fig, Path(path))


def bench_plots(cfg, rows: list[dict], out: str | Path) -> list[Path]:
    """Per task: bars of the first main metric per arm; a mask-ratio sweep when ≥ 2 arms of one strategy (and
    one ROI source) differ in realised ratio; loss curves of every arm's first seed."""
    from ..bench.runner import run_dir
    from ..bench.tables import MAIN_METRICS, choose_baseline, describe_rois, summarize

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
        for arm in cfg.arms:
            sel = [r for r in rows if r["arm"] == arm.name and r["task"] == task.label and r.get(metric) is not None
                   and r.get("realised_mask_ratio") is not None]
            if sel:
                vals = [r[metric] for r in sel]
                line = arm.strategy if arm.rois is None else f"{arm.strategy}, {describe_rois(arm.rois)}"
                pts.setdefault(line, []).append(
                    (float(np.mean([r["realised_mask_ratio"] for r in sel])), float(np.mean(vals)),
                     float(np.std(vals, ddof=1)) if len(vals) > 1 else None))
        pts = {k: v for k, v in pts.items() if len({round(p[0], 2) for p in v}) >= 2}  # a line needs 2 ratios
        if pts:
            paths.append(ratio_sweep(pts, out / f"{task.label}_sweep.png", metric,
                                     f"{cfg.name}: {task.label} vs mask ratio"))
        quality = []
        for r in recs:
            q = [x for x in rows if x["arm"] == r["arm"] and x["task"] == task.label and x.get("roi_precision") is not None]
            if q and "diff" in r:
                quality.append((r["arm"], float(np.mean([x["roi_precision"] for x in q])),
                                float(np.mean([x["roi_recall"] for x in q])), r["diff"], r.get("diff_ci")))
        if len(quality) >= 2:
            paths.append(roi_quality_curve(quality, out / f"{task.label}_roi_quality.png", metric,
                                           choose_baseline(cfg, rows), f"{cfg.name}: {task.label} vs ROI quality"))
    curves = {a.name: run_dir(cfg, a.name, cfg.seeds_of(a)[0]) / "pretrain" / "metrics.csv"
              for a in cfg.arms if a.pretrain}
    p = loss_curves(curves, out / "pretrain_loss.png", f"{cfg.name}: pretraining loss (each arm's first seed)")
    if p is not None:
        paths.append(p)
    return paths
