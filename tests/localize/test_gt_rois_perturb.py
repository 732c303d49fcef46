"""Degraded gt boxes (``perturb``): target occlusion precision/recall, random placement, seeding, the manifest."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from mwm.localize.gt_rois import gt_rois, write_gt_rois
from mwm.localize.metrics import evaluate_manifest
from mwm.rois.perturb import PerturbConfig, perturb_boxes


def _ok(recs):
    return [r for r in recs if r["status"] == "ok"]


@pytest.mark.parametrize("p, r", [(0.3, 0.9), (0.5, 0.7)])
def test_achieved_precision_recall_near_targets(phantoms_npz, p, r):
    recs = gt_rois(phantoms_npz, perturb={"precision": p, "recall": r}, seed=0)
    ok = _ok(recs)
    assert len(ok) > 20 and all(len(x["boxes"]) == 1 for x in ok)
    # scored independently by localize-eval's metrics, not by the values the records claim
    s = evaluate_manifest(recs, phantoms_npz).summary
    assert s["precision"] == pytest.approx(p, abs=0.05) and s["recall"] == pytest.approx(r, abs=0.05)
    # and the recorded per-image values are the real ones
    rows = {row["image"]: row for row in evaluate_manifest(recs, phantoms_npz).rows}
    for x in ok:
        assert x["perturb"]["precision"] == pytest.approx(rows[x["image"]]["precision"], abs=1e-3)
        assert x["perturb"]["recall"] == pytest.approx(rows[x["image"]]["recall"], abs=1e-3)
    # the oracle it degrades is far from these targets (so the test can tell a no-op from a perturbation)
    assert evaluate_manifest(gt_rois(phantoms_npz), phantoms_npz).summary["recall"] == 1.0


def test_same_seed_same_boxes_other_seed_other_boxes_independent_of_order(phantoms_npz):
    cfg = {"precision": 0.3, "recall": 0.9}
    a = gt_rois(phantoms_npz, perturb=cfg, seed=1)
    assert a == gt_rois(phantoms_npz, perturb=cfg, seed=1)
    b = gt_rois(phantoms_npz, perturb=cfg, seed=2)
    assert sum(x["boxes"] != y["boxes"] for x, y in zip(_ok(a), _ok(b))) > len(_ok(a)) // 2
    # one image's box depends on (seed, id) only, not on which other images are perturbed with it
    from mwm.data import open_source

    src = open_source(phantoms_npz)
    idx = [i for i, x in enumerate(a) if x["status"] == "ok"][::-1][:5]
    pc = PerturbConfig(**cfg)
    alone = perturb_boxes(src.masks[idx], [a[i]["image"] for i in idx], [[[0, 0, 1, 1]]] * len(idx), pc, seed=1)
    for i, bxs in zip(idx, alone):
        assert np.allclose(bxs, a[i]["boxes"], atol=1e-6)


def test_random_place_keeps_box_size_and_stays_inside(phantoms_npz):
    gt = _ok(gt_rois(phantoms_npz, expand=0.1))
    moved = _ok(gt_rois(phantoms_npz, expand=0.1, perturb={"place": "random"}, seed=0))
    again = _ok(gt_rois(phantoms_npz, expand=0.1, perturb={"place": "random"}, seed=3))
    assert [x["image"] for x in gt] == [x["image"] for x in moved]
    n_moved = 0
    for g, m in zip(gt, moved):
        (g0,), (m0,) = g["boxes"], m["boxes"]
        assert m0[2] - m0[0] == pytest.approx(g0[2] - g0[0], abs=1e-5)
        assert m0[3] - m0[1] == pytest.approx(g0[3] - g0[1], abs=1e-5)
        assert min(m0) >= 0 and max(m0) <= 1
        n_moved += not np.allclose(m0, g0, atol=1e-3)
    assert n_moved > len(gt) * 0.8
    assert sum(a["boxes"] != b["boxes"] for a, b in zip(moved, again)) > len(moved) * 0.8
    # random places mostly miss the lesion: much lower recall than the oracle's 1.0
    assert evaluate_manifest(gt_rois(phantoms_npz, perturb={"place": "random"}), phantoms_npz).summary["recall"] < 0.6


def test_random_place_with_targets_has_the_target_box_size(phantoms_npz):
    tgt = _ok(gt_rois(phantoms_npz, perturb={"precision": 0.3, "recall": 0.9}, seed=0))
    rnd = _ok(gt_rois(phantoms_npz, perturb={"precision": 0.3, "recall": 0.9, "place": "random"}, seed=0))
    for t, r in zip(tgt, rnd):
        (t0,), (r0,) = t["boxes"], r["boxes"]
        assert r0[2] - r0[0] == pytest.approx(t0[2] - t0[0], abs=1e-5)
        assert r0[3] - r0[1] == pytest.approx(t0[3] - t0[1], abs=1e-5)
        assert min(r0) >= 0 and max(r0) <= 1


def test_perturb_config_needs_both_targets_for_target_place():
    with pytest.raises(ValueError, match="both"):
        PerturbConfig(precision=0.3)
    with pytest.raises(ValueError, match="place: random"):
        PerturbConfig()
    assert PerturbConfig(place="random").has_targets is False


def test_manifest_records_achieved_values_and_summary(phantoms_npz, tmp_path):
    from mwm.cli import app

    out = tmp_path / "deg.jsonl"
    res = CliRunner().invoke(app, ["data", "gt-rois", str(phantoms_npz), str(out), "--precision", "0.3",
                                   "--recall", "0.9", "--seed", "4"])
    assert res.exit_code == 0, res.output
    assert "mean occlusion precision" in res.output
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert recs == gt_rois(phantoms_npz, perturb={"precision": 0.3, "recall": 0.9}, seed=4)
    assert all(("perturb" in r) == (r["status"] == "ok") for r in recs)  # images without a mask: no ROI, as before
    meta = json.loads((tmp_path / "deg.meta.json").read_text())["perturb"]
    assert meta["precision"] == 0.3 and meta["seed"] == 4 and meta["n"] == len(_ok(recs))
    assert meta["achieved_precision"] == pytest.approx(np.mean([r["perturb"]["precision"] for r in _ok(recs)]),
                                                       abs=1e-4)
    bad = CliRunner().invoke(app, ["data", "gt-rois", str(phantoms_npz), str(out), "--precision", "0.3"])
    assert bad.exit_code != 0 and "recall" in bad.output


def test_perturb_with_per_component_targets_or_foreground_is_an_error(phantoms_npz, tmp_path):
    from mwm.errors import DataError

    with pytest.raises(DataError, match="union"):
        gt_rois(phantoms_npz, box_mode="per_component", perturb={"precision": 0.3, "recall": 0.9})
    with pytest.raises(DataError, match="gt-boxes"):
        write_gt_rois(phantoms_npz, tmp_path / "x.jsonl", source="foreground", perturb={"place": "random"})
