"""Bench config validation, tables (mean ± std, paired differences) and plots on hand-made rows."""

from __future__ import annotations

import csv
import math

import pytest
from scipy import stats

from mwm.bench import BenchConfig, summarize, write_tables
from mwm.bench.tables import paired_difference
from mwm.config import ConfigError, resolve


def _cfg(tmp_path, **kw) -> BenchConfig:
    base = {"name": "t", "data": "x.npz", "out": tmp_path, "seeds": [0, 1, 2],
            "rois": {"source": "gt-boxes"},
            "arms": [{"name": "scratch", "pretrain": False},
                     {"name": "random-0.6", "masking": {"strategy": "random", "ratio": 0.6}},
                     {"name": "mwm", "masking": {"strategy": "roi", "ratio_in": 0.8, "ratio_out": 0.2}}],
            "tasks": [{"kind": "linear"}]}
    base.update(kw)
    return BenchConfig.model_validate(base)


def _rows():
    acc = {"scratch": [0.60, 0.62, 0.58], "random-0.6": [0.70, 0.74, 0.72], "mwm": [0.75, 0.76, 0.80]}
    rows = []
    for arm, vals in acc.items():
        for seed, v in enumerate(vals):
            rows.append({"arm": arm, "strategy": "none" if arm == "scratch" else arm[:3], "seed": seed,
                         "task": "linear", "kind": "linear", "accuracy": v, "balanced_accuracy": v,
                         "macro_f1": v - 0.1, "auroc": 0.9, "pretrain_seconds": None if arm == "scratch" else 10.0,
                         "realised_mask_ratio": None if arm == "scratch" else 0.5})
    return rows


def test_paired_difference_matches_t_interval():
    a, b = [0.75, 0.76, 0.80], [0.70, 0.74, 0.72]
    d = [x - y for x, y in zip(a, b)]
    mean, half = paired_difference(a, b)
    sd = math.sqrt(sum((x - sum(d) / 3) ** 2 for x in d) / 2)
    assert mean == pytest.approx(sum(d) / 3)
    assert half == pytest.approx(stats.t.ppf(0.975, 2) * sd / math.sqrt(3))
    assert paired_difference([1.0], [0.5]) == (0.5, None)


def test_summary_mean_std_and_baseline(tmp_path):
    cfg = _cfg(tmp_path)
    assert cfg.baseline_arm == "random-0.6"  # first random arm by default
    summ = summarize(cfg, _rows())
    rec = next(r for r in summ if r["arm"] == "mwm" and r["metric"] == "accuracy")
    assert rec["n"] == 3
    assert rec["mean"] == pytest.approx(0.77)
    assert rec["std"] == pytest.approx(0.026457513, rel=1e-6)
    assert rec["diff"] == pytest.approx(0.77 - 0.72)
    base = next(r for r in summ if r["arm"] == "random-0.6" and r["metric"] == "accuracy")
    assert "diff" not in base


def test_write_tables(tmp_path):
    cfg = _cfg(tmp_path)
    rows = _rows()
    res = write_tables(cfg, rows)
    with open(res["csv"]) as f:
        got = list(csv.DictReader(f))
    assert len(got) == 9 and float(got[0]["accuracy"]) == 0.60
    md = res["md"].read_text()
    assert "| mwm |" in md and "77.0 ± 2.6" in md and "+5.0 ±" in md
    assert "no pretraining" in md


def test_plots(tmp_path):
    from mwm.bench.plots import bench_plots

    cfg = _cfg(tmp_path)
    paths = bench_plots(cfg, _rows(), tmp_path / "plots")
    assert (tmp_path / "plots" / "linear_accuracy.png") in paths
    assert all(p.stat().st_size > 1000 for p in paths)


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="need ROIs"):
        _cfg(tmp_path, rois={"source": "none"})
    with pytest.raises(ValueError, match="unique"):
        _cfg(tmp_path, arms=[{"name": "a"}, {"name": "a"}], rois={"source": "none"})
    with pytest.raises(ValueError, match="baseline"):
        _cfg(tmp_path, baseline="nope")
    with pytest.raises(ValueError, match="rois.path"):
        _cfg(tmp_path, rois={"source": "manifest"})
    y = tmp_path / "b.yaml"
    y.write_text("data: x.npz\narms: [{name: r}]\ntasks: [{kind: lineer}]\n")
    with pytest.raises(ConfigError, match="tasks"):
        resolve(BenchConfig, y)


def test_sweep_lines_need_two_ratios_and_one_roi_source(tmp_path, monkeypatch):
    """Random arms at two realised ratios make a line; two ROI arms with different ROI sources (gt-boxes vs a
    localize manifest) are not joined into one: each is a single point beside the line."""
    import mwm.bench.plots as P

    cfg = _cfg(tmp_path, arms=[
        {"name": "r25", "masking": {"strategy": "random", "ratio": 0.25}},
        {"name": "r50", "masking": {"strategy": "random", "ratio": 0.5}},
        {"name": "gt", "masking": {"strategy": "roi"}},
        {"name": "loc", "masking": {"strategy": "roi"}, "rois": {"source": "manifest", "path": "loc.jsonl"}}])
    ratio = {"r25": 0.25, "r50": 0.5, "gt": 0.52, "loc": 0.55}
    rows = [{"arm": a, "seed": s, "task": "linear", "kind": "linear", "accuracy": 0.7 + 0.01 * s,
             "realised_mask_ratio": r} for a, r in ratio.items() for s in range(3)]
    seen = {}
    monkeypatch.setattr(P, "ratio_sweep", lambda pts, path, *a: seen.update(pts) or path)
    P.bench_plots(cfg, rows, tmp_path / "plots")
    assert [p[0] for p in seen["random"]] == [0.25, 0.5]
    assert {k: [p[0] for p in v] for k, v in seen.items() if k != "random"} == {
        "roi": [0.52], "roi, manifest loc.jsonl": [0.55]}
    # without a family that sweeps the ratio there is no sweep plot
    seen.clear()
    P.bench_plots(cfg, [r for r in rows if r["arm"] != "r25"], tmp_path / "plots2")
    assert seen == {}


def test_roi_quality_columns_and_curve(tmp_path):
    """Guided arms carry their ROIs' precision / recall into the table and the benefit-vs-quality plot."""
    from mwm.bench.plots import bench_plots

    cfg = _cfg(tmp_path, arms=[{"name": "scratch", "pretrain": False},
                               {"name": "random-0.6", "masking": {"strategy": "random", "ratio": 0.6}},
                               {"name": "mwm", "masking": {"strategy": "roi", "ratio_in": 0.8, "ratio_out": 0.2}},
                               {"name": "mwm-bad", "masking": {"strategy": "roi", "ratio_in": 0.8, "ratio_out": 0.2},
                                "rois": {"source": "gt-boxes", "perturb": {"precision": 0.3, "recall": 0.9}}}])
    rows = _rows()
    for seed, v in enumerate([0.71, 0.73, 0.74]):
        rows.append({**rows[-1], "arm": "mwm-bad", "seed": seed, "accuracy": v})
    for r in rows:
        if r["arm"].startswith("mwm"):
            r.update(roi_precision=0.5 if r["arm"] == "mwm" else 0.3, roi_recall=1.0 if r["arm"] == "mwm" else 0.9,
                     mask_grid="8x8")
    write_tables(cfg, rows)
    md = (tmp_path / "results.md").read_text()
    assert "| mwm | spark | 8x8 | 0.50 / – / – | 0.50 / 1.00 |" in md and "| mwm-bad | spark | 8x8 |" in md
    assert "0.30 / 0.90" in md
    paths = bench_plots(cfg, rows, tmp_path / "plots")
    assert tmp_path / "plots" / "linear_roi_quality.png" in paths
    rows = [r for r in rows if r["arm"] != "mwm-bad"]  # one guided arm: no curve
    assert tmp_path / "plots" / "linear_roi_quality.png" not in bench_plots(cfg, rows, tmp_path / "p2")


def test_roi_quality_curve_joins_arms_that_differ_only_in_their_rois(monkeypatch, tmp_path):
    """One curve per masking: MWM with oracle and degraded boxes share one (joined in order of precision); an arm
    at another ratio is a point of its own, not a point on that curve."""
    import mwm.bench.plots as plots

    roi = {"strategy": "roi_overall", "ratio": 0.4, "ratio_in": 0.8}
    cfg = _cfg(tmp_path, arms=[{"name": "random-0.6", "masking": {"strategy": "random", "ratio": 0.6}},
                               {"name": "mwm", "masking": roi},
                               {"name": "mwm-bad", "masking": roi,
                                "rois": {"source": "gt-boxes", "perturb": {"precision": 0.3, "recall": 0.9}}},
                               {"name": "mwm-0.6", "masking": {**roi, "ratio": 0.6}}])
    rows = [{"arm": a, "seed": s, "task": "linear", "accuracy": 0.7 + 0.01 * s + d, "realised_mask_ratio": 0.5,
             **({} if a == "random-0.6" else {"roi_precision": q, "roi_recall": 1.0})}
            for a, d, q in [("random-0.6", 0, None), ("mwm", 0.01, 0.5), ("mwm-bad", -0.01, 0.3),
                            ("mwm-0.6", 0.02, 0.5)] for s in range(3)]
    seen = []
    monkeypatch.setattr(plots, "roi_quality_curve", lambda pts, path, *a, **k: seen.extend(pts) or path)
    plots.bench_plots(cfg, rows, tmp_path / "plots")
    group = {p[0]: p[5] for p in seen}
    assert group["mwm"] == group["mwm-bad"] == "spark roi_overall ratio=0.4 ratio_in=0.8"
    assert group["mwm-0.6"] == "spark roi_overall ratio=0.6 ratio_in=0.8"
    # the real figure draws (a smoke check that the grouped points plot)
    from mwm.report.plots import roi_quality_curve

    assert roi_quality_curve(seen, tmp_path / "q.png", "accuracy", "random-0.6").stat().st_size > 0


def test_roi_quality_is_not_scored_for_importance_maps(tmp_path):
    """A manifest of maps (Meijering, MedIM: no boxes) has no occlusion precision / recall, not 0 / 0; a manifest
    of boxes is scored against the masks."""
    import warnings

    import numpy as np

    from mwm.bench.runner import roi_quality
    from mwm.rois.manifest import write_manifest

    masks = np.zeros((3, 16, 16), np.uint8)
    masks[:, 4:8, 4:8] = 1  # c.png, a test image, is annotated but not in the (pretraining) manifest
    np.savez(tmp_path / "d.npz", images=np.zeros((3, 16, 16), np.uint8), masks=masks,
             filenames=np.array(["a.png", "b.png", "c.png"]), split=np.array(["train", "train", "test"]))
    cfg = _cfg(tmp_path, data=str(tmp_path / "d.npz"))
    rec = {"width": 16, "height": 16, "status": "ok", "prompt": "x"}
    maps = write_manifest(tmp_path / "maps.jsonl", [{**rec, "image": n, "boxes": [], "saliency": f"s/{n}"}
                                                    for n in ("a.png", "b.png")])
    assert roi_quality(cfg, maps) == {}
    boxes = write_manifest(tmp_path / "boxes.jsonl", [{**rec, "image": n, "boxes": [[0.25, 0.25, 0.75, 0.5]]}
                                                      for n in ("a.png", "b.png")])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the test image without an ROI is expected: no warning
        assert roi_quality(cfg, boxes) == {"roi_precision": pytest.approx(0.5), "roi_recall": pytest.approx(1.0)}


def test_baseline_chosen_on_validation_not_test(tmp_path):
    """baseline_from picks the arm with the best mean *validation* score, even when another is better on test."""
    from mwm.bench.tables import choose_baseline

    arms = [{"name": "scratch", "pretrain": False},
            {"name": "random-0.4", "masking": {"strategy": "random", "ratio": 0.4}},
            {"name": "random-0.6", "masking": {"strategy": "random", "ratio": 0.6}},
            {"name": "mwm", "masking": {"strategy": "roi", "ratio_in": 0.8, "ratio_out": 0.2}}]
    cfg = _cfg(tmp_path, arms=arms, baseline_from=["random-0.4", "random-0.6"])
    rows = []
    for arm, test, val in [("random-0.4", 0.80, 0.70), ("random-0.6", 0.70, 0.75), ("mwm", 0.78, 0.74),
                           ("scratch", 0.6, 0.6)]:
        rows += [{"arm": arm, "seed": s, "task": "linear", "kind": "linear", "accuracy": test + s / 100,
                  "val_accuracy": val} for s in range(3)]
    assert choose_baseline(cfg, rows) == "random-0.6"  # 0.75 on val beats 0.70, though worse on test
    summary = {(r["arm"], r["metric"]): r for r in summarize(cfg, rows)}
    assert summary[("mwm", "accuracy")]["diff"] == pytest.approx(0.08)
    write_tables(cfg, rows)
    md = (tmp_path / "results.md").read_text()
    assert "baseline: `random-0.6`, the best of ['random-0.4', 'random-0.6'] by mean validation accuracy" in md
    # the answer names the guided arm only (not the other random ratio, not no pretraining)
    assert ("- **linear** (accuracy − `random-0.6`'s, same seeds): `mwm` +8.0 (95 % CI +8.0 … +8.0), 3 seeds: "
            "better: the interval excludes 0.") in md
    # before every candidate has its seeds the header says the choice is provisional, and who leads
    write_tables(cfg, [r for r in rows if not (r["arm"] == "random-0.4" and r["seed"] == 2)])
    assert ("baseline: not chosen yet (1 of 2 of ['random-0.4', 'random-0.6'] have all their seeds; `random-0.6` "
            "leads so far by mean validation accuracy") in (tmp_path / "results.md").read_text()
    with pytest.raises(ValueError, match="not both"):
        _cfg(tmp_path, arms=arms, baseline="random-0.4", baseline_from=["random-0.6"])
    with pytest.raises(ValueError, match="do not exist"):
        _cfg(tmp_path, arms=arms, baseline_from=["random-0.9"])


def test_verdict_reads_the_interval():
    """The answer's words follow the interval, not the sign of the mean alone."""
    from mwm.bench.tables import verdict

    assert verdict(0.02, 0.01).startswith("better") and verdict(-0.02, 0.01).startswith("worse")
    assert verdict(0.02, 0.03).startswith("no detectable difference") and verdict(0.02, None) == "no interval yet"


def test_matched_ratio_pairs_each_guided_arm_with_the_nearest_random_ratio(tmp_path):
    """MWM is compared with the random arm nearest in *realised* ratio (not nominal), on common seeds; an arm with
    no random arm within the tolerance, and the baseline itself, get no matched line."""
    from mwm.bench.tables import matched_ratio_differences

    cfg = _cfg(tmp_path, arms=[
        {"name": "scratch", "pretrain": False},
        {"name": "random-0.4", "masking": {"strategy": "random", "ratio": 0.4}},
        {"name": "random-0.6", "masking": {"strategy": "random", "ratio": 0.6}},
        {"name": "mwm-a", "masking": {"strategy": "roi", "ratio_in": 0.8, "ratio_out": 0.2}},
        {"name": "mwm-b", "masking": {"strategy": "roi_overall", "ratio": 0.6, "ratio_in": 0.8}},
        {"name": "mwm-far", "masking": {"strategy": "roi", "ratio_in": 0.9, "ratio_out": 0.1}}],
        baseline="random-0.6")
    acc = {"scratch": [0.6, 0.6, 0.6], "random-0.4": [0.70, 0.72, 0.71], "random-0.6": [0.74, 0.75, 0.76],
           "mwm-a": [0.72, 0.71, 0.75], "mwm-b": [0.78, 0.77, 0.70], "mwm-far": [0.9, 0.9, 0.9]}
    ratio = {"scratch": None, "random-0.4": 0.41, "random-0.6": 0.59, "mwm-a": 0.45, "mwm-b": 0.55, "mwm-far": 0.50}
    rows = [{"arm": arm, "seed": s, "task": "linear", "kind": "linear", "accuracy": v,
             "realised_mask_ratio": ratio[arm]} for arm, vals in acc.items() for s, v in enumerate(vals)
            if not (arm == "mwm-a" and s == 2)]  # mwm-a misses seed 2: paired on seeds 0-1 only
    got = {m["arm"]: m for m in matched_ratio_differences(cfg, rows, cfg.tasks[0])}
    assert set(got) == {"mwm-a", "mwm-b"}  # mwm-far: 0.09 from either random arm
    assert got["mwm-a"]["matched"] == "random-0.4" and got["mwm-a"]["diff_n"] == 2
    assert got["mwm-a"]["diff"] == pytest.approx(((0.72 - 0.70) + (0.71 - 0.72)) / 2)
    assert got["mwm-b"]["matched"] == "random-0.6" and got["mwm-b"]["matched_ratio"] == pytest.approx(0.59)
    md = write_tables(cfg, rows)["md"].read_text()
    line = next(x for x in md.splitlines() if "matched overall mask ratio" in x)
    assert "`mwm-a` − `random-0.4` (realised ratio 0.45 vs 0.41) +0.5" in line
    assert "mwm-b" not in line and "mwm-far" not in line  # the baseline match is the line above


def test_header_before_the_baseline_is_chosen(tmp_path):
    """With no candidate finished, the header says there is no baseline yet instead of naming `None`."""
    cfg = _cfg(tmp_path, baseline_from=["random-0.6"])
    md = write_tables(cfg, [r for r in _rows() if r["arm"] == "scratch"])["md"].read_text()
    assert "`None`" not in md and "paired difference to the baseline (none yet)" in md


def test_answer_gives_chance_level_and_the_other_metrics(tmp_path):
    """The answer names what always predicting the most frequent *true* test class scores (confusion-matrix rows),
    and each guided arm's paired differences on the other main metrics."""
    from mwm.bench.tables import result_row

    cfg = _cfg(tmp_path)
    cm = [[3, 1], [5, 1]]  # rows = true classes (4 and 6 images); the columns (predictions) would give 0.8
    row = result_row(cfg.arms[1], 0, cfg.tasks[0], {"accuracy": 0.4, "confusion_matrix": cm}, {}, {}, 1.0)
    assert row["majority_accuracy"] == pytest.approx(0.6)
    rows = [{**r, "majority_accuracy": 0.6} for r in _rows()]
    md = write_tables(cfg, rows)["md"].read_text()
    assert "(accuracy − `random-0.6`'s, same seeds; always predicting the most frequent class: 60.0)" in md
    d, hw = paired_difference([0.75, 0.76, 0.80], [0.70, 0.74, 0.72])
    ci = f"(95 % CI {(d - hw) * 100:+.1f} … {(d + hw) * 100:+.1f})"
    assert ("  - the other metrics, same seeds: `mwm` balanced_accuracy +5.0 " + ci + ", macro_f1 +5.0 " + ci
            + ", auroc +0.0 (95 % CI +0.0 … +0.0).") in md.splitlines()


def test_progress_note_estimates_the_pretraining_left(tmp_path):
    """The estimate counts the arm x seeds with no result yet that pretrain (not no-pretraining arms, not runs whose
    pretraining is done and only a task is missing) at the mean time of the finished runs."""
    from mwm.bench.runner import progress_note

    cfg = _cfg(tmp_path, tasks=[{"kind": "linear"}, {"kind": "linear", "name": "bn"}])
    rows = [r for r in _rows() if r["arm"] == "scratch" or (r["arm"] == "random-0.6" and r["seed"] < 2)]
    for r in rows:  # every arm x seed lacks its "bn" task; random-0.6 seeds 0-1 are pretrained
        r["pretrain_seconds"] = {"scratch": None, "random-0.6": 600.0 + 600.0 * r["seed"]}[r["arm"]]
    assert progress_note(cfg, rows, {}) == (
        "5 of 18 results done; 9 arm x seed(s) to run, next scratch seed 0, random-0.6 seed 0, mwm seed 0; ≈ 1.0 h "
        "of pretraining left (4 runs × 15 min, the mean so far; shards split it)")
    no_time = [{**r, "pretrain_seconds": None} for r in rows]
    assert progress_note(cfg, no_time, {}).endswith("mwm seed 0")
