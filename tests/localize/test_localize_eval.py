"""The manifest reader as the one judge of a usable ROI (non-finite boxes rejected, zero-area boxes dropped,
files that are not UTF-8), and `mwm localize-eval` on NaN boxes and on lesion-free (empty) masks."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from mwm.cli import app
from mwm.rois.manifest import ManifestError, has_roi, read_manifest, usable_boxes
from mwm.localize.metrics import GroundTruth, evaluate_manifest, load_ground_truth, write_per_image_csv

S = 20


def _rec(image, boxes, status="ok"):
    return {"image": image, "width": S, "height": S, "boxes": boxes, "prompt": "a lesion", "status": status}


def _square(r0, r1, c0, c1):
    m = np.zeros((S, S), np.uint8)
    m[r0:r1, c0:c1] = 1
    return m


# -- 4. non-finite and zero-area boxes ------------------------------------------------------------
@pytest.mark.parametrize("box", ["[0.1, 0.1, NaN, 0.5]", "[0.1, 0.1, Infinity, 0.5]", "[-Infinity, 0, 0.5, 0.5]",
                                 "[0.1, 0.1, 1e999, 0.5]"])
def test_non_finite_boxes_are_rejected_with_file_and_line(tmp_path, box):
    p = tmp_path / "rois.jsonl"
    line2 = json.dumps(_rec("b", [])).replace('"boxes": []', f'"boxes": [{box}]')
    p.write_text(json.dumps(_rec("a", [])) + "\n" + line2 + "\n")
    with pytest.raises(ManifestError, match=r"rois\.jsonl:2: box .* NaN or infinite"):
        read_manifest(p)


def test_zero_area_boxes_are_not_rois(tmp_path):
    p = tmp_path / "rois.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in [
        _rec("a", [[0.2, 0.2, 0.2, 0.6]]),  # zero width
        _rec("b", [[0.1, 0.3, 0.5, 0.3], [0.0, 0.0, 0.5, 0.5]]),  # one zero-height box, one real
        _rec("c", [[0.0, 0.0, 0.5, 0.5]], status="empty_roi")]))
    with pytest.warns(UserWarning, match=r"rois\.jsonl:1: dropped 2 zero-area box"):
        recs = read_manifest(p)
    assert [r["boxes"] for r in recs] == [[], [[0.0, 0.0, 0.5, 0.5]], [[0.0, 0.0, 0.5, 0.5]]]
    assert [has_roi(r) for r in recs] == [False, True, False]  # status != ok: no ROI whatever its boxes
    # records that did not come through the reader are judged the same way
    raw = {**_rec("d", [[0.5, 0.5, 0.5, 0.9], [0.1, 0.1, float("nan"), 0.2], [0, 0, 1, 1]])}
    assert usable_boxes(raw) == [[0.0, 0.0, 1.0, 1.0]]
    assert usable_boxes({"status": "ok"}) == [] and not has_roi(_rec("e", [[0.3, 0.3, 0.3, 0.3]]))


def test_localize_eval_refuses_nan_boxes_instead_of_scoring_them_zero(tmp_path):
    gt = GroundTruth(["a.png", "b.png"], np.stack([_square(0, 10, 0, 10)] * 2), np.ones(2, bool), "gt")
    recs = [_rec("a.png", [[0.0, 0.0, 0.5, 0.5]]), _rec("b.png", [[0.0, 0.0, float("nan"), 0.5]])]
    with pytest.raises(ManifestError, match=r"manifest: record 2: box .* NaN"):
        evaluate_manifest(recs, gt)
    m = tmp_path / "rois.jsonl"
    m.write_text("".join(json.dumps(r) + "\n" for r in recs))  # json writes the NaN literal
    np.savez(tmp_path / "gt.npz", images=np.zeros((2, S, S), np.uint8), masks=gt.masks,
             filenames=np.array(gt.ids), mask_valid=gt.valid)
    r = CliRunner().invoke(app, ["localize-eval", str(m), "--gt", str(tmp_path / "gt.npz"), "--json"])
    assert r.exit_code == 2 and "rois.jsonl:2" in r.output and "NaN" in r.output


# -- 5. manifests that are not UTF-8 --------------------------------------------------------------
def test_binary_manifest_is_a_clear_error_naming_the_line(tmp_path):
    p = tmp_path / "rois.jsonl"
    p.write_bytes(json.dumps(_rec("a", [])).encode() + b"\n\x89PNG\r\x1a\x00\xff\xfe\n")
    with pytest.raises(ManifestError, match=r"rois\.jsonl:2: not UTF-8 text \(byte 0x89 at column 1\)"):
        read_manifest(p)
    with pytest.warns(UserWarning, match=r":2: ignoring a line that is not UTF-8"):  # resuming: skipped
        assert [r["image"] for r in read_manifest(p, validate=False)] == ["a"]
    r = CliRunner().invoke(app, ["localize-eval", str(p), "--gt", str(tmp_path)])
    assert r.exit_code == 2 and "not UTF-8" in r.output and "Traceback" not in r.output


def test_a_kill_inside_a_multibyte_character_is_a_truncated_last_line(tmp_path):
    p = tmp_path / "rois.jsonl"
    whole = (json.dumps({**_rec("b", []), "prompt": "lésion"}, ensure_ascii=False)).encode()
    cut = whole[: whole.index("é".encode()) + 1]  # half of the two bytes of é
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps(_rec("a", [])).encode() + b"\n" + cut)
    for validate in (True, False):
        with pytest.warns(UserWarning, match=":2: ignoring a truncated last line"):
            assert [r["image"] for r in read_manifest(p, validate=validate)] == ["a"]


# -- 6. lesion-free images: empty valid masks ------------------------------------------------------
def test_empty_masks_count_false_positives_and_stay_out_of_the_means(tmp_path):
    masks = np.stack([_square(0, 10, 0, 10), _square(0, 0, 0, 0), _square(0, 0, 0, 0), _square(0, 0, 0, 0)])
    gt = GroundTruth(["lesion.png", "fp.png", "tn.png", "tiny.png"], masks, np.ones(4, bool), "gt")
    recs = [_rec("lesion.png", [[0.0, 0.0, 0.5, 0.25]]),  # half the lesion, all of it lesion
            _rec("fp.png", [[0.5, 0.5, 1.0, 1.0]]),  # a box on a lesion-free image: a false positive
            _rec("tn.png", [], status="empty_roi"),  # no box there: right
            _rec("tiny.png", [[0.0, 0.0, 0.01, 0.01]])]  # a box that covers no mask pixel: no false positive
    res = evaluate_manifest(recs, gt)
    s = res.summary
    assert (s["n"], s["n_empty_gt"], s["n_false_positive"]) == (1, 3, 1)
    assert s["false_positive_rate"] == pytest.approx(1 / 3)
    assert s["precision"] == pytest.approx(1.0) and s["recall"] == pytest.approx(0.5)  # the lesion image only
    rows = {r["image"]: r for r in res.rows}
    assert rows["fp.png"]["gt"] == "empty_gt" and rows["fp.png"]["false_positive"] is True
    assert rows["fp.png"]["pred_area"] == 100 and "recall" not in rows["fp.png"]  # recall is undefined there
    assert rows["tn.png"]["false_positive"] is False and rows["tiny.png"]["false_positive"] is False
    assert "false_positive" not in rows["lesion.png"]
    import csv

    with open(write_per_image_csv(res.rows, tmp_path / "per.csv")) as f:
        by = {r["image"]: r for r in csv.DictReader(f)}
    assert by["fp.png"]["false_positive"] == "True" and by["fp.png"]["recall"] == "" and by["lesion.png"]["false_positive"] == ""


def test_npz_without_mask_valid_treats_empty_masks_as_lesion_free(tmp_path):
    """An npz with masks and no mask_valid: every mask is an annotation, so an empty one is a lesion-free image."""
    path = tmp_path / "gt.npz"
    np.savez(path, images=np.zeros((3, S, S), np.uint8), masks=np.stack([_square(0, 10, 0, 10), _square(0, 0, 0, 0),
                                                                         _square(0, 0, 0, 0)]),
             filenames=np.array(["a.png", "b.png", "c.png"]))
    g = load_ground_truth(path)
    assert g.valid.tolist() == [True, True, True]
    recs = [_rec("a.png", [[0.0, 0.0, 0.5, 0.5]]), _rec("b.png", [[0.0, 0.0, 0.5, 0.5]]), _rec("c.png", [], "empty_roi")]
    m = tmp_path / "rois.jsonl"
    m.write_text("".join(json.dumps(x) + "\n" for x in recs))
    r = CliRunner().invoke(app, ["localize-eval", str(m), "--gt", str(path), "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert (s["n"], s["n_empty_gt"], s["n_no_gt"], s["n_false_positive"], s["false_positive_rate"]) == (1, 2, 0, 1, 0.5)
    assert s["recall"] == pytest.approx(1.0)
    r = CliRunner().invoke(app, ["localize-eval", str(m), "--gt", str(path)])
    assert "1 of them got an ROI: false positives" in " ".join(r.output.split())
