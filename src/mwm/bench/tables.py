"""Bench tables: ``results.csv`` (one row per arm × seed × task) and ``results.md`` (mean ± std over seeds per
arm and task, and the paired difference to the baseline arm with a 95 % t-interval).

The difference is paired by seed (arm and baseline share the seed, hence data order and transfer
initialisation), so its interval is ``mean(d) ± t_{0.975, n−1} · sd(d) / √n`` over the per-seed differences
``d``; with one seed there is no interval. std is the sample standard deviation (ddof = 1).
"""

from __future__ import annotations

import csv
import io
import math

import numpy as np

from ..io import atomic_write_text
from .config import ArmConfig, BenchConfig, ChoiceConfig, TaskConfig

__all__ = ["MAIN_METRICS", "result_row", "summarize", "write_tables", "paired_difference", "choose_baseline",
           "choose_best", "matched_ratio_differences"]

# What each task kind reports in results.md (results.csv has every scalar metric).
MAIN_METRICS: dict[str, list[str]] = {
    "linear": ["accuracy", "balanced_accuracy", "macro_f1", "auroc"],
    "full": ["accuracy", "balanced_accuracy", "macro_f1", "auroc"],
    "segment": ["dice", "iou"],
    "detect": ["box_ap", "box_ap75", "mask_ap", "mask_ap75"],
}
# How far apart two realised overall mask ratios may be to count as matched (one cell of an 8 x 8 grid is 0.016;
# the random arms of the evidence configs are 0.1 apart, so every ratio in their range has one within 0.05)
MATCH_TOLERANCE = 0.05


def result_row(arm: ArmConfig, seed: int, task: TaskConfig, metrics: dict, summary: dict, ratios: dict,
               task_seconds: float, roi_quality: dict | None = None, method: str | None = "",
               strategy: str | None = "") -> dict:
    """One flat row: arm, pretraining method, strategy, the arm's nominal ratios, seed, task, every scalar metric,
    pretraining seconds / final loss / mask grid, realised mask ratios, and the ROI quality of a guided arm's
    manifest (``roi_precision`` / ``roi_recall`` against the data's masks). ``method`` / ``strategy``: the bench's
    resolution (:meth:`BenchConfig.method_of` / ``strategy_of``; None → "none"); default: the arm's own."""
    m = arm.masking
    if method == "":
        method = (arm.method or "spark") if arm.pretrain else None
    if strategy == "":
        strategy = arm.strategy
    row = {"arm": arm.name, "method": method or "none", "strategy": strategy or "none", "ratio": m.get("ratio"),
           "ratio_in": m.get("ratio_in"), "ratio_out": m.get("ratio_out"), "seed": seed, "task": task.label,
           "kind": task.kind}
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            row[k] = v
    for k, v in (metrics.get("val") or {}).items():  # what model selection saw: baselines are chosen on these
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            row[f"val_{k}"] = v
    row["task_seconds"] = metrics.get("seconds", task_seconds)
    row["pretrain_seconds"] = summary.get("seconds")
    row["pretrain_final_loss"] = summary.get("final_loss")
    grid = summary.get("mask_grid")
    row["mask_grid"] = f"{grid[0]}x{grid[1]}" if grid else None
    for k in ("mask_ratio", "mask_ratio_in", "mask_ratio_out"):
        row[f"realised_{k}"] = ratios.get(k)
    cm = metrics.get("confusion_matrix")
    if cm:  # rows are the true classes: what always predicting the most frequent test class scores
        row["majority_accuracy"] = max(map(sum, cm)) / sum(map(sum, cm))
    row.update(roi_quality or {})
    return row


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float | None]:
    """(mean of a − b, half-width of its 95 % t-interval or None with < 2 pairs)."""
    from scipy import stats

    d = np.asarray(a, float) - np.asarray(b, float)
    if len(d) < 2:
        return float(d.mean()), None
    return float(d.mean()), float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)))


def _fmt(mean: float, sd: float | None, pct: bool) -> str:
    s = 100.0 if pct else 1.0
    return f"{mean * s:.1f} ± {sd * s:.1f}" if sd is not None else f"{mean * s:.1f}"


def choose_best(cfg: BenchConfig, among: list[str], rows: list[dict]) -> str | None:
    """The arm of ``among`` with the best mean validation score of the first task's first metric
    (``val_<metric>``; never the test score) over each arm's own seeds (seeds a choice gives the winner afterwards
    do not count); None without any."""
    task = cfg.tasks[0]
    key = f"val_{MAIN_METRICS[task.kind][0]}"
    arms = {a.name: a for a in cfg.arms}
    scores = {}
    for name in among:
        own = set(cfg.seeds_of(arms[name]))
        vals = [r[key] for r in rows if r["arm"] == name and r["task"] == task.label and r.get(key) is not None
                and r["seed"] in own]
        if vals:
            scores[name] = float(np.mean(vals))
    return max(scores, key=scores.get) if scores else None


def candidates_done(cfg: BenchConfig, choice: ChoiceConfig, rows: list[dict]) -> list[str]:
    """The candidates of ``choice`` that have a first-task row for each of their own seeds."""
    arms = {a.name: a for a in cfg.arms}
    label = cfg.tasks[0].label
    return [name for name in choice.among
            if set(cfg.seeds_of(arms[name])) <= {r["seed"] for r in rows if r["arm"] == name and r["task"] == label}]


def choice_made(cfg: BenchConfig, choice: ChoiceConfig, rows: list[dict]) -> str | None:
    """The arm ``choice`` picks (best mean validation score, :func:`choose_best`) once every
    candidate has a first-task row for each of its own seeds; None before (a choice is never made on part of the
    seeds)."""
    if len(candidates_done(cfg, choice, rows)) < len(choice.among):
        return None
    return choose_best(cfg, choice.among, rows)


def choose_baseline(cfg: BenchConfig, rows: list[dict]) -> str | None:
    """The baseline arm: ``cfg.baseline`` (or the first random arm), or with ``baseline_from`` the listed arm with
    the best validation score (:func:`choose_best`)."""
    if not cfg.baseline_from:
        return cfg.baseline_arm
    return choose_best(cfg, cfg.baseline_from, rows)


def _by_seed(rows: list[dict], arm: str, task: str, metric: str) -> dict[int, float]:
    """seed → ``metric`` of ``arm``'s rows for ``task`` (rows without the metric left out)."""
    return {r["seed"]: r[metric] for r in rows if r["arm"] == arm and r["task"] == task and r.get(metric) is not None}


def _mean_of(rows: list[dict], arm: str, task: str, key: str) -> float | None:
    """Mean of ``key`` over ``arm``'s rows for ``task`` (None when no row has it)."""
    v = list(_by_seed(rows, arm, task, key).values())
    return float(np.mean(v)) if v else None


def _paired(a: dict[int, float], b: dict[int, float]) -> dict:
    """``{diff, diff_ci, diff_n}`` of a − b over their common seeds (:func:`paired_difference`); {} with none."""
    common = sorted(set(a) & set(b))
    if not common:
        return {}
    diff, ci = paired_difference([a[s] for s in common], [b[s] for s in common])
    return {"diff": diff, "diff_ci": ci, "diff_n": len(common)}


def summarize(cfg: BenchConfig, rows: list[dict]) -> list[dict]:
    """Per task × arm × main metric: n, mean, std, and the paired difference to the baseline (same seeds)."""
    base = choose_baseline(cfg, rows)
    out = []
    for task in cfg.tasks:
        for arm in cfg.arms:
            for metric in MAIN_METRICS[task.kind]:
                sel = _by_seed(rows, arm.name, task.label, metric)
                if not sel:
                    continue
                vals = list(sel.values())
                rec = {"task": task.label, "arm": arm.name, "metric": metric, "n": len(vals),
                       "mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else None}
                if base and arm.name != base:
                    rec.update(_paired(sel, _by_seed(rows, base, task.label, metric)))
                out.append(rec)
    return out


def describe_rois(rois) -> str:
    """A RoiSourceConfig in words, e.g. "gt-boxes (expand 0.1) + fallback loc/rois.jsonl"."""
    if rois.source == "manifest":
        return f"manifest {rois.path}"
    if rois.source == "meijering":
        return f"Meijering maps (sigmas {rois.sigmas})"
    if rois.source == "gt-boxes":
        return f"gt-boxes (expand {rois.expand})" + (f" + fallback {rois.fallback}" if rois.fallback else "")
    return rois.source


def _choice_note(cfg: BenchConfig, choice: ChoiceConfig, rows: list[dict]) -> str:
    """The header's clause for one choice made on val: the arm it picked, or, before every candidate has its own
    seeds, the provisional leader (the baseline's Δ column is measured against it) and what is still missing."""
    key = f"mean validation {MAIN_METRICS[cfg.tasks[0].kind][0]} ({cfg.tasks[0].label})"
    made = choice_made(cfg, choice, rows)
    if made is not None:
        return f"; {choice.name}: `{made}`, the best of {choice.among} by {key}"
    done = len(candidates_done(cfg, choice, rows))
    leader = choose_best(cfg, choice.among, rows)
    return (f"; {choice.name}: not chosen yet ({done} of {len(choice.among)} of {choice.among} have all their "
            f"seeds" + (f"; `{leader}` leads so far by {key}" if leader else "") + ")")


def is_guided(cfg: BenchConfig, arm: ArmConfig) -> bool:
    """An arm that pretrains with something other than plain random masking of pixels (an ROI, an importance map,
    a loss predictor, a teacher's attention, a map target, or a contrastive objective): the arms the bench's
    question is about."""
    plain = cfg.strategy_of(arm) == "random" and cfg.method_of(arm) in ("spark", "mae") and not cfg.map_target(arm)
    return arm.pretrain and not plain


def verdict(diff: float, half_width: float | None) -> str:
    """The plain reading of a paired difference and its 95 % interval half-width (``None``: one seed)."""
    if half_width is None or not math.isfinite(half_width):
        return "no interval yet"
    if diff - half_width > 0:
        return "better: the interval excludes 0"
    if diff + half_width < 0:
        return "worse: the interval excludes 0"
    return "no detectable difference: the interval includes 0"


def _difference_text(rec: dict) -> str:
    """e.g. "-1.0 (95 % CI -2.9 … +0.9)" (×100) for a record with ``diff`` / ``diff_ci``."""
    d, hw = rec["diff"] * 100, rec["diff_ci"]
    return f"{d:+.1f}" + ("" if hw is None else f" (95 % CI {d - hw * 100:+.1f} … {d + hw * 100:+.1f})")


def _difference_in_words(label: str, rec: dict) -> str:
    """e.g. "`mwm-0.4` -1.0 (95 % CI -2.9 … +0.9), 5 seeds: no detectable difference: …" for a record with
    ``diff`` / ``diff_ci`` / ``diff_n``; ``label`` is the markdown naming what was compared."""
    n = rec["diff_n"]
    return f"{label} {_difference_text(rec)}, {n} seed{'s' if n != 1 else ''}: {verdict(rec['diff'], rec['diff_ci'])}"


def _other_metrics_line(task: TaskConfig, summary: list[dict], guided: list[str]) -> str | None:
    """The answer's sub-line with each guided arm's paired differences on the task's other main metrics (balanced
    accuracy, macro F1, AUROC: what accuracy hides when one class dominates), or None without any."""
    recs = {(r["arm"], r["metric"]): r for r in summary if r["task"] == task.label and "diff" in r}
    said = []
    for name in guided:
        parts = [f"{m} {_difference_text(recs[name, m])}" for m in MAIN_METRICS[task.kind][1:] if (name, m) in recs]
        if parts:
            said.append(f"`{name}` " + ", ".join(parts))
    return ("  - the other metrics, same seeds: " + "; ".join(said) + ".") if said else None


def matched_ratio_differences(cfg: BenchConfig, rows: list[dict], task: TaskConfig,
                              tolerance: float = MATCH_TOLERANCE) -> list[dict]:
    """Each guided masking arm against the plain random arm of the same backbone whose realised overall mask ratio
    is nearest to its own (within ``tolerance``): the paired difference of the task's first metric on their
    common seeds. This separates *where* an arm masks from *how much*: an ROI covering most of the image (lungs
    on a chest X-ray) turns MWM into near-uniform masking at another ratio, which the baseline comparison alone
    would credit to guidance.

    Returns:
        records ``{arm, matched, ratio, matched_ratio, diff, diff_ci, diff_n}``, in arm order (arms without a
        realised ratio, e.g. contrastive ones, or without a random arm in reach are left out).
    """
    metric = MAIN_METRICS[task.kind][0]
    plain = [a for a in cfg.arms if a.pretrain and not is_guided(cfg, a) and cfg.strategy_of(a)]
    out = []
    for arm in [a for a in cfg.arms if is_guided(cfg, a)]:
        ratio = _mean_of(rows, arm.name, task.label, "realised_mask_ratio")
        if ratio is None:
            continue
        same_backbone = [a.name for a in plain if cfg.arch_of(a) == cfg.arch_of(arm)]
        near = [(abs(r - ratio), name, r) for name in same_backbone
                if (r := _mean_of(rows, name, task.label, "realised_mask_ratio")) is not None
                and abs(r - ratio) <= tolerance]
        if not near:
            continue
        _, ref, ref_ratio = min(near)
        paired = _paired(_by_seed(rows, arm.name, task.label, metric), _by_seed(rows, ref, task.label, metric))
        if paired:
            out.append({"arm": arm.name, "matched": ref, "ratio": ratio, "matched_ratio": ref_ratio, **paired})
    return out


def _answer_lines(cfg: BenchConfig, rows: list[dict], summary: list[dict], base: str | None) -> list[str]:
    """The question answered in words for every task's first metric: each guided arm against the baseline, with
    the paired difference, its 95 % interval and what the interval says; then each guided masking arm against
    random masking at the nearest realised ratio (:func:`matched_ratio_differences`)."""
    if base is None:
        return []
    guided = [a.name for a in cfg.arms if is_guided(cfg, a)]
    lines = []
    for task in cfg.tasks:
        metric = MAIN_METRICS[task.kind][0]
        recs = {r["arm"]: r for r in summary if r["task"] == task.label and r["metric"] == metric and "diff" in r}
        said = [_difference_in_words(f"`{name}`", recs[name]) for name in guided if name in recs]
        if said:
            majority = _mean_of(rows, base, task.label, "majority_accuracy") if metric == "accuracy" else None
            chance = "" if majority is None else f"; always predicting the most frequent class: {majority * 100:.1f}"
            lines.append(f"- **{task.label}** ({metric} − `{base}`'s, same seeds{chance}): " + "; ".join(said) + ".")
            other = _other_metrics_line(task, summary, guided)
            if other:
                lines.append(other)
        matched = [m for m in matched_ratio_differences(cfg, rows, task) if m["matched"] != base]
        if matched:
            lines.append("  - at a matched overall mask ratio (− the random arm nearest in realised ratio): "
                         + "; ".join(_difference_in_words(f"`{m['arm']}` − `{m['matched']}` (realised ratio "
                                                          f"{m['ratio']:.2f} vs {m['matched_ratio']:.2f})", m)
                                     for m in matched)
                         + ".")
    return (["## Answer: each arm beyond random masking against the baseline", ""] + lines + [""]) if lines else []


def _markdown(cfg: BenchConfig, rows: list[dict], summary: list[dict]) -> str:
    base = choose_baseline(cfg, rows)
    own = [f"`{a.name}`: {describe_rois(a.rois)}" for a in cfg.arms if a.rois is not None]
    lines = [f"# Bench `{cfg.name}`", "",
             f"Data `{cfg.data}`, {cfg.arch} at {cfg.size} px, seeds {cfg.seeds}"
             + "".join(f" ({a.name}: {a.seeds})" for a in cfg.arms if a.seeds is not None)
             + (f" (+ seeds {cfg.baseline_seeds} for the chosen baseline)" if cfg.baseline_seeds else "")
             + "".join(f" (+ seeds {c.seeds} for the chosen {c.name})" for c in cfg.choose if c.seeds)
             + f", ROIs: {describe_rois(cfg.rois)}"
             + (f" (arms with their own: {'; '.join(own)})" if own else "")
             + ". Metrics ×100, mean ± std over seeds; Δ = paired difference to "
             + (f"`{base}`" if base else "the baseline (none yet)") + " with its 95 % t-interval (same seeds)"
             + "".join(_choice_note(cfg, c, rows) for c in cfg.choices)
             + ".", ""]
    lines += _answer_lines(cfg, rows, summary, base)
    for task in cfg.tasks:
        metrics = MAIN_METRICS[task.kind]
        lines += [f"## {task.label}", "",
                  "| arm | method | mask grid | mask ratio (realised: all / ROI / bg) | ROI precision / recall "
                  "| pretrain s | n | "
                  + " | ".join(metrics) + (f" | Δ {metrics[0]} vs {base}" if base else "") + " |",
                  "|---|---|---|---|---|---|---|" + "---|" * len(metrics) + ("---|" if base else "")]
        for arm in cfg.arms:
            recs = {r["metric"]: r for r in summary if r["task"] == task.label and r["arm"] == arm.name}
            if not recs:
                continue
            arm_rows = [r for r in rows if r["arm"] == arm.name and r["task"] == task.label]

            def avg(key: str, arm: str = arm.name, task: str = task.label) -> float | None:
                return _mean_of(rows, arm, task, key)

            ratios = [avg("realised_mask_ratio"), avg("realised_mask_ratio_in"), avg("realised_mask_ratio_out")]
            rtxt = (" / ".join("–" if v is None else f"{v:.2f}" for v in ratios) if cfg.strategy_of(arm)
                    else "no masks" if arm.pretrain else "no pretraining")
            secs = avg("pretrain_seconds")
            grid = next((r["mask_grid"] for r in arm_rows if r.get("mask_grid")), "–")
            q = [avg("roi_precision"), avg("roi_recall")]
            qtxt = "–" if q[0] is None else f"{q[0]:.2f} / {q[1]:.2f}"
            cells = [_fmt(recs[m]["mean"], recs[m]["std"], True) if m in recs else "–" for m in metrics]
            first = recs.get(metrics[0], {})
            if base:
                if "diff" in first:
                    ci = first.get("diff_ci")
                    cells.append(f"{first['diff'] * 100:+.1f}" + (f" ± {ci * 100:.1f}" if ci is not None else ""))
                else:
                    cells.append("—")
            lines.append(f"| {arm.name} | {cfg.method_of(arm) or 'none'} | {grid} | {rtxt} | {qtxt} | "
                         f"{'–' if secs is None else f'{secs:.0f}'} | "
                         f"{recs[metrics[0]]['n'] if metrics[0] in recs else 0} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def write_tables(cfg: BenchConfig, rows: list[dict]) -> dict:
    """Write OUT/results.csv and OUT/results.md; returns their paths and the summary records."""
    out = cfg.out_dir
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r[k]) for k in cols})
    atomic_write_text(out / "results.csv", buf.getvalue())
    summary = summarize(cfg, rows)
    atomic_write_text(out / "results.md", _markdown(cfg, rows, summary) + "\n")
    return {"csv": out / "results.csv", "md": out / "results.md", "summary": summary}
