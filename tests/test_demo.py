"""`mwm demo` in miniature: every stage runs and the report references pictures that exist."""

from __future__ import annotations

import json
import re

from mwm.demo import DemoConfig, run_demo


def test_demo_end_to_end_writes_report(tmp_path):
    cfg = DemoConfig(out=tmp_path / "demo", n=40, size=64, vlm_epochs=1, vlm_size=32, pretrain_epochs=1,
                     pretrain_batch=8, noise_copies=2)
    lines: list[str] = []
    s = run_demo(cfg, log=lines.append)
    report = tmp_path / "demo" / "report.html"
    assert s["report"] == str(report) and report.is_file()
    assert [ln.split("]")[0] for ln in lines] == [f"[{k}/6" for k in range(1, 7)]
    html = report.read_text()
    srcs = re.findall(r"src='([^']+)'", html)
    assert len(srcs) >= 5  # gallery panels, mask examples, loss curves, reconstructions
    for src in srcs:
        assert (report.parent / src).is_file(), src
    assert "missing picture" not in html
    assert set(s["probe"]) == {"scratch", "random", "mwm"}
    assert all(0 <= v["accuracy"] <= 1 for v in s["probe"].values())
    saved = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert saved["localize_eval"]["n"] > 0 and saved["pretrain"]["mwm"]["roi_stats"]["with_roi"] > 0


def test_demo_runs_the_evidence_grid_and_refuses_grids_the_encoder_cannot_mask():
    """The demo masks on the evidence protocol's 8 × 8 grid (16-px cells at 128 px) with MWM at 0.4 overall; a
    grid whose cells do not divide the encoder's stride 32 is refused before any stage runs."""
    import pytest
    from pydantic import ValidationError

    cfg = DemoConfig()
    assert (cfg.mask_grid, cfg.mask_stride, cfg.ratio) == (8, 16, 0.4)
    assert DemoConfig(size=64).mask_stride == 8
    with pytest.raises(ValidationError, match="mask stride 12"):
        DemoConfig(size=96, mask_grid=8)
    with pytest.raises(ValidationError, match="not a multiple"):
        DemoConfig(size=128, mask_grid=6)
