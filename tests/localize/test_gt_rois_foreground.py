"""Classical foreground ROIs (lung fields / body) on synthetic scans with known geometry."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from mwm.rois.foreground import foreground_boxes

S = 64
PX = 2 / S  # tolerance: two pixels, in normalized coordinates


def _ellipse(cy, cx, ry, rx):
    y, x = np.mgrid[:S, :S] + 0.5
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1


def _box(m):
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    return [cols[0] / S, rows[0] / S, (cols[-1] + 1) / S, (rows[-1] + 1) / S]


# a bright body on dark air with two dark "lungs" inside, the right one shifted down (a CT slice, schematically)
BODY = _ellipse(32, 32, 24, 29)
LEFT, RIGHT = _ellipse(30, 20, 13, 8), _ellipse(36, 45, 11, 7)


def _scans(n=3, seed=0):
    rng = np.random.default_rng(seed)
    img = np.where(BODY, 0.7, 0.05) - 0.55 * (LEFT | RIGHT)
    return np.clip(img[None] + rng.normal(0, 0.02, (n, S, S)), 0, 1)


def test_two_dark_regions_inside_the_body_give_two_boxes_around_them():
    res = foreground_boxes(_scans(), "lungs", "per_component")
    assert res.status == ["ok"] * 3
    for bxs in res.boxes:
        assert len(bxs) == 2
        # largest first: the left lung is the bigger one
        np.testing.assert_allclose(bxs[0], _box(LEFT), atol=PX)
        np.testing.assert_allclose(bxs[1], _box(RIGHT), atol=PX)


def test_union_box_spans_both_lungs_and_not_the_body():
    res = foreground_boxes(_scans(1), "lungs", "union")
    (box,) = res.boxes[0]
    np.testing.assert_allclose(box, _box(LEFT | RIGHT), atol=PX)
    assert (box[2] - box[0]) * (box[3] - box[1]) < 0.6 * np.prod(np.subtract(_box(BODY)[2:], _box(BODY)[:2]))


def test_body_kind_boxes_the_whole_body_and_uint8_input_works():
    imgs = (_scans(2) * 255).astype(np.uint8)
    res = foreground_boxes(imgs, "body")
    for bxs in res.boxes:
        np.testing.assert_allclose(bxs, [_box(BODY)], atol=PX)


def test_nothing_to_find_gives_no_box():
    flat = np.full((1, S, S), 0.5)
    body_only = np.where(BODY, 0.7, 0.05)[None]  # a body without dark regions inside
    res = foreground_boxes(np.concatenate([flat, body_only]), "lungs")
    assert res.boxes == [[], []] and res.status == ["no_foreground", "no_foreground"]


def test_gt_rois_cli_foreground_source(tmp_path):
    from mwm.cli import app

    npz = tmp_path / "scans.npz"
    np.savez(npz, images=(_scans(4) * 255).astype(np.uint8), labels=np.zeros(4, np.int64))
    out = tmp_path / "fg.jsonl"
    r = CliRunner().invoke(app, ["data", "gt-rois", str(npz), str(out), "--source", "foreground", "--kind", "lungs",
                                 "--box-mode", "per_component", "--expand", "0"])
    assert r.exit_code == 0, r.output
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == 4 and all(x["status"] == "ok" and len(x["boxes"]) == 2 for x in recs)
    np.testing.assert_allclose(recs[0]["boxes"][0], _box(LEFT), atol=PX)
    meta = json.loads((tmp_path / "fg.meta.json").read_text())
    assert meta["source"] == "foreground" and meta["kind"] == "lungs" and meta["n_with_roi"] == 4
    bad = CliRunner().invoke(app, ["data", "gt-rois", str(npz), str(out), "--source", "foreground", "--kind", "liver"])
    assert bad.exit_code != 0 and "liver" in bad.output


@pytest.mark.parametrize("kind", ["lungs", "body"])
def test_expand_and_union_applied_like_gt_boxes(tmp_path, kind):
    from mwm.rois.foreground import foreground_records
    from mwm.localize.postprocess import expand_boxes

    npz = tmp_path / "scans.npz"
    np.savez(npz, images=(_scans(1) * 255).astype(np.uint8))
    plain = foreground_records(npz, kind, "union", 0.0)[0]["boxes"]
    grown = foreground_records(npz, kind, "union", 0.1)[0]["boxes"]
    np.testing.assert_allclose(grown, expand_boxes(plain, 0.1), atol=1e-5)
