"""HTML report pages, mask example panels and loss curves."""

from __future__ import annotations

import numpy as np

from mwm.report.html import Section, write_report
from mwm.report.masks import mask_examples
from mwm.report.overlays import save_png
from mwm.report.plots import loss_curves


def test_mask_examples_hide_exact_patch_counts():
    imgs = np.full((2, 1, 64, 64), 200, np.uint8)
    boxes = [[[0.0, 0.0, 0.5, 0.5]], []]  # image 0: ROI = the top-left 1 of 4 patches (stride 32)
    panel = mask_examples(imgs, boxes, {"random": {"strategy": "random", "ratio": 0.5},
                                        "mwm": {"strategy": "roi", "ratio_in": 1.0, "ratio_out": 0.0,
                                                "ratio": 0.5}}, stride=32, min_side=64)
    # rows of 64 px + 4 px gap, columns: scan | random | mwm
    row0_mwm = panel[:64, 2 * 68: 2 * 68 + 64, 0]
    gray = int(0.5 * 255 + 0.5)
    assert (row0_mwm[:32, :32] == gray).all()          # the ROI patch is hidden (ratio_in 1)
    assert (row0_mwm[32:, 32:] == 200).all()           # background kept (ratio_out 0)
    for r in range(2):
        rnd = panel[r * 68: r * 68 + 64, 68: 68 + 64, 0]
        hidden = sum((rnd[i:i + 32, j:j + 32] == gray).all() for i in (0, 32) for j in (0, 32))
        assert hidden == 2                              # random 0.5 of 4 patches, exactly
    row1_mwm = panel[68:132, 2 * 68: 2 * 68 + 64, 0]   # no ROI: uniform at `ratio`
    assert sum((row1_mwm[i:i + 32, j:j + 32] == gray).all() for i in (0, 32) for j in (0, 32)) == 2


def test_report_links_relative_pictures(tmp_path):
    pic = save_png(np.zeros((8, 8, 3), np.uint8), tmp_path / "pics" / "a.png")
    page = write_report(tmp_path / "report.html", "T <x>", ["intro & more"], [
        Section("S", ["para"], tables=[("cap", ["arm", "acc"], [["r", 0.51234]])],
                figures=[(pic, "a picture"), (tmp_path / "missing.png", "gone")])])
    text = page.read_text()
    assert "src='pics/a.png'" in text and "T &lt;x&gt;" in text and "intro &amp; more" in text
    assert "0.512" in text and "missing picture" in text


def test_loss_curves(tmp_path):
    csv = tmp_path / "metrics.csv"
    csv.write_text("step,epoch,loss,lr,mask_ratio,mask_ratio_in,mask_ratio_out,grad_norm,images_per_s,seconds\n"
                   "1,1,0.9,0.001,0.6,,,,,\n2,1,0.8,0.001,0.6,,,,,\n")
    p = loss_curves({"a": csv, "missing": tmp_path / "nope.csv"}, tmp_path / "c.png")
    assert p is not None and p.stat().st_size > 1000
    assert loss_curves({"x": tmp_path / "nope.csv"}, tmp_path / "d.png") is None
