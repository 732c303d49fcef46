"""Matplotlib figures for runs and benches (Agg backend, written atomically as PNG).

Figures from plain numbers and files; what to draw for a bench is decided in :mod:`mwm.bench.plots`
(``report`` imports nothing above ``data``, ``masking`` and ``mim``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..io import atomic_path

__all__ = ["loss_curves", "metric_bars", "ratio_sweep", "roi_quality_curve"]


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


def _loss_series(path: Path) -> tuple[list[int], list[float]]:
    """(steps, losses) of the rows of a run's ``metrics.csv`` that have a loss (columns by name, as
    :mod:`mwm.train.metrics` writes them; read here so that report does not import train)."""
    import csv

    steps, losses = [], []
    with path.open(newline="") as f:
        for r in csv.DictReader(f):
            if r.get("loss"):
                steps.append(int(r["step"]))
                losses.append(float(r["loss"]))
    return steps, losses


def loss_curves(runs: dict[str, str | Path], path: str | Path, title: str = "pretraining loss") -> Path | None:
    """One line per run: masked-patch loss vs optimizer step from each run's ``metrics.csv``."""
    plt, fig, ax = _fig()
    drawn = 0
    for name, csv_path in runs.items():
        if not Path(csv_path).is_file():
            continue
        steps, losses = _loss_series(Path(csv_path))
        if steps:
            ax.plot(steps, losses, label=name, lw=1.4)
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
    """Metric vs overall mask ratio, one line per strategy: points[strategy] = [(ratio, mean, std), …]; a
    strategy at a single ratio is one point with its std as an error bar."""
    plt, fig, ax = _fig()
    for name, pts in points.items():
        pts = sorted(pts)
        r = [p[0] for p in pts]
        m = np.array([p[1] for p in pts]) * 100
        s = np.array([0.0 if p[2] is None else p[2] for p in pts]) * 100
        if len(pts) == 1:
            ax.errorbar(r, m, yerr=s, fmt="s", capsize=4, label=name)
            continue
        ax.plot(r, m, marker="o", label=name)
        ax.fill_between(r, m - s, m + s, alpha=0.15)
    ax.set_xlabel("overall mask ratio (realised)")
    ax.set_ylabel(f"{metric} ×100")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, Path(path))


def roi_quality_curve(points: list[tuple], path: str | Path, metric: str, baseline: str, title: str = "") -> Path:
    """Benefit vs ROI quality: one point per guided arm at its ROIs' occlusion precision (x), the paired
    difference of ``metric`` to ``baseline`` (y, ×100) with its 95 % interval; labelled with the arm and its
    ROI recall. points = [(arm, precision, recall, diff, ci half-width or None, group), …]: the arms of one group
    (the same masking, ROIs of different quality) are joined by a line in the order of precision, the curve a
    user reads off for their localizer; a group of one is a lone point."""
    plt, fig, ax = _fig(6.5, 4.0)
    groups: dict[str, list] = {}
    for pt in sorted(points, key=lambda t: t[1]):
        groups.setdefault(pt[5], []).append(pt)
    for group, pts in groups.items():
        xs, ys = [p for _, p, *_ in pts], [d * 100 for _, _, _, d, *_ in pts]
        errs = [0 if ci is None else ci * 100 for *_, ci, _ in pts]
        ax.errorbar(xs, ys, yerr=errs, fmt="o-" if len(pts) > 1 else "o", capsize=4, label=group)
        for name, p, r, d, *_ in pts:
            ax.annotate(f"{name} (recall {r:.2f})", (p, d * 100), textcoords="offset points", xytext=(5, 5),
                        fontsize=7)
    ax.axhline(0, color="#888888", lw=1)
    ax.set_xlabel("ROI occlusion precision (|box ∩ mask| / |box|)")
    ax.set_ylabel(f"Δ {metric} vs {baseline} ×100 (95 % CI)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, title="masking", title_fontsize=7)
    return _save(plt, fig, Path(path))
