"""Occlusion precision / recall, Dice, IoU on hand-computed cases; the manifest reader; `mwm localize-eval`."""

from __future__ import annotations

import csv
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from mwm.cli import app
from mwm.rois.manifest import ManifestError, read_manifest
from mwm.localize.metrics import (evaluate_manifest, load_ground_truth, random_boxes_like, region_metrics,
                                  strip_ext)

S = 20  # GT masks are S × S


def _square(r0, r1, c0, c1, n=S):
    m = np.zeros((n, n), np.uint8)
    m[r0:r1, c0:c1] = 1
    return m


def _rec(image, boxes, status="ok", w=S, h=S):
    return {"image": image, "width": w, "height": h, "boxes": boxes, "prompt": "a lesion", "status": status}


def _write_manifest(path, recs, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + tail)
    return path


@pytest.fixture
def gt_npz(tmp_path):
    """Five annotated images: a 10×10 square, the same square, an empty mask, an unannotated one, one left out."""
    masks = np.stack([_square(0, 10, 0, 10), _square(0, 10, 0, 10), _square(0, 0, 0, 0), _square(5, 15, 5, 15),
                      _square(4, 8, 4, 8)])
    path = tmp_path / "gt.npz"
    np.savez(path, images=np.zeros((5, S, S), np.uint8), labels=np.zeros(5, np.int64),
             filenames=np.array(["a.png", "b.png", "c.png", "d.png", "e.png"]), masks=masks,
             mask_valid=np.array([True, True, True, False, True]))
    return path


# -- metric definitions ----------------------------------------------------------------------------
def test_region_metrics_hand_computed():
    gt = torch.from_numpy(_square(0, 10, 0, 10)).bool()
    half = torch.from_numpy(_square(0, 10, 0, 5)).bool()  # covers the left half of the GT only
    whole = torch.ones(S, S, dtype=torch.bool)
    shifted = torch.from_numpy(_square(5, 15, 5, 15)).bool()  # overlaps the GT in a 5×5 corner
    empty = torch.zeros(S, S, dtype=torch.bool)
    r = region_metrics(torch.stack([half, whole, shifted, empty]), gt.expand(4, S, S))
    assert r["precision"].tolist() == pytest.approx([1.0, 100 / 400, 25 / 100, 0.0])
    assert r["recall"].tolist() == pytest.approx([0.5, 1.0, 0.25, 0.0])
    assert r["dice"].tolist() == pytest.approx([2 * 50 / 150, 2 * 100 / 500, 2 * 25 / 200, 0.0])
    assert r["iou"].tolist() == pytest.approx([50 / 100, 100 / 400, 25 / 175, 0.0])
    assert r["intersection"].tolist() == [50, 100, 25, 0]


def test_boxes_rasterize_at_gt_resolution(gt_npz):
    # a box over the left half of a's square, in normalized coordinates: the GT is 20 px, so 0.25 = 5 px
    recs = [_rec("a.png", [[0.0, 0.0, 0.25, 0.5]]), _rec("b.png", [[0.0, 0.0, 0.5, 0.5]]),
            _rec("e.png", [[0.0, 0.0, 1.0, 1.0]])]
    with pytest.warns(UserWarning, match="not in the manifest"):  # c.png: annotated (empty) but not localized
        res = evaluate_manifest(recs, gt_npz)
    rows = {r["image"]: r for r in res.rows}
    assert rows["a.png"]["recall"] == pytest.approx(0.5) and rows["a.png"]["precision"] == pytest.approx(1.0)
    assert rows["b.png"]["iou"] == pytest.approx(1.0)
    assert rows["e.png"]["precision"] == pytest.approx(16 / 400)
    assert res.summary["n"] == 3
    assert res.summary["recall"] == pytest.approx((0.5 + 1 + 1) / 3)


def test_exclusions_and_counts(gt_npz):
    recs = [_rec("a.png", [[0.0, 0.0, 0.5, 0.5]]),
            _rec("b.png", [], status="empty_roi"),  # a failed localization on a real lesion scores 0
            _rec("c.png", [[0.0, 0.0, 0.5, 0.5]]),  # empty GT: left out
            _rec("d.png", [[0.0, 0.0, 0.5, 0.5]]),  # no valid GT: left out
            _rec("zzz.png", [[0.0, 0.0, 0.5, 0.5]])]  # not in the GT at all: left out
    with pytest.warns(UserWarning, match="1 annotated image.*e.png"):
        res = evaluate_manifest(recs, gt_npz)  # e.png is annotated but missing from the manifest
    s = res.summary
    assert (s["n"], s["n_empty_gt"], s["n_no_gt"], s["n_missing"], s["n_failed"], s["n_manifest"]) == (2, 1, 2, 1, 1, 5)
    assert s["precision"] == pytest.approx(0.5) and s["recall"] == pytest.approx(0.5)
    assert s["dice"] == pytest.approx(0.5) and s["iou"] == pytest.approx(0.5)
    rows = {r["image"]: r for r in res.rows}
    assert rows["b.png"]["precision"] == 0.0 and rows["b.png"]["recall"] == 0.0
    assert rows["c.png"]["gt"] == "empty_gt" and "precision" not in rows["c.png"]
    assert rows["d.png"]["gt"] == rows["zzz.png"]["gt"] == "no_gt"


def test_folder_ground_truth_matches_ids_without_extension(tmp_path):
    root = tmp_path / "masks"
    (root / "p1").mkdir(parents=True)
    Image.fromarray(_square(0, 10, 0, 10) * 255).save(root / "p1" / "scan1.png")
    rgba = np.zeros((S, S, 4), np.uint8)
    rgba[..., 3] = 255  # opaque alpha everywhere: not foreground
    rgba[10:20, 10:20, 0] = 200
    Image.fromarray(rgba).save(root / "p1" / "scan2.png")
    g = load_ground_truth(root)
    assert g.ids == ["p1/scan1.png", "p1/scan2.png"] and g.masks[1].sum() == 100
    recs = [_rec("p1/scan1.dcm", [[0.0, 0.0, 0.5, 0.25]]), _rec("p1/scan2.dcm", [[0.5, 0.5, 1.0, 1.0]])]
    res = evaluate_manifest(recs, root)
    assert [r["recall"] for r in res.rows] == pytest.approx([0.5, 1.0])
    assert strip_ext("ct.nii.gz#z0042") == "ct.nii.gz#z0042" and strip_ext("a/b.nii.gz") == "a/b"


def test_random_baseline_same_sizes_seeded_and_worse(tmp_path, phantoms_npz):
    boxes = [[[0.1, 0.2, 0.4, 0.3], [0.5, 0.5, 1.0, 1.0]], [], [[0.0, 0.0, 1.0, 1.0]]]
    moved = random_boxes_like(boxes, seed=3)
    assert moved == random_boxes_like(boxes, seed=3) and moved != random_boxes_like(boxes, seed=4)
    assert moved[1] == [] and moved[2] == [[0.0, 0.0, 1.0, 1.0]]  # a full-image box has nowhere to go
    for a, b in zip(boxes[0], moved[0]):
        assert b[2] - b[0] == pytest.approx(a[2] - a[0]) and b[3] - b[1] == pytest.approx(a[3] - a[1])
        assert 0 <= b[0] and b[2] <= 1 and 0 <= b[1] and b[3] <= 1
    # oracle boxes (each GT's bounding box) must clearly beat same-size random boxes
    from mwm.localize.postprocess import mask_to_boxes

    g = load_ground_truth(phantoms_npz)
    recs = [_rec(i, mask_to_boxes(torch.from_numpy(m > 0)), w=32, h=32) for i, m in zip(g.ids, g.masks)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = evaluate_manifest(recs, g, random_baseline=True, seed=0).summary
    assert s["n"] > 10 and s["recall"] == pytest.approx(1.0)
    assert s["precision"] > 0.6 and s["random_precision"] < 0.3 and s["random_recall"] < 0.3


# -- manifest reader -------------------------------------------------------------------------------
def test_read_manifest_truncated_last_line(tmp_path):
    p = _write_manifest(tmp_path / "rois.jsonl", [_rec("a", []), _rec("b", [[0, 0, 1, 1]])], tail='{"image": "c", "wid')
    with pytest.warns(UserWarning, match=r"rois.jsonl:3: ignoring a truncated last line"):
        recs = read_manifest(p)
    assert [r["image"] for r in recs] == ["a", "b"]


@pytest.mark.parametrize("line, match", [
    ('{"image": "b", "wid', r":2: not valid JSON"),
    (json.dumps({"image": "b", "width": 4, "height": 4, "boxes": []}), r":2: missing key\(s\) prompt, status"),
    (json.dumps(_rec("b", [[0, 0, 10, 10]])), r":2: box .* not normalized"),
    (json.dumps(_rec("b", [[0, 0, 1]])), r":2: a box must be"),
    (json.dumps(_rec("a", [])), r":2: image 'a' already appears on line 1"),
    (json.dumps(_rec("b", [], w=-1)), r":2: 'width' must be"),
    ("[1, 2]", r":2: each line must be a JSON object"),
])
def test_read_manifest_errors_name_the_line(tmp_path, line, match):
    p = tmp_path / "rois.jsonl"
    p.write_text(json.dumps(_rec("a", [])) + "\n" + line + "\n" + json.dumps(_rec("c", [])) + "\n")
    with pytest.raises(ManifestError, match=match):
        read_manifest(p)


def test_read_manifest_lenient_mode_and_missing_file(tmp_path):
    p = tmp_path / "rois.jsonl"
    p.write_text(json.dumps({"image": "a"}) + "\n" + '{"image": "b", "wid\n' + json.dumps({"image": "c"}) + "\n\n")
    with pytest.warns(UserWarning, match=":2: ignoring a line"):
        assert [r["image"] for r in read_manifest(p, validate=False)] == ["a", "c"]
    with pytest.raises(Exception, match="no such manifest"):
        read_manifest(tmp_path / "nope.jsonl")


# -- CLI -------------------------------------------------------------------------------------------
def test_cli_localize_eval_json_and_csv(tmp_path, gt_npz):
    recs = [_rec("a.png", [[0.0, 0.0, 0.25, 0.5]]), _rec("b.png", [[0.0, 0.0, 0.5, 0.5]]),
            _rec("c.png", [[0.0, 0.0, 0.5, 0.5]]), _rec("e.png", [], status="empty_roi")]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    m = _write_manifest(run_dir / "rois.jsonl", recs)
    (run_dir / "meta.json").write_text("{}")
    r = CliRunner().invoke(app, ["localize-eval", str(m), "--gt", str(gt_npz), "--json", "--random-baseline"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert {"n", "precision", "recall", "dice", "iou", "n_no_gt", "n_empty_gt", "n_missing", "random_precision",
            "random_recall", "random_dice", "random_iou"} <= set(s)
    assert (s["n"], s["n_empty_gt"], s["n_no_gt"], s["n_missing"]) == (3, 1, 0, 0)
    assert s["recall"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    with open(run_dir / "eval_per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["image"] for r in rows] == ["a.png", "b.png", "c.png", "e.png"]
    assert float(rows[0]["recall"]) == pytest.approx(0.5) and rows[2]["gt"] == "empty_gt" and rows[2]["recall"] == ""
    assert "random_precision" in rows[0]
    # the table, a chosen CSV path, and the errors
    out = tmp_path / "elsewhere" / "per.csv"
    r = CliRunner().invoke(app, ["localize-eval", str(m), "--gt", str(gt_npz), "--out", str(out)])
    assert r.exit_code == 0 and "occlusion recall" in r.stdout and out.is_file()
    r = CliRunner().invoke(app, ["localize-eval", str(m)])
    assert r.exit_code == 2 and "--gt" in r.output
    r = CliRunner().invoke(app, ["localize-eval", str(m), "--gt", str(tmp_path / "none.npz")])
    assert r.exit_code == 2 and "none.npz" in r.output


def test_gt_rois_manifest_scores_perfect_recall(phantoms_npz, tmp_path):
    """Boxes around the ground truth itself: recall 1 for every annotated, non-empty image."""
    from typer.testing import CliRunner

    from mwm.cli import app
    from mwm.rois.manifest import read_manifest
    from mwm.localize.metrics import evaluate_manifest

    out = tmp_path / "gt.jsonl"
    r = CliRunner().invoke(app, ["data", "gt-rois", str(phantoms_npz), str(out), "--expand", "0"])
    assert r.exit_code == 0, r.output
    recs = read_manifest(out)
    assert len(recs) == 60 and {x["status"] for x in recs} == {"ok", "no_gt"}
    res = evaluate_manifest(out, phantoms_npz)
    assert abs(res.summary["recall"] - 1.0) < 1e-9 and res.summary["precision"] > 0.5


def test_gt_rois_fallback_fills_only_images_without_a_mask(phantoms_npz, tmp_path):
    """--fallback: gt boxes where a mask exists, the other manifest's boxes elsewhere, order and ids kept."""
    import json

    from typer.testing import CliRunner

    from mwm.cli import app
    from mwm.errors import DataError
    from mwm.rois.gt_rois import gt_rois, with_fallback
    from mwm.rois.manifest import read_manifest

    gt = gt_rois(phantoms_npz, expand=0.0)
    loc = [{**r, "boxes": [[0.1, 0.2, 0.3, 0.4]], "status": "ok", "prompt": "lesion"} for r in gt]
    loc[0]["status"], loc[0]["boxes"] = "no_roi", []  # a failed localization stays without ROI
    fb = tmp_path / "loc.jsonl"
    fb.write_text("".join(json.dumps(r) + "\n" for r in loc))
    out = tmp_path / "merged.jsonl"
    r = CliRunner().invoke(app, ["data", "gt-rois", str(phantoms_npz), str(out), "--expand", "0",
                                 "--fallback", str(fb)])
    assert r.exit_code == 0, r.output
    merged = read_manifest(out)
    assert [m["image"] for m in merged] == [g["image"] for g in gt]
    n_fb = 0
    for i, (g, m) in enumerate(zip(gt, merged)):
        if g["status"] == "ok":
            assert m == g  # ground truth wins
        elif i == 0:
            assert m["status"] == "no_gt"
        else:
            assert m["boxes"] == [[0.1, 0.2, 0.3, 0.4]] and m["source"] == "fallback"
            n_fb += 1
    n_gt = sum(g["status"] == "ok" for g in gt)
    assert n_fb == len(gt) - n_gt - (gt[0]["status"] != "ok") and n_fb > 0
    meta = json.loads((tmp_path / "merged.meta.json").read_text())
    assert (meta["n_gt"], meta["n_fallback"], meta["n_with_roi"]) == (n_gt, n_fb, n_gt + n_fb)
    with pytest.raises(DataError, match="image ids"):
        with_fallback(gt, [{**loc[1], "image": "other/x.png"}])
    with pytest.raises(DataError, match="other data"):
        with_fallback(gt, [{**r, "width": 999} for r in loc])
